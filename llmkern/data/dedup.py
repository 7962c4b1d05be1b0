"""Exact dedup (a hash of the normalized text) and near-dedup (MinHash + LSH banding).

Near-dedup keeps the first of a group of near-duplicates: a document is dropped when it is a near
duplicate of a document kept before it (in input order), and only kept documents are compared
with. Near-duplication is not transitive, so a chain A ~ B ~ C with A !~ C keeps A and C in the
order A, B, C, and B alone in the order B, A, C. Each document's MinHash signature is
computed in C++ (llmkern._cpu.minhash_signatures, definition in csrc/cpu/minhash.h); the
signature is cut into `bands` bands of `rows` values, and documents sharing a band are
candidates. A candidate counts as a duplicate when the share of equal signature values (an
unbiased estimate of the Jaccard similarity of the two shingle sets) reaches `threshold`; that
check is what keeps false positives at low similarity rare, so the bands can be many and short
(high recall). Memory: num_perm * 4 bytes plus `bands` index entries per kept document.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from .config import ExactDedupConfig, NearDedupConfig
from .readers import Document
from .stage import Stage, StageStats

_MASK64 = (1 << 64) - 1
_FNV_OFFSET = 14695981039346656037
_FNV_PRIME = 1099511628211
_SHINGLE_SEED = 0x9E3779B97F4A7C15
# The non-ASCII code points that are not word characters, as csrc/cpu/minhash.cpp's kRanges:
# (first, last, "separator" or "single", a one-character word).
_CHAR_RANGES = (
    (0x0080, 0x00A9, "separator"), (0x00AB, 0x00B4, "separator"), (0x00B6, 0x00B9, "separator"),
    (0x00BB, 0x00BF, "separator"), (0x00D7, 0x00D7, "separator"), (0x00F7, 0x00F7, "separator"),
    (0x0E00, 0x0EFF, "single"), (0x1000, 0x109F, "single"), (0x1780, 0x17FF, "single"),
    (0x2000, 0x2BFF, "separator"), (0x2E00, 0x2E7F, "separator"), (0x2E80, 0x2FDF, "single"),
    (0x3000, 0x3004, "separator"), (0x3005, 0x3007, "single"), (0x3008, 0x303F, "separator"),
    (0x3040, 0x312F, "single"), (0x3190, 0x31FF, "single"), (0x3400, 0x4DBF, "single"),
    (0x4E00, 0x9FFF, "single"), (0xF900, 0xFAFF, "single"), (0xFE10, 0xFE1F, "separator"),
    (0xFE30, 0xFE6F, "separator"), (0xFEFF, 0xFEFF, "separator"), (0xFF00, 0xFF0F, "separator"),
    (0xFF1A, 0xFF20, "separator"), (0xFF3B, 0xFF40, "separator"), (0xFF5B, 0xFF65, "separator"),
    (0xFF66, 0xFF9F, "single"), (0xFFF0, 0xFFFF, "separator"), (0x1F000, 0x1FAFF, "separator"),
    (0x20000, 0x3FFFF, "single"),
)


def normalized_for_exact_dedup(text: str) -> str:
    """Lowercase, whitespace runs as one space: copies that differ only there are the same."""
    return " ".join(text.lower().split())


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(normalized_for_exact_dedup(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ExactDedupStage(Stage):
    name = "exact_dedup"
    stateful = True

    def __init__(self, config: Optional[ExactDedupConfig] = None):
        self.seen: set[bytes] = set()

    def process(self, docs: list[Document], stats: StageStats) -> list[Document]:
        kept = []
        for doc in docs:
            digest = text_digest(doc.text)
            if digest in self.seen:
                stats.reject("exact_duplicate")
                continue
            self.seen.add(digest)
            kept.append(doc)
        return kept

    def remember(self, docs: list[Document]) -> None:
        self.seen.update(text_digest(doc.text) for doc in docs)

    # A document kept here but dropped by near dedup is in no part file, yet its copies are exact
    # duplicates: a resumed run must know its digest to count them as an uninterrupted run does.
    def dropped_later(self, docs: list[Document]) -> list:
        return [text_digest(doc.text).hex() for doc in docs]

    def remember_dropped(self, values: list) -> None:
        self.seen.update(bytes.fromhex(v) for v in values)


# --- MinHash ------------------------------------------------------------------------------------

def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) uint64 pairs of the multiply-add-shift hash of each permutation; a is odd."""
    rng = np.random.default_rng(seed)
    a = np.frombuffer(rng.bytes(8 * num_perm), dtype=np.uint64) | np.uint64(1)
    b = np.frombuffer(rng.bytes(8 * num_perm), dtype=np.uint64).copy()
    return a, b


