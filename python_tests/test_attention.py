"""llmkern.ops.attention against the float64 math reference, on every backend that runs here.

On a CPU machine both kernel backends run, on small shapes:
- the Triton kernels in Triton's interpreter (fp16/fp32: the interpreter's bf16 dot is wrong);
- the CUDA kernels (csrc/cuda/attention*.cu, forward and the 3-kernel backward) in the CPU emulator
  python_tests/simt (tests marked `simt`: backend "cuda" on CPU tensors): fp16 and bf16, head dims
  32, 64, 96 and 128, GQA and MQA, causal or not, Sq != Sk both ways, odd lengths that leave partial
  64-row tiles, document masks, fused-QKV views, NaN-filled outputs, launches in batch slices,
  and the same launches under other thread/block schedules (a race between barriers changes bits).
  The emulator's time grows with heads x 64 x 64 tiles, so its shapes have few of both.
The `cuda`-marked tests run both kernel backends on a GPU, at full size.
A low-precision result passes when its error is at most 2x (plus a small atol) the error of
PyTorch's own SDPA in the same dtype against the same float64 reference (python_tests/numerics.py).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import simt
import torch
import torch.nn.functional as F

import llmkern.cuda.attention as cuda_attention
from llmkern import _backend
from llmkern.ops import attention, reference
from numerics import assert_close_to_ref

HAS_CUDA = torch.cuda.is_available()
CPU = torch.device("cpu")


def _kernel_backends(device: torch.device) -> list[str]:
    return [b for b in ("triton", "cuda") if _backend.can_run(b, "attention", device)]


def _gpu_backends() -> list[str]:
    return _kernel_backends(torch.device("cuda")) if HAS_CUDA else []


def require_gpu_backend(backend: str) -> None:
    """Skip the test when this GPU machine has no attention kernels of `backend`."""
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend} has no attention kernels here")


def require_backend(backend: str, device: str) -> None:
    """Skip the test when `backend` has no attention kernels that run on `device` here."""
    if not _backend.can_run(backend, "attention", torch.device(device)):
        pytest.skip(f"backend {backend} has no attention kernels on {device} here")


# Tests marked so run the cuda backend's kernels on CPU tensors in the emulator (conftest.py).
emulated = pytest.mark.simt


def _size_id(size) -> str:
    return "x".join(map(str, size)) if isinstance(size, tuple) else str(size)


def kernel_runs(gpu: list, emulator: list, backends=("triton", "cuda")) -> list:
    """Parameters (backend, device, size): on a GPU each of `backends` at each size of `gpu`; on any
    machine the CUDA kernels in the CPU emulator at each (smaller) size of `emulator`."""
    runs = [pytest.param(b, "cuda", size, marks=pytest.mark.cuda, id=f"{b}-{_size_id(size)}")
            for b in backends for size in gpu]
    runs += [pytest.param("cuda", "cpu", size, marks=emulated, id=f"cuda-simt-{_size_id(size)}") for size in emulator]
    return runs


def _make_qkv(b, hq, hkv, sq, sk, d, dtype, device, strided=False):
    """Fresh random q, k, v; strided=True gives the views of a fused QKV projection (non-contiguous)."""
    if strided:
        if sq != sk:
            raise ValueError("the fused-projection layout needs Sq == Sk")
        qkv = torch.randn(b, sq, hq + 2 * hkv, d, dtype=dtype, device=device)
        q, k, v = qkv.split([hq, hkv, hkv], dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D), last dim contiguous
    else:
        q = torch.randn(b, hq, sq, d, dtype=dtype, device=device)
        k = torch.randn(b, hkv, sk, d, dtype=dtype, device=device)
        v = torch.randn(b, hkv, sk, d, dtype=dtype, device=device)
    return [t.detach().requires_grad_() for t in (q, k, v)]


def _random_doc_ids(b: int, s: int, device) -> torch.Tensor:
    """Packed documents of random lengths (some of length 1), ids increasing along each row."""
    starts = torch.rand(b, s, device=device) < 0.15
    starts[:, 0] = True
    return starts.cumsum(dim=1).to(torch.int64) - 1


def _visibility_mask(sq, sk, causal, doc_ids, device):
    """(B or 1, 1, Sq, Sk) bool mask equal to the reference's (causal aligned bottom-right)."""
    mask = torch.ones(1, 1, sq, sk, dtype=torch.bool, device=device)
    if causal:
        mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    return mask


def _sdpa(q, k, v, causal, scale, doc_ids):
    """PyTorch's own attention in the inputs' dtype, with the reference's mask."""
    mask = _visibility_mask(q.size(2), k.size(2), causal, doc_ids, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.size(1) != k.size(1))


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def check_against_reference(backend, b, hq, hkv, sq, sk, d, dtype, causal, device, strided=False,
                            doc_ids=None, cu_seqlens=None, scale=None, atol=1e-5):
    """o, dq, dk, dv of `backend` vs the float64 reference, bounded by 2x SDPA's own error."""
    q, k, v = _make_qkv(b, hq, hkv, sq, sk, d, dtype, device, strided)
    kwargs = {"doc_ids": doc_ids} if doc_ids is not None else {}
    if cu_seqlens is not None:
        kwargs = {"cu_seqlens": cu_seqlens}
        doc_ids = attention_module().doc_ids_from_cu_seqlens(cu_seqlens, b, sq)
    o = attention(q, k, v, causal=causal, scale=scale, backend=backend, **kwargs)
    assert o.shape == (b, hq, sq, d) and o.dtype == dtype
    if strided:  # the gradient a model hands back through o.transpose(1, 2): strided too
        do = torch.randn(b, sq, hq, d, dtype=dtype, device=device).transpose(1, 2)
    else:  # contiguous, whatever the layout of o (randn_like would copy the kernels' (B, S, H, D) strides)
        do = torch.randn(o.shape, dtype=dtype, device=device)
    grads = _grads(o, (q, k, v), do)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, causal=causal, scale=scale, doc_ids=doc_ids)
    ref_grads = _grads(ref, (q64, k64, v64), do.double())

    lowp = _sdpa(q, k, v, causal, scale, doc_ids)
    lowp_grads = _grads(lowp, (q, k, v), do)

    assert_close_to_ref(o, ref, lowp, f"{backend} o", atol=atol)
    for name, g, rg, lg in zip(("dq", "dk", "dv"), grads, ref_grads, lowp_grads):
        assert g.shape == rg.shape and g.dtype == dtype
        assert_close_to_ref(g, rg, lg, f"{backend} {name}", atol=atol)


def check_queries_that_see_no_key(backend, sq, sk, d, dtype, device, atol):
    """Causal with Sq > Sk: the first Sq - Sk queries see no key. They get o = 0 and zero gradients (no
    NaN anywhere), and every other row and gradient matches the float64 reference."""
    q, k, v = _make_qkv(2, 4, 2, sq, sk, d, dtype, device)
    o = attention(q, k, v, causal=True, backend=backend)
    do = torch.randn_like(o)
    grads = _grads(o, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, causal=True)
    ref_grads = _grads(ref, (q64, k64, v64), do.double())
    empty = sq - sk
    assert torch.all(o[:, :, :empty] == 0) and torch.all(grads[0][:, :, :empty] == 0)
    for name, got, want in (("o", o, ref), *zip(("dq", "dk", "dv"), grads, ref_grads)):
        assert not torch.isnan(got).any(), f"{backend} {name} has NaN"
        torch.testing.assert_close(got.double(), want, rtol=0, atol=atol, msg=f"{backend} {name}")


