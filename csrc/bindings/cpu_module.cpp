// llmkern._cpu: the CPU hot loops of the data pipeline (MinHash, BPE training). Always built.
#include <pybind11/pybind11.h>

#include "bindings/bindings.h"

namespace py = pybind11;

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "llmkern CPU hot loops of the data pipeline";
  llmkern::bind_minhash(m);
  llmkern::bind_bpe(m);
}
