"""The cos/sin tables of rotary position embeddings, computed once per model and device."""

from __future__ import annotations

import math

import torch
from torch import nn

LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
LONGROPE_SCALING_KEYS = ("short_factor", "long_factor", "original_max_position_embeddings", "attention_factor")
LINEAR_SCALING_KEYS = ("factor",)
_SCALING_KEYS = {"llama3": LLAMA3_SCALING_KEYS, "longrope": LONGROPE_SCALING_KEYS, "linear": LINEAR_SCALING_KEYS}


def check_rope_scaling(scaling: object, head_dim: int, rope_dim: int | None = None) -> None:
    """None, or a RoPE scaling of heads head_dim wide, RoPE turning all of each head or its first rope_dim dims
    (the rotary width), as Hugging Face's config.json spells it:

    - Llama 3.1's {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings"} (see llama3_inv_freq);
    - Phi-3's LongRoPE (Phi-3-mini-128k, Phi-3.5-mini) {"rope_type": "longrope", "short_factor", "long_factor"
      (rotary width / 2 numbers each: one per frequency), "original_max_position_embeddings", "attention_factor"}.
      As Hugging Face does, each forward pass takes long_factor for a sequence longer than
      original_max_position_embeddings, short_factor otherwise, its length being the last position + 1 (over
      the whole batch; in a cached decode step, every token so far): see RotaryCache.forward. A model whose
      block_size is at most original_max_position_embeddings only ever takes short_factor;
    - {"rope_type": "linear", "factor"} (Gemma 3's global layers' 8): positions divided by factor, every
      frequency slowed alike. Any finite factor > 0: transformers only warns below 1, and computes it.
    """
    if scaling is None:
        return
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in _SCALING_KEYS:
        raise ValueError(f"rope_scaling must be None or a dict with rope_type 'llama3', 'longrope' or 'linear', "
                         f"got {scaling!r}")
    keys = _SCALING_KEYS[kind]
    unknown = sorted(set(scaling) - {"rope_type", *keys}, key=str)
    missing = [k for k in keys if k not in scaling]
    if unknown or missing:
        raise ValueError(f"rope_scaling: {kind} scaling takes {keys}; missing {missing}, unknown {unknown}")
    if kind == "llama3":
        _check_llama3(scaling)
    elif kind == "linear":
        _check_positive_number("factor", scaling["factor"])
    elif rope_dim is None:
        _check_longrope(scaling, "head_dim", head_dim)
    else:
        _check_longrope(scaling, "rope_dim", rope_dim)


def check_rope_dim(rope_dim: object, head_dim: int) -> None:
    """None (RoPE on all of each head), or an even rope_dim from 2 to head_dim: RoPE on each head's first
    rope_dim dims, the others left as they are."""
    if rope_dim is None:
        return
    if isinstance(rope_dim, bool) or not isinstance(rope_dim, int):
        raise TypeError(f"rope_dim must be an int or None, got {rope_dim!r}")
    if not 2 <= rope_dim <= head_dim or rope_dim % 2 != 0:
        raise ValueError(f"rope_dim must be an even number from 2 to head_dim ({head_dim}), or None for all of "
                         f"each head; got {rope_dim}")


def _check_positive_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"rope_scaling[{name!r}] must be a finite number > 0, got {value!r}")


def _check_llama3(scaling: dict) -> None:
    for k in LLAMA3_SCALING_KEYS:
        _check_positive_number(k, scaling[k])
    if not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise ValueError(f"rope_scaling: low_freq_factor must be < high_freq_factor, got {scaling}")


def _check_longrope(scaling: dict, width_name: str, width: int) -> None:
    """width: the rotary width (named width_name in the errors), whose width / 2 frequencies the factors scale."""
    for k in ("short_factor", "long_factor"):
        factors = scaling[k]
        # a list, as JSON reads it: a tuple would make a config unequal to itself read back from a checkpoint
        if not isinstance(factors, list) or len(factors) != width // 2:
            got = f"{len(factors)} numbers" if isinstance(factors, list) else repr(factors)
            raise ValueError(f"rope_scaling[{k!r}] must be a list of {width_name} / 2 = {width // 2} numbers (one "
                             f"per frequency), got {got}")
        for i, factor in enumerate(factors):
            _check_positive_number(f"{k}[{i}]", factor)
    original = scaling["original_max_position_embeddings"]
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise ValueError(f"rope_scaling['original_max_position_embeddings'] must be an int >= 1, got {original!r}")
    _check_positive_number("attention_factor", scaling["attention_factor"])


