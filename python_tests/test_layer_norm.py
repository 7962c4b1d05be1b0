"""LayerNorm: every backend against the float64 reference, gradients included, and bad input.

The kernels are RMSNorm's, centered (llmkern/triton/_norm.py, csrc/cuda/norm.cuh): what the
RMSNorm tests cover of the shared machinery (strides, the numerics rule, schedules) is checked
here again for the centered form, with the bias. Without a GPU the Triton kernels run in the
interpreter and the CUDA ones in the emulator (cuda-simt); on a GPU everything runs.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern.ops import reference
from numerics import assert_close_to_ref

HAS_CUDA = torch.cuda.is_available()
EPS = 1e-5
KERNELS = [
    pytest.param("triton", "cuda" if HAS_CUDA else "cpu", id="triton"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
    pytest.param("cuda", "cpu", id="cuda-simt", marks=pytest.mark.simt),
]
EVERY_BACKEND = KERNELS + [pytest.param("torch", "cuda" if HAS_CUDA else "cpu", id="torch")]


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _run(fn, x, w, b, r, dy, dh):
    """fn's outputs and the gradients of x, w (b, r) for output gradients dy (and dh)."""
    leaves = [_leaf(t) for t in (x, w, b, r)]
    out = fn(*leaves)
    out, grads = ((out,), (dy,)) if r is None else (out, (dy, dh))
    torch.autograd.backward(out, grads)
    return [o.detach() for o in out], [t.grad for t in leaves if t is not None]


def _check(backend, device, rows, hidden, x_dtype, stream_dtype=None, out_dtype=None, bias=True, residual=True,
           weight_dtype=None):
    """The op on `backend` against float64, by the 2x rule of DESIGN.md against torch's own computation
    in the same dtypes (the reference: F.layer_norm in fp32 with the same roundings); dtypes checked."""
    stream_dtype = stream_dtype or x_dtype
    weight_dtype = weight_dtype or stream_dtype
    x = torch.randn(rows, hidden, device=device).to(x_dtype)
    # An offset row mean (3) and spread weights: the centering and the weight both matter.
    r = (torch.randn(rows, hidden, device=device) + 3).to(stream_dtype) if residual else None
    if r is None:
        x = (x.float() + 3).to(x_dtype)
    w = (1 + 0.5 * torch.randn(hidden, device=device)).to(weight_dtype)
    b = (0.5 * torch.randn(hidden, device=device)).to(weight_dtype) if bias else None
    y_dtype = out_dtype or stream_dtype
    dy = torch.randn(rows, hidden, device=device).to(y_dtype)
    dh = torch.randn(rows, hidden, device=device).to(stream_dtype) if residual else None

    def ours(x, w, b, r):
        return llmkern.ops.layer_norm(x, w, b, EPS, residual=r, backend=backend, out_dtype=out_dtype)

    def theirs(x, w, b, r):
        return reference.layer_norm(x, w, b, EPS, residual=r, out_dtype=out_dtype)

    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    out, grads = _run(ours, x, w, b, r, dy, dh)
    # The truth norms h as stored (rounded to the stream's dtype), as the op defines it.
    h_low = x.to(stream_dtype) if r is None else (x.double() + r.double()).to(stream_dtype)
    out64, grads64 = _run(lambda x, w, b, r: reference.layer_norm(x, w, b, EPS, residual=r),
                          d64(x), d64(w), d64(b), d64(r), d64(dy), d64(dh))
    out64[0] = reference.layer_norm(h_low.double(), w.double(), d64(b), EPS)
    out_lp, grads_lp = _run(theirs, x, w, b, r, dy, dh)
    name = f"{backend} x {x_dtype} stream {stream_dtype} y {y_dtype} {rows}x{hidden} bias={bias}"
    assert out[0].dtype == y_dtype, name
    for label, a, t, c in zip(["y", "h"], out, out64, out_lp):
        assert a.dtype == c.dtype, f"{name} {label} dtype {a.dtype} != {c.dtype}"
        assert_close_to_ref(a, t, c, f"{name} {label}")
    labels = ["dx", "dweight"] + (["dbias"] if bias else []) + (["dresidual"] if residual else [])
    for label, a, t, c in zip(labels, grads, grads64, grads_lp):
        assert a.dtype == c.dtype, f"{name} {label} dtype {a.dtype} != {c.dtype}"
        assert_close_to_ref(a, t, c, f"{name} {label}")


