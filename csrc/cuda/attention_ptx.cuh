// The inline PTX of the attention kernels (sm80+): cp.async (global -> shared copies that skip
// the registers), ldmatrix (shared -> the register fragments of mma) and mma.sync m16n8k16 with
// fp32 accumulators. Only these functions hold assembly; the tests' CPU emulator
// (python_tests/simt) swaps this one file for a model of the same instructions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

// cp.async and mma.m16n8k16 exist from sm80 on. A build for an older GPU (setup.py targets the
// GPU it finds: a T4 or a V100) must still compile the module, whose other kernels run there,
// so for such targets the instructions become traps; the launchers refuse those devices first.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define LLMKERN_SM80_ASM(...) __trap()
#else
#define LLMKERN_SM80_ASM(...) asm volatile(__VA_ARGS__)
#endif

namespace llmkern {
namespace attention_detail {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; when !valid the 16 shared bytes are zero-filled and `src` is not read.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  LLMKERN_SM80_ASM("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
                   "r"(valid ? 16 : 0));  // src-size 0: zero-fill
}

__device__ __forceinline__ void cp_async_commit() { LLMKERN_SM80_ASM("cp.async.commit_group;\n" ::); }

// Wait until at most N committed groups are still in flight.
// The "memory" clobber keeps the compiler from moving shared-memory loads above the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  LLMKERN_SM80_ASM("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
  LLMKERN_SM80_ASM("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(smem_address(row_address)));
}

// The same, each matrix transposed on the way (for a B operand stored k-major, like v).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
  LLMKERN_SM80_ASM("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(smem_address(row_address)));
}

// c += a * b on one 16x8x16 tile.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  LLMKERN_SM80_ASM(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  LLMKERN_SM80_ASM(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace attention_detail
}  // namespace llmkern
