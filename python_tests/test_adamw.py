"""llmkern.optim.AdamW against torch.optim.AdamW (and clip_grad_norm_), on every backend.

On a CPU machine the torch backend, the Triton kernels (in the interpreter, so tensors stay
small) and the CUDA kernels (on CPU tensors in the emulator of python_tests/simt: tests marked
`simt`, ids with "cuda-simt") run; on a GPU machine the cuda, triton and torch backends run on
the GPU as well, with a 1000003-element tensor, and a step is captured in a CUDA graph (that
test, and the one that no step synchronizes, stay on the GPU).
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

import simt
from llmkern import _backend
from llmkern.optim import AdamW
from numerics import assert_close_to_ref

HAS_CUDA = torch.cuda.is_available()
CUDA_BUILT = _backend.cuda_has("adamw")

cuda = pytest.mark.cuda
CASES = [
    pytest.param("cpu", "torch", id="cpu-torch"),
    pytest.param("cpu", "triton", id="cpu-triton"),
    pytest.param("cuda", "torch", id="cuda-torch", marks=cuda),
    pytest.param("cuda", "triton", id="cuda-triton", marks=cuda),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=cuda),
    pytest.param("cpu", "cuda", id="cpu-cuda-simt", marks=pytest.mark.simt),  # the CUDA kernels emulated
]
GPU_KERNELS = [pytest.param("triton", marks=cuda), pytest.param("cuda", marks=cuda)]

RTOL, ATOL = 1e-6, 1e-7  # fp32: the same math, at most a few roundings apart


def _skip_if_unbuilt(backend: str) -> None:
    # Asked at run time: inside a `simt` test the cuda module is the emulator's.
    if backend == "cuda" and not _backend.cuda_has("adamw"):
        pytest.skip("llmkern._cuda was built without the adamw kernels")


def _sizes(device: str, backend: str = "torch") -> list[list[int]]:
    """Two groups: a few odd sizes, and many small tensors (bigger ones on a GPU). The emulated
    CUDA kernels get a tensor of 5 chunks and 3 elements: more chunks than the emulator's
    persistent grid has blocks (4), so its grid-stride loop goes round within one tensor. Every
    backend but the Triton interpreter (seconds a step) gets a tensor of 1000003 elements."""
    first = [1, 3, 1003, 4097]
    if device == "cpu" and backend == "cuda":
        first.append(5 * 4096 + 3)
    if device == "cuda" or backend != "triton":
        first.append(1000003)
    second = [5 + 7 * i for i in range(24)]
    return [first, second]


def _twin_params(sizes: list[list[int]], device: str, dtype=torch.float32):
    """The same random initial values twice: for llmkern's optimizer and for torch's. The
    last tensor of the first group starts 4 bytes into its storage (not 16-byte aligned)."""
    groups = [[torch.randn(n, device=device, dtype=dtype) for n in group] for group in sizes]
    ours = [[p.clone().requires_grad_() for p in group] for group in groups]
    ref = [[p.clone().requires_grad_() for p in group] for group in groups]
    ours[0][-1] = _misaligned(ours[0][-1])
    return ours, ref


def _misaligned(p: torch.Tensor) -> torch.Tensor:
    storage = torch.empty(p.numel() + 1, device=p.device, dtype=p.dtype)
    view = storage[1:].view(p.shape)
    view.copy_(p.detach())
    return view.requires_grad_()


def _flat(groups):
    return [p for group in groups for p in group]


def _set_grads(ours, ref, scale: float = 1.0) -> None:
    for p, q in zip(_flat(ours), _flat(ref)):
        g = torch.randn_like(p) * scale
        p.grad = g.clone()
        q.grad = g.clone()


def _assert_same_state(opt, params, ref_opt, ref_params, rtol=RTOL, atol=ATOL) -> None:
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
        ours, theirs = opt.state[p], ref_opt.state[q]
        torch.testing.assert_close(ours["exp_avg"], theirs["exp_avg"], rtol=rtol, atol=atol)
        torch.testing.assert_close(ours["exp_avg_sq"], theirs["exp_avg_sq"], rtol=rtol, atol=atol)
        assert float(ours["step"]) == float(theirs["step"])


def _group_dicts(groups, settings):
    return [dict(params=g, **s) for g, s in zip(groups, settings)]


# Group 0 decays, group 1 (norms and biases, say) does not.
SETTINGS = [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, weight_decay=0.0)]


@pytest.mark.parametrize("device, backend", CASES)
def test_matches_torch_adamw_over_20_steps(device, backend):
    _skip_if_unbuilt(backend)
    ours, ref = _twin_params(_sizes(device, backend), device)
    opt = AdamW(_group_dicts(ours, SETTINGS), betas=(0.9, 0.95), eps=1e-8, backend=backend)
    ref_opt = torch.optim.AdamW(_group_dicts(ref, SETTINGS), betas=(0.9, 0.95), eps=1e-8)
    for _ in range(20):
        _set_grads(ours, ref)
        opt.step()
        ref_opt.step()
    _assert_same_state(opt, _flat(ours), ref_opt, _flat(ref))
    assert opt.grad_norm is None and opt.skipped_steps == 0


@pytest.mark.parametrize("device, backend", CASES)
def test_clipping_equals_clip_grad_norm_then_adamw(device, backend):
    _skip_if_unbuilt(backend)
    ours, ref = _twin_params(_sizes(device, backend), device)
    opt = AdamW(_group_dicts(ours, SETTINGS), max_grad_norm=1.0, backend=backend)
    ref_opt = torch.optim.AdamW(_group_dicts(ref, SETTINGS))
    for i in range(20):
        _set_grads(ours, ref, scale=0.001 if i % 3 == 0 else 1.0)  # some steps under the limit
        grads_before = [p.grad.clone() for p in _flat(ours)]
        opt.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(_flat(ref), 1.0)
        ref_opt.step()
        # against float64, by the 2x rule: over a million elements torch's fp32 norm on a CPU is ~1e-5 off
        norm64 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads_before]))
        assert_close_to_ref(opt.grad_norm, norm64, ref_norm, f"step {i} grad norm", atol=1e-7)
        for p, g in zip(_flat(ours), grads_before):
            assert torch.equal(p.grad, g), "the fused clip must not write the gradients"
    _assert_same_state(opt, _flat(ours), ref_opt, _flat(ref))
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("device, backend", CASES)
def test_nonfinite_gradient_skips_the_step(device, backend, bad):
    _skip_if_unbuilt(backend)
    ours, ref = _twin_params([[3, 1003], [17]], device)
    opt = AdamW(_group_dicts(ours, SETTINGS), max_grad_norm=math.inf, backend=backend)
    ref_opt = torch.optim.AdamW(_group_dicts(ref, SETTINGS))
    for _ in range(3):
        _set_grads(ours, ref)
        opt.step()
        ref_opt.step()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in _flat(ours)}
    params_before = [p.detach().clone() for p in _flat(ours)]

    _set_grads(ours, ref)
    ours[0][1].grad[500] = bad
    opt.step()  # skipped; torch's optimizer does not see this step at all
    assert opt.skipped_steps == 1
    assert not math.isfinite(opt.grad_norm.item())
    for p, saved in zip(_flat(ours), params_before):
        assert torch.equal(p, saved)
        for key, value in before[id(p)].items():
            assert torch.equal(opt.state[p][key], value), key

    for _ in range(3):  # and training goes on as if the bad step never came
        _set_grads(ours, ref)
        opt.step()
        ref_opt.step()
    _assert_same_state(opt, _flat(ours), ref_opt, _flat(ref))
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device, backend", CASES)
def test_master_weights_follow_an_fp32_reference(device, backend, dtype):
    _skip_if_unbuilt(backend)
    sizes = [[1, 3, 1003], [40, 9]]
    ours = [[(torch.randn(n, device=device)).to(dtype).requires_grad_() for n in g] for g in sizes]
    ref = [[p.detach().float().requires_grad_() for p in g] for g in ours]  # exact fp32 copies
    initial = [p.detach().clone() for p in _flat(ours)]
    opt = AdamW(_group_dicts(ours, SETTINGS), lr=1e-3, master_weights=True, backend=backend)
    ref_opt = torch.optim.AdamW(_group_dicts(ref, SETTINGS), lr=1e-3)
    for _ in range(20):
        for p, q in zip(_flat(ours), _flat(ref)):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.float()
        opt.step()
        ref_opt.step()
    for p, q in zip(_flat(ours), _flat(ref)):
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.float32 and state["master_param"].dtype == torch.float32
        torch.testing.assert_close(state["master_param"], q.detach(), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(state["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"], rtol=RTOL, atol=ATOL)
        # The half param is the master rounded once (the reference may sit on a rounding tie).
        one_ulp = q.detach().abs() * torch.finfo(dtype).eps + torch.finfo(dtype).tiny
        assert ((p.float() - q.detach().to(dtype).float()).abs() <= one_ulp).all()
    # The steps add up in the master and reach the half params (each alone mostly rounds away).
    assert any(not torch.equal(p, p0) for p, p0 in zip(_flat(ours), initial))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device, backend", CASES)
def test_half_params_without_master_weights_meet_the_numerics_rule(device, backend, dtype):
    """Half-precision params and moments (as torch keeps them): after 10 steps each param is
    at most twice as far from a float64 AdamW as torch's own half-precision AdamW is."""
    _skip_if_unbuilt(backend)
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 instead of rounding to nearest")
    start = [torch.randn(n, device=device).to(dtype) for n in (3, 1003, 4097)]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    exact = [p.double().requires_grad_() for p in start]
    hyper = dict(lr=1e-2, weight_decay=0.1)
    opts = [AdamW(ours, **hyper, backend=backend), torch.optim.AdamW(theirs, **hyper),
            torch.optim.AdamW(exact, **hyper)]
    for _ in range(10):
        for a, b, c in zip(ours, theirs, exact):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
            c.grad = a.grad.double()
        for opt in opts:
            opt.step()
    for a, b, c in zip(ours, theirs, exact):
        assert_close_to_ref(a, c, b, f"{dtype} param", atol=1e-3)


