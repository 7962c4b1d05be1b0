// GPT-2's pre-tokenization, hand-written: the split that the regular expression
//   '(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s
// makes, without a regex engine, and a multi-threaded counter of the pieces ("words").
//
// C++ has no Unicode tables, so the caller passes one: classes[cp] for every code point
// 0..0x10FFFF, a bit set of kLetter (\p{L}), kNumber (\p{N}) and kSpace (\s). llmkern builds
// it from the `regex` package itself, so both agree on every character by construction.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace llmkern {

enum CharClass : uint8_t { kLetter = 1, kNumber = 2, kSpace = 4 };
constexpr size_t kNumCodePoints = 0x110000;

// Byte length of the first piece of `text` (non-empty) under GPT-2's pattern.
size_t gpt2_piece_length(std::string_view text, const uint8_t* classes);

// Counts of the GPT-2 pieces of many UTF-8 texts, accumulated over add() calls.
class WordCounter {
 public:
  // classes: kNumCodePoints bytes (copied).
  explicit WordCounter(std::string classes);

  // Split and count every text, on num_threads threads (<= 0: one per core). Big texts are
  // cut at places where a piece always ends (a newline between printable ASCII), so the
  // counts equal those of splitting each text whole.
  void add(const std::vector<std::string_view>& texts, int num_threads);

  const std::unordered_map<std::string, int64_t>& counts() const { return counts_; }

 private:
  std::string classes_;
  std::unordered_map<std::string, int64_t> counts_;
};

}  // namespace llmkern