def attention_module():
    return importlib.import_module("llmkern.ops.attention")


def triton_attention():
    return importlib.import_module("llmkern.triton.attention")


# --- both kernel backends on this CPU: Triton in its interpreter, CUDA in the emulator -----------

interp = pytest.mark.skipif(
    not _backend.can_run("triton", "attention", CPU), reason="Triton interpreter not enabled (TRITON_INTERPRET=1)"
)

# (backend, dtype, head dim, atol) of the small CPU tests: Triton's interpreter in fp32 (its bf16 dot is
# wrong) at its smallest head dim; the CUDA kernels, which have neither fp32 nor D=32, in bf16 at D=64
# (with the GPU tests' atol for a half type).
CPU_KERNELS = [
    pytest.param("triton", torch.float32, 32, 1e-5, marks=interp, id="triton-interp"),
    pytest.param("cuda", torch.bfloat16, 64, 1e-3, marks=emulated, id="cuda-simt"),
]


@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("s", [1, 17, 64])
def test_triton_interpreter_matches_reference(s, d, causal, dtype):
    check_against_reference("triton", 1, 4, 2, s, s, d, dtype, causal, CPU)


@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [96, 128, 256])  # 96: no power of 2, a padded tile; 256: Triton's alone
def test_triton_interpreter_other_head_dims(d, causal, dtype):
    check_against_reference("triton", 2, 4, 2, 37, 37, d, dtype, causal, CPU)


@pytest.mark.parametrize("backend,dtype,d,atol", CPU_KERNELS)
@pytest.mark.parametrize("hq,hkv", [(4, 1), (3, 3)])
def test_cpu_gqa_and_mha(backend, dtype, d, atol, hq, hkv):
    check_against_reference(backend, 2, hq, hkv, 23, 23, d, dtype, True, CPU, atol=atol)


@pytest.mark.parametrize("backend,dtype,d,atol", CPU_KERNELS)
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_strided_inputs(backend, dtype, d, atol, causal):
    check_against_reference(backend, 2, 4, 2, 19, 19, d, dtype, causal, CPU, strided=True, atol=atol)


@pytest.mark.parametrize("backend,dtype,d,atol", CPU_KERNELS)
@pytest.mark.parametrize("sq,sk", [(5, 37), (1, 40)])
def test_cpu_shorter_queries_causal_bottom_right(backend, dtype, d, atol, sq, sk):
    check_against_reference(backend, 1, 2, 1, sq, sk, d, dtype, True, CPU, atol=atol)


@pytest.mark.parametrize("backend,dtype,d,atol", CPU_KERNELS)
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_doc_ids(backend, dtype, d, atol, causal):
    doc_ids = _random_doc_ids(2, 45, CPU)
    check_against_reference(backend, 2, 4, 2, 45, 45, d, dtype, causal, CPU, doc_ids=doc_ids, atol=atol)


@pytest.mark.parametrize("backend,dtype,d,atol", CPU_KERNELS)
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_doc_ids_that_recur(backend, dtype, d, atol, causal):
    """Ids that come back later in the row (not one run per document), and ids past int32: a block's
    keys span tiles that share none of its documents, which must come out fully masked."""
    runs = torch.tensor([[7, 0, 7, 2**32, 0, 7], [-5, 9, -5, 9, -5, 9]])  # 2**32 is 0 in int32
    lengths = torch.tensor([[9, 5, 12, 7, 6, 10], [3, 11, 2, 14, 9, 10]])  # 49 positions a row
    doc_ids = torch.stack([r.repeat_interleave(n) for r, n in zip(runs, lengths)])
    check_against_reference(backend, 2, 4, 2, 49, 49, d, dtype, causal, CPU, doc_ids=doc_ids, atol=atol)


@pytest.mark.parametrize("backend,dtype,d,atol", [
    pytest.param("triton", torch.float16, 32, 1e-5, marks=interp, id="triton-interp"),
    pytest.param("cuda", torch.float16, 64, 1e-3, marks=emulated, id="cuda-simt"),
])
def test_cpu_cu_seqlens_and_scale(backend, dtype, d, atol):
    cu = torch.tensor([0, 3, 4, 20, 33], dtype=torch.int32)
    check_against_reference(backend, 2, 2, 1, 33, 33, d, dtype, True, CPU, cu_seqlens=cu, scale=0.3, atol=atol)


@pytest.mark.parametrize("backend,dtype,d,atol", [
    pytest.param("triton", torch.float32, 32, 1e-4, marks=interp, id="triton-interp"),
    pytest.param("cuda", torch.bfloat16, 64, 5e-2, marks=emulated, id="cuda-simt"),
])
@pytest.mark.parametrize("sq,sk", [(20, 7), (9, 1)])
def test_cpu_queries_that_see_no_key(backend, dtype, d, atol, sq, sk):
    check_queries_that_see_no_key(backend, sq, sk, d, dtype, CPU, atol=atol)


def _record_triton_launches(monkeypatch) -> list:
    """The Triton attention kernels launched from now on (through _launch: all but the delta kernel)."""
    A = triton_attention()
    launched = []
    launch = A._launch
    monkeypatch.setattr(A, "_launch", lambda kernel, *args: (launched.append(kernel), launch(kernel, *args))[1])
    return launched


@interp
@pytest.mark.parametrize("case", ["causal", "not-causal", "mqa-strided", "short-queries", "docs", "no-key"])
def test_triton_interpreter_dq_by_atomics(case, monkeypatch):
    """LLMKERN_TRITON_ATTENTION_DQ=atomic: the dk/dv kernel sums dq into fp32 by atomics and the dq kernel
    does not run; every gradient still matches the reference (GQA heads add into their own dq rows)."""
    A = triton_attention()
    monkeypatch.setenv(A.DQ_ENV, "atomic")
    launched = _record_triton_launches(monkeypatch)
    if case == "no-key":
        check_queries_that_see_no_key("triton", 20, 7, 32, torch.float32, CPU, atol=1e-4)
    else:
        hq, hkv, sq, sk = {"mqa-strided": (4, 1, 29, 29), "short-queries": (2, 1, 9, 40)}.get(case, (4, 2, 37, 37))
        doc_ids = _random_doc_ids(2, 37, CPU) if case == "docs" else None
        check_against_reference("triton", 2, hq, hkv, sq, sk, 32, torch.float32, case != "not-causal", CPU,
                                strided=case == "mqa-strided", doc_ids=doc_ids)
    assert A._attention_bwd_dkdv_kernel in launched and A._attention_bwd_dq_kernel not in launched


@interp
def test_triton_dq_switch_is_checked_and_deterministic_mode_keeps_the_dq_kernel(monkeypatch):
    A = triton_attention()
    monkeypatch.setenv(A.DQ_ENV, "atomics")
    q, k, v = _make_qkv(1, 2, 1, 8, 8, 32, torch.float32, CPU)
    with pytest.raises(ValueError, match="LLMKERN_TRITON_ATTENTION_DQ must be 'separate' or 'atomic'; got 'atomics'"):
        attention(q, k, v, backend="triton").sum().backward()
    monkeypatch.setenv(A.DQ_ENV, "atomic")
    assert A._dq_by_atomics()
    torch.use_deterministic_algorithms(True)
    try:
        assert not A._dq_by_atomics()
    finally:
        torch.use_deterministic_algorithms(False)


