// Each op's binding file defines one bind_<op>(module) that cuda_module.cpp calls.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace llmkern {

// Pointers and streams cross from Python as integers (tensor.data_ptr(), stream.cuda_stream).
template <typename T>
inline T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void bind_rms_norm(pybind11::module_& m);
void bind_layer_norm(pybind11::module_& m);
void bind_adamw(pybind11::module_& m);
void bind_attention(pybind11::module_& m);
void bind_rope(pybind11::module_& m);
void bind_gated_activation(pybind11::module_& m);
void bind_fused_linear_cross_entropy(pybind11::module_& m);
void bind_minhash(pybind11::module_& m);
void bind_bpe(pybind11::module_& m);

}  // namespace llmkern
