// FlashAttention-2 forward on tensor cores (mma.sync m16n8k16, sm80 and newer).
//
// One block of kWarps warps per (16 * kWarps query rows, head, batch); each warp owns 16 rows.
// kWarps is 4 (64 rows) or 8 (128 rows: every k/v tile read from L2 serves twice the rows, for the
// same registers a thread; one such block fits an SM where two 4-warp blocks do).
// The block keeps its q tile in registers (as mma A fragments) and streams 64-key tiles of k
// and v through shared memory with cp.async, double-buffered: the copy of tile j+1 runs while
// tile j is multiplied. Per tile, each warp computes S = q k^T (16 x 64, fp32 accumulators),
// masks it, updates its running row max m and row sum l (online softmax, exp2 in log2 units),
// rescales its output accumulator and adds P v with P taken straight from S's registers.
// At the end o = acc / l and lse = (m + log2 l) * ln 2 are written.
//
// Masks: keys past seq_k, causal (bottom-right aligned), a sliding window (with causal), documents
// (equal doc ids). Tiles past the causal diagonal are never loaded, nor those before the first row's
// window; with documents, only the tiles from the first to the last key whose id may be one of the
// block's (attention_docs.cuh), and a warp whose 16 x 64 tile is fully masked skips its math (the ids
// are compared per element, so any ids work).
#include "cuda/attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "common/check.h"
#include "cuda/attention_dispatch.h"
#include "cuda/attention_docs.cuh"
#include "cuda/attention_mma.cuh"

