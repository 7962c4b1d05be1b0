// Row norms, forward and backward, with an optional fused residual add: RMSNorm, and LayerNorm
// as its centered form (kCentered subtracts the row mean first; a bias may be added).
//
//   h = x (+ residual)                 rounded to the stream's dtype (the residual's), as it is stored
//   RMSNorm    y = h * rstd * w                   rstd = rsqrt(mean(h^2) + eps)
//   LayerNorm  y = (h - mean) * rstd * w + b      rstd = rsqrt(mean((h - mean)^2) + eps)
// all math in fp32. Included by rms_norm.cu and layer_norm.cu, which define the launchers' C API.
//
// Under autocast the stream is fp32 while the matmuls around the norm read and write 16 bits:
// x (the branch joining the stream) and y (what the next matmul reads), and in the backward dy,
// may then be bf16 or fp16 beside the fp32 h, so that no cast kernel runs before or after.
//
// The ops are memory-bound: forward moves 2 (4 with a residual) elements per input element,
// backward 3 (4). So every kernel reads each input once, with 16-byte accesses when the rows
// allow it, and keeps the row in registers between the reductions and the output when it fits
// ("regs" kernels). Rows too long for registers take the "loop" kernels, which read the row again
// (mostly from L2): once for RMSNorm, twice for LayerNorm, whose variance is taken about the mean
// rather than as E[h^2] - mean^2, which cancels.
//
// Backward sums dweight (and dbias) over rows: each block accumulates its rows' contributions in
// fp32 registers, writes one fp32 partial row to the workspace, and a second kernel sums the
// partials in fp32. No low-precision partial sums, no float atomics (deterministic).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/check.h"
#include "common/dtype.h"
#include "common/reduce.cuh"
#include "common/vec.cuh"

namespace llmkern {
namespace norm {

constexpr int kForwardMaxThreads = 1024;
constexpr int kBackwardMaxThreads = 512;
constexpr int kMaxRegsChunks = 4;  // K: 16-byte chunks a thread keeps in registers
// LayerNorm's backward keeps dbias's partial sums in registers too: 4 chunks of 8 spilled (sm_90,
// 312-372 bytes), 2 do not; longer rows take the loop kernel.
template <bool kCentered>
constexpr int kMaxBackwardChunks = kCentered ? 2 : kMaxRegsChunks;

inline int round_up(int64_t n, int64_t m) { return static_cast<int>((n + m - 1) / m * m); }

// G elements at p + offset in fp32, or zeros where p is null (no bias, no extra gradient).
template <int G, typename T>
__device__ __forceinline__ void load_float_or_zero(const T* p, int64_t offset, float (&out)[G]) {
  if (p != nullptr) {
    load_float<G>(p + offset, out);
  } else {
#pragma unroll
    for (int e = 0; e < G; ++e) out[e] = 0.0f;
  }
}

// ------------------------------------------------------------------------------------------
// Forward, row in registers: thread t holds chunks t, t + blockDim, ... (K of them) of G
// elements each. One block per row (grid-stride over rows).
// X: x's type; T: the stream's (residual and h); W: weight's and bias's; Y: y's.
template <bool kCentered, typename X, typename T, typename W, typename Y, int G, int K>
__global__ void __launch_bounds__(kForwardMaxThreads)
forward_regs(const X* __restrict__ x, const T* __restrict__ residual, const W* __restrict__ weight,
             const W* __restrict__ bias, Y* __restrict__ y, T* __restrict__ h, int64_t rows, int64_t cols,
             int64_t x_stride, int64_t residual_stride, int64_t y_stride, int64_t h_stride, float eps) {
  __shared__ float scratch[32];
  const int64_t chunks = cols / G;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float v[K][G];
    float acc = 0.0f;  // sum(h) to center, else sum(h^2)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t c = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x);
      if (c < chunks) {
        load_float<G>(x + row * x_stride + c * G, v[k]);
        if (residual != nullptr) {
          float r[G];
          load_float<G>(residual + row * residual_stride + c * G, r);
#pragma unroll
          for (int e = 0; e < G; ++e) v[k][e] = to_float(from_float<T>(v[k][e] + r[e]));
          store_float<G>(h + row * h_stride + c * G, v[k]);
        }
#pragma unroll
        for (int e = 0; e < G; ++e) acc += kCentered ? v[k][e] : v[k][e] * v[k][e];
      }
    }
    if constexpr (kCentered) {  // center the registers, then their sum of squares
      const float mean = block_sum(acc, scratch) / static_cast<float>(cols);
      acc = 0.0f;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t c = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x);
        if (c < chunks) {
#pragma unroll
          for (int e = 0; e < G; ++e) {
            v[k][e] -= mean;
            acc += v[k][e] * v[k][e];
          }
        }
      }
    }
    const float rstd = rsqrtf(block_sum(acc, scratch) / static_cast<float>(cols) + eps);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t c = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x);
      if (c < chunks) {
        float w[G], b[G];
        load_float<G>(weight + c * G, w);
        load_float_or_zero<G>(bias, c * G, b);
#pragma unroll
        for (int e = 0; e < G; ++e) v[k][e] = v[k][e] * rstd * w[e] + b[e];
        store_float<G>(y + row * y_stride + c * G, v[k]);
      }
    }
  }
}

