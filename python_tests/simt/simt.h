// simt: runs llmkern's CUDA kernels on the CPU, for the tests of a machine without a GPU.
//
// The kernel sources are compiled by the host C++ compiler with this header forced in front
// (python_tests/simt/build.py also rewrites `kernel<<<grid, block, smem, stream>>>(args)` into a
// call of simt::Launch, `extern __shared__` arrays into the launch's dynamic shared memory, and
// static `__shared__` arrays into function-local statics poisoned anew for each block).
// Each CUDA thread of a block is a fiber (ucontext) with its own stack; one OS thread runs them
// cooperatively, a block at a time:
//   - __syncthreads parks a thread until every thread of the block that has not exited arrives;
//   - warp-wide instructions (shuffles, votes, ldmatrix, mma) park a lane until all lanes of its
//     mask arrive; the last one computes every lane's result from all lanes' inputs, so fragment
//     layouts are modelled exactly as the PTX ISA defines them (attention_ptx.cuh);
//   - cp.async copies happen as late as the program allows (at cp.async.wait_group), so a read
//     before the wait sees the poisoned bytes, not the data.
// What it finds: wrong indexing and fragment layouts, reads of shared memory never written
// (shared memory is filled with 0xff bytes, a NaN in every float type, for every block), barriers some
// threads never reach (a deadlock is reported with each thread's state), warp instructions whose
// lanes disagree, misaligned vector and cp.async accesses, launch configurations the GPU refuses
// (block and grid sizes, shared memory beyond the opt-in, blocks beyond a kernel's __launch_bounds__).
// Races: the modelled shared-memory instructions are racechecked (a cp.async lands any time
// between its issue and its wait and is seen by others only after a barrier, so a warp instruction
// reading its bytes before the first __syncthreads after the wait, or a cp.async over bytes
// another warp read since the last barrier, is an error); races of plain loads and stores show up as results that change with the
// schedule: the order in which runnable threads (and blocks) run is LLMKERN_SIMT_SCHEDULE =
// forward | reverse | random:SEED. LLMKERN_SIMT_ARCH (sm75 ... sm90) picks the emulated GPU.
// What it cannot find: out-of-bounds global accesses (the memory is the caller's CPU tensors;
// scripts/simt_memcheck.sh adds AddressSanitizer for them), lanes reaching one warp instruction
// from different call sites (.aligned), the GPU's memory model, nvcc's code, speed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// --- CUDA C++ keywords as plain C++ ---------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Blocks run one after another, so a function-local static is exactly one block's shared array.
#define __shared__ static
#define __launch_bounds__(...)  // build.py turns each into a require_launch_bounds check
#define __align__(n) alignas(n)

namespace simt {

// A defect found while a kernel ran; the launch throws it (pybind11: RuntimeError).
struct Fault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Stops the running kernel with `message` (from inside a kernel), or throws (outside one).
[[noreturn]] void fail(const std::string& message);

// The running thread's coordinates.
const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();

// The block's dynamic shared memory (the `extern __shared__` array of the kernel).
unsigned char* dynamic_shared();
// Fills a static __shared__ array with 0xff bytes the first time a thread of the block reaches it.
void poison_shared_once(void* p, size_t bytes);
// Whether [p, p + bytes) lies inside the block's dynamic shared memory.
bool in_dynamic_shared(const void* p, size_t bytes);

void syncthreads();

// A kernel's __launch_bounds__(max_threads) (build.py puts the call at the top of its body).
inline void require_launch_bounds(long max_threads) {
  const dim3& b = block_dim();
  if (static_cast<long>(b.x) * b.y * b.z > max_threads) {
    fail("a block of " + std::to_string(static_cast<long>(b.x) * b.y * b.z) + " threads exceeds the kernel's "
         "__launch_bounds__(" + std::to_string(max_threads) + ") (the GPU refuses the launch)");
  }
}

// A warp instruction reads [p, p + bytes) of dynamic shared memory: the racecheck against cp.async.
void shared_read(const void* p, size_t bytes);

// cp.async of 16 bytes (zero-filled when !valid), its commit_group and wait_group.
void cp_async(void* dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);

// --- warp-wide instructions -----------------------------------------------------------------
// Each lane passes its input (at most 64 bytes) and gets its output; `compute(in, out)` runs
// once, in the last lane to arrive, over arrays of 32 lanes (lanes outside `mask` untouched).
using WarpCompute = std::function<void(const unsigned char (*in)[64], unsigned char (*out)[64], unsigned mask)>;
void warp_exchange(const char* op, unsigned mask, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                   const WarpCompute& compute);

template <typename In, typename Out, typename Compute>
Out warp_collective(const char* op, unsigned mask, const In& in, Compute compute) {
  static_assert(sizeof(In) <= 64 && sizeof(Out) <= 64, "a lane's operands fit 64 bytes");
  static_assert(std::is_trivially_copyable_v<In> && std::is_trivially_copyable_v<Out>);
  Out out{};
  warp_exchange(op, mask, &in, sizeof(In), &out, sizeof(Out),
                [&compute](const unsigned char (*in_bytes)[64], unsigned char (*out_bytes)[64], unsigned m) {
                  In lanes_in[32];
                  Out lanes_out[32];
                  for (int l = 0; l < 32; ++l) {
                    std::memcpy(&lanes_in[l], in_bytes[l], sizeof(In));
                    lanes_out[l] = Out{};
                  }
                  compute(lanes_in, lanes_out, m);
                  for (int l = 0; l < 32; ++l) std::memcpy(out_bytes[l], &lanes_out[l], sizeof(Out));
                });
  return out;
}

inline void require_lane(unsigned mask, int lane, const char* op) {
  if (lane < 0 || lane > 31 || !((mask >> lane) & 1u)) {
    fail(std::string(op) + ": source lane " + std::to_string(lane) + " is not in the mask");
  }
}

template <typename T>
struct ShuffleIn {
  T value;
  int arg;
};

// A shuffle: lane l gets the value of lane source(l, its argument).
template <typename T, typename Source>
T shuffle(const char* op, unsigned mask, T value, int arg, Source source) {
  return warp_collective<ShuffleIn<T>, T>(op, mask, ShuffleIn<T>{value, arg},
                                          [op, source](const ShuffleIn<T>* in, T* out, unsigned m) {
                                            for (int l = 0; l < 32; ++l) {
                                              if (!((m >> l) & 1u)) continue;
                                              const int src = source(l, in[l].arg);
                                              require_lane(m, src, op);
                                              out[l] = in[src].value;
                                            }
                                          });
}

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask) {
  return shuffle("__shfl_xor_sync", mask, value, lane_mask, [](int lane, int arg) { return lane ^ arg; });
}

