"""Edge cases of the ops layer that cut across ops: stride-0 (expanded) inputs, and outputs that get no
gradient (which the backward must not zero-fill), checked on the kernel backends this machine runs
(Triton in its interpreter, CUDA in the simt emulator)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmkern import ops
from llmkern.ops import reference

# (backend, device): "cuda-simt" runs the CUDA kernels on CPU tensors in the emulator (python_tests/simt).
KERNELS = [
    pytest.param("triton", "cpu", id="triton"),
    pytest.param("cuda", "cpu", id="cuda-simt", marks=pytest.mark.simt),
]


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_takes_expanded_rows(backend, device, with_residual):
    """x (and residual) broadcast over the batch, stride 0 between rows, as x.expand gives it."""
    x = torch.randn(1, 40, device=device).expand(3, 40)
    weight = torch.randn(40, device=device)
    residual = torch.randn(40, device=device).expand(3, 40) if with_residual else None
    got = ops.rms_norm(x, weight, residual=residual, backend=backend)
    want = reference.rms_norm(x, weight, residual=residual)
    for g, w in zip(got if with_residual else (got,), want if with_residual else (want,)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_layer_norm_takes_expanded_rows(backend, device):
    x = torch.randn(1, 40, device=device).expand(3, 40)
    weight, bias = torch.randn(40, device=device), torch.randn(40, device=device)
    torch.testing.assert_close(ops.layer_norm(x, weight, bias, backend=backend), reference.layer_norm(x, weight, bias))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_swiglu_takes_expanded_rows_and_gradient(backend, device):
    gate = torch.randn(1, 40, device=device).expand(3, 40).requires_grad_()
    up = torch.randn(3, 40, device=device, requires_grad=True)
    y = ops.swiglu(gate, up, backend=backend)
    torch.testing.assert_close(y, reference.swiglu(gate, up))
    y.sum().backward()  # the output gradient of a sum is expanded too: stride 0 everywhere
    gate_ref, up_ref = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    reference.swiglu(gate_ref, up_ref).sum().backward()
    torch.testing.assert_close(up.grad, up_ref.grad)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_rope_takes_expanded_input(backend, device):
    x = torch.randn(1, 2, 5, 8, device=device).expand(3, 2, 5, 8)
    cos, sin = torch.randn(5, 4, device=device), torch.randn(5, 4, device=device)
    torch.testing.assert_close(ops.rope(x, cos, sin, backend=backend), reference.rope(x, cos, sin))


class _RecordOutputs(TorchDispatchMode):
    """Records (op, output shape) of every tensor-returning op run under it."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.outputs.append((str(func), tuple(out.shape)))
        return out


def _zero_fills_in_backward(loss: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    with _RecordOutputs() as recorded:
        loss.backward()
    return [(op, shape) for op, shape in recorded.outputs if "zero" in op or "fill" in op]


def test_fused_linear_cross_entropy_backward_zero_fills_nothing():
    """The op's extra outputs (the gradients it computes in the forward) never get a gradient: the backward
    must not zero-fill tensors of x's and weight's size for them, as autograd does by default for an output
    without one (a weight-sized buffer is 2 GB for a 128256 x 4096 fp32 head, the memory this op saves)."""
    x = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    target = torch.randint(0, 50, (6,))
    loss = ops.fused_linear_cross_entropy(x, weight, target, backend="triton")
    assert _zero_fills_in_backward(loss) == []
    x_ref, weight_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference.fused_linear_cross_entropy(x_ref, weight_ref, target).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(weight.grad, weight_ref.grad)


def test_attention_backward_zero_fills_nothing():
    """Nor attention's internal log-sum-exp output (B, H, S fp32)."""
    q, k, v = (torch.randn(1, 2, 5, 32, requires_grad=True) for _ in range(3))
    out = ops.attention(q, k, v, backend="triton")
    assert _zero_fills_in_backward(out.sum()) == []
    refs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    reference.attention(*refs).sum().backward()
    for t, ref in zip((q, k, v), refs):
        torch.testing.assert_close(t.grad, ref.grad)


def _norm(op: str):
    """rms_norm or layer_norm (with a bias) as f(x, weight, residual, backend) -> (y, h)."""
    if op == "rms_norm":
        return lambda x, w, r, backend: ops.rms_norm(x, w, residual=r, backend=backend)
    return lambda x, w, r, backend: ops.layer_norm(x, w, w * 0.5, residual=r, backend=backend)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("used", ["y", "h"])
def test_norm_with_one_output_unused_zero_fills_nothing(backend, device, op, used):
    """A pre-norm block's last norm uses y alone, and a norm whose y is unused leaves only h = x + residual:
    the backward then gets no gradient for the other output, and must not zero-fill one of x's size
    (and read it back) for it. The gradients are the reference's, None included (weight's, when y is unused)."""
    norm = _norm(op)
    inputs = [torch.randn(5, 24, device=device), torch.randn(24, device=device), torch.randn(5, 24, device=device)]
    grads = {}
    for name in (backend, "torch"):
        x, w, r = (t.clone().requires_grad_() for t in inputs)
        y, h = norm(x, w, r, name)
        out = y if used == "y" else h
        loss = (out * torch.linspace(-1, 1, 24, device=device)).sum()
        if name == backend:
            assert _zero_fills_in_backward(loss) == []
        else:
            loss.backward()
        grads[name] = [x.grad, w.grad, r.grad]
    for got, want in zip(grads[backend], grads["torch"]):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want)