// h of chunk c of a row, re-read by the loop kernels: the stored sum, or x itself. The same thread
// wrote it (chunks are dealt to threads alike in every pass), so no synchronization is needed.
template <typename X, typename T, int G>
__device__ __forceinline__ void reload_h(const X* x_row, const T* h_row, bool has_residual, int64_t c,
                                         float (&v)[G]) {
  if (has_residual) {
    load_float<G>(h_row + c * G, v);
  } else {
    load_float<G>(x_row + c * G, v);
  }
}

// Forward, any row length: a first pass computes h and its sum (of squares, for RMSNorm); LayerNorm
// re-reads h for the sum of squares about the mean; a last pass re-reads h and writes y.
template <bool kCentered, typename X, typename T, typename W, typename Y, int G>
__global__ void __launch_bounds__(kForwardMaxThreads)
forward_loop(const X* __restrict__ x, const T* __restrict__ residual, const W* __restrict__ weight,
             const W* __restrict__ bias, Y* __restrict__ y, T* __restrict__ h, int64_t rows, int64_t cols,
             int64_t x_stride, int64_t residual_stride, int64_t y_stride, int64_t h_stride, float eps) {
  __shared__ float scratch[32];
  const int64_t chunks = cols / G;
  const bool has_residual = residual != nullptr;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const X* x_row = x + row * x_stride;
    const T* h_row = has_residual ? h + row * h_stride : nullptr;
    float acc = 0.0f;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      float v[G];
      load_float<G>(x_row + c * G, v);
      if (has_residual) {
        float r[G];
        load_float<G>(residual + row * residual_stride + c * G, r);
#pragma unroll
        for (int e = 0; e < G; ++e) v[e] = to_float(from_float<T>(v[e] + r[e]));
        store_float<G>(h + row * h_stride + c * G, v);
      }
#pragma unroll
      for (int e = 0; e < G; ++e) acc += kCentered ? v[e] : v[e] * v[e];
    }
    float mean = 0.0f;
    if constexpr (kCentered) {
      mean = block_sum(acc, scratch) / static_cast<float>(cols);
      acc = 0.0f;
      for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
        float v[G];
        reload_h<X, T, G>(x_row, h_row, has_residual, c, v);
#pragma unroll
        for (int e = 0; e < G; ++e) acc += (v[e] - mean) * (v[e] - mean);
      }
    }
    const float rstd = rsqrtf(block_sum(acc, scratch) / static_cast<float>(cols) + eps);
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      float v[G], w[G], b[G];
      reload_h<X, T, G>(x_row, h_row, has_residual, c, v);
      load_float<G>(weight + c * G, w);
      load_float_or_zero<G>(bias, c * G, b);
#pragma unroll
      for (int e = 0; e < G; ++e) v[e] = (v[e] - mean) * rstd * w[e] + b[e];
      store_float<G>(y + row * y_stride + c * G, v);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Backward. Per row, with g = w * dy and hhat = (h - mean) * rstd (mean = 0 for RMSNorm):
