// SwiGLU launchers: y = silu(gate) * up, and its gradients, in fp32 math.
//
//   dup   = dy * silu(g)
//   dgate = dy * up * s * (1 + g (1 - s)),   s = sigmoid(g)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace llmkern {

// Every tensor is (rows, cols) with contiguous columns and its own row stride (in elements):
// gate and up may be the two halves of one fused projection. Outputs must not overlap inputs.
// Bad sizes or null pointers return cudaErrorInvalidValue before any CUDA call.
cudaError_t swiglu_forward(const void* gate, const void* up, void* y, int64_t rows, int64_t cols,
                           int64_t gate_stride, int64_t up_stride, int64_t y_stride, DType dtype,
                           cudaStream_t stream);

// The backward recomputes sigmoid(gate): only the two inputs are needed.
cudaError_t swiglu_backward(const void* dy, const void* gate, const void* up, void* dgate, void* dup,
                            int64_t rows, int64_t cols, int64_t dy_stride, int64_t gate_stride,
                            int64_t up_stride, int64_t dgate_stride, int64_t dup_stride, DType dtype,
                            cudaStream_t stream);

}  // namespace llmkern
