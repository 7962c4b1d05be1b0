"""Fused linear + cross-entropy: the loss and the gradients of x, weight and bias against the
float64 reference, odd shapes, ignored rows, both reductions, label smoothing, Gemma 2's soft cap,
the model's fused loss path, torch.library checks, torch.compile, and bad input.

The kernel backends (triton, cuda) share the chunk loop and differ in the row kernel; each test of
the op runs on both. Without a GPU the Triton kernel runs in the interpreter (conftest sets
TRITON_INTERPRET=1) and the CUDA kernel in the emulator (marker simt), in fp32 and fp16; bf16 and
the GPT-2-sized shapes run on a GPU (marker cuda).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern.model import GPT, GPTConfig
from llmkern.ops import reference
from llmkern.ops import _chunked_linear_cross_entropy as chunks
from numerics import assert_close_to_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
flce = llmkern.ops.fused_linear_cross_entropy

# (backend, device): Triton (interpreted on a CPU), CUDA on a GPU, CUDA in the emulator.
KERNELS = [
    pytest.param("triton", DEVICE, id="triton"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
    pytest.param("cuda", "cpu", id="cuda-simt", marks=pytest.mark.simt),
]


def _row_kernels(backend):
    if backend == "cuda":
        from llmkern.cuda import fused_linear_cross_entropy as kernels
    else:
        from llmkern.triton import fused_linear_cross_entropy as kernels
    return kernels


def _make(n, vocab, hidden, dtype, with_bias=False, n_ignored=0, ignore_index=-100, device=DEVICE):
    x = torch.randn(n, hidden, dtype=dtype, device=device)
    weight = (torch.randn(vocab, hidden, device=device) / math.sqrt(hidden) * 2).to(dtype)
    # Off zero so that the logits' mean (which label smoothing uses) is not ~0.
    bias = (torch.randn(vocab, device=device) + 2).to(dtype) if with_bias else None
    target = torch.randint(0, vocab, (n,), device=device)
    target[torch.randperm(n, device=device)[:n_ignored]] = ignore_index
    return x, weight, target, bias


def _loss_and_grads(fn, x, weight, target, bias):
    """fn's loss and the gradients of x, weight (and bias) for d loss = 1."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias) if t is not None]
    loss = fn(leaves[0], leaves[1], target, leaves[2] if bias is not None else None)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _capped_reference(x, weight, target, bias, softcap, **kwargs):
    """The loss of the soft-capped logits, written out here: the logits in x's dtype (as
    reference.fused_linear_cross_entropy makes them), softcap * tanh(logits / softcap) and the loss in
    fp32 (float64 for float64 inputs). kwargs: F.cross_entropy's."""
    logits = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    logits = logits.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return F.cross_entropy(softcap * torch.tanh(logits / softcap), target, **kwargs)


def _check(n, vocab, hidden, dtype, with_bias=False, n_ignored=0, chunk_rows=None, device=DEVICE, backend="triton",
           softcap=None, **kwargs):
    """`backend` vs the float64 truth, allowing twice the error of torch's own computation in `dtype`."""
    x, weight, target, bias = _make(n, vocab, hidden, dtype, with_bias, n_ignored, kwargs.get("ignore_index", -100),
                                    device)

    def ours(x, w, t, b):
        return flce(x, w, t, bias=b, backend=backend, chunk_rows=chunk_rows, softcap=softcap, **kwargs)

    def ref(x, w, t, b):
        if softcap:
            return _capped_reference(x, w, t, b, softcap, **kwargs)
        return reference.fused_linear_cross_entropy(x, w, t, b, **kwargs)

    loss, grads = _loss_and_grads(ours, x, weight, target, bias)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    loss64, grads64 = _loss_and_grads(ref, d64(x), d64(weight), target, d64(bias))
    loss_lp, grads_lp = _loss_and_grads(ref, x, weight, target, bias)

    name = f"{backend} {dtype} N={n} V={vocab} H={hidden} chunk={chunk_rows} softcap={softcap}"
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_to_ref(loss, loss64, loss_lp, f"{name} loss", atol=1e-5)
    for gname, a, b, c in zip(["dx", "dweight", "dbias"], grads, grads64, grads_lp):
        assert a.dtype == c.dtype, f"{gname} dtype {a.dtype} != {c.dtype}"
        assert_close_to_ref(a, b, c, f"{name} {gname}")


# (N, V, H): rows 1 / 17 / 123, vocabularies 1 / 5 / 1000 / 1001, hidden 16 / 64.
SHAPES = [
    (1, 1, 16), (1, 1001, 64), (17, 5, 16), (17, 1000, 64), (17, 1001, 16),
    (123, 5, 64), (123, 1000, 16), (123, 1001, 64),
]


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("n,vocab,hidden", SHAPES)
def test_matches_reference(n, vocab, hidden, dtype, backend, device):
    # Several chunks (one of them short) with a bias and some ignored rows, where the rows allow.
    _check(n, vocab, hidden, dtype, with_bias=n > 1, n_ignored=n // 5, chunk_rows=max(1, n // 3), device=device,
           backend=backend)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_sum_reduction_and_label_smoothing(dtype, backend, device):
    on = dict(device=device, backend=backend)
    _check(33, 301, 32, dtype, n_ignored=4, chunk_rows=10, reduction="sum", **on)
    _check(33, 301, 32, dtype, with_bias=True, n_ignored=4, chunk_rows=10, label_smoothing=0.1, **on)
    _check(33, 301, 32, dtype, n_ignored=4, chunk_rows=10, reduction="sum", label_smoothing=1.0, **on)