//   dh = rstd * (g - mean(g) - hhat * mean(g * hhat)) (+ dh_extra)      (no mean(g) for RMSNorm)
// and this block's rows add dy * hhat to its fp32 partial row of dweight, and dy to dbias's.

// The three sums over the block that give (rstd, mean(g * hhat), mean(g)).
struct RowStats {
  float rstd, mean_ghhat, mean_g;
};

template <bool kCentered>
__device__ __forceinline__ RowStats row_stats(float sumsq, float dot, float sum_g, int64_t cols, float eps,
                                              float2* scratch) {
  const float2 sums = block_sum2(sumsq, dot, scratch);  // sum((h - mean)^2), sum(g * (h - mean))
  RowStats s;
  s.rstd = rsqrtf(sums.x / static_cast<float>(cols) + eps);
  s.mean_ghhat = sums.y * s.rstd / static_cast<float>(cols);
  s.mean_g = 0.0f;
  if constexpr (kCentered) {
    s.mean_g = block_sum(sum_g, reinterpret_cast<float*>(scratch)) / static_cast<float>(cols);
  }
  return s;
}

// Row in registers. D: dy's type; T: that of h, dh_extra and dh. With kCentered and a bias
// (has_bias), dbias's partial row is workspace[gridDim.x + blockIdx.x].
template <bool kCentered, typename T, typename W, typename D, int G, int K>
__global__ void __launch_bounds__(kBackwardMaxThreads)
backward_regs(const D* __restrict__ dy, const T* __restrict__ h, const W* __restrict__ weight,
              const T* __restrict__ dh_extra, T* __restrict__ dh, float* __restrict__ workspace, bool has_bias,
              int64_t rows, int64_t cols, int64_t dy_stride, int64_t h_stride, int64_t dh_extra_stride,
              int64_t dh_stride, float eps) {
  __shared__ float2 scratch[32];
  const int64_t chunks = cols / G;
  float dw[K][G], db[kCentered ? K : 1][G];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int e = 0; e < G; ++e) dw[k][e] = 0.0f;
  if constexpr (kCentered) {
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int e = 0; e < G; ++e) db[k][e] = 0.0f;
  }

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float hv[K][G], g[K][G];  // g holds dy
    float sum_h = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t c = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x);
      if (c < chunks) {
        load_float<G>(h + row * h_stride + c * G, hv[k]);
        load_float<G>(dy + row * dy_stride + c * G, g[k]);
#pragma unroll
        for (int e = 0; e < G; ++e) sum_h += hv[k][e];
      }
    }
    float mean = 0.0f;
    if constexpr (kCentered) mean = block_sum(sum_h, reinterpret_cast<float*>(scratch)) / static_cast<float>(cols);
    float sumsq = 0.0f, dot = 0.0f, sum_g = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t c = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x);
      if (c < chunks) {
        float w[G];
        load_float<G>(weight + c * G, w);
#pragma unroll
        for (int e = 0; e < G; ++e) {
          hv[k][e] -= mean;
          sumsq += hv[k][e] * hv[k][e];
          dot += g[k][e] * w[e] * hv[k][e];
          sum_g += g[k][e] * w[e];
        }
      }
    }
    const RowStats s = row_stats<kCentered>(sumsq, dot, sum_g, cols, eps, scratch);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t c = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x);
      if (c < chunks) {
        float w[G], out[G], extra[G];
        load_float<G>(weight + c * G, w);
        load_float_or_zero<G>(dh_extra, row * dh_extra_stride + c * G, extra);
#pragma unroll
        for (int e = 0; e < G; ++e) {
          const float hhat = hv[k][e] * s.rstd;
          dw[k][e] += g[k][e] * hhat;
          if constexpr (kCentered) db[k][e] += g[k][e];
          out[e] = s.rstd * (g[k][e] * w[e] - s.mean_g - hhat * s.mean_ghhat) + extra[e];
        }
        store_float<G>(dh + row * dh_stride + c * G, out);
      }
    }
  }
  float* partial_w = workspace + static_cast<int64_t>(blockIdx.x) * cols;
  float* partial_b = workspace + static_cast<int64_t>(gridDim.x + blockIdx.x) * cols;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t c = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x);
    if (c < chunks) {
#pragma unroll
      for (int e = 0; e < G; ++e) partial_w[c * G + e] = dw[k][e];
      if constexpr (kCentered) {
        if (has_bias) {
#pragma unroll
          for (int e = 0; e < G; ++e) partial_b[c * G + e] = db[k][e];
        }
      }
    }
  }
}

