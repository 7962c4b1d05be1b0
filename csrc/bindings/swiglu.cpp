#include "cuda/swiglu.h"

#include "bindings/bindings.h"
#include "common/check.h"

namespace py = pybind11;

namespace llmkern {

void bind_swiglu(py::module_& m) {
  m.def(
      "swiglu_forward",
      [](std::uintptr_t gate, std::uintptr_t up, std::uintptr_t y, int64_t rows, int64_t cols,
         int64_t gate_stride, int64_t up_stride, int64_t y_stride, int dtype, std::uintptr_t stream) {
        LLMKERN_CHECK_LAUNCH(
            "swiglu_forward",
            swiglu_forward(as_ptr<const void>(gate), as_ptr<const void>(up), as_ptr<void>(y), rows, cols,
                           gate_stride, up_stride, y_stride, static_cast<DType>(dtype),
                           reinterpret_cast<cudaStream_t>(stream)));
      },
      "SwiGLU forward y = silu(gate) * up on raw pointers (see csrc/cuda/swiglu.h)");
  m.def(
      "swiglu_backward",
      [](std::uintptr_t dy, std::uintptr_t gate, std::uintptr_t up, std::uintptr_t dgate, std::uintptr_t dup,
         int64_t rows, int64_t cols, int64_t dy_stride, int64_t gate_stride, int64_t up_stride,
         int64_t dgate_stride, int64_t dup_stride, int dtype, std::uintptr_t stream) {
        LLMKERN_CHECK_LAUNCH(
            "swiglu_backward",
            swiglu_backward(as_ptr<const void>(dy), as_ptr<const void>(gate), as_ptr<const void>(up),
                            as_ptr<void>(dgate), as_ptr<void>(dup), rows, cols, dy_stride, gate_stride,
                            up_stride, dgate_stride, dup_stride, static_cast<DType>(dtype),
                            reinterpret_cast<cudaStream_t>(stream)));
      },
      "SwiGLU backward (dgate, dup) on raw pointers (see csrc/cuda/swiglu.h)");
}

}  // namespace llmkern
