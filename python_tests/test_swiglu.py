"""SwiGLU, silu(gate) * up, and GeGLU, gelu_tanh(gate) * up (one kernel source with an activation
parameter, so every test runs both: the `op` fixture): against float64, gradients included, and bad
input; then the Triton kernels (interpreted without a GPU) and the CUDA kernels against the same truth,
opcheck and torch.compile.

The CUDA kernels run on a GPU (tests marked `cuda`) and, on any machine, on CPU tensors in the
emulator of python_tests/simt (tests marked `simt`, ids with "cuda-simt"): the same checks with
small shapes, plus one that the results do not depend on the order threads and blocks run in.
Only test_cuda_rows_beyond_one_grid stays on the GPU: more rows than gridDim.y's 65535 blocks
take some 17 million elements, too many for the emulator.
"""

import importlib
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import llmkern
import simt
from llmkern.ops import reference
from numerics import assert_close_to_ref

# The interpreter's numpy exp of a large argument (sigmoid's, and tanh's through it) is inf, as meant.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

SHAPES = [(1,), (17,), (3, 123), (2, 5, 1000), (4097,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _silu(g):
    return g * torch.sigmoid(g)


def _gelu_tanh(g):
    """gelu's tanh approximation from its formula (the truth in float64; autograd gives its derivative)."""
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


@dataclass(frozen=True)
class GatedOp:
    name: str  # of the op in llmkern.ops, llmkern.triton, llmkern.cuda and llmkern._cuda
    act: object  # the activation from its formula, for the float64 truth
    torch_act: object  # PyTorch's own: its low-precision computation is the tolerance's yardstick

    def __call__(self, gate, up, backend=None):
        return getattr(llmkern.ops, self.name)(gate, up, backend=backend)

    def truth(self, gate, up):
        return self.act(gate) * up

    def theirs(self, gate, up):
        return self.torch_act(gate) * up


SWIGLU = GatedOp("swiglu", _silu, F.silu)
GEGLU = GatedOp("geglu", _gelu_tanh, lambda g: F.gelu(g, approximate="tanh"))


@pytest.fixture(params=[SWIGLU, GEGLU], ids=lambda op: op.name)
def op(request):
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_float64(op, shape, dtype):
    gate = (torch.randn(shape) * 4).to(dtype).requires_grad_(True)
    up = torch.randn(shape).to(dtype).requires_grad_(True)
    out = op(gate, up, backend="torch")
    dy = torch.randn(shape).to(dtype)
    out.backward(dy)

    g64, u64 = gate.detach().double().requires_grad_(True), up.detach().double().requires_grad_(True)
    truth = op.truth(g64, u64)
    truth.backward(dy.double())
    gl, ul = gate.detach().requires_grad_(True), up.detach().requires_grad_(True)
    theirs = op.theirs(gl, ul)  # torch's own low-precision computation
    theirs.backward(dy)

    assert out.dtype == dtype
    assert_close_to_ref(out, truth, theirs, f"{op.name} {dtype} {shape}", atol=1e-5)
    assert_close_to_ref(gate.grad, g64.grad, gl.grad, f"dgate {dtype} {shape}", atol=1e-5)
    assert_close_to_ref(up.grad, u64.grad, ul.grad, f"dup {dtype} {shape}", atol=1e-5)


def test_reference_takes_the_halves_of_a_fused_projection(op):
    fused = torch.randn(3, 7, 2 * 96)
    gate, up = fused.split(96, dim=-1)  # views with a row stride of 192
    torch.testing.assert_close(op(gate, up), op.theirs(gate, up))


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
def test_errors(op, gate, up, error, words):
    with pytest.raises(error) as info:
        op(gate, up)
    assert words in str(info.value)


# ----------------------------------------------------------------------------- Triton kernels
# Without a GPU they run in the interpreter (conftest sets TRITON_INTERPRET=1).

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON_SHAPES = [(1,), (2, 17), (3, 1000), (2, 4097), (2, 3, 123)]
# The CUDA kernels' shapes: odd columns take the scalar path, multiples of 8 the 16-byte one
# (contiguous rows are folded into one long row first, so (4099, 1) is one row of 4099).
CUDA_SHAPES = [(1,), (17,), (7, 123), (5, 4097), (3, 1000), (2, 3, 4096), (4099, 1)]
# (backend, device) pairs: "cuda" skips without a GPU; "cuda-simt" runs the CUDA kernels on CPU
# tensors in the emulator (python_tests/simt) on any machine.
BACKENDS = [
    pytest.param("triton", DEVICE, id="triton"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
    pytest.param("cuda", "cpu", id="cuda-simt", marks=pytest.mark.simt),
]


def _shape_id(shape) -> str:
    return "x".join(map(str, shape))


CASES = (
    [pytest.param("triton", DEVICE, s, id="triton-" + _shape_id(s)) for s in TRITON_SHAPES]
    + [pytest.param("cuda", "cuda", s, id="cuda-" + _shape_id(s), marks=pytest.mark.cuda) for s in CUDA_SHAPES]
    + [pytest.param("cuda", "cpu", s, id="cuda-simt-" + _shape_id(s), marks=pytest.mark.simt) for s in CUDA_SHAPES]
)


def with_grads(fn, gate, up, dy):
    """fn(gate, up) and the gradients of gate and up for the output gradient dy."""
    g, u = (t.detach().clone().requires_grad_(True) for t in (gate, up))
    out = fn(g, u)
    out.backward(dy)
    return out.detach(), g.grad, u.grad


def check_against_float64(op, gate, up, dy, name, backend="triton"):
    ours = with_grads(lambda g, u: op(g, u, backend=backend), gate, up, dy)
    cpu = [t.cpu() for t in (gate, up, dy)]
    truth = with_grads(op.truth, *(t.double() for t in cpu))
    theirs = with_grads(op.theirs, *cpu)  # torch's own low-precision computation
    assert ours[0].dtype == gate.dtype and ours[1].dtype == gate.dtype and ours[2].dtype == gate.dtype
    for what, a, b, c in zip(("y", "dgate", "dup"), ours, truth, theirs):
        assert_close_to_ref(a.cpu(), b, c, f"{op.name} {what} {name}")


@pytest.mark.parametrize("backend,device,shape", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_kernels_match_float64(op, backend, device, shape, dtype):
    gate = (torch.randn(shape, device=device) * 4).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    check_against_float64(op, gate, up, dy, f"{backend} {dtype} {shape}", backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("hidden", [1000, 1001], ids=["hidden-1000", "hidden-1001"])
def test_kernels_take_the_halves_of_a_fused_projection_and_a_strided_gradient(op, backend, device, hidden):
    """1000 columns: 16-byte accesses on the CUDA path; 1001: the up half starts off alignment."""
    fused = torch.randn(3, 7, 2 * hidden, device=device) * 3
    gate, up = fused.split(hidden, dim=-1)  # row stride 2 * hidden
    dy = torch.randn(hidden, 7, 3, device=device).transpose(0, 2)  # (3, 7, hidden), last-dim stride 21
    check_against_float64(op, gate, up, dy, f"{backend} fused halves", backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernels_extreme_gates_stay_finite(op, backend, device):
    """sigmoid and tanh of large |gate| saturate; neither the output nor the gradients may become NaN
    (gelu's tanh saturates from |gate| ~ 5 on, its cube reaches 1e12 at 1e4)."""
    gate = torch.tensor([-1e4, -100.0, -20.0, -6.0, -3.0, 0.0, 3.0, 6.0, 20.0, 100.0, 1e4], device=device)
    up = torch.full_like(gate, 2.0)
    check_against_float64(op, gate, up, torch.ones_like(gate), f"{backend} extreme gates", backend)


def test_triton_float64_passes_gradcheck(op):
    gate = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: op(g, u, backend="triton"), (gate, up))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n_cols", [17, 4097, 4096])
def test_kernels_write_every_element(op, backend, device, n_cols):
    """Outputs are strided views of NaN-filled buffers: every element of a view must be written,
    and the columns beyond it never. (4096 columns with a row stride of 4096 + 8: the CUDA
    kernels' 16-byte path.)"""
    kernels = importlib.import_module(f"llmkern.{backend}.{op.name}")
    fused = torch.randn(3, 2 * n_cols, dtype=torch.bfloat16, device=device)
    gate, up = fused[:, :n_cols], fused[:, n_cols:]
    pad = 8 if n_cols % 8 == 0 else 5
    buffers = [torch.full((3, n_cols + pad), float("nan"), dtype=torch.bfloat16, device=device) for _ in range(3)]
    y, dgate, dup = (b[:, :n_cols] for b in buffers)
    kernels.forward(gate, up, y)
    dy = torch.randn(3, n_cols, dtype=torch.bfloat16, device=device)
    kernels.backward(dy, gate, up, dgate, dup)
    for out in (y, dgate, dup):
        assert not out.isnan().any()
    for b in buffers:
        assert b[:, n_cols:].isnan().all()
    truth = with_grads(op.truth, gate.cpu().double(), up.cpu().double(), dy.cpu().double())
    theirs = with_grads(op.theirs, gate.cpu(), up.cpu(), dy.cpu())
    for what, a, b, c in zip(("y", "dgate", "dup"), (y, dgate, dup), truth, theirs):
        assert_close_to_ref(a.cpu(), b, c, f"kernel {what} {n_cols}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernels_empty_and_0d_inputs(op, backend, device):
    gate = torch.randn(0, 8, device=device, requires_grad=True)
    y = op(gate, gate, backend=backend)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert gate.grad.shape == (0, 8)
    dtype = torch.float64 if backend == "triton" else torch.float32  # the cuda kernels have no fp64
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    g = torch.tensor(2.0, dtype=dtype, device=device, requires_grad=True)
    u = torch.tensor(-3.0, dtype=dtype, device=device)
    y = op(g, u, backend=backend)
    y.backward()
    g64 = g.detach().double().requires_grad_(True)
    truth = op.truth(g64, u.double())
    truth.backward()
    assert y.shape == () and abs(y.item() - truth.item()) < tol
    assert abs(g.grad.item() - g64.grad.item()) < tol


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(op, backend, device):
    fused = torch.randn(4, 2 * 40, device=device)
    gate, up = (t.detach().requires_grad_(True) for t in fused.split(40, dim=-1))
    torch.library.opcheck(getattr(torch.ops.llmkern, op.name).default, (gate, up, backend))
    dy = torch.randn(4, 40, device=device)
    backward_op = getattr(torch.ops.llmkern, f"{op.name}_backward").default
    torch.library.opcheck(backward_op, (dy, gate.detach(), up.detach(), backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_compile_fullgraph_has_no_graph_break(op, backend, device):
    """On a CPU aot_eager checks the tracing (fake kernels, autograd); on a GPU inductor runs."""
    compiler = "inductor" if device == "cuda" else "aot_eager"
    proj = torch.randn(2 * 24, 16, device=device)

    def mlp(x):
        gate, up = (x @ proj.t()).split(24, dim=-1)
        return (op(gate, up, backend=backend) ** 2).sum()

    x = torch.randn(3, 5, 16, device=device, requires_grad=True)
    loss = torch.compile(mlp, fullgraph=True, backend=compiler)(x)
    loss.backward()
    x2 = x.detach().requires_grad_(True)
    gate, up = (x2 @ proj.t()).split(24, dim=-1)
    expected = (getattr(reference, op.name)(gate, up) ** 2).sum()
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-4)


def test_auto_is_torch_on_cpu_tensors(op):
    assert llmkern._backend.resolve(op.name, "auto", torch.device("cpu")) == "torch"


def test_refuses_the_cuda_backend_for_cpu_tensors(op):
    with pytest.raises(ValueError, match=f"cannot run {op.name}"):
        op(torch.randn(4), torch.randn(4), backend="cuda")


def test_cuda_takes_no_float64(op, monkeypatch):
    """The CUDA kernels have no fp64: "auto" passes them over, an explicit backend="cuda" is a
    TypeError (raised before any device work, so checked here on a CPU)."""
    gated = importlib.import_module("llmkern.ops.gated_activation")
    g64 = torch.randn(4, dtype=torch.float64)
    assert not gated.fits_backend("cuda", g64)
    assert gated.fits_backend("cuda", g64.float()) and gated.fits_backend("triton", g64)
    monkeypatch.setattr(llmkern._backend, "can_run", lambda backend, op, device: True)
    with pytest.raises(TypeError, match="gate and up must have dtype float32, float16 or bfloat16 for backend 'cuda'"):
        op(g64, g64, backend="cuda")


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
def test_auto_picks_triton_on_a_gpu(op):
    assert llmkern._backend.resolve(op.name, "auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("backend, device, rows, hidden", [
    pytest.param("triton", "cuda", 1023, 11008, id="triton-llama", marks=pytest.mark.cuda),
    pytest.param("cuda", "cuda", 1023, 11008, id="cuda-llama", marks=pytest.mark.cuda),
    pytest.param("cuda", "cpu", 5, 1376, id="cuda-simt-small", marks=pytest.mark.simt),
])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=lambda d: str(d).split(".")[-1])
def test_halves_of_a_fused_projection_at_training_shapes(op, backend, device, rows, hidden, dtype):
    """Llama's MLP width on the GPU (a small one in the emulator), as halves of a fused projection."""
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda kernels have no float64 (auto passes them over)")
    if dtype == torch.float64:
        hidden = 4097
    fused = torch.randn(2, rows, 2 * hidden, device=device).mul(3).to(dtype)
    gate, up = fused.split(hidden, dim=-1)
    dy = torch.randn(2, rows, hidden, device=device).to(dtype)
    if dtype == torch.float64:  # fp64 math in the kernel: exact to rounding
        ours = with_grads(lambda g, u: op(g, u, backend=backend), gate, up, dy)
        truth = with_grads(op.truth, gate, up, dy)
        for a, b in zip(ours, truth):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    else:
        check_against_float64(op, gate, up, dy, f"gpu {backend} {dtype}", backend)


@pytest.mark.cuda
def test_cuda_rows_beyond_one_grid(op):
    """70000 strided rows of 255 columns: one row per block row (255 threads across), so more
    block rows than gridDim.y's 65535; the grid-stride loop must reach every row."""
    kernels = importlib.import_module(f"llmkern.cuda.{op.name}")
    rows, cols = 70000, 255
    gate, up = torch.randn(rows, 2 * cols, dtype=torch.bfloat16, device="cuda").mul(3).split(cols, dim=-1)
    dy = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
    y, dgate, dup = (torch.full((rows, cols), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(3))
    kernels.forward(gate, up, y)
    kernels.backward(dy, gate, up, dgate, dup)
    g, u = (t.float().requires_grad_(True) for t in (gate, up))
    want = op.theirs(g, u)  # fp32 on the GPU: the kernels' own math, rounded once to bf16 at the end
    want.backward(dy.float())
    for got, ref in ((y, want.detach()), (dgate, g.grad), (dup, u.grad)):
        assert not got.isnan().any()
        torch.testing.assert_close(got.float(), ref, rtol=1.6e-2, atol=1e-2)


class _LaunchRecorder:
    """Stands in for a Triton kernel: records each launch's grid, the column offset and width of its
    first tensor, and its n_cols argument (the last positional one)."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            n_cols = args[-1]
            self.launches.append((grid, tensors[0].storage_offset(), tensors[0].size(1), n_cols))
        return launch


def test_triton_rows_wider_than_one_grid_launch_in_column_slices(monkeypatch):
    """Column blocks run on grid axis 1, which CUDA caps at 65535 blocks (Triton passes the grid as
    is, and the launch fails): a row of more columns than 65535 blocks of 2048, such as a 1-D input
    of 134M+ elements, goes in launches of at most 65535 column blocks that cover it once. Meta
    tensors and stand-in kernels: no memory, no kernel runs."""
    k = importlib.import_module("llmkern.triton.gated_activation")
    block = k.MAX_BLOCK
    n_cols = 2 * 65535 * block + 5
    t = torch.empty(1, n_cols, device="meta")
    calls = (("forward", lambda: k.forward(t, t, t, k.SILU)), ("backward", lambda: k.backward(t, t, t, t, t, k.SILU)))
    for name, call in calls:
        recorder = _LaunchRecorder()
        monkeypatch.setattr(k, f"_{name}_kernel", recorder)
        call()
        covered = 0
        for grid, offset, width, n in recorder.launches:
            assert grid[0] == 1 and grid[1] <= 65535, f"{name}: grid {grid} beyond CUDA's limits"
            assert grid[1] == -(-width // block) and n == width, (name, grid, width, n)
            assert offset == covered and offset % block == 0, (name, offset, covered)  # in order, aligned
            covered += width
        assert covered == n_cols and len(recorder.launches) == 3, (name, recorder.launches)


def test_triton_column_slices_give_the_same_results(op, monkeypatch):
    """The sliced launches on real data: 3 slices of at most 2 column blocks (the limit lowered to 2),
    on the strided halves of a fused projection, forward and backward, against float64."""
    k = importlib.import_module("llmkern.triton.gated_activation")
    monkeypatch.setattr(k, "MAX_GRID_Y", 2)
    hidden = 2 * 2 * k.MAX_BLOCK + 77
    gate, up = (torch.randn(3, 2 * hidden, device=DEVICE) * 3).split(hidden, dim=-1)
    dy = torch.randn(3, hidden, device=DEVICE)
    check_against_float64(op, gate, up, dy, "triton column slices", "triton")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns (so -0.0 and 0.0, or two NaNs, compare as what they are)."""
    return t.detach().view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.simt
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("hidden", [1000, 1001, 4096], ids=["vector", "scalar", "long-rows"])
def test_cuda_simt_results_do_not_depend_on_the_schedule(op, hidden, dtype):
    """The emulator runs threads and blocks forward, reversed and shuffled: a race between them
    (two threads writing one element, a read of another's output) would change the bits."""
    fused = (torch.randn(3, 2 * hidden) * 3).to(dtype)
    gate, up = fused.split(hidden, dim=-1)  # strided rows: no folding into one long row
    dy = torch.randn(3, hidden).to(dtype)
    orders = ("forward", "reverse", "random:7", "random:11")
    results = []
    for order in orders:
        with simt.schedule(order):
            results.append(with_grads(lambda g, u: op(g, u, backend="cuda"), gate, up, dy))
    for order, other in zip(orders[1:], results[1:]):
        for what, a, b in zip(("y", "dgate", "dup"), other, results[0]):
            assert torch.equal(_bits(a), _bits(b)), f"{what} changes with the schedule {order}"
    truth = with_grads(op.truth, gate.double(), up.double(), dy.double())
    theirs = with_grads(op.theirs, gate, up, dy)
    for what, a, b, c in zip(("y", "dgate", "dup"), results[0], truth, theirs):
        assert_close_to_ref(a, b, c, f"{what} {dtype} {hidden}")


def test_triton_kernels_build_for_sm80_and_sm90():
    """The interpreter never lowers the kernels; this builds their GPU code (see triton_build.py)."""
    pytest.importorskip("triton.backends.nvidia")
    from triton_build import run_build

    out = run_build('''
    import triton.language as tl
    from llmkern.triton import gated_activation as k
    for arch in (80, 90):
        for act in (k.SILU, k.GELU_TANH):
            meta = {"ACTIVATION": act, "COMPUTE": tl.float32, "BLOCK": 2048}
            build(k._forward_kernel, {"G": "*bf16", "U": "*bf16", "Y": "*bf16", "g_stride": "i32",
                                      "u_stride": "i32", "y_stride": "i32", "n_cols": "i32"},
                  meta, arch, num_warps=8)
            build(k._backward_kernel, {**{n: "*bf16" for n in ("DY", "G", "U", "DG", "DU")},
                                       **{n: "i32" for n in ("dy_stride", "g_stride", "u_stride", "dg_stride",
                                                             "du_stride", "n_cols")}},
                  meta, arch, num_warps=8)
    print("built")
    ''')
    assert "built" in out
