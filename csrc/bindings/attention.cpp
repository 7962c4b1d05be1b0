#include <pybind11/stl.h>

#include <array>

#include "bindings/bindings.h"
#include "common/check.h"
#include "cuda/attention.h"

namespace py = pybind11;

namespace llmkern {

namespace {

using Strides = std::array<int64_t, 3>;  // batch, head, sequence (elements)

void copy_strides(int64_t (&dst)[3], const Strides& src) {
  for (int i = 0; i < 3; ++i) dst[i] = src[i];
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("attention_supports_head_dim", &attention_supports_head_dim,
        "Whether attention_forward has kernels for this head dim");
  m.def(
      "attention_forward",
      [](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t doc_ids, std::uintptr_t o,
         std::uintptr_t lse, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t seq_q, int64_t seq_k,
         int64_t head_dim, const Strides& q_stride, const Strides& k_stride, const Strides& v_stride,
         const Strides& o_stride, float scale, bool causal, int window, int dtype, int block_rows,
         std::uintptr_t stream) {
        AttentionForwardArgs args{};
        args.q = as_ptr<const void>(q);
        args.k = as_ptr<const void>(k);
        args.v = as_ptr<const void>(v);
        args.doc_ids = as_ptr<const int32_t>(doc_ids);
        args.o = as_ptr<void>(o);
        args.lse = as_ptr<float>(lse);
        args.batch = batch;
        args.q_heads = q_heads;
        args.kv_heads = kv_heads;
        args.seq_q = seq_q;
        args.seq_k = seq_k;
        args.head_dim = head_dim;
        copy_strides(args.q_stride, q_stride);
        copy_strides(args.k_stride, k_stride);
        copy_strides(args.v_stride, v_stride);
        copy_strides(args.o_stride, o_stride);
        args.scale = scale;
        args.causal = causal;
        args.window = window;
        args.dtype = static_cast<DType>(dtype);
        args.block_rows = block_rows;
        LLMKERN_CHECK_LAUNCH("attention_forward",
                             attention_forward(args, reinterpret_cast<cudaStream_t>(stream)));
      },
      "FlashAttention-2 forward on raw pointers (see csrc/cuda/attention.h)");
  m.def(
      "attention_backward",
      [](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o, std::uintptr_t dout,
         std::uintptr_t lse, std::uintptr_t doc_ids, std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv,
         std::uintptr_t delta, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t seq_q, int64_t seq_k,
         int64_t head_dim, const Strides& q_stride, const Strides& k_stride, const Strides& v_stride,
         const Strides& o_stride, const Strides& dout_stride, const Strides& dq_stride, const Strides& dk_stride,
         const Strides& dv_stride, float scale, bool causal, int window, int dtype, std::uintptr_t stream) {
        AttentionBackwardArgs args{};
        args.q = as_ptr<const void>(q);
        args.k = as_ptr<const void>(k);
        args.v = as_ptr<const void>(v);
        args.o = as_ptr<const void>(o);
        args.dout = as_ptr<const void>(dout);
        args.lse = as_ptr<const float>(lse);
        args.doc_ids = as_ptr<const int32_t>(doc_ids);
        args.dq = as_ptr<void>(dq);
        args.dk = as_ptr<void>(dk);
        args.dv = as_ptr<void>(dv);
        args.delta = as_ptr<float>(delta);
        args.batch = batch;
        args.q_heads = q_heads;
        args.kv_heads = kv_heads;
        args.seq_q = seq_q;
        args.seq_k = seq_k;
        args.head_dim = head_dim;
        copy_strides(args.q_stride, q_stride);
        copy_strides(args.k_stride, k_stride);
        copy_strides(args.v_stride, v_stride);
        copy_strides(args.o_stride, o_stride);
        copy_strides(args.dout_stride, dout_stride);
        copy_strides(args.dq_stride, dq_stride);
        copy_strides(args.dk_stride, dk_stride);
        copy_strides(args.dv_stride, dv_stride);
        args.scale = scale;
        args.causal = causal;
        args.window = window;
        args.dtype = static_cast<DType>(dtype);
        LLMKERN_CHECK_LAUNCH("attention_backward",
                             attention_backward(args, reinterpret_cast<cudaStream_t>(stream)));
      },
      "FlashAttention-2 backward on raw pointers (see csrc/cuda/attention.h)");
}

}  // namespace llmkern