@pytest.mark.parametrize("device, backend", CASES)
def test_state_dict_moves_between_torch_and_llmkern(device, backend):
    _skip_if_unbuilt(backend)
    sizes = [[3, 1003], [17, 1]]
    # torch -> llmkern
    ours, ref = _twin_params(sizes, device)
    ref_opt = torch.optim.AdamW(_group_dicts(ref, SETTINGS))
    for _ in range(4):
        _set_grads(ours, ref)
        ref_opt.step()
    with torch.no_grad():
        for p, q in zip(_flat(ours), _flat(ref)):
            p.copy_(q)
    opt = AdamW(_group_dicts(ours, [dict(lr=1.0, weight_decay=0.5)] * 2), backend=backend)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # as if through a file: no shared tensors
    assert opt.param_groups[0]["lr"] == SETTINGS[0]["lr"]
    for _ in range(4):
        _set_grads(ours, ref)
        opt.step()
        ref_opt.step()
    _assert_same_state(opt, _flat(ours), ref_opt, _flat(ref))

    def continue_in_torch(opt, params):
        """torch's AdamW loads opt's state into copies of params, and both go on identically."""
        fresh = [[p.detach().clone().requires_grad_() for p in g] for g in params]
        back = torch.optim.AdamW(_group_dicts(fresh, [dict(lr=1.0, weight_decay=0.5)] * 2))
        back.load_state_dict(copy.deepcopy(opt.state_dict()))
        assert [g["weight_decay"] for g in back.param_groups] == [g["weight_decay"] for g in SETTINGS]
        for _ in range(4):
            _set_grads(params, fresh)
            opt.step()
            back.step()
        _assert_same_state(opt, _flat(params), back, _flat(fresh))

    # llmkern -> torch
    continue_in_torch(opt, ours)

    # llmkern -> torch from an optimizer that never held torch's state: its groups have only
    # llmkern's keys (torch fills in its own options), its steps fp32 tensors on the parameters' device
    own, _ = _twin_params(sizes, device)
    own_opt = AdamW(_group_dicts(own, SETTINGS), backend=backend)
    for _ in range(3):
        for p in _flat(own):
            p.grad = torch.randn_like(p)
        own_opt.step()
    continue_in_torch(own_opt, own)


