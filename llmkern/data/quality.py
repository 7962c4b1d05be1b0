"""Document quality heuristics in the manner of Gopher (Rae et al. 2021, appendix A) and C4.

Each rule has a threshold in QualityConfig (None switches it off); a rejected document is
counted under the name of the first rule it fails. Words are whitespace-separated tokens; the
repetition rules hash words to ids and n-grams to 64-bit rolling hashes in numpy, so a long
document costs a few vector passes rather than a Python loop per n-gram.

The defaults are Gopher's, made for English: they drop text in other languages. A script written
without spaces (Chinese, Japanese, Thai) has few, long "words", so min_words and
max_mean_word_length reject it, and min_stop_words rejects every language without the English
stop words. For such corpora set those rules to None (or stop_words to the language's own).
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections import Counter
from typing import Optional

import numpy as np

from .config import QualityConfig
from .readers import Document
from .stage import DocumentStage, StageStats

BULLETS = ("•", "‣", "◦", "⁃", "●", "○", "▪", "-", "*", "·")
ELLIPSES = ("...", "…")
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’", ":", ";")
_PUNCT = string.punctuation + "“”‘’«»…"
_NGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)
# A whitespace-separated word holding at least one letter (one match per such word: from the word's
# start to its first letter). Anchored at a word start, so a long run without letters costs its length,
# not its length squared as "\S*[^\W\d_]\S*" did (its backtracking, again at every start in the run).
_WORD_WITH_LETTER = re.compile(r"(?<!\S)\S*?[^\W\d_]")


def _has_stop_words(words: list[str], stop: set[str], needed: int) -> bool:
    """Whether `needed` words (case and surrounding punctuation aside) are stop words; stops early."""
    found = 0
    for w in words:
        if w.strip(_PUNCT).lower() in stop:
            found += 1
            if found >= needed:
                return True
    return found >= needed


def _ngram_hashes(ids: np.ndarray, max_n: int) -> dict[int, np.ndarray]:
    """{n: rolling hash of every n-gram of word ids} for n = 1..max_n (uint64, wrapping)."""
    out = {1: ids}
    h = ids
    with np.errstate(over="ignore"):
        for n in range(2, min(max_n, len(ids)) + 1):
            h = h[:-1] * _NGRAM_MULT + ids[n - 1:]
            out[n] = h
    return out


def _repetition_failure(words: list[str], cfg: QualityConfig) -> Optional[str]:
    top = {int(n): float(v) for n, v in cfg.max_top_ngram_char_fraction.items()}
    dup = {int(n): float(v) for n, v in cfg.max_duplicate_ngram_char_fraction.items()}
    if not (top or dup) or not words:
        return None
    # hash() of a str is fixed within a process; 64-bit collisions are negligible here.
    ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total_chars = int(lengths.sum())
    hashes = _ngram_hashes(ids, max([*top, *dup]))
    ends = np.concatenate([[0], np.cumsum(lengths)])  # characters of words[i:i + n]: ends[i + n] - ends[i]
    for n, limit in sorted(top.items()):
        if n not in hashes:
            continue
        _, first, counts = np.unique(hashes[n], return_index=True, return_counts=True)
        top_count = int(counts.max())
        if top_count < 2:
            continue
        # Of n-grams tied for most frequent, the one with the most characters: argmax took the first in
        # the order of the hashes, which hash() draws afresh in each process, so a run kept a document
        # that another run of the same input and settings dropped.
        starts = first[counts == top_count]
        ngram_chars = int((ends[starts + n] - ends[starts]).max())
        if top_count * ngram_chars > limit * total_chars:
            return f"top_{n}gram_chars"
    for n, limit in sorted(dup.items()):
        if n not in hashes:
            continue
        _, inverse, counts = np.unique(hashes[n], return_inverse=True, return_counts=True)
        repeated = (counts[inverse] > 1).astype(np.int64)
        if not repeated.any():
            continue
        # A word is covered when some repeated n-gram starting in the n positions up to it holds it.
        covered = np.convolve(repeated, np.ones(n, dtype=np.int64))[: len(words)] > 0
        if int(lengths[covered].sum()) > limit * total_chars:
            return f"duplicate_{n}gram_chars"
    return None


def first_failed_rule(text: str, cfg: Optional[QualityConfig] = None) -> Optional[str]:
    """The name of the first rule `text` fails, or None when it passes them all."""
    cfg = cfg or QualityConfig()
    words = text.split()
    n_words = len(words)
    if cfg.min_words is not None and n_words < cfg.min_words:
        return "too_few_words"
    if cfg.max_words is not None and n_words > cfg.max_words:
        return "too_many_words"
    if n_words == 0:
        return None  # every rule below is a fraction of words: nothing more to judge
    mean_length = sum(map(len, words)) / n_words
    if cfg.min_mean_word_length is not None and mean_length < cfg.min_mean_word_length:
        return "mean_word_length_low"
    if cfg.max_mean_word_length is not None and mean_length > cfg.max_mean_word_length:
        return "mean_word_length_high"
    if cfg.max_symbol_word_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols > cfg.max_symbol_word_ratio * n_words:
            return "symbol_word_ratio"
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    if cfg.max_bullet_line_fraction is not None and lines:
        bullets = sum(line.startswith(BULLETS) for line in lines)
        if bullets > cfg.max_bullet_line_fraction * len(lines):
            return "bullet_lines"
    if cfg.max_ellipsis_line_fraction is not None and lines:
        ellipses = sum(line.endswith(ELLIPSES) for line in lines)
        if ellipses > cfg.max_ellipsis_line_fraction * len(lines):
            return "ellipsis_lines"
    if cfg.min_alpha_word_fraction is not None:
        alpha = len(_WORD_WITH_LETTER.findall(text))
        if alpha < cfg.min_alpha_word_fraction * n_words:
            return "alpha_words"
    if cfg.min_stop_words is not None:
        if not _has_stop_words(words, set(cfg.stop_words), cfg.min_stop_words):
            return "stop_words"
    if lines and (cfg.max_duplicate_line_fraction is not None or cfg.max_duplicate_line_char_fraction is not None):
        counts = Counter(lines)
        dup_lines = sum(c - 1 for c in counts.values() if c > 1)
        dup_chars = sum(len(line) * (c - 1) for line, c in counts.items() if c > 1)
        if cfg.max_duplicate_line_fraction is not None and dup_lines > cfg.max_duplicate_line_fraction * len(lines):
            return "duplicate_lines"
        total_chars = sum(len(line) for line in lines)
        if (cfg.max_duplicate_line_char_fraction is not None
                and dup_chars > cfg.max_duplicate_line_char_fraction * total_chars):
            return "duplicate_line_chars"
    failure = _repetition_failure(words, cfg)
    if failure:
        return failure
    if cfg.reject_lorem_ipsum and "lorem ipsum" in text.lower():
        return "lorem_ipsum"
    if cfg.reject_curly_brace and "{" in text:
        return "curly_brace"
    if cfg.min_terminal_punctuation_line_fraction is not None and lines:
        ended = sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines)
        if ended < cfg.min_terminal_punctuation_line_fraction * len(lines):
            return "terminal_punctuation"
    return None


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:  # `not` also refuses NaN
        raise ValueError(f"quality.{name} is a fraction, in [0, 1], got {value}")


class QualityStage(DocumentStage):
    name = "quality"

    def __init__(self, config: QualityConfig):
        for key in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
            for n, fraction in getattr(config, key).items():
                if not str(n).isdigit() or int(n) < 1:
                    raise ValueError(f"quality.{key}: keys must be n-gram sizes like \"5\", got {n!r}")
                _check_fraction(f"{key}.{n}", fraction)
        for f in dataclasses.fields(config):  # a fraction over 1 (30 for 30%) switched a max_ rule off unseen
            if f.name.endswith("_fraction") and isinstance(getattr(config, f.name), (int, float)):
                _check_fraction(f.name, getattr(config, f.name))
        self.config = config

    def keep(self, doc: Document, stats: StageStats) -> bool:
        failure = first_failed_rule(doc.text, self.config)
        if failure:
            stats.reject(failure)
            return False
        return True