// Any row length: passes over the row (one more for LayerNorm's mean); the partial rows live in
// this block's workspace rows (zeroed by the launcher; only this block and, per column, one thread
// touch them).
template <bool kCentered, typename T, typename W, typename D, int G>
__global__ void __launch_bounds__(kBackwardMaxThreads)
backward_loop(const D* __restrict__ dy, const T* __restrict__ h, const W* __restrict__ weight,
              const T* __restrict__ dh_extra, T* __restrict__ dh, float* __restrict__ workspace, bool has_bias,
              int64_t rows, int64_t cols, int64_t dy_stride, int64_t h_stride, int64_t dh_extra_stride,
              int64_t dh_stride, float eps) {
  __shared__ float2 scratch[32];
  const int64_t chunks = cols / G;
  float* partial_w = workspace + static_cast<int64_t>(blockIdx.x) * cols;
  float* partial_b = workspace + static_cast<int64_t>(gridDim.x + blockIdx.x) * cols;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* h_row = h + row * h_stride;
    const D* dy_row = dy + row * dy_stride;
    float mean = 0.0f;
    if constexpr (kCentered) {
      float sum_h = 0.0f;
      for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
        float hv[G];
        load_float<G>(h_row + c * G, hv);
#pragma unroll
        for (int e = 0; e < G; ++e) sum_h += hv[e];
      }
      mean = block_sum(sum_h, reinterpret_cast<float*>(scratch)) / static_cast<float>(cols);
    }
    float sumsq = 0.0f, dot = 0.0f, sum_g = 0.0f;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      float hv[G], g[G], w[G];
      load_float<G>(h_row + c * G, hv);
      load_float<G>(dy_row + c * G, g);
      load_float<G>(weight + c * G, w);
#pragma unroll
      for (int e = 0; e < G; ++e) {
        const float hc = hv[e] - mean;
        sumsq += hc * hc;
        dot += g[e] * w[e] * hc;
        sum_g += g[e] * w[e];
      }
    }
    const RowStats s = row_stats<kCentered>(sumsq, dot, sum_g, cols, eps, scratch);
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      float hv[G], g[G], w[G], out[G], extra[G];
      load_float<G>(h_row + c * G, hv);
      load_float<G>(dy_row + c * G, g);
      load_float<G>(weight + c * G, w);
      load_float_or_zero<G>(dh_extra, row * dh_extra_stride + c * G, extra);
#pragma unroll
      for (int e = 0; e < G; ++e) {
        const float hhat = (hv[e] - mean) * s.rstd;
        partial_w[c * G + e] += g[e] * hhat;
        if (kCentered && has_bias) partial_b[c * G + e] += g[e];
        out[e] = s.rstd * (g[e] * w[e] - s.mean_g - hhat * s.mean_ghhat) + extra[e];
      }
      store_float<G>(dh + row * dh_stride + c * G, out);
    }
  }
}

// out[c] = sum over the blocks' partial rows, in fp32, then rounded once to W.
template <typename W>
__global__ void reduce_partials(const float* __restrict__ workspace, W* __restrict__ out, int64_t partial_rows,
                                int64_t cols) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  float sum = 0.0f;
  for (int64_t b = 0; b < partial_rows; ++b) sum += workspace[b * cols + c];
  out[c] = from_float<W>(sum);
}

// ------------------------------------------------------------------------------------------
// Launch planning.

struct Plan {
  bool vectorized;  // 16-byte accesses (G = pack size) or scalar (G = 1)
  int chunks_per_thread;  // K of the regs kernels; 0 selects the loop kernels
  int threads;
};

// The largest grid worth launching: rows beyond it are covered by the grid-stride loops.
constexpr int64_t kMaxGrid = 1 << 30;