def test_torch_backend_queries_that_see_no_key():
    check_queries_that_see_no_key("torch", 20, 7, 32, torch.float32, CPU, atol=1e-5)


def check_kernels_write_every_output(backend, device, b, hq, hkv, s, d, dtype, causal=True, sk=None, docs=False):
    """The backend's kernels called directly on NaN-filled outputs: an element they skip stays NaN and
    fails. s query rows over sk keys (s by default); with causal and s > sk the first s - sk rows see no
    key, and must be written as zeros (o and dq) all the same. The fp32 lse (which the op does not
    return) is checked against float64 on the rows that see a key, o on every row."""
    kernels = importlib.import_module(f"llmkern.{backend}.attention")
    sk = s if sk is None else sk
    q, k, v = (t.detach() for t in _make_qkv(b, hq, hkv, s, sk, d, dtype, device))
    doc_ids = _random_doc_ids(b, s, device).to(torch.int32) if docs else None
    o = torch.full_like(q, float("nan")).contiguous()
    lse = torch.full((b, hq, s), float("nan"), device=device)
    kernels.forward(q, k, v, doc_ids, causal, 0, d**-0.5, o, lse)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    kernels.backward(torch.randn_like(o), q, k, v, o, lse, doc_ids, causal, 0, d**-0.5, dq, dk, dv)
    for name, t in (("o", o), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"{backend}: {name} has unwritten (NaN) elements"
    visible = _visibility_mask(s, sk, causal, doc_ids, device).expand(b, 1, s, sk)
    seen = visible.any(dim=-1).expand(b, hq, s)  # the rows that see at least one key
    assert torch.all(o[~seen] == 0) and torch.all(dq[~seen] == 0), f"{backend}: a row that sees no key is not zero"
    scores = q.double() @ k.double().transpose(-2, -1).repeat_interleave(hq // hkv, dim=1) * d**-0.5
    ref_lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    torch.testing.assert_close(lse.double()[seen], ref_lse[seen], atol=1e-5, rtol=1e-5)
    ref_o = reference.attention(q.double(), k.double(), v.double(), causal=causal, doc_ids=doc_ids)
    torch.testing.assert_close(o.double(), ref_o, rtol=0, atol=1e-4 if dtype == torch.float32 else 5e-2)


@interp
@pytest.mark.parametrize("s,sk,causal,docs", [(21, 21, True, False), (21, 7, True, False), (7, 21, True, False),
                                              (21, 21, False, True)])
def test_triton_interpreter_writes_every_output(s, sk, causal, docs):
    check_kernels_write_every_output("triton", "cpu", 1, 2, 1, s, 32, torch.float32, causal=causal, sk=sk, docs=docs)


@pytest.mark.parametrize("backend,dtype,d,atol", CPU_KERNELS)
def test_cpu_opcheck(backend, dtype, d, atol):
    q, k, v = _make_qkv(1, 2, 1, 9, 9, d, dtype, CPU)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.llmkern.attention_fwd.default, (q, k, v, None, True, 0.2, backend))
    o, lse = torch.ops.llmkern.attention_fwd(q, k, v, doc_ids, False, 0.2, backend)
    bwd_args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), doc_ids, False, 0.2,
                backend)
    torch.library.opcheck(torch.ops.llmkern.attention_bwd.default, bwd_args)


@pytest.mark.parametrize("backend,dtype,d,atol", CPU_KERNELS)
def test_cpu_compile_fullgraph(backend, dtype, d, atol):
    q, k, v = _make_qkv(1, 2, 2, 12, 12, d, dtype, CPU)

    def loss(q, k, v):
        return attention(q, k, v, causal=True, backend=backend).float().square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend,dtype,d,atol", CPU_KERNELS)
def test_cpu_large_batches_launch_in_slices(backend, dtype, d, atol, monkeypatch):
    """A batch * heads beyond one launch's grid runs as several launches over slices of the batch."""
    monkeypatch.setattr(attention_module(), "MAX_BATCH_HEADS_PER_LAUNCH", 4)  # 2 rows of 2 heads per launch
    doc_ids = _random_doc_ids(5, 21, CPU)
    check_against_reference(backend, 5, 2, 1, 21, 21, d, dtype, True, CPU, doc_ids=doc_ids, atol=atol)
    with pytest.raises(ValueError, match="q has 6 heads; the kernels take at most 4"):
        attention(*_make_qkv(1, 6, 6, 8, 8, d, dtype, CPU, False), backend=backend)


_ROW_OFFSET_SCRIPT = r"""
import sys
import torch
from llmkern.ops import attention

path, stride, s, d = sys.argv[1], 2**30 + 32, 3, 32
n = stride * (s - 1) + 3 * d
with open(path, "wb") as f:
    f.truncate(n * 4)  # sparse: only the pages of the 3 rows written below take memory
storage = torch.from_file(path, shared=True, size=n, dtype=torch.float32)
qkv = storage.as_strided((1, s, 3, d), (n, stride, d, 1))  # a fused projection's (B, S, 3, D) rows
qkv.copy_(torch.randn(1, s, 3, d))
views = [t.unsqueeze(1).detach().requires_grad_() for t in qkv.unbind(2)]  # (1, 1, S, D), row stride 2**30 + 32
copies = [t.detach().clone().requires_grad_() for t in views]
out = attention(*views, causal=True, backend="triton")
want = attention(*copies, causal=True, backend="torch")
grad = torch.randn_like(want)
out.backward(grad)
want.backward(grad)
torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
for got, ref in zip(views, copies):
    torch.testing.assert_close(got.grad, ref.grad, atol=1e-5, rtol=1e-5)
print("ok")
"""


