// Vectorized 16-byte loads and stores of N elements of T.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace llmkern {

// N elements of T packed in 16 bytes (N = 4 for fp32, 8 for fp16/bf16).
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load_vec16(const T* p) {
  return *reinterpret_cast<const Vec16<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store_vec16(T* p, const Vec16<T>& x) {
  *reinterpret_cast<Vec16<T>*>(p) = x;
}

inline bool is_aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

}  // namespace llmkern
