// Gated activations (SwiGLU, GeGLU) forward and backward: elementwise over (rows, cols) with strided
// rows. The activation is a template parameter (Silu, GeluTanh): one kernel source, one instance each.
//
// Memory-bound (forward 3 elements moved per output element, backward 5), so each thread moves
// one 16-byte pack of every tensor per step when the layout allows it (G = 4 fp32 or 8 fp16/bf16
// elements), else single elements. A block is kThreads threads: threadIdx.x over the packs of a
// row, threadIdx.y over rows (several rows per block when rows are short); both grid axes
// stride, so any row count fits the 65535-block limit of gridDim.y.
//
// Rows that are all contiguous (every row stride equals cols) are one long row: the vector
// path then only needs the total, not each row, to be a whole number of packs.
#include "cuda/gated_activation.h"

#include <algorithm>
#include <initializer_list>
#include <limits>

#include "common/check.h"
#include "common/vec.cuh"

namespace llmkern {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = 1 << 20;  // packs beyond this many blocks: the grid-stride loop
constexpr int64_t kMaxGridY = 65535;    // the hardware limit of gridDim.y

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

// An activation: value(g), and value_and_derivative(g, &a, &da) for the backward.
struct Silu {
  __device__ __forceinline__ static float value(float g) { return g * sigmoid(g); }
  __device__ __forceinline__ static void value_and_derivative(float g, float* a, float* da) {
    const float s = sigmoid(g);
    *a = g * s;
    *da = s * (1.0f + g * (1.0f - s));
  }
};

// gelu with the tanh approximation, in the order PyTorch's F.gelu(approximate="tanh") computes it
// (its forward and GeluBackward), so the two agree to rounding.
struct GeluTanh {
  static constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  static constexpr float kKappa = 0.044715f;
  __device__ __forceinline__ static float value(float g) {
    const float inner = kBeta * (g + kKappa * g * g * g);
    return 0.5f * g * (1.0f + tanhf(inner));
  }
  __device__ __forceinline__ static void value_and_derivative(float g, float* a, float* da) {
    const float g_sq = g * g;
    const float t = tanhf(kBeta * (g + kKappa * g_sq * g));
    const float left = 0.5f * g;
    const float right = 1.0f + t;
    *a = left * right;
    *da = 0.5f * right + left * (1.0f - t * t) * (kBeta * (1.0f + 3.0f * kKappa * g_sq));
  }
};

template <typename Act, typename T, int G>
__global__ void __launch_bounds__(kThreads)
gated_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ y, int64_t rows,
                      int64_t packs, int64_t gate_stride, int64_t up_stride, int64_t y_stride) {
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t pack_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < rows; row += row_step) {
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += pack_step) {
      const int64_t col = p * G;
      float g[G], u[G], out[G];
      load_float<G>(gate + row * gate_stride + col, g);
      load_float<G>(up + row * up_stride + col, u);
#pragma unroll
      for (int e = 0; e < G; ++e) out[e] = Act::value(g[e]) * u[e];
      store_float<G>(y + row * y_stride + col, out);
    }
  }
}