@interp
def test_triton_interpreter_row_offsets_past_int32(tmp_path):
    """Rows 2**30 + 32 elements apart (views into a sparse 8 GB file): row 2 starts past 2**31
    elements, so a position * stride formed in int32 wraps to a negative offset. In its own
    process, because a wrapped offset reads outside the mapping and crashes it."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _ROW_OFFSET_SCRIPT, str(tmp_path / "sparse.bin")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, (done.returncode, done.stderr[-2000:])


# --- the Triton kernels compiled for real GPUs, without one ---------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests run the kernels themselves")
def test_triton_kernels_compile_for_sm80_and_sm90():
    """The interpreter runs the kernels' Python; this builds their GPU code (ptxas included), which
    catches what only the compiler rejects (types, layouts, shared memory). See triton_build.py.
    Built as the JIT builds a launch on aligned tensors, the first (largest) tile of each kernel, with
    documents or without (and on sm_90 with a sliding window too: its extra loop of masked tiles), must use the tensor cores' own instruction of each GPU (wgmma on sm_90,
    mma.sync on sm_80) and a software-pipelined stream of k/v or q/do tiles (cp.async): without them
    a kernel runs at a fraction of its speed and still passes every numerical test."""
    pytest.importorskip("triton.backends.nvidia")
    from triton_build import run_build

    out = run_build('''
    import json
    import re
    from llmkern.triton import attention as A

    POINTER = {"LSE": "*fp32", "DELTA": "*fp32", "DOC": "*i32", "DQ32": "*fp32"}
    KERNELS = [(A._attention_fwd_kernel, A._FWD_CONFIGS, {}),
               (A._attention_bwd_dkdv_kernel, A._DKDV_CONFIGS, {"ATOMIC_DQ": False}),
               (A._attention_bwd_dkdv_kernel, A._DKDV_CONFIGS, {"ATOMIC_DQ": True}),
               (A._attention_bwd_dq_kernel, A._DQ_CONFIGS, {})]
    for arch in (80, 90):
        for kernel, configs, switches in KERNELS:
            tile = configs[0]
            masks = [(has_doc, has_window) for has_window in ((False, True) if arch == 90 else (False,))
                     for has_doc in (False, True)]
            for has_doc, has_window in masks:
                consts = dict(HEAD_DIM=128, BLOCK_D=128, CAUSAL=True, HAS_DOC=has_doc, HAS_WINDOW=has_window,
                              HAS_SOFTCAP=False, DOT_PRECISION="tf32", DOC_SCAN=A.DOC_SCAN, **switches, **tile.kwargs)
                names = [n for n in kernel.fn.arg_names if n not in consts]
                floats = [n for n in names if n.startswith("scale") or n == "softcap"]
                sig = {n: POINTER.get(n, "*bf16") if n.isupper() else "fp32" if n in floats else "i32" for n in names}
                aligned = [n for n in names if n.isupper() or n.startswith("stride")]
                ptx = build(kernel, sig, consts, arch, aligned, num_warps=tile.num_warps, num_stages=tile.num_stages)
                found = {op: len(re.findall(pattern, ptx)) for op, pattern in
                         (("wgmma", r"wgmma\\.mma_async"), ("mma.sync", r"mma\\.sync"), ("cp.async", r"cp\\.async\\.c[ag]"),
                          ("atomic add", r"(atom|red)\\.global\\S*\\.add\\S*\\.f32"))}
                print(json.dumps([kernel.fn.__name__ + (" atomic dq" if switches.get("ATOMIC_DQ") else ""), arch,
                                  [has_doc, has_window], found]))
        # the backward's first kernel (delta = rowsum(o * do)): no tensor cores, but it must build too
        sig = {n: "*bf16" if n in ("O", "DO") else "*fp32" if n == "DELTA" else "i32"
               for n in A._attention_bwd_delta_kernel.arg_names if not n.isupper() or n in ("O", "DO", "DELTA")}
        build(A._attention_bwd_delta_kernel, sig, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64), arch, ("O", "DO"))
        print(json.dumps(["delta", arch]))
    ''')
    built = [json.loads(line) for line in out.splitlines()]
    assert [b for b in built if b[0] == "delta"] == [["delta", 80], ["delta", 90]], out
    built = [b for b in built if b[0] != "delta"]
    assert len(built) == 24, out  # 4 kernels: 2 mask kinds on sm_80, 4 on sm_90
    for name, arch, has_doc, found in built:
        assert found["wgmma" if arch == 90 else "mma.sync"] > 0, (name, arch, has_doc, found)
        assert found["cp.async"] > 0, (name, arch, has_doc, found)
        assert (found["atomic add"] > 0) == name.endswith("atomic dq"), (name, arch, has_doc, found)


def test_triton_tuning_skips_the_head_dim_256_tiles_for_smaller_heads():
    """Each candidate tile costs a compile and a timing per tuning key; those kept for head dim 256
    alone are pruned below it, and come first at 256 (a pinned tile 0 must fit there)."""
    pytest.importorskip("triton.backends.nvidia")
    from triton_build import run_build

    out = run_build('''
    from llmkern.triton import attention as A
    def tile(c):
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
    for configs in (A._FWD_CONFIGS, A._DKDV_CONFIGS, A._DQ_CONFIGS):
        narrow = A._for_head_dim(configs, {}, BLOCK_D=128)
        wide = A._for_head_dim(configs, {"BLOCK_D": 256})
        print(len(configs), [tile(c) for c in configs if c not in narrow], tile(wide[0]), len(wide))
    ''')
    assert out.splitlines() == ["7 [(128, 32, 8, 2)] (128, 32, 8, 2) 7", "10 [(16, 32, 4, 1)] (16, 32, 4, 1) 10",
                                "8 [(16, 32, 4, 1)] (16, 32, 4, 1) 8"], out


@interp
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose, on a CPU
def test_bench_attention_document_providers_agree_with_the_reference():
    """bench_attention --doc-len compares llmkern's doc_ids with FlexAttention and masked SDPA: on
    the CPU (Triton in its interpreter, FlexAttention eager) every provider gives the reference's
    output for the same documents, and the FLOP count is that of the visible pairs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        bench = importlib.import_module("bench_attention")
    finally:
        sys.path.pop(0)
    doc_ids = bench.packed_doc_ids(2, 40, 16, CPU)  # documents of 16, 16 and 8 tokens
    assert doc_ids[0].tolist() == [0] * 16 + [1] * 16 + [2] * 8
    assert bench.forward_flops(2, 3, 40, 32, True, 16) == 4.0 * 2 * 3 * 32 * (16 * 16 + 16 * 16 + 8 * 8) / 2
    q, k, v = (t.detach() for t in _make_qkv(2, 2, 2, 40, 40, 32, torch.float32, CPU))
    want = reference.attention(q.double(), k.double(), v.double(), causal=True, doc_ids=doc_ids)
    providers = bench.document_providers(CPU, doc_ids)
    assert {"FlexAttention", "SDPA efficient + mask", "llmkern triton"} <= set(providers)
    for name, fn in providers.items():
        torch.testing.assert_close(fn(q, k, v).double(), want, rtol=0, atol=1e-5, msg=name)
    bench.print_tuned_tiles()  # reads the autotuners' caches (one config here, so maybe nothing to print)


@interp
def test_bench_attention_switched_provider_runs_its_backward_under_the_switch(monkeypatch):
    """"llmkern triton atomic-dq" is llmkern triton with the dq switch set for the forward and the
    backward both (the backward runs outside the provider's call), and the switch is undone after."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        bench = importlib.import_module("bench_attention")
    finally:
        sys.path.pop(0)
    A = triton_attention()
    monkeypatch.delenv(A.DQ_ENV, raising=False)
    launched = _record_triton_launches(monkeypatch)
    fn = bench.providers(CPU)["llmkern triton atomic-dq"]
    q, k, v = _make_qkv(1, 2, 2, 20, 20, 32, torch.float32, CPU)
    with bench.switches("llmkern triton atomic-dq"):
        assert os.environ[A.DQ_ENV] == "atomic"
        out = fn(q, k, v, True)
        torch.autograd.backward(out, torch.randn_like(out))
    assert A.DQ_ENV not in os.environ
    assert A._attention_bwd_dkdv_kernel in launched and A._attention_bwd_dq_kernel not in launched


# --- the torch backend (the reference itself; checks the op's plumbing) -------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_torch_backend_matches_sdpa(causal):
    q, k, v = _make_qkv(2, 4, 2, 33, 33, 64, torch.float32, CPU)
    out = attention(q, k, v, causal=causal, backend="torch")
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interp)])
def test_fp32_inputs_under_autocast_stay_fp32(backend):
    """Autocast changes neither backend's precision: both compute fp32 inputs in fp32, as outside it (the
    torch backend's matmuls would otherwise run in bf16, 1e-2 away from the kernels)."""
    q, k, v = (t.detach() for t in _make_qkv(1, 2, 2, 9, 9, 32, torch.float32, CPU))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, backend=backend)
    want = reference.attention(q.double(), k.double(), v.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_torch_backend_doc_ids_equal_separate_documents():
    """Two packed documents attend exactly as if each ran alone."""
    q, k, v = (t.detach() for t in _make_qkv(1, 2, 2, 30, 30, 32, torch.float32, CPU))
    doc_ids = torch.tensor([[0] * 12 + [1] * 18])
    out = attention(q, k, v, backend="torch", doc_ids=doc_ids)
    first = attention(q[:, :, :12], k[:, :, :12], v[:, :, :12], backend="torch")
    second = attention(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], backend="torch")
    torch.testing.assert_close(out, torch.cat([first, second], dim=2))


