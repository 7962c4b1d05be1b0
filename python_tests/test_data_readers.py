"""Readers: every format, compression, directories and globs, and every kind of bad input."""

from __future__ import annotations

import gzip
import json
import os
import random

import pytest

from llmkern.data import readers
from llmkern.data.config import ReaderConfig
from llmkern.data.readers import BadInputError, ReadReport, expand_inputs, read_documents, read_file


def _read(path, **cfg):
    report = ReadReport()
    docs = list(read_file(str(path), ReaderConfig(**cfg), report))
    return docs, report


def _write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def test_text_file_is_one_document(tmp_path):
    docs, report = _read(_write(tmp_path / "a.txt", "first line\nsecond line\n"))
    assert [d.text for d in docs] == ["first line\nsecond line\n"]
    assert (docs[0].source, docs[0].line) == (str(tmp_path / "a.txt"), 1)
    assert report.files == 1 and not report.counts


@pytest.mark.parametrize("chunk", [3, 7, 64, 1 << 20])
def test_text_split_on_separator_matches_str_split(tmp_path, monkeypatch, chunk):
    # Small read chunks put separators across chunk boundaries.
    monkeypatch.setattr(readers, "_CHUNK", chunk)
    rng = random.Random(chunk)
    pieces = ["".join(rng.choice("ab \nçé") for _ in range(rng.randint(1, 40))) for _ in range(50)]
    text = "<SEP>\n".join(pieces)
    docs, report = _read(_write(tmp_path / "s.txt", text), separator="<SEP>\n")
    expected = [p for p in text.split("<SEP>\n") if p.strip()]
    assert [d.text for d in docs] == expected
    # Each document knows the line it starts on.
    lines = text.split("\n")
    for d in docs:
        assert "\n".join(lines[d.line - 1:]).startswith(d.text)
    assert not report.counts


def test_jsonl_text_field_and_metadata(tmp_path):
    rows = [{"text": "one", "id": 1, "url": "u1"}, {"content": "two", "id": 2}]
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    docs, report = _read(path)
    assert [(d.text, d.meta, d.line) for d in docs] == [("one", {"id": 1, "url": "u1"}, 1)]
    assert report.counts == {"missing_text_field": 1}
    docs, _ = _read(path, text_field="content")
    assert [(d.text, d.meta, d.line) for d in docs] == [("two", {"id": 2}, 2)]


def test_jsonl_bad_lines_are_counted_with_file_and_line(tmp_path):
    lines = [
        '{"text": "good one"}',
        '{"text": "unterminated',
        "",  # blank lines are not errors
        '["a", "list"]',
        '{"text": 42}',
        '{"other": "x"}',
        '{"text": "lone \\ud800 surrogate"}',
        '{"text": "good two"}',
    ]
    path = _write(tmp_path / "bad.jsonl", "\n".join(lines))
    docs, report = _read(path)
    assert [d.text for d in docs] == ["good one", "lone \ufffd surrogate", "good two"]
    assert report.counts == {"malformed_json": 2, "missing_text_field": 2, "invalid_utf8": 1}
    assert [e["line"] for e in report.examples["malformed_json"]] == [2, 4]
    assert [e["line"] for e in report.examples["missing_text_field"]] == [5, 6]
    assert report.examples["invalid_utf8"][0] == {"file": str(path), "line": 7,
                                                   "reason": "a lone surrogate \\ud800 in a JSON string"}
    with pytest.raises(BadInputError, match=r"bad\.jsonl:2: malformed_json"):
        _read(path, strict=True)


