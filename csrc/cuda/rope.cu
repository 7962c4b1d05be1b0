// RoPE (rotate-half) forward and inverse: one kernel, sin negated for the inverse.
//
//   y[i]         = x[i] cos[i] - x[i + D/2] sin[i]
//   y[i + D/2]   = x[i + D/2] cos[i] + x[i] sin[i]          i < D/2, math in fp32
//
// Memory-bound: every element of x is read once and every element of y written once; the
// tables are small (one (D/2) row per position) and are read once per thread, then reused
// for the thread's heads. Work is split three ways inside a block:
//   threadIdx.x  packs of G pairs of one head (G = 16 bytes of x when the layout allows it, else 1)
//   threadIdx.y  heads of one position (a head per thread unless there are more heads than
//                fit the block; the table row then stays in registers across the thread's heads)
//   threadIdx.z  positions (b, s), several per block when heads x pairs are few
// and the 1-D grid strides over positions, so any batch x sequence fits.
#include "cuda/rope.h"

#include <algorithm>
#include <limits>

#include "common/check.h"
#include "common/vec.cuh"

namespace llmkern {
namespace {

constexpr int kBlockThreads = 256;         // threads of a block (at most; fewer for tiny problems)
constexpr int kMaxPositionsPerBlock = 64;  // the hardware limit of blockDim.z
constexpr int64_t kMaxGrid = 1 << 30;      // positions beyond this many blocks: the grid-stride loop

// Sizes and element strides the kernel needs, passed by value (120 bytes of kernel parameters).
struct RopeGeometry {
  int64_t heads, seq, positions;  // positions = batch * seq
  int64_t half;                   // D/2: pairs per head
  int64_t packs;                  // half / G
  int64_t xs[3], ys[3];           // batch, head, sequence strides of x and y
  int64_t cs[2], ss[2];           // batch, sequence strides of cos and sin
};

template <typename T, int G>
__global__ void __launch_bounds__(kBlockThreads)
rope_kernel(const T* __restrict__ x, const float* __restrict__ cos_table, const float* __restrict__ sin_table,
            T* __restrict__ y, const RopeGeometry g, float sin_sign) {
  const int64_t pos_step = static_cast<int64_t>(gridDim.x) * blockDim.z;
  for (int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.z + threadIdx.z; pos < g.positions;
       pos += pos_step) {
    const int64_t b = pos / g.seq;
    const int64_t s = pos - b * g.seq;
    const T* x_pos = x + b * g.xs[0] + s * g.xs[2];
    T* y_pos = y + b * g.ys[0] + s * g.ys[2];
    const float* cos_row = cos_table + b * g.cs[0] + s * g.cs[1];
    const float* sin_row = sin_table + b * g.ss[0] + s * g.ss[1];

    for (int64_t p = threadIdx.x; p < g.packs; p += blockDim.x) {
      const int64_t col = p * G;  // first pair of this pack
      float c[G], sn[G];
      load_float<G>(cos_row + col, c);
      load_float<G>(sin_row + col, sn);
#pragma unroll
      for (int e = 0; e < G; ++e) sn[e] *= sin_sign;

      // Head h's pack in x and y. The pointers step by blockDim.y heads: with h * stride in the
      // address instead, nvcc 13 split the 16-byte stores below into 2- and 4-byte ones.
      const T* src = x_pos + threadIdx.y * g.xs[1] + col;
      T* dst = y_pos + threadIdx.y * g.ys[1] + col;
      const int64_t src_step = blockDim.y * g.xs[1], dst_step = blockDim.y * g.ys[1];
      for (int64_t h = threadIdx.y; h < g.heads; h += blockDim.y, src += src_step, dst += dst_step) {
        float x1[G], x2[G], y1[G], y2[G];
        load_float<G>(src, x1);
        load_float<G>(src + g.half, x2);
#pragma unroll
        for (int e = 0; e < G; ++e) {
          y1[e] = x1[e] * c[e] - x2[e] * sn[e];
          y2[e] = x2[e] * c[e] + x1[e] * sn[e];
        }
        store_float<G>(dst, y1);
        store_float<G>(dst + g.half, y2);
      }
    }
  }
}

int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

// 16-byte accesses need: D/2 a multiple of the pack (so both halves of a pack start aligned),
// x and y 16-byte aligned with strides that are multiples of the pack, and the fp32 tables
// 16-byte aligned with strides that are multiples of 4 (G pairs = G floats, a whole number of
// 16-byte packs since G is 4 or 8).
template <typename T>
bool can_vectorize(const RopeArgs& a) {
  constexpr int N = kPack<T>;
  if ((a.head_dim / 2) % N != 0) return false;
  for (const void* p : {a.x, static_cast<const void*>(a.y), static_cast<const void*>(a.cos),
                        static_cast<const void*>(a.sin)})
    if (!is_aligned16(p)) return false;
  for (int i = 0; i < 3; ++i)
    if (a.x_stride[i] % N != 0 || a.y_stride[i] % N != 0) return false;
  constexpr int kTablePack = kPack<float>;
  for (int i = 0; i < 2; ++i)
    if (a.cos_stride[i] % kTablePack != 0 || a.sin_stride[i] % kTablePack != 0) return false;
  return true;
}

template <typename T, int G>
cudaError_t launch(const RopeArgs& a, cudaStream_t stream) {
  RopeGeometry g{};
  g.heads = a.heads;
  g.seq = a.seq;
  g.positions = a.batch * a.seq;
  g.half = a.head_dim / 2;
  g.packs = g.half / G;
  for (int i = 0; i < 3; ++i) {
    g.xs[i] = a.x_stride[i];
    g.ys[i] = a.y_stride[i];
  }
  for (int i = 0; i < 2; ++i) {
    g.cs[i] = a.cos_stride[i];
    g.ss[i] = a.sin_stride[i];
  }
  // Threads over packs first, then over heads, then positions fill the block. When the heads
  // take more than one round of the head loop, they are spread evenly over the rounds (40 heads
  // with room for 32: 20 threads doing 2 heads each, not 8 doing 2 while 24 do 1).
  const int64_t tx = std::min<int64_t>(next_pow2(g.packs), kBlockThreads);
  const int64_t max_ty = kBlockThreads / tx;
  const int64_t head_rounds = (g.heads + max_ty - 1) / max_ty;
  const int64_t ty = (g.heads + head_rounds - 1) / head_rounds;  // in [1, max_ty]
  const int64_t tz = std::max<int64_t>(
      1, std::min<int64_t>({kBlockThreads / (tx * ty), kMaxPositionsPerBlock, g.positions}));
  const int64_t blocks = std::min<int64_t>((g.positions + tz - 1) / tz, kMaxGrid);
  const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty), static_cast<unsigned>(tz));
  rope_kernel<T, G><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      static_cast<const T*>(a.x), a.cos, a.sin, static_cast<T*>(a.y), g, a.inverse ? -1.0f : 1.0f);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rope_forward(const RopeArgs& a, cudaStream_t stream) {
  LLMKERN_RETURN_INVALID_IF(a.batch < 0 || a.heads < 0 || a.seq < 0);
  LLMKERN_RETURN_INVALID_IF(a.head_dim < 2 || a.head_dim % 2 != 0);
  if (a.batch == 0 || a.heads == 0 || a.seq == 0) return cudaSuccess;  // nothing to rotate
  LLMKERN_RETURN_INVALID_IF(a.batch > std::numeric_limits<int64_t>::max() / a.seq);  // batch * seq overflows
  LLMKERN_RETURN_INVALID_IF(a.x == nullptr || a.y == nullptr || a.cos == nullptr || a.sin == nullptr);
  return dispatch_float(a.dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if (can_vectorize<T>(a)) return launch<T, kPack<T>>(a, stream);
    return launch<T, 1>(a, stream);  // odd head dims, offset views: scalar accesses
  });
}

}  // namespace llmkern
