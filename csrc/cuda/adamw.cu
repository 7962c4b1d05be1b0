// Multi-tensor AdamW and the global gradient norm; see adamw.h for the contracts.
//
// Work is split in chunks of kChunk elements. A list of up to kListTensors tensors travels as
// a kernel argument: addresses, sizes, and the running count of chunks (chunk_end), so a
// block finds the tensor of chunk c by walking chunk_end. The grid is one wave of resident
// blocks (persistent) that strides over the chunks; a chunk is 16 elements per thread, small
// enough that the last chunks spread evenly over the blocks.
//
// Per element the math is torch.optim.AdamW's, in fp32, with the roundings of its separate
// foreach ops (__fmul_rn stops nvcc from fusing a multiply into the next add where torch
// rounds in between). Bias corrections are formed in float64, as torch forms them on the host.
#include "cuda/adamw.h"

#include <algorithm>
#include <type_traits>

#include "common/check.h"
#include "common/reduce.cuh"
#include "common/vec.cuh"

namespace llmkern {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;      // elements per chunk: 16 per thread
// Tensors per launch. Kernel arguments may take 32764 bytes since CUDA 12.1 (sm_70 and newer):
// 160 tensors make GPT-2 124M's 148 one update launch instead of four (each launch ends in a
// partial wave of blocks, and the next waits for it).
constexpr int kListTensors = 160;     // tensors per update launch (10 KiB of arguments)
constexpr int kNormListTensors = 160; // tensors per norm launch
constexpr int kFinalizeThreads = 1024;

struct UpdateList {
  void* param[kListTensors];
  const void* grad[kListTensors];
  void* exp_avg[kListTensors];
  void* exp_avg_sq[kListTensors];
  float* master[kListTensors];
  const float* step[kListTensors];
  int64_t numel[kListTensors];
  int64_t chunk_end[kListTensors];  // chunks of tensors 0..t together
  int count;
};

struct NormList {
  const void* grad[kNormListTensors];
  int64_t numel[kNormListTensors];
  int64_t chunk_end[kNormListTensors];
  int count;
};

constexpr size_t kMaxKernelArgumentBytes = 32764;  // CUDA 12.1+
static_assert(sizeof(UpdateList) + 128 <= kMaxKernelArgumentBytes, "the update kernel's arguments are too large");
static_assert(sizeof(NormList) + 64 <= kMaxKernelArgumentBytes, "the norm kernel's arguments are too large");

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0;
}

// The scalars an update needs in fp32, as torch rounds them.
struct Scalars {
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  bool lerp_from_start;  // torch's lerp: m + w*(g - m) when w < 0.5, else g - (g - m)*(1 - w)
};

// Per tensor: the step size and sqrt(bias correction 2) from the device step count.
struct TensorCoefficients {
  float step_size;
  float bias_correction2_sqrt;
};

__device__ __forceinline__ TensorCoefficients tensor_coefficients(double lr, double beta1, double beta2,
                                                                  const float* step) {
  // One lane per warp computes the float64 powers and broadcasts them.
  const int lane = threadIdx.x & 31;
  float step_size = 0.0f, bias_correction2_sqrt = 0.0f;
  if (lane == 0) {
    const double s = static_cast<double>(*step);
    step_size = static_cast<float>(lr / (1.0 - pow(beta1, s)));
    bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, s)));
  }
  return {__shfl_sync(0xffffffffu, step_size, 0), __shfl_sync(0xffffffffu, bias_correction2_sqrt, 0)};
}

__device__ __forceinline__ void adamw_element(float& w, float g, float& m, float& v, float scale, float decay,
                                              const Scalars& s, const TensorCoefficients& c) {
  g = __fmul_rn(g, scale);  // clip_grad_norm_ rounds the scaled gradient before the step reads it
  w = __fmul_rn(w, decay);
  const float diff = g - m;
  m = s.lerp_from_start ? m + s.one_minus_beta1 * diff : g - diff * (1.0f - s.one_minus_beta1);
  v = __fadd_rn(__fmul_rn(v, s.beta2), s.one_minus_beta2 * g * g);
  const float denom = sqrtf(v) / c.bias_correction2_sqrt + s.eps;
  w = w + -c.step_size * (m / denom);
}