# Gemma 2's final cap is 30; 2.5 puts most of these logits (bias ~2, spread ~2) where tanh bends, so a
# missing cap, or a gradient not taken through it, is far outside the tolerances.
SOFTCAP = 2.5


@pytest.mark.parametrize("backend,device", KERNELS + [pytest.param("torch", DEVICE, id="torch")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("n,vocab,hidden", [(1, 1, 16), (17, 1001, 16), (5, 4097, 16), (123, 5, 64)])
def test_softcap_matches_reference(n, vocab, hidden, dtype, backend, device):
    """The loss of the capped logits and the x, weight and bias gradients through the cap: odd vocabularies
    (a tail block alone, whole blocks and a tail), ignored rows, several chunks."""
    _check(n, vocab, hidden, dtype, with_bias=True, n_ignored=n // 5, chunk_rows=max(1, n // 3), device=device,
           backend=backend, softcap=SOFTCAP)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_softcap_with_label_smoothing_and_sum(dtype, backend, device):
    on = {"device": device, "backend": backend, "softcap": SOFTCAP}
    _check(33, 301, 32, dtype, with_bias=True, n_ignored=4, chunk_rows=10, label_smoothing=0.1, **on)
    _check(33, 301, 32, dtype, n_ignored=4, chunk_rows=10, reduction="sum", label_smoothing=1.0, ignore_index=-1,
           **on)


def test_softcap_in_bfloat16_on_triton():
    """The row kernel has no tl.dot, so the interpreter runs it in bf16 too."""
    _check(17, 1001, 32, torch.bfloat16, with_bias=True, n_ignored=3, chunk_rows=6, softcap=SOFTCAP)


@pytest.mark.parametrize("backend,device", KERNELS + [pytest.param("torch", DEVICE, id="torch")])
def test_softcap_of_zero_or_none_is_no_cap(backend, device):
    """0 and None both mean no cap (the kernels' constexpr off), and a cap changes the loss."""
    x, weight, target, bias = _make(9, 40, 16, torch.float32, with_bias=True, device=device)
    plain = flce(x, weight, target, bias=bias, backend=backend)
    assert torch.equal(flce(x, weight, target, bias=bias, backend=backend, softcap=0), plain)
    assert torch.equal(flce(x, weight, target, bias=bias, backend=backend, softcap=None), plain)
    assert not torch.allclose(flce(x, weight, target, bias=bias, backend=backend, softcap=SOFTCAP), plain, atol=1e-2)


@pytest.mark.parametrize("backend,device", KERNELS + [pytest.param("torch", DEVICE, id="torch")])
@pytest.mark.parametrize("label_smoothing,softcap", [(0.0, None), (0.1, None), (0.1, 3.0)])
def test_padding_rows_past_num_classes(label_smoothing, softcap, backend, device):
    """num_classes = 45 of weight's 64 rows: the loss and gradients of the 45-row head, and exact
    zeros for the padding rows' gradients, even where the padding weights are huge."""
    x, weight, target, bias = _make(21, 64, 16, torch.float32, with_bias=True, n_ignored=3, device=device)
    weight[45:] = 1e4
    bias[45:] = 1e4
    target = torch.where(target == -100, target, target % 45)
    kwargs = dict(label_smoothing=label_smoothing)
    loss, (dx, dw, db) = _loss_and_grads(
        lambda x, w, t, b: flce(x, w, t, bias=b, backend=backend, chunk_rows=8, num_classes=45, softcap=softcap,
                                **kwargs),
        x, weight, target, bias,
    )

    def ref(x, w, t, b):
        if softcap:  # the padding would be capped to +softcap: it must stay out of the softmax
            return _capped_reference(x, w, t, b, softcap, **kwargs)
        return reference.fused_linear_cross_entropy(x, w, t, b, **kwargs)

    ref_loss, (ref_dx, ref_dw, ref_db) = _loss_and_grads(ref, x, weight[:45], target, bias[:45])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
    assert dw.shape == weight.shape and db.shape == bias.shape
    torch.testing.assert_close(dw[:45], ref_dw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db[:45], ref_db, rtol=1e-5, atol=1e-6)
    assert torch.equal(dw[45:], torch.zeros_like(dw[45:])) and torch.equal(db[45:], torch.zeros_like(db[45:]))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_another_ignore_index_and_the_default_chunk(backend, device):
    _check(40, 97, 16, torch.float32, n_ignored=7, ignore_index=-1, device=device, backend=backend)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_fp32_weight_with_fp16_input(backend, device):
    """fp32 parameters with 16-bit activations (autocast): matmuls in fp16, weight gradient in fp32."""
    x, _, target, _ = _make(25, 200, 32, torch.float16, device=device)
    weight = torch.randn(200, 32, device=device) / 4
    ours, grads = _loss_and_grads(
        lambda x, w, t, b: flce(x, w, t, backend=backend, chunk_rows=7), x, weight, target, None
    )
    truth, grads64 = _loss_and_grads(
        reference.fused_linear_cross_entropy, x.double(), weight.half().double(), target, None
    )
    theirs, grads_lp = _loss_and_grads(reference.fused_linear_cross_entropy, x, weight, target, None)
    assert grads[1].dtype == torch.float32
    assert_close_to_ref(ours, truth, theirs, "loss", atol=1e-5)
    for name, a, b, c in zip(["dx", "dweight"], grads, grads64, grads_lp):
        assert_close_to_ref(a, b, c, name)


def test_autocast_runs_the_matmuls_in_its_dtype():
    """Under autocast an fp32 x is cast like a Linear layer's input; the fp32 weight gets an fp32 gradient."""
    x, weight, target, _ = _make(20, 64, 32, torch.float32)
    weight.requires_grad_(True)
    w_ref = weight.detach().clone().requires_grad_(True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = flce(x, weight, target, backend="triton", chunk_rows=8)
        expected = F.cross_entropy(F.linear(x, w_ref).float(), target)
    loss.backward()
    expected.backward()
    assert weight.grad.dtype == torch.float32
    # bf16 logits move the loss by ~1e-3 from fp32 ones; ours and torch's bf16 agree far closer.
    torch.testing.assert_close(loss, expected, rtol=0, atol=5e-5)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("backend,device", KERNELS + [pytest.param("torch", DEVICE, id="torch")])
def test_a_16_bit_x_of_another_type_than_autocasts_keeps_its_dtype(backend, device):
    """An fp16 x under bf16 autocast: the matmul runs in fp16 on every backend (the torch one ran it in bf16)."""
    x, _, target, _ = _make(6, 50, 64, torch.float16, device=device)
    weight = torch.randn(50, 64, device=device)  # logits ~ 8: bf16 rounds them by ~0.03, fp16 by ~0.004
    want = F.cross_entropy(F.linear(x, weight.half()).float(), target)  # outside autocast: fp16 logits
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = flce(x, weight, target, backend=backend)
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_3d_input_with_2d_target(backend, device):
    x, weight, target, _ = _make(2 * 9, 50, 16, torch.float32, device=device)
    x3, target2 = x.view(2, 9, 16), target.view(2, 9)
    got = flce(x3, weight, target2, backend=backend)
    torch.testing.assert_close(got, F.cross_entropy(x @ weight.T, target), rtol=1e-5, atol=1e-5)
    assert flce(x3, weight, target, backend=backend).item() == pytest.approx(got.item())  # flat target too


@pytest.mark.parametrize("backend,device", KERNELS + [pytest.param("torch", DEVICE, id="torch")])
def test_all_rows_ignored_match_f_cross_entropy(backend, device):
    """Mean over no rows is NaN (0 / 0) as in F.cross_entropy, with zero gradients; sum is 0."""
    x, weight, target, _ = _make(6, 20, 8, torch.float32, n_ignored=6, device=device)
    for reduction in ("mean", "sum"):
        loss, (dx, dw) = _loss_and_grads(
            lambda x, w, t, b: flce(x, w, t, reduction=reduction, backend=backend), x, weight, target, None
        )
        expected = F.cross_entropy(x @ weight.T, target, reduction=reduction)
        torch.testing.assert_close(loss, expected, equal_nan=True)
        assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))
    assert math.isnan(flce(x, weight, target, backend=backend).item())


@pytest.mark.parametrize("backend,device", KERNELS)
def test_no_rows(backend, device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    weight = torch.randn(5, 8, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    assert flce(x, weight, target, reduction="sum", backend=backend).item() == 0.0
    loss = flce(x, weight, target, backend=backend)
    assert math.isnan(loss.item())
    loss.backward()
    assert x.grad.shape == (0, 8) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend,device", KERNELS + [pytest.param("torch", DEVICE, id="torch")])
def test_empty_hidden_dim(backend, device):
    """H = 0: every logit is the bias (or 0), as F.linear gives; the (..., 0) input has rows to count."""
    x = torch.randn(2, 3, 0, device=device, requires_grad=True)
    weight = torch.randn(5, 0, device=device, requires_grad=True)
    bias = torch.randn(5, device=device, requires_grad=True)
    target = torch.randint(0, 5, (6,), device=device)
    loss = flce(x, weight, target, bias=bias, backend=backend)
    loss.backward()
    ref_bias = bias.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_bias.expand(6, 5), target)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(bias.grad, ref_bias.grad)
    assert x.grad.shape == (2, 3, 0) and weight.grad.shape == (5, 0)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_target_out_of_range_gives_nan_not_a_number(backend, device):
    """The kernel backends do not wait for the GPU to check targets: a bad row poisons the loss."""
    x, weight, target, _ = _make(5, 10, 8, torch.float32, device=device)
    for bad in (10, -3):
        target[2] = bad
        assert math.isnan(flce(x, weight, target, backend=backend).item())
        assert math.isnan(flce(x, weight, target, reduction="sum", backend=backend).item())


@pytest.mark.parametrize("backend,device", KERNELS)
def test_only_the_gradients_asked_for(backend, device):
    x, weight, target, bias = _make(9, 30, 8, torch.float32, with_bias=True, device=device)
    expected = F.cross_entropy(F.linear(x, weight, bias), target)
    with torch.no_grad():
        torch.testing.assert_close(flce(x, weight, target, bias=bias, backend=backend), expected)
    weight.requires_grad_(True)  # a frozen input x, a trained head (and frozen bias)
    loss = flce(x, weight, target, bias=bias, backend=backend)
    loss.backward()
    w_ref = weight.detach().clone().requires_grad_(True)
    F.cross_entropy(F.linear(x, w_ref, bias), target).backward()
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-5, atol=1e-7)
    assert x.grad is None and bias.grad is None


@pytest.mark.parametrize("backend,device", KERNELS)
def test_gradient_is_scaled_by_the_upstream_gradient(backend, device):
    x, weight, target, _ = _make(11, 40, 16, torch.float32, device=device)
    x.requires_grad_(True)
    (3.5 * flce(x, weight, target, backend=backend, chunk_rows=4)).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (3.5 * F.cross_entropy(x_ref @ weight.T, target)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-7)


def _worst_row_error(grad: torch.Tensor, ref64: torch.Tensor) -> float:
    """The largest relative error of a row: small rows count as much as large ones."""
    return ((grad.double() - ref64).norm(dim=1) / ref64.norm(dim=1)).max().item()


@pytest.mark.parametrize("backend,device", KERNELS)
def test_float16_gradients_survive_until_the_loss_scale(backend, device):
    """A confident model (loss ~1e-3) in float16 under a loss scale of 2**16: its logits' gradients, the
    mean's p / N, lie below float16's normal range. They used to be rounded to float16 before the
    backward's loss scale came, so rows of grad_x lost all their digits (relative error 0.14 where
    PyTorch's own float16 path has 0.006); every row must be as good as PyTorch's."""
    n, vocab, hidden, loss_scale = 64, 64, 64, 2.0**16
    weight = 3 * torch.eye(vocab, hidden, device=device) + 0.1 * torch.randn(vocab, hidden, device=device)
    target = torch.randint(0, vocab, (n,), device=device)
    x = (4 * torch.eye(vocab, hidden, device=device)[target] + 0.3 * torch.randn(n, hidden, device=device)).half()

    def scaled_grads(fn, x, weight):
        x, weight = x.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
        (fn(x, weight, target) * loss_scale).backward()
        return x.grad, weight.grad

    ours = scaled_grads(lambda x, w, t: flce(x, w, t, backend=backend), x, weight)
    truth = scaled_grads(reference.fused_linear_cross_entropy, x.double(), weight.double())
    torch_fp16 = scaled_grads(reference.fused_linear_cross_entropy, x, weight)
    for name, got, want, theirs in zip(("dx", "dweight"), ours, truth, torch_fp16):
        err, torch_err = _worst_row_error(got, want), _worst_row_error(theirs, want)
        assert err <= 2 * torch_err + 1e-3, f"{backend} {name}: row error {err:.3e} > 2 x torch's {torch_err:.3e}"


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("vocab", [3, 4096, 4097])  # a tail block only, whole blocks only, both
@pytest.mark.parametrize("softcap", [0.0, 1.5], ids=["no-cap", "cap"])
def test_kernel_writes_every_element(dtype, vocab, softcap, backend, device):
    """The per-row kernel alone: a NaN-filled loss and every logit must be overwritten; with a cap, the loss
    of the capped logits and the raw logits' gradient (the capped ones' times the slope 1 - tanh^2)."""
    logits = (torch.randn(7, vocab, device=device) * 2).to(dtype)
    target = torch.randint(0, vocab, (7,), device=device)
    target[3] = -100
    loss = torch.full((7,), float("nan"), device=device)
    grad = logits.clone()
    _row_kernels(backend).cross_entropy_rows(grad, target, loss, torch.tensor([0.5], device=device), -100, 0.0, True,
                                             softcap)
    z, slope = logits.double(), 1.0
    if softcap:
        z, slope = softcap * torch.tanh(z / softcap), 1 - torch.tanh(z / softcap) ** 2
    expected_loss = F.cross_entropy(z, target, reduction="none")
    expected_grad = (z.softmax(-1) - F.one_hot(target.clamp(min=0), vocab)) * 0.5 * slope
    expected_grad[3] = 0
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tol, atol=tol)


