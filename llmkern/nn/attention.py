"""Causal self-attention with one fused QKV projection and grouped-query attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from ..ops import reference
from ..ops.attention import attention, fits_backend
from ..ops.rope import rope
from ._dispatch import module_backend, op_backend
from .rms_norm import RMSNorm
from .rotary import check_rope_dim


class CausalSelfAttention(nn.Module):
    """Multi-head (n_kv_head == n_head) or grouped-query (n_kv_head < n_head) causal attention.

    One linear layer makes q, k and v for all heads: its output (B, T, (H + 2 Hkv) * D) is
    viewed as (B, T, H + 2 Hkv, D) and q, k, v are slices of it transposed to (B, heads, T, D),
    views without a copy; llmkern.ops.attention takes such strided inputs. With QK-norm, q and k are the
    norms' outputs (copies) instead. D is n_embd / H unless head_dim says otherwise (Qwen3).
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        n_kv_head: int,
        bias: bool = True,
        dropout: float = 0.0,
        backend: str | None = None,
        layer_idx: int = 0,
        qkv_bias: bool | None = None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        rope_dim: int | None = None,
        window: int | None = None,
        scale: float | None = None,
        softcap: float | None = None,
    ):
        """bias: a bias on the output projection, and on the q/k/v one unless qkv_bias (None: as bias) says
        otherwise: Qwen2 has biases on q/k/v and none on the output.
        head_dim: each head's width; None: n_embd // n_head. q is n_head * head_dim wide (Qwen3's is wider than
        n_embd), and the output projection maps the heads back to n_embd.
        qk_norm: Qwen3's RMSNorm (eps norm_eps) over each head's q and k, before RoPE: q_norm and k_norm, each
        one (head_dim,) scale shared by its heads.
        rope_dim: RoPE on each head's first rope_dim dims of q and k only, the rest left as they are (Phi-4-mini's
        96 of 128); None: on all of head_dim. The rotary tables passed to forward are then rope_dim / 2 wide.
        window: sliding-window attention: each query sees only the last `window` keys up to its own (itself
        included; Mistral's sliding_window); None: all of them.
        scale: the softmax scale of q . k (Gemma 3's query_pre_attn_scalar ** -0.5); None: 1 / sqrt(head_dim).
        softcap: Gemma 2's soft cap of the scaled scores, s -> softcap * tanh(s / softcap) before the masks; None:
        none. Training's attention takes it to the Triton kernels (the CUDA ones have none: a module on a backend
        whose kernels cannot take it lets "auto" pick, Triton on a GPU, else the torch reference); generation's masked
        attention runs llmkern.ops.reference.attention with it, which holds the (B, H, T, Tk) fp32 scores."""
        super().__init__()
        for name, value in (("n_embd", n_embd), ("n_head", n_head), ("n_kv_head", n_kv_head)):
            _check_count(name, value)
        if head_dim is None:
            if n_embd % n_head != 0:
                raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head}), or head_dim given")
            head_dim = n_embd // n_head
        _check_count("head_dim", head_dim)
        if n_head % n_kv_head != 0:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        check_rope_dim(rope_dim, head_dim)
        _check_window(window)
        _check_scale(scale)
        _check_scale(softcap, "softcap")
        self.window = window
        self.scale = None if scale is None else float(scale)
        self.softcap = None if softcap is None else float(softcap)
        self.rope_dim = None if rope_dim == head_dim else rope_dim  # None: the whole head, one rope call
        self.backend = module_backend(backend)
        self.layer_idx = layer_idx  # which layer of a KV cache is ours
        if qkv_bias is not None and not isinstance(qkv_bias, bool):
            raise TypeError(f"qkv_bias must be a bool or None, got {qkv_bias!r}")
        if not isinstance(qk_norm, bool):
            raise TypeError(f"qk_norm must be a bool, got {qk_norm!r}")
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.qkv = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * head_dim, bias=qkv_bias)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps, backend=backend) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps, backend=backend) if qk_norm else None
        self.proj = nn.Linear(n_head * head_dim, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        cache=None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        rotary: (cos, sin) for RoPE, or None (learned positions are added before the blocks).
        attn_mask, cache: generation only (see llmkern.model.kv_cache): a boolean mask
            (B, 1, T, Tk) of the keys each query sees, and the KV cache that holds the keys and
            values of earlier steps.
        doc_ids: (B, T) document ids of packed rows: a token sees only its own document.
        """
        b, t, _ = x.shape
        h, hkv, d = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x).view(b, t, h + 2 * hkv, d)
        # Views by split, not by slicing: the backward of a split joins the views' gradients in one
        # cat, where each slice's would zero-fill a buffer of the whole and then add them up.
        qk, v = qkv.split([h + hkv, hkv], dim=2)  # (B, T, heads, D)
        if self.q_norm is not None:
            qk = self._norm_heads(qk)
        qk, v = qk.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if rotary is not None:
            qk = self._rotate(qk, rotary)
        q, k = qk.split([h, hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D)
        if cache is None and attn_mask is None:
            y = self._causal_attention(q, k, v, doc_ids)
        else:
            if doc_ids is not None:
                raise ValueError("doc_ids is for training on packed rows; generation masks with attn_mask")
            # The keys' columns (attn_mask's last dim): how many there are so far, and which one each key is
            # (None: key j is column j, all of them).
            total, key_columns = k.size(2), None
            if cache is not None:
                total = cache.length + t
                if attn_mask is not None and attn_mask.size(-1) != total:
                    raise ValueError(f"attn_mask must have a column per token so far ({cache.length} cached + {t} "
                                     f"new = {total}); got {tuple(attn_mask.shape)}")
                # A sliding layer's ring returns only the keys it kept, in slot order: their columns say which.
                key_columns = cache.key_columns(self.layer_idx, t, x.device)
                _check_cache_window(cache.windows[self.layer_idx], self.window, self.layer_idx)
                k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, Tk, D)
                if attn_mask is not None and key_columns is not None:
                    attn_mask = attn_mask.index_select(-1, key_columns)  # each key's column of the mask
                if attn_mask is None and t > 1:
                    # Causal still: query i, at column total - T + i, sees the keys up to itself (without a mask
                    # SDPA would let every query see the later ones too).
                    distance = _column_distance(t, total, key_columns, x.device)
                    attn_mask = distance >= 0
            attn_mask = self._within_window(attn_mask, t, total, key_columns, x.device)
            y = self._masked_attention(q, k, v, attn_mask)
        y = y.transpose(1, 2).reshape(b, t, h * d)  # (B, T, H * D): a view of the kernels' (B, T, H, D) output
        return self.resid_dropout(self.proj(y))

    def _causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          doc_ids: torch.Tensor | None) -> torch.Tensor:
        """Training's attention (and a whole sequence's without a cache): the kernels, the soft cap too."""
        backend = op_backend("attention", self.backend, q.device)
        if self.softcap is not None:
            backend = _capped_backend(backend, q, self.softcap)
        return attention(q, k, v, causal=True, scale=self.scale, backend=backend, doc_ids=doc_ids, window=self.window,
                         softcap=self.softcap)

    def _masked_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Generation's attention: a few queries against a cache, with a per-row mask for left-padded prompts (None:
        every key). The fused training kernel takes neither a mask nor a ragged cache, and a decode step is a small
        memory-bound read of the cache, so PyTorch's SDPA does it; with a soft cap, which SDPA has not, the
        reference."""
        if self.softcap is not None:
            return reference.attention(q, k, v, causal=False, scale=self.scale, softcap=self.softcap,
                                       attn_mask=attn_mask)
        gqa = self.n_head != self.n_kv_head
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale, enable_gqa=gqa)

    def _within_window(self, attn_mask: torch.Tensor | None, t: int, total: int, key_columns: torch.Tensor | None,
                       device: torch.device) -> torch.Tensor | None:
        """attn_mask (None: every key) narrowed to the sliding window, as ops.attention's window masks: the T queries
        are the last T of `total` columns, and query i, at column total - T + i, keeps the key at column c only when
        0 <= total - T + i - c < window. key_columns: each key's column (a sliding layer's ring); None: key j is at
        column j. Generation's masks count columns, and a row's real tokens are contiguous (its padding all on the
        left), so the columns back are the positions back. Unchanged without a window, or one that masks nothing."""
        if self.window is None or self.window >= total:
            return attn_mask
        distance = _column_distance(t, total, key_columns, device)
        in_window = (distance >= 0) & (distance < self.window)
        return in_window if attn_mask is None else attn_mask & in_window

    def _rotate(self, qk: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """RoPE on (B, H + Hkv, T, D) q and k heads together: one launch instead of two. With rope_dim, only each
        head's first rope_dim dims turn (the op takes the strided view as it is) and the rest is joined back on."""
        cos, sin = rotary
        backend = op_backend("rope", self.backend, qk.device)
        if self.rope_dim is None:
            return rope(qk, cos, sin, backend=backend)
        # A split, not two slices: its backward joins the gradients in one cat (see forward).
        turned, kept = qk.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([rope(turned, cos, sin, backend=backend), kept], dim=-1)

    def _norm_heads(self, qk: torch.Tensor) -> torch.Tensor:
        """QK-norm of (B, T, H + Hkv, D) q and k heads: q_norm on q's, k_norm on k's, joined again so that one
        RoPE call turns both. Normed as (B, T, heads, D), whose last dim is contiguous, as the norm op takes it."""
        q, k = qk.split([self.n_head, self.n_kv_head], dim=2)
        return torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)


