// llmkern._cuda: the CUDA kernels. It links the CUDA runtime statically and no PyTorch, so it
// imports on any machine; calling a kernel where there is no GPU raises a RuntimeError.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

#include "bindings/bindings.h"

namespace py = pybind11;

namespace {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error here, just zero GPUs
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "llmkern CUDA kernels (raw pointers, sizes, strides and streams; no PyTorch)";
  m.attr("compiled_archs") = std::string(LLMKERN_CUDA_ARCHS);
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.def("device_count", &device_count, "Number of CUDA devices the runtime sees (0 without a driver)");
  llmkern::bind_rms_norm(m);
  llmkern::bind_layer_norm(m);
  llmkern::bind_adamw(m);
  llmkern::bind_attention(m);
  llmkern::bind_rope(m);
  llmkern::bind_gated_activation(m);
  llmkern::bind_fused_linear_cross_entropy(m);
}
