#include "cuda/fused_linear_cross_entropy.h"

#include "bindings/bindings.h"
#include "common/check.h"

namespace py = pybind11;

namespace llmkern {

void bind_fused_linear_cross_entropy(py::module_& m) {
  m.def(
      "fused_linear_cross_entropy_rows",
      [](std::uintptr_t logits, std::uintptr_t target, std::uintptr_t loss, std::uintptr_t grad_scale,
         int64_t rows, int64_t n_classes, int64_t logits_stride, int64_t ignore_index, float label_smoothing,
         float softcap, bool compute_grad, int dtype, std::uintptr_t stream) {
        LLMKERN_CHECK_LAUNCH(
            "fused_linear_cross_entropy_rows",
            cross_entropy_rows(as_ptr<void>(logits), as_ptr<const int64_t>(target), as_ptr<float>(loss),
                               as_ptr<const float>(grad_scale), rows, n_classes, logits_stride, ignore_index,
                               label_smoothing, softcap, compute_grad, static_cast<DType>(dtype),
                               reinterpret_cast<cudaStream_t>(stream)));
      },
      "Cross-entropy of logits rows with the gradient written over them (see "
      "csrc/cuda/fused_linear_cross_entropy.h)");
}

}  // namespace llmkern