namespace llmkern {
namespace {

using namespace attention_detail;

constexpr int kBlockN = 64;  // keys per k/v tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D, int kWarps>
constexpr int shared_bytes() {
  // q tile + two k tiles + two v tiles, 2-byte elements
  return (16 * kWarps * D + 2 * kBlockN * D + 2 * kBlockN * D) * 2;
}

template <typename T, int D, bool kCausal, bool kWindow, bool kHasDoc, int kWarps>
__global__ void __launch_bounds__(kWarps * 32)
    attention_forward_kernel(const AttentionForwardArgs args, int num_m_blocks, float scale_log2) {
  constexpr int kBlockM = 16 * kWarps;  // query rows per block
  constexpr int kThreads = kWarps * 32;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* s_q = reinterpret_cast<T*>(shared_raw);
  T* s_k = s_q + kBlockM * D;        // [2][kBlockN * D]
  T* s_v = s_k + 2 * kBlockN * D;    // [2][kBlockN * D]

  // Causal blocks far down the diagonal have the most work: launch them first.
  const int m_block = kCausal ? num_m_blocks - 1 - blockIdx.x : blockIdx.x;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int kv_head = head / static_cast<int>(args.q_heads / args.kv_heads);
  const int seq_q = static_cast<int>(args.seq_q);
  const int seq_k = static_cast<int>(args.seq_k);
  const int m0 = m_block * kBlockM;
  const int causal_shift = seq_k - seq_q;

  const T* q = static_cast<const T*>(args.q) + batch * args.q_stride[0] + head * args.q_stride[1];
  const T* k = static_cast<const T*>(args.k) + batch * args.k_stride[0] + kv_head * args.k_stride[1];
  const T* v = static_cast<const T*>(args.v) + batch * args.v_stride[0] + kv_head * args.v_stride[1];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane >> 2;      // the fragment row (and row + 8) this lane holds
  const int quad_lane = lane & 3;   // which pair of columns
  const int row_lo = m0 + warp * 16 + group;  // the two query rows of this lane
  const int row_hi = row_lo + 8;

  // Keys [n_begin, n_end) can be seen by some row of this block: tiles [first_tile, end_tile). Causal
  // ends them at the last row's position; a window starts them window - 1 keys before the first row's.
  int n_end = seq_k;
  if (kCausal) n_end = min(seq_k, m0 + kBlockM + causal_shift);
  int n_begin = 0;
  if (kWindow) n_begin = max(0, m0 + causal_shift - args.window + 1);
  int first_tile = n_begin / kBlockN;
  int end_tile = n_end > 0 ? (n_end + kBlockN - 1) / kBlockN : 0;

  int doc_lo = 0, doc_hi = 0;
  if (kHasDoc) {
    const int32_t* doc = args.doc_ids + batch * args.seq_q;
    doc_lo = row_lo < seq_q ? doc[row_lo] : -1;
    doc_hi = row_hi < seq_q ? doc[row_hi] : -1;
    const int2 tiles = doc_tiles(doc, m0, min(m0 + kBlockM, seq_q), n_begin, max(n_end, 0), kBlockN);
    first_tile = tiles.x;
    end_tile = tiles.y;
  }

  constexpr int kSteps = D / 16;       // 16-wide k-steps of q k^T
  constexpr int kNTiles = kBlockN / 8; // 8-key column tiles of S
  constexpr int kDTiles = D / 8;       // 8-wide column tiles of o
  uint32_t q_frag[kSteps][4];
  float acc[kDTiles][4];
  zero(acc);
  float m_lo = -INFINITY, m_hi = -INFINITY;  // running row max, log2 units
  float l_lo = 0.f, l_hi = 0.f;              // this lane's share of the row sums

  if (first_tile < end_tile) {
    load_tile_async<T, D, kBlockM, kThreads>(s_q, q, args.q_stride[2], m0, seq_q);
    load_tile_async<T, D, kBlockN, kThreads>(s_k, k, args.k_stride[2], first_tile * kBlockN, seq_k);
    load_tile_async<T, D, kBlockN, kThreads>(s_v, v, args.v_stride[2], first_tile * kBlockN, seq_k);
    cp_async_commit();
  }

  for (int tile = first_tile; tile < end_tile; ++tile) {
    const int n0 = tile * kBlockN;
    const int buf = (tile - first_tile) & 1;
    cp_async_wait<0>();
    __syncthreads();  // tile `tile` is in shared memory, and every warp is done with tile - 1
    if (tile + 1 < end_tile) {  // prefetch the next tile into the buffer tile - 1 used
      load_tile_async<T, D, kBlockN, kThreads>(s_k + (buf ^ 1) * kBlockN * D, k, args.k_stride[2], n0 + kBlockN, seq_k);
      load_tile_async<T, D, kBlockN, kThreads>(s_v + (buf ^ 1) * kBlockN * D, v, args.v_stride[2], n0 + kBlockN, seq_k);
      cp_async_commit();
    }
    if (tile == first_tile) {
#pragma unroll
      for (int kk = 0; kk < kSteps; ++kk) load_a<D>(q_frag[kk], s_q, warp * 16, kk * 16);
    }
    const T* tile_k = s_k + buf * kBlockN * D;
    const T* tile_v = s_v + buf * kBlockN * D;

    // Does this tile need per-element masks, and does this warp see any of it?
    const bool partial = n0 + kBlockN > seq_k;
    const bool on_diagonal = kCausal && n0 + kBlockN - 1 > m0 + warp * 16 + causal_shift;
    // The window's lower edge: the tile starts before the first key the warp's last row sees.
    const bool on_window_edge = kWindow && n0 < m0 + warp * 16 + 15 + causal_shift - args.window + 1;
    const bool need_mask = partial || on_diagonal || on_window_edge || kHasDoc;
    if (kCausal && n0 > m0 + warp * 16 + 15 + causal_shift) continue;  // all above this warp's diagonal
    // all before the first key the warp's first row sees
    if (kWindow && n0 + kBlockN - 1 < m0 + warp * 16 + causal_shift - args.window + 1) continue;
    int doc_k[kNTiles][2];
    if (kHasDoc) {
      const bool any_same = load_key_doc_ids(doc_k, args.doc_ids + batch * args.seq_k, n0, seq_k, doc_lo, doc_hi);
      if (!__any_sync(0xffffffffu, any_same)) continue;  // no pair of this warp's tile may attend
    }

    // S = q k^T for this warp's 16 rows and the tile's 64 keys.
    float s[kNTiles][4];
    zero(s);
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) mma_step_abt<D>(s, q_frag[kk], tile_k, kk);

    // Scale into log2 units, mask, and take this lane's row maxima.
    float tile_max_lo = -INFINITY, tile_max_hi = -INFINITY;
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[t][e] * scale_log2;
        if (need_mask) {
          const int key = n0 + t * 8 + quad_lane * 2 + (e & 1);
          const int row = e < 2 ? row_lo : row_hi;
          bool ok = key < seq_k;
          if (kCausal) ok = ok && key <= row + causal_shift;
          if (kWindow) ok = ok && row + causal_shift - key < args.window;
          if (kHasDoc) ok = ok && doc_k[t][e & 1] == (e < 2 ? doc_lo : doc_hi);
          x = ok ? x : -INFINITY;
        }
        s[t][e] = x;
      }
      tile_max_lo = fmaxf(tile_max_lo, fmaxf(s[t][0], s[t][1]));
      tile_max_hi = fmaxf(tile_max_hi, fmaxf(s[t][2], s[t][3]));
    }
    // The 4 lanes of a quad hold one row between them.
#pragma unroll
    for (int offset = 1; offset < 4; offset <<= 1) {
      tile_max_lo = fmaxf(tile_max_lo, __shfl_xor_sync(0xffffffffu, tile_max_lo, offset));
      tile_max_hi = fmaxf(tile_max_hi, __shfl_xor_sync(0xffffffffu, tile_max_hi, offset));
    }
    const float new_m_lo = fmaxf(m_lo, tile_max_lo);
    const float new_m_hi = fmaxf(m_hi, tile_max_hi);
    // A row with no visible key so far keeps m = -inf; shifting by 0 makes its p exactly 0.
    const float shift_lo = new_m_lo == -INFINITY ? 0.f : new_m_lo;
    const float shift_hi = new_m_hi == -INFINITY ? 0.f : new_m_hi;
    const float alpha_lo = exp2f(m_lo - shift_lo);
    const float alpha_hi = exp2f(m_hi - shift_hi);
    m_lo = new_m_lo;
    m_hi = new_m_hi;
    l_lo *= alpha_lo;
    l_hi *= alpha_hi;
#pragma unroll
    for (int t = 0; t < kDTiles; ++t) {
      acc[t][0] *= alpha_lo;
      acc[t][1] *= alpha_lo;
      acc[t][2] *= alpha_hi;
      acc[t][3] *= alpha_hi;
    }
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) {
      s[t][0] = exp2f(s[t][0] - shift_lo);
      s[t][1] = exp2f(s[t][1] - shift_lo);
      s[t][2] = exp2f(s[t][2] - shift_hi);
      s[t][3] = exp2f(s[t][3] - shift_hi);
      l_lo += s[t][0] + s[t][1];
      l_hi += s[t][2] + s[t][3];
    }

    // acc += P v, P's A fragments made of S's C fragments.
    mma_cb(acc, s, tile_v);
  }

  // Whole row sums, then o = acc / l (0 for a row that saw nothing) and lse.