def test_invalid_utf8_is_replaced_and_reported_at_its_line(tmp_path):
    path = _write(tmp_path / "latin1.txt", "ok\nstill ok\ncaf\xe9\n".encode("latin-1"))
    docs, report = _read(path)
    assert docs[0].text == "ok\nstill ok\ncaf\ufffd\n"
    assert report.counts == {"invalid_utf8": 1}
    assert report.examples["invalid_utf8"][0]["line"] == 3
    jsonl = _write(tmp_path / "x.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    docs, report = _read(jsonl)
    assert [d.text for d in docs] == ["a", "caf\ufffd"]
    assert report.examples["invalid_utf8"][0]["line"] == 2
    with pytest.raises(BadInputError, match="latin1.txt:3: invalid_utf8"):
        _read(path, strict=True)


@pytest.mark.parametrize("name,content", [("e.txt", ""), ("w.txt", " \n\t\n"), ("e.jsonl", ""), ("b.jsonl", "\n\n")])
def test_empty_files_are_reported(tmp_path, name, content):
    docs, report = _read(_write(tmp_path / name, content))
    assert docs == [] and report.counts == {"empty_file": 1}


def test_empty_file_with_separator(tmp_path):
    docs, report = _read(_write(tmp_path / "e.txt", "\n\n\n"), separator="\n\n")
    assert docs == [] and report.counts == {"empty_file": 1}


def test_too_long_documents_are_skipped_not_held(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_CHUNK", 1000)
    long_line = "x" * 50_000
    jsonl = _write(tmp_path / "l.jsonl", "\n".join([json.dumps({"text": "before"}), json.dumps({"text": long_line}),
                                                    json.dumps({"text": "after"})]) + "\n")
    docs, report = _read(jsonl, max_document_bytes=4096)
    assert [d.text for d in docs] == ["before", "after"]
    assert report.counts == {"too_long": 1} and report.examples["too_long"][0]["line"] == 2
    assert docs[1].line == 3

    txt = _write(tmp_path / "l.txt", "short one\n\n" + long_line + "\n\nshort two\n")
    docs, report = _read(txt, separator="\n\n", max_document_bytes=4096)
    assert [d.text for d in docs] == ["short one", "short two\n"]
    assert report.counts == {"too_long": 1} and report.examples["too_long"][0]["line"] == 3
    assert docs[1].line == 5

    docs, report = _read(txt, max_document_bytes=4096)  # the whole file is one (too long) document
    assert docs == [] and report.counts == {"too_long": 1}


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_too_long_document_inside_one_read_chunk_is_skipped(tmp_path, monkeypatch, chunk):
    # With the default 1 MiB chunk a 500-byte document arrives whole, separator and all: it is still over
    # max_document_bytes and skipped, as it is when the reader meets it across chunks.
    monkeypatch.setattr(readers, "_CHUNK", chunk)
    txt = _write(tmp_path / "m.txt", "short one\n\n" + "x" * 500 + "\n\nshort two\n")
    docs, report = _read(txt, separator="\n\n", max_document_bytes=100)
    assert [(d.text, d.line) for d in docs] == [("short one", 1), ("short two\n", 5)]
    assert report.counts == {"too_long": 1} and report.examples["too_long"][0]["line"] == 3
    docs, report = _read(_write(tmp_path / "n.txt", "x" * 500), separator="\n\n", max_document_bytes=100)
    assert docs == [] and report.counts == {"too_long": 1}  # the last document (no separator after it) too


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 1 << 20])
def test_a_document_of_exactly_max_bytes_is_kept_wherever_the_chunks_end(tmp_path, monkeypatch, chunk):
    # The bytes after a document may be the start of a separator the next chunk completes: they are
    # no part of the document and must not make one of exactly max_document_bytes "too long".
    monkeypatch.setattr(readers, "_CHUNK", chunk)
    txt = _write(tmp_path / "x.txt", "abcd\n\n\nefgh\n\n\nijklm\n\n\n")
    docs, report = _read(txt, separator="\n\n\n", max_document_bytes=4)
    assert [(d.text, d.line) for d in docs] == [("abcd", 1), ("efgh", 4)]
    assert report.counts == {"too_long": 1} and report.examples["too_long"][0]["line"] == 7


@pytest.mark.parametrize("chunk", [1, 2, 5, 1 << 20])
def test_a_windows_text_file_splits_at_its_crlf_blank_lines(tmp_path, monkeypatch, chunk):
    # separator "\n\n" never occurs in a file whose lines end in "\r\n": the whole file was one
    # document (and, over max_document_bytes, dropped whole). Its blank lines split it as a Unix file's do.
    monkeypatch.setattr(readers, "_CHUNK", chunk)
    unix = "first doc\nline two\n\nsecond doc\n\n\nthird\n"
    windows = _write(tmp_path / "w.txt", unix.replace("\n", "\r\n"))
    docs, report = _read(windows, separator="\n\n")
    expected, _ = _read(_write(tmp_path / "u.txt", unix), separator="\n\n")
    assert [d.text for d in docs] == [d.text.replace("\n", "\r\n") for d in expected]
    assert [d.line for d in docs] == [d.line for d in expected] == [1, 4, 6]
    assert report.bytes == os.path.getsize(windows)
    # a Unix file's stray "\r\n" further on changes nothing: its first line end decides
    mixed = _write(tmp_path / "m.txt", "a\n\nb\r\n\r\nc\n")
    assert [d.text for d in _read(mixed, separator="\n\n")[0]] == ["a", "b\r\n\r\nc\n"]


