#include "cuda/rope.h"

#include <pybind11/stl.h>

#include <array>

#include "bindings/bindings.h"
#include "common/check.h"

namespace py = pybind11;

namespace llmkern {

void bind_rope(py::module_& m) {
  m.def(
      "rope_forward",
      [](std::uintptr_t x, std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t y, int64_t batch,
         int64_t heads, int64_t seq, int64_t head_dim, const std::array<int64_t, 3>& x_stride,
         const std::array<int64_t, 3>& y_stride, const std::array<int64_t, 2>& cos_stride,
         const std::array<int64_t, 2>& sin_stride, bool inverse, int dtype, std::uintptr_t stream) {
        RopeArgs args{};
        args.x = as_ptr<const void>(x);
        args.cos = as_ptr<const float>(cos);
        args.sin = as_ptr<const float>(sin);
        args.y = as_ptr<void>(y);
        args.batch = batch;
        args.heads = heads;
        args.seq = seq;
        args.head_dim = head_dim;
        for (int i = 0; i < 3; ++i) {
          args.x_stride[i] = x_stride[i];
          args.y_stride[i] = y_stride[i];
        }
        for (int i = 0; i < 2; ++i) {
          args.cos_stride[i] = cos_stride[i];
          args.sin_stride[i] = sin_stride[i];
        }
        args.inverse = inverse;
        args.dtype = static_cast<DType>(dtype);
        LLMKERN_CHECK_LAUNCH("rope_forward", rope_forward(args, reinterpret_cast<cudaStream_t>(stream)));
      },
      "RoPE (rotate-half) on raw pointers, by theta or by -theta (see csrc/cuda/rope.h)");
}

}  // namespace llmkern
