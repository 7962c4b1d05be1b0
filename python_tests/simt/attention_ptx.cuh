// The emulator's model of csrc/cuda/attention_ptx.cuh: the same functions, computed on the CPU
// from every lane's operands with the fragment layouts of the PTX ISA ("Matrix Fragments for
// mma.m16n8k16 with floating point type", "ldmatrix"), not the layouts the kernels assume.
// build.py puts this file in the place of the real one.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace llmkern {
namespace attention_detail {

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) { simt::cp_async(dst, src, valid); }

__device__ __forceinline__ void cp_async_commit() { simt::cp_async_commit(); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  simt::cp_async_wait(N);
}

namespace ptx_model {

inline uint16_t load_b16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Lanes 8i..8i+7 give the addresses of the 8 rows of matrix i, 16 aligned bytes each.
inline void check_rows(const void* const* rows) {
  for (int l = 0; l < 32; ++l) {
    if (reinterpret_cast<std::uintptr_t>(rows[l]) % 16 != 0 || !simt::in_dynamic_shared(rows[l], 16)) {
      simt::fail("ldmatrix: lane " + std::to_string(l) + "'s row address is not 16 aligned bytes of shared memory");
    }
    simt::shared_read(rows[l], 16);
  }
}

struct Row {
  const void* address;
};
struct Regs4 {
  uint32_t r[4];
};

// Lane l holds, of each matrix i, row l/4, elements 2(l%4) and 2(l%4)+1 (the lower in the low half);
// transposed: elements (2(l%4), l/4) and (2(l%4)+1, l/4).
inline Regs4 ldmatrix(const void* row_address, bool transposed) {
  return simt::warp_collective<Row, Regs4>(
      transposed ? "ldmatrix.x4.trans" : "ldmatrix.x4", 0xffffffffu, Row{row_address},
      [transposed](const Row* in, Regs4* out, unsigned mask) {
        if (mask != 0xffffffffu) simt::fail("ldmatrix: needs the whole warp");
        const void* rows[32];
        for (int l = 0; l < 32; ++l) rows[l] = in[l].address;
        check_rows(rows);
        for (int l = 0; l < 32; ++l) {
          for (int i = 0; i < 4; ++i) {
            const auto* const* m = reinterpret_cast<const unsigned char* const*>(rows + 8 * i);
            uint16_t lo, hi;
            if (transposed) {
              lo = load_b16(m[2 * (l % 4)] + 2 * (l / 4));
              hi = load_b16(m[2 * (l % 4) + 1] + 2 * (l / 4));
            } else {
              lo = load_b16(m[l / 4] + 2 * (2 * (l % 4)));
              hi = load_b16(m[l / 4] + 2 * (2 * (l % 4) + 1));
            }
            out[l].r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
          }
        }
      });
}

template <typename T>
float to_float_bits(uint16_t bits);
template <>
inline float to_float_bits<__half>(uint16_t bits) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}
template <>
inline float to_float_bits<__nv_bfloat16>(uint16_t bits) {
  __nv_bfloat16_raw raw;
  raw.x = bits;
  return __bfloat162float(__nv_bfloat16(raw));
}

struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};
struct MmaOut {
  float d[4];
};

// d = a b + c on a 16x8x16 tile. groupID g = lane / 4, threadID_in_group q = lane % 4:
//   A (16x16): reg j holds rows g (j = 0, 2) or g+8 (j = 1, 3), cols 2q, 2q+1 (+8 for j >= 2)
//   B (16x8):  reg j holds rows (k) 2q, 2q+1 (+8 for j = 1), col g
//   C, D (16x8): c0, c1 row g, cols 2q, 2q+1; c2, c3 row g+8
// Products and sums in double, rounded once to fp32 (the tensor cores' rounding is not modelled).
template <typename T>
MmaOut mma(const MmaIn& operands) {
  return simt::warp_collective<MmaIn, MmaOut>(
      sizeof(T) == 2 && std::is_same_v<T, __half> ? "mma.m16n8k16.f16" : "mma.m16n8k16.bf16", 0xffffffffu,
      operands, [](const MmaIn* in, MmaOut* out, unsigned mask) {
        if (mask != 0xffffffffu) simt::fail("mma.sync: needs the whole warp");
        float a[16][16], b[16][8], c[16][8];
        for (int l = 0; l < 32; ++l) {
          const int g = l / 4, q = l % 4;
          for (int j = 0; j < 4; ++j) {
            const int row = g + ((j & 1) ? 8 : 0);
            const int col = 2 * q + ((j & 2) ? 8 : 0);
            a[row][col] = to_float_bits<T>(static_cast<uint16_t>(in[l].a[j] & 0xffffu));
            a[row][col + 1] = to_float_bits<T>(static_cast<uint16_t>(in[l].a[j] >> 16));
          }
          for (int j = 0; j < 2; ++j) {
            const int k = 2 * q + 8 * j;
            b[k][g] = to_float_bits<T>(static_cast<uint16_t>(in[l].b[j] & 0xffffu));
            b[k + 1][g] = to_float_bits<T>(static_cast<uint16_t>(in[l].b[j] >> 16));
          }
          c[g][2 * q] = in[l].c[0];
          c[g][2 * q + 1] = in[l].c[1];
          c[g + 8][2 * q] = in[l].c[2];
          c[g + 8][2 * q + 1] = in[l].c[3];
        }
        for (int l = 0; l < 32; ++l) {
          const int g = l / 4, q = l % 4;
          for (int e = 0; e < 4; ++e) {
            const int row = g + (e >= 2 ? 8 : 0);
            const int col = 2 * q + (e & 1);
            double acc = c[row][col];
            for (int k = 0; k < 16; ++k) acc += static_cast<double>(a[row][k]) * b[k][col];
            out[l].d[e] = static_cast<float>(acc);
          }
        }
      });
}

}  // namespace ptx_model

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
  const ptx_model::Regs4 v = ptx_model::ldmatrix(row_address, false);
  for (int i = 0; i < 4; ++i) r[i] = v.r[i];
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
  const ptx_model::Regs4 v = ptx_model::ldmatrix(row_address, true);
  for (int i = 0; i < 4; ++i) r[i] = v.r[i];
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const ptx_model::MmaOut d = ptx_model::mma<T>({{a[0], a[1], a[2], a[3]}, {b0, b1}, {c[0], c[1], c[2], c[3]}});
  for (int e = 0; e < 4; ++e) c[e] = d.d[e];
}

}  // namespace attention_detail
}  // namespace llmkern
