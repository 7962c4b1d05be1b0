// Cross-entropy of logits rows, in place: one block per row (grid-stride over rows).
//
// Pass 1 reads the row once for its log-sum-exp (each thread keeps a running max and the sum of
// exp(z - max) rescaled when the max grows, then the block combines the pairs) and the sum of the
// logits (label smoothing). Pass 2 reads it again and writes the gradient over it:
//   d loss / d z = (softmax(z) - (1 - eps) onehot(target) - eps / V) * grad_scale.
// Rows of 16-bit logits move as 16-byte packs when the row start and stride allow it.
//
// With a soft cap C > 0 (Gemma 2's final logits) the loss is that of the capped logits C tanh(z / C):
// both passes cap each logit as they read it, and pass 2 multiplies the capped logits' gradient by
// the cap's slope 1 - tanh^2, which makes it the raw logits' gradient (what the matmuls around need).
// The cap is a template parameter, so the kernel without one is the kernel without the feature. The
// Triton kernel (llmkern/triton/fused_linear_cross_entropy.py) computes the same things.
#include "cuda/fused_linear_cross_entropy.h"

#include <cmath>

#include "common/check.h"
#include "common/reduce.cuh"
#include "common/vec.cuh"

namespace llmkern {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kMaxBlocks = 1 << 20;  // rows beyond this many blocks: the grid-stride loop

struct MaxSum {
  float max;
  float sum;  // of exp(z - max)
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.f};  // both empty: exp(-inf - -inf) would be NaN
  return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

__device__ __forceinline__ void add_value(MaxSum& acc, float z) {
  if (z > acc.max) {
    acc.sum = acc.sum * expf(acc.max - z) + 1.f;
    acc.max = z;
  } else if (z != -INFINITY) {  // a -inf logit adds exp(-inf) = 0, and before any finite one NaN
    acc.sum += expf(z - acc.max);
  }
}

// A logit as the loss sees it: C tanh(z / C) with the cap, z without. tanhf is -1 at z = -inf (a
// banned class is then worth -C, as in the reference, which caps before the softmax).
template <bool kSoftcap>
__device__ __forceinline__ float capped(float z, float softcap) {
  if constexpr (kSoftcap) {
    return softcap * tanhf(z / softcap);
  } else {
    return z;
  }
}

// The block's combined MaxSum, on every thread. `scratch` holds 32 MaxSum in shared memory.
__device__ __forceinline__ MaxSum block_max_sum(MaxSum v, MaxSum* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = (blockDim.x + 31) >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = combine(v, {__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.sum, offset)});
  }
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : MaxSum{-INFINITY, 0.f};
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = combine(v, {__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.sum, offset)});
  }
  return v;
}

template <typename T, int G, bool kSoftcap>
__global__ void __launch_bounds__(kThreads)
cross_entropy_rows_kernel(T* __restrict__ logits, const int64_t* __restrict__ target, float* __restrict__ loss,
                          const float* __restrict__ grad_scale, int64_t rows, int64_t n_classes, int64_t stride,
                          int64_t ignore_index, float label_smoothing, float softcap, bool compute_grad) {
  __shared__ MaxSum scratch[32];
  __shared__ float sum_scratch[32];
  const int64_t packs = n_classes / G;  // whole packs; the rest (G > 1) element by element
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    T* z_row = logits + row * stride;
    const int64_t t = target[row];
    const bool valid = t != ignore_index;
    const bool in_range = t >= 0 && t < n_classes;
    // Read before the reductions' barriers: pass 2 overwrites the target's column.
    const float target_z = (valid && in_range) ? capped<kSoftcap>(to_float(z_row[t]), softcap) : 0.f;

    MaxSum acc{-INFINITY, 0.f};
    float sum_z = 0.f;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      float z[G];
      load_float<G>(z_row + p * G, z);
#pragma unroll
      for (int e = 0; e < G; ++e) {
        const float zc = capped<kSoftcap>(z[e], softcap);
        add_value(acc, zc);
        sum_z += zc;
      }
    }
    for (int64_t c = packs * G + threadIdx.x; c < n_classes; c += blockDim.x) {
      const float z = capped<kSoftcap>(to_float(z_row[c]), softcap);
      add_value(acc, z);
      sum_z += z;
    }
    acc = block_max_sum(acc, scratch);
    sum_z = block_sum(sum_z, sum_scratch);
    const float lse = acc.max + logf(acc.sum);

    const float n = static_cast<float>(n_classes);
    // The smoothing term only with smoothing: a logit of -inf makes sum_z -inf, and 0 * inf is NaN.
    const float smoothed = label_smoothing > 0.f ? label_smoothing * (lse - sum_z / n) : 0.f;
    float row_loss = (1.f - label_smoothing) * (lse - target_z) + smoothed;
    if (!valid) row_loss = 0.f;
    if (valid && !in_range) row_loss = NAN;  // a bad target is never silently a number
    if (threadIdx.x == 0) loss[row] = row_loss;
    if (!compute_grad) continue;

    const float scale = *grad_scale;
    const float smooth = label_smoothing / n;
    // d loss / d z of the logit the loss sees, zl in column c
    auto softmax_gradient = [&](float zl, int64_t c) {
      return expf(zl - lse) - smooth - (c == t ? 1.f - label_smoothing : 0.f);
    };
    // d loss / d z of the raw logit z, through the cap with one (times its slope 1 - tanh^2)
    auto gradient = [&](float z, int64_t c) {
      if (!valid) return 0.f;
      if (!in_range) return static_cast<float>(NAN);
      if constexpr (kSoftcap) {
        const float th = tanhf(z / softcap);
        return softmax_gradient(softcap * th, c) * (1.f - th * th) * scale;
      } else {
        return softmax_gradient(z, c) * scale;
      }
    };
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      float z[G];
      load_float<G>(z_row + p * G, z);
