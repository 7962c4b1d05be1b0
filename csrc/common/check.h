// Error handling shared by every launcher and binding.
//
// Launchers return cudaError_t (they never throw and never abort); bindings turn a failure
// into a Python RuntimeError that names the kernel, the file and the line.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace llmkern {

// Return early from a launcher when a CUDA call fails.
#define LLMKERN_RETURN_IF_ERROR(expr)        \
  do {                                       \
    cudaError_t llmkern_err_ = (expr);       \
    if (llmkern_err_ != cudaSuccess) {       \
      return llmkern_err_;                   \
    }                                        \
  } while (0)

// Throw (pybind11 turns std::runtime_error into RuntimeError) when a launcher failed.
inline void throw_on_error(cudaError_t err, const char* kernel, const char* file, int line) {
  if (err == cudaSuccess) return;
  // A sticky launch error would otherwise surface in an unrelated later call.
  cudaGetLastError();
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    throw std::runtime_error(std::string("llmkern CUDA kernel '") + kernel +
                             "' cannot run: no CUDA device (" + cudaGetErrorString(err) + ")");
  }
  throw std::runtime_error(std::string("llmkern CUDA kernel '") + kernel + "' failed: " +
                           cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ") at " + file +
                           ":" + std::to_string(line));
}

#define LLMKERN_CHECK_LAUNCH(kernel_name, expr) \
  ::llmkern::throw_on_error((expr), kernel_name, __FILE__, __LINE__)

// A size check in a launcher: not a CUDA error, but still an error code, never a crash.
#define LLMKERN_RETURN_INVALID_IF(cond) \
  do {                                  \
    if (cond) {                         \
      return cudaErrorInvalidValue;     \
    }                                   \
  } while (0)

}  // namespace llmkern
