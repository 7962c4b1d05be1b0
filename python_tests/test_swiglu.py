"""SwiGLU: silu(gate) * up against float64, gradients included, and bad input; then the Triton
kernels (interpreted without a GPU) against the same truth, opcheck and torch.compile."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern.ops import reference
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


# ----------------------------------------------------------------------------- Triton kernels
# Without a GPU they run in the interpreter (conftest sets TRITON_INTERPRET=1).

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON_SHAPES = [(1,), (2, 17), (3, 1000), (2, 4097), (2, 3, 123)]


def with_grads(fn, gate, up, dy):
    """fn(gate, up) and the gradients of gate and up for the output gradient dy."""
    g, u = (t.detach().clone().requires_grad_(True) for t in (gate, up))
    out = fn(g, u)
    out.backward(dy)
    return out.detach(), g.grad, u.grad


def check_triton_against_float64(gate, up, dy, name):
    ours = with_grads(lambda g, u: llmkern.ops.swiglu(g, u, backend="triton"), gate, up, dy)
    cpu = [t.cpu() for t in (gate, up, dy)]
    truth = with_grads(lambda g, u: g * torch.sigmoid(g) * u, *(t.double() for t in cpu))
    theirs = with_grads(lambda g, u: F.silu(g) * u, *cpu)  # torch's own low-precision computation
    assert ours[0].dtype == gate.dtype and ours[1].dtype == gate.dtype and ours[2].dtype == gate.dtype
    for what, a, b, c in zip(("y", "dgate", "dup"), ours, truth, theirs):
        assert_close_to_ref(a.cpu(), b, c, f"{what} {name}")


@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_triton_matches_float64(shape, dtype):
    gate = (torch.randn(shape, device=DEVICE) * 4).to(dtype)
    up = torch.randn(shape, device=DEVICE).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    check_triton_against_float64(gate, up, dy, f"{dtype} {shape}")


def test_triton_takes_the_halves_of_a_fused_projection_and_a_strided_gradient():
    hidden = 1000
    fused = torch.randn(3, 7, 2 * hidden, device=DEVICE) * 3
    gate, up = fused.split(hidden, dim=-1)  # row stride 2 * hidden
    dy = torch.randn(hidden, 7, 3, device=DEVICE).transpose(0, 2)  # (3, 7, hidden), last-dim stride 21
    check_triton_against_float64(gate, up, dy, "fused halves")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp(1e4) = inf
def test_triton_extreme_gates_stay_finite():
    """sigmoid of large |gate| saturates; neither the output nor the gradients may become NaN."""
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4], device=DEVICE)
    up = torch.full_like(gate, 2.0)
    check_triton_against_float64(gate, up, torch.ones_like(gate), "extreme gates")


def test_triton_float64_passes_gradcheck():
    gate = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: llmkern.ops.swiglu(g, u, backend="triton"), (gate, up))


@pytest.mark.parametrize("n_cols", [17, 4097])
def test_triton_kernels_write_every_element(n_cols):
    """Outputs are strided views of NaN-filled buffers: every element of a view must be written,
    and the columns beyond it never."""
    kernels = importlib.import_module("llmkern.triton.swiglu")
    fused = torch.randn(3, 2 * n_cols, dtype=torch.bfloat16, device=DEVICE)
    gate, up = fused[:, :n_cols], fused[:, n_cols:]
    buffers = [torch.full((3, n_cols + 5), float("nan"), dtype=torch.bfloat16, device=DEVICE) for _ in range(3)]
    y, dgate, dup = (b[:, :n_cols] for b in buffers)
    kernels.forward(gate, up, y)
    dy = torch.randn(3, n_cols, dtype=torch.bfloat16, device=DEVICE)
    kernels.backward(dy, gate, up, dgate, dup)
    for out in (y, dgate, dup):
        assert not out.isnan().any()
    for b in buffers:
        assert b[:, n_cols:].isnan().all()
    truth = with_grads(lambda g, u: g * torch.sigmoid(g) * u, gate.cpu().double(), up.cpu().double(), dy.cpu().double())
    theirs = with_grads(lambda g, u: F.silu(g) * u, gate.cpu(), up.cpu(), dy.cpu())
    for what, a, b, c in zip(("y", "dgate", "dup"), (y, dgate, dup), truth, theirs):
        assert_close_to_ref(a.cpu(), b, c, f"kernel {what} {n_cols}")


def test_triton_empty_and_0d_inputs():
    gate = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    y = llmkern.ops.swiglu(gate, gate, backend="triton")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert gate.grad.shape == (0, 8)
    g = torch.tensor(2.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    u = torch.tensor(-3.0, dtype=torch.float64, device=DEVICE)
    y = llmkern.ops.swiglu(g, u, backend="triton")
    y.backward()
    assert y.shape == () and abs(y.item() - reference.swiglu(g.detach(), u).item()) < 1e-12
    s = torch.sigmoid(g.detach())
    assert abs(g.grad.item() - (u * s * (1 + g.detach() * (1 - s))).item()) < 1e-12


def test_opcheck():
    fused = torch.randn(4, 2 * 40, device=DEVICE)
    gate, up = (t.detach().requires_grad_(True) for t in fused.split(40, dim=-1))
    torch.library.opcheck(torch.ops.llmkern.swiglu.default, (gate, up, "triton"))
    dy = torch.randn(4, 40, device=DEVICE)
    torch.library.opcheck(torch.ops.llmkern.swiglu_backward.default, (dy, gate.detach(), up.detach(), "triton"))


def test_compile_fullgraph_has_no_graph_break():
    """On a CPU aot_eager checks the tracing (fake kernels, autograd); on a GPU inductor runs."""
    compiler = "inductor" if HAS_CUDA else "aot_eager"
    proj = torch.randn(2 * 24, 16, device=DEVICE)

    def mlp(x):
        gate, up = (x @ proj.t()).split(24, dim=-1)
        return (llmkern.ops.swiglu(gate, up, backend="triton") ** 2).sum()

    x = torch.randn(3, 5, 16, device=DEVICE, requires_grad=True)
    loss = torch.compile(mlp, fullgraph=True, backend=compiler)(x)
    loss.backward()
    x2 = x.detach().requires_grad_(True)
    gate, up = (x2 @ proj.t()).split(24, dim=-1)
    expected = (reference.swiglu(gate, up) ** 2).sum()
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-4)


def test_auto_is_torch_on_cpu_tensors():
    assert llmkern._backend.resolve("swiglu", "auto", torch.device("cpu")) == "torch"


def test_refuses_a_backend_without_kernels():
    with pytest.raises(ValueError, match="cannot run swiglu"):
        llmkern.ops.swiglu(torch.randn(4), torch.randn(4), backend="cuda")


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
def test_auto_picks_triton_on_a_gpu():
    assert llmkern._backend.resolve("swiglu", "auto", torch.device("cuda")) == "triton"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=lambda d: str(d).split(".")[-1])
def test_gpu_llama_sized_shapes(dtype):
    hidden = 11008 if dtype != torch.float64 else 4097
    fused = torch.randn(2, 1023, 2 * hidden, device="cuda").mul(3).to(dtype)
    gate, up = fused.split(hidden, dim=-1)
    dy = torch.randn(2, 1023, hidden, device="cuda").to(dtype)
    if dtype == torch.float64:  # fp64 math in the kernel: exact to rounding
        ours = with_grads(lambda g, u: llmkern.ops.swiglu(g, u), gate, up, dy)
        truth = with_grads(lambda g, u: g * torch.sigmoid(g) * u, gate, up, dy)
        for a, b in zip(ours, truth):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    else:
        check_triton_against_float64(gate, up, dy, f"gpu {dtype}")
