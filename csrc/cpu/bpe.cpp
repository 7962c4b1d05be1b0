// Byte-level BPE training with incremental pair counts (the algorithm of Sennrich et al.,
// made incremental as in HuggingFace tokenizers):
//   - every distinct pre-tokenized word is a sequence of token ids, with its corpus count;
//   - pair_counts: (left, right) -> occurrences in the corpus (weighted by word counts);
//   - where: (left, right) -> the words that hold it (may list stale words; they are skipped);
//   - a max-heap of (count, pair) with lazy invalidation: an entry whose count is out of date
//     is pushed back with the current count when it reaches the top.
// A merge touches only the words that hold the pair and updates only the pairs around each
// occurrence, so the cost of a merge is proportional to its occurrences, not to the corpus.
#include "cpu/bpe.h"

#include <algorithm>
#include <queue>
#include <stdexcept>
#include <unordered_map>

namespace llmkern {
namespace {

using PairKey = uint64_t;

inline PairKey make_pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}
inline int32_t left_of(PairKey k) { return static_cast<int32_t>(k >> 32); }
inline int32_t right_of(PairKey k) { return static_cast<int32_t>(k & 0xffffffffu); }

struct HeapEntry {
  int64_t count;
  PairKey pair;
};

// Max-heap order: the higher count first; on a tie the smaller (left, right) first, which
// makes training deterministic.
struct LowerPriority {
  bool operator()(const HeapEntry& x, const HeapEntry& y) const {
    if (x.count != y.count) return x.count < y.count;
    return x.pair > y.pair;
  }
};

struct PairDelta {
  PairKey pair;
  int32_t delta;  // +1 or -1 occurrence in one copy of the word
};

// Replace every non-overlapping (a, b), left to right, by c in `word`, and record how the
// pairs of the word change. The left neighbour of an occurrence is read from the output
// (it may already be c); the right one from the input (not merged yet).
void merge_word(std::vector<int32_t>& word, int32_t a, int32_t b, int32_t c, std::vector<PairDelta>& deltas) {
  const size_t n = word.size();
  size_t in = 0, out = 0;
  while (in < n) {
    if (in + 1 < n && word[in] == a && word[in + 1] == b) {
      deltas.push_back({make_pair_key(a, b), -1});
      if (out > 0) {
        deltas.push_back({make_pair_key(word[out - 1], a), -1});
        deltas.push_back({make_pair_key(word[out - 1], c), +1});
      }
      if (in + 2 < n) {
        deltas.push_back({make_pair_key(b, word[in + 2]), -1});
        deltas.push_back({make_pair_key(c, word[in + 2]), +1});
      }
      word[out++] = c;
      in += 2;
    } else {
      word[out++] = word[in++];
    }
  }
  word.resize(out);
}

class BpeTrainer {
 public:
  BpeTrainer(const std::vector<std::string>& words, const std::vector<int64_t>& counts) : counts_(counts) {
    token_bytes_.reserve(256);
    for (int i = 0; i < 256; ++i) {
      token_bytes_.emplace_back(1, static_cast<char>(i));
      id_of_bytes_.emplace(token_bytes_.back(), i);
    }
    words_.resize(words.size());
    for (size_t w = 0; w < words.size(); ++w) {
      const std::string& text = words[w];
      words_[w].assign(text.begin(), text.end());
      for (auto& id : words_[w]) id = static_cast<uint8_t>(id);  // bytes, not signed chars
      if (counts_[w] == 0) continue;
      for (size_t i = 0; i + 1 < words_[w].size(); ++i) {
        PairKey k = make_pair_key(words_[w][i], words_[w][i + 1]);
        pair_counts_[k] += counts_[w];
        where_[k].push_back(static_cast<int32_t>(w));
      }
    }
    for (const auto& [pair, count] : pair_counts_) heap_.push({count, pair});
  }

