// GPT-2's pre-tokenization without a regex engine (see bpe_pretokenize.h for the pattern).
#include "cpu/bpe_pretokenize.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <thread>

namespace llmkern {
namespace {

struct CodePoint {
  uint32_t value;
  size_t length;  // bytes
};

// One UTF-8 sequence at p (n > 0 bytes left). A malformed lead byte is a one-byte "code point"
// outside Unicode (no class), so the splitter always advances and never reads past the end.
inline CodePoint decode(const unsigned char* p, size_t n) {
  const unsigned char b = p[0];
  if (b < 0x80) return {b, 1};
  if ((b & 0xE0) == 0xC0 && n >= 2) return {((b & 0x1Fu) << 6) | (p[1] & 0x3Fu), 2};
  if ((b & 0xF0) == 0xE0 && n >= 3) return {((b & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu), 3};
  if ((b & 0xF8) == 0xF0 && n >= 4) {
    return {((b & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu), 4};
  }
  return {0xFFFFFFFFu, 1};
}

// The run a piece is made of: letters, numbers, other (neither those nor space), or space.
enum Kind { kKindSpace, kKindLetter, kKindNumber, kKindOther };

inline Kind kind_of(uint32_t cp, const uint8_t* classes) {
  const uint8_t c = cp < kNumCodePoints ? classes[cp] : 0;
  if (c & kLetter) return kKindLetter;
  if (c & kNumber) return kKindNumber;
  if (c & kSpace) return kKindSpace;
  return kKindOther;
}

inline bool printable_ascii(char c) { return c >= 0x21 && c <= 0x7E; }

// The first place at or after `from` where cutting the text changes none of its pieces: just
// after a '\n' between two printable ASCII characters. That '\n' is a piece of its own both in
// the whole text (`\s`) and at the end of the part before the cut (`\s++$`); a longer
// whitespace run would not do, as `\s++$` would keep it whole where `\s+(?!\S)` splits it.
size_t find_safe_cut(std::string_view text, size_t from) {
  size_t pos = text.find('\n', std::max<size_t>(from, 1));
  while (pos != std::string_view::npos && pos + 1 < text.size()) {
    if (printable_ascii(text[pos - 1]) && printable_ascii(text[pos + 1])) return pos + 1;
    pos = text.find('\n', pos + 1);
  }
  return std::string_view::npos;
}

constexpr size_t kSliceBytes = 1 << 20;  // work unit of one thread

using LocalCounts = std::unordered_map<std::string_view, int64_t>;

void count_pieces(std::string_view text, const uint8_t* classes, LocalCounts& counts) {
  while (!text.empty()) {
    const size_t len = gpt2_piece_length(text, classes);
    ++counts[text.substr(0, len)];
    text.remove_prefix(len);
  }
}

}  // namespace

size_t gpt2_piece_length(std::string_view text, const uint8_t* classes) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  // '(?:[sdmt]|ll|ve|re)
  if (s[0] == '\'' && n >= 2) {
    const unsigned char a = s[1];
    if (a == 's' || a == 'd' || a == 'm' || a == 't') return 2;
    if (n >= 3) {
      const unsigned char b = s[2];
      if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) return 3;
    }
  }
  // ` ?\p{L}++`, ` ?\p{N}++`, ` ?[^\s\p{L}\p{N}]++`: an optional space, then a run of one kind.
  // Without the space the first character is itself a space, which starts none of the three.
  const size_t start = s[0] == ' ' ? 1 : 0;
  if (start < n) {
    CodePoint cp = decode(s + start, n - start);
    const Kind kind = kind_of(cp.value, classes);
    if (kind != kKindSpace) {
      size_t end = start + cp.length;
      while (end < n) {
        cp = decode(s + end, n - end);
        if (kind_of(cp.value, classes) != kind) break;
        end += cp.length;
      }
      return end;
    }
  }
  // Here the text starts with whitespace. `\s++$`: the run reaches the end. `\s+(?!\S)`: a run
  // of two or more before a non-space gives back its last character. `\s`: one character.
  size_t end = 0, last_start = 0;
  while (end < n) {
    const CodePoint cp = decode(s + end, n - end);
    if (kind_of(cp.value, classes) != kKindSpace) break;
    last_start = end;
    end += cp.length;
  }
  if (end == n) return n;
  return last_start > 0 ? last_start : end;
}

WordCounter::WordCounter(std::string classes) : classes_(std::move(classes)) {
  if (classes_.size() != kNumCodePoints) {
    throw std::invalid_argument("WordCounter: classes must hold one byte per code point (0x110000), got " +
                                std::to_string(classes_.size()));
  }
}

void WordCounter::add(const std::vector<std::string_view>& texts, int num_threads) {
  std::vector<std::string_view> slices;
  for (std::string_view text : texts) {
    while (text.size() > kSliceBytes) {
      const size_t cut = find_safe_cut(text, kSliceBytes);
      if (cut == std::string_view::npos) break;
      slices.push_back(text.substr(0, cut));
      text.remove_prefix(cut);
    }
    if (!text.empty()) slices.push_back(text);
  }
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  num_threads = static_cast<int>(std::min<size_t>(num_threads, std::max<size_t>(slices.size(), 1)));

  const auto* classes = reinterpret_cast<const uint8_t*>(classes_.data());
  std::vector<LocalCounts> local(num_threads);
  std::atomic<size_t> next{0};
  auto work = [&](int t) {
    for (size_t i = next++; i < slices.size(); i = next++) count_pieces(slices[i], classes, local[t]);
  };
  if (num_threads == 1) {
    work(0);
  } else {
    std::vector<std::thread> threads;
    for (int t = 0; t < num_threads; ++t) threads.emplace_back(work, t);
    for (auto& th : threads) th.join();
  }
  for (const LocalCounts& counts : local) {
    for (const auto& [word, count] : counts) counts_[std::string(word)] += count;
  }
}

}  // namespace llmkern
