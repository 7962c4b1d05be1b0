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
__global__ void neighbour_read(float* out, bool with_barrier) {
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

}  // namespace

PYBIND11_MODULE(_simt_selftest, m) {
  m.def("shuffle_against_barrier", [](std::uintptr_t out) {
    (::simt::Launch(1, 32, 0, nullptr, "shuffle_against_barrier") | shuffle_against_barrier)(as_floats(out));
  });
  m.def("neighbour_read", [](std::uintptr_t out, bool with_barrier) {
    (::simt::Launch(1, 64, 0, nullptr, "neighbour_read") | neighbour_read)(as_floats(out), with_barrier);
  });
  m.def("async_copy", [](std::uintptr_t in, std::uintptr_t out, bool wait) {
    (::simt::Launch(1, 64, 256, nullptr, "async_copy") | async_copy)(as_floats(in), as_floats(out), wait);
  });
  m.def("misaligned_async_copy", [](std::uintptr_t in, std::uintptr_t out) {
    (::simt::Launch(1, 64, 256, nullptr, "async_copy") | async_copy)(as_floats(in) + 1, as_floats(out), true);
  });
  m.def("warp_reductions", [](std::uintptr_t in, std::uintptr_t out) {
    (::simt::Launch(1, 32, 0, nullptr, "warp_reductions") | warp_reductions)(as_floats(in), as_floats(out));
  });
  m.def("mma_from_formulas", [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t d_direct,
                                std::uintptr_t d_ldmatrix) {
    (::simt::Launch(1, 32, 512, nullptr, "mma_from_formulas") | mma_from_formulas)(
        reinterpret_cast<const __half*>(a), reinterpret_cast<const __half*>(b), as_floats(c), as_floats(d_direct),
        as_floats(d_ldmatrix));
  });
  m.def("tile_reuse", [](std::uintptr_t in, std::uintptr_t out, bool barrier_after_load, bool barrier_before_reload) {
    (::simt::Launch(1, 64, 512, nullptr, "tile_reuse") | tile_reuse)(reinterpret_cast<const __half*>(in),
                                                                      as_floats(out), barrier_after_load,
                                                                      barrier_before_reload);
  });
  m.def("oversized_block", [](std::uintptr_t out) {
    (::simt::Launch(1, 2048, 0, nullptr, "neighbour_read") | neighbour_read)(as_floats(out), true);
    return static_cast<int>(cudaGetLastError());
  });
  m.def("too_much_shared", [](std::uintptr_t in, std::uintptr_t out) {
    (::simt::Launch(1, 64, 64 * 1024, nullptr, "async_copy") | async_copy)(as_floats(in), as_floats(out), true);
    return static_cast<int>(cudaGetLastError());
  });
}
