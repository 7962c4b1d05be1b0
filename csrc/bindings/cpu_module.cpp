// llmkern._cpu: the CPU hot loops of the data pipeline (MinHash, BPE training). Always built.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "llmkern CPU hot loops of the data pipeline";
}
