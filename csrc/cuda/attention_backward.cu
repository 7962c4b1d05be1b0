// FlashAttention-2 backward on tensor cores (mma.sync m16n8k16, sm80 and newer).
//
// With P = softmax(S), S = scale * q k^T, and the forward's lse (so P = exp(S - lse)):
//   dv = P^T do,  dP = do v^T,  dS = P * (dP - delta),  delta = rowsum(o * do),
//   dq = scale * dS k,  dk = scale * dS^T q.
// Three kernels, no atomics (deterministic):
//   1. delta, one warp per query row;
//   2. dk and dv: a block owns 64 keys (16 per warp, the rows of S^T) of one kv head, keeps its
//      k and v tiles in shared memory and streams 32-row tiles of q and do (cp.async, double
//      buffered) over every query head of its group, so the GQA sum stays in registers;
//   3. dq: a block owns 64 query rows (16 per warp) and streams 64-key tiles of k and v.
// Both recompute P from q, k and lse. Causal tiles that no pair can see are never loaded, nor those
// a sliding window leaves out (dk/dv: query rows more than window - 1 positions after the block's
// last key; dq: keys before the block's first row's window), nor, with documents, the tiles before
// the first or after the last position whose id may be one of the block's (attention_docs.cuh); a
// warp whose pairs are all masked (causal, window or documents) skips its math.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "common/check.h"
#include "cuda/attention.h"
#include "cuda/attention_dispatch.h"
#include "cuda/attention_docs.cuh"
#include "cuda/attention_mma.cuh"

namespace llmkern {
namespace {

using namespace attention_detail;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kKeysPerBlock = 64;   // dk/dv kernel: keys per block, 16 per warp
constexpr int kRowsPerTile = 32;    // dk/dv kernel: query rows per streamed tile
constexpr int kRowsPerBlock = 64;   // dq kernel: query rows per block, 16 per warp
constexpr int kKeysPerTile = 64;    // dq kernel: keys per streamed tile
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
constexpr int dkdv_shared_bytes() {
  return (2 * kKeysPerBlock * D + 2 * 2 * kRowsPerTile * D) * 2;  // k, v; two buffers of q and do
}

template <int D>
constexpr int dq_shared_bytes() {
  return (2 * kRowsPerBlock * D + 2 * 2 * kKeysPerTile * D) * 2;  // q, do; two buffers of k and v
}

// The (batch, head) matrix of a (B, H, S, D) tensor given its element strides.
template <typename T>
__device__ __forceinline__ const T* at(const void* base, const int64_t (&stride)[3], int64_t batch, int64_t head) {
  return static_cast<const T*>(base) + batch * stride[0] + head * stride[1];
}

template <typename T>
__device__ __forceinline__ T* at(void* base, const int64_t (&stride)[3], int64_t batch, int64_t head) {
  return static_cast<T*>(base) + batch * stride[0] + head * stride[1];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(const AttentionBackwardArgs args) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * kWarps + warp;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  if (row >= args.seq_q) return;
  const T* o = at<T>(args.o, args.o_stride, batch, head) + row * args.o_stride[2];
  const T* dout = at<T>(args.dout, args.dout_stride, batch, head) + row * args.dout_stride[2];
  float sum = 0.f;
  for (int d = lane; d < args.head_dim; d += 32) sum += to_float(o[d]) * to_float(dout[d]);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) args.delta[(batch * args.q_heads + head) * args.seq_q + row] = sum;
}

// Stores a warp's 16 x D fp32 accumulator (rows row_lo and row_lo + 8 of this lane) times `mul`.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* base, int64_t row_stride, int row_lo, int rows,
                                           const float (&acc)[D / 8][4], float mul) {
  const int quad_lane = threadIdx.x & 3;
#pragma unroll
  for (int t = 0; t < D / 8; ++t) {
    const int col = t * 8 + quad_lane * 2;
    if (row_lo < rows) {
      *reinterpret_cast<uint32_t*>(base + row_lo * row_stride + col) = pack2<T>(acc[t][0] * mul, acc[t][1] * mul);
    }
    if (row_lo + 8 < rows) {
      *reinterpret_cast<uint32_t*>(base + (row_lo + 8) * row_stride + col) =
          pack2<T>(acc[t][2] * mul, acc[t][3] * mul);
    }
  }
}

