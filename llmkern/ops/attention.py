"""Exact softmax attention without an S x S score matrix (FlashAttention-2 style).

    o = softmax(q @ k^T * scale + mask) @ v          layout (B, H, S, D), like SDPA

A drop-in for F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale) with:
- grouped-query attention: k and v may have Hkv heads, Hq divisible by Hkv (query head h
  reads kv head h // (Hq // Hkv)); the gradients of k and v are summed over each group;
- strided inputs: only the last dimension must be contiguous, so the q/k/v views of a fused
  QKV projection, (B, S, H, D).transpose(1, 2), go to the kernels without a copy;
- document masking for packed sequences: `doc_ids` (B, S) or `cu_seqlens` (N + 1,), so a
  token attends only within its own document, with no S x S mask tensor;
- sliding-window (local) causal attention: `window` W, each query sees only the last W keys up
  to its own position (Mistral's sliding_window); the kernels skip the key tiles outside it;
- soft-capped scores (Gemma 2's attn_logit_softcapping): `softcap` c, each scaled score s becomes
  c * tanh(s / c) before the masks; the triton and torch backends have it, the cuda one does not.

Causal masking is aligned to the bottom right when Sq != Sk (as SDPA's math reference and
KV-cache decoding expect): query i, at position p = i + (Sk - Sq), sees key j when j <= p, and
with a window also p - j < window. A query that sees no key at all gets a zero output.

The cuda and triton backends run through the custom ops llmkern::attention_fwd (o and the
fp32 log-sum-exp of each query row, kept for the backward) and llmkern::attention_bwd, with
fake kernels and autograd, so torch.compile(fullgraph=True) traces them. The torch backend
is the fp32 reference in llmkern/ops/reference.py, differentiated by PyTorch.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from . import _checks, reference
from ._custom_op import CustomOp

# Head dims each backend has kernels for.
HEAD_DIMS = {
    "triton": (32, 64, 96, 128, 256),
    "cuda": (32, 64, 96, 128),
}
# dtypes per backend: the kernels use tensor cores in fp16/bf16; fp32 is for the reference and
# for Triton in its CPU interpreter (whose bf16 dot is wrong), where tests need it.
DTYPES = {
    "torch": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16),
}
DOC_ID_DTYPES = (torch.int32, torch.int64)
# The custom ops and the kernel modules take the window as an int, this one meaning none.
NO_WINDOW = 0
# Backends that take a soft cap (the CUDA kernels have none): "auto" skips the others when one is given.
SOFTCAP_BACKENDS = ("torch", "triton")
# Both kernel backends index (batch, head) pairs on grid axes that hold at most 65535 blocks
# (CUDA's y and z, Triton's second axis), so a larger batch is launched in slices of the batch.
MAX_BATCH_HEADS_PER_LAUNCH = 65535


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = None,
    *,
    doc_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention of q over k, v.

    Args:
        q: (B, Hq, Sq, D) float16 or bfloat16 (float32 for the torch and triton backends),
            contiguous in its last dimension; other strides are free.
        k, v: (B, Hkv, Sk, D), q's dtype and device; Hq must be a multiple of Hkv.
        causal: query i sees only keys j <= i + (Sk - Sq); one that sees none (Sq > Sk) gets o = 0.
        scale: multiplies q @ k^T; None means 1 / sqrt(D).
        backend: "auto" | "cuda" | "triton" | "torch"; None means llmkern.get_backend().
        doc_ids: optional (B, S) int32/int64 document id per position (needs Sq == Sk): query i
            sees key j only when doc_ids[b, i] == doc_ids[b, j]. Any ids work; the kernels are
            fastest when each document is one run of positions (packed rows): a block of rows
            then reads only the tiles of its own documents.
        cu_seqlens: optional (N + 1,) int cumulative document lengths, 0 first and S last,
            the same for every batch row; the other way of saying doc_ids.
        window: optional sliding window (an int >= 1, needs causal=True): query i, at position
            p = i + (Sk - Sq), sees key j only when p - window < j <= p, the last `window` keys up to
            its own (Hugging Face's sliding_window; FlashAttention's window_size=(window - 1, 0)).
            Combines with doc_ids / cu_seqlens. None: no window.
        softcap: optional soft cap c (a finite float > 0) of the scaled scores, s -> c * tanh(s / c) before the
            masks (Gemma 2's attn_logit_softcapping). The triton and torch backends take it, not cuda ("auto"
            then picks triton on a GPU where Triton runs, else torch). None: no cap.

    Returns:
        o: (B, Hq, Sq, D), q's dtype. From the cuda and triton backends it is, as from SDPA's flash
            backend, the transposed view of a contiguous (B, Sq, Hq, D) tensor, so that
            o.transpose(1, 2).reshape(B, Sq, Hq * D) (the input of the output projection) is a view.
    """
    _check_args(q, k, v, causal, scale, doc_ids, cu_seqlens)
    _check_window(window, causal)
    softcap = _check_softcap(softcap)
    device = _checks.check_same_device(q=q, k=k, v=v, doc_ids=doc_ids, cu_seqlens=cu_seqlens)
    chosen = _backend.resolve("attention", backend, device, fits=lambda b: fits_backend(b, q, softcap))
    _check_backend_limits(chosen, q, softcap)
    if cu_seqlens is not None:
        doc_ids = doc_ids_from_cu_seqlens(cu_seqlens, q.size(0), q.size(2))
    scale = q.size(-1) ** -0.5 if scale is None else float(scale)
    if chosen == "torch":
        return reference.attention(q, k, v, causal=causal, scale=scale, doc_ids=doc_ids, window=window,
                                   softcap=softcap)
    if doc_ids is not None:
        doc_ids = int32_doc_ids(doc_ids)
    o, _ = _attention_fwd_op(q, k, v, doc_ids, bool(causal), scale, chosen, _kernel_window(window, k.size(2)),
                             softcap)
    return o


