"""The CUDA launchers' side of sliding-window attention (the op's numerics: test_attention_window.py).

Run in the CPU emulator (marker `simt`): the launchers check the window before any CUDA call, and
llmkern.cuda.attention hands the kernels a window that fits a C int.
"""

import pytest
import torch

import llmkern.cuda.attention as cuda_attention
from llmkern import _backend

FAKE = 1 << 20  # a 16-byte aligned address the launchers must refuse before touching
BF16 = 2  # DType code of bfloat16 (csrc/common/dtype.h)


@pytest.mark.simt
@pytest.mark.parametrize("causal,window", [(True, -1), (False, 4)], ids=["negative", "without-causal"])
def test_launchers_refuse_a_bad_window(causal, window):
    mod = _backend.cuda_module()
    st = (4 * 8 * 64, 8 * 64, 64)
    sizes = (1, 4, 2, 8, 8, 64)  # batch, q heads, kv heads, seq_q, seq_k, head dim
    with pytest.raises(RuntimeError, match="attention_forward.*cudaErrorInvalidValue"):
        mod.attention_forward(FAKE, FAKE, FAKE, 0, FAKE, FAKE, *sizes, st, st, st, st, 0.125, causal, window, BF16,
                              64, 0)
    with pytest.raises(RuntimeError, match="attention_backward.*cudaErrorInvalidValue"):
        mod.attention_backward(FAKE, FAKE, FAKE, FAKE, FAKE, FAKE, 0, FAKE, FAKE, FAKE, FAKE, *sizes,
                               st, st, st, st, st, st, st, st, 0.125, causal, window, BF16, 0)


@pytest.mark.simt
def test_a_window_past_a_c_int_is_no_window():
    """A window of 2**40 keys masks nothing: the launchers run it as no window (a C int could not hold it)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 32, dtype=torch.float16) for _ in range(3))
    do = torch.randn_like(q)
    results = []
    for window in (0, 2**40):
        o, lse = torch.empty_like(q), torch.empty(1, 2, 70)
        cuda_attention.forward(q, k, v, None, True, window, 32**-0.5, o, lse)
        grads = [torch.empty_like(t) for t in (q, k, v)]
        cuda_attention.backward(do, q, k, v, o, lse, None, True, window, 32**-0.5, *grads)
        results.append([o, lse, *grads])
    for without, huge in zip(*results):
        torch.testing.assert_close(huge, without, rtol=0, atol=0)
