"""Data pipeline edge cases a demanding user meets: damaged compressed inputs, read as bad input rather
than crashing the run or passing as shorter files; one input file named twice; more than 99,999 inputs;
lone surrogates in a BPE training corpus; eval sets of one file name in several folders."""

from __future__ import annotations

import gzip
import json
import os
import random

import pytest
from tiktoken.load import load_tiktoken_bpe

from llmkern.data.bpe import train_bpe
from llmkern.data.config import DecontamConfig, ReaderConfig
from llmkern.data.decontam import DecontamStage, Decontaminator
from llmkern.data.pipeline import part_name, read_parts
from llmkern.data.readers import Document, ReadReport, expand_inputs, read_documents, read_file
from llmkern.data.stage import StageStats


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


def test_zstd_skippable_frames_and_frames_of_unknown_size_read_whole(tmp_path):
    # What zstd's streaming tools write: frames without their content size (zstd -c from a pipe) and skippable
    # frames (pzstd's and seekable indexes' metadata), which carry no text and must not end the file.
    zstandard = pytest.importorskip("zstandard")
    texts = _documents(random.Random(5), 300)
    body = "\n\n".join(texts).encode()
    streamed = zstandard.ZstdCompressor().compressobj()
    unknown_size = streamed.compress(body[:5000]) + streamed.flush()
    assert zstandard.frame_content_size(unknown_size) == -1  # -1: unknown
    skippable = (0x184D2A5B).to_bytes(4, "little") + (7).to_bytes(4, "little") + b"\xff" * 7
    path = tmp_path / "mixed.txt.zst"
    path.write_bytes(skippable + unknown_size + skippable + zstandard.ZstdCompressor().compress(body[5000:])
                     + skippable)
    docs, report = _read(path, separator="\n\n")
    assert [d.text for d in docs] == texts and not report.counts


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


def test_files_are_told_apart_by_where_they_are_not_how_their_path_reads(tmp_path, monkeypatch):
    # Keyed by os.path.abspath, "link/../a.jsonl" (link a symlink to another directory) read as "a.jsonl" and
    # the other directory's a.jsonl was dropped unread; and a symlink to a file named too was read twice.
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere" / "a.jsonl").write_text('{"text": "elsewhere"}\n', encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.jsonl").write_text('{"text": "here"}\n', encoding="utf-8")
    (work / "link").symlink_to(tmp_path / "elsewhere" / "sub", target_is_directory=True)
    (work / "alias.jsonl").symlink_to(work / "a.jsonl")
    monkeypatch.chdir(work)
    assert expand_inputs(["a.jsonl", "link/../a.jsonl"]) == ["a.jsonl", "link/../a.jsonl"]
    assert [d.text for d in read_documents(["a.jsonl", "link/../a.jsonl"])] == ["here", "elsewhere"]
    assert expand_inputs(["a.jsonl", "alias.jsonl"]) == ["a.jsonl"]


def test_parts_are_read_in_input_order_past_99999_inputs(tmp_path):
    # Part names were sorted as text: part-100000.jsonl came before part-99999.jsonl, so tokenizing
    # a run of more than 99,999 inputs changed the order of its documents.
    rng = random.Random(5)
    indices = [*rng.sample(range(100), 3), *rng.sample(range(99_990, 100_010), 8),
               *rng.sample(range(999_990, 1_000_010), 4)]
    doc_dir = tmp_path / "documents"
    doc_dir.mkdir()
    for index in rng.sample(indices, len(indices)):  # created in no particular order
        record = {"text": f"document of input {index}", "source": f"in{index}.txt", "line": 1, "meta": {}}
        (doc_dir / part_name(index)).write_text(json.dumps(record) + "\n", encoding="utf-8")
    (doc_dir / (part_name(7) + ".tmp")).write_text("an unfinished part, not read\n", encoding="utf-8")
    texts = [doc.text for doc in read_parts(str(tmp_path))]
    assert texts == [f"document of input {i}" for i in sorted(indices)]
    some = rng.sample(indices, 5)
    assert [doc.text for doc in read_parts(str(tmp_path), some)] == [f"document of input {i}" for i in some]


