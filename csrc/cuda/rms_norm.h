// RMSNorm launchers: y = h * rsqrt(mean(h^2) + eps) * weight, h = x (+ residual).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace llmkern {

// Rows are `cols` contiguous elements apart by the given row strides (in elements).
// residual and h may be null (no fused residual add); when residual is given, h = x + residual
// is written, rounded to the stream's dtype `dtype` (residual's and h's), and that rounded h is
// normed. x_dtype and y_dtype are `dtype`, or, for an fp32 stream, may be fp16 or bf16 (autocast:
// a 16-bit branch joins the stream, and y is written for a 16-bit matmul); without a residual
// x_dtype is `dtype`. weight_dtype is `dtype` or fp32.
cudaError_t rms_norm_forward(const void* x, const void* residual, const void* weight, void* y, void* h,
                             int64_t rows, int64_t cols, int64_t x_stride, int64_t residual_stride,
                             int64_t y_stride, int64_t h_stride, float eps, DType x_dtype, DType dtype,
                             DType y_dtype, DType weight_dtype, cudaStream_t stream);

// fp32 elements of workspace rms_norm_backward needs (the partial sums of dweight).
int64_t rms_norm_backward_workspace(int64_t rows, int64_t cols);

// dh = rstd * (w*dy - hhat * mean(w*dy*hhat)) (+ dh_extra), hhat = h * rstd;
// dweight = sum over rows of dy * hhat, reduced in fp32 through `workspace`.
// h, dh_extra and dh have dtype `dtype`; dy has it too, or, for an fp32 h, fp16 or bf16.
cudaError_t rms_norm_backward(const void* dy, const void* h, const void* weight, const void* dh_extra,
                              void* dh, void* dweight, float* workspace, int64_t workspace_size,
                              int64_t rows, int64_t cols, int64_t dy_stride, int64_t h_stride,
                              int64_t dh_extra_stride, int64_t dh_stride, float eps, DType dy_dtype,
                              DType dtype, DType weight_dtype, cudaStream_t stream);

}  // namespace llmkern
