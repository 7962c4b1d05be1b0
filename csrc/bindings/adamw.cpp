#include "cuda/adamw.h"

#include <pybind11/stl.h>

#include <stdexcept>
#include <vector>

#include "bindings/bindings.h"
#include "common/check.h"

namespace py = pybind11;

namespace llmkern {
namespace {

using Addresses = std::vector<std::uintptr_t>;

template <typename T>
std::vector<T*> as_ptrs(const Addresses& addresses) {
  std::vector<T*> out(addresses.size());
  for (size_t i = 0; i < addresses.size(); ++i) out[i] = as_ptr<T>(addresses[i]);
  return out;
}

void check_lengths(size_t n, std::initializer_list<size_t> others) {
  for (size_t other : others) {
    if (other != n) throw std::invalid_argument("adamw: every address list must have one entry per tensor");
  }
}

void step(const Addresses& params, const Addresses& grads, const Addresses& exp_avgs, const Addresses& exp_avg_sqs,
          const Addresses& masters, const Addresses& steps, const std::vector<int64_t>& numels, int param_dtype,
          double lr, double beta1, double beta2, double eps, double weight_decay, std::uintptr_t lr_device,
          std::uintptr_t clip_state, std::uintptr_t stream) {
  const size_t n = params.size();
  check_lengths(n, {grads.size(), exp_avgs.size(), exp_avg_sqs.size(), steps.size(), numels.size()});
  if (!masters.empty()) check_lengths(n, {masters.size()});
  const auto param_ptrs = as_ptrs<const void>(params);
  const auto grad_ptrs = as_ptrs<const void>(grads);
  const auto exp_avg_ptrs = as_ptrs<void>(exp_avgs);
  const auto exp_avg_sq_ptrs = as_ptrs<void>(exp_avg_sqs);
  const auto master_ptrs = as_ptrs<float>(masters);
  const auto step_ptrs = as_ptrs<const float>(steps);
  const AdamWHyper hyper{lr, beta1, beta2, eps, weight_decay};
  LLMKERN_CHECK_LAUNCH(
      "adamw_step",
      adamw_step(param_ptrs.data(), grad_ptrs.data(), exp_avg_ptrs.data(), exp_avg_sq_ptrs.data(),
                 masters.empty() ? nullptr : master_ptrs.data(), step_ptrs.data(), numels.data(),
                 static_cast<int64_t>(n), static_cast<DType>(param_dtype), hyper, as_ptr<const float>(lr_device),
                 as_ptr<const float>(clip_state), reinterpret_cast<cudaStream_t>(stream)));
}

int64_t grad_sumsq(const Addresses& grads, const std::vector<int64_t>& numels, int dtype, std::uintptr_t partials,
                   int64_t capacity, std::uintptr_t stream) {
  check_lengths(grads.size(), {numels.size()});
  const auto grad_ptrs = as_ptrs<const void>(grads);
  int64_t written = 0;
  LLMKERN_CHECK_LAUNCH("adamw_grad_sumsq",
                       adamw_grad_sumsq(grad_ptrs.data(), numels.data(), static_cast<int64_t>(grads.size()),
                                        static_cast<DType>(dtype), as_ptr<float>(partials), capacity, &written,
                                        reinterpret_cast<cudaStream_t>(stream)));
  return written;
}

}  // namespace

void bind_adamw(py::module_& m) {
  m.def("adamw_step", &step,
        "One multi-tensor AdamW step on raw addresses (see csrc/cuda/adamw.h); masters empty: no master weights",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("masters"),
        py::arg("steps"), py::arg("numels"), py::arg("param_dtype"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("lr_device"), py::arg("clip_state"),
        py::arg("stream"));
  m.def("adamw_grad_sumsq_workspace", &adamw_grad_sumsq_workspace,
        "Most fp32 partials adamw_grad_sumsq writes for this many tensors on the current device");
  m.def("adamw_grad_sumsq", &grad_sumsq,
        "Partial sums of squares of gradients of one dtype; returns how many partials were written",
        py::arg("grads"), py::arg("numels"), py::arg("dtype"), py::arg("partials"), py::arg("capacity"),
        py::arg("stream"));
  m.def(
      "adamw_grad_norm_finalize",
      [](std::uintptr_t partials, int64_t count, float max_norm, std::uintptr_t grad_norm, std::uintptr_t clip_state,
         std::uintptr_t skipped, std::uintptr_t stream) {
        LLMKERN_CHECK_LAUNCH("adamw_grad_norm_finalize",
                             adamw_grad_norm_finalize(as_ptr<const float>(partials), count, max_norm,
                                                      as_ptr<float>(grad_norm), as_ptr<float>(clip_state),
                                                      as_ptr<int64_t>(skipped), reinterpret_cast<cudaStream_t>(stream)));
      },
      "Global norm, clip factor, finite flag and skip count from the partial sums");
}

}  // namespace llmkern