// G elements at offset i of one tensor: G = 16-byte packs when aligned, or 1.
template <int G, typename P, typename S, bool kMaster>
__device__ __forceinline__ void update_elements(P* param, const P* grad, S* exp_avg, S* exp_avg_sq, float* master,
                                                int64_t i, float scale, float decay, const Scalars& s,
                                                const TensorCoefficients& c) {
  float w[G], g[G], m[G], v[G];
  if constexpr (kMaster) {
    load_float<G>(master + i, w);
  } else {
    load_float<G>(param + i, w);
  }
  load_float<G>(grad + i, g);
  load_float<G>(exp_avg + i, m);
  load_float<G>(exp_avg_sq + i, v);
#pragma unroll
  for (int e = 0; e < G; ++e) adamw_element(w[e], g[e], m[e], v[e], scale, decay, s, c);
  store_float<G>(exp_avg + i, m);
  store_float<G>(exp_avg_sq + i, v);
  if constexpr (kMaster) store_float<G>(master + i, w);
  store_float<G>(param + i, w);
}

template <typename P, typename S, bool kMaster>
__global__ void __launch_bounds__(kThreads)
    adamw_update_kernel(UpdateList list, Scalars s, double lr, double beta1, double beta2, double weight_decay,
                        const float* lr_device, const float* clip_state) {
  float scale = 1.0f;
  if (clip_state != nullptr) {
    if (clip_state[1] == 0.0f) return;  // non-finite gradient norm: the step is skipped
    scale = clip_state[0];
  }
  if (lr_device != nullptr) lr = static_cast<double>(*lr_device);
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  // Both P and S move in 16-byte packs: G elements of P are one pack, of fp32 S one or two.
  constexpr int G = kPack<P>;

  int t = 0;
  const int64_t total_chunks = list.chunk_end[list.count - 1];
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    while (chunk >= list.chunk_end[t]) ++t;
    const int64_t first_chunk = t == 0 ? 0 : list.chunk_end[t - 1];
    const int64_t begin = (chunk - first_chunk) * kChunk;
    const int64_t n = min(kChunk, list.numel[t] - begin);
    P* param = static_cast<P*>(list.param[t]) + begin;
    const P* grad = static_cast<const P*>(list.grad[t]) + begin;
    S* exp_avg = static_cast<S*>(list.exp_avg[t]) + begin;
    S* exp_avg_sq = static_cast<S*>(list.exp_avg_sq[t]) + begin;
    float* master = kMaster ? list.master[t] + begin : nullptr;
    const TensorCoefficients c = tensor_coefficients(lr, beta1, beta2, list.step[t]);

    // Chunks start at multiples of kChunk, so a tensor whose bases are aligned is aligned here.
    const bool aligned = aligned16(param) && aligned16(grad) && aligned16(exp_avg) && aligned16(exp_avg_sq) &&
                         (!kMaster || aligned16(master));
    const int64_t vector_end = aligned ? n / G * G : 0;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * G; i < vector_end; i += kThreads * G) {
      update_elements<G, P, S, kMaster>(param, grad, exp_avg, exp_avg_sq, master, i, scale, decay, s, c);
    }
    for (int64_t i = vector_end + threadIdx.x; i < n; i += kThreads) {
      update_elements<1, P, S, kMaster>(param, grad, exp_avg, exp_avg_sq, master, i, scale, decay, s, c);
    }
  }
}

template <typename G>
__global__ void __launch_bounds__(kThreads) grad_sumsq_kernel(NormList list, float* partials) {
  constexpr int V = kPack<G>;
  float acc = 0.0f;
  int t = 0;
  const int64_t total_chunks = list.chunk_end[list.count - 1];
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    while (chunk >= list.chunk_end[t]) ++t;
    const int64_t first_chunk = t == 0 ? 0 : list.chunk_end[t - 1];
    const int64_t begin = (chunk - first_chunk) * kChunk;
    const int64_t n = min(kChunk, list.numel[t] - begin);
    const G* grad = static_cast<const G*>(list.grad[t]) + begin;
    const int64_t vector_end = aligned16(grad) ? n / V * V : 0;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * V; i < vector_end; i += kThreads * V) {
      float g[V];
      load_float<V>(grad + i, g);
#pragma unroll
      for (int e = 0; e < V; ++e) acc += g[e] * g[e];
    }
    for (int64_t i = vector_end + threadIdx.x; i < n; i += kThreads) {
      float g[1];
      load_float<1>(grad + i, g);
      acc += g[0] * g[0];
    }
  }
  __shared__ float scratch[32];
  const float total = block_sum(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

__global__ void __launch_bounds__(kFinalizeThreads)
    grad_norm_finalize_kernel(const float* partials, int64_t count, float max_norm, float* grad_norm,
                              float* clip_state, int64_t* skipped) {
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += kFinalizeThreads) acc += partials[i];
  __shared__ float scratch[32];
  const float total = block_sum(acc, scratch);
  if (threadIdx.x == 0) {
    const float norm = sqrtf(total);
    const bool finite = isfinite(norm);
    *grad_norm = norm;
    clip_state[0] = fminf(max_norm / (norm + 1e-6f), 1.0f);  // torch.nn.utils.clip_grad_norm_'s factor
    clip_state[1] = finite ? 1.0f : 0.0f;
    if (!finite) *skipped += 1;
  }
}