def longrope_attention_factor(factor: float, original_context: int) -> float:
    """LongRoPE's scale of the cos and sin tables (so of q . k, twice) for a context stretched `factor` times
    past the original one, when config.json names none: sqrt(1 + ln(factor) / ln(original context)), 1 for
    no stretch. Hugging Face's factor for Phi-3 is max_position_embeddings / original_max_position_embeddings."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_context))


def longrope_factors(scaling: dict, seq_len: int) -> list[float]:
    """The per-frequency factors of a longrope scaling that Hugging Face takes in a forward pass over a
    sequence of seq_len tokens (its last position + 1): long_factor past original_max_position_embeddings,
    short_factor up to it."""
    return scaling["long_factor" if _takes_long_factor(scaling, seq_len) else "short_factor"]


def _takes_long_factor(scaling: dict, seq_len: int) -> bool:
    return seq_len > scaling["original_max_position_embeddings"]


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
    """cos and sin of the RoPE angles for positions 0 .. max_positions - 1, each (max_positions, R / 2), for
    RoPE on all of each head (R = head_dim) or on its first rope_dim dims (R = rope_dim, Phi-4-mini's 96 of 128).

    Pair i of the turned dims (x[i], x[i + R/2]) turns by angle position * theta ** (-2i / R). With `scaling`
    (check_rope_scaling), that frequency is stretched as llama3_inv_freq says, or, for longrope, divided by
    its own factor (longrope_factors) and both tables multiplied by attention_factor, or, for linear, divided by
    the one factor. The tables are fp32
    non-persistent buffers: rebuilt, not saved in checkpoints, and kept in fp32 when the model is cast to bf16
    (see _apply).

    A longrope scaling with max_positions past original_max_position_embeddings (O) keeps two pairs of tables,
    as Hugging Face keeps two sets of frequencies: cos and sin with long_factor, for all max_positions rows,
    and short_cos and short_sin with short_factor, for the O positions a sequence that takes them can reach
    (both scaled by attention_factor). forward picks one pair per call (see there). Otherwise short_cos and
    short_sin are None and cos and sin serve every call (with short_factor, for longrope).
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0, scaling: dict | None = None,
                 rope_dim: int | None = None):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        if max_positions < 0:
            raise ValueError(f"max_positions must be >= 0, got {max_positions}")
        if not theta > 0:  # theta ** (-2i / D) would be inf or NaN: tables of NaN, silently
            raise ValueError(f"theta must be > 0, got {theta}")
        check_rope_dim(rope_dim, head_dim)
        check_rope_scaling(scaling, head_dim, rope_dim)
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self.rope_dim = rope_dim
        cos, sin = self._tables(self.max_positions, None)  # on the default device (meta under torch.device("meta"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        short = self._short_context
        short_cos, short_sin = (None, None) if short is None else self._tables(short, None)
        self.register_buffer("short_cos", short_cos, persistent=False)
        self.register_buffer("short_sin", short_sin, persistent=False)

    @property
    def rotary_dim(self) -> int:
        """The dims of each head RoPE turns: rope_dim, or all head_dim."""
        return self.head_dim if self.rope_dim is None else self.rope_dim

    @property
    def _short_context(self) -> int | None:
        """original_max_position_embeddings, the rows of the short_factor tables, for a longrope scaling whose
        long_factor some sequence up to max_positions takes; None when there are no such tables."""
        if self.scaling is None or self.scaling["rope_type"] != "longrope":
            return None
        original = self.scaling["original_max_position_embeddings"]
        return original if _takes_long_factor(self.scaling, self.max_positions) else None

    def _tables(self, seq_len: int, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (seq_len, rotary_dim / 2) of positions 0 .. seq_len - 1, as a forward pass over seq_len
        tokens takes them (longrope's factors depend on it)."""
        # Angles in float64 so that large positions keep their precision, then stored in fp32.
        width = self.rotary_dim
        inv_freq = self.theta ** (-torch.arange(0, width, 2, dtype=torch.float64, device=device) / width)
        inv_freq, magnitude = self._scaled(inv_freq, seq_len)
        positions = torch.arange(seq_len, dtype=torch.float64, device=device)
        angles = torch.outer(positions, inv_freq)  # (seq_len, rotary_dim / 2)
        return (angles.cos() * magnitude).float(), (angles.sin() * magnitude).float()

    def _scaled(self, inv_freq: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, float]:
        """The frequencies as the scaling changes them for a sequence of seq_len tokens, and the factor the tables
        are multiplied by."""
        kind = None if self.scaling is None else self.scaling["rope_type"]
        if kind == "llama3":
            return llama3_inv_freq(inv_freq, self.scaling), 1.0
        if kind == "longrope":
            # attention_factor scales the short tables too: Hugging Face works it out once, from the context
            factors = torch.tensor(longrope_factors(self.scaling, seq_len), dtype=torch.float64,
                                   device=inv_freq.device)
            return inv_freq / factors, self.scaling["attention_factor"]
        if kind == "linear":  # position p turns as p / factor did
            return inv_freq / self.scaling["factor"], 1.0
        return inv_freq, 1.0

    def reset_tables(self) -> None:
        """Recompute the tables on their device (after to_empty() from the meta device, say)."""
        self.cos, self.sin = self._tables(self.max_positions, self.cos.device)
        if self.short_cos is not None:
            self.short_cos, self.short_sin = self._tables(self.short_cos.size(0), self.cos.device)

    def _apply(self, fn, recurse=True):
        # model.to(bf16) or .half() would round the tables, and to_empty() (from the meta device) leaves
        # them uninitialized, and load_state_dict does not fill them (not persistent): rebuild them in
        # fp32 on the new device, whatever fn did.
        super()._apply(fn, recurse)
        self.reset_tables()
        return self

    def forward(self, positions: torch.Tensor | None, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions 0 .. seq_len - 1, (S, R/2); or for explicit positions (B, S) -> (B, S, R/2),
        each in [0, max_positions) (see check_positions). R is rotary_dim.

        With short tables (a longrope context past original_max_position_embeddings, O), the call takes the long
        ones when its sequence is longer than O, the short ones otherwise, as Hugging Face's forward pass does:
        the sequence's length is seq_len without positions, max(positions) + 1 over the whole batch with them
        (so a cached decode step counts every token so far). Keys cached before a sequence grows past O keep the
        short_factor rotation they were cached with: llmkern.model.generate recomputes them at that step, as
        transformers' Phi3ForCausalLM.generate does, so that cached and uncached generation agree.
        """
        if positions is None:
            if not 0 <= seq_len <= self.max_positions:  # a slice would silently stop at the table's end
                raise ValueError(f"seq_len must be in [0, max_positions={self.max_positions}], got {seq_len}")
            if self.short_cos is not None and seq_len <= self.short_cos.size(0):
                return self.short_cos[:seq_len], self.short_sin[:seq_len]
            return self.cos[:seq_len], self.sin[:seq_len]
        positions = check_positions(positions, self.max_positions)
        if self.short_cos is None or positions.numel() == 0:
            return self.cos[positions], self.sin[positions]
        return self._longrope_rows(positions)

    def _longrope_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the long or the short tables at checked positions, by max(positions) + 1. The choice is a
        tensor, not a Python bool: no wait for the device, and no graph break under torch.compile. Both tables
        are read (a few rows each) and one kept."""
        original = self.short_cos.size(0)
        takes_long = positions.amax() >= original  # max(positions) + 1 > original
        # Clamped into the short tables, whose rows are read, and then dropped, when the long ones are taken.
        # (A position past max_positions stays in the long lookup, which fails on it as check_positions wants.)
        short = positions.clamp(max=original - 1)
        cos = torch.where(takes_long, self.cos[positions], self.short_cos[short])
        sin = torch.where(takes_long, self.sin[positions], self.short_sin[short])
        return cos, sin

    def extra_repr(self) -> str:
        scaling = "" if self.scaling is None else f", scaling={_scaling_repr(self.scaling, self.max_positions)}"
        rope_dim = "" if self.rope_dim is None else f", rope_dim={self.rope_dim}"
        return f"head_dim={self.head_dim}{rope_dim}, max_positions={self.max_positions}, theta={self.theta}{scaling}"


def _scaling_repr(scaling: dict, max_positions: int) -> str:
    """The scaling, its longrope factors (two lists of rotary_dim / 2 numbers) shortened to the names of those
    some sequence up to max_positions takes."""
    if scaling["rope_type"] != "longrope":
        return str(scaling)
    original = scaling["original_max_position_embeddings"]
    which = ("short_factor up to it, long_factor past it" if _takes_long_factor(scaling, max_positions)
             else "short_factor")
    return (f"longrope ({which}: original_max_position_embeddings={original}, "
            f"attention_factor={scaling['attention_factor']})")


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
