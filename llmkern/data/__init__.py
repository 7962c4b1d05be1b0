"""The data pipeline: readers, cleaning, language ID, quality filters, dedup, decontamination,
tokenization, token shards and the training loader.

Kept light on purpose (nothing heavy is imported here): import the submodule you need, e.g.
`from llmkern.data.pipeline import prepare`, or use `llmkern.data.prepare`, which loads it lazily.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "prepare":
        from .pipeline import prepare

        return prepare
    raise AttributeError(f"module 'llmkern.data' has no attribute {name!r}")
