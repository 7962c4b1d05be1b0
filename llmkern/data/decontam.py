"""Decontamination: drop (or flag) training documents sharing a long word n-gram with eval sets.

Words are lowercased `\\w+` runs (so punctuation and case do not hide a copy), and each character
of a script written without spaces (Chinese, Japanese, Thai...) is a word of its own; an n-gram is
hashed as a 64-bit polynomial of its words' hashes, and every n-gram of every eval item goes
into one sorted array that documents are looked up in with numpy (13-grams by default, as in
GPT-3). Eval items shorter than n words contribute nothing and are counted.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import re
import unicodedata
import warnings
from typing import Iterable, Optional

import numpy as np

from .config import DecontamConfig, ReaderConfig
from .readers import Document, ReadReport, expand_inputs, read_file
from .stage import DocumentStage, StageStats

_WORD = re.compile(r"\w+")
# Scripts written without spaces (Han, kana, Thai, Lao, Myanmar, Khmer: near dedup's one-character
# words, csrc/cpu/minhash.cpp's kRanges) are read one character a word: as \w+ runs a whole Chinese
# sentence was one word, so an eval item never had n words and a copy of it was never found.
_UNSPACED = ("\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u2e80-\u2fdf\u3005-\u3007\u3040-\u312f"
             "\u3190-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003ffff")
_WORD_OR_UNSPACED_CHAR = re.compile(f"[^\\W{_UNSPACED}]+|(?=\\w)[{_UNSPACED}]")  # (?=\w): marks, "・" are no words
# Characters the clean stage deletes (soft hyphen, zero-width, BOM): eval sets are not cleaned, so
# they go here too, on both sides, or "photo\u00adsynthesis" in an eval item would never match.
_INVISIBLE = re.compile("[\u00ad\u200b\u200c\u200d\u2060\ufeff]")
_MULT = np.uint64(0x9E3779B97F4A7C15)


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """The uint64 hash of every word n-gram of `text` (empty when it has fewer than n words)."""
    if text.isascii():
        words = _WORD.findall(text.lower())
    else:  # NFKC: an NFD eval item (e + U+0301) must match the NFC text cleaning makes
        text = unicodedata.normalize("NFKC", _INVISIBLE.sub("", text))
        words = _WORD_OR_UNSPACED_CHAR.findall(text.lower())
    if len(words) < n:
        return np.empty(0, dtype=np.uint64)
    # hash() of a str is stable within a process, which is all this needs.
    h = np.fromiter((hash(w) for w in words), dtype=np.int64, count=len(words)).view(np.uint64)
    ids = h
    with np.errstate(over="ignore"):
        for k in range(1, n):
            h = h[:-1] * _MULT + ids[k:]
    return h


def _eval_set_names(files: list[str]) -> list[str]:
    """A distinct name for each of `files` (distinct files): the shortest end of its path that ends no
    other file's path, so the file name alone unless another eval file has the same one."""
    parts = [pathlib.PurePath(os.path.abspath(f)).parts for f in files]
    names: list[str | None] = [None] * len(files)
    # Ends of k path parts, k = 1, 2, ...: the whole absolute path (its root a part) ends no other file's.
    for k in range(1, max(map(len, parts), default=0) + 1):
        ends = collections.Counter(p[-k:] for p in parts)
        for i, p in enumerate(parts):
            if names[i] is None and ends[p[-k:]] == 1:
                names[i] = os.path.join(*p[-k:])
    return [name or os.path.abspath(f) for name, f in zip(names, files)]  # (None: one file listed twice)