@pytest.mark.simt
@pytest.mark.parametrize("softcap", [-1.0, math.inf, math.nan])
def test_cuda_row_kernel_refuses_a_bad_softcap(softcap):
    """The C++ launcher checks the cap again (0 is none): a bad one is an error naming the kernel."""
    from llmkern.cuda import fused_linear_cross_entropy as kernels

    logits, loss = torch.randn(2, 9), torch.empty(2)
    with pytest.raises(RuntimeError, match="fused_linear_cross_entropy_rows"):
        kernels.cross_entropy_rows(logits, torch.zeros(2, dtype=torch.long), loss, torch.ones(1), -100, 0.0, True,
                                   softcap)


@pytest.mark.simt
def test_cuda_row_kernel_does_not_depend_on_the_schedule():
    """In the emulator, threads and blocks in other orders give the same bits (a race would not)."""
    import simt

    from llmkern.cuda import fused_linear_cross_entropy as kernels

    logits = torch.randn(5, 1001).half()
    target = torch.randint(0, 1001, (5,))
    results = []
    for order in ("forward", "reverse", "random:3"):
        loss, grad = torch.full((5,), float("nan")), logits.clone()
        with simt.schedule(order):
            kernels.cross_entropy_rows(grad, target, loss, torch.tensor([0.25]), -100, 0.1, True)
        results.append((loss, grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
def test_weight_gradient_accumulator(dtype):
    """fp32 acc += a @ b over chunks, a transposed as in use: in cuBLAS where torch allows it (GPU),
    else one 16-bit rounding per product; either way within twice the error of torch's own product."""
    a = torch.randn(40, 33, device=DEVICE).to(dtype).t()
    b = torch.randn(40, 17, device=DEVICE).to(dtype)
    acc = torch.ones(33, 17, device=DEVICE)
    for _ in range(3):
        chunks._accumulate_product(acc, a, b)
    truth = 1 + 3 * (a.double() @ b.double())
    assert_close_to_ref(acc, truth, 1 + 3 * (a @ b).double(), f"{dtype} accumulator", atol=1e-5)


def test_float16_accumulator_takes_products_past_float16s_range():
    """A float16 chunk's dlogits are those of the summed row losses (entries up to 1), so its product with
    x may pass float16's 65504: it must reach the fp32 accumulator whole, not as inf."""
    a = torch.full((3000, 2), 0.5, device=DEVICE).half().t()  # dlogits^T of 3000 rows
    b = torch.full((3000, 4), 50.0, device=DEVICE).half()
    acc = torch.zeros(2, 4, device=DEVICE)
    chunks._accumulate_product(acc, a, b)
    assert torch.equal(acc, torch.full((2, 4), 75000.0, device=DEVICE))


def test_auto_on_cpu_is_the_torch_reference():
    x, weight, target, _ = _make(10, 33, 8, torch.float32, device="cpu")
    got = flce(x, weight, target, backend="auto")
    assert torch.equal(got, F.cross_entropy(x @ weight.T, target))
    x64 = x.double()
    torch.testing.assert_close(flce(x64, weight.double(), target, backend="torch"),
                               F.cross_entropy(x64 @ weight.double().T, target))


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias, backend, device):
    x, weight, target, bias = _make(6, 24, 8, torch.float32, with_bias=with_bias, n_ignored=1, device=device)
    for t in (x, weight, bias):
        if t is not None:
            t.requires_grad_(True)
    for num_classes, softcap in ((24, 0.0), (19, 2.0)):  # all rows are classes; five padding rows and a cap
        target = target.clamp(max=num_classes - 1)
        args = (x, weight, target, bias, -100, "mean", 0.0, softcap, True, True, with_bias, 4, num_classes, backend)
        torch.library.opcheck(torch.ops.llmkern.fused_linear_cross_entropy.default, args)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["no-cap", "cap"])