def _capped_backend(backend: str | None, q: torch.Tensor, softcap: float) -> str | None:
    """The backend of a capped layer's attention: `backend` (None: the default backend) when its kernels take the
    cap and q (the cuda ones have no cap, Triton's not every head dim), else "auto", which picks one that does
    (at worst the torch reference, which ran every capped layer before the kernels had a cap): a model on such a
    backend runs, as it does with an op that has no kernels there, rather than stop at the op's refusal."""
    named = _backend.get_backend() if backend is None else backend
    return backend if named == "auto" or fits_backend(named, q, softcap) else "auto"


def _column_distance(t: int, total: int, key_columns: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(T, Tk): how many columns back from each of the last T queries (of `total` columns) each key is; negative
    for a key after the query. key_columns None: the keys are columns 0..total-1."""
    if key_columns is None:
        key_columns = torch.arange(total, device=device)
    query_columns = torch.arange(total - t, total, device=device)
    return query_columns[:, None] - key_columns[None, :]


def _check_cache_window(kept: int | None, window: int | None, layer: int) -> None:
    """A cache whose ring for this layer is shorter than the layer's window (or that rings a full layer) has
    dropped keys the layer's queries see: attention would skip them, silently."""
    if kept is not None and (window is None or kept < window):
        raise ValueError(f"the KV cache keeps the last {kept} tokens of layer {layer}, whose attention sees "
                         f"{'all of them' if window is None else f'the last {window}'}: make the cache with the "
                         f"model's windows (GPTConfig.layer_window)")


def _check_window(window: object) -> None:
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int or None, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (None for no window), got {window}")


def _check_scale(scale: object, name: str = "scale") -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(scale).__name__}")
    if not 0 < scale < math.inf:  # an inf scale gives NaN weights, a zero one uniform ones; a zero cap divides by 0
        raise ValueError(f"{name} must be a finite number > 0 or None, got {scale}")


def _check_count(name: str, value: object) -> None:
    # checked first: a zero would divide by zero, and a negative count passes the modulo tests
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