template <typename T>
T shfl(unsigned mask, T value, int src_lane) {
  return shuffle("__shfl_sync", mask, value, src_lane, [](int, int arg) { return arg & 31; });
}

inline bool any(unsigned mask, bool predicate) {
  return warp_collective<int, int>("__any_sync", mask, static_cast<int>(predicate),
                                   [](const int* in, int* out, unsigned m) {
                                     int result = 0;
                                     for (int l = 0; l < 32; ++l) result |= ((m >> l) & 1u) ? in[l] : 0;
                                     for (int l = 0; l < 32; ++l) out[l] = result;
                                   });
}

// --- launches -------------------------------------------------------------------------------
// `kernel<<<grid, block, smem, stream>>>(args)` becomes `(Launch("kernel", grid, block, smem, stream) | kernel)(args)`.
struct Launch {
  const char* kernel_name;
  dim3 grid, block;
  size_t shared_bytes;
  Launch(const char* name, dim3 grid_, dim3 block_, size_t shared_bytes_ = 0, cudaStream_t = nullptr)
      : kernel_name(name), grid(grid_), block(block_), shared_bytes(shared_bytes_) {}
};

// Runs `body` as every thread of the grid; a defect or an invalid configuration throws Fault.
void run_grid(const Launch& launch, const void* kernel, const std::function<void()>& body);

template <typename... Params>
auto operator|(const Launch& launch, void (*kernel)(Params...)) {
  return [launch, kernel](auto&&... args) {
    // The kernel's parameters, converted once as a launch does; each thread gets copies.
    const std::tuple<std::decay_t<Params>...> params(std::forward<decltype(args)>(args)...);
    run_grid(launch, reinterpret_cast<const void*>(kernel), [&] { std::apply(kernel, params); });
  };
}

}  // namespace simt

// The runtime's templates for kernel pointers (cuda_runtime.h declares them for nvcc only).
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel* kernel, int block_size,
                                                          size_t shared_bytes) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, reinterpret_cast<const void*>(kernel), block_size,
                                                         shared_bytes);
}

// --- built-in variables and device functions ------------------------------------------------
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#define threadIdx (::simt::thread_index())
#define blockIdx (::simt::block_index())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())
#define warpSize 32

inline void __syncthreads() { simt::syncthreads(); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return simt::shfl_xor(mask, value, lane_mask);
}
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane) {
  return simt::shfl(mask, value, src_lane);
}
inline int __any_sync(unsigned mask, int predicate) { return simt::any(mask, predicate != 0); }
[[noreturn]] inline void __trap() { simt::fail("__trap() called"); }

using std::isfinite;
using std::isinf;
using std::isnan;

// CUDA's min/max overloads for mixed integer and float types; on floats they are fminf/fmaxf,
// which drop a NaN operand.
template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(static_cast<C>(a), static_cast<C>(b));
  return b < a ? b : a;
}
template <typename A, typename B>
std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(static_cast<C>(a), static_cast<C>(b));
  return a < b ? b : a;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// Round-to-nearest arithmetic that the compiler may not contract into an fma (nor may g++ here:
// the emulator is built with -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

// 16-byte store with the write-back hint: alignment is the GPU's rule, checked here.
inline void __stwb(uint4* p, uint4 v) {
  if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) simt::fail("__stwb: misaligned 16-byte store");
  *p = v;
}