@pytest.mark.parametrize("device, backend", CASES)
def test_master_weights_in_a_group_that_mixes_fp32_and_bf16(device, backend):
    """fp32 params get no master (they are their own); bf16 ones do; one group holds both."""
    _skip_if_unbuilt(backend)
    half = torch.randn(1003, device=device).to(torch.bfloat16).requires_grad_()
    full = torch.randn(17, device=device, requires_grad=True)
    ref = [half.detach().float().requires_grad_(), full.detach().clone().requires_grad_()]
    opt = AdamW([half, full], master_weights=True, backend=backend)
    ref_opt = torch.optim.AdamW(ref)
    for _ in range(5):
        half.grad = torch.randn_like(half)
        full.grad = torch.randn_like(full)
        ref[0].grad = half.grad.float()
        ref[1].grad = full.grad.clone()
        opt.step()
        ref_opt.step()
    assert "master_param" not in opt.state[full]
    torch.testing.assert_close(opt.state[half]["master_param"], ref[0].detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(full.detach(), ref[1].detach(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device, backend", CASES)
def test_master_weights_survive_a_state_dict_round_trip(device, backend):
    """Optimizer.load_state_dict casts state to the param dtype; the fp32 master and moments
    must come back in fp32, bit for bit, and the two optimizers then step identically."""
    _skip_if_unbuilt(backend)
    params = [torch.randn(n, device=device).to(torch.bfloat16).requires_grad_() for n in (3, 1003)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = AdamW(params, master_weights=True, backend=backend)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    with torch.no_grad():
        for p, q in zip(params, twins):
            q.copy_(p)
    other = AdamW(twins, master_weights=True, backend=backend)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(params, twins):
        for key in ("master_param", "exp_avg", "exp_avg_sq"):
            assert other.state[q][key].dtype == torch.float32
            assert torch.equal(other.state[q][key], opt.state[p][key]), key
    for p, q in zip(params, twins):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    other.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["master_param"], other.state[q]["master_param"])


@pytest.mark.parametrize("device, backend", CASES)
def test_tensor_lr_with_a_scheduler(device, backend):
    _skip_if_unbuilt(backend)
    ours, ref = _twin_params([[3, 1003]], device)
    opt = AdamW(ours[0], lr=torch.tensor(1e-2), weight_decay=0.1, backend=backend)
    ref_opt = torch.optim.AdamW(ref[0], lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 / (1 + s))
    for _ in range(10):
        _set_grads(ours, ref)
        opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert opt.param_groups[0]["lr"].item() == pytest.approx(ref_opt.param_groups[0]["lr"])
    _assert_same_state(opt, _flat(ours), ref_opt, _flat(ref))


@pytest.mark.parametrize("device, backend", CASES)
def test_params_without_grad_are_left_alone(device, backend):
    _skip_if_unbuilt(backend)
    a = torch.randn(10, device=device, requires_grad=True)
    b = torch.randn(7, device=device, requires_grad=True)
    b0 = b.detach().clone()
    opt = AdamW([a, b], backend=backend, max_grad_norm=1.0)
    a.grad = torch.randn_like(a)
    opt.step()
    assert torch.equal(b, b0) and len(opt.state[b]) == 0
    assert float(opt.state[a]["step"]) == 1.0
    opt.step()  # nothing has a new gradient but a still has its old one: a second step
    assert float(opt.state[a]["step"]) == 2.0


@pytest.mark.parametrize("device, backend", CASES)
def test_more_tensors_than_one_launch_takes(device, backend):
    """The CUDA kernels pass their tensors' addresses as kernel arguments, 160 tensors per update
    launch and per norm launch: 170 tensors of one group (and an empty one) take two of each, with
    the partial sums of every norm launch adding up to one norm."""
    _skip_if_unbuilt(backend)
    sizes = [[1 + (7 * i) % 23 for i in range(170)], [3, 0, 1003]]
    ours, ref = _twin_params(sizes, device)
    opt = AdamW(_group_dicts(ours, SETTINGS), max_grad_norm=1.0, backend=backend)
    ref_opt = torch.optim.AdamW(_group_dicts(ref, SETTINGS))
    for i in range(3):
        _set_grads(ours, ref, scale=0.01 if i == 1 else 1.0)  # one step under the limit
        opt.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(_flat(ref), 1.0)
        ref_opt.step()
        torch.testing.assert_close(opt.grad_norm, ref_norm, rtol=1e-5, atol=0)
    _assert_same_state(opt, _flat(ours), ref_opt, _flat(ref))


def test_triton_updates_a_group_in_one_launch_per_dtype(monkeypatch):
    """Multi-tensor launches, not one per tensor: 175 tensors in two groups, fp32 and bf16, take per
    step one update launch per (group, dtype), one norm launch per dtype and one to finish the norm."""
    import llmkern.triton.adamw as kernels

    launches = []

    class Counted:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(kernels, name)

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for name in ("_adamw_update_kernel", "_sumsq_kernel", "_norm_finalize_kernel"):
        monkeypatch.setattr(kernels, name, Counted(name))
    device = "cuda" if HAS_CUDA else "cpu"
    first = [torch.randn(1 + (7 * i) % 23, device=device, requires_grad=True) for i in range(170)]
    second = [torch.randn(n, device=device, requires_grad=True) for n in (3, 1003, 17)]
    second += [torch.randn(n, device=device).to(torch.bfloat16).requires_grad_() for n in (5, 4097)]
    opt = AdamW(_group_dicts([first, second], SETTINGS), max_grad_norm=1.0, backend="triton")
    for step in range(2):
        for p in first + second:
            p.grad = torch.randn_like(p)
        launches.clear()
        opt.step()
        assert sorted(launches) == sorted(["_adamw_update_kernel"] * 3 + ["_sumsq_kernel"] * 2
                                          + ["_norm_finalize_kernel"]), (step, launches)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns (so -0.0 and 0.0, or two NaNs, compare as what they are)."""
    return t.detach().reshape(-1).view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _emulated_steps(order: str) -> list[torch.Tensor]:
    """Three clipped steps of the emulated CUDA kernels over fp32 params and bf16 ones with fp32
    masters, threads and blocks run in `order`: every param, state tensor and norm after them."""
    gen = torch.Generator().manual_seed(3)
    fp32 = [torch.randn(n, generator=gen).requires_grad_() for n in (1, 1003, 2 * 4096 + 1, 5 * 4096 + 3)]
    bf16 = [torch.randn(n, generator=gen).to(torch.bfloat16).requires_grad_() for n in (17, 5000)]
    params = fp32 + bf16
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, master_weights=True, max_grad_norm=1.0, backend="cuda")
    norms = []
    with simt.schedule(order):
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
            norms.append(opt.grad_norm.clone())
    state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    return [*params, *state, *norms]


@pytest.mark.simt
def test_cuda_simt_step_does_not_depend_on_the_schedule():
    """The emulator runs threads and blocks forward, reversed and shuffled: a race (a block sum
    read before every warp wrote its part, two blocks updating one chunk) changes the bits."""
    _skip_if_unbuilt("cuda")
    first = _emulated_steps("forward")
    for order in ("reverse", "random:7", "random:11"):
        other = _emulated_steps(order)
        assert len(other) == len(first)
        for i, (a, b) in enumerate(zip(other, first)):
            assert torch.equal(_bits(a), _bits(b)), f"tensor {i} changes with the schedule {order}"
    # ... and the steps happened: a param moved, and every norm is finite and far from 0
    assert not torch.equal(first[0], torch.randn(1, generator=torch.Generator().manual_seed(3)))
    assert all(math.isfinite(n.item()) and n.item() > 1.0 for n in first[-3:])


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", id="cuda-simt", marks=pytest.mark.simt)])
def test_norm_is_deterministic_and_grads_of_mixed_dtypes(backend):
    """The kernels' norm over fp32 and bf16 grads: fp32 accumulation, the same bits twice."""
    params = [torch.randn(n, requires_grad=True) for n in (5000, 3)]
    params.append(torch.randn(777).to(torch.bfloat16).requires_grad_())
    for p in params:
        p.grad = torch.randn_like(p) * 3
    norms = []
    for _ in range(2):
        opt = AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.0}], lr=0.0, weight_decay=0.0,
                    max_grad_norm=1e9, backend=backend)
        opt.step()
        norms.append(opt.grad_norm.clone())
    expected = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in params]))
    assert torch.equal(norms[0], norms[1])
    torch.testing.assert_close(norms[0].double(), expected, rtol=1e-6, atol=0)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=-1e-3), ValueError, "lr must be >= 0"),
        (dict(lr="0.1"), TypeError, "lr must be a float"),
        (dict(eps=-1e-8), ValueError, "eps must be >= 0"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay must be >= 0"),
        (dict(betas=(1.0, 0.999)), ValueError, r"beta1 must be in \[0, 1\)"),
        (dict(betas=(0.9, -0.1)), ValueError, r"beta2 must be in \[0, 1\)"),
        (dict(betas=(0.9,)), TypeError, "betas must be a pair"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be > 0"),
        (dict(max_grad_norm="1"), TypeError, "max_grad_norm must be a float"),
        (dict(master_weights=1), TypeError, "master_weights must be a bool"),
        (dict(backend="numpy"), ValueError, "backend must be one of"),
        (dict(lr=torch.tensor(-1e-3)), ValueError, "lr must be >= 0"),
        (dict(eps=math.nan), ValueError, "eps must be >= 0"),
        (dict(betas=(0.9, 1.0)), ValueError, r"beta2 must be in \[0, 1\)"),
        (dict(betas=(-0.1, 0.999)), ValueError, r"beta1 must be in \[0, 1\)"),
        (dict(lr=torch.ones(2)), ValueError, r"must hold one value \(a 0-d tensor\); got shape \(2,\)"),
        (dict(lr=torch.tensor(1)), TypeError, "a tensor lr must have a floating dtype; got torch.int64"),
        # inf steps every parameter to inf or NaN (lr, weight_decay), or none at all (eps)
        (dict(lr=math.inf), ValueError, "lr must be >= 0 and finite, got inf"),
        (dict(lr=torch.tensor(math.inf)), ValueError, "lr must be >= 0 and finite, got inf"),
        (dict(eps=math.inf), ValueError, "eps must be >= 0 and finite, got inf"),
        (dict(weight_decay=math.inf), ValueError, "weight_decay must be >= 0 and finite, got inf"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdamW([torch.zeros(3, requires_grad=True)], **kwargs)


def test_numpy_hyperparameters_are_taken_as_torch_takes_them():
    """NumPy scalars (a config read with NumPy) are floats to torch.optim.AdamW: the same step here.
    (Not betas: torch takes them as Python floats or tensors only.)"""
    np = pytest.importorskip("numpy")
    settings = dict(lr=np.float32(0.1), betas=(0.8, 0.9), eps=np.float32(1e-6),
                    weight_decay=np.int64(1))
    p = torch.randn(5, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = AdamW([p], max_grad_norm=np.float32(1e9), backend="torch", **settings)
    ref = torch.optim.AdamW([q], **settings)
    for _ in range(3):
        p.grad = torch.randn(5)
        q.grad = p.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


def test_bad_param_groups_are_refused():
    with pytest.raises(TypeError, match="complex parameters"):
        AdamW([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="one device"):
        AdamW([torch.zeros(3, requires_grad=True), torch.zeros(3, device="meta", requires_grad=True)])
    opt = AdamW([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="param group 1: lr must be >= 0"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -1.0})
    assert len(opt.param_groups) == 1  # the refused group was not kept
    with pytest.raises(ValueError, match="all parameters must be on one device"):
        AdamW([{"params": [torch.zeros(3, requires_grad=True)]},
               {"params": [torch.zeros(3, device="meta", requires_grad=True)]}], max_grad_norm=1.0)


def test_a_state_dict_without_adamw_hyperparameters_is_refused():
    opt = AdamW([torch.zeros(3, requires_grad=True)])
    state = opt.state_dict()
    del state["param_groups"][0]["eps"], state["param_groups"][0]["betas"]
    with pytest.raises(ValueError, match="param group 0 of the state_dict lacks betas, eps"):
        opt.load_state_dict(state)


def test_master_state_loaded_without_master_weights_steps_the_parameters_themselves():
    """A master-weights optimizer's state_dict loaded into one without: the parameters are updated
    themselves (as a plain bf16 step is), not a bf16 copy of the master kept in the state."""
    params = [torch.randn(n).to(torch.bfloat16).requires_grad_() for n in (3, 1003)]
    master = AdamW(params, master_weights=True, backend="torch")
    for p in params:
        p.grad = torch.randn_like(p)
    master.step()
    plain_params = [p.detach().clone().requires_grad_() for p in params]
    plain = AdamW(plain_params, backend="torch")
    plain.load_state_dict(copy.deepcopy(master.state_dict()))
    assert all("master_param" not in plain.state[p] for p in plain_params)
    twins = [p.detach().clone().requires_grad_() for p in plain_params]
    reference = AdamW(twins, backend="torch")
    state = copy.deepcopy(master.state_dict())
    for entry in state["state"].values():
        del entry["master_param"]
    reference.load_state_dict(state)
    with torch.no_grad():  # a change made to the parameters after the load is what the step starts from
        for p, q in zip(plain_params, twins):
            p.add_(1.0)
            q.add_(1.0)
    _set_grads([plain_params], [twins])
    plain.step()
    reference.step()
    for p, q in zip(plain_params, twins):
        assert torch.equal(p, q)


@pytest.mark.parametrize("device, backend", CASES)
def test_bad_gradients_are_refused_at_the_step(device, backend):
    """On every backend, before any launch: nothing is updated by a refused step."""
    _skip_if_unbuilt(backend)
    p = torch.zeros(4, device=device, requires_grad=True)
    opt = AdamW([p], backend=backend)
    p.grad = torch.zeros(4, device=device).to_sparse()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
    p.grad_dtype = None  # torch refuses a gradient of another dtype unless told to allow it
    p.grad = torch.ones(4, dtype=torch.complex64, device=device)
    with pytest.raises(TypeError, match="does not support complex gradients; got one of dtype torch.complex64"):
        opt.step()
    p.grad = torch.ones(4, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="gradient must have its parameter's dtype"):
        opt.step()
    assert torch.equal(p, torch.zeros_like(p)) and len(opt.state[p]) == 0


def test_unavailable_backend_and_unsupported_state_are_refused():
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.ones(4)
    with pytest.raises(ValueError, match="cannot run adamw"):
        AdamW([p], backend="cuda").step()
    amsgrad = torch.optim.AdamW([p], amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad=True"):
        AdamW([p]).load_state_dict(amsgrad.state_dict())


# --- GPU only -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", GPU_KERNELS)
def test_cuda_graph_captures_a_step(backend):
    """A captured step replays with new gradients and a scheduled device lr, clipping on."""
    _skip_if_unbuilt(backend)
    ours, ref = _twin_params([[1003, 3], [4097]], "cuda")
    lr = torch.tensor(1e-2, device="cuda")
    opt = AdamW(_group_dicts(ours, [dict(lr=lr, weight_decay=0.1), dict(lr=lr, weight_decay=0.0)]),
                max_grad_norm=1.0, backend=backend)
    ref_opt = torch.optim.AdamW(_group_dicts(ref, [dict(lr=1e-2, weight_decay=0.1), dict(lr=1e-2, weight_decay=0.0)]))

    def both_step(lr_value: float) -> None:
        lr.fill_(lr_value)
        for g in ref_opt.param_groups:
            g["lr"] = lr_value
        torch.nn.utils.clip_grad_norm_(_flat(ref), 1.0)
        ref_opt.step()

    static_grads = [torch.zeros_like(p) for p in _flat(ours)]
    for p, g in zip(_flat(ours), static_grads):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: creates the state and compiles the kernels
        for _ in range(3):
            for g, q in zip(static_grads, _flat(ref)):
                g.copy_(torch.randn_like(g))
                q.grad = g.clone()
            opt.step()
            both_step(1e-2)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(5):
        for g, q in zip(static_grads, _flat(ref)):
            g.copy_(torch.randn_like(g) * (10.0 if i % 2 else 0.01))
            q.grad = g.clone()
        lr.fill_(1e-2 / (i + 2))
        graph.replay()
        both_step(1e-2 / (i + 2))
    torch.cuda.synchronize()
    _assert_same_state(opt, _flat(ours), ref_opt, _flat(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module", [
    pytest.param("built", marks=pytest.mark.skipif(not CUDA_BUILT, reason="llmkern._cuda has no adamw kernels")),
    pytest.param("simt", marks=pytest.mark.simt),
])
def test_cuda_binding_checks_its_arguments_before_any_launch(module):
    """Runs without a GPU: the checks come before any CUDA call (on llmkern._cuda, or on the
    emulator's build of the same bindings)."""
    mod = _backend.cuda_module()
    args = dict(masters=[], param_dtype=0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                lr_device=0, clip_state=0, stream=0)
    mod.adamw_step([], [], [], [], steps=[], numels=[], **args)  # nothing to do: no launch
    with pytest.raises(ValueError, match="one entry per tensor"):
        mod.adamw_step([16], [16], [16], [], steps=[16], numels=[4], **args)
    with pytest.raises(RuntimeError, match="adamw_step"):
        mod.adamw_step([16], [16], [16], [16], steps=[16], numels=[-1], **args)
    with pytest.raises(RuntimeError, match="adamw_step"):
        mod.adamw_step([0], [16], [16], [16], steps=[16], numels=[4], **args)
    with pytest.raises(RuntimeError, match="adamw_grad_sumsq"):
        mod.adamw_grad_sumsq([16], [-5], 0, 0, 10, 0)


@pytest.mark.parametrize("backend", GPU_KERNELS)
def test_a_step_never_waits_for_the_gpu(backend):
    """With clipping and a skipped step on the way, no call in step() synchronizes."""
    _skip_if_unbuilt(backend)
    params = [torch.randn(n, device="cuda", requires_grad=True) for n in (1003, 4097, 3)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = AdamW(params, max_grad_norm=1.0, backend=backend)
    opt.step()  # warm-up: state, kernels, pointer tables
    params[0].grad[0] = math.inf
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        params[0].grad[0] = 1.0
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.skipped_steps == 1
    assert float(opt.state[params[1]]["step"]) == 2.0


def test_triton_norm_rebuilds_what_it_cached_on_another_device():
    """Parameters moved to another GPU keep their sizes (and may even reuse addresses there): the norm's
    tables and partials cached on the old device must be made again, not read by kernels on the new one.
    A `meta` tensor stands for the old device's (a kernel reading it fails)."""
    import llmkern.triton.adamw as kernels

    device = torch.device("cuda:0" if HAS_CUDA else "cpu")
    grads = [torch.randn(n, device=device) for n in (5, 300)]
    numels = tuple(g.numel() for g in grads)
    key = tuple(g.data_ptr() for g in grads) + numels
    dtype = torch.float32
    cache = {f"norm_table_{dtype}": (key, torch.empty((2, 2), dtype=torch.int64, device="meta")),
             f"norm_chunks_{dtype}": (numels, kernels._chunk_table(numels).to("meta")),
             "partials": torch.empty(64, device="meta")}
    norm, clip, skipped = (torch.zeros(1, device=device), torch.zeros(2, device=device),
                           torch.zeros(1, dtype=torch.int64, device=device))
    kernels.grad_norm(grads, 1.0, norm, clip, skipped, cache)
    want = torch.linalg.vector_norm(torch.cat([g.double() for g in grads]))
    torch.testing.assert_close(norm.double(), want.reshape(1), rtol=1e-5, atol=0)
    assert all(t.device == device for t in (cache["partials"], cache[f"norm_table_{dtype}"][1],
                                            cache[f"norm_chunks_{dtype}"][1]))


def test_triton_kernels_compile_for_sm90():
    """The interpreter runs the kernels' Python but never lowers it; this builds their GPU code
    (see triton_build.py), which catches a kernel that would not build on a GPU."""
    pytest.importorskip("triton.backends.nvidia")
    from triton_build import run_build

    out = run_build('''
    import triton.language as tl
    import llmkern.triton.adamw as k

    update = {n: "fp32" for n in ("lr_hi", "lr_lo", "beta1_hi", "beta1_lo", "beta2_hi", "beta2_lo",
                                   "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "weight_decay")}
    update = {"table": "*i64", "chunks": "*i32", "lr_ptr": "*fp32", **update, "clip_state": "*fp32"}
    vector_loads = 0
    for param, state, master, on_device in [(tl.float32, tl.float32, False, False),
                                            (tl.bfloat16, tl.float32, True, True),
                                            (tl.float16, tl.float16, False, False)]:
        ptx = build(k._adamw_update_kernel, update, dict(
            PARAM_DTYPE=param, STATE_DTYPE=state, HAS_MASTER=master, HAS_CLIP=True, LR_ON_DEVICE=on_device,
            LERP_FROM_START=True, ALIGNED=True, BLOCK=k.BLOCK), 90, num_warps=8)
        if param == tl.float32:
            vector_loads = ptx.count("ld.global.v4")
    build(k._sumsq_kernel, {"table": "*i64", "chunks": "*i32", "partials": "*fp32", "first": "i32"},
          dict(GRAD_DTYPE=tl.bfloat16, ALIGNED=True, BLOCK=k.BLOCK), 90, num_warps=8)
    build(k._norm_finalize_kernel, {"partials": "*fp32", "count": "i32", "max_norm": "fp32", "grad_norm": "*fp32",
                                    "clip_state": "*fp32", "skipped": "*i64"}, dict(BLOCK=k.FINALIZE_BLOCK), 90,
          num_warps=8)
    print("vector_loads", vector_loads)
    ''')
    # Whole chunks of p, g, m, v load 16 bytes at a time (4 packs each for 16 fp32 per thread).
    assert int(out.split("vector_loads")[-1]) >= 16


# --- from a bug hunt ------------------------------------------------------------------------------


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda opt: pickle.loads(pickle.dumps(opt))], ids=["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_its_options_and_steps(copier):
    """Optimizer pickles only defaults, state and param_groups: the copy lacked max_grad_norm,
    master_weights, ... and its first step raised AttributeError."""
    p = torch.randn(5, requires_grad=True)
    opt = AdamW([p], backend="torch", max_grad_norm=0.5)
    p.grad = torch.full((5,), math.inf)
    opt.step()  # skipped
    twin = copier(opt)
    assert twin.max_grad_norm == 0.5 and twin.master_weights is False and twin.backend == "torch"
    assert twin.skipped_steps == 1
    q = twin.param_groups[0]["params"][0]
    q.grad = torch.ones(5)
    twin.step()
    assert twin.skipped_steps == 1 and float(twin.grad_norm) == pytest.approx(math.sqrt(5))
    assert opt.skipped_steps == 1 and torch.isinf(opt.grad_norm)  # the original is its own


@pytest.mark.parametrize("option", ["amsgrad", "maximize", "differentiable"])
def test_a_group_asking_for_a_torch_only_option_is_refused(option):
    """A group dict with maximize=True was accepted and silently minimized."""
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=f"param group 0: {option}=True"):
        AdamW([{"params": [p], option: True}])
    opt = AdamW([p])
    with pytest.raises(ValueError, match=f"param group 1: {option}=True"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], option: True})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_state_of_other_shapes_is_refused_at_the_load(backend):
    """The kernels trusted the moments to have their parameter's size: a state_dict of another
    model (same group sizes) made the Triton kernel write past the end of a moment."""
    small = torch.zeros(4, requires_grad=True)
    other = torch.optim.AdamW([small])
    small.grad = torch.ones(4)
    other.step()
    p = torch.zeros(8, requires_grad=True)
    opt = AdamW([p], backend=backend)
    with pytest.raises(ValueError, match=r"exp_avg has shape \(4,\), the parameter \(8,\)"):
        opt.load_state_dict(other.state_dict())
    assert len(opt.state) == 0  # left as it was


def test_a_master_that_went_through_torch_adamw_is_not_taken_back():
    """llmkern (master weights) -> torch.optim.AdamW -> llmkern: torch kept the master copy in
    the state (cast to bf16) without stepping it; loaded back it replaced the parameter, undoing
    torch's steps."""
    p = torch.randn(64).to(torch.bfloat16).requires_grad_()
    ours = AdamW([p], lr=1e-2, master_weights=True, backend="torch")
    for _ in range(3):
        p.grad = torch.randn(64).to(torch.bfloat16)
        ours.step()
    theirs = torch.optim.AdamW([p], lr=1e-2)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    for _ in range(5):
        p.grad = torch.randn(64).to(torch.bfloat16)
        theirs.step()
    back = AdamW([p], lr=0.0, weight_decay=0.0, master_weights=True, backend="torch")
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    back.param_groups[0]["lr"] = 0.0
    before = p.detach().clone()
    p.grad = torch.randn(64).to(torch.bfloat16)
    back.step()  # lr 0: the parameter must not move
    assert torch.equal(p, before)
    assert back.state[p]["master_param"].dtype == torch.float32


def test_a_parameter_twice_in_a_group_is_refused():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="appears twice in the group"):
        AdamW([p, p], backend="torch")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_auto_leaves_to_torch_the_groups_its_kernels_cannot_update(device):
    """On a GPU "auto" picks the kernels, which take contiguous float32/16/bf16 parameters only: a group of
    float64 or non-contiguous ones steps with torch's update (as torch.optim.AdamW would), and the global
    clip reads every group (on the CPU, torch's update throughout: its norm took no float64 gradient)."""
    torch.manual_seed(0)
    shapes = [((5, 7), torch.float64, False), ((6, 4), torch.float32, True), ((33,), torch.float32, False)]
    ours, theirs = [], []
    for shape, dtype, transposed in shapes:
        value = torch.randn(*shape, dtype=dtype, device=device)
        value = value.t().contiguous().t() if transposed else value  # non-contiguous strides
        ours.append(torch.nn.Parameter(value.clone()))
        theirs.append(torch.nn.Parameter(value.clone()))
    groups = lambda ps: [{"params": [ps[0]]}, {"params": [ps[1]]}, {"params": [ps[2]], "weight_decay": 0.0}]
    opt = AdamW(groups(ours), lr=1e-2, max_grad_norm=0.5)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-2)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
