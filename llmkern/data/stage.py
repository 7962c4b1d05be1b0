"""What every pipeline stage shares: its statistics, and the per-document stage base class.

A stage takes a batch of documents and returns the ones it keeps (possibly changed), counting in
its StageStats the documents and characters in and out and why each rejected one was rejected.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from .readers import Document


@dataclass
class StageStats:
    name: str
    docs_in: int = 0
    chars_in: int = 0
    docs_out: int = 0
    chars_out: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> documents
    counts: Counter = field(default_factory=Counter)  # anything else worth reporting (flags, chars fixed)
    seconds: float = 0.0

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def merge(self, other: "StageStats") -> None:
        self.docs_in += other.docs_in
        self.chars_in += other.chars_in
        self.docs_out += other.docs_out
        self.chars_out += other.chars_out
        self.rejected.update(other.rejected)
        self.counts.update(other.counts)
        self.seconds += other.seconds

    def to_dict(self) -> dict:
        return {"docs_in": self.docs_in, "chars_in": self.chars_in, "docs_out": self.docs_out,
                "chars_out": self.chars_out, "rejected": dict(self.rejected), "counts": dict(self.counts),
                "seconds": round(self.seconds, 3)}

    @classmethod
    def from_dict(cls, name: str, data: dict) -> "StageStats":
        return cls(name, data["docs_in"], data["chars_in"], data["docs_out"], data["chars_out"],
                   Counter(data["rejected"]), Counter(data["counts"]), data["seconds"])


class Stage:
    """A pipeline stage. `process` filters a batch; `remember` (for stages with state, like dedup)
    takes documents kept by an earlier, interrupted run so that a resumed run sees them."""

    name = "stage"
    stateful = False  # True when a document's fate depends on the documents before it (dedup)

    def process(self, docs: list[Document], stats: StageStats) -> list[Document]:
        raise NotImplementedError

    def remember(self, docs: list[Document]) -> None:
        pass

    def dropped_later(self, docs: list[Document]) -> list:
        """What `remember_dropped` needs of `docs`, documents this stage kept but a later stage dropped
        (so in no part file), as JSON values; [] when this stage's state does not depend on them."""
        return []

    def remember_dropped(self, values: list) -> None:
        """Take back the `dropped_later` values an earlier, interrupted run saved."""

    def run(self, docs: list[Document], stats: StageStats) -> list[Document]:
        started = time.perf_counter()
        stats.docs_in += len(docs)
        stats.chars_in += sum(len(d.text) for d in docs)
        kept = self.process(docs, stats)
        stats.docs_out += len(kept)
        stats.chars_out += sum(len(d.text) for d in kept)
        stats.seconds += time.perf_counter() - started
        return kept


class DocumentStage(Stage):
    """A stage that judges each document alone: subclasses define keep(doc, stats) -> bool."""

    def keep(self, doc: Document, stats: StageStats) -> bool:
        raise NotImplementedError

    def process(self, docs: list[Document], stats: StageStats) -> list[Document]:
        return [doc for doc in docs if self.keep(doc, stats)]