def _rows_for(device):
    return 3 if device == "cpu" else 1000


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("hidden", [1, 17, 768, 4097, 20000, 65536])  # scalar; packs; the re-reading kernels
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False)], ids=["bias-residual", "plain"])
def test_matches_reference(backend, device, dtype, hidden, bias, residual):
    rows = _rows_for(device) if hidden <= 8192 else 2
    _check(backend, device, rows, hidden, dtype, bias=bias, residual=residual)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("hidden", [123, 768])
def test_bias_without_residual_and_residual_without_bias(backend, device, hidden):
    _check(backend, device, _rows_for(device), hidden, torch.float32, bias=True, residual=False)
    _check(backend, device, _rows_for(device), hidden, torch.float16, bias=False, residual=True)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_fp32_weight_with_low_precision_input(backend, device, dtype):
    """fp32 parameters with 16-bit activations (autocast without an fp32 stream)."""
    _check(backend, device, 5, 256, dtype, weight_dtype=torch.float32)


@pytest.mark.parametrize("backend,device", EVERY_BACKEND)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", ["fp32-x-to-half-y", "half-x-into-fp32-stream", "half-x-and-y-beside-fp32-stream"])
@pytest.mark.parametrize("hidden", [123, 4096, 40000])
def test_autocast_dtypes_match_reference(backend, device, half, case, hidden):
    """Autocast's mix: an fp32 stream and weights, 16-bit branches and outputs (y and dy in out_dtype,
    h, dh, dweight and dbias in fp32, dx in x's dtype)."""
    residual = case != "fp32-x-to-half-y"
    x_dtype = torch.float32 if case == "fp32-x-to-half-y" else half
    out_dtype = None if case == "half-x-into-fp32-stream" else half
    _check(backend, device, 3 if hidden < 40000 else 2, hidden, x_dtype, torch.float32, out_dtype,
           residual=residual)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("hidden", [123, 768, 20000])
@pytest.mark.parametrize("bias", [True, False])
def test_kernels_write_every_element(backend, device, hidden, bias):
    """Outputs pre-filled with NaN: an element a kernel never writes fails the comparison."""
    kernels = importlib.import_module(f"llmkern.{backend}.layer_norm")
    x, r = torch.randn(6, hidden, device=device).bfloat16(), torch.randn(6, hidden, device=device).bfloat16()
    w = torch.randn(hidden, device=device).bfloat16()
    b = torch.randn(hidden, device=device).bfloat16() if bias else None
    y, h = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    kernels.forward(x, w, b, r, EPS, y, h)
    assert not y.isnan().any() and not h.isnan().any()
    y_ref, h_ref = reference.layer_norm(x, w, b, EPS, residual=r)
    assert_close_to_ref(y, reference.layer_norm(h.double(), w.double(), None if b is None else b.double(), EPS),
                        y_ref, "y")
    dy = torch.randn_like(x)
    dh, dw = torch.full_like(x, float("nan")), torch.full_like(w, float("nan"))
    db = torch.full_like(w, float("nan")) if bias else None
    kernels.backward(dy, h, w, None, EPS, dh, dw, db)
    assert not dh.isnan().any() and not dw.isnan().any() and (db is None or not db.isnan().any())
    if bias:
        torch.testing.assert_close(db.float(), dy.float().sum(0), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_strided_and_permuted_inputs_with_grads(backend, device):
    """Only the last dimension must be contiguous; outputs and gradients come out contiguous."""
    x = torch.randn(4, 5, 2 * 96, device=device)[..., :96]  # row stride 192
    w, b = torch.randn(96, device=device), torch.randn(96, device=device)
    torch.testing.assert_close(llmkern.ops.layer_norm(x, w, b, backend=backend), F.layer_norm(x, (96,), w, b),
                               rtol=1e-5, atol=1e-5)
    x = torch.randn(5, 3, 40, device=device).transpose(0, 1)  # (3, 5, 40), dense but permuted
    r = torch.randn(5, 3, 40, device=device).transpose(0, 1)
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    dy, dh = torch.randn(3, 5, 40, device=device), torch.randn(3, 5, 40, device=device)
    got, grads = _run(lambda x, w, b, r: llmkern.ops.layer_norm(x, w, b, residual=r, backend=backend),
                      x, w, b, r, dy, dh)
    want, want_grads = _run(lambda x, w, b, r: reference.layer_norm(x, w, b, residual=r), x, w, b, r, dy, dh)
    for a, c in zip(got + grads, want + want_grads):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_empty_batch(backend, device):
    x = torch.randn(0, 64, device=device, requires_grad=True)
    w, b = torch.ones(64, device=device, requires_grad=True), torch.zeros(64, device=device, requires_grad=True)
    y = llmkern.ops.layer_norm(x, w, b, backend=backend)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.simt
def test_cuda_kernels_do_not_depend_on_the_schedule():
    """In the emulator, threads and blocks in other orders give the same bits (a race would not)."""
    import simt

    x, r = torch.randn(5, 4104).half(), torch.randn(5, 4104).half()
    w, b = torch.randn(4104).half(), torch.randn(4104).half()
    dy, dh_out = torch.randn(5, 4104).half(), torch.randn(5, 4104).half()
    results = []
    for order in ("forward", "reverse", "random:3"):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b, r)]
        with simt.schedule(order):
            y, h = llmkern.ops.layer_norm(leaves[0], leaves[1], leaves[2], residual=leaves[3], backend="cuda")
            torch.autograd.backward((y, h), (dy, dh_out))
        results.append([y.detach(), h.detach()] + [t.grad for t in leaves])
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(other, results[0]))


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("with_bias,with_residual", [(True, True), (False, False), (True, False)])
def test_opcheck(backend, device, with_bias, with_residual):
    x = torch.randn(3, 40, device=device, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True) if with_bias else None
    r = torch.randn(3, 40, device=device, requires_grad=True) if with_residual else None
    op = torch.ops.llmkern.layer_norm.default
    torch.library.opcheck(op, (x, w, b, r, EPS, torch.float32, backend))
    torch.library.opcheck(op, (x, w, b, r, EPS, torch.float16, backend))  # autocast's 16-bit y


