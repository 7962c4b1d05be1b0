"""Data pipeline edge cases a demanding user meets: damaged compressed inputs, read as bad input rather
than crashing the run or passing as shorter files; one input file named twice."""

from __future__ import annotations

import gzip
import os
import random

import pytest

from llmkern.data.config import ReaderConfig
from llmkern.data.readers import ReadReport, expand_inputs, read_documents, read_file


def _read(path, **cfg):
    report = ReadReport()
    docs = list(read_file(str(path), ReaderConfig(**cfg), report))
    return docs, report


def _documents(rng: random.Random, count: int) -> list[str]:
    """Distinct documents that compress poorly (hex of random bytes), so that a file has many zstd blocks."""
    return [rng.randbytes(300).hex() for _ in range(count)]


def test_a_gzip_file_with_a_corrupt_deflate_stream_is_unreadable_not_a_crash(tmp_path):
    # A valid gzip header followed by bytes that are no deflate stream: zlib.error, which is no OSError,
    # escaped read_file and stopped the whole run instead of being counted as an unreadable file.
    header = gzip.compress(b"first\n\nsecond")[:10]
    path = tmp_path / "bad.txt.gz"
    path.write_bytes(header + b"\xff" * 64)
    docs, report = _read(path, separator="\n\n")
    assert docs == []
    assert dict(report.counts) == {"unreadable": 1}
    assert "invalid block type" in report.examples["unreadable"][0]["reason"]


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_a_truncated_zstd_file_is_unreadable_and_keeps_what_came_before(tmp_path, keep):
    # zstandard's stream_reader ends quietly where the compressed bytes end: a .zst file cut short (an
    # interrupted download) read as a shorter file, or as an empty one, with no bad input reported.
    zstandard = pytest.importorskip("zstandard")
    texts = _documents(random.Random(3), 2000)
    data = zstandard.ZstdCompressor().compress("\n\n".join(texts).encode())
    path = tmp_path / "cut.txt.zst"
    path.write_bytes(data[: int(len(data) * keep)])
    docs, report = _read(path, separator="\n\n")
    assert dict(report.counts) == {"unreadable": 1}
    assert "EOFError" in report.examples["unreadable"][0]["reason"]
    read = [d.text for d in docs]
    assert len(read) < len(texts) and read == texts[: len(read)]  # a prefix of the real documents


def test_zstd_files_of_several_frames_and_complete_ones_read_whole(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    texts = _documents(random.Random(4), 600)
    body = "\n\n".join(texts).encode()
    cut = body.index(b"\n\n", len(body) // 3) + 1  # frames need not end at a document's end
    frames = zstandard.ZstdCompressor().compress(body[:cut]) + zstandard.ZstdCompressor(level=9).compress(body[cut:])
    for name, data in (("one.txt.zst", zstandard.ZstdCompressor().compress(body)), ("two.txt.zst", frames),
                       ("empty_frame.txt.zst", zstandard.ZstdCompressor().compress(b"") + frames)):
        path = tmp_path / name
        path.write_bytes(data)
        docs, report = _read(path, separator="\n\n")
        assert [d.text for d in docs] == texts and not report.counts, name
        assert report.bytes == len(body)
    empty = tmp_path / "nothing.txt.zst"
    empty.write_bytes(b"")
    docs, report = _read(empty)
    assert docs == [] and dict(report.counts) == {"empty_file": 1}


def test_a_file_named_twice_in_different_spellings_is_read_once(tmp_path, monkeypatch):
    # Identity was the path string: "corpus" and "./corpus/a.jsonl" listed a.jsonl twice, and every
    # document of it was read (and, without exact dedup, kept) twice.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    spellings = ["corpus", "./corpus/a.jsonl", "corpus//a.jsonl", str(corpus / "a.jsonl"), "corpus/../corpus/a.jsonl",
                 "corpus/*.jsonl"]
    assert expand_inputs(spellings) == [os.path.join("corpus", "a.jsonl")]
    assert [d.text for d in read_documents(spellings)] == ["one", "two"]
