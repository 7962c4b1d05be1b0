"""RMSNorm: every backend against the float64 reference, gradients included, and bad input.

Without a GPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1) and
the CUDA tests skip; on a GPU machine everything runs.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import llmkern
from llmkern.ops import reference
from llmkern.ops.rms_norm import MAX_HIDDEN
from numerics import assert_close_to_ref

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HIDDEN = [1, 17, 123, 768, 4097, 8192, 65536]
EPS = 1e-6


def _backends():
    """(backend, device) pairs: the cuda ones on a GPU skip without one; "cuda-simt" runs the
    CUDA kernels on CPU tensors in the emulator (python_tests/simt) on any machine."""
    pairs = [pytest.param("triton", "cuda" if HAS_CUDA else "cpu", id="triton")]
    pairs.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda))
    pairs.append(pytest.param("cuda", "cpu", id="cuda-simt", marks=pytest.mark.simt))
    return pairs


BACKENDS = _backends()


def _rows_for(hidden: int, device: str) -> list[int]:
    if device == "cpu":  # the interpreter: a few rows keep it fast
        return [1, 3]
    return [1, 7, 1000] if hidden <= 8192 else [1, 33]


def _make(rows, hidden, dtype, device, with_residual, weight_dtype=None):
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(weight_dtype or dtype)
    r = torch.randn(rows, hidden, dtype=dtype, device=device) if with_residual else None
    return x, w, r


def _run_with_grads(fn, x, w, r, dy, dh):
    """Outputs and the gradients of x, w (and r) for output gradients dy (and dh)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, r)]
    out = fn(*leaves)
    if r is None:
        out = (out,)
        grads = (dy,)
    else:
        grads = (dy, dh)
    torch.autograd.backward(out, grads)
    return [o.detach() for o in out], [t.grad for t in leaves if t is not None]