def _kernel_window(window: int | None, seq_k: int) -> int:
    """The window as the custom ops take it: NO_WINDOW for none, and for one of Sk keys or more, which
    masks nothing (the query at the last position sees all Sk keys in it): the kernels without a
    window run then, as the CUDA launchers choose them too, with no window arithmetic to overflow."""
    return NO_WINDOW if window is None or window >= seq_k else window


def _check_op_window(window: int, causal: bool) -> None:
    """The custom ops' window (public: torch.ops.llmkern.attention_fwd/bwd), as attention() passes it: the
    kernels would read a negative one as none, and one without causal as a window over later keys too."""
    if window < 0:
        raise ValueError(f"window must be >= 0 ({NO_WINDOW}: none); got {window}")
    if window != NO_WINDOW and not causal:
        raise ValueError("window needs causal=True (a sliding window looks back from each query's position)")


def _check_op_softcap(softcap: float | None, backend: str) -> None:
    """The custom ops' softcap (public: torch.ops.llmkern.attention_fwd/bwd): a cap the kernels can take, on a
    backend that has one (the cuda launchers take none)."""
    if softcap is None:
        return
    _check_softcap(softcap)
    if backend not in SOFTCAP_BACKENDS:
        raise ValueError(f"backend {backend!r} has no soft cap (softcap={softcap}); "
                         f"the backends with one are {SOFTCAP_BACKENDS}")


def _kernel_kwargs(softcap: float | None) -> dict:
    """The launchers' keyword arguments for the cap: none without one, so the cuda launchers, which take no
    cap (the op refuses one there), are called as they always were."""
    return {} if softcap is None else {"softcap": softcap}


