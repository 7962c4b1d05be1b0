// Loads and stores of G consecutive elements converted to/from fp32.
//
// G = 1 is a plain scalar access (any alignment); G > 1 uses 16-byte accesses, so the caller
// guarantees 16-byte alignment and G * sizeof(T) a multiple of 16.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace llmkern {

template <typename T>
struct alignas(16) Pack16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// Elements of T in one 16-byte access: 4 for fp32, 8 for fp16/bf16.
template <typename T>
constexpr int kPack = 16 / sizeof(T);

template <int G, typename T>
__device__ __forceinline__ void load_float(const T* p, float (&out)[G]) {
  if constexpr (G == 1) {
    out[0] = to_float(*p);
  } else {
    static_assert((G * sizeof(T)) % 16 == 0, "vector loads move whole 16-byte packs");
    constexpr int N = kPack<T>;
#pragma unroll
    for (int j = 0; j < G / N; ++j) {
      const Pack16<T> pack = reinterpret_cast<const Pack16<T>*>(p)[j];
#pragma unroll
      for (int e = 0; e < N; ++e) out[j * N + e] = to_float(pack.v[e]);
    }
  }
}

template <int G, typename T>
__device__ __forceinline__ void store_float(T* p, const float (&in)[G]) {
  if constexpr (G == 1) {
    *p = from_float<T>(in[0]);
  } else {
    static_assert((G * sizeof(T)) % 16 == 0, "vector stores move whole 16-byte packs");
    constexpr int N = kPack<T>;
#pragma unroll
    for (int j = 0; j < G / N; ++j) {
      Pack16<T> pack;
#pragma unroll
      for (int e = 0; e < N; ++e) pack.v[e] = from_float<T>(in[j * N + e]);
      // One st.global.v4 through the intrinsic: a plain Pack16 copy was split by nvcc 13.0 into
      // 2- and 4-byte stores in kernels that keep many packs live (RMSNorm with 4 packs a thread).
      uint4 bits;
      memcpy(&bits, &pack, sizeof(bits));
      __stwb(reinterpret_cast<uint4*>(p) + j, bits);
    }
  }
}

inline bool is_aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

}  // namespace llmkern
