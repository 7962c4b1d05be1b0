// Kernels with known defects (and their fixed twins) for python_tests/test_simt.py: the emulator
// must report each defect, and must compute the warp instructions as the PTX ISA defines them.
// Built by build.py into the module _simt_selftest (this file and simt_runtime.cpp only).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>

#include "cuda/attention_ptx.cuh"

namespace py = pybind11;
using namespace llmkern::attention_detail;

namespace {

float* as_floats(std::uintptr_t p) { return reinterpret_cast<float*>(p); }

uint32_t half_bits(__half h) {
  uint16_t u;
  memcpy(&u, &h, 2);
  return u;
}

// Lanes 1..31 wait in a shuffle for lane 0, which waits at a barrier for them: a deadlock.
__global__ void shuffle_against_barrier(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// Thread i writes slot i and reads slot i+1; without the barrier the read races with the write.
__global__ void __launch_bounds__(64) neighbour_read(float* out, bool with_barrier) {
  __shared__ float slots[64];
  slots[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (with_barrier) __syncthreads();
  out[threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

// 64 floats through cp.async into shared memory, read back with or without waiting for them.
__global__ void async_copy(const float* in, float* out, bool wait) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  float* tile = reinterpret_cast<float*>(shared_raw);
  if (threadIdx.x < 16) cp_async_16(tile + 4 * threadIdx.x, in + 4 * threadIdx.x, true);
  cp_async_commit();
  if (wait) cp_async_wait<0>();
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x];
}

// Warp sums through __shfl_xor_sync and a broadcast from lane 5 through __shfl_sync.
__global__ void warp_reductions(const float* in, float* out) {
  float v = in[threadIdx.x];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[threadIdx.x] = v + 1000.0f * __shfl_sync(0xffffffffu, in[threadIdx.x], 5);
}

// d (16x8, fp32) = a (16x16) b (16x8) + c with every fragment element placed by the PTX ISA's
// formulas (groupID g = lane / 4, threadID_in_group q = lane % 4), read from row-major global
// a, b, c; a and b come as fp16 (a also once through ldmatrix from shared memory).
__global__ void mma_from_formulas(const __half* a, const __half* b, const float* c, float* d_direct,
                                  float* d_ldmatrix) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __half* a_tile = reinterpret_cast<__half*>(shared_raw);  // 16 x 16, row-major
  const int lane = threadIdx.x, g = lane / 4, q = lane % 4;
  for (int i = lane; i < 256; i += 32) a_tile[i] = a[i];
  __syncthreads();
  auto pair = [](__half lo, __half hi) { return half_bits(lo) | (half_bits(hi) << 16); };
  uint32_t fa[4];
  for (int j = 0; j < 4; ++j) {
    const int row = g + 8 * (j & 1), col = 2 * q + 8 * (j >> 1);
    fa[j] = pair(a[row * 16 + col], a[row * 16 + col + 1]);
  }
  const uint32_t b0 = pair(b[(2 * q) * 8 + g], b[(2 * q + 1) * 8 + g]);
  const uint32_t b1 = pair(b[(2 * q + 8) * 8 + g], b[(2 * q + 9) * 8 + g]);
  float acc[4] = {c[g * 8 + 2 * q], c[g * 8 + 2 * q + 1], c[(g + 8) * 8 + 2 * q], c[(g + 8) * 8 + 2 * q + 1]};
  float acc2[4] = {acc[0], acc[1], acc[2], acc[3]};
  mma_16816<__half>(acc, fa, b0, b1);
  // ldmatrix.x4: lanes 0-7 rows 0-7 cols 0-7, 8-15 rows 8-15 cols 0-7, 16-23 rows 0-7 cols 8-15,
  // 24-31 rows 8-15 cols 8-15: the four registers of the A fragment.
  uint32_t la[4];
  ldmatrix_x4(la, a_tile + (lane % 16) * 16 + (lane / 16) * 8);
  mma_16816<__half>(acc2, la, b0, b1);
  const int out[4] = {g * 8 + 2 * q, g * 8 + 2 * q + 1, (g + 8) * 8 + 2 * q, (g + 8) * 8 + 2 * q + 1};
  for (int e = 0; e < 4; ++e) {
    d_direct[out[e]] = acc[e];
    d_ldmatrix[out[e]] = acc2[e];
  }
}

// Warp 0 copies a 32-row tile into shared memory with cp.async, both warps read it with
// ldmatrix, then warp 0 copies the next tile over it: each step needs the barrier before it.
__global__ void tile_reuse(const __half* in, float* out, bool barrier_after_load, bool barrier_before_reload) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __half* tile = reinterpret_cast<__half*>(shared_raw);  // 32 rows of 8 halves
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (warp == 0) cp_async_16(tile + 8 * lane, in + 8 * lane, true);
  cp_async_commit();
  cp_async_wait<0>();
  if (barrier_after_load) __syncthreads();
  uint32_t r[4];
  ldmatrix_x4(r, tile + 8 * lane);
  if (barrier_before_reload) __syncthreads();
  if (warp == 0) cp_async_16(tile + 8 * lane, in + 256 + 8 * lane, true);
  cp_async_commit();
  cp_async_wait<0>();
  out[threadIdx.x] = static_cast<float>(r[0] & 0xffffu);
}

// Every lane's four registers of ldmatrix.x4 (.trans), the lanes giving rows in any order.
__global__ void ldmatrix_registers(const uint16_t* in, const int* row_of_lane, uint32_t* out, bool transposed) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  uint16_t* tile = reinterpret_cast<uint16_t*>(shared_raw);  // 32 rows of 8 b16
  for (int i = threadIdx.x; i < 256; i += 32) tile[i] = in[i];
  __syncthreads();
  uint32_t r[4];
  const void* row = tile + 8 * row_of_lane[threadIdx.x];
  if (transposed) {
    ldmatrix_x4_trans(r, row);
  } else {
    ldmatrix_x4(r, row);
  }
  for (int i = 0; i < 4; ++i) out[threadIdx.x * 4 + i] = r[i];
}

