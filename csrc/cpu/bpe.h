// Byte-level BPE training: the merges, computed from pre-tokenized words and their counts.
//
// Token ids 0..255 are the bytes; every merge that makes a new byte string gets the next id
// (256, 257, ...). A merge whose byte string already exists as a token (two different splits
// of the same bytes) reuses that id, so every id names a distinct byte string.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace llmkern {

struct BpeMerge {
  int32_t left;    // id of the left token
  int32_t right;   // id of the right token
  int32_t result;  // id of the merged token (a new id, or an existing one with the same bytes)
  int64_t count;   // how many times the pair occurred (weighted by word counts) when merged
};

// Learns merges until `max_new_tokens` new ids exist, no pair occurs at least `min_count`
// times, or no pair is left. Deterministic: the most frequent pair wins, ties go to the
// smallest (left id, right id). `words[i]` occurs `counts[i]` times in the corpus.
// Throws std::invalid_argument (a ValueError in Python) on mismatched sizes or negative counts.
std::vector<BpeMerge> bpe_train(const std::vector<std::string>& words, const std::vector<int64_t>& counts,
                                int64_t max_new_tokens, int64_t min_count);

}  // namespace llmkern
