// RoPE launcher: rotary position embedding, rotate-half convention, fp32 math.
//
// Pair i of a head is (x[i], x[i + D/2]); it turns by the angle whose cos and sin are given:
//   y1 = x1 cos - x2 sin,   y2 = x2 cos + x1 sin
// With `inverse` it turns by -theta (sin negated): the backward pass of the same rotation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace llmkern {

struct RopeArgs {
  const void* x;     // (batch, heads, seq, head_dim), element strides below, last dim contiguous
  const float* cos;  // fp32 (seq, head_dim/2) shared by the batch (batch stride 0), or (batch, seq, head_dim/2)
  const float* sin;  // like cos (its own strides); the last dim contiguous
  void* y;           // x's shape and dtype, its own strides; must not overlap x
  int64_t batch, heads, seq, head_dim;  // head_dim even, >= 2
  int64_t x_stride[3], y_stride[3];     // batch, head and sequence strides (elements)
  int64_t cos_stride[2], sin_stride[2];  // batch (0 for a shared table) and sequence strides
  bool inverse;  // rotate by -theta
  DType dtype;   // of x and y
};

// 16-byte accesses where pointers, strides and head_dim allow it, scalar ones otherwise.
// Bad sizes or null pointers return cudaErrorInvalidValue before any CUDA call.
cudaError_t rope_forward(const RopeArgs& args, cudaStream_t stream);

}  // namespace llmkern
