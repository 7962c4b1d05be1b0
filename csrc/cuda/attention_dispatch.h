// Host-side helpers shared by the attention forward (attention.cu) and backward
// (attention_backward.cu) launchers: argument checks and the run-time -> compile-time dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/dtype.h"

namespace llmkern {
namespace attention_detail {

// The kernels load 16-byte vectors, so every base pointer must be 16-byte aligned ...
inline bool misaligned(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) != 0; }

// ... and every (batch, head, row) stride a multiple of 8 two-byte elements.
inline bool strides_ok(const int64_t (&stride)[3]) {
  for (int64_t s : stride) {
    if (s < 0 || s % 8 != 0) return false;
  }
  return true;
}

// Calls fn(T{}, std::integral_constant<int, D>{}, std::bool_constant<kCausal>{},
// std::bool_constant<kHasDoc>{}) for the run-time dtype, head_dim and mask flags, so a launcher
// reads them as template arguments (decltype(d)::value, ...). Only fp16/bf16 and head_dim
// 32/64/96/128 are instantiated; anything else returns cudaErrorInvalidValue.
template <typename Fn>
cudaError_t dispatch_attention(DType dtype, int64_t head_dim, bool causal, bool has_doc, Fn&& fn) {
  auto with_masks = [&](auto t, auto d) -> cudaError_t {
    if (causal) {
      return has_doc ? fn(t, d, std::true_type{}, std::true_type{}) : fn(t, d, std::true_type{}, std::false_type{});
    }
    return has_doc ? fn(t, d, std::false_type{}, std::true_type{}) : fn(t, d, std::false_type{}, std::false_type{});
  };
  auto with_head_dim = [&](auto t) -> cudaError_t {
    switch (head_dim) {
      case 32: return with_masks(t, std::integral_constant<int, 32>{});
      case 64: return with_masks(t, std::integral_constant<int, 64>{});
      case 96: return with_masks(t, std::integral_constant<int, 96>{});
      case 128: return with_masks(t, std::integral_constant<int, 128>{});
    }
    return cudaErrorInvalidValue;
  };
  switch (dtype) {
    case DType::kFloat16: return with_head_dim(__half{});
    case DType::kBFloat16: return with_head_dim(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace attention_detail
}  // namespace llmkern
