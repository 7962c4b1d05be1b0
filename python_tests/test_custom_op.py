"""CustomOp: eager calls on plain tensors run the implementation directly (under a plain
autograd.Function when the op has a backward), everything else the registered custom op; the two
give the same numbers (the same kernels run), and eager calls really do skip the custom op.

Run with the triton backend: in the interpreter on a CPU, on the GPU where there is one."""

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import llmkern.ops as ops
from llmkern.ops._custom_op import CustomOp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


_THETA = torch.arange(9.0)[:, None] * torch.linspace(0.1, 1.0, 8)[None, :]
ROPE_ANGLES = (_THETA.cos().to(DEVICE), _THETA.sin().to(DEVICE))  # (S=9, D/2=8), fixed: not an input


# op name: (module of llmkern.ops, the CustomOp's name there, the inputs of a call of the public op
# that reaches it, and the public call itself)
CASES = {
    "rms_norm": ("rms_norm", "_rms_norm_op",
                 lambda: (_t(3, 5, 40), _t(40), _t(3, 5, 40)),
                 lambda x, w, r: ops.rms_norm(x, w, residual=r, backend="triton")),
    "layer_norm": ("layer_norm", "_layer_norm_op",
                   lambda: (_t(7, 33), _t(33), _t(33)),
                   lambda x, w, b: ops.layer_norm(x, w, b, backend="triton")),
    "swiglu": ("swiglu", "_swiglu_op",
               lambda: (_t(6, 24), _t(6, 24)),
               lambda g, u: ops.swiglu(g, u, backend="triton")),
    "geglu": ("geglu", "_geglu_op",
              lambda: (_t(6, 24), _t(6, 24)),
              lambda g, u: ops.geglu(g, u, backend="triton")),
    "rope": ("rope", "_rope_op",
             lambda: (_t(2, 3, 9, 16),),
             lambda x: ops.rope(x, *ROPE_ANGLES, backend="triton")),
    "attention": ("attention", "_attention_fwd_op",
                  lambda: (_t(1, 2, 19, 32, dtype=torch.float16), _t(1, 2, 19, 32, dtype=torch.float16),
                           _t(1, 2, 19, 32, dtype=torch.float16)),
                  lambda q, k, v: ops.attention(q, k, v, backend="triton")),
    "fused_linear_cross_entropy": ("fused_linear_cross_entropy", "_fused_linear_cross_entropy_op",
                                   lambda: (_t(10, 16), _t(37, 16)),
                                   lambda x, w: ops.fused_linear_cross_entropy(
                                       x, w, torch.randint(0, 37, (10,), generator=torch.Generator().manual_seed(1))
                                       .to(DEVICE), backend="triton")),
}


def _custom_op(name):
    module_name, attr, _, _ = CASES[name]
    return getattr(importlib.import_module(f"llmkern.ops.{module_name}"), attr)


def _run(call, inputs):
    """The public op's output and the gradients of its inputs, for a fixed random output gradient."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = call(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    torch.manual_seed(2)
    out.backward(torch.randn_like(out))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("name", sorted(CASES))
def test_eager_calls_take_the_function_and_match_the_custom_op(name, monkeypatch):
    custom_op = _custom_op(name)
    _, _, make_inputs, call = CASES[name]
    inputs = make_inputs()
    through_op = []
    real_op = custom_op.op

    def spy(*args):
        through_op.append(args)
        return real_op(*args)

    monkeypatch.setattr(custom_op, "op", spy)
    backward_ops = [op for op in vars(importlib.import_module(f"llmkern.ops.{CASES[name][0]}")).values()
                    if isinstance(op, CustomOp) and op is not custom_op]
    for op in backward_ops:  # the gradient ops (rope's is itself)
        monkeypatch.setattr(op, "op", lambda *args: pytest.fail("an eager backward went through the custom op"))
    eager = _run(call, inputs)
    assert not through_op, "an eager call on plain tensors went through the custom op"
    monkeypatch.undo()
    monkeypatch.setattr(custom_op, "op", spy)
    monkeypatch.setattr(custom_op, "_function", None)  # now only the custom op can run it
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    custom = _run(call, inputs)
    assert through_op
    for a, b in zip(eager, custom, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_calls_without_grad_mode_run_the_implementation_bare(name, monkeypatch):
    """Under no_grad or inference_mode (generation) there is no graph to record: the implementation runs
    with no autograd.Function around it (its ctx and saved tensors were host time for nothing)."""
    custom_op = _custom_op(name)
    _, _, make_inputs, call = CASES[name]
    inputs = make_inputs()
    expected = call(*inputs)
    monkeypatch.setattr(custom_op, "op", lambda *args: pytest.fail("went through the custom op"))
    monkeypatch.setattr(custom_op._function, "apply", lambda *args: pytest.fail("went through the Function"))
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = call(*inputs)
        for a, b in zip(got if isinstance(got, tuple) else [got], expected if isinstance(expected, tuple) else [expected],
                        strict=True):
            assert torch.equal(a, b) and a.grad_fn is None


@pytest.mark.parametrize("name", ["rms_norm", "attention"])
def test_fake_tensors_take_the_custom_op_and_its_fake_kernel(name):
    _, _, make_inputs, call = CASES[name]
    inputs = make_inputs()
    expected = call(*inputs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = call(*(mode.from_tensor(t) for t in inputs))
    expected = expected[0] if isinstance(expected, tuple) else expected
    fake = fake[0] if isinstance(fake, tuple) else fake
    assert fake.shape == expected.shape and fake.dtype == expected.dtype


def test_a_gradient_op_under_grad_mode_takes_the_custom_op_which_refuses_a_backward():
    # the gradient ops have no backward of their own: differentiating one (a double backward) must be
    # an error, as the registered op makes it, not a silently constant result
    rms_norm_module = importlib.import_module("llmkern.ops.rms_norm")
    dy, h, w = _t(4, 24, dtype=torch.float32), _t(4, 24), _t(24)
    h.requires_grad_()
    with torch.no_grad():
        dh_plain, dw_plain = rms_norm_module._rms_norm_backward_op(dy, h, w, None, 1e-6, "triton")
    dh, dw = rms_norm_module._rms_norm_backward_op(dy, h, w, None, 1e-6, "triton")
    assert torch.equal(dh.detach(), dh_plain) and torch.equal(dw.detach(), dw_plain)
    with pytest.raises(RuntimeError, match="autograd"):
        dh.sum().backward()