inline Plan plan_rows(int64_t cols, int pack, bool can_vectorize, int max_threads, int max_chunks = kMaxRegsChunks) {
  Plan p{};
  p.vectorized = can_vectorize;
  const int64_t chunks = can_vectorize ? cols / pack : cols;
  p.chunks_per_thread = 0;
  for (int k = 1; k <= max_chunks; k *= 2) {
    if (chunks <= static_cast<int64_t>(max_threads) * k) {
      p.chunks_per_thread = k;
      break;
    }
  }
  if (p.chunks_per_thread > 0) {
    p.threads = std::min(max_threads, round_up((chunks + p.chunks_per_thread - 1) / p.chunks_per_thread, 32));
  } else {
    p.threads = max_threads;
  }
  return p;
}

// Elements per 16-byte pack of the narrowest of the given types: the vector kernels move G of
// them a step, whole 16-byte packs of every tensor (two of an fp32 one beside a 16-bit one).
template <typename... Ts>
constexpr int kVectorWidth = 16 / static_cast<int>(std::min({sizeof(Ts)...}));

inline bool all_aligned(int pack, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides,
                        int64_t cols) {
  if (cols % pack != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !is_aligned16(p)) return false;
  for (int64_t s : strides)
    if (s % pack != 0) return false;
  return true;
}

inline cudaError_t sm_count(int* out) {
  int device = 0;
  LLMKERN_RETURN_IF_ERROR(cudaGetDevice(&device));
  return cudaDeviceGetAttribute(out, cudaDevAttrMultiProcessorCount, device);
}

// Blocks of the backward grid: enough to fill the GPU, few enough that the fp32 partial rows
// of dweight stay small next to the op's own traffic.
inline cudaError_t backward_blocks(int64_t rows, int threads, int64_t* out) {
  int sms = 0;
  LLMKERN_RETURN_IF_ERROR(sm_count(&sms));
  const int64_t per_sm = std::max(1, std::min(8, 1024 / threads));
  *out = std::max<int64_t>(1, std::min(rows, static_cast<int64_t>(sms) * per_sm));
  return cudaSuccess;
}

// fp32 elements of workspace a backward needs: `partial_sets` rows of partials (dweight's, and
// dbias's) per block, for the most blocks any plan can take (scalar, or vectors of 4 or 8: the
// plan with the fewest threads per block has the most blocks, and a cap on chunks per thread
// only adds threads).
inline int64_t backward_workspace(int64_t rows, int64_t cols, int partial_sets) {
  if (rows <= 0 || cols <= 0) return 0;
  int64_t most = 0;
  for (const Plan& p : {plan_rows(cols, 1, false, kBackwardMaxThreads),
                        plan_rows(cols, 4, cols % 4 == 0, kBackwardMaxThreads),
                        plan_rows(cols, 8, cols % 8 == 0, kBackwardMaxThreads)}) {
    int64_t blocks = 0;
    if (backward_blocks(rows, p.threads, &blocks) != cudaSuccess) {
      cudaGetLastError();
      return 0;  // no device: the launch itself will report it
    }
    most = std::max(most, blocks);
  }
  return most * cols * partial_sets;
}

template <bool kCentered, typename X, typename T, typename W, typename Y>
cudaError_t launch_forward(const X* x, const T* residual, const W* weight, const W* bias, Y* y, T* h, int64_t rows,
                           int64_t cols, int64_t xs, int64_t rs, int64_t ys, int64_t hs, float eps,
                           cudaStream_t stream) {
  constexpr int N = kVectorWidth<X, T, Y>;
  const bool vec = all_aligned(N, {x, residual, weight, bias, y, h}, {xs, rs, ys, hs}, cols);
  const Plan p = plan_rows(cols, N, vec, kForwardMaxThreads);
  const dim3 grid(static_cast<unsigned>(std::min(rows, kMaxGrid)));
#define LLMKERN_FWD_ARGS x, residual, weight, bias, y, h, rows, cols, xs, rs, ys, hs, eps
  if (vec) {
    switch (p.chunks_per_thread) {
      case 1: forward_regs<kCentered, X, T, W, Y, N, 1><<<grid, p.threads, 0, stream>>>(LLMKERN_FWD_ARGS); break;
      case 2: forward_regs<kCentered, X, T, W, Y, N, 2><<<grid, p.threads, 0, stream>>>(LLMKERN_FWD_ARGS); break;
      case 4: forward_regs<kCentered, X, T, W, Y, N, 4><<<grid, p.threads, 0, stream>>>(LLMKERN_FWD_ARGS); break;
      default: forward_loop<kCentered, X, T, W, Y, N><<<grid, p.threads, 0, stream>>>(LLMKERN_FWD_ARGS); break;
    }
  } else {
    // Unaligned or odd rows are rare (odd hidden sizes): one scalar path serves them all.
    forward_loop<kCentered, X, T, W, Y, 1><<<grid, p.threads, 0, stream>>>(LLMKERN_FWD_ARGS);
  }
#undef LLMKERN_FWD_ARGS
  return cudaGetLastError();
}