def int32_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) doc ids as the kernels read them: int32 and contiguous, equal exactly where the given
    ids are equal. int64 ids are relabelled rather than cast (a cast would make 0 and 2**32 one
    document): each becomes the first position in its row that holds its value, found by a stable
    sort, with no host synchronization. A caller that passes the same ids to every layer (the
    model) relabels them once."""
    if doc_ids.dtype == torch.int32:
        return doc_ids.contiguous()
    values, order = doc_ids.sort(dim=1, stable=True)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    sorted_positions = torch.arange(values.size(1), device=values.device).expand_as(values)
    # Each sorted element's run start; the stable sort puts the value's first position there.
    run_starts = torch.where(starts, sorted_positions, 0).cummax(dim=1).values
    first_positions = order.gather(1, run_starts)
    return torch.empty_like(order).scatter_(1, order, first_positions).to(torch.int32)


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """(batch, seq_len) int32 document ids from cumulative document lengths [0, l0, l0+l1, ..., S]."""
    positions = torch.arange(seq_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    ids = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True).to(torch.int32)
    return ids.expand(batch, seq_len)


# --- argument checks -----------------------------------------------------------------------


def _check_args(q, k, v, causal, scale, doc_ids, cu_seqlens) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D); got shape {tuple(t.shape)}")
        _checks.check_last_dim_contiguous(name, t)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype ({q.dtype}); got {t.dtype}")
    (b, hq, sq, d), (bk, hkv, sk, dk) = q.shape, k.shape
    if bk != b or v.size(0) != b:
        raise ValueError(f"q, k and v must have one batch size; got {b}, {bk} and {v.size(0)}")
    if dk != d or v.size(3) != d:
        raise ValueError(f"q, k and v must have one head dim; got {d}, {dk} and {v.size(3)}")
    if d == 0:  # no scores to take, and the default scale 1 / sqrt(D) would divide by zero
        raise ValueError("q, k and v must have a head dim (last dimension) of at least 1; got 0")
    if v.size(1) != hkv:
        raise ValueError(f"k and v must have the same number of heads; got {hkv} and {v.size(1)}")
    if v.size(2) != sk:
        raise ValueError(f"k and v must have the same sequence length; got {sk} and {v.size(2)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"q's heads ({hq}) must be a multiple of k's and v's heads ({hkv}) (grouped-query attention)"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None:
        _checks.check_positive_float("scale", scale)  # finite in fp32 too: an inf scale gave NaN output
    if doc_ids is not None and cu_seqlens is not None:
        raise ValueError("give doc_ids or cu_seqlens, not both")
    if doc_ids is not None:
        _check_doc_ids(doc_ids, b, sq, sk)
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, sq, sk)


def _check_window(window, causal: bool) -> None:
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int):  # a bool is an int to Python, never a width
        raise ValueError(f"window must be an int or None; got {type(window).__name__} {window!r}")  # noqa: TRY004
    if window < 1:
        raise ValueError(f"window must be at least 1 (None for no window); got {window}")
    if not causal:
        raise ValueError("window needs causal=True (a sliding window looks back from each query's position)")


def _check_softcap(softcap) -> float | None:
    """softcap as a float (None stays None): finite and > 0 in fp32, as the kernels take it (a zero cap would
    divide by zero, an inf one is no cap, a NaN one poisons every score)."""
    if softcap is None:
        return None
    return _checks.check_positive_float("softcap", softcap)


def _check_doc_ids(doc_ids, b: int, sq: int, sk: int) -> None:
    _checks.check_tensor("doc_ids", doc_ids)
    if doc_ids.dtype not in DOC_ID_DTYPES:
        raise TypeError(f"doc_ids must have dtype int32 or int64; got {doc_ids.dtype}")
    if sq != sk:
        raise ValueError(f"doc_ids needs q and k of one sequence length; got {sq} and {sk}")
    if doc_ids.shape != (b, sq):
        raise ValueError(f"doc_ids must have shape (B, S) = ({b}, {sq}); got {tuple(doc_ids.shape)}")


def _check_cu_seqlens(cu_seqlens, sq: int, sk: int) -> None:
    _checks.check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in DOC_ID_DTYPES:
        raise TypeError(f"cu_seqlens must have dtype int32 or int64; got {cu_seqlens.dtype}")
    if sq != sk:
        raise ValueError(f"cu_seqlens needs q and k of one sequence length; got {sq} and {sk}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries; got shape {tuple(cu_seqlens.shape)}")
    if torch.compiler.is_compiling():
        return  # the value checks below read the tensor on the host: eager mode only
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != sq:
        raise ValueError(f"cu_seqlens must start at 0 and end at S={sq}; got {first} and {last}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def fits_backend(backend: str, q: torch.Tensor, softcap: float | None) -> bool:
    """Whether `backend`'s attention takes these arguments: q's dtype and head dim, and a soft cap (what "auto"
    asks of each backend it tries)."""
    dims = HEAD_DIMS.get(backend)
    capped_ok = softcap is None or backend in SOFTCAP_BACKENDS
    return q.dtype in DTYPES[backend] and (dims is None or q.size(-1) in dims) and capped_ok


def _check_backend_limits(backend: str, q: torch.Tensor, softcap: float | None) -> None:
    if q.dtype not in DTYPES[backend]:
        allowed = ", ".join(str(t).replace("torch.", "") for t in DTYPES[backend])
        raise TypeError(f"q, k and v must have dtype {allowed} for backend {backend!r}; got {q.dtype}")
    dims = HEAD_DIMS.get(backend)
    if dims is not None and q.size(-1) not in dims:
        raise ValueError(f"backend {backend!r} supports head dims {dims}; got {q.size(-1)}")
    if softcap is not None and backend not in SOFTCAP_BACKENDS:
        raise ValueError(f"backend {backend!r} has no soft cap; softcap={softcap} needs one of {SOFTCAP_BACKENDS} "
                         "(or backend='auto')")


# --- the custom ops --------------------------------------------------------------------------


def _launch_slices(q: torch.Tensor) -> list[slice]:
    """Slices of the batch, each small enough for one kernel launch (batch * heads within the grid)."""
    batch, heads = q.size(0), q.size(1)
    if heads > MAX_BATCH_HEADS_PER_LAUNCH:
        raise ValueError(f"q has {heads} heads; the kernels take at most {MAX_BATCH_HEADS_PER_LAUNCH}")
    step = max(1, MAX_BATCH_HEADS_PER_LAUNCH // heads)
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def _rows_of(t: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    return None if t is None else t[rows]


def _empty_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, sq, d = q.shape
    # (B, Sq, Hq, D) memory, seen as (B, Hq, Sq, D): the heads of a position side by side, as the
    # output projection reads them, so no copy comes between the two (and its saved input is o).
    o = q.new_empty((b, sq, hq, d)).transpose(1, 2)
    lse = q.new_empty((b, hq, sq), dtype=torch.float32)
    return o, lse


def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    backend: str,
    window: int = NO_WINDOW,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Hq, Sq, D) and lse (B, Hq, Sq) fp32, the natural-log log-sum-exp of each score row.
    window: the sliding window, NO_WINDOW (0) for none; last and with that default, so that callers
    of the op from before windows (its schema is public: torch.ops.llmkern.attention_fwd) still run.
    softcap: the scores' soft cap (triton only), None for none; after window, defaulted, for the same reason."""
    _check_op_window(window, causal)
    _check_op_softcap(softcap, backend)
    o, lse = _empty_outputs(q)
    if o.numel() == 0:
        return o, lse.fill_(float("-inf"))
    if k.size(2) == 0:  # nothing to attend to: softmax over no keys, taken as zero
        return o.zero_(), lse.fill_(float("-inf"))
    kernels = _backend.kernels("attention", backend)
    doc_ids = None if doc_ids is None else int32_doc_ids(doc_ids)  # as given when attention() made them
    for rows in _launch_slices(q):
        kernels.forward(q[rows], k[rows], v[rows], _rows_of(doc_ids, rows), causal, window, scale, o[rows], lse[rows],
                        **_kernel_kwargs(softcap))
    return o, lse


