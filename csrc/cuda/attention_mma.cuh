// The sm80+ tensor-core building blocks of the attention kernels: operand loads from swizzled
// shared tiles, fp32 <-> fragment packing, tile copies; the instructions themselves (cp.async,
// ldmatrix, mma.sync) are in attention_ptx.cuh.
//
// Fragment layouts of mma.m16n8k16 (lane = 4 * group + quad_lane; "group" is the row):
//   A 16x16, 4 regs of 2 halves: a0 (row g, cols 2q..2q+1), a1 (row g+8, same cols),
//                                a2 (row g, cols 8+2q..), a3 (row g+8, cols 8+2q..)
//   B 16x8,  2 regs:             b0 (k = 2q..2q+1, col g), b1 (k = 8+2q.., col g)
//   C 16x8,  4 floats:           c0,c1 (row g, cols 2q, 2q+1), c2,c3 (row g+8, same cols)
// A's low half holds the lower column. The C fragments of two adjacent 8-column tiles are
// exactly the A fragment of their 16 columns (how P goes from q k^T into P v without shared memory).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention_ptx.cuh"

namespace llmkern {
namespace attention_detail {

// The launchers' check that the current device has those instructions (sm80 or newer).
inline cudaError_t check_device_is_sm80() {
  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  return major >= 8 ? cudaSuccess : cudaErrorNoKernelImageForDevice;
}

// Two floats rounded to T and packed in one register, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Element (row, col) of a row-major shared tile with `kCols` columns, its 16-byte chunks
// XOR-swizzled by the row within groups of 8 chunks: the 8 rows one ldmatrix reads sit in 8
// different bank groups. A row of 32 or 96 columns ends in a group of 4 chunks, swizzled by the
// row's low 2 bits (2-way conflicts there, still a bijection of the row's chunks).
template <int kCols>
__device__ __forceinline__ int swizzle(int row, int col) {
  static_assert(kCols % 32 == 0, "a row must hold whole groups of 4 chunks of 8 elements");
  if constexpr (kCols % 64 == 0) {
    return row * kCols + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
  } else {
    const int chunk = col >> 3;
    const int group = chunk & ~7;
    const int bits = group + 8 <= kCols / 8 ? 7 : 3;  // a whole group of 8, or the last one of 4
    return row * kCols + ((group | ((chunk & 7) ^ (row & bits))) << 3) + (col & 7);
  }
}

// --- warp-level operand loads from swizzled shared tiles with kCols columns -----------------

// The A fragment of the 16x16 block at (row0, col0) of a row-major tile.
template <int kCols, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int col0) {
  const int lane = threadIdx.x & 31;
  const int r = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int c = col0 + (lane >> 4) * 8;
  ldmatrix_x4(a, tile + swizzle<kCols>(r, c));
}

// B fragments of B = M^T, M stored [n][k] (like k in q k^T): two 8-column tiles, b[0..1] for
// columns n0..n0+7 and b[2..3] for n0+8..n0+15, over k0..k0+15.
template <int kCols, typename T>
__device__ __forceinline__ void load_b_from_nk(uint32_t (&b)[4], const T* tile, int n0, int k0) {
  const int lane = threadIdx.x & 31;
  const int r = n0 + (lane & 7) + (lane >> 4) * 8;
  const int c = k0 + ((lane >> 3) & 1) * 8;
  ldmatrix_x4(b, tile + swizzle<kCols>(r, c));
}

// B fragments of B = M, M stored [k][n] (like v in p v): same output order as load_b_from_nk.
template <int kCols, typename T>
__device__ __forceinline__ void load_b_from_kn(uint32_t (&b)[4], const T* tile, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  const int r = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int c = n0 + (lane >> 4) * 8;
  ldmatrix_x4_trans(b, tile + swizzle<kCols>(r, c));
}

// The A fragment (16 rows x 16 columns, rounded to T) made of the fp32 C fragments of two
// adjacent 8-column tiles.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&left)[4], const float (&right)[4]) {
  a[0] = pack2<T>(left[0], left[1]);
  a[1] = pack2<T>(left[2], left[3]);
  a[2] = pack2<T>(right[0], right[1]);
  a[3] = pack2<T>(right[2], right[3]);
}

