"""The feed-forward half of a transformer block: GELU (GPT-2), SwiGLU (Llama) or GeGLU (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.geglu import geglu
from ..ops.swiglu import swiglu
from ._dispatch import module_backend, op_backend


class GeluMLP(nn.Module):
    """proj(gelu(fc(x))), GPT-2's MLP (tanh-approximated GELU, as GPT-2 was trained)."""

    def __init__(self, n_embd: int, hidden: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class GatedMLP(nn.Module):
    """proj(act(gate(x)) * up(x)), with gate and up fused in one linear layer: SwiGLU (activation "silu", Llama's)
    or GeGLU ("gelu_tanh", Gemma's tanh-approximated GELU). Both have the same parameters (gate_up, proj), so
    checkpoints and LoRA targets look alike."""

    ACTIVATIONS = ("silu", "gelu_tanh")

    def __init__(
        self, n_embd: int, hidden: int, bias: bool = False, dropout: float = 0.0, backend: str | None = None,
        activation: str = "silu",
    ):
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"activation must be one of {self.ACTIVATIONS}, got {activation!r}")
        self.hidden = hidden
        self.activation = activation
        self.backend = module_backend(backend)
        self.gate_up = nn.Linear(n_embd, 2 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)  # two views, (B, T, hidden) each
        if self.activation == "silu":
            y = swiglu(gate, up, backend=op_backend("swiglu", self.backend, x.device))
        else:
            y = geglu(gate, up, backend=op_backend("geglu", self.backend, x.device))
        return self.dropout(self.proj(y))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class SwiGLUMLP(GatedMLP):
    """proj(silu(gate(x)) * up(x)): the GatedMLP of Llama's activation."""

    def __init__(
        self, n_embd: int, hidden: int, bias: bool = False, dropout: float = 0.0, backend: str | None = None
    ):
        super().__init__(n_embd, hidden, bias, dropout, backend, activation="silu")