#pragma unroll
      for (int e = 0; e < G; ++e) z[e] = gradient(z[e], p * G + e);
      store_float<G>(z_row + p * G, z);
    }
    for (int64_t c = packs * G + threadIdx.x; c < n_classes; c += blockDim.x) {
      z_row[c] = from_float<T>(gradient(to_float(z_row[c]), c));
    }
    // The next row's reductions reuse the scratch arrays: block_sum starts with a barrier.
  }
}

template <typename T, bool kSoftcap>
cudaError_t launch(T* logits, const int64_t* target, float* loss, const float* grad_scale, int64_t rows,
                   int64_t n_classes, int64_t stride, int64_t ignore_index, float label_smoothing, float softcap,
                   bool compute_grad, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(rows < kMaxBlocks ? rows : kMaxBlocks);
  constexpr int kG = kPack<T>;
  if (is_aligned16(logits) && stride % kG == 0) {
    cross_entropy_rows_kernel<T, kG, kSoftcap><<<blocks, kThreads, 0, stream>>>(
        logits, target, loss, grad_scale, rows, n_classes, stride, ignore_index, label_smoothing, softcap,
        compute_grad);
  } else {
    cross_entropy_rows_kernel<T, 1, kSoftcap><<<blocks, kThreads, 0, stream>>>(
        logits, target, loss, grad_scale, rows, n_classes, stride, ignore_index, label_smoothing, softcap,
        compute_grad);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t cross_entropy_rows(void* logits, const int64_t* target, float* loss, const float* grad_scale,
                               int64_t rows, int64_t n_classes, int64_t logits_stride, int64_t ignore_index,
                               float label_smoothing, float softcap, bool compute_grad, DType dtype,
                               cudaStream_t stream) {
  LLMKERN_RETURN_INVALID_IF(rows < 0 || n_classes < 1 || logits_stride < n_classes);
  if (rows == 0) return cudaSuccess;
  LLMKERN_RETURN_INVALID_IF(!logits || !target || !loss || !grad_scale);
  LLMKERN_RETURN_INVALID_IF(!(label_smoothing >= 0.f && label_smoothing <= 1.f));
  LLMKERN_RETURN_INVALID_IF(!(softcap >= 0.f && softcap < INFINITY));  // NaN and inf too: 0 is no cap
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (softcap > 0.f) {
      return launch<T, true>(static_cast<T*>(logits), target, loss, grad_scale, rows, n_classes, logits_stride,
                             ignore_index, label_smoothing, softcap, compute_grad, stream);
    }
    return launch<T, false>(static_cast<T*>(logits), target, loss, grad_scale, rows, n_classes, logits_stride,
                            ignore_index, label_smoothing, softcap, compute_grad, stream);
  });
}

}  // namespace llmkern