template <bool kCentered, typename T, typename W, typename D>
cudaError_t launch_backward(const D* dy, const T* h, const W* weight, const T* dh_extra, T* dh, W* dweight,
                            W* dbias, float* workspace, int64_t workspace_size, int64_t rows, int64_t cols,
                            int64_t dys, int64_t hs, int64_t es, int64_t dhs, float eps, cudaStream_t stream) {
  constexpr int N = kVectorWidth<T, D>;
  const bool vec = all_aligned(N, {dy, h, weight, dh_extra, dh}, {dys, hs, es, dhs}, cols);
  const Plan p = plan_rows(cols, N, vec, kBackwardMaxThreads, kMaxBackwardChunks<kCentered>);
  int64_t blocks = 0;
  LLMKERN_RETURN_IF_ERROR(backward_blocks(rows, p.threads, &blocks));
  const bool has_bias = kCentered && dbias != nullptr;
  const int64_t partials = blocks * cols * (has_bias ? 2 : 1);
  LLMKERN_RETURN_INVALID_IF(workspace == nullptr || workspace_size < partials);
  const bool regs = vec && p.chunks_per_thread > 0;
  if (!regs) {  // the loop kernels accumulate into their workspace rows
    LLMKERN_RETURN_IF_ERROR(cudaMemsetAsync(workspace, 0, sizeof(float) * partials, stream));
  }
  const dim3 grid(static_cast<unsigned>(blocks));
#define LLMKERN_BWD_ARGS dy, h, weight, dh_extra, dh, workspace, has_bias, rows, cols, dys, hs, es, dhs, eps
  if (regs) {
    switch (p.chunks_per_thread) {
      case 1: backward_regs<kCentered, T, W, D, N, 1><<<grid, p.threads, 0, stream>>>(LLMKERN_BWD_ARGS); break;
      case 2: backward_regs<kCentered, T, W, D, N, 2><<<grid, p.threads, 0, stream>>>(LLMKERN_BWD_ARGS); break;
      default:
        if constexpr (kMaxBackwardChunks<kCentered> == 4) {
          backward_regs<kCentered, T, W, D, N, 4><<<grid, p.threads, 0, stream>>>(LLMKERN_BWD_ARGS);
        }
        break;
    }
  } else if (vec) {
    backward_loop<kCentered, T, W, D, N><<<grid, p.threads, 0, stream>>>(LLMKERN_BWD_ARGS);
  } else {
    backward_loop<kCentered, T, W, D, 1><<<grid, p.threads, 0, stream>>>(LLMKERN_BWD_ARGS);
  }
#undef LLMKERN_BWD_ARGS
  LLMKERN_RETURN_IF_ERROR(cudaGetLastError());
  const int reduce_threads = 256;
  const dim3 reduce_grid(static_cast<unsigned>((cols + reduce_threads - 1) / reduce_threads));
  reduce_partials<W><<<reduce_grid, reduce_threads, 0, stream>>>(workspace, dweight, blocks, cols);
  if (has_bias) {
    LLMKERN_RETURN_IF_ERROR(cudaGetLastError());
    reduce_partials<W><<<reduce_grid, reduce_threads, 0, stream>>>(workspace + blocks * cols, dbias, blocks, cols);
  }
  return cudaGetLastError();
}

