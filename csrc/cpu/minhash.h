// MinHash signatures of word n-gram shingles, the hashing core of near-duplicate detection.
//
// The definition (llmkern/data/dedup.py has a pure-Python copy that the tests compare against):
//   words     the text's UTF-8 code points are separators, word characters or one-character
//             words. Separators: ASCII other than letters and digits, and the Unicode blocks of
//             spaces, punctuation and symbols (quotes, dashes, ellipsis, CJK punctuation, emoji:
//             minhash.cpp's kRanges), so "“word”" and "\"word\"" are the same word. One-character
//             words: the scripts written without spaces (Han, kana, Thai, Lao, Khmer, Myanmar),
//             whose shingles are then character n-grams. Every other code point (Latin, Greek,
//             Cyrillic, Arabic, Hangul letters, marks, digits...) is a word character; a word is a
//             maximal run of them. A byte that starts no complete UTF-8 sequence is a word
//             character. ASCII letters are lowercased.
//   word hash FNV-1a 64 over the word's (lowercased) UTF-8 bytes.
//   shingle   n consecutive words (a text of k < n words, k >= 1, is one shingle of k words);
//             its hash: h = kShingleSeed, then h = mix64(h ^ word_hash) for each word in order.
//   signature sig[i] = min over shingles of uint32(((a[i] * h + b[i]) mod 2^64) >> 32), i.e.
//             multiply-add-shift hashing, one (a[i], b[i]) pair per permutation.
// A text without words has no shingles: its signature is all 0xFFFFFFFF and its count is 0.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace llmkern {
namespace minhash {

constexpr uint64_t kFnvOffset = 14695981039346656037ULL;
constexpr uint64_t kFnvPrime = 1099511628211ULL;
constexpr uint64_t kShingleSeed = 0x9E3779B97F4A7C15ULL;

// The splitmix64 finalizer: a cheap bijection that spreads every input bit over the output.
inline uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ULL;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return z;
}

// One text as UTF-8 bytes; the caller keeps the bytes alive while signatures() runs.
struct TextView {
  const char* data;
  size_t size;
};

// Signatures of every text: out is texts.size() x num_perm (row-major); shingle_counts[t] is
// the number of shingles of text t (0 means "no words"). Uses num_threads threads (<= 0: one per
// core). Never throws on text content; sizes are the caller's to check.
void signatures(const std::vector<TextView>& texts, const uint64_t* a, const uint64_t* b, int num_perm,
                int ngram, int num_threads, uint32_t* out, int64_t* shingle_counts);

}  // namespace minhash
}  // namespace llmkern