def _as_tiktoken_encodes(text: str) -> str:
    # What tiktoken's Encoding.encode does to a text holding surrogates before splitting it.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _texts_with_surrogates(rng: random.Random, count: int) -> list[str]:
    lone = ["\ud800", "\udbff", "\udc00", "\udfff"]
    pairs = ["\ud835\udc00", "\ud83d\ude00"]  # a letter (MATHEMATICAL BOLD CAPITAL A) and an emoji
    words = ["tok", "en", "izer", "surr", "ogate", "x"]
    texts = []
    for _ in range(count):
        pieces = [rng.choice(words) + rng.choice(lone + pairs + [""]) * rng.randint(1, 3) for _ in range(12)]
        texts.append(" ".join(pieces))
    return texts


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
def test_bpe_training_counts_lone_surrogates_as_the_tokenizer_encodes_them(tmp_path, pattern):
    # Words holding a lone surrogate were learned as if it were "?", but tiktoken encodes it as U+FFFD
    # (and a surrogate pair as its character): the merges were learned from bytes never encoded.
    texts = _texts_with_surrogates(random.Random(6), 300)
    as_raw = tmp_path / "raw.tiktoken"
    as_encoded = tmp_path / "encoded.tiktoken"
    tok = train_bpe(texts, vocab_size=256 + 60 + 1, out_path=as_raw, pattern=pattern, num_workers=1)
    train_bpe([_as_tiktoken_encodes(t) for t in texts], vocab_size=256 + 60 + 1, out_path=as_encoded,
              pattern=pattern, num_workers=1)
    ranks = load_tiktoken_bpe(str(as_raw))
    assert ranks == load_tiktoken_bpe(str(as_encoded))
    assert any(b"\xef\xbf\xbd" in token and len(token) > 3 for token in ranks)  # U+FFFD was merged with more
    assert not any(b"?" in token for token in ranks if len(token) > 1)
    encoded = tok.encode(texts[0])
    assert len(encoded) < len(_as_tiktoken_encodes(texts[0]).encode("utf-8"))  # the merges are used


def _eval_file(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_eval_sets_of_one_file_name_in_several_folders_are_told_apart(tmp_path):
    # Eval sets were named by file name alone: two test.jsonl files counted as one set (a document
    # matching both was counted twice under one name), and the report could not say which one matched.
    rng = random.Random(7)
    vocabulary = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
    questions = [" ".join(rng.choice(vocabulary) + str(rng.randrange(99)) for _ in range(20)) for _ in range(4)]
    paths = [_eval_file(tmp_path / "mmlu" / "test.txt", questions[0]),
             _eval_file(tmp_path / "gsm8k" / "test.txt", questions[1]),
             _eval_file(tmp_path / "x" / "arc" / "dev.txt", questions[2]),
             _eval_file(tmp_path / "y" / "arc" / "dev.txt", questions[3])]
    stage = DecontamStage(DecontamConfig(enabled=True, eval_sets=paths, action="flag"))
    names = [os.path.join("mmlu", "test.txt"), os.path.join("gsm8k", "test.txt"),
             os.path.join("x", "arc", "dev.txt"), os.path.join("y", "arc", "dev.txt")]
    assert stage.index.set_names == names
    docs = [Document(f"copied: {questions[i]} and {questions[j]}", "train", n)
            for n, (i, j) in enumerate([(0, 1), (0, 0), (2, 3), (1, 3)])]
    stats = StageStats("decontam")
    stage.run(docs, stats)
    assert [doc.meta["contaminated"] for doc in docs] == [sorted([names[0], names[1]]), [names[0]],
                                                          sorted([names[2], names[3]]), sorted([names[1], names[3]])]
    assert {k: v for k, v in stats.counts.items() if k.startswith("matched_")} == {
        f"matched_{names[0]}": 2, f"matched_{names[1]}": 2, f"matched_{names[2]}": 1, f"matched_{names[3]}": 2}


def test_eval_sets_of_distinct_file_names_are_named_by_file_name(tmp_path):
    paths = [_eval_file(tmp_path / "a" / "mmlu.txt", "one two three"), _eval_file(tmp_path / "b" / "gsm8k.txt", "four")]
    assert Decontaminator.from_files(paths, ngram=2).set_names == ["mmlu.txt", "gsm8k.txt"]


def test_two_eval_sets_of_one_name_are_an_error():
    index = Decontaminator(ngram=2)
    index.add("test.jsonl", ["one two three"])
    with pytest.raises(ValueError, match="test.jsonl"):
        index.add("test.jsonl", ["four five six"])