template <typename T, int D, bool kCausal, bool kWindow, bool kHasDoc>
__global__ void __launch_bounds__(kThreads)
    attention_dkdv_kernel(const AttentionBackwardArgs args, float scale_log2) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* s_k = reinterpret_cast<T*>(shared_raw);  // [kKeysPerBlock][D]
  T* s_v = s_k + kKeysPerBlock * D;            // [kKeysPerBlock][D]
  T* s_q = s_v + kKeysPerBlock * D;            // [2][kRowsPerTile][D]
  T* s_do = s_q + 2 * kRowsPerTile * D;        // [2][kRowsPerTile][D]

  const int n0 = blockIdx.x * kKeysPerBlock;
  const int kv_head = blockIdx.y;
  const int batch = blockIdx.z;
  const int group_size = static_cast<int>(args.q_heads / args.kv_heads);
  const int seq_q = static_cast<int>(args.seq_q);
  const int seq_k = static_cast<int>(args.seq_k);
  const int causal_shift = seq_k - seq_q;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int quad_lane = lane & 3;
  const int warp_key0 = n0 + warp * 16;
  const int key_lo = warp_key0 + (lane >> 2);  // the two rows of S^T (keys) this lane holds
  const int key_hi = key_lo + 8;

  // Query tiles: for each head of the group, rows [start_m, end_m) in steps of kRowsPerTile. Causal
  // starts them at the first key's row; a window ends them at the last row within window - 1 positions
  // of the last key (int64: seq_q + window may pass INT_MAX).
  int start_m = 0;
  if (kCausal) start_m = max(0, n0 - causal_shift) / kRowsPerTile * kRowsPerTile;
  int end_m = seq_q;
  if (kWindow) {
    const int64_t last_key = min(n0 + kKeysPerBlock, seq_k) - 1;
    end_m = static_cast<int>(min(static_cast<int64_t>(seq_q), last_key - causal_shift + args.window));
  }
  int tiles_per_head = start_m < end_m ? (end_m - start_m + kRowsPerTile - 1) / kRowsPerTile : 0;
  if (kHasDoc && tiles_per_head > 0) {  // only the query tiles whose ids may be this block's keys'
    const int2 tiles = doc_tiles(args.doc_ids + batch * args.seq_q, n0, min(n0 + kKeysPerBlock, seq_k), start_m,
                                 end_m, kRowsPerTile);
    start_m = tiles.x * kRowsPerTile;
    tiles_per_head = tiles.y - tiles.x;
  }
  const int num_tiles = tiles_per_head * group_size;

  const T* k = at<T>(args.k, args.k_stride, batch, kv_head);
  const T* v = at<T>(args.v, args.v_stride, batch, kv_head);
  auto tile_head = [&](int tile) { return kv_head * group_size + tile / tiles_per_head; };
  auto tile_row0 = [&](int tile) { return start_m + (tile % tiles_per_head) * kRowsPerTile; };
  auto prefetch = [&](int tile, int buf) {
    const int head = tile_head(tile);
    const int m0 = tile_row0(tile);
    load_tile_async<T, D, kRowsPerTile, kThreads>(s_q + buf * kRowsPerTile * D, at<T>(args.q, args.q_stride, batch, head),
                                                  args.q_stride[2], m0, seq_q);
    load_tile_async<T, D, kRowsPerTile, kThreads>(s_do + buf * kRowsPerTile * D,
                                                  at<T>(args.dout, args.dout_stride, batch, head),
                                                  args.dout_stride[2], m0, seq_q);
  };

  load_tile_async<T, D, kKeysPerBlock, kThreads>(s_k, k, args.k_stride[2], n0, seq_k);
  load_tile_async<T, D, kKeysPerBlock, kThreads>(s_v, v, args.v_stride[2], n0, seq_k);
  if (num_tiles > 0) prefetch(0, 0);
  cp_async_commit();

  int doc_key_lo = 0, doc_key_hi = 0;
  if (kHasDoc) {
    const int32_t* doc = args.doc_ids + batch * args.seq_k;
    doc_key_lo = key_lo < seq_k ? doc[key_lo] : -2;
    doc_key_hi = key_hi < seq_k ? doc[key_hi] : -2;
  }

  constexpr int kRowTiles = kRowsPerTile / 8;  // 8-row column tiles of S^T
  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int buf = tile & 1;
    cp_async_wait<0>();
    __syncthreads();  // this tile (and k, v) is in shared memory; every warp is done with tile - 1
    if (tile + 1 < num_tiles) {
      prefetch(tile + 1, buf ^ 1);
      cp_async_commit();
    }
    const int head = tile_head(tile);
    const int m0 = tile_row0(tile);
    if (kCausal && warp_key0 > m0 + kRowsPerTile - 1 + causal_shift) continue;  // no row sees these keys
    // the tile's first row is already past the window of the warp's last key
    if (kWindow && m0 + causal_shift - (warp_key0 + 15) >= args.window) continue;
    const T* tile_q = s_q + buf * kRowsPerTile * D;
    const T* tile_do = s_do + buf * kRowsPerTile * D;

    // Per column (query row) of S^T this lane holds: lse (log2 units), delta, doc id.
    const int64_t row_base = (batch * args.q_heads + head) * args.seq_q;
    float lse_log2[kRowTiles][2], delta[kRowTiles][2];
    int doc_q[kRowTiles][2];
    bool any_same = !kHasDoc;