def test_int32_doc_ids_are_equal_exactly_where_the_ids_are():
    """The kernels read int32 ids; int64 ones are relabelled, since a cast would join 0 and 2**32."""
    int32_doc_ids = attention_module().int32_doc_ids
    values = torch.tensor([0, 2**32, -2**32, 2**40 + 1, 1, -1, 2**63 - 1, -2**63])
    ids = values[torch.randint(len(values), (3, 57))]
    relabelled = int32_doc_ids(ids)
    assert relabelled.dtype == torch.int32 and relabelled.shape == ids.shape
    assert torch.equal(relabelled[:, :, None] == relabelled[:, None, :], ids[:, :, None] == ids[:, None, :])
    small = torch.randint(-9, 9, (2, 30), dtype=torch.int32)
    assert torch.equal(int32_doc_ids(small.t().contiguous().t()), small)  # int32 ids as given, contiguous
    assert int32_doc_ids(small.t().contiguous().t()).is_contiguous()


def test_doc_ids_from_cu_seqlens():
    ids = attention_module().doc_ids_from_cu_seqlens(torch.tensor([0, 2, 2, 5]), 2, 5)
    assert ids.tolist() == [[0, 0, 2, 2, 2]] * 2


# --- bad input ----------------------------------------------------------------------------------


def _qkv(hq=4, hkv=2, s=8, d=32, dtype=torch.float32, b=1, device="cpu"):
    on = dict(dtype=dtype, device=device)
    return torch.randn(b, hq, s, d, **on), torch.randn(b, hkv, s, d, **on), torch.randn(b, hkv, s, d, **on)


# Each bad input is refused on every backend, with tensors where that backend runs, of a dtype and head
# dim it takes (so that the check under test, not a backend limit, is what refuses them): the checks
# must come before any backend's dispatch, never only on the torch path.
CHECKED = [
    pytest.param("torch", "cpu", torch.float32, 32, id="torch"),
    pytest.param("triton", "cuda" if HAS_CUDA else "cpu", torch.float16, 32, marks=() if HAS_CUDA else interp,
                 id="triton"),
    pytest.param("cuda", "cuda", torch.float16, 64, marks=pytest.mark.cuda, id="cuda"),
    pytest.param("cuda", "cpu", torch.float16, 64, marks=emulated, id="cuda-simt"),
]


@pytest.fixture
def qkv_for(request):
    """For a CHECKED test: qkv_for(**changes) gives q, k, v that its backend runs, but for the changes."""
    backend, device, dtype, d = (request.node.callspec.params[n] for n in ("backend", "device", "dtype", "d"))
    require_backend(backend, device)

    def make(**changes):
        return _qkv(**{"d": d, "dtype": dtype, "device": device, **changes})

    attention(*make(), backend=backend)  # the good inputs run: what a test changes is what is refused
    return make


@pytest.mark.parametrize("backend,device,dtype,d", CHECKED)
def test_rejects_heads_not_divisible(backend, device, dtype, d, qkv_for):
    with pytest.raises(ValueError, match=r"q's heads \(3\) must be a multiple of k's and v's heads \(2\)"):
        attention(*qkv_for(hq=3, hkv=2), backend=backend)
    with pytest.raises(ValueError, match=r"q's heads \(2\) must be a multiple of k's and v's heads \(4\)"):
        attention(*qkv_for(hq=2, hkv=4), backend=backend)


@pytest.mark.parametrize("backend,device,dtype,d", CHECKED)
def test_rejects_bad_dtypes(backend, device, dtype, d, qkv_for):
    q, k, v = qkv_for()
    with pytest.raises(TypeError, match="q must have dtype float32, float16, bfloat16; got float64"):
        attention(q.double(), k.double(), v.double(), backend=backend)
    with pytest.raises(TypeError, match="q must have dtype .*; got int32"):
        attention(q.int(), k.int(), v.int(), backend=backend)
    other = torch.bfloat16 if dtype != torch.bfloat16 else torch.float16
    with pytest.raises(TypeError, match="k must have q's dtype"):
        attention(q, k.to(other), v, backend=backend)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        attention(q, k, v.to(other), backend=backend)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention(q.tolist(), k, v, backend=backend)


@pytest.mark.parametrize("backend,device,dtype,d", CHECKED)
def test_rejects_mismatched_shapes(backend, device, dtype, d, qkv_for):
    q, k, v = qkv_for()
    with pytest.raises(ValueError, match="one batch size"):
        attention(q, k[:0], v[:0], backend=backend)
    with pytest.raises(ValueError, match="one batch size"):
        attention(q, k, v[:0], backend=backend)
    with pytest.raises(ValueError, match="one head dim"):
        attention(q, k[..., :16], v[..., :16], backend=backend)
    with pytest.raises(ValueError, match="one head dim"):
        attention(q, k, v[..., :16], backend=backend)
    with pytest.raises(ValueError, match="same sequence length"):
        attention(q, k, v[:, :, :5], backend=backend)
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k[0], v[0], backend=backend)
    with pytest.raises(ValueError, match="same number of heads"):
        attention(q, k, v[:, :1], backend=backend)


@pytest.mark.parametrize("backend,device,dtype,d", CHECKED)
def test_rejects_mixed_devices(backend, device, dtype, d, qkv_for):
    """Any one tensor on another device (meta stands for one on a machine with a single device)."""
    q, k, v = qkv_for()
    meta = {name: t.to("meta") for name, t in (("q", q), ("k", k), ("v", v))}
    for args, message in (((meta["q"], k, v), f"k is on {device}.* but q is on meta"),
                          ((q, meta["k"], v), f"k is on meta but q is on {device}"),
                          ((q, k, meta["v"]), f"v is on meta but q is on {device}")):
        with pytest.raises(ValueError, match=message):
            attention(*args, backend=backend)
    with pytest.raises(ValueError, match=f"doc_ids is on meta but q is on {device}"):
        attention(q, k, v, backend=backend, doc_ids=torch.zeros(1, 8, dtype=torch.int64, device="meta"))


@pytest.mark.parametrize("backend,device,dtype,d", CHECKED)
def test_rejects_an_empty_head_dim(backend, device, dtype, d, qkv_for):
    """D = 0 has no default scale (1 / sqrt(0)): a ValueError naming the head dim, not a ZeroDivisionError."""
    with pytest.raises(ValueError, match="head dim"):
        attention(*qkv_for(d=0), backend=backend)


