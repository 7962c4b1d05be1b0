// FlashAttention-2 forward and backward on tensor cores (sm80+): o = softmax(q k^T * scale + mask) v.
//
// Layout (B, H, S, D) with arbitrary batch/head/sequence strides and a contiguous last dim;
// k and v have kv_heads heads, q has q_heads (a multiple: grouped-query attention).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace llmkern {

struct AttentionForwardArgs {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* doc_ids;  // (batch, seq) document id per position, or null: no document mask
  void* o;                 // (batch, q_heads, seq_q, head_dim), strides below
  float* lse;              // (batch, q_heads, seq_q) contiguous: natural-log log-sum-exp per row
  int64_t batch, q_heads, kv_heads, seq_q, seq_k, head_dim;
  // Element strides of the batch, head and sequence dims; each a multiple of 8, and every
  // pointer 16-byte aligned (rows move as 16-byte cp.async chunks).
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3];
  float scale;  // multiplies q k^T
  bool causal;  // key j is seen by query i when j <= i + seq_k - seq_q (bottom-right aligned)
  // Sliding window, only with causal: query i, at position p = i + seq_k - seq_q, sees key j only when
  // p - j < window as well (the last `window` keys up to its own). 0: no window; a negative window, or
  // one without causal, returns cudaErrorInvalidValue. Tiles wholly outside the window are skipped.
  int window;
  DType dtype;  // kFloat16 or kBFloat16
  // Query rows per block, 16 per warp: 64 (4 warps) or 128 (8 warps, which read each k/v tile from
  // L2 for twice the rows). 0 means 64.
  int block_rows;
};

// Head dims with kernels (the Python side checks too; other values return cudaErrorInvalidValue).
bool attention_supports_head_dim(int64_t head_dim);

// A row that sees no key gets o = 0 and lse = +inf (so a backward's exp(s - lse) is 0 there).
cudaError_t attention_forward(const AttentionForwardArgs& args, cudaStream_t stream);

struct AttentionBackwardArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  const void* dout;        // the gradient of o
  const float* lse;        // (batch, q_heads, seq_q) contiguous, from attention_forward
  const int32_t* doc_ids;  // as in the forward, or null
  void* dq;
  void* dk;                // (batch, kv_heads, seq_k, head_dim): summed over each group's query heads
  void* dv;
  float* delta;            // workspace (batch, q_heads, seq_q) contiguous fp32: rowsum(o * dout)
  int64_t batch, q_heads, kv_heads, seq_q, seq_k, head_dim;
  // Element strides of the batch, head and sequence dims, multiples of 8; pointers 16-byte aligned.
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3], dout_stride[3];
  int64_t dq_stride[3], dk_stride[3], dv_stride[3];
  float scale;
  bool causal;
  int window;  // as in the forward
  DType dtype;
};

// dq, dk, dv of attention_forward (three kernels: delta, then dk/dv per key block, then dq per
// query block; no atomics, so the result is deterministic).
cudaError_t attention_backward(const AttentionBackwardArgs& args, cudaStream_t stream);

}  // namespace llmkern