#pragma unroll
    for (int t = 0; t < kRowTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int row = m0 + t * 8 + quad_lane * 2 + e;
        const bool valid = row < seq_q;
        // +inf for a padding row makes its P exactly 0.
        lse_log2[t][e] = valid ? args.lse[row_base + row] * kLog2e : INFINITY;
        delta[t][e] = valid ? args.delta[row_base + row] : 0.f;
        if (kHasDoc) {
          doc_q[t][e] = valid ? args.doc_ids[batch * args.seq_q + row] : -1;
          any_same |= doc_q[t][e] == doc_key_lo || doc_q[t][e] == doc_key_hi;
        }
      }
    }
    if (kHasDoc && !__any_sync(0xffffffffu, any_same)) continue;

    // S^T = k q^T: this warp's 16 keys x the tile's 32 rows.
    float st[kRowTiles][4];
    mma_abt<D>(st, s_k, warp * 16, tile_q);

    // P^T = exp2(S^T * scale_log2 - lse), 0 where masked. Keys past seq_k need no mask: their
    // rows of S^T only feed their own rows of dk and dv, which are never stored.
    const bool on_diagonal = kCausal && warp_key0 + 15 > m0 + causal_shift;
    // the tile's last row is past the window of the warp's first key
    const bool on_window_edge = kWindow && m0 + kRowsPerTile - 1 + causal_shift - warp_key0 >= args.window;
#pragma unroll
    for (int t = 0; t < kRowTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = e < 2 ? key_lo : key_hi;
        const int row = m0 + t * 8 + quad_lane * 2 + (e & 1);
        bool ok = true;
        if (on_diagonal) ok = key <= row + causal_shift;
        if (on_window_edge) ok = ok && row + causal_shift - key < args.window;
        if (kHasDoc) ok = ok && doc_q[t][e & 1] == (e < 2 ? doc_key_lo : doc_key_hi);
        st[t][e] = ok ? exp2f(st[t][e] * scale_log2 - lse_log2[t][e & 1]) : 0.f;
      }
    }

    mma_cb(dv, st, tile_do);  // dv += P^T do

    // dP^T = v do^T, then dS^T = P^T * (dP^T - delta) in place.
    float dst[kRowTiles][4];
    mma_abt<D>(dst, s_v, warp * 16, tile_do);