def _check_against_reference(backend, device, rows, hidden, dtype, with_residual, weight_dtype=None):
    x, w, r = _make(rows, hidden, dtype, device, with_residual, weight_dtype)
    dy = torch.randn(rows, hidden, dtype=dtype, device=device)
    dh = torch.randn(rows, hidden, dtype=dtype, device=device) if with_residual else None

    def ours(x, w, r):
        return llmkern.ops.rms_norm(x, w, EPS, residual=r, backend=backend)

    def ref(x, w, r):
        return reference.rms_norm(x, w, EPS, residual=r)

    out, grads = _run_with_grads(ours, x, w, r, dy, dh)
    # The truth: float64 from the same (rounded) inputs. For the fused residual, h is rounded
    # to the input dtype by definition, so the truth norms that rounded h.
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    if with_residual:
        h_low = (x + r).double()
        y64 = reference.rms_norm(h_low, w.double(), EPS)
        out64 = [y64, h_low]
        _, grads64 = _run_with_grads(
            lambda x, w, r: reference.rms_norm(x, w, EPS, residual=r), d64(x), d64(w), d64(r), d64(dy), d64(dh)
        )
    else:
        out64, grads64 = _run_with_grads(ref, d64(x), d64(w), None, d64(dy), None)
    out_lp, grads_lp = _run_with_grads(ref, x, w, r, dy, dh)

    names = ["y", "h"][: len(out)]
    for name, a, b, c in zip(names, out, out64, out_lp):
        assert_close_to_ref(a, b, c, f"{backend} {dtype} {rows}x{hidden} {name}")
    gnames = ["dx", "dweight", "dresidual"]
    for name, a, b, c in zip(gnames, grads, grads64, grads_lp):
        assert a.dtype == c.dtype, f"{name} dtype {a.dtype} != {c.dtype}"
        assert_close_to_ref(a, b, c, f"{backend} {dtype} {rows}x{hidden} {name}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("hidden", HIDDEN)
def test_matches_reference(backend, device, dtype, hidden):
    for rows in _rows_for(hidden, device):
        _check_against_reference(backend, device, rows, hidden, dtype, with_residual=False)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("hidden", [1, 123, 4097, 65536])
def test_fused_residual_matches_reference(backend, device, dtype, hidden):
    for rows in _rows_for(hidden, device):
        _check_against_reference(backend, device, rows, hidden, dtype, with_residual=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_fp32_weight_with_low_precision_input(backend, device, dtype):
    """Under autocast the parameters stay fp32 while activations are 16-bit."""
    _check_against_reference(backend, device, 5, 256, dtype, with_residual=True, weight_dtype=torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS + [pytest.param("torch", "cpu", id="torch")])
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", ["fp32-x-to-half-y", "half-x-into-fp32-stream", "half-x-and-y-beside-fp32-stream"])
@pytest.mark.parametrize("hidden", [123, 4096, 40000])  # scalar; packs in registers; packs re-read (both backends)
def test_autocast_dtypes_match_reference(backend, device, half, case, hidden):
    """The dtypes under autocast: an fp32 stream and weight, 16-bit branches and outputs. y (and dy)
    in out_dtype, h, dh and dweight in fp32, dx in x's dtype; numbers by the 2x rule as everywhere."""
    with_residual = case != "fp32-x-to-half-y"
    x_dtype = torch.float32 if case == "fp32-x-to-half-y" else half
    out_dtype = None if case == "half-x-into-fp32-stream" else half
    rows = 3 if hidden < 40000 else 2
    x = torch.randn(rows, hidden, device=device).to(x_dtype)
    w = 1 + 0.1 * torch.randn(hidden, device=device)
    r = torch.randn(rows, hidden, device=device) if with_residual else None
    dy = torch.randn(rows, hidden, device=device).to(out_dtype or torch.float32)
    dh = torch.randn(rows, hidden, device=device) if with_residual else None

    def ours(x, w, r):
        return llmkern.ops.rms_norm(x, w, EPS, residual=r, backend=backend, out_dtype=out_dtype)

    def theirs(x, w, r):
        return reference.rms_norm(x, w, EPS, residual=r, out_dtype=out_dtype)

    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    out, grads = _run_with_grads(ours, x, w, r, dy, dh)
    out64, grads64 = _run_with_grads(lambda x, w, r: reference.rms_norm(x, w, EPS, residual=r),
                                     d64(x), d64(w), d64(r), d64(dy), d64(dh))
    out_lp, grads_lp = _run_with_grads(theirs, x, w, r, dy, dh)
    name = f"{backend} {case} {half}"
    assert out[0].dtype == (out_dtype or torch.float32)
    for label, a, b, c in zip(["y", "h"], out, out64, out_lp):
        assert a.dtype == c.dtype, f"{name} {label} dtype {a.dtype} != {c.dtype}"
        assert_close_to_ref(a, b, c, f"{name} {label}")
    for label, a, b, c in zip(["dx", "dweight", "dresidual"], grads, grads64, grads_lp):
        assert a.dtype == c.dtype, f"{name} {label} dtype {a.dtype} != {c.dtype}"
        assert_close_to_ref(a, b, c, f"{name} {label}")
    assert grads[0].dtype == x_dtype and grads[1].dtype == torch.float32


@pytest.mark.parametrize("backend,device", BACKENDS + [pytest.param("torch", "cpu", id="torch")])
def test_module_under_autocast_needs_no_cast_kernels(backend, device):
    """Between bf16 matmuls the module reads the bf16 branch and writes bf16 for the next matmul; the
    stream stays fp32 (h is the exact fp32 sum). The kernel backends do it with no cast op at all."""
    norm = llmkern.nn.RMSNorm(64, backend=backend).to(device)
    before, after = torch.nn.Linear(64, 64).to(device), torch.nn.Linear(64, 32).to(device)
    x = torch.randn(3, 64, device=device)
    stream = torch.randn(3, 64, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        branch = before(x)
        y, h = norm(branch, residual=stream)
        out = after(y)
    assert branch.dtype == y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert torch.equal(h, branch.float() + stream)
    torch.testing.assert_close(y, reference.rms_norm(branch, norm.weight, norm.eps, stream, torch.bfloat16)[0],
                               rtol=0, atol=8e-3 * y.float().abs().max().item())
    if backend != "torch":  # the reference is plain torch: its conversions are ops of its own
        from test_model import autograd_nodes

        nodes = autograd_nodes(out)
        cast_from = {type(f).__name__ for node in nodes if type(node).__name__ == "ToCopyBackward0"
                     for f, _ in node.next_functions if f is not None}
        assert cast_from <= {"AccumulateGrad", "ToCopyBackward0"}, cast_from  # only autocast's weight casts
    (out.float().sum() + h.sum()).backward()
    assert stream.grad.dtype == torch.float32 and norm.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("hidden", [1, 123, 768, 20000, 65536])  # the sizes' edges, scalar, packed, looped
def test_kernels_write_every_element(backend, device, dtype, with_residual, hidden):
    """Outputs pre-filled with NaN: an element a kernel never writes fails the comparison. Forward
    with and without the fused residual; backward with and without the residual stream's gradient."""
    kernels = importlib.import_module(f"llmkern.{backend}.rms_norm")
    x, w, r = _make(6, hidden, dtype, device, with_residual)
    y = torch.full_like(x, float("nan"))
    h = torch.full_like(x, float("nan")) if with_residual else None
    kernels.forward(x, w, r, EPS, y, h)
    assert not y.isnan().any() and (h is None or not h.isnan().any())
    h_exact = x.double() + r.double() if with_residual else x.double()
    y_ref, h_ref = reference.rms_norm(x, w, EPS, residual=r) if with_residual else (reference.rms_norm(x, w, EPS), x)
    assert_close_to_ref(y, reference.rms_norm(h_exact, w.double(), EPS), y_ref, "y")
    if with_residual:
        # Exact on a GPU; the interpreter rounds fp32 -> bf16 its own way, so allow the rule's slack.
        assert_close_to_ref(h, h_exact, h_ref, "h")
    else:
        h = x

    dy = torch.randn_like(x)
    extra = torch.randn_like(x) if with_residual else None
    dh = torch.full_like(x, float("nan"))
    dw = torch.full_like(w, float("nan"))
    kernels.backward(dy, h, w, extra, EPS, dh, dw)
    assert not dh.isnan().any() and not dw.isnan().any()
    _, grads64 = _run_with_grads(lambda h, w, _: reference.rms_norm(h, w, EPS), h.double(), w.double(), None,
                                 dy.double(), None)
    _, grads_lp = _run_with_grads(lambda h, w, _: reference.rms_norm(h, w, EPS), h, w, None, dy, None)
    if extra is not None:
        grads64[0] = grads64[0] + extra.double()
        grads_lp[0] = grads_lp[0] + extra
    assert_close_to_ref(dh, grads64[0], grads_lp[0], "dh")
    assert_close_to_ref(dw, grads64[1], grads_lp[1], "dweight")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_rows_and_3d_input(backend, device):
    """Rows need not be adjacent: only the last dimension must be contiguous."""
    base = torch.randn(4, 5, 2 * 96, device=device)
    x = base[..., :96]  # row stride 192, last dim contiguous
    w = torch.randn(96, device=device)
    got = llmkern.ops.rms_norm(x, w, backend=backend)
    torch.testing.assert_close(got, reference.rms_norm(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_permuted_leading_dims_with_grads(backend, device):
    """A dense but permuted input (a transposed batch): outputs and gradients are allocated
    contiguous, so the kernels' 2-D (rows, N) views of them exist."""
    x = torch.randn(5, 3, 40, device=device).transpose(0, 1)  # (3, 5, 40), strides (40, 120, 1)
    r = torch.randn(5, 3, 40, device=device).transpose(0, 1)
    w = torch.randn(40, device=device)
    dy, dh = torch.randn(3, 5, 40, device=device), torch.randn(3, 5, 40, device=device)
    for residual, grads in ((None, (dy,)), (r, (dy, dh))):
        leaves = [t.clone().requires_grad_(True) for t in (x, w)]
        ref_leaves = [t.clone().requires_grad_(True) for t in (x, w)]
        got = llmkern.ops.rms_norm(*leaves, residual=residual, backend=backend)
        want = reference.rms_norm(*ref_leaves, residual=residual)
        got, want = (got,) if residual is None else got, (want,) if residual is None else want
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.autograd.backward(got, grads)
        torch.autograd.backward(want, grads)
        for a, b in zip(leaves, ref_leaves):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    x = torch.randn(0, 64, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    y = llmkern.ops.rms_norm(x, w, backend=backend)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64)
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_opcheck(backend, device, with_residual):
    x, w, r = _make(3, 40, torch.float32, device, with_residual)
    x.requires_grad_(True)
    w.requires_grad_(True)
    torch.library.opcheck(torch.ops.llmkern.rms_norm.default, (x, w, r, EPS, torch.float32, backend))
    # autocast's dtypes: a 16-bit y of an fp32 stream, and a 16-bit x joining it
    torch.library.opcheck(torch.ops.llmkern.rms_norm.default, (x, w, r, EPS, torch.float16, backend))
    if with_residual:
        x16 = x.detach().half().requires_grad_(True)
        torch.library.opcheck(torch.ops.llmkern.rms_norm.default, (x16, w, r, EPS, torch.float16, backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_compile_fullgraph_has_no_graph_break(backend, device):
    """The fake kernels let torch.compile trace the op; on a CPU the cheap aot_eager backend
    checks the tracing (and autograd) without compiling C++; on a GPU, inductor runs."""
    compiler = "inductor" if device == "cuda" else "aot_eager"

    def block(x, w, r):
        y, h = llmkern.ops.rms_norm(x, w, EPS, residual=r, backend=backend)
        return (y * 2).sum() + h.sum()

    x, w, r = _make(4, 64, torch.float32, device, True)
    for t in (x, w, r):
        t.requires_grad_(True)
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    loss = compiled(x, w, r)
    loss.backward()
    expected = block(x.detach(), w.detach(), r.detach())
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-4)
    assert x.grad is not None and w.grad is not None and r.grad is not None


def test_module_matches_functional():
    norm = llmkern.nn.RMSNorm(32, eps=1e-5, backend="torch")
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(norm(x), reference.rms_norm(x, norm.weight, 1e-5))
    y, h = norm(x, residual=x)
    torch.testing.assert_close(h, 2 * x)


def test_module_reset_parameters_after_meta_init():
    """Built on the meta device and materialized by to_empty(), a model's modules are initialized by
    their reset_parameters() (FSDP's default); without one the weight stays uninitialized memory."""
    with torch.device("meta"):
        norm = llmkern.nn.RMSNorm(32)
    norm.to_empty(device="cpu")
    norm.weight.data.fill_(float("nan"))  # what uninitialized memory may hold
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(32))


def test_set_backend_and_environment(monkeypatch):
    monkeypatch.setattr(llmkern._backend, "_default_backend", None)
    monkeypatch.setenv("LLMKERN_BACKEND", "torch")
    assert llmkern.get_backend() == "torch"
    llmkern.set_backend("auto")
    assert llmkern.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend"):
        llmkern.set_backend("fast")
    monkeypatch.setattr(llmkern._backend, "_default_backend", None)
    monkeypatch.setenv("LLMKERN_BACKEND", "nope")
    with pytest.raises(ValueError, match="LLMKERN_BACKEND"):
        llmkern.get_backend()
    monkeypatch.setenv("LLMKERN_BACKEND", "")  # set but empty (`LLMKERN_BACKEND= cmd`) means unset
    assert llmkern.get_backend() == "auto"


def test_auto_is_torch_on_cpu_tensors():
    assert llmkern._backend.resolve("rms_norm", "auto", torch.device("cpu")) == "torch"


# ----------------------------------------------------------------------------- bad input
# Each bad input is refused on every backend, with tensors where that backend runs (the checks must
# come before any backend's dispatch, never only on the torch path).
CHECKED = [pytest.param("torch", "cpu", id="torch")] + BACKENDS


def _bad(exc, match, x, w, **kw):
    with pytest.raises(exc, match=match):
        llmkern.ops.rms_norm(x, w, **kw)


@pytest.mark.parametrize("backend,device", CHECKED)
def test_rejects_integer_and_complex_dtypes(backend, device):
    ones = lambda *shape, **kw: torch.ones(*shape, device=device, **kw)  # noqa: E731
    _bad(TypeError, "x must have dtype", ones(2, 4, dtype=torch.int64), ones(4), backend=backend)
    _bad(TypeError, "x must have dtype", ones(2, 4, dtype=torch.complex64), ones(4), backend=backend)
    _bad(TypeError, "weight must have dtype", ones(2, 4), ones(4, dtype=torch.int32), backend=backend)
    _bad(TypeError, "residual must have dtype", ones(2, 4), ones(4), residual=ones(2, 4, dtype=torch.complex64),
         backend=backend)


@pytest.mark.parametrize("backend,device", CHECKED)
def test_rejects_weight_of_wrong_shape_or_dtype(backend, device):
    ones = lambda *shape, **kw: torch.ones(*shape, device=device, **kw)  # noqa: E731
    _bad(ValueError, r"weight must have shape \(4,\)", ones(2, 4), ones(5), backend=backend)
    _bad(ValueError, r"weight must have shape \(4,\)", ones(2, 4), ones(1, 4), backend=backend)
    _bad(TypeError, "weight must have x's dtype", ones(2, 4, dtype=torch.float16), ones(4, dtype=torch.bfloat16),
         backend=backend)


@pytest.mark.parametrize("backend,device", CHECKED)
def test_rejects_bad_residual_and_eps(backend, device):
    ones = lambda *shape, **kw: torch.ones(*shape, device=device, **kw)  # noqa: E731
    _bad(ValueError, "residual must have x's shape", ones(2, 4), ones(4), residual=ones(3, 4), backend=backend)
    _bad(TypeError, "residual must have x's dtype", ones(2, 4), ones(4), residual=ones(2, 4, dtype=torch.float16),
         backend=backend)
    _bad(TypeError, "residual must have x's dtype", ones(2, 4, dtype=torch.float16), ones(4),
         residual=ones(2, 4, dtype=torch.bfloat16), backend=backend)
    _bad(ValueError, "residual must be contiguous in its last dimension", ones(4, 4), ones(4),
         residual=ones(4, 4).t(), backend=backend)
    _bad(ValueError, "eps must be > 0", ones(2, 4), ones(4), eps=-1.0, backend=backend)
    _bad(ValueError, "eps must be > 0", ones(2, 4), ones(4), eps=float("nan"), backend=backend)
    _bad(TypeError, "x must be a torch.Tensor", [[1.0]], ones(1), backend=backend)


@pytest.mark.parametrize("backend,device", CHECKED)
def test_eps_may_be_a_numpy_scalar(backend, device):
    """np.float32(0.5) (a config read with NumPy, np.finfo(...).eps) is a float: taken, not refused."""
    x, w = torch.randn(3, 8, device=device), torch.randn(8, device=device)
    got = llmkern.ops.rms_norm(x, w, np.float32(0.5), backend=backend)
    assert_close_to_ref(got, reference.rms_norm(x.double(), w.double(), 0.5), reference.rms_norm(x, w, 0.5), "y")


@pytest.mark.parametrize("backend,device", CHECKED)
def test_rejects_eps_beyond_float32(backend, device):
    """inf (or a value that is inf or 0 as the kernels' fp32 scalar) gave zeros or NaN, not an error."""
    x, w = torch.randn(2, 4, device=device), torch.ones(4, device=device)
    for eps in (float("inf"), np.float32("inf"), 1e300, 1e-60):
        _bad(ValueError, "eps must be finite in float32", x, w, eps=eps, backend=backend)


@pytest.mark.parametrize("backend,device", CHECKED)
def test_eps_may_be_any_real_number(backend, device):
    """A Fraction is a numbers.Real as np.float32 is: the torch backend failed inside its reference."""
    from fractions import Fraction

    x, w = torch.randn(3, 8, device=device), torch.randn(8, device=device)
    got = llmkern.ops.rms_norm(x, w, Fraction(1, 2), backend=backend)
    assert_close_to_ref(got, reference.rms_norm(x.double(), w.double(), 0.5), reference.rms_norm(x, w, 0.5), "y")


@pytest.mark.parametrize("backend,device", CHECKED)
def test_rejects_out_dtype_that_is_not_autocasts(backend, device):
    ones = lambda *shape, **kw: torch.ones(*shape, device=device, **kw)  # noqa: E731
    half = ones(2, 4, dtype=torch.float16)
    _bad(TypeError, "out_dtype must be None", half, ones(4), out_dtype=torch.float32, backend=backend)
    _bad(TypeError, "out_dtype must be None", half, ones(4), out_dtype=torch.bfloat16, backend=backend)
    _bad(TypeError, "out_dtype must be None", ones(2, 4), ones(4), out_dtype=torch.float64, backend=backend)
    # a string is no dtype, and the message must not read as if the dtype had come
    _bad(TypeError, "out_dtype must be None.*; got 'float16'", ones(2, 4), ones(4), out_dtype="float16",
         backend=backend)
    _bad(TypeError, r"weight must have residual's dtype \(torch.float32\)", half, ones(4).half(),
         residual=ones(2, 4), backend=backend)


@pytest.mark.parametrize("backend,device", CHECKED)
def test_rejects_mixed_devices(backend, device):
    x, w = torch.ones(2, 4, device=device), torch.ones(4, device=device)
    _bad(ValueError, f"weight is on meta but x is on {device}", x, torch.ones(4, device="meta"), backend=backend)
    _bad(ValueError, f"residual is on meta but x is on {device}", x, w, residual=torch.ones(2, 4, device="meta"),
         backend=backend)


@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="without a GPU Triton runs CPU tensors in its interpreter"))])
def test_rejects_cpu_tensor_with_gpu_backend(backend):
    _bad(ValueError, f"backend='{backend}' cannot run rms_norm", torch.ones(2, 4), torch.ones(4), backend=backend)


def test_rejects_unknown_backend():
    _bad(ValueError, "backend must be one of", torch.ones(2, 4), torch.ones(4), backend="fastest")


@pytest.mark.parametrize("backend,device", CHECKED)
def test_rejects_non_contiguous_last_dim(backend, device):
    x = torch.ones(4, 6, device=device).t()  # last-dim stride 6
    _bad(ValueError, "x must be contiguous in its last dimension", x, torch.ones(4, device=device), backend=backend)
    w = torch.ones(8, device=device)[::2]  # the weight is read as a plain vector
    _bad(ValueError, "weight must be contiguous", torch.ones(2, 4, device=device), w, backend=backend)


@pytest.mark.parametrize("backend,device", CHECKED)
def test_rejects_hidden_size_over_limit(backend, device):
    x = torch.ones(1, MAX_HIDDEN + 1, device=device)
    _bad(ValueError, "hidden size", x, torch.ones(MAX_HIDDEN + 1, device=device), backend=backend)
    _bad(ValueError, "hidden size", x[:, :0], torch.ones(0, device=device), backend=backend)
    _bad(ValueError, "at least one dimension", torch.tensor(1.0, device=device), torch.ones(1, device=device),
         backend=backend)


def test_triton_kernels_build_for_sm80_and_sm90():
    """The interpreter never lowers the kernels; this builds their GPU code (see triton_build.py)."""
    pytest.importorskip("triton.backends.nvidia")
    from triton_build import build_norm_kernels

    assert "built" in build_norm_kernels(centered=False)
