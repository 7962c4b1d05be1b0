"""llmkern's custom ops, called eagerly without torch.library's Python layers.

Each kernel-backed op is a torch.library custom op with a fake kernel (and, for the ops a user
calls, an autograd formula), so torch.compile traces it as one node. Called eagerly, such an op
passes through several Python layers of torch.library on its way in and out (argument
re-packing, a redispatch below autograd, a generated autograd.Function): an RMSNorm forward and
backward with no-op kernels took 110 us of host time that way and 66 us through a plain
torch.autograd.Function running the same implementation, setup_context and backward
(benchmarks/NOTES_train.md), and a GPT-2 step makes ~37 such calls. So a
CustomOp sends eager calls on plain tensors straight to its implementation (under such a
Function when it has a backward), and the rest to the registered op: whatever torch.compile
traces, and tensor subclasses (FakeTensor, DTensor) that need its fake kernel or its dispatch.
"""

from __future__ import annotations

import torch


class CustomOp:
    """The custom op `name` ("namespace::op") made of impl and its fake kernel, differentiable
    when setup_context(ctx, inputs, output) and backward(ctx, *grads) (torch.library's) are given."""

    def __init__(self, name: str, impl, fake, setup_context=None, backward=None):
        op = torch.library.custom_op(name, impl, mutates_args=())
        op.register_fake(fake)
        namespace, op_name = name.split("::")
        self.op = getattr(getattr(torch.ops, namespace), op_name)
        self._impl = impl
        self._function = None
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)

            def forward(ctx, *inputs):
                output = impl(*inputs)
                setup_context(ctx, inputs, output)
                return output

            self._function = type(f"{op_name}_eager", (torch.autograd.Function,),
                                  {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *inputs):
        if torch.compiler.is_compiling() or type(inputs[0]) is not torch.Tensor:
            return self.op(*inputs)
        if torch.is_grad_enabled():
            # with a backward, under the plain Function; without one (a gradient op, called in a backward
            # pass, where grad mode is off), only the registered op says that it cannot be differentiated
            return self.op(*inputs) if self._function is None else self._function.apply(*inputs)
        return self._impl(*inputs)  # no graph to record (inference, generation, a backward pass)