class Decontaminator:
    """The n-grams of the eval sets; `matches(text)` names the eval sets a text overlaps."""

    def __init__(self, ngram: int = 13):
        if ngram < 1:
            raise ValueError(f"decontam.ngram must be >= 1, got {ngram}")
        self.ngram = ngram
        self.set_names: list[str] = []
        self.too_short = 0  # eval items with fewer than ngram words
        self._hashes = np.empty(0, dtype=np.uint64)
        self._owner = np.empty(0, dtype=np.int32)

    def add(self, name: str, texts: Iterable[str]) -> None:
        """Add an eval set (its items' texts) under `name`, which no other set may have."""
        if name in self.set_names:  # else the report could not tell the two apart, nor count each
            raise ValueError(f"eval set name: {name!r} is taken by another eval set; give each set its own")
        index = len(self.set_names)
        self.set_names.append(name)
        new = []
        for text in texts:
            h = ngram_hashes(text, self.ngram)
            if len(h) == 0:
                self.too_short += 1
            new.append(h)
        hashes = np.concatenate([self._hashes, *new])
        owner = np.concatenate([self._owner, np.full(len(hashes) - len(self._hashes), index, np.int32)])
        order = np.argsort(hashes, kind="stable")
        hashes, owner = hashes[order], owner[order]
        # One entry per (n-gram, set): a run of equal hashes then names each set once, however often
        # the n-gram repeats in the sets (matches() reads whole runs).
        keep = np.ones(len(hashes), dtype=bool)
        keep[1:] = (hashes[1:] != hashes[:-1]) | (owner[1:] != owner[:-1])
        self._hashes, self._owner = hashes[keep], owner[keep]

    @property
    def num_ngrams(self) -> int:
        return len(self._hashes)

    def matches(self, text: str) -> list[str]:
        """Names of the eval sets sharing at least one n-gram with `text` (empty: clean)."""
        if not len(self._hashes):
            return []
        h = ngram_hashes(text, self.ngram)
        lo = np.searchsorted(self._hashes, h, side="left")
        hi = np.searchsorted(self._hashes, h, side="right")
        hit = hi > lo
        if not hit.any():
            return []
        # An n-gram may be in several eval sets: every copy of it names its set, not only the first.
        owners = set()
        for a, b in zip(lo[hit].tolist(), hi[hit].tolist()):
            owners.update(self._owner[a:b].tolist())
        return sorted(self.set_names[i] for i in owners)

    @classmethod
    def from_files(cls, paths: Iterable[str], ngram: int = 13,
                   reader: Optional[ReaderConfig] = None) -> "Decontaminator":
        """Every file of `paths` (files, directories, globs) is one eval set, named by its file name, or by
        as much of its path as tells it from the other eval files (mmlu/test.jsonl, gsm8k/test.jsonl)."""
        decontam = cls(ngram)
        reader = reader or ReaderConfig()
        files = expand_inputs(paths)
        for path, name in zip(files, _eval_set_names(files)):
            report = ReadReport(strict=True)  # a broken eval set must not pass silently
            decontam.add(name, (doc.text for doc in read_file(path, reader, report)))
        return decontam


class DecontamStage(DocumentStage):
    name = "decontam"

    def __init__(self, config: DecontamConfig, reader: Optional[ReaderConfig] = None):
        if config.action not in ("drop", "flag"):
            raise ValueError(f"decontam.action must be 'drop' or 'flag', got {config.action!r}")
        if not config.eval_sets:
            raise ValueError("decontam.eval_sets must name at least one eval file when decontam is enabled")
        self.config = config
        reader = reader or ReaderConfig()
        if config.text_field is not None:
            reader = dataclasses.replace(reader, text_field=config.text_field)
        self.index = Decontaminator.from_files(config.eval_sets, config.ngram, reader)
        if self.index.too_short:  # no n-gram of theirs to look for: training text may hold them unseen
            warnings.warn(f"decontam: {self.index.too_short} eval item(s) have fewer than decontam.ngram="
                          f"{config.ngram} words and are not looked for; a smaller ngram checks them",
                          stacklevel=2)

    def keep(self, doc: Document, stats: StageStats) -> bool:
        matched = self.index.matches(doc.text)
        if not matched:
            return True
        for name in matched:
            stats.count(f"matched_{name}")
        if self.config.action == "drop":
            stats.reject("contaminated")
            return False
        doc.meta["contaminated"] = matched
        stats.count("flagged")
        return True