#pragma unroll
  for (int offset = 1; offset < 4; offset <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, offset);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, offset);
  }
  const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f;
  const float inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
  T* o = static_cast<T*>(args.o) + batch * args.o_stride[0] + head * args.o_stride[1];
#pragma unroll
  for (int t = 0; t < kDTiles; ++t) {
    const int col = t * 8 + quad_lane * 2;
    if (row_lo < seq_q) {
      *reinterpret_cast<uint32_t*>(o + row_lo * args.o_stride[2] + col) =
          pack2<T>(acc[t][0] * inv_lo, acc[t][1] * inv_lo);
    }
    if (row_hi < seq_q) {
      *reinterpret_cast<uint32_t*>(o + row_hi * args.o_stride[2] + col) =
          pack2<T>(acc[t][2] * inv_hi, acc[t][3] * inv_hi);
    }
  }
  if (quad_lane == 0) {
    float* lse = args.lse + (batch * args.q_heads + head) * args.seq_q;
    if (row_lo < seq_q) lse[row_lo] = l_lo > 0.f ? (m_lo + log2f(l_lo)) * kLn2 : INFINITY;
    if (row_hi < seq_q) lse[row_hi] = l_hi > 0.f ? (m_hi + log2f(l_hi)) * kLn2 : INFINITY;
  }
}

