// Document masking's tile range: which tiles of positions a block of the attention kernels walks.
//
// With doc ids, a block's rows (query rows, or keys in the dk/dv kernel) can pair only with the
// positions whose ids lie within the range of its own ids. The block first reads the ids alone,
// each thread a strided share, for the first and the last such position, and walks only the tiles
// between: for packed rows (each document one run of positions) exactly the tiles of its
// documents, where it used to load every tile up to the causal end and read each tile's ids.
// Ids that come back later in a row leave tiles inside the range that share no document with the
// block; the per-element masks zero those, so any ids stay correct.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace llmkern {
namespace attention_detail {

// (min of lo, max of hi) over the block, on every thread. `scratch` holds 64 ints of shared
// memory; the leading barrier lets a second call reuse it.
__device__ __forceinline__ int2 block_min_max(int lo, int hi, int* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, offset));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = lo;
    scratch[32 + warp] = hi;
  }
  __syncthreads();
  lo = lane < num_warps ? scratch[lane] : INT_MAX;
  hi = lane < num_warps ? scratch[32 + lane] : INT_MIN;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, offset));
  }
  return make_int2(lo, hi);
}

// The tiles [first, end) a block walks, tile t holding positions [t * tile, (t + 1) * tile): those
// from the first to the last position in [lo, hi) of the batch row's ids `doc` whose id lies within
// the range of the ids at the block's own positions [own_lo, own_hi). (0, 0) when there is none.
// Every thread of the block calls it (it has barriers).
__device__ __forceinline__ int2 doc_tiles(const int32_t* doc, int own_lo, int own_hi, int lo, int hi, int tile) {
  __shared__ int scratch[64];
  int id_lo = INT_MAX, id_hi = INT_MIN;
  for (int i = own_lo + static_cast<int>(threadIdx.x); i < own_hi; i += blockDim.x) {
    id_lo = min(id_lo, doc[i]);
    id_hi = max(id_hi, doc[i]);
  }
  const int2 ids = block_min_max(id_lo, id_hi, scratch);
  int first = INT_MAX, last = INT_MIN;
  for (int i = lo + static_cast<int>(threadIdx.x); i < hi; i += blockDim.x) {
    const int id = doc[i];
    if (id >= ids.x && id <= ids.y) {
      first = min(first, i);
      last = max(last, i);
    }
  }
  const int2 found = block_min_max(first, last, scratch);
  if (found.x > found.y) return make_int2(0, 0);
  return make_int2(found.x / tile, found.y / tile + 1);
}

// The doc ids of the key columns this lane holds in a warp's 16 x (8 * kNTiles) tile of S starting at
// key n0 (-2 past seq_k, matching no row), and whether any of them is one of its rows' ids
// (doc_lo, doc_hi): the caller skips a tile where no lane of the warp has such a pair.
template <int kNTiles>
__device__ __forceinline__ bool load_key_doc_ids(int (&doc_k)[kNTiles][2], const int32_t* doc, int n0, int seq_k,
                                                 int doc_lo, int doc_hi) {
  const int quad_lane = threadIdx.x & 3;
  bool any_same = false;
#pragma unroll
  for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int key = n0 + t * 8 + quad_lane * 2 + e;
      doc_k[t][e] = key < seq_k ? doc[key] : -2;
      any_same |= doc_k[t][e] == doc_lo || doc_k[t][e] == doc_hi;
    }
  }
  return any_same;
}

}  // namespace attention_detail
}  // namespace llmkern
