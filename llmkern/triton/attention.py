"""FlashAttention-2 in Triton: forward and backward, causal, sliding window, GQA, document masking, soft-capped
scores, any S.

Forward: one program per (BLOCK_M query rows, batch, query head). It walks the K/V blocks,
keeps a running row max m and row sum l of exp(scores - m) in fp32 (online softmax), and
writes o = acc / l and the log-sum-exp of each row for the backward. Scores never touch memory.

Backward (three kernels, no atomics, by default):
- delta = rowsum(o * do), the softmax-Jacobian term shared by dq and dk;
- one program per (BLOCK_N key rows, batch, kv head) walks every query block of every query
  head of its group and accumulates dk and dv, so the GQA sum happens in registers;
- one program per (BLOCK_M query rows, batch, query head) walks the key blocks for dq.
Both recompute p = exp(scores - lse) from the saved lse instead of storing it. With
LLMKERN_TRITON_ATTENTION_DQ=atomic the dk/dv kernel also adds each tile pair's dq share into
an fp32 buffer by atomics and the dq kernel is not run (see DQ_ENV).

Masks: keys past Sk and rows past Sq (padding of the last block), causal (aligned to the
bottom right: key j is seen by query i when j <= i + Sk - Sq), the sliding window (with causal:
also i + Sk - Sq - j < window) and documents (equal doc ids). Causal blocks above the diagonal are
never visited, nor with a window the blocks wholly before it: a block of query rows walks the key
tiles from its first row's first key to its last row's last key, and a block of keys (dk/dv) the
query blocks from its first key's first query to its last key's last. The window is a constexpr
switch (HAS_WINDOW), so without one the kernels are those without the feature. With doc_ids, a
block first scans the ids alone for the first and last position whose id lies within its own ids'
range, and walks only the tiles between: for packed documents (each id one run of positions)
exactly the tiles its documents cover. The walk itself has no data-dependent branch, so Triton
software-pipelines its loads (cp.async) as it does without documents; tiles inside the range that
share no document (ids that come back later in the row) are computed and fully masked.

Scores are kept in log2 units (scaled by scale * log2(e)) so the exponentials are exp2.

Soft cap (Gemma 2's attn_logit_softcapping): with HAS_SOFTCAP each scaled score s becomes
softcap * tanh(s / softcap), in fp32 and natural units (then log2 units: capping the log2-unit
score would cap at softcap * log2(e)), before the masks. tl has no tanh; llmkern/triton/_math.py's keeps
the relative precision of scores far below the cap. The backward recomputes the capped scores
and p from the saved lse, and takes dS through the cap: dS_raw = p (dp - delta) (1 - tanh^2).
A constexpr switch, like the window's: without a cap the kernels are those without the feature.

Row offsets (position * row stride) are formed in int64: positions are int32, and with the
strided q/k/v views of a fused QKV projection the row stride is (Hq + 2 Hkv) * D, so the
product passes 2**31 from about 175k positions when Hq * D = 4096 with Hkv = Hq (in int32 it
wraps to a negative offset: a read outside the tensor or a wrong row).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .. import _backend
from .._cuda_bridge import on_device
from ._math import tanh_and_slope

LOG2E = math.log2(math.e)
# Doc ids a block reads at a time when it looks for the positions its documents cover (4 KB of int32).
DOC_SCAN = 1024


_WIDE_HEAD_ONLY: set[int] = set()  # ids of the configs kept for head dim 256 alone


def _configs(blocks: list[tuple[int, int, int, int]], wide_head_only=()) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) -> Configs, then those of wide_head_only (small tiles
    that only head dim 256 needs; see _for_head_dim). The CPU interpreter gets one tiny config."""
    if _backend.triton_interpreted():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    def make(tiles):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]

    wide = make(wide_head_only)
    _WIDE_HEAD_ONLY.update(id(c) for c in wide)
    return make(blocks) + wide