def test_compile_fullgraph_has_no_graph_break(backend, device, softcap):
    """The fake kernel lets torch.compile trace the op (aot_eager on a CPU, inductor on a GPU)."""
    compiler = "inductor" if device == "cuda" else "aot_eager"

    def head_loss(x, w, t):
        return flce(torch.tanh(x), w, t, backend=backend, chunk_rows=5, softcap=softcap) * 2

    x, weight, target, _ = _make(12, 40, 16, torch.float32, device=device)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    compiled = torch.compile(head_loss, fullgraph=True, backend=compiler)
    loss = compiled(x, weight, target)
    loss.backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    logits = torch.tanh(x_ref) @ w_ref.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    expected = F.cross_entropy(logits, target) * 2
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


# --- the model's fused loss path ------------------------------------------------------------


def _tiny_gpt(backend, fused_loss):
    # vocab 300 is padded to 320: the fused path must leave the padding rows out.
    # Heads of 32, a size the Triton attention runs.
    config = GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=64, backend=backend,
                       fused_loss=fused_loss)
    return GPT(config).to(DEVICE)


def test_model_fused_loss_matches_the_plain_loss():
    fused = _tiny_gpt("triton", True)
    plain = _tiny_gpt("triton", False)  # the same kernels everywhere else: only the loss path differs
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 300, (2, 16), device=DEVICE)
    targets = torch.randint(0, 300, (2, 16), device=DEVICE)
    targets[0, :3] = -1
    logits, loss = fused(idx, targets)
    ref_logits, ref_loss = plain(idx, targets)
    assert logits is None  # the point: the logits were never made
    # The op takes the whole padded head (num_classes): no slice of it whose backward would zero-fill
    # and copy a second head-sized gradient.
    from test_model import autograd_nodes

    assert "SliceBackward0" not in {type(node).__name__ for node in autograd_nodes(loss)}
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Without targets the logits are there, cut to the real vocabulary.
    assert fused(idx)[0].shape == (2, 16, 300)