// mma on registers as given: lane l passes a[4l..4l+3], b[2l..2l+1], c[4l..4l+3] and gets d[4l..].
template <typename T>
__global__ void mma_registers(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const int l = threadIdx.x;
  float acc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
  const uint32_t fa[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
  mma_16816<T>(acc, fa, b[2 * l], b[2 * l + 1]);
  for (int e = 0; e < 4; ++e) d[4 * l + e] = acc[e];
}

// One warp reads its own cp.async copies with ldmatrix before waiting for them.
__global__ void read_before_own_wait(const uint16_t* in, float* out) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  uint16_t* tile = reinterpret_cast<uint16_t*>(shared_raw);
  cp_async_16(tile + 8 * threadIdx.x, in + 8 * threadIdx.x, true);
  cp_async_commit();
  uint32_t r[4];
  ldmatrix_x4(r, tile + 8 * threadIdx.x);
  cp_async_wait<0>();
  out[threadIdx.x] = static_cast<float>(r[0] & 0xffffu);
}

// CUDA's float min/max drop a NaN operand, whichever side it is on.
__global__ void float_min_max(const float* in, float* out) {
  out[0] = min(in[0], in[1]);
  out[1] = min(in[1], in[0]);
  out[2] = max(in[0], in[1]);
  out[3] = max(in[1], in[0]);
}

}  // namespace

PYBIND11_MODULE(_simt_selftest, m) {
  m.def("shuffle_against_barrier", [](std::uintptr_t out) {
    (::simt::Launch("shuffle_against_barrier", 1, 32, 0) | shuffle_against_barrier)(as_floats(out));
  });
  m.def("neighbour_read", [](std::uintptr_t out, bool with_barrier) {
    (::simt::Launch("neighbour_read", 1, 64, 0) | neighbour_read)(as_floats(out), with_barrier);
  });
  m.def("async_copy", [](std::uintptr_t in, std::uintptr_t out, bool wait) {
    (::simt::Launch("async_copy", 1, 64, 256) | async_copy)(as_floats(in), as_floats(out), wait);
  });
  m.def("misaligned_async_copy", [](std::uintptr_t in, std::uintptr_t out) {
    (::simt::Launch("async_copy", 1, 64, 256) | async_copy)(as_floats(in) + 1, as_floats(out), true);
  });
  m.def("warp_reductions", [](std::uintptr_t in, std::uintptr_t out) {
    (::simt::Launch("warp_reductions", 1, 32, 0) | warp_reductions)(as_floats(in), as_floats(out));
  });
  m.def("mma_from_formulas", [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t d_direct,
                                std::uintptr_t d_ldmatrix) {
    (::simt::Launch("mma_from_formulas", 1, 32, 512) | mma_from_formulas)(
        reinterpret_cast<const __half*>(a), reinterpret_cast<const __half*>(b), as_floats(c), as_floats(d_direct),
        as_floats(d_ldmatrix));
  });
  m.def("tile_reuse", [](std::uintptr_t in, std::uintptr_t out, bool barrier_after_load, bool barrier_before_reload) {
    (::simt::Launch("tile_reuse", 1, 64, 512) | tile_reuse)(reinterpret_cast<const __half*>(in),
                                                                      as_floats(out), barrier_after_load,
                                                                      barrier_before_reload);
  });
  m.def("ldmatrix_registers", [](std::uintptr_t in, std::uintptr_t rows, std::uintptr_t out, bool transposed) {
    (::simt::Launch("ldmatrix_registers", 1, 32, 512) | ldmatrix_registers)(
        reinterpret_cast<const uint16_t*>(in), reinterpret_cast<const int*>(rows), reinterpret_cast<uint32_t*>(out),
        transposed);
  });
  m.def("mma_registers", [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t d, bool bf16) {
    auto* kernel = bf16 ? mma_registers<__nv_bfloat16> : mma_registers<__half>;
    (::simt::Launch("mma_registers", 1, 32, 0) | kernel)(reinterpret_cast<const uint32_t*>(a),
                                                         reinterpret_cast<const uint32_t*>(b), as_floats(c),
                                                         as_floats(d));
  });
  m.def("read_before_own_wait", [](std::uintptr_t in, std::uintptr_t out) {
    (::simt::Launch("read_before_own_wait", 1, 32, 512) | read_before_own_wait)(
        reinterpret_cast<const uint16_t*>(in), as_floats(out));
  });
  m.def("float_min_max", [](std::uintptr_t in, std::uintptr_t out) {
    (::simt::Launch("float_min_max", 1, 1, 0) | float_min_max)(as_floats(in), as_floats(out));
  });
  m.def("beyond_launch_bounds", [](std::uintptr_t out) {
    (::simt::Launch("neighbour_read", 1, 128) | neighbour_read)(as_floats(out), true);
  });
  m.def("oversized_block", [](std::uintptr_t out) {
    (::simt::Launch("neighbour_read", 1, 2048, 0) | neighbour_read)(as_floats(out), true);
    return static_cast<int>(cudaGetLastError());
  });
  m.def("too_much_shared", [](std::uintptr_t in, std::uintptr_t out) {
    (::simt::Launch("async_copy", 1, 64, 64 * 1024) | async_copy)(as_floats(in), as_floats(out), true);
    return static_cast<int>(cudaGetLastError());
  });
}