#pragma unroll
    for (int t = 0; t < kRowTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[t][e] = st[t][e] * (dst[t][e] - delta[t][e & 1]);
    }

    mma_cb(dk, dst, tile_q);  // dk += dS^T q
  }
  cp_async_wait<0>();  // nothing may still write shared memory when the block exits

  const float scale = scale_log2 / kLog2e;
  store_rows<T, D>(at<T>(args.dk, args.dk_stride, batch, kv_head), args.dk_stride[2], key_lo, seq_k, dk, scale);
  store_rows<T, D>(at<T>(args.dv, args.dv_stride, batch, kv_head), args.dv_stride[2], key_lo, seq_k, dv, 1.f);
}

template <typename T, int D, bool kCausal, bool kWindow, bool kHasDoc>
__global__ void __launch_bounds__(kThreads)
    attention_dq_kernel(const AttentionBackwardArgs args, int num_m_blocks, float scale_log2) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* s_q = reinterpret_cast<T*>(shared_raw);  // [kRowsPerBlock][D]
  T* s_do = s_q + kRowsPerBlock * D;           // [kRowsPerBlock][D]
  T* s_k = s_do + kRowsPerBlock * D;           // [2][kKeysPerTile][D]
  T* s_v = s_k + 2 * kKeysPerTile * D;         // [2][kKeysPerTile][D]

  const int m_block = kCausal ? num_m_blocks - 1 - blockIdx.x : blockIdx.x;  // longest first
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int kv_head = head / static_cast<int>(args.q_heads / args.kv_heads);
  const int seq_q = static_cast<int>(args.seq_q);
  const int seq_k = static_cast<int>(args.seq_k);
  const int causal_shift = seq_k - seq_q;
  const int m0 = m_block * kRowsPerBlock;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int quad_lane = lane & 3;
  const int row_lo = m0 + warp * 16 + (lane >> 2);
  const int row_hi = row_lo + 8;

  const T* k = at<T>(args.k, args.k_stride, batch, kv_head);
  const T* v = at<T>(args.v, args.v_stride, batch, kv_head);
  // Key tiles [first_tile, end_tile): from the first key the first row's window holds to the last key
  // some row sees, and with documents only those whose ids may be this block's rows'.
  int n_end = seq_k;
  if (kCausal) n_end = min(seq_k, m0 + kRowsPerBlock + causal_shift);
  int n_begin = 0;
  if (kWindow) n_begin = max(0, m0 + causal_shift - args.window + 1);
  int first_tile = n_begin / kKeysPerTile;
  int end_tile = n_end > 0 ? (n_end + kKeysPerTile - 1) / kKeysPerTile : 0;
  if (kHasDoc && end_tile > 0) {
    const int2 tiles = doc_tiles(args.doc_ids + batch * args.seq_q, m0, min(m0 + kRowsPerBlock, seq_q), n_begin,
                                 n_end, kKeysPerTile);
    first_tile = tiles.x;
    end_tile = tiles.y;
  }

  load_tile_async<T, D, kRowsPerBlock, kThreads>(s_q, at<T>(args.q, args.q_stride, batch, head), args.q_stride[2], m0,
                                                 seq_q);
  load_tile_async<T, D, kRowsPerBlock, kThreads>(s_do, at<T>(args.dout, args.dout_stride, batch, head),
                                                 args.dout_stride[2], m0, seq_q);
  if (first_tile < end_tile) {
    load_tile_async<T, D, kKeysPerTile, kThreads>(s_k, k, args.k_stride[2], first_tile * kKeysPerTile, seq_k);
    load_tile_async<T, D, kKeysPerTile, kThreads>(s_v, v, args.v_stride[2], first_tile * kKeysPerTile, seq_k);
  }
  cp_async_commit();

  const int64_t row_base = (batch * args.q_heads + head) * args.seq_q;
  const float lse_lo = row_lo < seq_q ? args.lse[row_base + row_lo] * kLog2e : INFINITY;
  const float lse_hi = row_hi < seq_q ? args.lse[row_base + row_hi] * kLog2e : INFINITY;
  const float delta_lo = row_lo < seq_q ? args.delta[row_base + row_lo] : 0.f;
  const float delta_hi = row_hi < seq_q ? args.delta[row_base + row_hi] : 0.f;
  int doc_lo = 0, doc_hi = 0;
  if (kHasDoc) {
    const int32_t* doc = args.doc_ids + batch * args.seq_q;
    doc_lo = row_lo < seq_q ? doc[row_lo] : -1;
    doc_hi = row_hi < seq_q ? doc[row_hi] : -1;
  }

  constexpr int kNTiles = kKeysPerTile / 8;
  float dq[D / 8][4];
  zero(dq);

  for (int tile = first_tile; tile < end_tile; ++tile) {
    const int n0 = tile * kKeysPerTile;
    const int buf = (tile - first_tile) & 1;
    cp_async_wait<0>();
    __syncthreads();
    if (tile + 1 < end_tile) {
      load_tile_async<T, D, kKeysPerTile, kThreads>(s_k + (buf ^ 1) * kKeysPerTile * D, k, args.k_stride[2],
                                                    n0 + kKeysPerTile, seq_k);
      load_tile_async<T, D, kKeysPerTile, kThreads>(s_v + (buf ^ 1) * kKeysPerTile * D, v, args.v_stride[2],
                                                    n0 + kKeysPerTile, seq_k);
      cp_async_commit();
    }
    if (kCausal && n0 > m0 + warp * 16 + 15 + causal_shift) continue;
    if (kWindow && n0 + kKeysPerTile - 1 < m0 + warp * 16 + causal_shift - args.window + 1) continue;
    const T* tile_k = s_k + buf * kKeysPerTile * D;
    const T* tile_v = s_v + buf * kKeysPerTile * D;

    int doc_k[kNTiles][2];
    if (kHasDoc) {
      const bool any_same = load_key_doc_ids(doc_k, args.doc_ids + batch * args.seq_k, n0, seq_k, doc_lo, doc_hi);
      if (!__any_sync(0xffffffffu, any_same)) continue;
    }

    // S = q k^T, then P = exp2(S * scale_log2 - lse) with masked pairs 0.
    float s[kNTiles][4];
    mma_abt<D>(s, s_q, warp * 16, tile_k);
    const bool partial = n0 + kKeysPerTile > seq_k;
    const bool on_diagonal = kCausal && n0 + kKeysPerTile - 1 > m0 + warp * 16 + causal_shift;
    const bool on_window_edge = kWindow && n0 < m0 + warp * 16 + 15 + causal_shift - args.window + 1;
    const bool need_mask = partial || on_diagonal || on_window_edge || kHasDoc;
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        bool ok = true;
        if (need_mask) {
          const int key = n0 + t * 8 + quad_lane * 2 + (e & 1);
          const int row = e < 2 ? row_lo : row_hi;
          ok = key < seq_k;
          if (kCausal) ok = ok && key <= row + causal_shift;
          if (kWindow) ok = ok && row + causal_shift - key < args.window;
          if (kHasDoc) ok = ok && doc_k[t][e & 1] == (e < 2 ? doc_lo : doc_hi);
        }
        s[t][e] = ok ? exp2f(s[t][e] * scale_log2 - (e < 2 ? lse_lo : lse_hi)) : 0.f;
      }
    }

    // dP = do v^T, then dS = P * (dP - delta) in place.
    float ds[kNTiles][4];
    mma_abt<D>(ds, s_do, warp * 16, tile_v);
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) {
      ds[t][0] = s[t][0] * (ds[t][0] - delta_lo);
      ds[t][1] = s[t][1] * (ds[t][1] - delta_lo);
      ds[t][2] = s[t][2] * (ds[t][2] - delta_hi);
      ds[t][3] = s[t][3] * (ds[t][3] - delta_hi);
    }

    mma_cb(dq, ds, tile_k);  // dq += dS k
  }
  cp_async_wait<0>();

  store_rows<T, D>(at<T>(args.dq, args.dq_stride, batch, head), args.dq_stride[2], row_lo, seq_q, dq,
                   scale_log2 / kLog2e);
}

