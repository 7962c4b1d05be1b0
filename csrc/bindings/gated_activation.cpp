#include "cuda/gated_activation.h"

#include <string>

#include "bindings/bindings.h"
#include "common/check.h"

namespace py = pybind11;

namespace llmkern {
namespace {

using GatedForward = cudaError_t (*)(const void*, const void*, void*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                     DType, cudaStream_t);
using GatedBackward = cudaError_t (*)(const void*, const void*, const void*, void*, void*, int64_t, int64_t, int64_t,
                                      int64_t, int64_t, int64_t, int64_t, DType, cudaStream_t);

// One op's pair of launchers, <op>_forward and <op>_backward, on raw pointers.
void bind_gated_op(py::module_& m, const std::string& op, const std::string& formula, GatedForward forward,
                   GatedBackward backward) {
  const std::string forward_name = op + "_forward";
  const std::string backward_name = op + "_backward";
  m.def(
      forward_name.c_str(),
      [forward_name, forward](std::uintptr_t gate, std::uintptr_t up, std::uintptr_t y, int64_t rows, int64_t cols,
                              int64_t gate_stride, int64_t up_stride, int64_t y_stride, int dtype,
                              std::uintptr_t stream) {
        LLMKERN_CHECK_LAUNCH(forward_name.c_str(),
                             forward(as_ptr<const void>(gate), as_ptr<const void>(up), as_ptr<void>(y), rows, cols,
                                     gate_stride, up_stride, y_stride, static_cast<DType>(dtype),
                                     reinterpret_cast<cudaStream_t>(stream)));
      },
      (formula + " forward on raw pointers (see csrc/cuda/gated_activation.h)").c_str());
  m.def(
      backward_name.c_str(),
      [backward_name, backward](std::uintptr_t dy, std::uintptr_t gate, std::uintptr_t up, std::uintptr_t dgate,
                                std::uintptr_t dup, int64_t rows, int64_t cols, int64_t dy_stride,
                                int64_t gate_stride, int64_t up_stride, int64_t dgate_stride, int64_t dup_stride,
                                int dtype, std::uintptr_t stream) {
        LLMKERN_CHECK_LAUNCH(backward_name.c_str(),
                             backward(as_ptr<const void>(dy), as_ptr<const void>(gate), as_ptr<const void>(up),
                                      as_ptr<void>(dgate), as_ptr<void>(dup), rows, cols, dy_stride, gate_stride,
                                      up_stride, dgate_stride, dup_stride, static_cast<DType>(dtype),
                                      reinterpret_cast<cudaStream_t>(stream)));
      },
      (formula + " backward (dgate, dup) on raw pointers (see csrc/cuda/gated_activation.h)").c_str());
}

}  // namespace

// SwiGLU's and GeGLU's launchers share one kernel source (csrc/cuda/gated_activation.cu); each op keeps
// its own names here.
void bind_gated_activation(py::module_& m) {
  bind_gated_op(m, "swiglu", "SwiGLU y = silu(gate) * up", swiglu_forward, swiglu_backward);
  bind_gated_op(m, "geglu", "GeGLU y = gelu_tanh(gate) * up", geglu_forward, geglu_backward);
}

}  // namespace llmkern