def _attention_fwd_fake(q, k, v, doc_ids, causal, scale, backend, window=NO_WINDOW, softcap=None):
    return _empty_outputs(q)


def _attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    doc_ids: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    backend: str,
    window: int = NO_WINDOW,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv in the shapes of q, k, v (dk and dv summed over each group's query heads); softcap as the
    forward's."""
    _check_op_window(window, causal)
    _check_op_softcap(softcap, backend)
    dq = q.new_empty(q.shape)
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    kernels = _backend.kernels("attention", backend)
    doc_ids = None if doc_ids is None else int32_doc_ids(doc_ids)
    for rows in _launch_slices(q):
        kernels.backward(do[rows], q[rows], k[rows], v[rows], o[rows], lse[rows], _rows_of(doc_ids, rows),
                         causal, window, scale, dq[rows], dk[rows], dv[rows], **_kernel_kwargs(softcap))
    return dq, dk, dv


def _attention_bwd_fake(do, q, k, v, o, lse, doc_ids, causal, scale, backend, window=NO_WINDOW, softcap=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_attention_bwd_op = CustomOp("llmkern::attention_bwd", _attention_bwd, _attention_bwd_fake)


def _setup_context(ctx, inputs, output):
    # torch.library fills in a window and softcap left out; attention() passes both
    q, k, v, doc_ids, causal, scale, backend, window, softcap = inputs
    o, lse = output
    ctx.causal, ctx.scale, ctx.backend, ctx.window, ctx.softcap = causal, scale, backend, window, softcap
    ctx.save_for_backward(q, k, v, o, lse, doc_ids)
    # lse, internal, never gets a gradient: without this autograd would zero-fill one for it in every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dlse):
    # lse is an internal output (the public op returns o only), so dlse is ignored.
    q, k, v, o, lse, doc_ids = ctx.saved_tensors
    if do is None:  # only lse was differentiated (torch.ops.llmkern.attention_fwd): no gradient of q, k, v
        return None, None, None, None, None, None, None, None, None
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq, dk, dv = _attention_bwd_op(
        do, q, k, v, o, lse, doc_ids, ctx.causal, ctx.scale, ctx.backend, ctx.window, ctx.softcap
    )
    return dq, dk, dv, None, None, None, None, None, None


_attention_fwd_op = CustomOp("llmkern::attention_fwd", _attention_fwd, _attention_fwd_fake, _setup_context, _backward)