def _for_head_dim(configs, named_args, **kwargs):
    """The autotuner's pruning: heads up to 128 wide skip the configs meant for 256 alone (each
    config costs a compile and a timing per tuning key, also in the GPU test runs); wider heads
    get those first (so a pinned tile 0, see TILE_ENV, is one that fits), then the rest."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 256))  # not found: prune nothing
    wide = [c for c in configs if id(c) in _WIDE_HEAD_ONLY]
    narrow = [c for c in configs if id(c) not in _WIDE_HEAD_ONLY]
    return (wide + narrow if block_d > 128 else narrow) or configs


# Set to an integer i, each kernel runs its i-th candidate tile (modulo their number, among those
# _for_head_dim keeps) instead of autotuning: the tests run every candidate so, on one odd shape
# each, where autotuning would only ever run (and so check) the fastest; the other GPU tests pin
# tile 0 and skip the tuning's compiles and timings. Unset: autotune.
TILE_ENV = "LLMKERN_TRITON_ATTENTION_TILE"


# How the backward sums dq over the key blocks. "separate" (the default): a third kernel walks the key
# blocks of each query block, recomputing q k^T and dO v^T there (7 matmuls a tile pair in all), and the
# result is deterministic. "atomic": the dk/dv kernel adds each key block's share of dq into an fp32
# buffer by atomics (5 matmuls; the order of the additions, and so dq's last bits, vary from run to run).
# A GPU benchmark decides the default (NOTES_attention.md); deterministic mode always gets "separate".
DQ_ENV = "LLMKERN_TRITON_ATTENTION_DQ"


def _launch(kernel, grid, args: tuple, consts: dict) -> None:
    """kernel[grid](*args, **consts), autotuned, or with the tile TILE_ENV pins."""
    pinned = os.environ.get(TILE_ENV)
    if not pinned:
        kernel[grid](*args, **consts)
        return
    try:
        index = int(pinned)
    except ValueError:
        raise ValueError(f"{TILE_ENV} must be an integer tile index; got {pinned!r}") from None
    tiles = _for_head_dim(kernel.configs, {}, **consts)
    tile = tiles[index % len(tiles)]
    kernel.fn[grid](*args, **consts, **tile.kwargs, num_warps=tile.num_warps, num_stages=tile.num_stages)


# Tiles (BLOCK_M query rows, BLOCK_N key rows, warps, pipeline stages). On sm_90 Triton lowers the
# products to wgmma when a warpgroup (4 warps) owns at least 64 rows of the product, else to mma.sync;
# the candidates are the ones that fit an H100's shared memory and that ptxas (Triton 3.6, sm_90a) keeps
# without or with few register spills (NOTES_attention.md); the autotuner picks among them on the GPU.
_FWD_CONFIGS = _configs(
    [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
    wide_head_only=[(128, 32, 8, 2)],
)
# dk/dv: BLOCK_N key rows stay in registers (their dk and dv accumulators) while BLOCK_M query rows stream.
_DKDV_CONFIGS = _configs(
    [(32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3), (64, 128, 8, 3), (32, 64, 8, 2), (32, 64, 4, 3),
     (64, 64, 4, 2), (16, 64, 4, 2), (32, 32, 4, 2)],
    wide_head_only=[(16, 32, 4, 1)],  # the one without spills at 256
)
# dq: the other way round, BLOCK_M query rows stay (their dq accumulator) while BLOCK_N key rows stream,
# so its tiles are dk/dv's transposed: many rows stay, few stream.
_DQ_CONFIGS = _configs(
    [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3),
     (64, 32, 4, 2)],
    wide_head_only=[(16, 32, 4, 1)],
)
_PRUNE = {"early_config_prune": _for_head_dim}
# Tuned once per power-of-two length bucket (seq_bucket), not at every new length.
_TUNE_KEY = ["seq_bucket", "HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_DOC", "HAS_SOFTCAP"]


@triton.jit
def _soft_cap(s, scale, softcap):
    """Gemma 2's cap of the raw products s = q . k: softcap * tanh(s * scale / softcap), in fp32 and natural
    units, and the cap's slope there, 1 - tanh^2 (its derivative, for the backward's chain rule).
    tl has no tanh: _math.tanh_and_slope's keeps its relative precision near 0 (a small score stays accurate
    to its own rounding, not the cap's) and the slope's where tanh saturates; finite for every finite s."""
    t, slope = tanh_and_slope(s * (scale / softcap))
    return softcap * t, slope


@triton.jit
def _id_range(ids, ok):
    """The smallest and largest of the ids where ok."""
    big = 2147483647
    return tl.min(tl.where(ok, ids, big), axis=0), tl.max(tl.where(ok, ids, -big), axis=0)


@triton.jit
def _positions_with_ids(DOC_ROW, start, end, id_lo, id_hi, SCAN: tl.constexpr):
    """[first, last + 1) of the positions in [start, end) whose doc id (DOC_ROW points at the batch
    row's ids) lies in [id_lo, id_hi]; an empty range (end, start) when none does. Reads SCAN ids
    at a time and reduces once at the end, so the scan costs a few loads, not a loop of reductions."""
    first = tl.full([SCAN], end, tl.int32)
    last = tl.full([SCAN], start - 1, tl.int32)
    for s0 in range(start, end, SCAN):
        offs = s0 + tl.arange(0, SCAN)
        inside = offs < end
        ids = tl.load(DOC_ROW + offs, mask=inside, other=0)
        hit = inside & (ids >= id_lo) & (ids <= id_hi)
        first = tl.minimum(first, tl.where(hit, offs, end))
        last = tl.maximum(last, tl.where(hit, offs, start - 1))
    return tl.min(first, axis=0), tl.max(last, axis=0) + 1


@triton.jit
def _key_tiles(DOC_ROW, doc_q, row_ok, start_n, end_n, HAS_DOC: tl.constexpr, BLOCK_N: tl.constexpr,
               SCAN: tl.constexpr):
    """The keys [start, end) a block of query rows walks, from [start_n, end_n) (start_n a whole tile):
    with documents, only the positions whose ids may be those of its rows, the start rounded down to a
    whole tile."""
    if HAS_DOC:
        id_lo, id_hi = _id_range(doc_q, row_ok)
        first, end_n = _positions_with_ids(DOC_ROW, start_n, end_n, id_lo, id_hi, SCAN)
        start_n = first // BLOCK_N * BLOCK_N
    return start_n, end_n


@triton.jit
def _window_first_key(m0, causal_shift, window, BLOCK_N: tl.constexpr):
    """The first key (rounded down to a whole tile) in the window of the query row m0, the block's
    first: key tiles before it lie wholly outside the window of every row of the block."""
    return tl.maximum(m0 + causal_shift - window + 1, 0) // BLOCK_N * BLOCK_N


@triton.jit
def _window_unmasked_start(first_n, end_n, m0, causal_shift, window, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """Where, from first_n, the key tiles stop reaching before the window of the block's last row
    (m0 + BLOCK_M - 1): tiles [first_n, that) need the window's mask, within [first_n, end_n]."""
    last_row_first_key = tl.maximum(m0 + BLOCK_M - 1 + causal_shift - window + 1, 0)
    start = (last_row_first_key + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    return tl.maximum(tl.minimum(start, end_n), first_n)


@triton.jit
def _key_tile_ids(DOC_ROW, offs_n, key_ok, HAS_DOC: tl.constexpr):
    """The doc ids of the key tile offs_n; without documents the positions (never compared)."""
    doc_k = offs_n
    if HAS_DOC:
        doc_k = tl.load(DOC_ROW + offs_n, mask=key_ok, other=-2)
    return doc_k


@triton.jit
def _load_kv_tile(k_ptr, v_ptr, stride_ks, stride_vs, offs_n, key_ok, offs_d, d_ok):
    """Rows offs_n of one head's k and v, zero past seq_k and past the head dim."""
    kv_mask = key_ok[:, None] & d_ok[None, :]
    rows = offs_n.to(tl.int64)  # int64 row offsets: see the module docstring
    k = tl.load(k_ptr + rows[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + rows[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _tile_needs_mask(start_n, start_m, seq_k, causal_shift, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr):
    """Whether the tile of keys [start_n, start_n + BLOCK_N) x queries [start_m, start_m + BLOCK_M) has
    any pair to mask: keys past seq_k, keys past the causal diagonal of its first query, keys before
    the window of its last query, or documents. Tiles well inside the visible region (most of them
    at long S) skip the mask arithmetic."""
    needs = start_n + BLOCK_N > seq_k
    if CAUSAL:
        needs = needs | (start_n + BLOCK_N - 1 > start_m + causal_shift)
    if HAS_WINDOW:
        needs = needs | (start_m + BLOCK_M - 1 + causal_shift - start_n >= window)
    return needs | HAS_DOC


@triton.jit
def _visible(offs_m, offs_n, seq_k, causal_shift, window, doc_q, doc_k, CAUSAL: tl.constexpr,
             HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """Which (query, key) pairs of the tile may attend: (BLOCK_M, BLOCK_N) bool, or
    (BLOCK_N, BLOCK_M) with KEYS_FIRST (the transposed tiles of the dk/dv kernel)."""
    if KEYS_FIRST:
        q_pos, k_pos, q_doc, k_doc = offs_m[None, :], offs_n[:, None], doc_q[None, :], doc_k[:, None]
    else:
        q_pos, k_pos, q_doc, k_doc = offs_m[:, None], offs_n[None, :], doc_q[:, None], doc_k[None, :]
    ok = (k_pos < seq_k) & (q_pos >= 0)  # the second term only makes it 2-D
    if CAUSAL:
        ok = ok & (k_pos <= q_pos + causal_shift)
    if HAS_WINDOW:  # the query's position minus the key's: under the window
        ok = ok & (q_pos + causal_shift - k_pos < window)
    if HAS_DOC:
        ok = ok & (q_doc == k_doc)
    return ok


@triton.jit
def _unmasked_end(first_n, end_n, m0, seq_k, causal_shift, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_DOC: tl.constexpr):
    """Where the key tiles from first_n stop being visible to every row of the block whose first
    query is m0: tiles [first_n, that) need no mask and [that, end_n) do (the causal diagonal, keys
    past the last whole tile, and with documents all of them)."""
    full_n = tl.minimum(end_n, seq_k // BLOCK_N * BLOCK_N)
    if CAUSAL:  # whole tiles up to the first row's last key
        full_n = tl.minimum(full_n, tl.maximum(m0 + causal_shift + 1, 0) // BLOCK_N * BLOCK_N)
    if HAS_DOC:
        full_n = first_n
    return tl.maximum(full_n, first_n)


@triton.jit
def _forward_tile(acc, l_i, m_i, q, k_ptr, v_ptr, stride_ks, stride_vs, start_n, offs_m, offs_d, d_ok, doc_q, DOC_ROW,
                  seq_k, causal_shift, window, scale, scale_log2, softcap, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """The online softmax over one key tile, [start_n, start_n + BLOCK_N): acc, l_i and m_i updated."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < seq_k
    k, v = _load_kv_tile(k_ptr, v_ptr, stride_ks, stride_vs, offs_n, key_ok, offs_d, d_ok)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    scale_log2_of_s = scale_log2  # what turns s into log2-unit scores
    if HAS_SOFTCAP:  # s becomes the capped scores (scaled, natural units), then log2 units
        s = _soft_cap(s, scale, softcap)[0] * 1.4426950408889634
        scale_log2_of_s = 1.0
    if MASKED:
        doc_k = _key_tile_ids(DOC_ROW, offs_n, key_ok, HAS_DOC)
        visible = _visible(offs_m, offs_n, seq_k, causal_shift, window, doc_q, doc_k, CAUSAL, HAS_WINDOW, HAS_DOC,
                           False)
        s = tl.where(visible, s * scale_log2_of_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no key yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
    else:
        # Every pair visible: the row max from the raw scores (a positive scale keeps their order; capped
        # scores are in log2 units already), then one multiply-add an element before exp2, where scaling
        # first costs a multiply more.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale_log2_of_s)
        m_shift = m_new
        p = tl.exp2(s * scale_log2_of_s - m_new[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _dq_tile(dq, q, do, lse_log2, delta, k_ptr, v_ptr, stride_ks, stride_vs, start_n, offs_m, offs_d, d_ok, doc_q,
             DOC_ROW, seq_k, causal_shift, window, scale, scale_log2, softcap, MASKED: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq (unscaled) plus the contribution of one key tile, [start_n, start_n + BLOCK_N)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < seq_k
    k, v = _load_kv_tile(k_ptr, v_ptr, stride_ks, stride_vs, offs_n, key_ok, offs_d, d_ok)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:  # p of the capped scores, as the forward took them
        s, cap_slope = _soft_cap(s, scale, softcap)
        p = tl.exp2(s * 1.4426950408889634 - lse_log2[:, None])
    else:
        p = tl.exp2(s * scale_log2 - lse_log2[:, None])
    if MASKED:
        doc_k = _key_tile_ids(DOC_ROW, offs_n, key_ok, HAS_DOC)
        visible = _visible(offs_m, offs_n, seq_k, causal_shift, window, doc_q, doc_k, CAUSAL, HAS_WINDOW, HAS_DOC,
                           False)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:  # the gradient of the capped scores, through the cap to the scaled ones
        ds = ds * cap_slope
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, DOC,  # pointers; LSE (B*Hq, Sq) fp32; DOC (B, S) int32 or unused
    stride_qb, stride_qh, stride_qs,  # element strides (the last dim is contiguous)
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    n_q_heads, group_size,  # Hq, and Hq // Hkv query heads per kv head
    seq_q, seq_k, seq_bucket,  # seq_bucket: only the autotuning key
    window,  # the sliding window (read only with HAS_WINDOW)
    scale, scale_log2,  # softmax scale, and it times log2(e)
    softcap,  # the soft cap of the scaled scores (read only with HAS_SOFTCAP)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # D, and D rounded up to a power of two
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOC_SCAN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: schedule them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    h_kv = h // group_size
    q_ptr = Q + b * stride_qb + h * stride_qh
    k_ptr = K + b * stride_kb + h_kv * stride_kh
    v_ptr = V + b * stride_vb + h_kv * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM
    rows_m = offs_m.to(tl.int64)  # int64 row offsets: see the module docstring
    q = tl.load(q_ptr + rows_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    causal_shift = seq_k - seq_q
    doc_q = offs_m  # placeholder when there are no documents
    if HAS_DOC:
        doc_q = tl.load(DOC + b * seq_q + offs_m, mask=row_ok, other=-1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    end_n = seq_k
    if CAUSAL:  # the last key any row of this block sees
        end_n = tl.minimum(seq_k, (pid_m + 1) * BLOCK_M + causal_shift)
    start_n = 0
    if HAS_WINDOW:  # the first key any row of this block sees
        start_n = _window_first_key(pid_m * BLOCK_M, causal_shift, window, BLOCK_N)
    first_n, end_n = _key_tiles(DOC + b * seq_k, doc_q, row_ok, start_n, end_n, HAS_DOC, BLOCK_N, DOC_SCAN)
    # Loops that do not branch per tile: the tiles every row sees whole, then the masked ones (with a
    # window, the tiles that reach before the window of some row come first, masked too).
    full_n = _unmasked_end(first_n, end_n, pid_m * BLOCK_M, seq_k, causal_shift, BLOCK_N, CAUSAL, HAS_DOC)
    unmasked_n = first_n
    if HAS_WINDOW:
        unmasked_n = _window_unmasked_start(first_n, end_n, pid_m * BLOCK_M, causal_shift, window, BLOCK_M, BLOCK_N)
        full_n = tl.maximum(full_n, unmasked_n)
        for start_n in range(first_n, unmasked_n, BLOCK_N):
            acc, l_i, m_i = _forward_tile(acc, l_i, m_i, q, k_ptr, v_ptr, stride_ks, stride_vs, start_n, offs_m,
                                          offs_d, d_ok, doc_q, DOC + b * seq_k, seq_k, causal_shift, window,
                                          scale, scale_log2, softcap, True, CAUSAL, HAS_WINDOW, HAS_DOC, HAS_SOFTCAP,
                                          DOT_PRECISION, BLOCK_N)
    for start_n in range(unmasked_n, full_n, BLOCK_N):
        acc, l_i, m_i = _forward_tile(acc, l_i, m_i, q, k_ptr, v_ptr, stride_ks, stride_vs, start_n, offs_m, offs_d,
                                      d_ok, doc_q, DOC + b * seq_k, seq_k, causal_shift, window, scale, scale_log2,
                                      softcap, False, CAUSAL, HAS_WINDOW, HAS_DOC, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N)
    for start_n in range(full_n, end_n, BLOCK_N):
        acc, l_i, m_i = _forward_tile(acc, l_i, m_i, q, k_ptr, v_ptr, stride_ks, stride_vs, start_n, offs_m, offs_d,
                                      d_ok, doc_q, DOC + b * seq_k, seq_k, causal_shift, window, scale, scale_log2,
                                      softcap, True, CAUSAL, HAS_WINDOW, HAS_DOC, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N)

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that saw no key gets 0
    o_ptr = O + b * stride_ob + h * stride_oh
    tl.store(o_ptr + rows_m[:, None] * stride_os + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    # Natural-log lse; +inf for an empty row makes the backward's exp(s - lse) = 0 there.
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)


@triton.jit
def _attention_bwd_delta_kernel(
    O, DO, DELTA,  # DELTA (B*Hq, Sq) fp32
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    n_q_heads, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows_m = offs_m.to(tl.int64)  # int64 row offsets: see the module docstring
    o = tl.load(O + b * stride_ob + h * stride_oh + rows_m[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows_m[:, None] * stride_dos + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_q + offs_m, delta, mask=offs_m < seq_q)


# DQ32 is zeroed before each timing run: with ATOMIC_DQ the kernel adds into it.
@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY + ["ATOMIC_DQ"], prune_configs_by=_PRUNE,
                 reset_to_zero=["DQ32"])
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ32, DOC,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    n_kv_heads, group_size, seq_q, seq_k, seq_bucket, window,
    scale, scale_log2, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOC_SCAN: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)  # over B * Hkv
    b = (pid_bh // n_kv_heads).to(tl.int64)
    h_kv = (pid_bh % n_kv_heads).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < seq_k
    d_ok = offs_d < HEAD_DIM
    kv_mask = key_ok[:, None] & d_ok[None, :]
    rows_n = offs_n.to(tl.int64)  # int64 row offsets: see the module docstring
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + rows_n[:, None] * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + rows_n[:, None] * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    doc_k = offs_n
    if HAS_DOC:
        doc_k = tl.load(DOC + b * seq_k + offs_n, mask=key_ok, other=-2)

    causal_shift = seq_k - seq_q
    start_m0 = 0
    if CAUSAL:  # the first query that sees this block's first key, rounded down to a block
        start_m0 = (tl.maximum(pid_n * BLOCK_N - causal_shift, 0) // BLOCK_M) * BLOCK_M
    end_m = seq_q
    if HAS_WINDOW:  # past the last query whose window holds this block's last key
        end_m = tl.minimum(seq_q, tl.maximum((pid_n + 1) * BLOCK_N - 1 - causal_shift + window, 0))
    if HAS_DOC:  # only the queries whose ids may be those of this block's keys (the same for every head)
        id_lo, id_hi = _id_range(doc_k, key_ok)
        first_m, end_m = _positions_with_ids(DOC + b * seq_q, start_m0, end_m, id_lo, id_hi, DOC_SCAN)
        start_m0 = first_m // BLOCK_M * BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group_size):
        h = h_kv * group_size + g
        q_ptr = Q + b * stride_qb + h * stride_qh
        do_ptr = DO + b * stride_dob + h * stride_doh
        row_base = (b * n_kv_heads * group_size + h) * seq_q  # into LSE and DELTA
        dq_ptr = DQ32 + row_base * HEAD_DIM  # contiguous (B, Hq, Sq, D)
        for start_m in range(start_m0, end_m, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < seq_q
            doc_q = offs_m
            if HAS_DOC:
                doc_q = tl.load(DOC + b * seq_q + offs_m, mask=row_ok, other=-1)
            q_mask = row_ok[:, None] & d_ok[None, :]
            rows_m = offs_m.to(tl.int64)  # int64 row offsets: see the module docstring
            q = tl.load(q_ptr + rows_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_ptr + rows_m[:, None] * stride_dos + offs_d[None, :], mask=q_mask, other=0.0)
            # Padding rows get lse = +inf, so their p is exactly 0.
            lse_log2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
            # Transposed tiles (keys x queries), so dk and dv accumulate without transposing p.
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
            if HAS_SOFTCAP:  # p of the capped scores, as the forward took them
                s_t, cap_slope_t = _soft_cap(s_t, scale, softcap)
                p_t = tl.exp2(s_t * 1.4426950408889634 - lse_log2[None, :])
            else:
                p_t = tl.exp2(s_t * scale_log2 - lse_log2[None, :])
            if _tile_needs_mask(pid_n * BLOCK_N, start_m, seq_k, causal_shift, window, BLOCK_M, BLOCK_N, CAUSAL,
                                HAS_WINDOW, HAS_DOC):
                ok_t = _visible(offs_m, offs_n, seq_k, causal_shift, window, doc_q, doc_k, CAUSAL, HAS_WINDOW,
                                HAS_DOC, True)
                p_t = tl.where(ok_t, p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            if HAS_SOFTCAP:  # the gradient of the capped scores, through the cap to the scaled ones
                ds_t = ds_t * cap_slope_t
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
            if ATOMIC_DQ:  # this key block's share of dq (unscaled), summed over the key blocks in fp32
                dq_part = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION)
                tl.atomic_add(dq_ptr + rows_m[:, None] * HEAD_DIM + offs_d[None, :], dq_part, mask=q_mask,
                              sem="relaxed")

    dk = dk * scale
    tl.store(DK + b * stride_dkb + h_kv * stride_dkh + rows_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h_kv * stride_dvh + rows_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    n_q_heads, group_size, seq_q, seq_k, seq_bucket, window,
    scale, scale_log2, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOC_SCAN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: schedule them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)  # over B * Hq
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    h_kv = h // group_size
    k_ptr = K + b * stride_kb + h_kv * stride_kh
    v_ptr = V + b * stride_vb + h_kv * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    rows_m = offs_m.to(tl.int64)  # int64 row offsets: see the module docstring
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_m[:, None] * stride_qs + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows_m[:, None] * stride_dos + offs_d[None, :],
                 mask=q_mask, other=0.0)
    row_base = pid_bh.to(tl.int64) * seq_q
    lse_log2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    doc_q = offs_m
    if HAS_DOC:
        doc_q = tl.load(DOC + b * seq_q + offs_m, mask=row_ok, other=-1)

    causal_shift = seq_k - seq_q
    end_n = seq_k
    if CAUSAL:
        end_n = tl.minimum(seq_k, (pid_m + 1) * BLOCK_M + causal_shift)
    start_n = 0
    if HAS_WINDOW:
        start_n = _window_first_key(pid_m * BLOCK_M, causal_shift, window, BLOCK_N)
    first_n, end_n = _key_tiles(DOC + b * seq_k, doc_q, row_ok, start_n, end_n, HAS_DOC, BLOCK_N, DOC_SCAN)
    full_n = _unmasked_end(first_n, end_n, pid_m * BLOCK_M, seq_k, causal_shift, BLOCK_N, CAUSAL, HAS_DOC)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    unmasked_n = first_n  # as in the forward: (window-masked tiles,) whole tiles, then masked ones
    if HAS_WINDOW:
        unmasked_n = _window_unmasked_start(first_n, end_n, pid_m * BLOCK_M, causal_shift, window, BLOCK_M, BLOCK_N)
        full_n = tl.maximum(full_n, unmasked_n)
        for start_n in range(first_n, unmasked_n, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse_log2, delta, k_ptr, v_ptr, stride_ks, stride_vs, start_n, offs_m, offs_d,
                          d_ok, doc_q, DOC + b * seq_k, seq_k, causal_shift, window, scale, scale_log2, softcap, True,
                          CAUSAL, HAS_WINDOW, HAS_DOC, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N)
    for start_n in range(unmasked_n, full_n, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse_log2, delta, k_ptr, v_ptr, stride_ks, stride_vs, start_n, offs_m, offs_d, d_ok,
                      doc_q, DOC + b * seq_k, seq_k, causal_shift, window, scale, scale_log2, softcap, False, CAUSAL,
                      HAS_WINDOW, HAS_DOC, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N)
    for start_n in range(full_n, end_n, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse_log2, delta, k_ptr, v_ptr, stride_ks, stride_vs, start_n, offs_m, offs_d, d_ok,
                      doc_q, DOC + b * seq_k, seq_k, causal_shift, window, scale, scale_log2, softcap, True, CAUSAL,
                      HAS_WINDOW, HAS_DOC, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N)

    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows_m[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# --- host launchers (the op in llmkern/ops/attention.py checked every argument) ---------------


def _dq_by_atomics() -> bool:
    """Whether DQ_ENV asks for dq by atomics (never under torch.use_deterministic_algorithms)."""
    mode = os.environ.get(DQ_ENV, "separate")
    if mode not in ("separate", "atomic"):
        raise ValueError(f"{DQ_ENV} must be 'separate' or 'atomic'; got {mode!r}")
    return mode == "atomic" and not torch.are_deterministic_algorithms_enabled()


def _bucket(seq_q: int, seq_k: int) -> int:
    return triton.next_power_of_2(max(seq_q, seq_k))


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _common(q: torch.Tensor, doc_ids: torch.Tensor | None, causal: bool, window: int,
            softcap: float | None) -> dict:
    return dict(
        CAUSAL=causal,
        HAS_WINDOW=window > 0,
        HEAD_DIM=q.size(3),
        BLOCK_D=max(16, triton.next_power_of_2(q.size(3))),
        HAS_DOC=doc_ids is not None,
        HAS_SOFTCAP=softcap is not None,
        # fp32 inputs (interpreter tests, the rare fp32 user) get exact fp32 products, not tf32.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOC_SCAN=16 if _backend.triton_interpreted() else DOC_SCAN,  # tests' short rows: several reads
    )


def _kernel_softcap(softcap: float | None) -> float:
    """The kernels' softcap argument: the cap, or any float where HAS_SOFTCAP is False (never read)."""
    return 0.0 if softcap is None else float(softcap)


def forward(q, k, v, doc_ids, causal: bool, window: int, scale: float, o, lse, softcap: float | None = None) -> None:
    """o = attention(q, k, v); lse (B, Hq, Sq) fp32 = logsumexp of each row of scaled (and capped) scores.
    window: the sliding window (with causal), 0 for none. softcap: the scores' soft cap, None for none."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.size(1), k.size(2)
    doc = doc_ids if doc_ids is not None else lse  # an unused pointer when HAS_DOC is False

    def grid(meta):
        return (triton.cdiv(sq, meta["BLOCK_M"]), b * hq)

    with on_device(q.device):
        _launch(_attention_fwd_kernel, grid, (
            q, k, v, o, lse, doc,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            hq, hq // hkv, sq, sk, _bucket(sq, sk), window, scale, scale * LOG2E, _kernel_softcap(softcap),
        ), _common(q, doc_ids, causal, window, softcap))


def backward(do, q, k, v, o, lse, doc_ids, causal: bool, window: int, scale: float, dq, dk, dv,
             softcap: float | None = None) -> None:
    """dq, dk, dv of attention(q, k, v) given the output gradient do and the forward's o and lse (taken with
    the same softcap)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.size(1), k.size(2)
    common = _common(q, doc_ids, causal, window, softcap)
    doc = doc_ids if doc_ids is not None else lse
    delta = torch.empty_like(lse)
    atomic_dq = _dq_by_atomics()
    # With ATOMIC_DQ the dk/dv kernel sums dq into dq32; otherwise DQ32 is never read or written (the
    # autotuner zeroes it while timing, so it is dq, which the dq kernel fills afterwards).
    dq32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic_dq else dq
    with on_device(q.device):
        delta_block = 16 if _backend.triton_interpreted() else 64
        _attention_bwd_delta_kernel[(triton.cdiv(sq, delta_block), b * hq)](
            o, do, delta, *_strides(o), *_strides(do), hq, sq,
            HEAD_DIM=d, BLOCK_D=common["BLOCK_D"], BLOCK_M=delta_block,
        )
        _launch(_attention_bwd_dkdv_kernel, lambda meta: (triton.cdiv(sk, meta["BLOCK_N"]), b * hkv), (
            q, k, v, do, lse, delta, dk, dv, dq32, doc,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            hkv, hq // hkv, sq, sk, _bucket(sq, sk), window, scale, scale * LOG2E, _kernel_softcap(softcap),
        ), dict(ATOMIC_DQ=atomic_dq, **common))
        if atomic_dq:
            dq.copy_(dq32.mul_(scale))
            return
        _launch(_attention_bwd_dq_kernel, lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * hq), (
            q, k, v, do, lse, delta, dq, doc,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            hq, hq // hkv, sq, sk, _bucket(sq, sk), window, scale, scale * LOG2E, _kernel_softcap(softcap),
        ), common)