@pytest.mark.parametrize("backend,device,dtype,d", CHECKED)
def test_rejects_non_contiguous_last_dim(backend, device, dtype, d, qkv_for):
    q, k, v = qkv_for(s=d)  # square (S, D) matrices, so that a transposed one has the right shape
    for name, args in (("q", (q.transpose(2, 3), k, v)), ("k", (q, k.transpose(2, 3), v)),
                       ("v", (q, k, v.transpose(2, 3)))):
        with pytest.raises(ValueError, match=f"{name} must be contiguous in its last dimension"):
            attention(*args, backend=backend)


@pytest.mark.parametrize("backend,device,dtype,d", CHECKED)
def test_rejects_bad_doc_masks(backend, device, dtype, d, qkv_for):
    q, k, v = qkv_for()
    on = dict(device=q.device)
    with pytest.raises(ValueError, match="shape"):
        attention(q, k, v, backend=backend, doc_ids=torch.zeros(1, 7, dtype=torch.int64, **on))
    with pytest.raises(TypeError, match="int32 or int64"):
        attention(q, k, v, backend=backend, doc_ids=torch.zeros(1, 8, **on))
    with pytest.raises(ValueError, match="one sequence length"):
        attention(q, k[:, :, :5], v[:, :, :5], backend=backend, doc_ids=torch.zeros(1, 8, dtype=torch.int64, **on))
    with pytest.raises(ValueError, match="start at 0 and end"):
        attention(q, k, v, backend=backend, cu_seqlens=torch.tensor([0, 3, 7], **on))
    with pytest.raises(ValueError, match="non-decreasing"):
        attention(q, k, v, backend=backend, cu_seqlens=torch.tensor([0, 5, 3, 8], **on))
    with pytest.raises(TypeError, match="cu_seqlens must have dtype int32 or int64"):
        attention(q, k, v, backend=backend, cu_seqlens=torch.tensor([0.0, 8.0], **on))
    with pytest.raises(ValueError, match="not both"):
        attention(q, k, v, backend=backend, doc_ids=torch.zeros(1, 8, dtype=torch.int64, **on),
                  cu_seqlens=torch.tensor([0, 8], **on))


@pytest.mark.parametrize("backend,device,dtype,d", CHECKED)
def test_rejects_bad_scale_and_causal(backend, device, dtype, d, qkv_for):
    with pytest.raises(ValueError, match="scale"):
        attention(*qkv_for(), scale=-1.0, backend=backend)
    for huge in (float("inf"), 1e39):  # 1e39 rounds to inf in fp32: NaN out of every backend
        with pytest.raises(ValueError, match="scale must be finite in float32"):
            attention(*qkv_for(), scale=huge, backend=backend)
    with pytest.raises(TypeError, match="causal"):
        attention(*qkv_for(), causal="yes", backend=backend)


@pytest.mark.parametrize("backend,device,dtype,d", [p for p in CHECKED if p.values[0] != "torch"])
def test_kernel_backends_reject_unsupported_head_dims_and_dtypes(backend, device, dtype, d, qkv_for):
    unsupported = [16, 48] + ([256] if backend == "cuda" else [])  # Triton has D = 256 kernels, CUDA not
    for head_dim in unsupported:
        with pytest.raises(ValueError, match=rf"backend '{backend}' supports head dims \(.*\); got {head_dim}"):
            attention(*qkv_for(d=head_dim), backend=backend)
    if backend == "cuda":  # tensor-core kernels only: fp32 is for the reference and Triton
        with pytest.raises(TypeError, match="q, k and v must have dtype float16, bfloat16 for backend 'cuda'; "
                                            "got torch.float32"):
            attention(*qkv_for(dtype=torch.float32), backend=backend)


@pytest.mark.parametrize("sizes, error, match", [
    ((64, 0, 0), ValueError, "n_head must be >= 1"),
    ((64, 2, 0), ValueError, "n_kv_head must be >= 1"),
    ((64, -2, -2), ValueError, "n_head must be >= 1"),
    ((64, 2.0, 2), TypeError, "n_head must be an int"),
])
def test_module_rejects_bad_head_counts(sizes, error, match):
    from llmkern.nn import CausalSelfAttention

    with pytest.raises(error, match=match):
        CausalSelfAttention(*sizes)


@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="without a GPU Triton runs CPU tensors in its interpreter"))])
def test_gpu_backends_need_gpu_tensors(backend):
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run attention: the tensors are on cpu"):
        attention(*_qkv(d=64, dtype=torch.float16), backend=backend)


@pytest.mark.skipif(not _backend.cuda_has("attention"), reason="llmkern._cuda has no attention kernels")
@pytest.mark.parametrize("bad", ["head_dim", "heads", "stride", "alignment", "dtype", "null"])
def test_cuda_launchers_check_sizes_before_touching_memory(bad):
    """Bad sizes come back from the C++ launchers as errors naming the kernel (no GPU needed: the
    checks run before any CUDA call; the fake addresses are never read)."""
    base = 1 << 20
    args = dict(q=base, k=base, v=base, doc=0, o=base, lse=base, batch=1, q_heads=4, kv_heads=2, seq_q=8, seq_k=8,
                head_dim=64, stride=(4 * 8 * 64, 8 * 64, 64), dtype=2)
    if bad == "head_dim":
        args["head_dim"] = 48
    elif bad == "heads":
        args["q_heads"] = 3
    elif bad == "stride":
        args["stride"] = (4 * 8 * 64, 8 * 64, 60)
    elif bad == "alignment":
        args["q"] = base + 2
    elif bad == "dtype":
        args["dtype"] = 0  # fp32: no tensor-core kernel
    else:
        args["o"] = 0
    mod = _backend.cuda_module()
    a, st = args, args["stride"]
    with pytest.raises(RuntimeError, match="attention_forward.*cudaErrorInvalidValue"):
        mod.attention_forward(a["q"], a["k"], a["v"], a["doc"], a["o"], a["lse"], a["batch"], a["q_heads"],
                              a["kv_heads"], a["seq_q"], a["seq_k"], a["head_dim"], st, st, st, st, 0.125, True,
                              0, a["dtype"], 64, 0)
    with pytest.raises(RuntimeError, match="attention_backward.*cudaErrorInvalidValue"):
        mod.attention_backward(a["q"], a["k"], a["v"], a["o"], base, a["lse"], a["doc"], a["o"], base, base, base,
                               a["batch"], a["q_heads"], a["kv_heads"], a["seq_q"], a["seq_k"], a["head_dim"],
                               st, st, st, st, st, st, st, st, 0.125, True, 0, a["dtype"], 0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
def test_gpu_rejects_cpu_and_gpu_tensors_together(backend):
    q, k, v = _qkv(d=64, dtype=torch.float16)
    with pytest.raises(ValueError, match="k is on cpu but q is on cuda"):
        attention(q.cuda(), k, v.cuda(), backend=backend)


# --- the full matrix on a GPU; the CUDA kernels in the emulator at small sizes ------------------

GPU_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [32, 64, 96, 128])
@pytest.mark.parametrize("s", [1, 17, 128, 1000, 4097])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 1)])
def test_gpu_matches_reference(backend, dtype, causal, d, s, hq, hkv):
    require_gpu_backend(backend)
    b = 2 if s <= 1000 else 1
    check_against_reference(backend, b, hq, hkv, s, s, d, dtype, causal, torch.device("cuda"), atol=1e-3)


