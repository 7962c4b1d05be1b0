"""SwiGLU: silu(gate) * up against float64, gradients included, and bad input."""

import pytest
import torch
import torch.nn.functional as F

import llmkern
from numerics import assert_close_to_ref

SHAPES = [(1,), (17,), (3, 123), (2, 5, 1000), (4097,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_float64(shape, dtype):
    gate = (torch.randn(shape) * 4).to(dtype).requires_grad_(True)
    up = torch.randn(shape).to(dtype).requires_grad_(True)
    out = llmkern.ops.swiglu(gate, up, backend="torch")
    dy = torch.randn(shape).to(dtype)
    out.backward(dy)

    g64, u64 = gate.detach().double().requires_grad_(True), up.detach().double().requires_grad_(True)
    truth = g64 * torch.sigmoid(g64) * u64
    truth.backward(dy.double())
    gl, ul = gate.detach().requires_grad_(True), up.detach().requires_grad_(True)
    theirs = F.silu(gl) * ul  # torch's own low-precision computation
    theirs.backward(dy)

    assert out.dtype == dtype
    assert_close_to_ref(out, truth, theirs, f"swiglu {dtype} {shape}", atol=1e-5)
    assert_close_to_ref(gate.grad, g64.grad, gl.grad, f"dgate {dtype} {shape}", atol=1e-5)
    assert_close_to_ref(up.grad, u64.grad, ul.grad, f"dup {dtype} {shape}", atol=1e-5)


def test_swiglu_takes_the_halves_of_a_fused_projection():
    fused = torch.randn(3, 7, 2 * 96)
    gate, up = fused.split(96, dim=-1)  # views with a row stride of 192
    torch.testing.assert_close(llmkern.ops.swiglu(gate, up), F.silu(gate) * up)


@pytest.mark.parametrize(
    "gate, up, error, words",
    [
        (torch.randn(4), torch.randn(5), ValueError, "one shape"),
        (torch.randn(4), torch.randn(4, dtype=torch.float16), TypeError, "one dtype"),
        (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), TypeError, "gate must have dtype"),
        (torch.randn(4, 2).t(), torch.randn(4, 2).t(), ValueError, "contiguous in its last dimension"),
        ([1.0], torch.randn(1), TypeError, "gate must be a torch.Tensor"),
    ],
)
def test_swiglu_errors(gate, up, error, words):
    with pytest.raises(error) as info:
        llmkern.ops.swiglu(gate, up)
    assert words in str(info.value)
