// Gated activations y = act(gate) * up, and their gradients, in fp32 math: SwiGLU (act = silu,
// Llama's MLP) and GeGLU (act = gelu with the tanh approximation, Gemma's). One kernel serves both.
//
//   dup   = dy * act(g)
//   dgate = dy * up * act'(g)
//
//   silu(g) = g s,                 silu'(g) = s (1 + g (1 - s)),   s = sigmoid(g)
//   gelu(g) = g/2 (1 + t),         gelu'(g) = (1 + t)/2 + g/2 (1 - t^2) k (1 + 3c g^2),
//             t = tanh(k (g + c g^3)),  k = sqrt(2/pi),  c = 0.044715   (PyTorch's approximate="tanh")
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

// The backward recomputes act(gate): only the two inputs are needed.
cudaError_t swiglu_backward(const void* dy, const void* gate, const void* up, void* dgate, void* dup,
                            int64_t rows, int64_t cols, int64_t dy_stride, int64_t gate_stride,
                            int64_t up_stride, int64_t dgate_stride, int64_t dup_stride, DType dtype,
                            cudaStream_t stream);

// GeGLU: the same contract as SwiGLU's with gelu_tanh for silu.
cudaError_t geglu_forward(const void* gate, const void* up, void* y, int64_t rows, int64_t cols,
                          int64_t gate_stride, int64_t up_stride, int64_t y_stride, DType dtype,
                          cudaStream_t stream);

cudaError_t geglu_backward(const void* dy, const void* gate, const void* up, void* dgate, void* dup,
                           int64_t rows, int64_t cols, int64_t dy_stride, int64_t gate_stride,
                           int64_t up_stride, int64_t dgate_stride, int64_t dup_stride, DType dtype,
                           cudaStream_t stream);

}  // namespace llmkern
