"""Stream documents out of .txt, .jsonl and .parquet files (plain, .gz or .zst), directories and globs.

Memory stays constant whatever the file size: text is read in chunks or line by line, and a
document or line longer than `ReaderConfig.max_document_bytes` is skipped without being held.
Bad input never stops the run: each case is counted in a `ReadReport` by kind, with the file and
line of the first few, or raises `BadInputError` at once under `strict=True`. The kinds:

  invalid_utf8        bytes that are not UTF-8 (the document is kept, decoded with U+FFFD)
  empty_file          a file with nothing but whitespace
  too_long            a document or JSONL line over max_document_bytes (skipped)
  malformed_json      a JSONL line that is not a JSON object
  missing_text_field  a JSONL line / Parquet file without the text field, or with a non-string one
  unreadable          a file that cannot be opened, decompressed or parsed, such as a truncated
                      Parquet file (what was read before is kept)
  unsupported_format  a file whose extension no reader handles
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator, Optional

from .config import ReaderConfig

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = (".gz", ".zst")
_CHUNK = 1 << 20  # bytes per read
# The files' buffer, its own constant: tied to _CHUNK, a read chunk of 1 byte asked for line buffering (not
# supported in binary mode, a RuntimeWarning) and a 1-byte zstd buffer whose peek cannot see a 3-byte BOM.
_BUFFER = 1 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which Windows tools write at the start of a file
# Compressed bytes per zstd decompress call: a block of a few bytes may give 128 KiB, so this bounds what one
# call holds (32 MiB at worst, some 20 KiB for text).
_ZSTD_INPUT = 1 << 10


class BadInputError(ValueError):
    """Bad input met under strict=True; the message names the file and line."""


@dataclass
class Document:
    text: str
    source: str  # the file it came from
    line: int  # 1-based line where it starts (the row number for Parquet)
    meta: dict = field(default_factory=dict)  # the other JSONL/Parquet fields, and stage annotations


@dataclass
class ReadReport:
    """Bad input met while reading, by kind, with up to `max_examples` (file, line, reason) per kind."""

    strict: bool = False
    max_examples: int = 20
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    documents: int = 0  # documents read (counted by the caller that consumes them)
    chars: int = 0

    def add(self, kind: str, file: str, line: int, reason: str) -> None:
        if self.strict:
            raise BadInputError(f"{file}:{line}: {kind}: {reason}")
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.max_examples:
            shown.append({"file": file, "line": line, "reason": reason})

    def merge(self, other: "ReadReport") -> None:
        self.counts.update(other.counts)
        self.files += other.files
        self.bytes += other.bytes
        self.documents += other.documents
        self.chars += other.chars
        for kind, shown in other.examples.items():
            mine = self.examples.setdefault(kind, [])
            mine.extend(shown[: max(0, self.max_examples - len(mine))])

    def to_dict(self) -> dict:
        return {"files": self.files, "bytes": self.bytes, "documents": self.documents, "chars": self.chars,
                "bad_input": dict(self.counts),
                "examples": self.examples}

    @classmethod
    def from_dict(cls, data: dict, strict: bool = False, max_examples: int = 20) -> "ReadReport":
        return cls(strict=strict, max_examples=max_examples, counts=Counter(data["bad_input"]),
                   examples={k: list(v) for k, v in data["examples"].items()},
                   files=data["files"], bytes=data["bytes"], documents=data["documents"], chars=data["chars"])


def file_format(path: str) -> Optional[str]:
    """"text", "jsonl", "parquet" or None, from the extension under any .gz/.zst."""
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES) and name == path.lower():  # Parquet compresses inside
        return "parquet"
    return None


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files named by `inputs` (files, directories walked in sorted order, globs), each once.

    Inside a directory only files of a known format are taken (hidden files skipped); a file named
    explicitly is always taken (an unknown format is then reported when read). A path that does
    not exist or a glob that matches nothing is a ValueError: that is a typo, not bad data.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[str] = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [os.path.join(root, n) for n in sorted(names)
                          if not n.startswith(".") and file_format(n) is not None]
        elif os.path.lexists(item):
            files.append(item)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise ValueError(f"inputs: the glob {item!r} matches no file")
            files += expand_inputs(matches)
        else:
            raise ValueError(f"inputs: no such file or directory: {item!r}")
    seen: set[str] = set()
    unique = []
    for f in files:
        # by the file the path reaches, not its spelling: "corpus" and "./corpus/a.jsonl" name one file, read
        # once, as do a symlink and its target; realpath, not abspath, which folds "link/../a" lexically into
        # "a" and dropped another directory's a.jsonl
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def check_readers_available(files: Iterable[str]) -> None:
    """Fail before any work when a file needs an optional library that is not installed."""
    files = list(files)
    if any(f.lower().endswith(".zst") for f in files):
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise ImportError("reading .zst files needs the zstandard package: pip install zstandard") from None
    if any(file_format(f) == "parquet" for f in files):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ImportError("reading .parquet files needs pyarrow: pip install pyarrow") from None


def open_binary(path: str) -> BinaryIO:
    """A buffered binary stream of a file's bytes, .gz and .zst decompressed as they are read."""
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    if path.lower().endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path), _BUFFER)
    return open(path, "rb", buffering=_BUFFER)


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame; EOFError (as gzip raises) when the file
    ends inside a frame. zstandard's stream_reader ends quietly there, so a .zst file cut short (an
    interrupted download) read as a shorter or an empty file, with no bad input reported."""

    def __init__(self, path: str):
        import zstandard

        self._file = open(path, "rb", buffering=_BUFFER)  # noqa: SIM115 (open while the reader is: close())
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = None  # the decompression object of the frame being read; None between frames
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            data = self._file.read(_ZSTD_INPUT)
            if not data:
                if self._frame is not None:
                    raise EOFError("the .zst file ends inside a frame (cut short?)")
                return 0
            self._out = memoryview(self._decompress(data))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None:
                self._frame = self._decompressor.decompressobj()
            out.append(self._frame.decompress(data))
            data = b""
            if self._frame.eof:  # the bytes after a frame's end start the next frame
                data, self._frame = self._frame.unused_data, None
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _skip_bom(f: BinaryIO, report: ReadReport) -> None:
    """Step over a UTF-8 byte order mark (Windows tools write one) at the start of a text stream: it is no
    part of the first document, and json.loads refuses it (a JSONL file's first record was lost)."""
    if f.peek(len(_BOM))[:len(_BOM)] == _BOM:
        report.bytes += len(f.read(len(_BOM)))


def read_errors(fmt: str) -> tuple[type, ...]:
    """Exceptions that mean "this file cannot be read" (as opposed to a bug)."""
    errors: tuple[type, ...] = (OSError, EOFError, zlib.error)  # zlib.error: a .gz file's corrupt deflate data
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    if fmt == "parquet":
        # A truncated or garbage Parquet file raises ArrowInvalid (a ValueError, not an OSError) from
        # the footer, and a corrupt page may raise other Arrow errors: all mean this file is unreadable.
        import pyarrow

        errors += (pyarrow.ArrowException,)
    return errors


def _decode(raw: bytes, path: str, first_line: int, report: ReadReport) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + raw.count(b"\n", 0, exc.start)
        report.add("invalid_utf8", path, line, f"byte 0x{raw[exc.start]:02x} is not UTF-8")
        return raw.decode("utf-8", errors="replace")


def _without_lone_surrogates(text: str, path: str, line: int, report: ReadReport) -> str:
    """JSON may spell a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 file can hold."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as exc:
        report.add("invalid_utf8", path, line, f"a lone surrogate \\u{ord(text[exc.start]):04x} in a JSON string")
        return _SURROGATE.sub("\ufffd", text)


def _read_whole_text(f: BinaryIO, path: str, cfg: ReaderConfig, report: ReadReport) -> Iterator[Document]:
    raw = f.read(cfg.max_document_bytes + 1)
    report.bytes += len(raw)
    if len(raw) > cfg.max_document_bytes:
        report.add("too_long", path, 1, f"the file is over max_document_bytes={cfg.max_document_bytes}")
        while chunk := f.read(_CHUNK):  # drain it, counting bytes, without keeping it
            report.bytes += len(chunk)
        return
    if not raw.strip():
        report.add("empty_file", path, 1, "no text")
        return
    yield Document(_decode(raw, path, 1, report), path, 1)


def _as_written(sep: bytes, head: bytes) -> bytes:
    """The separator as a file with this head writes it: in a file whose first line ends in "\r\n" (a
    Windows file) each "\n" of the separator is "\r\n", else a blank line would never be found there
    and the whole file would read as one document."""
    first = head.find(b"\n")
    if first > 0 and head[first - 1:first] == b"\r" and b"\r" not in sep:
        return sep.replace(b"\n", b"\r\n")
    return sep


def _read_split_text(f: BinaryIO, path: str, cfg: ReaderConfig, report: ReadReport) -> Iterator[Document]:
    sep = cfg.separator.encode("utf-8")
    sep_lines = sep.count(b"\n")
    decided = sep_lines == 0  # a separator with a line end waits for the file's first one (_as_written)
    buf = b""
    line = 1  # the line where buf starts
    skipping = False  # inside a document too long to keep: drop bytes up to the next separator
    any_text = False
    any_too_long = False
    while True:
        chunk = f.read(_CHUNK)
        report.bytes += len(chunk)
        at_end = not chunk
        buf += chunk
        if not decided and (b"\n" in buf or at_end):
            sep, decided = _as_written(sep, buf), True
        pos = 0
        while True:
            i = buf.find(sep, pos)
            if i < 0:
                break
            piece = buf[pos:i]
            if skipping:
                skipping = False
            elif len(piece) > cfg.max_document_bytes:  # whole within a chunk, but still too long to keep
                report.add("too_long", path, line, f"a document over max_document_bytes={cfg.max_document_bytes}")
                any_too_long = True
            elif piece.strip():
                any_text = True
                yield Document(_decode(piece, path, line, report), path, line)
            line += piece.count(b"\n") + sep_lines
            pos = i + len(sep)
        if at_end:
            piece = buf[pos:]
            if not skipping and len(piece) > cfg.max_document_bytes:
                report.add("too_long", path, line, f"a document over max_document_bytes={cfg.max_document_bytes}")
                any_too_long = True
            elif piece.strip() and not skipping:
                any_text = True
                yield Document(_decode(piece, path, line, report), path, line)
            break
        # The last len(sep) - 1 bytes may start a separator that the next chunk completes: only what
        # comes before them surely belongs to the document. Before the first line end decides the
        # separator, one byte more: a "\r" there may make it the longer Windows one (_as_written), and
        # must stay in buf for that decision.
        tail = len(sep) - 1 + (not decided)
        rest = len(buf) - pos - tail
        if not skipping and rest > cfg.max_document_bytes:
            report.add("too_long", path, line, f"a document over max_document_bytes={cfg.max_document_bytes}")
            skipping = any_too_long = True
        if skipping:  # keep only what could be the start of a separator cut by the chunk boundary
            keep_from = max(pos, len(buf) - tail)
            line += buf.count(b"\n", pos, keep_from)
            pos = keep_from
        buf = buf[pos:]
    if not any_text and not any_too_long:
        report.add("empty_file", path, 1, "no text")


def _read_jsonl(f: BinaryIO, path: str, cfg: ReaderConfig, report: ReadReport) -> Iterator[Document]:
    limit = cfg.max_document_bytes
    line = 0
    any_line = False
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            break
        line += 1
        report.bytes += len(raw)
        if len(raw) > limit and not raw.endswith(b"\n"):
            report.add("too_long", path, line, f"a line over max_document_bytes={limit}")
            while True:  # skip the rest of the line, a chunk at a time
                more = f.readline(_CHUNK)
                report.bytes += len(more)
                if not more or more.endswith(b"\n"):
                    break
            any_line = True
            continue
        if not raw.strip():
            continue
        any_line = True
        text = _decode(raw, path, line, report)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            report.add("malformed_json", path, line, exc.msg)
            continue
        if not isinstance(record, dict):
            report.add("malformed_json", path, line, f"a JSON {type(record).__name__}, not an object")
            continue
        body = record.pop(cfg.text_field, None)
        if not isinstance(body, str):
            why = "absent" if body is None else f"a {type(body).__name__}, not a string"
            report.add("missing_text_field", path, line, f"the field {cfg.text_field!r} is {why}")
            continue
        if not body.isascii():
            body = _without_lone_surrogates(body, path, line, report)
        yield Document(body, path, line, record)
    if not any_line:
        report.add("empty_file", path, 1, "no lines")


def _is_string_type(kind) -> bool:
    """An Arrow type whose values are str in Python: (large) string, string view, or a dictionary of them."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):  # a categorical column written by pandas
        kind = kind.value_type
    return str(kind) in ("string", "large_string", "string_view")


def _read_parquet(path: str, cfg: ReaderConfig, report: ReadReport) -> Iterator[Document]:
    import pyarrow.parquet as pq

    report.bytes += os.path.getsize(path)
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    found = schema.names.count(cfg.text_field)
    if found != 1:
        why = "no column" if found == 0 else f"{found} columns named"
        report.add("missing_text_field", path, 1, f"{why} {cfg.text_field!r} (columns: {schema.names})")
        return
    kind = schema.field(cfg.text_field).type
    if not _is_string_type(kind):
        # The schema says every row is a non-string: one report for the file, not one per row.
        report.add("missing_text_field", path, 1, f"the column {cfg.text_field!r} holds {kind}, not strings")
        return
    if pf.metadata.num_rows == 0:
        report.add("empty_file", path, 1, "no rows")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            body = record.pop(cfg.text_field)
            if not isinstance(body, str):  # a null: the schema check above let only strings through
                report.add("missing_text_field", path, row, f"the field {cfg.text_field!r} is null")
                continue
            # Arrow has read it already, but it is skipped as an over-long .txt document or JSONL line is
            # (a UTF-8 character is at most 4 bytes: short texts need no encoding to measure)
            if len(body) > cfg.max_document_bytes // 4 and len(body.encode("utf-8")) > cfg.max_document_bytes:
                report.add("too_long", path, row, f"a document over max_document_bytes={cfg.max_document_bytes}")
                continue
            yield Document(body, path, row, record)


def read_file(path: str, config: Optional[ReaderConfig] = None,
              report: Optional[ReadReport] = None) -> Iterator[Document]:
    """The documents of one file; bad input goes to `report` (or raises under config.strict)."""
    cfg = config or ReaderConfig()
    if report is None:
        report = ReadReport(strict=cfg.strict, max_examples=cfg.max_examples)
    report.strict = report.strict or cfg.strict  # strict in the config wins over a lenient report
    fmt = file_format(path)
    if fmt is None:
        report.add("unsupported_format", path, 0,
                   f"unknown extension; expected one of {TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES}"
                   f" (optionally + .gz/.zst)")
        return
    report.files += 1
    errors = read_errors(fmt)
    try:
        if fmt == "parquet":
            yield from _read_parquet(path, cfg, report)
            return
        with open_binary(path) as f:
            _skip_bom(f, report)
            if fmt == "jsonl":
                yield from _read_jsonl(f, path, cfg, report)
            elif cfg.separator:
                yield from _read_split_text(f, path, cfg, report)
            else:
                yield from _read_whole_text(f, path, cfg, report)
    except errors as exc:
        if cfg.strict:
            raise BadInputError(f"{path}: unreadable: {exc}") from exc
        report.add("unreadable", path, 0, f"{type(exc).__name__}: {exc}")


def read_documents(inputs: Iterable[str], config: Optional[ReaderConfig] = None,
                   report: Optional[ReadReport] = None) -> Iterator[Document]:
    """Every document of every file named by `inputs` (see expand_inputs), streamed in order."""
    cfg = config or ReaderConfig()
    files = expand_inputs(inputs)
    check_readers_available(files)
    for path in files:
        yield from read_file(path, cfg, report)