def _cpu_module():
    try:
        from .. import _cpu
    except ImportError:
        raise ImportError("near-dedup needs llmkern._cpu, which was not built: run "
                          "`python setup.py build_ext --inplace` (or pip install -e .)") from None
    return _cpu


def minhash_signatures(texts: list[str], a: np.ndarray, b: np.ndarray, ngram: int = 5,
                       num_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(signatures uint32 (len(texts), len(a)), shingle counts int64) computed in C++."""
    cpu = _cpu_module()
    try:
        return cpu.minhash_signatures(texts, a, b, ngram, num_threads)
    except UnicodeEncodeError:  # a lone surrogate has no UTF-8: its bytes as surrogatepass spells them
        texts = [t.encode("utf-8", "surrogatepass") if isinstance(t, str) else t for t in texts]
        return cpu.minhash_signatures(texts, a, b, ngram, num_threads)


def _mix64(z: int) -> int:
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _MASK64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _char_kind(char: str) -> str:
    cp = ord(char)
    if cp < 0x80:
        return "word" if char.isascii() and char.isalnum() else "separator"
    for first, last, kind in _CHAR_RANGES:
        if first <= cp <= last:
            return kind
    return "word"


def _words_reference(text: str) -> list[str]:
    """The words of minhash.h's definition: runs of word characters, and one-character words."""
    words, current = [], ""
    for char in text:
        kind = _char_kind(char)
        if kind == "word":
            current += char
            continue
        if current:
            words.append(current)
            current = ""
        if kind == "single":
            words.append(char)
    if current:
        words.append(current)
    return words


def shingle_hashes_reference(text: str, ngram: int) -> list[int]:
    """The shingle hashes of csrc/cpu/minhash.h's definition, in plain Python (for tests)."""
    word_hashes = []
    for word in _words_reference(text):
        h = _FNV_OFFSET
        for byte in word.encode("utf-8", "surrogatepass").lower():  # lowercases ASCII only, as the C++
            h = ((h ^ byte) * _FNV_PRIME) & _MASK64
        word_hashes.append(h)
    windows = [word_hashes] if 0 < len(word_hashes) < ngram else [
        word_hashes[i:i + ngram] for i in range(len(word_hashes) - ngram + 1)]
    shingles = []
    for window in windows:
        h = _SHINGLE_SEED
        for w in window:
            h = _mix64(h ^ w)
        shingles.append(h)
    return shingles


def minhash_reference(text: str, a: np.ndarray, b: np.ndarray, ngram: int) -> list[int]:
    """A signature by the same definition as the C++ one, slowly, in plain Python (for tests)."""
    shingles = shingle_hashes_reference(text, ngram)
    return [min(((int(ai) * h + int(bi)) & _MASK64) >> 32 for h in shingles) if shingles else 0xFFFFFFFF
            for ai, bi in zip(a, b)]


# --- LSH ----------------------------------------------------------------------------------------

class NearDedupStage(Stage):
    name = "near_dedup"
    stateful = True

    def __init__(self, config: NearDedupConfig):
        if config.num_perm < 1:
            raise ValueError(f"near_dedup.num_perm must be >= 1, got {config.num_perm}")
        if not 1 <= config.bands <= config.num_perm:
            raise ValueError(f"near_dedup.bands must be in [1, num_perm={config.num_perm}], got {config.bands}")
        if not 0.0 < config.threshold <= 1.0:
            raise ValueError(f"near_dedup.threshold must be in (0, 1], got {config.threshold}")
        if config.ngram < 1:
            raise ValueError(f"near_dedup.ngram must be >= 1, got {config.ngram}")
        if config.batch_size < 1:  # else range() failed on the first input, naming no setting
            raise ValueError(f"near_dedup.batch_size must be >= 1, got {config.batch_size}")
        if config.num_threads < 0:
            raise ValueError(f"near_dedup.num_threads must be >= 0 (0: one per core), got {config.num_threads}")
        if config.seed < 0:
            raise ValueError(f"near_dedup.seed must be >= 0, got {config.seed}")
        self.config = config
        self.rows = config.num_perm // config.bands
        self.a, self.b = permutations(config.num_perm, config.seed)
        # Band keys: a random linear hash of the band's rows (mod 2^64), one dict per band.
        self.band_mult = permutations(self.rows, config.seed + 1)[0]
        self.buckets: list[dict[int, object]] = [{} for _ in range(config.bands)]
        self.kept = np.empty((1024, config.num_perm), dtype=np.uint32)  # signatures of kept docs
        self.num_kept = 0

    def _signatures(self, docs: list[Document]) -> tuple[np.ndarray, np.ndarray]:
        step = self.config.batch_size
        parts = [minhash_signatures([d.text for d in docs[i:i + step]], self.a, self.b, self.config.ngram,
                                    self.config.num_threads) for i in range(0, len(docs), step)]
        if not parts:
            return np.empty((0, self.config.num_perm), np.uint32), np.empty(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """(docs, bands) uint64 keys; equal keys <=> (up to 2^-64-ish collisions) equal bands."""
        used = sigs[:, : self.config.bands * self.rows].astype(np.uint64)
        banded = used.reshape(len(sigs), self.config.bands, self.rows)
        with np.errstate(over="ignore"):
            return (banded * self.band_mult).sum(axis=2, dtype=np.uint64)

    def _candidates(self, keys: list[int]) -> set[int]:
        found: set[int] = set()
        for bucket, key in zip(self.buckets, keys):
            hit = bucket.get(key)
            if hit is None:
                continue
            if isinstance(hit, list):
                found.update(hit)
            else:
                found.add(hit)
        return found

    def _insert(self, sig: np.ndarray, keys: list[int]) -> None:
        if self.num_kept == len(self.kept):
            grown = np.empty((2 * len(self.kept), self.config.num_perm), dtype=np.uint32)
            grown[: self.num_kept] = self.kept
            self.kept = grown
        index = self.num_kept
        self.kept[index] = sig
        self.num_kept += 1
        for bucket, key in zip(self.buckets, keys):
            hit = bucket.get(key)
            if hit is None:
                bucket[key] = index
            elif isinstance(hit, list):
                hit.append(index)
            else:
                bucket[key] = [hit, index]

    def process(self, docs: list[Document], stats: StageStats) -> list[Document]:
        sigs, counts = self._signatures(docs)
        all_keys = self.band_keys(sigs).tolist()
        kept = []
        for doc, sig, count, keys in zip(docs, sigs, counts, all_keys):
            if count == 0:  # no words, no shingles: nothing to compare (exact dedup handles these)
                stats.count("no_shingles")
                kept.append(doc)
                continue
            candidates = self._candidates(keys)
            if candidates:
                rows = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
                similarity = (self.kept[rows] == sig).mean(axis=1)
                if similarity.max() >= self.config.threshold:
                    stats.reject("near_duplicate")
                    continue
                stats.count("candidates_below_threshold")
            self._insert(sig, keys)
            kept.append(doc)
        return kept

    def remember(self, docs: list[Document]) -> None:
        sigs, counts = self._signatures(docs)
        for sig, count, keys in zip(sigs, counts, self.band_keys(sigs).tolist()):
            if count:
                self._insert(sig, keys)