  std::vector<BpeMerge> train(int64_t max_new_tokens, int64_t min_count) {
    std::vector<BpeMerge> merges;
    int64_t new_tokens = 0;
    while (new_tokens < max_new_tokens && !heap_.empty()) {
      HeapEntry top = heap_.top();
      heap_.pop();
      auto it = pair_counts_.find(top.pair);
      const int64_t current = it == pair_counts_.end() ? 0 : it->second;
      if (current != top.count) {
        // Stale entry. A lower current count goes back in; a higher one already has an entry.
        if (current > 0 && current < top.count) heap_.push({current, top.pair});
        continue;
      }
      if (current < min_count || current <= 0) break;

      const int32_t a = left_of(top.pair), b = right_of(top.pair);
      const int32_t c = token_for(token_bytes_[a] + token_bytes_[b], &new_tokens);
      merges.push_back({a, b, c, current});
      apply_merge(top.pair, a, b, c);
    }
    return merges;
  }

 private:
  // The id of a byte string: the existing one, or a new one.
  int32_t token_for(const std::string& bytes, int64_t* new_tokens) {
    auto found = id_of_bytes_.find(bytes);
    if (found != id_of_bytes_.end()) return found->second;
    const int32_t id = static_cast<int32_t>(token_bytes_.size());
    token_bytes_.push_back(bytes);
    id_of_bytes_.emplace(bytes, id);
    ++*new_tokens;
    return id;
  }

  void apply_merge(PairKey pair, int32_t a, int32_t b, int32_t c) {
    // Move the word list out: `where_` grows below, which may rehash it.
    std::vector<int32_t> holders = std::move(where_[pair]);
    where_.erase(pair);
    std::sort(holders.begin(), holders.end());
    holders.erase(std::unique(holders.begin(), holders.end()), holders.end());

    std::vector<PairKey> increased;
    for (int32_t w : holders) {
      deltas_.clear();
      merge_word(words_[w], a, b, c, deltas_);
      const int64_t weight = counts_[w];
      for (const PairDelta& d : deltas_) {
        auto& count = pair_counts_[d.pair];
        count += d.delta * weight;
        if (d.delta > 0) {
          where_[d.pair].push_back(w);
          increased.push_back(d.pair);
        } else if (count <= 0) {
          pair_counts_.erase(d.pair);
        }
      }
    }
    pair_counts_.erase(pair);
    std::sort(increased.begin(), increased.end());
    increased.erase(std::unique(increased.begin(), increased.end()), increased.end());
    for (PairKey k : increased) {
      auto it = pair_counts_.find(k);
      if (it != pair_counts_.end() && it->second > 0) heap_.push({it->second, k});
    }
  }

  const std::vector<int64_t>& counts_;
  std::vector<std::vector<int32_t>> words_;
  std::vector<std::string> token_bytes_;
  std::unordered_map<std::string, int32_t> id_of_bytes_;
  std::unordered_map<PairKey, int64_t> pair_counts_;
  std::unordered_map<PairKey, std::vector<int32_t>> where_;
  std::priority_queue<HeapEntry, std::vector<HeapEntry>, LowerPriority> heap_;
  std::vector<PairDelta> deltas_;
};

}  // namespace

std::vector<BpeMerge> bpe_train(const std::vector<std::string>& words, const std::vector<int64_t>& counts,
                                int64_t max_new_tokens, int64_t min_count) {
  if (words.size() != counts.size()) {
    throw std::invalid_argument("bpe_train: words and counts differ in length (" + std::to_string(words.size()) +
                                " vs " + std::to_string(counts.size()) + ")");
  }
  if (words.size() > static_cast<size_t>(INT32_MAX)) {
    throw std::invalid_argument("bpe_train: more than 2^31 - 1 distinct words");
  }
  for (size_t i = 0; i < counts.size(); ++i) {
    if (counts[i] < 0) throw std::invalid_argument("bpe_train: counts[" + std::to_string(i) + "] is negative");
  }
  if (max_new_tokens < 0) throw std::invalid_argument("bpe_train: max_new_tokens is negative");
  if (max_new_tokens > INT32_MAX - 256) throw std::invalid_argument("bpe_train: max_new_tokens is too large");
  BpeTrainer trainer(words, counts);
  return trainer.train(max_new_tokens, std::max<int64_t>(min_count, 1));
}

}  // namespace llmkern
