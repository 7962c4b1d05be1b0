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

// Whether a sliding window masks any pair: only with causal, and only when narrower than seq_k (a
// query at position p <= seq_k - 1 sees keys from p - window + 1 <= 0 on otherwise). A wider window
// runs the windowless kernels, which also keeps the kernels' window arithmetic within int range.
inline bool window_masks(bool causal, int window, int64_t seq_k) { return causal && window > 0 && window < seq_k; }

// Calls fn(T{}, std::integral_constant<int, D>{}, std::bool_constant<kCausal>{},
// std::bool_constant<kWindow>{}, std::bool_constant<kHasDoc>{}) for the run-time dtype, head_dim and
// mask flags, so a launcher reads them as template arguments (decltype(d)::value, ...). Only fp16/bf16
// and head_dim 32/64/96/128 are instantiated, and a window only with causal (6 mask combinations, not
// 8); anything else returns cudaErrorInvalidValue.
template <typename Fn>
cudaError_t dispatch_attention(DType dtype, int64_t head_dim, bool causal, bool windowed, bool has_doc, Fn&& fn) {
  if (windowed && !causal) return cudaErrorInvalidValue;
  auto with_masks = [&](auto t, auto d) -> cudaError_t {
    auto with_doc = [&](auto is_causal, auto is_windowed) -> cudaError_t {
      return has_doc ? fn(t, d, is_causal, is_windowed, std::true_type{})
                     : fn(t, d, is_causal, is_windowed, std::false_type{});
    };
    if (!causal) return with_doc(std::false_type{}, std::false_type{});
    return windowed ? with_doc(std::true_type{}, std::true_type{}) : with_doc(std::true_type{}, std::false_type{});
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
