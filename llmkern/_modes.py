"""Switching a module to eval mode for a while."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """module.eval() inside the block; afterwards the mode it had (training or not), even on an error."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
