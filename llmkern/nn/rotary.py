"""The cos/sin tables of rotary position embeddings, computed once per model and device."""

from __future__ import annotations

import math

import torch
from torch import nn

LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling: object) -> None:
    """None, or Llama 3.1's frequency scaling as Hugging Face's config.json writes it: {"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}."""
    if scaling is None:
        return
    if not isinstance(scaling, dict) or scaling.get("rope_type") != "llama3":
        raise ValueError(f"rope_scaling must be None or a dict with rope_type 'llama3', got {scaling!r}")
    unknown = sorted(set(scaling) - {"rope_type", *LLAMA3_SCALING_KEYS})
    missing = [k for k in LLAMA3_SCALING_KEYS if k not in scaling]
    if unknown or missing:
        raise ValueError(f"rope_scaling: llama3 scaling takes {LLAMA3_SCALING_KEYS}; missing {missing}, unknown {unknown}")
    for k in LLAMA3_SCALING_KEYS:
        v = scaling[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise ValueError(f"rope_scaling[{k!r}] must be a finite number > 0, got {v!r}")
    if not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise ValueError(f"rope_scaling: low_freq_factor must be < high_freq_factor, got {scaling}")


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's stretch of the RoPE frequencies for a longer context: wavelengths longer than the original
    context / low_freq_factor are slowed by `factor`, those shorter than context / high_freq_factor kept,
    and the band between blended linearly in context / wavelength."""
    context = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    wavelength = 2 * math.pi / inv_freq
    blend = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: slowed, 1: kept
    return (1 - blend) * inv_freq / factor + blend * inv_freq


class RotaryCache(nn.Module):
    """cos and sin of the RoPE angles for positions 0 .. max_positions - 1, each (max_positions, head_dim / 2).

    Pair i of a head (x[i], x[i + D/2]) turns by angle position * theta ** (-2i / D) (with `scaling`, the
    frequency theta ** (-2i / D) is stretched as llama3_inv_freq says). The tables are fp32 non-persistent
    buffers: rebuilt, not saved in checkpoints, and kept in fp32 when the model is cast to bf16 (see _apply).
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        if max_positions < 0:
            raise ValueError(f"max_positions must be >= 0, got {max_positions}")
        if not theta > 0:  # theta ** (-2i / D) would be inf or NaN: tables of NaN, silently
            raise ValueError(f"theta must be > 0, got {theta}")
        check_rope_scaling(scaling)
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        cos, sin = self._tables(None)  # on the default device (meta under `with torch.device("meta")`)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float64 so that large positions keep their precision, then stored in fp32.
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim)
        if self.scaling is not None:
            inv_freq = llama3_inv_freq(inv_freq, self.scaling)
        positions = torch.arange(self.max_positions, dtype=torch.float64, device=device)
        angles = torch.outer(positions, inv_freq)  # (max_positions, head_dim / 2)
        return angles.cos().float(), angles.sin().float()

    def reset_tables(self) -> None:
        """Recompute the tables on their device (after to_empty() from the meta device, say)."""
        self.cos, self.sin = self._tables(self.cos.device)

    def _apply(self, fn, recurse=True):
        # model.to(bf16) or .half() would round the tables, and to_empty() (from the meta device) leaves
        # them uninitialized, and load_state_dict does not fill them (not persistent): rebuild them in
        # fp32 on the new device, whatever fn did.
        super()._apply(fn, recurse)
        self.reset_tables()
        return self

    def forward(self, positions: torch.Tensor | None, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions 0 .. seq_len - 1, (S, D/2); or for explicit positions (B, S) -> (B, S, D/2),
        each in [0, max_positions) (see check_positions)."""
        if positions is None:
            if not 0 <= seq_len <= self.max_positions:  # a slice would silently stop at the table's end
                raise ValueError(f"seq_len must be in [0, max_positions={self.max_positions}], got {seq_len}")
            return self.cos[:seq_len], self.sin[:seq_len]
        positions = check_positions(positions, self.max_positions)
        return self.cos[positions], self.sin[positions]

    def extra_repr(self) -> str:
        scaling = "" if self.scaling is None else f", scaling={self.scaling}"
        return f"head_dim={self.head_dim}, max_positions={self.max_positions}, theta={self.theta}{scaling}"


def check_positions(positions: object, max_positions: int) -> torch.Tensor:
    """positions, checked to index a table of max_positions rows: those < 0 sent past its end.

    Indexing wraps a negative position silently to the table's end (-1 is the last row), a plausible
    answer to a wrong input. The callers in llmkern make positions that cannot be negative (generate
    clamps the padding's to 0, which attention masks anyway; packed documents count from 0), so this
    guards the public API. On the CPU, where it costs nothing, any position outside [0, max_positions)
    is a ValueError. On a GPU a host check would wait for the device at every forward pass, so a
    negative position is instead sent past the table, where the lookup fails as one >= max_positions
    does (a device assert): an error, never a wrong row. (torch.compile also takes this branch.)
    """
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor of integer positions, got {type(positions).__name__}")
    if positions.dtype not in (torch.int64, torch.int32):
        # a bool (or uint8) tensor would index as a mask, selecting rows instead of looking them up
        raise TypeError(f"positions must hold int64 (or int32) positions; got {positions.dtype}")
    if positions.device.type == "cpu" and positions.numel() and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(positions))
        if low < 0 or high >= max_positions:
            raise ValueError(f"positions holds {low if low < 0 else high}; positions are in [0, {max_positions}) "
                             "(the tables' max_positions, the model's block_size)")
        return positions
    return positions.masked_fill(positions < 0, max_positions)