template <typename T, int D, bool kCausal, bool kWindow, bool kHasDoc>
cudaError_t launch_backward(const AttentionBackwardArgs& args, cudaStream_t stream) {
  LLMKERN_RETURN_IF_ERROR(check_device_is_sm80());  // after every argument check
  const float scale_log2 = args.scale * kLog2e;
  const unsigned q_heads = static_cast<unsigned>(args.q_heads);
  const unsigned kv_heads = static_cast<unsigned>(args.kv_heads);
  const unsigned batch = static_cast<unsigned>(args.batch);

  const dim3 delta_grid(static_cast<unsigned>((args.seq_q + kWarps - 1) / kWarps), q_heads, batch);
  attention_delta_kernel<T><<<delta_grid, kThreads, 0, stream>>>(args);
  LLMKERN_RETURN_IF_ERROR(cudaGetLastError());

  auto dkdv = attention_dkdv_kernel<T, D, kCausal, kWindow, kHasDoc>;
  constexpr int kDkdvShared = dkdv_shared_bytes<D>();
  LLMKERN_RETURN_IF_ERROR(cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, kDkdvShared));
  const dim3 dkdv_grid(static_cast<unsigned>((args.seq_k + kKeysPerBlock - 1) / kKeysPerBlock), kv_heads, batch);
  dkdv<<<dkdv_grid, kThreads, kDkdvShared, stream>>>(args, scale_log2);
  LLMKERN_RETURN_IF_ERROR(cudaGetLastError());

  auto dq = attention_dq_kernel<T, D, kCausal, kWindow, kHasDoc>;
  constexpr int kDqShared = dq_shared_bytes<D>();
  LLMKERN_RETURN_IF_ERROR(cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, kDqShared));
  const int num_m_blocks = static_cast<int>((args.seq_q + kRowsPerBlock - 1) / kRowsPerBlock);
  const dim3 dq_grid(static_cast<unsigned>(num_m_blocks), q_heads, batch);
  dq<<<dq_grid, kThreads, kDqShared, stream>>>(args, num_m_blocks, scale_log2);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_backward(const AttentionBackwardArgs& args, cudaStream_t stream) {
  LLMKERN_RETURN_INVALID_IF(!args.q || !args.k || !args.v || !args.o || !args.dout || !args.lse);
  LLMKERN_RETURN_INVALID_IF(!args.dq || !args.dk || !args.dv || !args.delta);
  LLMKERN_RETURN_INVALID_IF(args.batch < 1 || args.q_heads < 1 || args.kv_heads < 1);
  LLMKERN_RETURN_INVALID_IF(args.q_heads % args.kv_heads != 0);
  LLMKERN_RETURN_INVALID_IF(args.batch > 65535 || args.q_heads > 65535);
  LLMKERN_RETURN_INVALID_IF(args.seq_q < 1 || args.seq_k < 1 || args.seq_q > (1 << 30) || args.seq_k > (1 << 30));
  LLMKERN_RETURN_INVALID_IF(!attention_supports_head_dim(args.head_dim));
  LLMKERN_RETURN_INVALID_IF(args.doc_ids != nullptr && args.seq_q != args.seq_k);
  for (const void* p : {args.q, args.k, args.v, static_cast<const void*>(args.dout)}) {
    LLMKERN_RETURN_INVALID_IF(misaligned(p));
  }
  for (const void* p : {args.dq, args.dk, args.dv}) LLMKERN_RETURN_INVALID_IF(misaligned(p));
  LLMKERN_RETURN_INVALID_IF(!strides_ok(args.q_stride) || !strides_ok(args.k_stride) || !strides_ok(args.v_stride) ||
                            !strides_ok(args.dout_stride) || !strides_ok(args.dq_stride) ||
                            !strides_ok(args.dk_stride) || !strides_ok(args.dv_stride));
  LLMKERN_RETURN_INVALID_IF(!(args.scale > 0.f));
  LLMKERN_RETURN_INVALID_IF(args.window < 0 || (args.window > 0 && !args.causal));
  return dispatch_attention(args.dtype, args.head_dim, args.causal, window_masks(args.causal, args.window, args.seq_k),
                            args.doc_ids != nullptr, [&](auto t, auto d, auto causal, auto window, auto has_doc) {
                              return launch_backward<decltype(t), decltype(d)::value, decltype(causal)::value,
                                                     decltype(window)::value, decltype(has_doc)::value>(args, stream);
                            });
}

}  // namespace llmkern
