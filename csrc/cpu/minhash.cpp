// MinHash signatures of word n-gram shingles (definition in minhash.h), multi-threaded.
#include "cpu/minhash.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <system_error>
#include <thread>

namespace llmkern {
namespace minhash {
namespace {

inline bool is_word_byte(unsigned char c) {
  return c >= 0x80 || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

inline unsigned char ascii_lower(unsigned char c) {
  return (c >= 'A' && c <= 'Z') ? static_cast<unsigned char>(c + ('a' - 'A')) : c;
}

// Appends the FNV-1a hash of every word of the text to `words`.
void hash_words(const TextView& text, std::vector<uint64_t>& words) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data);
  const auto* end = p + text.size;
  while (p < end) {
    while (p < end && !is_word_byte(*p)) ++p;
    if (p == end) break;
    uint64_t h = kFnvOffset;
    while (p < end && is_word_byte(*p)) {
      h = (h ^ ascii_lower(*p)) * kFnvPrime;
      ++p;
    }
    words.push_back(h);
  }
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