// Calls fn(T{}, W{}) for the stream's dtype and the weight's (the stream's own, or fp32).
template <typename Fn>
cudaError_t dispatch_stream_and_weight(DType dtype, DType weight_dtype, Fn&& fn) {
  return dispatch_float(dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if (weight_dtype == dtype) return fn(T{}, T{});
    if (weight_dtype == DType::kFloat32) return fn(T{}, float{});
    return cudaErrorInvalidValue;
  });
}

// Calls fn(U{}) for a tensor of dtype `dtype` beside a stream of type T: T itself, or, for an
// fp32 stream, a 16-bit type (autocast's branch, output and output gradient).
template <typename T, typename Fn>
cudaError_t dispatch_beside_stream(DType dtype, Fn&& fn) {
  if constexpr (std::is_same_v<T, float>) {
    return dispatch_float(dtype, fn);
  } else {
    return dispatch_float(dtype, [&](auto u) -> cudaError_t {
      if constexpr (std::is_same_v<decltype(u), T>) return fn(u);
      return cudaErrorInvalidValue;
    });
  }
}

template <bool kCentered>
cudaError_t forward(const void* x, const void* residual, const void* weight, const void* bias, void* y, void* h,
                    int64_t rows, int64_t cols, int64_t x_stride, int64_t residual_stride, int64_t y_stride,
                    int64_t h_stride, float eps, DType x_dtype, DType dtype, DType y_dtype, DType weight_dtype,
                    cudaStream_t stream) {
  LLMKERN_RETURN_INVALID_IF(rows < 0 || cols < 1 || x == nullptr || weight == nullptr || y == nullptr);
  LLMKERN_RETURN_INVALID_IF(residual != nullptr && h == nullptr);
  LLMKERN_RETURN_INVALID_IF(residual == nullptr && x_dtype != dtype);  // without a residual, h is x
  if (rows == 0) return cudaSuccess;
  return dispatch_stream_and_weight(dtype, weight_dtype, [&](auto t, auto w) -> cudaError_t {
    using T = decltype(t);
    using W = decltype(w);
    return dispatch_beside_stream<T>(x_dtype, [&](auto xt) -> cudaError_t {
      using X = decltype(xt);
      return dispatch_beside_stream<T>(y_dtype, [&](auto yt) -> cudaError_t {
        using Y = decltype(yt);
        return launch_forward<kCentered, X, T, W, Y>(
            static_cast<const X*>(x), static_cast<const T*>(residual), static_cast<const W*>(weight),
            static_cast<const W*>(bias), static_cast<Y*>(y), residual != nullptr ? static_cast<T*>(h) : nullptr,
            rows, cols, x_stride, residual_stride, y_stride, h_stride, eps, stream);
      });
    });
  });
}

template <bool kCentered>
cudaError_t backward(const void* dy, const void* h, const void* weight, const void* dh_extra, void* dh,
                     void* dweight, void* dbias, float* workspace, int64_t workspace_size, int64_t rows,
                     int64_t cols, int64_t dy_stride, int64_t h_stride, int64_t dh_extra_stride, int64_t dh_stride,
                     float eps, DType dy_dtype, DType dtype, DType weight_dtype, cudaStream_t stream) {
  LLMKERN_RETURN_INVALID_IF(rows < 1 || cols < 1 || dy == nullptr || h == nullptr || weight == nullptr ||
                            dh == nullptr || dweight == nullptr);
  return dispatch_stream_and_weight(dtype, weight_dtype, [&](auto t, auto w) -> cudaError_t {
    using T = decltype(t);
    using W = decltype(w);
    return dispatch_beside_stream<T>(dy_dtype, [&](auto d) -> cudaError_t {
      using D = decltype(d);
      return launch_backward<kCentered, T, W, D>(
          static_cast<const D*>(dy), static_cast<const T*>(h), static_cast<const W*>(weight),
          static_cast<const T*>(dh_extra), static_cast<T*>(dh), static_cast<W*>(dweight), static_cast<W*>(dbias),
          workspace, workspace_size, rows, cols, dy_stride, h_stride, dh_extra_stride, dh_stride, eps, stream);
    });
  });
}

}  // namespace norm
}  // namespace llmkern