template <typename Act, typename T, int G>
__global__ void __launch_bounds__(kThreads)
gated_backward_kernel(const T* __restrict__ dy, const T* __restrict__ gate, const T* __restrict__ up,
                      T* __restrict__ dgate, T* __restrict__ dup, int64_t rows, int64_t packs, int64_t dy_stride,
                      int64_t gate_stride, int64_t up_stride, int64_t dgate_stride, int64_t dup_stride) {
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t pack_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < rows; row += row_step) {
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += pack_step) {
      const int64_t col = p * G;
      float d[G], g[G], u[G], dg[G], du[G];
      load_float<G>(dy + row * dy_stride + col, d);
      load_float<G>(gate + row * gate_stride + col, g);
      load_float<G>(up + row * up_stride + col, u);
#pragma unroll
      for (int e = 0; e < G; ++e) {
        float a, da;
        Act::value_and_derivative(g[e], &a, &da);
        du[e] = d[e] * a;
        dg[e] = d[e] * u[e] * da;
      }
      store_float<G>(dgate + row * dgate_stride + col, dg);
      store_float<G>(dup + row * dup_stride + col, du);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Launch planning.

struct Plan {
  bool vectorized;  // 16-byte packs (G = kPack<T>) or single elements (G = 1)
  int64_t packs;    // per row: cols / G
  dim3 grid, block;
};

int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

// Rows whose strides all equal cols are back to back in memory: fold them into one row.
void fold_contiguous_rows(int64_t* rows, int64_t* cols, std::initializer_list<int64_t*> strides) {
  if (*rows <= 1 || *cols > std::numeric_limits<int64_t>::max() / *rows) return;
  for (const int64_t* s : strides)
    if (*s != *cols) return;
  *cols *= *rows;
  *rows = 1;
  for (int64_t* s : strides) *s = *cols;
}

template <typename T>
Plan plan(int64_t rows, int64_t cols, std::initializer_list<const void*> ptrs,
          std::initializer_list<int64_t> strides) {
  constexpr int N = kPack<T>;
  Plan p{};
  p.vectorized = cols % N == 0;
  for (const void* ptr : ptrs) p.vectorized = p.vectorized && is_aligned16(ptr);
  // A single row's stride is never used (row 0 only), so it need not be a multiple of N.
  if (rows > 1)
    for (int64_t s : strides) p.vectorized = p.vectorized && s % N == 0;
  p.packs = p.vectorized ? cols / N : cols;
  const int64_t tx = std::min<int64_t>(next_pow2(p.packs), kThreads);
  const int64_t ty = kThreads / tx;
  const int64_t gx = std::min((p.packs + tx - 1) / tx, kMaxGridX);
  const int64_t gy = std::min((rows + ty - 1) / ty, kMaxGridY);
  p.block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  p.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  return p;
}

template <typename Act, typename T>
cudaError_t launch_forward(const T* gate, const T* up, T* y, int64_t rows, int64_t cols, int64_t gs,
                           int64_t us, int64_t ys, cudaStream_t stream) {
  fold_contiguous_rows(&rows, &cols, {&gs, &us, &ys});
  const Plan p = plan<T>(rows, cols, {gate, up, y}, {gs, us, ys});
  if (p.vectorized) {
    gated_forward_kernel<Act, T, kPack<T>><<<p.grid, p.block, 0, stream>>>(gate, up, y, rows, p.packs, gs, us, ys);
  } else {  // odd widths, offset views: single-element accesses
    gated_forward_kernel<Act, T, 1><<<p.grid, p.block, 0, stream>>>(gate, up, y, rows, p.packs, gs, us, ys);
  }
  return cudaGetLastError();
}

template <typename Act, typename T>
cudaError_t launch_backward(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t rows,
                            int64_t cols, int64_t dys, int64_t gs, int64_t us, int64_t dgs, int64_t dus,
                            cudaStream_t stream) {
  fold_contiguous_rows(&rows, &cols, {&dys, &gs, &us, &dgs, &dus});
  const Plan p = plan<T>(rows, cols, {dy, gate, up, dgate, dup}, {dys, gs, us, dgs, dus});
  if (p.vectorized) {
    gated_backward_kernel<Act, T, kPack<T>><<<p.grid, p.block, 0, stream>>>(dy, gate, up, dgate, dup, rows,
                                                                            p.packs, dys, gs, us, dgs, dus);
  } else {
    gated_backward_kernel<Act, T, 1><<<p.grid, p.block, 0, stream>>>(dy, gate, up, dgate, dup, rows, p.packs, dys,
                                                                     gs, us, dgs, dus);
  }
  return cudaGetLastError();
}

template <typename Act>
cudaError_t gated_forward(const void* gate, const void* up, void* y, int64_t rows, int64_t cols,
                          int64_t gate_stride, int64_t up_stride, int64_t y_stride, DType dtype,
                          cudaStream_t stream) {
  LLMKERN_RETURN_INVALID_IF(rows < 0 || cols < 1);
  if (rows == 0) return cudaSuccess;
  LLMKERN_RETURN_INVALID_IF(gate == nullptr || up == nullptr || y == nullptr);
  return dispatch_float(dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    return launch_forward<Act, T>(static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(y),
                                  rows, cols, gate_stride, up_stride, y_stride, stream);
  });
}

template <typename Act>
cudaError_t gated_backward(const void* dy, const void* gate, const void* up, void* dgate, void* dup,
                           int64_t rows, int64_t cols, int64_t dy_stride, int64_t gate_stride,
                           int64_t up_stride, int64_t dgate_stride, int64_t dup_stride, DType dtype,
                           cudaStream_t stream) {
  LLMKERN_RETURN_INVALID_IF(rows < 0 || cols < 1);
  if (rows == 0) return cudaSuccess;
  LLMKERN_RETURN_INVALID_IF(dy == nullptr || gate == nullptr || up == nullptr || dgate == nullptr ||
                            dup == nullptr);
  return dispatch_float(dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    return launch_backward<Act, T>(static_cast<const T*>(dy), static_cast<const T*>(gate), static_cast<const T*>(up),
                              static_cast<T*>(dgate), static_cast<T*>(dup), rows, cols, dy_stride, gate_stride,
                              up_stride, dgate_stride, dup_stride, stream);
  });
}

}  // namespace

cudaError_t swiglu_forward(const void* gate, const void* up, void* y, int64_t rows, int64_t cols,
                           int64_t gate_stride, int64_t up_stride, int64_t y_stride, DType dtype,
                           cudaStream_t stream) {
  return gated_forward<Silu>(gate, up, y, rows, cols, gate_stride, up_stride, y_stride, dtype, stream);
}

cudaError_t swiglu_backward(const void* dy, const void* gate, const void* up, void* dgate, void* dup,
                            int64_t rows, int64_t cols, int64_t dy_stride, int64_t gate_stride,
                            int64_t up_stride, int64_t dgate_stride, int64_t dup_stride, DType dtype,
                            cudaStream_t stream) {
  return gated_backward<Silu>(dy, gate, up, dgate, dup, rows, cols, dy_stride, gate_stride, up_stride,
                              dgate_stride, dup_stride, dtype, stream);
}

cudaError_t geglu_forward(const void* gate, const void* up, void* y, int64_t rows, int64_t cols,
                          int64_t gate_stride, int64_t up_stride, int64_t y_stride, DType dtype,
                          cudaStream_t stream) {
  return gated_forward<GeluTanh>(gate, up, y, rows, cols, gate_stride, up_stride, y_stride, dtype, stream);
}

cudaError_t geglu_backward(const void* dy, const void* gate, const void* up, void* dgate, void* dup,
                           int64_t rows, int64_t cols, int64_t dy_stride, int64_t gate_stride,
                           int64_t up_stride, int64_t dgate_stride, int64_t dup_stride, DType dtype,
                           cudaStream_t stream) {
  return gated_backward<GeluTanh>(dy, gate, up, dgate, dup, rows, cols, dy_stride, gate_stride, up_stride,
                                  dgate_stride, dup_stride, dtype, stream);
}

}  // namespace llmkern