// One wave of resident blocks of `kernel` on the current device.
template <typename Kernel>
cudaError_t persistent_grid(Kernel kernel, int* blocks) {
  int device = 0, sms = 0, per_sm = 0;
  LLMKERN_RETURN_IF_ERROR(cudaGetDevice(&device));
  LLMKERN_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  LLMKERN_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  *blocks = std::max(1, sms * per_sm);
  return cudaSuccess;
}

int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

template <typename P, typename S, bool kMaster>
cudaError_t launch_update(const void* const* params, const void* const* grads, void* const* exp_avgs,
                          void* const* exp_avg_sqs, float* const* masters, const float* const* steps,
                          const int64_t* numels, int64_t count, const AdamWHyper& h, const float* lr_device,
                          const float* clip_state, cudaStream_t stream) {
  auto kernel = adamw_update_kernel<P, S, kMaster>;
  int max_blocks = 0;
  LLMKERN_RETURN_IF_ERROR(persistent_grid(kernel, &max_blocks));
  const float one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  const Scalars s{one_minus_beta1, static_cast<float>(h.beta2), static_cast<float>(1.0 - h.beta2),
                  static_cast<float>(h.eps), one_minus_beta1 < 0.5f};
  UpdateList list;
  list.count = 0;
  int64_t chunks = 0;
  auto flush = [&]() -> cudaError_t {
    const int blocks = static_cast<int>(std::min<int64_t>(chunks, max_blocks));
    kernel<<<blocks, kThreads, 0, stream>>>(list, s, h.lr, h.beta1, h.beta2, h.weight_decay, lr_device, clip_state);
    list.count = 0;
    chunks = 0;
    return cudaGetLastError();
  };
  for (int64_t i = 0; i < count; ++i) {
    if (numels[i] == 0) continue;  // nothing to update; its step count still advanced
    const int k = list.count++;
    list.param[k] = const_cast<void*>(params[i]);
    list.grad[k] = grads[i];
    list.exp_avg[k] = exp_avgs[i];
    list.exp_avg_sq[k] = exp_avg_sqs[i];
    list.master[k] = kMaster ? masters[i] : nullptr;
    list.step[k] = steps[i];
    list.numel[k] = numels[i];
    chunks += chunks_of(numels[i]);
    list.chunk_end[k] = chunks;
    if (list.count == kListTensors) LLMKERN_RETURN_IF_ERROR(flush());
  }
  if (list.count > 0) LLMKERN_RETURN_IF_ERROR(flush());
  return cudaSuccess;
}

template <typename G>
cudaError_t launch_sumsq(const void* const* grads, const int64_t* numels, int64_t count, float* partials,
                         int64_t capacity, int64_t* written, cudaStream_t stream) {
  auto kernel = grad_sumsq_kernel<G>;
  int max_blocks = 0;
  LLMKERN_RETURN_IF_ERROR(persistent_grid(kernel, &max_blocks));
  NormList list;
  list.count = 0;
  int64_t chunks = 0;
  *written = 0;
  auto flush = [&]() -> cudaError_t {
    const int blocks = static_cast<int>(std::min<int64_t>(chunks, max_blocks));
    if (*written + blocks > capacity) return cudaErrorInvalidValue;
    kernel<<<blocks, kThreads, 0, stream>>>(list, partials + *written);
    *written += blocks;
    list.count = 0;
    chunks = 0;
    return cudaGetLastError();
  };
  for (int64_t i = 0; i < count; ++i) {
    if (numels[i] == 0) continue;
    const int k = list.count++;
    list.grad[k] = grads[i];
    list.numel[k] = numels[i];
    chunks += chunks_of(numels[i]);
    list.chunk_end[k] = chunks;
    if (list.count == kNormListTensors) LLMKERN_RETURN_IF_ERROR(flush());
  }
  if (list.count > 0) LLMKERN_RETURN_IF_ERROR(flush());
  return cudaSuccess;
}

}  // namespace