# (B, Hq, Hkv, S) of the emulated matrix: GQA and MQA with 8 heads within one 64 x 64 tile, and
# two partial tiles each way with fewer heads (the emulator's time grows with heads x tiles).
SIMT_SHAPES = [(2, 8, 1, 1), (2, 8, 2, 17), (1, 4, 1, 100)]


@emulated
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [32, 64, 96, 128])
@pytest.mark.parametrize("b,hq,hkv,s", SIMT_SHAPES)
def test_simt_matches_reference(dtype, causal, d, b, hq, hkv, s):
    check_against_reference("cuda", b, hq, hkv, s, s, d, dtype, causal, CPU, atol=1e-3)


@emulated
@pytest.mark.parametrize("sq,sk", [(100, 17), (17, 130)])
def test_simt_unequal_lengths_not_causal(sq, sk):
    """Sq > Sk and Sq < Sk, several tiles of the longer one (causal: the tests below)."""
    check_against_reference("cuda", 1, 4, 2, sq, sk, 128, torch.float16, False, CPU, atol=1e-3)


@emulated
@pytest.mark.parametrize("arch", ["sm80", "sm86"])
def test_simt_fits_the_shared_memory_of_smaller_gpus(arch):
    """D = 128 asks the most shared memory (dq: 96 KiB); sm86/sm89 let a block opt into 99 KiB, sm80 163."""
    with simt.arch(arch):
        check_against_reference("cuda", 1, 2, 1, 70, 70, 128, torch.bfloat16, True, CPU, atol=1e-3)


@pytest.mark.parametrize("device,s", [pytest.param("cuda", 4097, marks=pytest.mark.cuda, id="gpu"),
                                      pytest.param("cpu", 200, marks=emulated, id="simt")])