def test_hundred_megabyte_single_line(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "first"}\n{"text": "')
        block = b"y" * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write(b'"}\n{"text": "last"}\n')
    docs, report = _read(path)
    assert [d.text for d in docs] == ["first", "last"]
    assert report.counts == {"too_long": 1} and report.examples["too_long"][0]["line"] == 2
    assert report.bytes == os.path.getsize(path)


def test_gzip_and_zstd(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    body = "\n".join(json.dumps({"text": f"doc {i} é"}) for i in range(300))
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(body)
    zst = _write(tmp_path / "d.jsonl.zst", zstandard.ZstdCompressor().compress(body.encode()))
    txt_zst = _write(tmp_path / "t.txt.zst", zstandard.ZstdCompressor().compress("a\n\nb".encode()))
    for path in (gz, zst):
        docs, report = _read(path)
        assert [d.text for d in docs] == [f"doc {i} é" for i in range(300)] and not report.counts
    docs, _ = _read(txt_zst, separator="\n\n")
    assert [d.text for d in docs] == ["a", "b"]


def test_unreadable_files_keep_what_was_read(tmp_path):
    not_gzip = _write(tmp_path / "fake.txt.gz", b"plain bytes, no gzip header")
    docs, report = _read(not_gzip)
    assert docs == [] and report.counts == {"unreadable": 1}
    assert "fake.txt.gz" in report.examples["unreadable"][0]["file"]

    body = "\n".join(json.dumps({"text": f"row {i} " + "z" * 200}) for i in range(2000)).encode()
    truncated = _write(tmp_path / "cut.jsonl.gz", gzip.compress(body)[:-2000])
    docs, report = _read(truncated)
    assert 0 < len(docs) < 2000 and docs[0].text.startswith("row 0 ")
    assert report.counts == {"unreadable": 1}
    with pytest.raises(BadInputError, match="cut.jsonl.gz: unreadable"):
        _read(truncated, strict=True)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_is_unreadable(tmp_path):
    path = _write(tmp_path / "secret.txt", "hidden")
    path.chmod(0)
    docs, report = _read(path)
    assert docs == [] and report.counts == {"unreadable": 1}


def test_unsupported_format_is_reported(tmp_path):
    docs, report = _read(_write(tmp_path / "a.csv", "x,y"))
    assert docs == [] and report.counts == {"unsupported_format": 1}


def test_directories_globs_and_missing_paths(tmp_path):
    _write(tmp_path / "d" / "b.txt", "B")
    _write(tmp_path / "d" / "a.txt", "A")
    _write(tmp_path / "d" / "sub" / "c.jsonl", '{"text": "C"}')
    _write(tmp_path / "d" / "notes.csv", "ignored inside directories")
    _write(tmp_path / "d" / ".hidden.txt", "ignored")
    files = expand_inputs([str(tmp_path / "d")])
    assert [os.path.relpath(f, tmp_path) for f in files] == ["d/a.txt", "d/b.txt", "d/sub/c.jsonl"]
    assert expand_inputs([str(tmp_path / "d" / "*.txt"), str(tmp_path / "d" / "a.txt")]) == files[:2]
    assert [d.text for d in read_documents([str(tmp_path / "d" / "**" / "*.jsonl")])] == ["C"]
    with pytest.raises(ValueError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.nothing")])


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": ["one", "two", None], "id": [1, 2, 3]})
    pq.write_table(table, tmp_path / "t.parquet")
    docs, report = _read(tmp_path / "t.parquet")
    assert [(d.text, d.meta, d.line) for d in docs] == [("one", {"id": 1}, 1), ("two", {"id": 2}, 2)]
    assert report.counts == {"missing_text_field": 1}


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    path = _write(tmp_path / "t.parquet", b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(read_documents([str(path)]))


def _parquet_files(tmp_path):
    """A good Parquet file and its bad kin: garbage, truncated, empty; no, a non-string or a twice-named text column."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(3000)]}), good, row_group_size=1000)
    data = good.read_bytes()
    bad = {
        "garbage.parquet": ("unreadable", _write(tmp_path / "garbage.parquet", b"this is not parquet")),
        "cut.parquet": ("unreadable", _write(tmp_path / "cut.parquet", data[: len(data) // 2])),
        "zero.parquet": ("unreadable", _write(tmp_path / "zero.parquet", b"")),
    }
    for name, table in [("nocol.parquet", pa.table({"body": ["a", "b"]})),
                        ("ints.parquet", pa.table({"text": [1, 2]})),
                        ("bytes.parquet", pa.table({"text": [b"a", b"b"]})),
                        ("twice.parquet", pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], ["text", "text"]))]:
        pq.write_table(table, tmp_path / name)
        bad[name] = ("missing_text_field", tmp_path / name)
    return good, bad


def test_bad_parquet_files_are_counted_not_raised(tmp_path):
    good, bad = _parquet_files(tmp_path)
    for name, (kind, path) in bad.items():
        docs, report = _read(path)
        assert docs == [] and report.counts == {kind: 1}, name  # one count per file, not per row
        assert report.examples[kind][0]["file"] == str(path)
        with pytest.raises(BadInputError, match=f"{name}:.*{kind}"):
            _read(path, strict=True)
    assert "holds int64, not strings" in _read(bad["ints.parquet"][1])[1].examples["missing_text_field"][0]["reason"]
    # The run goes on past them, as past a corrupt .jsonl.gz.
    report = ReadReport()
    paths = [str(p) for _, p in bad.values()] + [str(good)]
    docs = list(read_documents(paths, ReaderConfig(), report))
    assert [d.text for d in docs] == [f"row {i}" for i in range(3000)]
    assert report.counts == {"unreadable": 3, "missing_text_field": 4} and report.files == 8


def test_parquet_corrupt_past_its_first_rows_keeps_them(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    good, _ = _parquet_files(tmp_path)
    last_group = pq.ParquetFile(good).metadata.row_group(2).column(0).data_page_offset
    data = bytearray(good.read_bytes())
    data[last_group:last_group + 200] = bytes(b ^ 0xFF for b in data[last_group:last_group + 200])
    docs, report = _read(_write(tmp_path / "late.parquet", bytes(data)))
    assert 0 < len(docs) < 3000 and docs[0].text == "row 0"
    assert report.counts == {"unreadable": 1}


def test_parquet_string_columns_of_every_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    for name, column in [("large", pa.array(["a", "b"], pa.large_string())),
                         ("dict", pa.array(["a", "b"]).dictionary_encode())]:  # a pandas categorical
        pq.write_table(pa.table({"text": column}), tmp_path / f"{name}.parquet")
        docs, report = _read(tmp_path / f"{name}.parquet")
        assert [d.text for d in docs] == ["a", "b"] and not report.counts, name


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.txt", "split.txt"])
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_document(tmp_path, name):
    bom = b"\xef\xbb\xbf"
    if name.startswith("a.jsonl"):
        data = bom + b'{"text": "first"}\r\n{"text": "second"}\r\n'
        expected = ["first", "second"]
    elif name == "a.txt":
        data, expected = bom + "héllo world".encode(), ["héllo world"]
    else:
        data, expected = bom + b"one\r\n\r\ntwo\r\n", ["one", "two\r\n"]
    if name.endswith(".gz"):
        data = gzip.compress(data)
    docs, report = _read(_write(tmp_path / name, data), separator="\n\n" if name == "split.txt" else None)
    assert [d.text for d in docs] == expected
    assert not report.counts


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.zst"])
def test_small_read_chunks_keep_a_full_file_buffer(tmp_path, monkeypatch, name):
    # The file's buffer was sized by the read chunk: a 1-byte chunk asked open() for line buffering (a
    # RuntimeWarning in binary mode) and gave zstd a 1-byte buffer whose peek missed the BOM, losing the
    # first record as malformed JSON.
    monkeypatch.setattr(readers, "_CHUNK", 1)
    data = b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n'
    if name.endswith(".zst"):
        data = pytest.importorskip("zstandard").ZstdCompressor().compress(data)
    docs, report = _read(_write(tmp_path / name, data))
    assert [d.text for d in docs] == ["first", "second"]
    assert not report.counts


@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 1 << 20])
def test_a_windows_file_first_document_of_max_bytes_is_kept(tmp_path, monkeypatch, chunk):
    # Until the first line end decides the separator ("\n" or "\r\n" as written), a "\r" at the end of the
    # buffer counted as document bytes: a first document of exactly max_document_bytes was "too long", and
    # one that was too long dropped the "\r" the decision needs, so every later document kept a "\r".
    monkeypatch.setattr(readers, "_CHUNK", chunk)
    docs, report = _read(_write(tmp_path / "a.txt", "abc\r\ndef\r\n"), separator="\n", max_document_bytes=3)
    assert [(d.text, d.line) for d in docs] == [("abc", 1), ("def", 2)] and not report.counts
    docs, report = _read(_write(tmp_path / "b.txt", "abcd\r\nef\r\ngh"), separator="\n", max_document_bytes=3)
    assert [(d.text, d.line) for d in docs] == [("ef", 2), ("gh", 3)]
    assert report.counts == {"too_long": 1}
    docs, report = _read(_write(tmp_path / "c.txt", "ab--\r\ncd--\r\n"), separator="--\n", max_document_bytes=2)
    assert [(d.text, d.line) for d in docs] == [("ab", 1), ("cd", 2)] and not report.counts


def test_parquet_documents_over_max_bytes_are_skipped_like_text_and_jsonl(tmp_path):
    # ReaderConfig.max_document_bytes skipped long .txt documents and JSONL lines, but Parquet rows of any
    # length were kept. Bytes are UTF-8 bytes: "ééa" is 3 characters but 5 bytes.
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["abcd", "abcde", "éé", "ééa", "x"]}), tmp_path / "t.parquet")
    docs, report = _read(tmp_path / "t.parquet", max_document_bytes=4)
    assert [(d.text, d.line) for d in docs] == [("abcd", 1), ("éé", 3), ("x", 5)]
    assert report.counts == {"too_long": 2} and [e["line"] for e in report.examples["too_long"]] == [2, 4]
