// llmkern._cpu.bpe_train: byte-level BPE merges (csrc/cpu/bpe.h), trained without the GIL;
// llmkern._cpu.Gpt2WordCounter: GPT-2 pre-tokenization and word counts (csrc/cpu/bpe_pretokenize.h).
#include "cpu/bpe.h"

#include <pybind11/stl.h>

#include <memory>

#include "cpu/bpe_pretokenize.h"

#include "bindings/bindings.h"

namespace py = pybind11;

namespace llmkern {

void bind_bpe(py::module_& m) {
  m.def(
      "bpe_train",
      [](const std::vector<std::string>& words, const std::vector<int64_t>& counts, int64_t max_new_tokens,
         int64_t min_count) {
        std::vector<BpeMerge> merges;
        {
          py::gil_scoped_release no_gil;  // the inputs are C++ copies now
          merges = bpe_train(words, counts, max_new_tokens, min_count);
        }
        py::list out(merges.size());
        for (size_t i = 0; i < merges.size(); ++i) {
          const BpeMerge& mg = merges[i];
          out[i] = py::make_tuple(mg.left, mg.right, mg.result, mg.count);
        }
        return out;
      },
      py::arg("words"), py::arg("counts"), py::arg("max_new_tokens"), py::arg("min_count") = 1,
      "Learn byte-level BPE merges from distinct words (bytes) and their counts.\n"
      "Returns [(left_id, right_id, merged_id, count), ...] in merge order; ids 0..255 are bytes,\n"
      "new tokens get 256, 257, ... (a merge that rebuilds an existing byte string reuses its id).");

  py::class_<WordCounter>(m, "Gpt2WordCounter",
                          "Counts the pieces GPT-2's pre-tokenization regex splits UTF-8 texts into")
      .def(py::init([](const py::bytes& classes) { return std::make_unique<WordCounter>(std::string(classes)); }),
           py::arg("classes"),
           "classes: 0x110000 bytes, per code point a bit set of 1 (\\p{L}), 2 (\\p{N}), 4 (\\s)")
      .def(
          "add",
          [](WordCounter& self, const py::list& texts, int num_threads) {
            std::vector<std::string_view> views;
            views.reserve(texts.size());
            for (const py::handle item : texts) {
              char* data = nullptr;
              Py_ssize_t size = 0;
              if (!PyBytes_Check(item.ptr()) || PyBytes_AsStringAndSize(item.ptr(), &data, &size) != 0) {
                throw py::type_error("Gpt2WordCounter.add: texts must be a list of bytes (UTF-8)");
              }
              views.emplace_back(data, static_cast<size_t>(size));
            }
            py::gil_scoped_release no_gil;  // the list (and its bytes) stays alive in the caller
            self.add(views, num_threads);
          },
          py::arg("texts"), py::arg("num_threads") = 0, "Split and count texts (a list of UTF-8 bytes)")
      .def("words",
           [](const WordCounter& self) {
             py::list words, counts;
             for (const auto& [word, count] : self.counts()) {
               words.append(py::bytes(word));
               counts.append(count);
             }
             return py::make_tuple(words, counts);
           },
           "(words as bytes, their counts), in no particular order")
      .def("__len__", [](const WordCounter& self) { return self.counts().size(); });
}

}  // namespace llmkern
