// The row kernel of the fused linear + cross-entropy (llmkern/ops/fused_linear_cross_entropy.py):
// the matmuls around it are cuBLAS's (through torch); this computes each row's loss from its
// logits and writes d loss / d logits over them, so a chunk of logits is read twice and written once.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace llmkern {

// logits: (rows, n_classes) of `dtype`, contiguous columns, row stride `logits_stride` elements;
// overwritten with the gradient when compute_grad. target: (rows,) int64 class ids; a row whose
// target is ignore_index gets loss 0 and gradient 0, a target outside [0, n_classes) loss and
// gradient NaN. loss: (rows,) fp32. grad_scale: one fp32 on the device, d reduced loss / d row loss.
// label_smoothing eps: the target gets 1 - eps of the probability, every class eps / n_classes.
// softcap C > 0: the loss is that of the capped logits C tanh(z / C) and the gradient written is
// the raw logits' (through the cap); 0: no cap.
// Bad sizes, arguments or null pointers return cudaErrorInvalidValue before any CUDA call.
cudaError_t cross_entropy_rows(void* logits, const int64_t* target, float* loss, const float* grad_scale,
                               int64_t rows, int64_t n_classes, int64_t logits_stride, int64_t ignore_index,
                               float label_smoothing, float softcap, bool compute_grad, DType dtype,
                               cudaStream_t stream);

}  // namespace llmkern
