#include "cuda/layer_norm.h"

#include "bindings/bindings.h"
#include "common/check.h"

namespace py = pybind11;

namespace llmkern {

void bind_layer_norm(py::module_& m) {
  m.def(
      "layer_norm_forward",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y,
         std::uintptr_t h, int64_t rows, int64_t cols, int64_t x_stride, int64_t residual_stride,
         int64_t y_stride, int64_t h_stride, float eps, int x_dtype, int dtype, int y_dtype, int weight_dtype,
         std::uintptr_t stream) {
        LLMKERN_CHECK_LAUNCH(
            "layer_norm_forward",
            layer_norm_forward(as_ptr<const void>(x), as_ptr<const void>(residual), as_ptr<const void>(weight),
                               as_ptr<const void>(bias), as_ptr<void>(y), as_ptr<void>(h), rows, cols, x_stride,
                               residual_stride, y_stride, h_stride, eps, static_cast<DType>(x_dtype),
                               static_cast<DType>(dtype), static_cast<DType>(y_dtype),
                               static_cast<DType>(weight_dtype), reinterpret_cast<cudaStream_t>(stream)));
      },
      "LayerNorm forward on raw pointers (see csrc/cuda/layer_norm.h)");
  m.def("layer_norm_backward_workspace",
        [](int64_t rows, int64_t cols, bool has_bias) { return layer_norm_backward_workspace(rows, cols, has_bias); },
        "fp32 elements of workspace layer_norm_backward needs");
  m.def(
      "layer_norm_backward",
      [](std::uintptr_t dy, std::uintptr_t h, std::uintptr_t weight, std::uintptr_t dh_extra, std::uintptr_t dh,
         std::uintptr_t dweight, std::uintptr_t dbias, std::uintptr_t workspace, int64_t workspace_size,
         int64_t rows, int64_t cols, int64_t dy_stride, int64_t h_stride, int64_t dh_extra_stride,
         int64_t dh_stride, float eps, int dy_dtype, int dtype, int weight_dtype, std::uintptr_t stream) {
        LLMKERN_CHECK_LAUNCH(
            "layer_norm_backward",
            layer_norm_backward(as_ptr<const void>(dy), as_ptr<const void>(h), as_ptr<const void>(weight),
                                as_ptr<const void>(dh_extra), as_ptr<void>(dh), as_ptr<void>(dweight),
                                as_ptr<void>(dbias), as_ptr<float>(workspace), workspace_size, rows, cols,
                                dy_stride, h_stride, dh_extra_stride, dh_stride, eps, static_cast<DType>(dy_dtype),
                                static_cast<DType>(dtype), static_cast<DType>(weight_dtype),
                                reinterpret_cast<cudaStream_t>(stream)));
      },
      "LayerNorm backward on raw pointers (see csrc/cuda/layer_norm.h)");
}

}  // namespace llmkern
