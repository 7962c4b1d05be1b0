// LayerNorm launchers: y = (h - mean(h)) * rsqrt(var(h) + eps) * weight (+ bias), h = x (+ residual).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace llmkern {

// As rms_norm_forward (cuda/rms_norm.h), with `bias` (weight's dtype) added to y; bias may be null.
cudaError_t layer_norm_forward(const void* x, const void* residual, const void* weight, const void* bias, void* y,
                               void* h, int64_t rows, int64_t cols, int64_t x_stride, int64_t residual_stride,
                               int64_t y_stride, int64_t h_stride, float eps, DType x_dtype, DType dtype,
                               DType y_dtype, DType weight_dtype, cudaStream_t stream);

// fp32 elements of workspace layer_norm_backward needs (the partial sums of dweight, and dbias's).
int64_t layer_norm_backward_workspace(int64_t rows, int64_t cols, bool has_bias);

// dh = rstd * (w*dy - mean(w*dy) - hhat * mean(w*dy*hhat)) (+ dh_extra), hhat = (h - mean) * rstd;
// dweight = sum over rows of dy * hhat and dbias = sum of dy (when dbias is not null), in fp32
// through `workspace`. Dtypes as in rms_norm_backward; dbias has weight's.
cudaError_t layer_norm_backward(const void* dy, const void* h, const void* weight, const void* dh_extra, void* dh,
                                void* dweight, void* dbias, float* workspace, int64_t workspace_size,
                                int64_t rows, int64_t cols, int64_t dy_stride, int64_t h_stride,
                                int64_t dh_extra_stride, int64_t dh_stride, float eps, DType dy_dtype,
                                DType dtype, DType weight_dtype, cudaStream_t stream);

}  // namespace llmkern