// --- a warp's products: 16 rows, fp32 accumulators as C fragments of 8-column tiles ----------

template <int kTiles>
__device__ __forceinline__ void zero(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
}

// acc += a B^T over k-step kk: `a` is the A fragment of columns 16kk..16kk+15 of the warp's 16
// rows; B, stored [n][kK] (like k in q k^T), gives acc's 8 * kNTiles columns.
template <int kK, typename T, int kNTiles>
__device__ __forceinline__ void mma_step_abt(float (&acc)[kNTiles][4], const uint32_t (&a)[4], const T* b_tile,
                                             int kk) {
  static_assert(kNTiles % 2 == 0, "B's rows are loaded 16 at a time");
#pragma unroll
  for (int pair = 0; pair < kNTiles / 2; ++pair) {
    uint32_t b[4];
    load_b_from_nk<kK>(b, b_tile, pair * 16, kk * 16);
    mma_16816<T>(acc[2 * pair], a, b[0], b[1]);
    mma_16816<T>(acc[2 * pair + 1], a, b[2], b[3]);
  }
}

// acc = A B^T (S = q k^T and its kin): A is rows a_row0..a_row0 + 15 of the [rows][kK] tile a_tile,
// B the first 8 * kNTiles rows of the [n][kK] tile b_tile.
template <int kK, typename T, int kNTiles>
__device__ __forceinline__ void mma_abt(float (&acc)[kNTiles][4], const T* a_tile, int a_row0, const T* b_tile) {
  zero(acc);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    load_a<kK>(a, a_tile, a_row0, kk * 16);
    mma_step_abt<kK>(acc, a, b_tile, kk);
  }
}

// acc += P B (P v and its kin): P is the warp's 16 x (8 * kKTiles) product held as fp32 C
// fragments, rounded to T as it becomes A fragments (no trip through shared memory); B is the
// [8 * kKTiles][8 * kNTiles] tile b_tile.
template <typename T, int kNTiles, int kKTiles>
__device__ __forceinline__ void mma_cb(float (&acc)[kNTiles][4], const float (&p)[kKTiles][4], const T* b_tile) {
  static_assert(kNTiles % 2 == 0 && kKTiles % 2 == 0, "B is loaded in 16 x 16 blocks");
#pragma unroll
  for (int j = 0; j < kKTiles / 2; ++j) {
    uint32_t a[4];
    c_to_a<T>(a, p[2 * j], p[2 * j + 1]);
#pragma unroll
    for (int pair = 0; pair < kNTiles / 2; ++pair) {
      uint32_t b[4];
      load_b_from_kn<8 * kNTiles>(b, b_tile, j * 16, pair * 16);
      mma_16816<T>(acc[2 * pair], a, b[0], b[1]);
      mma_16816<T>(acc[2 * pair + 1], a, b[2], b[3]);
    }
  }
}

// Copy rows [row0, row0 + kRows) of a (seq, kCols) matrix with row stride `stride` (elements)
// into a swizzled shared tile with cp.async; rows at or past `seq` become zeros. The kThreads
// threads of the block each issue their share of 16-byte chunks (the caller commits).
template <typename T, int kCols, int kRows, int kThreads>
__device__ __forceinline__ void load_tile_async(T* tile, const T* base, int64_t stride, int row0, int seq) {
  constexpr int kChunks = kCols / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks;
    const int c = idx % kChunks;
    const bool valid = row0 + r < seq;
    const T* src = valid ? base + static_cast<int64_t>(row0 + r) * stride + c * 8 : base;
    cp_async_16(tile + swizzle<kCols>(r, c * 8), src, valid);
  }
}

}  // namespace attention_detail
}  // namespace llmkern
