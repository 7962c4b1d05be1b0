// MinHash signatures of word n-gram shingles (definition in minhash.h), multi-threaded.
#include "cpu/minhash.h"

#include <algorithm>
#include <atomic>
#include <iterator>
#include <limits>
#include <system_error>
#include <thread>

namespace llmkern {
namespace minhash {
namespace {

// What a code point is to the word splitter (the table in minhash.h).
enum CharKind { kSeparator, kWordChar, kSingleCharWord };

struct Range {
  uint32_t first, last;
  CharKind kind;
};

// Non-ASCII ranges that are not kWordChar, sorted (dedup.py's _CHAR_RANGES is the same table).
constexpr Range kRanges[] = {
    {0x0080, 0x00A9, kSeparator},        // C1 controls, no-break space, Latin-1 punctuation and signs
    {0x00AB, 0x00B4, kSeparator},        // (ª, µ and º are letters)
    {0x00B6, 0x00B9, kSeparator},
    {0x00BB, 0x00BF, kSeparator},
    {0x00D7, 0x00D7, kSeparator},        // multiplication sign
    {0x00F7, 0x00F7, kSeparator},        // division sign
    {0x0E00, 0x0EFF, kSingleCharWord},   // Thai, Lao: written without spaces
    {0x1000, 0x109F, kSingleCharWord},   // Myanmar
    {0x1780, 0x17FF, kSingleCharWord},   // Khmer
    {0x2000, 0x2BFF, kSeparator},        // spaces, dashes, quotes, ellipsis ... arrows, math, symbols
    {0x2E00, 0x2E7F, kSeparator},        // supplemental punctuation
    {0x2E80, 0x2FDF, kSingleCharWord},   // CJK radicals
    {0x3000, 0x3004, kSeparator},        // ideographic space, 、。 ...
    {0x3005, 0x3007, kSingleCharWord},   // 々 〆 〇
    {0x3008, 0x303F, kSeparator},        // CJK brackets and marks
    {0x3040, 0x312F, kSingleCharWord},   // hiragana, katakana, bopomofo
    {0x3190, 0x31FF, kSingleCharWord},
    {0x3400, 0x4DBF, kSingleCharWord},   // CJK ideographs (extension A)
    {0x4E00, 0x9FFF, kSingleCharWord},   // CJK ideographs
    {0xF900, 0xFAFF, kSingleCharWord},   // CJK compatibility ideographs
    {0xFE10, 0xFE1F, kSeparator},        // vertical forms
    {0xFE30, 0xFE6F, kSeparator},        // CJK compatibility and small forms
    {0xFEFF, 0xFEFF, kSeparator},        // byte order mark
    {0xFF00, 0xFF0F, kSeparator},        // fullwidth punctuation (its letters and digits are words)
    {0xFF1A, 0xFF20, kSeparator},
    {0xFF3B, 0xFF40, kSeparator},
    {0xFF5B, 0xFF65, kSeparator},
    {0xFF66, 0xFF9F, kSingleCharWord},   // halfwidth katakana
    {0xFFF0, 0xFFFF, kSeparator},        // specials, the replacement character among them
    {0x1F000, 0x1FAFF, kSeparator},      // emoji and other pictographs
    {0x20000, 0x3FFFF, kSingleCharWord}, // CJK ideographs (extensions B and on)
};

// A non-ASCII code point's kind (hash_words handles ASCII itself).
inline CharKind kind_of(uint32_t cp) {
  // The first range that does not end before cp.
  const Range* r = std::lower_bound(std::begin(kRanges), std::end(kRanges), cp,
                                    [](const Range& range, uint32_t c) { return range.last < c; });
  return r != std::end(kRanges) && r->first <= cp ? r->kind : kWordChar;
}

// The code point at p and its length in bytes (n > 0 bytes left). A byte that starts no complete
// sequence is a one-byte word character (bytes given directly need not be valid UTF-8).
inline uint32_t decode(const unsigned char* p, size_t n, size_t* length) {
  const unsigned char c = p[0];
  size_t len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
  bool ok = len != 0 && len <= n;
  for (size_t k = 1; ok && k < len; ++k) ok = (p[k] & 0xC0) == 0x80;
  if (!ok) {
    *length = 1;
    return 0x41;  // 'A': any word character
  }
  *length = len;
  if (len == 1) return c;
  uint32_t cp = c & (0x7Fu >> len);
  for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (p[k] & 0x3Fu);
  return cp;
}

inline unsigned char ascii_lower(unsigned char c) {
  return (c >= 'A' && c <= 'Z') ? static_cast<unsigned char>(c + ('a' - 'A')) : c;
}

inline bool is_ascii_alnum(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

// Appends the FNV-1a hash of every word of the text to `words`.
void hash_words(const TextView& text, std::vector<uint64_t>& words) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data);
  const auto* end = p + text.size;
  bool in_word = false;
  uint64_t h = kFnvOffset;
  while (p < end) {
    if (*p < 0x80) {  // ASCII, the common case: a byte is a word character or a separator
      if (is_ascii_alnum(*p)) {
        if (!in_word) h = kFnvOffset;
        h = (h ^ ascii_lower(*p)) * kFnvPrime;
        in_word = true;
      } else if (in_word) {
        words.push_back(h);
        in_word = false;
      }
      ++p;
      continue;
    }
    size_t len = 1;
    const CharKind kind = kind_of(decode(p, static_cast<size_t>(end - p), &len));
    if (kind != kWordChar && in_word) {  // the word before ends here
      words.push_back(h);
      in_word = false;
    }
    if (kind != kSeparator) {
      if (!in_word) h = kFnvOffset;
      for (size_t k = 0; k < len; ++k) h = (h ^ p[k]) * kFnvPrime;  // not ASCII: nothing to lowercase
      in_word = kind == kWordChar;
      if (kind == kSingleCharWord) words.push_back(h);
    }
    p += len;
  }
  if (in_word) words.push_back(h);
}

inline uint64_t shingle_hash(const uint64_t* words, size_t n) {
  uint64_t h = kShingleSeed;
  for (size_t k = 0; k < n; ++k) h = mix64(h ^ words[k]);
  return h;
}

// The hot loop: for each permutation, the least hash over every shingle. Permutation-major, so
// the inner loop runs over the shingle hashes with a[i], b[i] in registers and vectorizes. Its
// 64-bit multiplies vectorize well only with AVX-512 (vpmullq), so on x86-64 with GCC the loop
// is compiled for several instruction sets and the best one the CPU has is picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LLMKERN_MINHASH_CLONES __attribute__((target_clones("default", "avx2", "arch=x86-64-v4")))
#else
#define LLMKERN_MINHASH_CLONES
#endif

LLMKERN_MINHASH_CLONES
void min_hashes(const uint64_t* hashes, size_t count, const uint64_t* a, const uint64_t* b, int num_perm,
                uint32_t* sig) {
  for (int i = 0; i < num_perm; ++i) {
    const uint64_t ai = a[i];
    const uint64_t bi = b[i];
    uint32_t lowest = std::numeric_limits<uint32_t>::max();
    for (size_t s = 0; s < count; ++s) {
      const uint32_t v = static_cast<uint32_t>((ai * hashes[s] + bi) >> 32);
      lowest = v < lowest ? v : lowest;
    }
    sig[i] = lowest;
  }
}

// Scratch space reused across the texts one thread handles (no allocation per text).
struct Scratch {
  std::vector<uint64_t> words;
  std::vector<uint64_t> shingles;
};

void signature_of(const TextView& text, const uint64_t* a, const uint64_t* b, int num_perm, int ngram,
                  Scratch& scratch, uint32_t* sig, int64_t* shingle_count) {
  scratch.words.clear();
  scratch.shingles.clear();
  hash_words(text, scratch.words);
  const size_t num_words = scratch.words.size();
  const size_t n = static_cast<size_t>(ngram);
  if (num_words > 0 && num_words < n) {
    scratch.shingles.push_back(shingle_hash(scratch.words.data(), num_words));
  } else if (num_words >= n) {
    for (size_t start = 0; start + n <= num_words; ++start) {
      scratch.shingles.push_back(shingle_hash(scratch.words.data() + start, n));
    }
  }
  *shingle_count = static_cast<int64_t>(scratch.shingles.size());
  min_hashes(scratch.shingles.data(), scratch.shingles.size(), a, b, num_perm, sig);
}

}  // namespace

void signatures(const std::vector<TextView>& texts, const uint64_t* a, const uint64_t* b, int num_perm,
                int ngram, int num_threads, uint32_t* out, int64_t* shingle_counts) {
  const size_t num_texts = texts.size();
  if (num_texts == 0) return;
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // Texts are handed out a few at a time so that one long text does not stall a thread's share.
  constexpr size_t kChunk = 8;
  const size_t num_chunks = (num_texts + kChunk - 1) / kChunk;
  num_threads = static_cast<int>(std::min<size_t>(static_cast<size_t>(num_threads), num_chunks));
  std::atomic<size_t> next_chunk{0};

  auto work = [&]() {
    Scratch scratch;
    for (size_t chunk = next_chunk++; chunk < num_chunks; chunk = next_chunk++) {
      const size_t end = std::min(num_texts, (chunk + 1) * kChunk);
      for (size_t t = chunk * kChunk; t < end; ++t) {
        signature_of(texts[t], a, b, num_perm, ngram, scratch, out + t * static_cast<size_t>(num_perm),
                     shingle_counts + t);
      }
    }
  };

  if (num_threads == 1) {
    work();
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(num_threads - 1));
  for (int k = 0; k < num_threads - 1; ++k) {
    try {
      threads.emplace_back(work);
    } catch (const std::system_error&) {
      break;  // no more threads to be had: the ones running (and this one) share the work
    }
  }
  work();  // this thread does its share too
  for (auto& thread : threads) thread.join();
}

}  // namespace minhash
}  // namespace llmkern
