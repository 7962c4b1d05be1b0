// Multi-tensor AdamW and the global gradient norm (llmkern/optim/adamw.py drives them).
//
// Each launcher takes host arrays of device addresses, one entry per tensor, packs them in
// lists of a few dozen tensors that travel as kernel arguments (no metadata upload, so a
// captured CUDA graph replays them as is) and launches one persistent, grid-stride kernel
// per list. Everything that changes between steps (step counts, a device lr, the clip
// factor) is read on the device.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace llmkern {

// Hyperparameters as the host holds them (float64, as torch.optim.AdamW uses Python floats).
struct AdamWHyper {
  double lr;            // ignored when lr_device is given
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
};

// One step over `count` tensors, in place. params/grads have `param_dtype`; exp_avgs and
// exp_avg_sqs have it too, or fp32 when `masters` is given (fp32 master weights: the update
// runs on them and params receive the rounded result). steps: fp32 per-tensor step counts,
// already incremented for this step. lr_device: an fp32 lr on the device, or null.
// clip_state: fp32 [grad scale, finite flag] from adamw_grad_norm_finalize, or null; with
// a zero flag every block returns before touching memory.
cudaError_t adamw_step(const void* const* params, const void* const* grads, void* const* exp_avgs,
                       void* const* exp_avg_sqs, float* const* masters, const float* const* steps,
                       const int64_t* numels, int64_t count, DType param_dtype, const AdamWHyper& hyper,
                       const float* lr_device, const float* clip_state, cudaStream_t stream);

// Most fp32 partial sums adamw_grad_sumsq writes for `count` tensors on the current device.
int64_t adamw_grad_sumsq_workspace(int64_t count);

// Partial sums of squares (fp32 accumulation) of `count` gradients of one dtype, one per
// block, into partials[0 .. *written). Fails when more than `capacity` would be needed.
cudaError_t adamw_grad_sumsq(const void* const* grads, const int64_t* numels, int64_t count, DType dtype,
                             float* partials, int64_t capacity, int64_t* written, cudaStream_t stream);

// Sums `count` partials in a fixed order (deterministic) and writes grad_norm = sqrt(sum),
// clip_state = [min(1, max_norm / (norm + 1e-6)), 1 if finite else 0], and adds 1 to
// *skipped when the norm is not finite.
cudaError_t adamw_grad_norm_finalize(const float* partials, int64_t count, float max_norm, float* grad_norm,
                                     float* clip_state, int64_t* skipped, cudaStream_t stream);

}  // namespace llmkern
