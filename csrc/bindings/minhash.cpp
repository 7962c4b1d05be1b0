// llmkern._cpu.minhash_signatures: Python strings in, a (texts, num_perm) uint32 array out.
#include "cpu/minhash.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "bindings/bindings.h"

namespace py = pybind11;

namespace llmkern {
namespace {

using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

// The UTF-8 bytes of a str (CPython caches them in the object) or a bytes object, without a copy.
minhash::TextView view_of(const py::handle& item, size_t index) {
  if (PyUnicode_Check(item.ptr())) {
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(item.ptr(), &size);
    if (data == nullptr) throw py::error_already_set();  // e.g. a lone surrogate
    return {data, static_cast<size_t>(size)};
  }
  if (PyBytes_Check(item.ptr())) {
    return {PyBytes_AS_STRING(item.ptr()), static_cast<size_t>(PyBytes_GET_SIZE(item.ptr()))};
  }
  throw py::type_error("minhash_signatures: texts[" + std::to_string(index) + "] must be str or bytes, got " +
                       std::string(py::str(py::type::of(item).attr("__name__"))));
}

py::tuple minhash_signatures(const py::sequence& texts, const U64Array& a, const U64Array& b, int ngram,
                             int num_threads) {
  if (a.ndim() != 1 || b.ndim() != 1 || a.shape(0) != b.shape(0) || a.shape(0) < 1) {
    throw py::value_error("minhash_signatures: a and b must be 1-D arrays of the same length >= 1, got shapes " +
                          std::to_string(a.ndim() == 1 ? a.shape(0) : -1) + " and " +
                          std::to_string(b.ndim() == 1 ? b.shape(0) : -1));
  }
  if (ngram < 1) throw py::value_error("minhash_signatures: ngram must be >= 1, got " + std::to_string(ngram));
  if (PyUnicode_Check(texts.ptr()) || PyBytes_Check(texts.ptr())) {
    throw py::type_error("minhash_signatures: texts must be a sequence of str or bytes, not a single string");
  }
  const int num_perm = static_cast<int>(a.shape(0));

  // Hold a reference to every item so that its bytes stay alive while the GIL is released.
  const size_t num_texts = py::len(texts);
  std::vector<py::object> keep;
  std::vector<minhash::TextView> views;
  keep.reserve(num_texts);
  views.reserve(num_texts);
  for (size_t t = 0; t < num_texts; ++t) {
    keep.push_back(texts[t]);
    views.push_back(view_of(keep.back(), t));
  }

  py::array_t<uint32_t> sig({static_cast<py::ssize_t>(num_texts), static_cast<py::ssize_t>(num_perm)});
  py::array_t<int64_t> counts(static_cast<py::ssize_t>(num_texts));
  uint32_t* sig_ptr = sig.mutable_data();
  int64_t* counts_ptr = counts.mutable_data();
  const uint64_t* a_ptr = a.data();
  const uint64_t* b_ptr = b.data();
  {
    py::gil_scoped_release no_gil;
    minhash::signatures(views, a_ptr, b_ptr, num_perm, ngram, num_threads, sig_ptr, counts_ptr);
  }
  return py::make_tuple(sig, counts);
}

}  // namespace

void bind_minhash(py::module_& m) {
  m.def("minhash_signatures", &minhash_signatures, py::arg("texts"), py::arg("a"), py::arg("b"),
        py::arg("ngram"), py::arg("num_threads") = 0,
        "MinHash signatures of word n-gram shingles (definition in csrc/cpu/minhash.h).\n"
        "Returns (signatures uint32 (len(texts), len(a)), shingle counts int64 (len(texts),)).");
}

}  // namespace llmkern