@pytest.mark.parametrize("backend,device", KERNELS)
def test_compile_fullgraph_has_no_graph_break(backend, device):
    compiler = "inductor" if device == "cuda" else "aot_eager"

    def block(x, w, b, r):
        y, h = llmkern.ops.layer_norm(x, w, b, EPS, residual=r, backend=backend)
        return (y * 2).sum() + h.sum()

    leaves = [torch.randn(4, 64, device=device, requires_grad=True), torch.randn(64, device=device, requires_grad=True),
              torch.randn(64, device=device, requires_grad=True), torch.randn(4, 64, device=device, requires_grad=True)]
    loss = torch.compile(block, fullgraph=True, backend=compiler)(*leaves)
    loss.backward()
    torch.testing.assert_close(loss.detach(), block(*[t.detach() for t in leaves]), rtol=1e-5, atol=1e-4)
    assert all(t.grad is not None for t in leaves)


# --- the module -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", EVERY_BACKEND)
def test_module_is_torchs_layer_norm_with_a_residual_form(backend, device):
    ours = llmkern.nn.LayerNorm(48, backend=backend).to(device)
    theirs = torch.nn.LayerNorm(48).to(device)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())  # the same parameters and names
    x, r = torch.randn(2, 5, 48, device=device), torch.randn(2, 5, 48, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    y, h = ours(x, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, theirs(x + r), rtol=1e-5, atol=1e-5)
    no_bias = llmkern.nn.LayerNorm(48, bias=False, backend=backend).to(device)
    torch.testing.assert_close(no_bias(x), F.layer_norm(x, (48,), no_bias.weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", EVERY_BACKEND)
def test_module_under_autocast_needs_no_add_or_cast_kernel(backend, device):
    """Between bf16 matmuls the module reads the bf16 branch, adds it to the fp32 stream and writes
    bf16 for the next matmul, in one op on the kernel backends."""
    from test_model import autograd_nodes

    norm = llmkern.nn.LayerNorm(64, backend=backend).to(device)
    before, after = torch.nn.Linear(64, 64).to(device), torch.nn.Linear(64, 32).to(device)
    stream = torch.randn(3, 64, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        branch = before(torch.randn(3, 64, device=device))
        y, h = norm(branch, residual=stream)
        out = after(y)
    assert branch.dtype == y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert torch.equal(h, branch.float() + stream)
    torch.testing.assert_close(y, reference.layer_norm(h, norm.weight, norm.bias, norm.eps, out_dtype=torch.bfloat16),
                               rtol=0, atol=8e-3 * y.float().abs().max().item())
    if backend != "torch":
        cast_from = {type(f).__name__ for node in autograd_nodes(out) if type(node).__name__ == "ToCopyBackward0"
                     for f, _ in node.next_functions if f is not None}
        assert cast_from <= {"AccumulateGrad"}, cast_from  # only autocast's weight casts
    (out.float().sum() + h.sum()).backward()
    assert stream.grad.dtype == torch.float32 and norm.weight.grad.dtype == torch.float32


def test_module_beyond_the_op_is_torchs():
    """Without affine parameters, over two dimensions, in float64 or wider than the kernels' limit, the
    module is torch's LayerNorm, as it was."""
    norm = llmkern.nn.LayerNorm(16, elementwise_affine=False)
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (16,)))
    y, h = norm(x, residual=r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (16,)))
    x2 = torch.randn(3, 4, 5)
    torch.testing.assert_close(llmkern.nn.LayerNorm((4, 5))(x2), F.layer_norm(x2, (4, 5)))
    norm64 = llmkern.nn.LayerNorm(16).double()
    torch.testing.assert_close(norm64(x.double()), F.layer_norm(x.double(), (16,), norm64.weight, norm64.bias))
    from llmkern.ops._norm import MAX_HIDDEN

    wide = llmkern.nn.LayerNorm(MAX_HIDDEN + 1)
    xw = torch.randn(1, MAX_HIDDEN + 1)
    torch.testing.assert_close(wide(xw), F.layer_norm(xw, (MAX_HIDDEN + 1,), wide.weight, wide.bias))


# --- bad input --------------------------------------------------------------------------------------


def _bad(exc, match, x, w, b=None, **kw):
    with pytest.raises(exc, match=match):
        llmkern.ops.layer_norm(x, w, b, **kw)


def test_rejects_bad_bias():
    x, w = torch.ones(2, 4), torch.ones(4)
    _bad(ValueError, r"bias must have shape \(4,\)", x, w, torch.ones(5))
    _bad(TypeError, "bias must have weight's dtype", x.bfloat16(), w.bfloat16(), torch.ones(4))
    _bad(TypeError, "bias must be a torch.Tensor", x, w, [0.0] * 4)
    _bad(ValueError, "bias must be contiguous", x, w, torch.ones(4, 2)[:, 0])
    _bad(TypeError, "bias must have weight's dtype", torch.ones(2, 4).half(), torch.ones(4), torch.ones(4).half())


def test_eps_may_be_a_numpy_scalar():
    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    for backend in ("torch", "triton"):
        got = llmkern.ops.layer_norm(x, w, b, np.float32(0.5), backend=backend)
        assert_close_to_ref(got, reference.layer_norm(x.double(), w.double(), b.double(), 0.5),
                            reference.layer_norm(x, w, b, 0.5), f"{backend} y")


def test_rejects_eps_beyond_float32():
    """eps=inf gave zeros; a Fraction (a numbers.Real) failed inside the torch backend's reference."""
    from fractions import Fraction

    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    for backend in ("torch", "triton"):
        for eps in (float("inf"), 1e300, 1e-60):
            _bad(ValueError, "eps must be finite in float32", x, w, b, eps=eps, backend=backend)
        got = llmkern.ops.layer_norm(x, w, b, Fraction(1, 2), backend=backend)
        assert_close_to_ref(got, reference.layer_norm(x.double(), w.double(), b.double(), 0.5),
                            reference.layer_norm(x, w, b, 0.5), f"{backend} y")


def test_rejects_what_rms_norm_rejects():
    _bad(ValueError, r"weight must have shape \(4,\)", torch.ones(2, 4), torch.ones(5))
    _bad(TypeError, "residual must have x's dtype", torch.ones(2, 4), torch.ones(4),
         residual=torch.ones(2, 4).half())
    _bad(TypeError, "out_dtype must be None", torch.ones(2, 4).half(), torch.ones(4), out_dtype=torch.float32)
    _bad(ValueError, "eps must be > 0", torch.ones(2, 4), torch.ones(4), eps=0.0)
    _bad(ValueError, "contiguous in its last dimension", torch.ones(4, 6).t(), torch.ones(4))
    _bad(ValueError, "bias is on meta but x is on cpu", torch.ones(2, 4), torch.ones(4), torch.ones(4, device="meta"))
    _bad(ValueError, "backend='cuda' cannot run layer_norm", torch.ones(2, 4), torch.ones(4), backend="cuda")


def test_triton_kernels_build_for_sm80_and_sm90():
    """The interpreter never lowers the kernels; this builds their GPU code (see triton_build.py)."""
    pytest.importorskip("triton.backends.nvidia")
    from triton_build import build_norm_kernels

    assert "built" in build_norm_kernels(centered=True)