cudaError_t adamw_step(const void* const* params, const void* const* grads, void* const* exp_avgs,
                       void* const* exp_avg_sqs, float* const* masters, const float* const* steps,
                       const int64_t* numels, int64_t count, DType param_dtype, const AdamWHyper& hyper,
                       const float* lr_device, const float* clip_state, cudaStream_t stream) {
  LLMKERN_RETURN_INVALID_IF(count < 0);
  for (int64_t i = 0; i < count; ++i) {
    LLMKERN_RETURN_INVALID_IF(numels[i] < 0);
    LLMKERN_RETURN_INVALID_IF(numels[i] > 0 && (params[i] == nullptr || grads[i] == nullptr ||
                                                exp_avgs[i] == nullptr || exp_avg_sqs[i] == nullptr ||
                                                steps[i] == nullptr));
    LLMKERN_RETURN_INVALID_IF(masters != nullptr && numels[i] > 0 && masters[i] == nullptr);
  }
  if (count == 0) return cudaSuccess;
  const bool has_master = masters != nullptr;
  // Master weights only for half-precision params; their moments are fp32.
  LLMKERN_RETURN_INVALID_IF(has_master && param_dtype == DType::kFloat32);
  return dispatch_float(param_dtype, [&](auto tag) -> cudaError_t {
    using P = decltype(tag);
    if constexpr (std::is_same_v<P, float>) {
      return launch_update<P, P, false>(params, grads, exp_avgs, exp_avg_sqs, masters, steps, numels, count,
                                        hyper, lr_device, clip_state, stream);
    } else {
      if (has_master) {
        return launch_update<P, float, true>(params, grads, exp_avgs, exp_avg_sqs, masters, steps, numels,
                                             count, hyper, lr_device, clip_state, stream);
      }
      return launch_update<P, P, false>(params, grads, exp_avgs, exp_avg_sqs, masters, steps, numels, count,
                                        hyper, lr_device, clip_state, stream);
    }
  });
}

int64_t adamw_grad_sumsq_workspace(int64_t count) {
  // The largest grid any dtype's instantiation gets; -1 when the device cannot be queried.
  int fp32 = 0, fp16 = 0, bf16 = 0;
  if (persistent_grid(grad_sumsq_kernel<float>, &fp32) != cudaSuccess ||
      persistent_grid(grad_sumsq_kernel<__half>, &fp16) != cudaSuccess ||
      persistent_grid(grad_sumsq_kernel<__nv_bfloat16>, &bf16) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  const int max_blocks = std::max({fp32, fp16, bf16});
  const int64_t launches = (count + kNormListTensors - 1) / kNormListTensors;
  return std::max<int64_t>(launches, 1) * max_blocks;
}

cudaError_t adamw_grad_sumsq(const void* const* grads, const int64_t* numels, int64_t count, DType dtype,
                             float* partials, int64_t capacity, int64_t* written, cudaStream_t stream) {
  LLMKERN_RETURN_INVALID_IF(count < 0 || partials == nullptr || written == nullptr);
  for (int64_t i = 0; i < count; ++i) {
    LLMKERN_RETURN_INVALID_IF(numels[i] < 0 || (numels[i] > 0 && grads[i] == nullptr));
  }
  return dispatch_float(dtype, [&](auto tag) -> cudaError_t {
    return launch_sumsq<decltype(tag)>(grads, numels, count, partials, capacity, written, stream);
  });
}

cudaError_t adamw_grad_norm_finalize(const float* partials, int64_t count, float max_norm, float* grad_norm,
                                     float* clip_state, int64_t* skipped, cudaStream_t stream) {
  LLMKERN_RETURN_INVALID_IF(count < 0 || grad_norm == nullptr || clip_state == nullptr || skipped == nullptr);
  LLMKERN_RETURN_INVALID_IF(count > 0 && partials == nullptr);
  grad_norm_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(partials, count, max_norm, grad_norm, clip_state,
                                                                skipped);
  return cudaGetLastError();
}

}  // namespace llmkern