template <typename T, int D, bool kCausal, bool kWindow, bool kHasDoc, int kWarps>
cudaError_t launch_forward_with(const AttentionForwardArgs& args, cudaStream_t stream) {
  auto kernel = attention_forward_kernel<T, D, kCausal, kWindow, kHasDoc, kWarps>;
  constexpr int kShared = shared_bytes<D, kWarps>();
  LLMKERN_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kShared));
  const int num_m_blocks = static_cast<int>((args.seq_q + 16 * kWarps - 1) / (16 * kWarps));
  const dim3 grid(num_m_blocks, static_cast<unsigned>(args.q_heads), static_cast<unsigned>(args.batch));
  kernel<<<grid, kWarps * 32, kShared, stream>>>(args, num_m_blocks, args.scale * kLog2e);
  return cudaGetLastError();
}

template <typename T, int D, bool kCausal, bool kWindow, bool kHasDoc>
cudaError_t launch_forward(const AttentionForwardArgs& args, cudaStream_t stream) {
  LLMKERN_RETURN_IF_ERROR(check_device_is_sm80());  // after every argument check
  if (args.block_rows == 128) return launch_forward_with<T, D, kCausal, kWindow, kHasDoc, 8>(args, stream);
  return launch_forward_with<T, D, kCausal, kWindow, kHasDoc, 4>(args, stream);
}

}  // namespace

bool attention_supports_head_dim(int64_t head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 96 || head_dim == 128;
}

cudaError_t attention_forward(const AttentionForwardArgs& args, cudaStream_t stream) {
  LLMKERN_RETURN_INVALID_IF(!args.q || !args.k || !args.v || !args.o || !args.lse);
  LLMKERN_RETURN_INVALID_IF(args.batch < 1 || args.q_heads < 1 || args.kv_heads < 1);
  LLMKERN_RETURN_INVALID_IF(args.q_heads % args.kv_heads != 0);
  LLMKERN_RETURN_INVALID_IF(args.batch > 65535 || args.q_heads > 65535);
  LLMKERN_RETURN_INVALID_IF(args.seq_q < 1 || args.seq_k < 1 || args.seq_q > (1 << 30) || args.seq_k > (1 << 30));
  LLMKERN_RETURN_INVALID_IF(!attention_supports_head_dim(args.head_dim));
  LLMKERN_RETURN_INVALID_IF(args.doc_ids != nullptr && args.seq_q != args.seq_k);
  LLMKERN_RETURN_INVALID_IF(misaligned(args.q) || misaligned(args.k) || misaligned(args.v) || misaligned(args.o));
  LLMKERN_RETURN_INVALID_IF(!strides_ok(args.q_stride) || !strides_ok(args.k_stride) ||
                            !strides_ok(args.v_stride) || !strides_ok(args.o_stride));
  LLMKERN_RETURN_INVALID_IF(!(args.scale > 0.f));
  LLMKERN_RETURN_INVALID_IF(args.block_rows != 0 && args.block_rows != 64 && args.block_rows != 128);
  LLMKERN_RETURN_INVALID_IF(args.window < 0 || (args.window > 0 && !args.causal));
  return dispatch_attention(args.dtype, args.head_dim, args.causal, window_masks(args.causal, args.window, args.seq_k),
                            args.doc_ids != nullptr, [&](auto t, auto d, auto causal, auto window, auto has_doc) {
                              return launch_forward<decltype(t), decltype(d)::value, decltype(causal)::value,
                                                    decltype(window)::value, decltype(has_doc)::value>(args, stream);
                            });
}

}  // namespace llmkern