def _tiny_gemma2(fused_loss):
    """Gemma 2's head and loss in small: tied embeddings, scaled embeddings, sandwich norms, GeGLU, both soft
    caps. Vocab 300 is padded to 320. The embedding (the head) is sharpened so that the logits, ~4, pass
    the cap of 2 and the cap changes the loss."""
    config = GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=64, norm="rmsnorm",
                       pos="rope", mlp="geglu", bias=False, tie_embeddings=True, post_norms=True, embed_scale=8.0,
                       attn_softcap=50.0, logit_softcap=2.0, backend="triton", fused_loss=fused_loss)
    model = GPT(config).to(DEVICE)
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    return model


def test_model_fused_loss_with_a_logit_softcap_matches_the_plain_loss():
    """A capped model takes the fused path (it used to fall back to the full logits) with the same loss and
    gradients as the plain path, which caps the full logits."""
    fused = _tiny_gemma2(True)
    plain = _tiny_gemma2(False)
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 300, (2, 16), device=DEVICE)
    targets = torch.randint(0, 300, (2, 16), device=DEVICE)
    targets[1, -4:] = -1
    logits, loss = fused(idx, targets)
    ref_logits, ref_loss = plain(idx, targets)
    assert logits is None and ref_logits is not None  # the fused path ran, and the plain one
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    uncapped_loss = F.cross_entropy(fused.lm_head(fused.hidden_states(idx)).flatten(0, 1)[:, :300].float(),
                                    targets.flatten(), ignore_index=-1)
    assert abs(uncapped_loss.item() - loss.item()) > 0.1  # the cap matters here


