"""llmkern: fused CUDA and Triton kernels, a GPT model, a trainer and a data pipeline."""

__version__ = "0.1.0"

from ._backend import get_backend, set_backend  # noqa: E402
from . import ops  # noqa: E402  (registers the torch.library custom ops)
from . import nn  # noqa: E402
from . import optim  # noqa: E402

__all__ = ["__version__", "get_backend", "set_backend", "nn", "ops", "optim"]
