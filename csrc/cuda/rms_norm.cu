// RMSNorm forward and backward, with an optional fused residual add: the row-norm kernels of
// norm.cuh without centering or bias.
#include "cuda/rms_norm.h"

#include "cuda/norm.cuh"

namespace llmkern {

cudaError_t rms_norm_forward(const void* x, const void* residual, const void* weight, void* y, void* h,
                             int64_t rows, int64_t cols, int64_t x_stride, int64_t residual_stride,
                             int64_t y_stride, int64_t h_stride, float eps, DType x_dtype, DType dtype,
                             DType y_dtype, DType weight_dtype, cudaStream_t stream) {
  return norm::forward<false>(x, residual, weight, nullptr, y, h, rows, cols, x_stride, residual_stride, y_stride,
                              h_stride, eps, x_dtype, dtype, y_dtype, weight_dtype, stream);
}

int64_t rms_norm_backward_workspace(int64_t rows, int64_t cols) {
  return norm::backward_workspace(rows, cols, 1);
}

cudaError_t rms_norm_backward(const void* dy, const void* h, const void* weight, const void* dh_extra,
                              void* dh, void* dweight, float* workspace, int64_t workspace_size,
                              int64_t rows, int64_t cols, int64_t dy_stride, int64_t h_stride,
                              int64_t dh_extra_stride, int64_t dh_stride, float eps, DType dy_dtype,
                              DType dtype, DType weight_dtype, cudaStream_t stream) {
  return norm::backward<false>(dy, h, weight, dh_extra, dh, dweight, nullptr, workspace, workspace_size, rows,
                               cols, dy_stride, h_stride, dh_extra_stride, dh_stride, eps, dy_dtype, dtype,
                               weight_dtype, stream);
}

}  // namespace llmkern