def test_model_unfused_when_asked_or_on_the_torch_backend():
    idx = torch.randint(0, 300, (1, 8), device=DEVICE)
    for backend, fused_loss in (("triton", False), ("torch", True)):
        logits, loss = _tiny_gpt(backend, fused_loss)(idx, idx)
        assert logits is not None and logits.shape == (1, 8, 300) and loss.ndim == 0


def test_config_flag_is_typed():
    with pytest.raises(TypeError, match="fused_loss"):
        GPTConfig(fused_loss="yes")


# --- bad input ----------------------------------------------------------------------------


def _good():
    return dict(x=torch.randn(4, 8), weight=torch.randn(10, 8), target=torch.randint(0, 10, (4,)))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.randn(4, 8).int()), TypeError, "x must have dtype"),
        (dict(x=torch.randn(8)), ValueError, "x must be"),
        (dict(weight=torch.randn(10, 9)), ValueError, "weight must be"),
        (dict(weight=torch.randn(10, 8).half()), TypeError, "weight must have x's dtype"),
        (dict(target=torch.zeros(4)), TypeError, "target must hold int64"),
        (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, "target must have shape"),
        (dict(bias=torch.randn(9)), ValueError, "bias must have shape"),
        (dict(bias=torch.randn(10).double()), TypeError, "bias must"),
        (dict(reduction="none"), ValueError, "reduction must be one of"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
        (dict(ignore_index=1.0), TypeError, "ignore_index must be an int"),
        (dict(ignore_index=2**63), ValueError, "ignore_index must fit in int64"),
        (dict(chunk_rows=0), ValueError, "chunk_rows must be >= 1"),
        (dict(num_classes=11), ValueError, r"num_classes must be in \[1, 10\]"),
        (dict(num_classes=0), ValueError, "num_classes must be in"),
        (dict(num_classes=5.0), TypeError, "num_classes must be an int"),
        ({"softcap": -30.0}, ValueError, "softcap must be a finite number > 0"),
        ({"softcap": math.inf}, ValueError, "softcap must be a finite number > 0"),
        ({"softcap": math.nan}, ValueError, "softcap must be a finite number > 0"),
        # the kernels take the cap in fp32: past its range the triton and torch losses were NaN, and a cap that
        # rounds to 0 there was silently no cap on cuda
        ({"softcap": 1e39}, ValueError, "softcap must be finite in float32"),
        ({"softcap": 1e-46}, ValueError, "softcap must be finite in float32"),
        ({"softcap": "30"}, TypeError, "softcap must be a float"),
        ({"softcap": True}, TypeError, "softcap must be a float"),
        (dict(backend="cuda"), ValueError, "backend='cuda' cannot run"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(change, error, match):
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        flce(**args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_numpy_scalars_are_taken_as_python_numbers(backend):
    """ignore_index, label_smoothing, chunk_rows and num_classes from a config read with NumPy were refused."""
    np = pytest.importorskip("numpy")
    good = _good()
    good["target"][1] = 9  # the ignored row: not a class once num_classes is 9
    want = flce(**good, ignore_index=9, label_smoothing=0.1, chunk_rows=3, num_classes=9, backend=backend)
    got = flce(**good, ignore_index=np.int64(9), label_smoothing=np.float32(0.1), chunk_rows=np.int32(3),
               num_classes=np.int64(9), backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # float32(0.1) is not 0.1 exactly
    for bad in (dict(chunk_rows=np.float64(3.0)), dict(num_classes=np.bool_(True)), dict(label_smoothing=True)):
        with pytest.raises(TypeError, match=f"{next(iter(bad))} must be"):
            flce(**good, **bad, backend=backend)


def test_float64_on_triton_is_refused():
    good = _good()
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 for the triton backend"):
        flce(good["x"].double(), good["weight"].double(), good["target"], backend="triton")


@pytest.mark.cuda
def test_tensors_on_different_devices():
    good = _good()
    with pytest.raises(ValueError, match="one device"):
        flce(good["x"].cuda(), good["weight"], good["target"].cuda())


# --- GPU only -------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("n,vocab,hidden", [(17, 1001, 64), (123, 50257, 128), (4097, 50304, 768)])
def test_gpu_matches_reference(n, vocab, hidden, dtype):
    _check(n, vocab, hidden, dtype, with_bias=True, n_ignored=n // 7)
    _check(n, vocab, hidden, dtype, n_ignored=n // 7, chunk_rows=max(1, n // 3), label_smoothing=0.1)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bfloat16", "float16", "float32"])
def test_gpu_softcap_matches_reference(dtype, backend):
    """Gemma 2's cap (30) and a tight one on a GPT-2-sized head: the GPU's exp and tanh, and whole blocks."""
    _check(123, 50257, 128, dtype, with_bias=True, n_ignored=17, backend=backend, softcap=30.0)
    _check(123, 50257, 128, dtype, n_ignored=17, chunk_rows=41, label_smoothing=0.1, backend=backend, softcap=SOFTCAP)


@pytest.mark.cuda
def test_gpu_peak_memory_stays_below_the_logits():
    """GPT-2's head at 8192 rows: the bf16 logits alone would be 824 MB; the fused op never holds them."""
    n, vocab, hidden = 8192, 50304, 768
    x, weight, target, _ = _make(n, vocab, hidden, torch.bfloat16)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    flce(x, weight, target).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    logits_bytes = n * vocab * 2
    assert extra < logits_bytes, f"peak {extra / 2**20:.0f} MiB above the inputs; logits: {logits_bytes / 2**20:.0f} MiB"


@pytest.mark.cuda
def test_gpu_model_fused_loss_under_bf16_autocast():
    fused = _tiny_gpt("triton", True)
    plain = _tiny_gpt("torch", False)
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 300, (4, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = fused(idx, idx)
        _, ref_loss = plain(idx, idx)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        scale = q.grad.abs().max().item() + 1e-6
        assert (p.grad - q.grad).abs().max().item() <= 5e-2 * scale, name


def test_triton_kernel_builds_for_sm80_and_sm90():
    """The interpreter never lowers the kernel; this builds its GPU code (see triton_build.py). Built
    as the JIT builds a launch on an aligned logits buffer with a class count that is no multiple of
    8 (GPT-2's 50257), the logits must still move 16 bytes at a time: only the tail block past the
    last whole one may take 2-byte accesses (a load masked at an odd bound cannot be vectorized)."""
    pytest.importorskip("triton.backends.nvidia")
    from triton_build import run_build

    out = run_build('''
    from llmkern.triton import fused_linear_cross_entropy as k
    for arch in (80, 90):
        for grad in (True, False):
            for cap in (False, True):
                ptx = build(k._cross_entropy_rows_kernel, {"LOGITS": "*bf16", "TARGET": "*i64", "LOSS": "*fp32",
                                                           "GRAD_SCALE": "*fp32", "logits_stride": "i32",
                                                           "n_classes": "i32", "ignore_index": "i32",
                                                           "label_smoothing": "fp32", "softcap": "fp32"},
                            {"COMPUTE_GRAD": grad, "HAS_SOFTCAP": cap, "BLOCK": 4096}, arch,
                            ["LOGITS", "LOSS", "GRAD_SCALE", "logits_stride"], num_warps=8)
                print(arch, grad, ptx.count("ld.global.v4.b32"), ptx.count("st.global.v4.b32"))
    ''')
    counts = [line.split() for line in out.splitlines()]
    assert len(counts) == 8, out  # the capped kernels move the logits as the plain ones do
    for arch, grad, loads, stores in counts:
        # 4096 columns over 256 threads: 16 bf16 a thread, two 16-byte packs, in each pass over whole blocks.
        assert int(loads) == (4 if grad == "True" else 2), (arch, grad, loads)
        assert int(stores) == (2 if grad == "True" else 0), (arch, grad, stores)


def test_triton_kernel_reads_the_target_logit_before_overwriting_the_row():
    """Every thread loads the target's logit, then pass 2 overwrites the row with gradients from
    whichever warp owns each column: on a GPU only a CTA barrier between the two orders one warp's
    load before another's store (the interpreter runs programs and warps in turn, so it can't
    show the race). In the built code a bar.sync must sit between the loss store (32-bit, after
    the target load it depends on) and the first 16-bit gradient store."""
    pytest.importorskip("triton.backends.nvidia")
    from triton_build import run_build

    out = run_build('''
    from llmkern.triton import fused_linear_cross_entropy as k
    for arch in (80, 90):
        for cap in (False, True):  # the capped kernel reads the target's logit and caps it before the barrier too
            ptx = build(k._cross_entropy_rows_kernel, {"LOGITS": "*bf16", "TARGET": "*i64", "LOSS": "*fp32",
                                                       "GRAD_SCALE": "*fp32", "logits_stride": "i32",
                                                       "n_classes": "i32", "ignore_index": "i32",
                                                       "label_smoothing": "fp32", "softcap": "fp32"},
                        {"COMPUTE_GRAD": True, "HAS_SOFTCAP": cap, "BLOCK": 4096}, arch, num_warps=8)
            after_loss = ptx[ptx.index("st.global.b32"):]
            print(arch, cap, "bar.sync" in after_loss[:after_loss.index("st.global.b16")])
    ''')
    assert out.split() == ["80", "False", "True", "80", "True", "True", "90", "False", "True", "90", "True", "True"], out


def test_fake_kernel_strides_match_for_a_transposed_weight():
    """A weight stored transposed (an (H, V) parameter used as .T) gets a contiguous gradient from
    the op; the fake kernel must say so, or torch.compile plans for strides that never come."""
    from llmkern.ops.fused_linear_cross_entropy import _fused_linear_cross_entropy_op as op

    x, weight, target, bias = _make(5, 9, 4, torch.float32, with_bias=True)
    weight = weight.T.contiguous().T.requires_grad_(True)  # (V, H) with strides (1, V)
    bias = bias[::1].requires_grad_(True)
    args = (x.requires_grad_(True), weight, target, bias, -100, "mean", 0.0, 0.0, True, True, True, 0, 9, "triton")
    torch.library.opcheck(op.op, args)


def test_double_backward_is_a_clear_error():
    """The gradients are computed in the forward for d loss = 1, so they have no graph of their own:
    differentiating them again must raise, not give zeros."""
    x, weight, target, _ = _make(5, 9, 4, torch.float32)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    loss = flce(x, weight, target, backend="triton")
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="fused_linear_cross_entropy"):
        torch.autograd.grad(grad_x.pow(2).sum(), weight)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_casts_x_before_checking_the_weight_dtype(backend):
    """Under autocast an fp32 x is cast to the autocast dtype first, so a weight already in that
    dtype (a bf16 model fed by an fp32 norm) is accepted, as F.linear accepts it."""
    x, weight, target, _ = _make(6, 9, 4, torch.float32)
    weight = weight.to(torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = flce(x, weight, target, backend=backend)
    expected = reference.fused_linear_cross_entropy(x.to(torch.bfloat16), weight, target)
    torch.testing.assert_close(loss.float(), expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("vocab,banned", [(9, [5]), (4100, list(range(4096)))], ids=["one", "a-whole-block"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["no-cap", "cap"])
def test_classes_banned_with_a_bias_of_minus_inf(backend, device, vocab, banned, softcap):
    """A bias of -inf bans classes (their logits are -inf): the loss and gradients stay finite, as
    F.cross_entropy's (0 * inf in the smoothing term, and exp(-inf - -inf) in the running max, were NaN).
    With a cap a banned logit is worth -softcap, as in the reference, which caps before the softmax, and its
    gradient is 0 (the cap's slope there)."""
    x, weight, _, _ = _make(6, vocab, 16, torch.float32, device=device)
    bias = torch.zeros(vocab, device=device)
    bias[banned] = -math.inf
    allowed = [c for c in range(vocab) if c not in set(banned)]
    target = torch.tensor([allowed[i % len(allowed)] for i in range(6)], device=device)
    ours = lambda x, w, t, b: flce(x, w, t, bias=b, backend=backend, chunk_rows=4, softcap=softcap)  # noqa: E731
    ref = lambda x, w, t, b: reference.fused_linear_cross_entropy(x, w, t, b, softcap=softcap)  # noqa: E731
    loss, grads = _loss_and_grads(ours, x, weight, target, bias)
    loss64, grads64 = _loss_and_grads(ref, x.double(), weight.double(), target, bias.double())
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads[:2])
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[:2], grads64[:2]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