@pytest.mark.parametrize("d", [32, 64, 96, 128])
def test_cuda_forward_with_128_row_blocks(device, s, d, monkeypatch):
    """The 8-warp forward (LLMKERN_CUDA_ATTENTION_ROWS=128): whole and partial 128-row blocks, causal
    or not, documents, Sq < Sk and Sq > Sk (rows that see no key)."""
    require_backend("cuda", device)
    monkeypatch.setenv(cuda_attention.FORWARD_ROWS_ENV, "128")
    dev = torch.device(device)
    for causal in (True, False):
        check_against_reference("cuda", 1, 4, 2, s, s, d, torch.bfloat16, causal, dev, atol=1e-3)
    check_against_reference("cuda", 1, 4, 2, s, s, d, torch.float16, True, dev, doc_ids=_random_doc_ids(1, s, dev),
                            atol=1e-3)
    check_against_reference("cuda", 1, 4, 4, s // 3, s, d, torch.float16, True, dev, atol=1e-3)
    check_queries_that_see_no_key("cuda", s, s // 2, d, torch.bfloat16, dev, atol=5e-2)
    if device == "cpu" and d == 128:  # 96 KiB of shared memory: within what an sm86 block may opt into
        with simt.arch("sm86"):
            check_against_reference("cuda", 1, 2, 1, 130, 130, d, torch.bfloat16, True, dev, atol=1e-3)


def test_cuda_forward_rows_setting_is_checked(monkeypatch):
    monkeypatch.setenv(cuda_attention.FORWARD_ROWS_ENV, "96")
    with pytest.raises(ValueError, match="LLMKERN_CUDA_ATTENTION_ROWS must be 64 or 128, got '96'"):
        cuda_attention.forward_block_rows()
    monkeypatch.delenv(cuda_attention.FORWARD_ROWS_ENV)
    assert cuda_attention.forward_block_rows() == 64


@emulated
def test_simt_cuda_backend_refuses_a_gpu_without_mma_sync():
    """On an sm75 (T4) the kernels' sm80 instructions do not exist: a clear error, not a wrong answer."""
    q, k, v = (t.detach() for t in _make_qkv(1, 2, 1, 16, 16, 64, torch.float16, CPU))
    with simt.arch("sm75"), pytest.raises(RuntimeError, match="attention_forward.*cudaErrorNoKernelImageForDevice"):
        attention(q, k, v, backend="cuda")


# (Hq, S of the fused-QKV views, S of the documents, Sq of the short queries over that many keys)
@pytest.mark.parametrize("backend,device,sizes", kernel_runs(gpu=[(8, 777, 1000, 100)], emulator=[(4, 77, 100, 17)]))
@pytest.mark.parametrize("d", [32, 64, 96, 128])
def test_strided_doc_ids_and_short_queries(backend, device, sizes, d):
    require_backend(backend, device)
    hq, s_strided, s_doc, sq_short = sizes
    device = torch.device(device)
    check_against_reference(backend, 2, hq, 2, s_strided, s_strided, d, torch.bfloat16, True, device, strided=True,
                            atol=1e-3)
    doc_ids = _random_doc_ids(2, s_doc, device)
    for causal in (True, False):
        check_against_reference(backend, 2, hq, 2, s_doc, s_doc, d, torch.bfloat16, causal, device,
                                doc_ids=doc_ids, atol=1e-3)
    check_against_reference(backend, 2, hq, hq, sq_short, s_doc, d, torch.float16, True, device, atol=1e-3)


@pytest.mark.parametrize("backend,device,sizes", kernel_runs(gpu=[(200, 70), (65, 1)], emulator=[(200, 70), (65, 1)]))
def test_queries_that_see_no_key(backend, device, sizes):
    require_backend(backend, device)
    sq, sk = sizes
    check_queries_that_see_no_key(backend, sq, sk, 128, torch.bfloat16, torch.device(device), atol=5e-2)


@pytest.mark.parametrize("backend,device,s", kernel_runs(gpu=[17, 4097], emulator=[17, 130]))
def test_doc_ids_at_odd_lengths(backend, device, s):
    require_backend(backend, device)
    device = torch.device(device)
    check_against_reference(backend, 1, 4, 2, s, s, 64, torch.bfloat16, True, device,
                            doc_ids=_random_doc_ids(1, s, device), atol=1e-3)


@pytest.mark.parametrize("backend,device,s", kernel_runs(gpu=[300], emulator=[70]) + [
    pytest.param("triton", "cpu", 40, marks=interp, id="triton-interp-40")])
def test_op_reads_any_doc_ids_layout(backend, device, s):
    """The custom op called directly with int64 or strided document ids gives what int32 ids give,
    also for int64 ids that a cast to int32 would make equal (every id a multiple of 2**32)."""
    require_backend(backend, device)
    dtype = torch.float16 if device == "cpu" and backend == "triton" else torch.bfloat16  # the interpreter's bf16 dot
    q, k, v = (t.detach() for t in _make_qkv(2, 4, 2, s, s, 64, dtype, torch.device(device)))
    ids = _random_doc_ids(2, s, torch.device(device)).to(torch.int32).contiguous()
    want, _ = torch.ops.llmkern.attention_fwd(q, k, v, ids, True, 0.125, backend)
    strided = torch.stack([ids.long(), ids.long()], dim=-1)[..., 0]  # int64, stride 2
    got, _ = torch.ops.llmkern.attention_fwd(q, k, v, strided, True, 0.125, backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got, _ = torch.ops.llmkern.attention_fwd(q, k, v, ids.long() << 32, True, 0.125, backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dq", ["separate", "atomic"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("tile", range(10))  # every candidate of the longest list (dk/dv's, 9 at d <= 128)
def test_gpu_triton_every_candidate_tile(tile, d, dq, monkeypatch):
    """Autotuning only ever runs (and so checks) the fastest tile of a shape; each candidate runs
    here, pinned (the tile-th of each kernel's list, wrapping around the shorter ones), with dq by
    its own kernel and by atomics."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setenv(triton_attention().TILE_ENV, str(tile))
    monkeypatch.setenv(triton_attention().DQ_ENV, dq)
    for causal in (True, False):
        try:
            check_against_reference("triton", 2, 4, 2, 300, 300, d, torch.bfloat16, causal, torch.device("cuda"),
                                    atol=1e-3)
        except OutOfResources as err:  # a Hopper-sized tile on a GPU with less shared memory (the tuner skips it)
            pytest.skip(f"tile {tile} does not fit this GPU: {err}")


@interp
def test_triton_tile_pin_must_be_an_index(monkeypatch):
    monkeypatch.setenv(triton_attention().TILE_ENV, "fastest")
    q, k, v = _make_qkv(1, 2, 1, 8, 8, 32, torch.float32, CPU)
    with pytest.raises(ValueError, match="LLMKERN_TRITON_ATTENTION_TILE must be an integer tile index; got 'fastest'"):
        attention(q, k, v, backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dq", ["separate", "atomic"])
def test_gpu_triton_autotuned(dq):
    """The default path, which the other tests skip (conftest pins a tile): tuned, then run. With dq by
    atomics the tuner's timing runs add into dq's buffer too: it must zero it before the real run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(triton_attention().TILE_ENV)
        patch.setenv(triton_attention().DQ_ENV, dq)
        check_against_reference("triton", 2, 4, 2, 1000, 1000, 128, torch.bfloat16, True, torch.device("cuda"),
                                atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [32, 96, 256])
def test_gpu_triton_other_head_dims(d):
    check_against_reference("triton", 1, 4, 2, 300, 300, d, torch.bfloat16, True, torch.device("cuda"), atol=1e-3)


# (B, Hq, Hkv, S, D); a warp's lane holds rows r and r + 8 of its 16, so the last row (S - 1) % 16 is
# a low row at S = 130 and a high one at S = 73 (and 1001).
@pytest.mark.parametrize("backend,device,shape",
                         kernel_runs(gpu=[(2, 8, 2, 1001, 128)], emulator=[(1, 2, 1, 130, 128), (2, 4, 1, 73, 64)]))
def test_kernels_write_every_output(backend, device, shape):
    require_backend(backend, device)
    check_kernels_write_every_output(backend, device, *shape, torch.bfloat16)


# (B, Hq, Hkv, Sq, Sk, D, causal, documents): rows that see no key (causal, Sq > Sk), Sq < Sk, and
# document masks without the causal one, each with partial tiles.
@pytest.mark.parametrize("backend,device,case", kernel_runs(
    gpu=[(2, 4, 2, 1001, 300, 64, True, False), (2, 4, 2, 300, 1001, 64, True, False),
         (2, 4, 2, 1001, 1001, 128, False, True)],
    emulator=[(1, 2, 1, 100, 17, 64, True, False), (1, 2, 1, 17, 100, 64, True, False),
              (1, 2, 1, 73, 73, 64, False, True)]))
def test_kernels_write_every_output_of_masked_rows(backend, device, case):
    require_backend(backend, device)
    b, hq, hkv, sq, sk, d, causal, docs = case
    check_kernels_write_every_output(backend, device, b, hq, hkv, sq, d, torch.bfloat16, causal=causal, sk=sk,
                                     docs=docs)


@emulated
@pytest.mark.parametrize("dtype,d,causal,with_docs,shape,rows", [
    (torch.bfloat16, 64, True, True, (2, 2, 1, 130), 64),
    (torch.float16, 128, False, False, (1, 4, 2, 100), 64),
    (torch.bfloat16, 128, True, False, (1, 2, 1, 200), 128),
    (torch.float16, 64, False, True, (1, 2, 1, 300), 128),  # documents in 128-row blocks, several tiles
])
def test_simt_results_do_not_depend_on_the_schedule(dtype, d, causal, with_docs, shape, rows, monkeypatch):
    """A race between two barriers (a warp reading shared memory another warp has not yet written, or
    writing over data another still reads) makes the result depend on which thread runs first. The
    emulator runs the same forward and backward launches with threads and blocks in other orders:
    o, lse, dq, dk and dv must not change in a single bit. rows: the forward's query rows a block."""
    monkeypatch.setenv(cuda_attention.FORWARD_ROWS_ENV, str(rows))
    b, hq, hkv, s = shape
    q, k, v = (t.detach() for t in _make_qkv(b, hq, hkv, s, s, d, dtype, CPU))
    doc_ids = _random_doc_ids(b, s, CPU).to(torch.int32) if with_docs else None
    do = torch.randn(b, hq, s, d, dtype=dtype)
    scale = d**-0.5

    def run() -> dict[str, torch.Tensor]:
        o, lse = torch.ops.llmkern.attention_fwd(q, k, v, doc_ids, causal, scale, "cuda")
        dq, dk, dv = torch.ops.llmkern.attention_bwd(do, q, k, v, o, lse, doc_ids, causal, scale, "cuda")
        return {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}

    with simt.schedule("forward"):
        want = run()
    for order in ("reverse", "random:7"):
        with simt.schedule(order):
            got = run()
        for name, t in got.items():
            assert torch.equal(t, want[name]), f"{name} differs between schedules forward and {order}"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_memory_grows_linearly(backend):
    """Extra peak memory of forward + backward at 2S is about 2x (not 4x) that at S."""
    require_gpu_backend(backend)

    def extra_peak(s: int) -> int:
        q, k, v = _make_qkv(1, 16, 16, s, s, 128, torch.bfloat16, torch.device("cuda"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        attention(q, k, v, backend=backend).backward(torch.ones(q.shape, dtype=q.dtype, device="cuda"))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    for s in (4096, 8192):
        extra_peak(s)  # warm-up: Triton autotunes per length bucket, with benchmark buffers
    small, large = extra_peak(4096), extra_peak(8192)
    assert large < 2.6 * small, f"peak memory grew {large / small:.2f}x from S=4096 to S=8192"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_opcheck_and_compile_fullgraph(backend):
    require_gpu_backend(backend)
    q, k, v = _make_qkv(2, 8, 2, 130, 130, 64, torch.bfloat16, torch.device("cuda"))
    torch.library.opcheck(torch.ops.llmkern.attention_fwd.default, (q, k, v, None, True, 0.125, backend))
    o, lse = torch.ops.llmkern.attention_fwd(q, k, v, None, True, 0.125, backend)
    bwd_args = (torch.randn_like(o), *(t.detach() for t in (q, k, v, o, lse)), None, True, 0.125, backend)
    torch.library.opcheck(torch.ops.llmkern.attention_bwd.default, bwd_args)

    def loss(q, k, v):
        return attention(q, k, v, causal=True, backend=backend).float().square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.cuda
def test_gpu_auto_prefers_triton_until_cuda_is_verified():
    assert _backend.resolve("attention", "auto", torch.device("cuda")) in ("triton", "cuda")
    assert _backend.PREFERENCE["attention"][0] == "triton"
