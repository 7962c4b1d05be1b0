"""The main job's corpus: real text that is on every machine that runs llmkern, no network needed.

It is the running Python's standard-library sources (.py files; pydoc_data/topics.py holds the
language reference too) plus any plain-text documentation under sys.prefix (share/doc, doc,
Doc: .txt, .rst, .md). Files are taken in an order fixed by a hash of their relative path, so
the size cap samples the whole library (not just the first letters of the alphabet) and the
same Python gives the same corpus on every machine.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from typing import Iterator

DOC_DIRS = ("share/doc", "doc", "Doc")
DOC_SUFFIXES = (".txt", ".rst", ".md")
MAX_FILE_BYTES = 256_000  # a few generated files are huge; cut them so no single file dominates


def corpus_files() -> list[tuple[str, str]]:
    """(path, name) of every corpus file; name is relative to its root and decides the order."""
    found = []
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in _walk(stdlib, (".py",)):
        found.append((path, "stdlib/" + os.path.relpath(path, stdlib)))
    for doc_dir in DOC_DIRS:
        root = os.path.join(sys.prefix, doc_dir)
        for path in _walk(root, DOC_SUFFIXES):
            found.append((path, "doc/" + os.path.relpath(path, sys.prefix)))
    return sorted(found, key=lambda item: hashlib.sha1(item[1].encode()).hexdigest())


def _walk(root: str, suffixes: tuple[str, ...]) -> Iterator[str]:
    if not os.path.isdir(root):
        return
    for dirpath, dirnames, filenames in os.walk(root):
        # third-party packages are not the standard library (and differ between machines)
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(suffixes):
                yield os.path.join(dirpath, name)


def gather_corpus(max_bytes: int) -> list[str]:
    """The corpus documents (one per file), at most max_bytes of UTF-8 text in all; at least two (a run
    needs a training and a validation document): a ValueError naming the cap they need when it is smaller."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    docs, total, capped = [], 0, False
    for path, _ in corpus_files():
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_FILE_BYTES)
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8
        size = len(text.encode("utf-8"))
        if not text.strip():
            continue
        if total + size > max_bytes:
            if len(docs) >= 2:
                break
            capped = True  # too small a cap: go on, without it, to the two files it would need
        docs.append(text)
        total += size
        if capped and len(docs) == 2:
            raise ValueError(f"corpus_max_bytes={max_bytes:,} is too small for the built-in corpus: a run needs "
                             f"two of its files (one for validation), {total:,} bytes; give at least that")
    if not docs:
        raise RuntimeError(f"found no standard-library sources under {sysconfig.get_paths()['stdlib']!r}")
    return docs


def prepare_corpus_shards(out_dir: str, tokenizer: str, max_bytes: int, seed: int = 0,
                          val_fraction: float = 0.05) -> str:
    """Token shards of the corpus in out_dir (kept and reused when a manifest with the same tokenizer
    is already there); returns out_dir.

    tokenizer: a get_tokenizer spec ("bytes", a tiktoken name or file), or "bpe:<N>": a byte-level
    BPE of N tokens trained here on the corpus's training documents (llmkern.data.bpe, in C++:
    well under a minute on a few MB) and kept in out_dir.
    """
    from ..data.shards import is_val_document, load_manifest, tokenize_documents
    from ..data.tokenizer import get_tokenizer

    bpe_size = _bpe_size(tokenizer)
    spec = os.path.abspath(os.path.join(out_dir, f"bpe{bpe_size}.tiktoken")) if bpe_size else tokenizer
    if os.path.isfile(os.path.join(out_dir, "manifest.json")):
        try:
            if load_manifest(out_dir)["tokenizer"] == (spec if bpe_size else get_tokenizer(spec).spec):
                return out_dir
        except ValueError:
            pass  # damaged: build it again
    docs = gather_corpus(max_bytes)
    if bpe_size:
        from ..data.bpe import train_bpe

        os.makedirs(out_dir, exist_ok=True)
        train_bpe([d for d in docs if not is_val_document(d, val_fraction, seed)], bpe_size, spec)
    tokenize_documents(docs, get_tokenizer(spec), out_dir, val_fraction=val_fraction, seed=seed,
                       num_workers=min(4, os.cpu_count() or 1))
    return out_dir


def _bpe_size(tokenizer: str) -> int | None:
    """N of a "bpe:<N>" spec, else None."""
    if not tokenizer.startswith("bpe:"):
        return None
    size = tokenizer[len("bpe:"):]
    if not size.isdigit() or int(size) <= 257:
        raise ValueError(f"tokenizer 'bpe:<N>' needs N > 257 (256 bytes + end-of-text + merges), got {tokenizer!r}")
    return int(size)
