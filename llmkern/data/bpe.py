"""Train a byte-level BPE tokenizer; the result is a .tiktoken file that tiktoken encodes with.

Steps: split the corpus on the special tokens (they are never learned from), pre-tokenize each
piece with a GPT-style pattern and count the distinct words (GPT-2's pattern: hand-written in
C++, llmkern._cpu.Gpt2WordCounter, threads; any other: the `regex` package, processes), then
learn the merges in C++ (llmkern._cpu.bpe_train, incremental pair counts).

Output: `out_path` holds "base64(token) rank" lines. Ranks 0..255 are the single bytes in the
order GPT-2's and OpenAI's byte-level files use (printable bytes first), the merged tokens
follow in the order they were learned, so tiktoken's lowest-rank-first merging replays the
training. A sidecar `out_path + ".json"` records the split pattern and the special tokens
(ids right after the last merge), which get_tokenizer(out_path) reads back.
"""

from __future__ import annotations

import base64
import collections
import functools
import hashlib
import io
import multiprocessing
import os
import re
import warnings
from typing import Iterable, Iterator

from .. import _atomic
from .._atomic import write_json_atomic, write_text_atomic
from .readers import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    TEXT_SUFFIXES,
    ReadReport,
    check_readers_available,
    expand_inputs,
    file_format,
    open_binary,
    read_errors,
    read_file,
)
from .tokenizer import ENDOFTEXT, GPT2_PATTERN, get_tokenizer, sidecar_path

# cl100k_base's pre-tokenization (case-insensitive contractions, digits in groups of 3).
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN}

_CHUNK_CHARS = 8 << 20  # text per pre-tokenization job


def gpt2_byte_order() -> list[int]:
    """The 256 bytes in the rank order of GPT-2's byte-level BPE: printable bytes, then the rest."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in set(printable)]
    return printable + rest


# --- reading the corpus in chunks -----------------------------------------------------------


# A newline between two non-whitespace characters ends the piece before it and is no part of the
# piece after it under GPT-style patterns (a longer whitespace run is not: at the end of a part it
# would stay whole), so cutting the text just after it splits it exactly as splitting it whole would.
# Any non-whitespace, not only printable ASCII: a line of Chinese ends in "。", and with ASCII only
# a Chinese (Japanese, Russian, ...) file had no cut at all and was read whole, searched again and
# again as it grew.
# A Windows line end (\r\n) between non-whitespace is split differently by the two patterns: GPT-2's makes
# "\r" and "\n" two pieces, but one "\r\n" at the end of a text (or before a special token), so the cut
# goes before it; cl100k's makes one "\r\n" piece (or ends a punctuation piece with it), so the cut goes
# after it. Other patterns get no CRLF cut: such files are read whole, as before.
_CRLF_CUT = {"gpt2": r"(?<=\S)(?=\r\n\S)", "cl100k": r"(?<=\S\r\n)(?=\S)"}
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def _safe_cut_for(pattern: str) -> re.Pattern:
    """The places a text may be cut under `pattern` (a regular expression) with the same pieces as whole."""
    name = next((n for n, p in PATTERNS.items() if p == pattern), None)
    return re.compile(f"{_SAFE_CUT.pattern}|{_CRLF_CUT[name]}") if name in _CRLF_CUT else _SAFE_CUT


def _last_safe_cut(text: str, floor: int = 0, safe_cut: re.Pattern = _SAFE_CUT) -> int:
    """The index of the last safe cut (just after a newline between non-whitespace characters, and
    the pattern's Windows line ends), or 0 when there is none at or after `floor` (text before it is
    known to hold none)."""
    start = max(floor, len(text) - 65536)
    while True:
        cuts = [m.end() for m in safe_cut.finditer(text, start)]
        if cuts or start == floor:
            return cuts[-1] if cuts else 0
        start = max(floor, start - 4 * (len(text) - start))


def _file_chunks(path: str | os.PathLike, pattern: str = GPT2_PATTERN) -> Iterator[str]:
    """Text of one text file (plain, .gz or .zst) in pieces of about _CHUNK_CHARS, cut only where a piece
    of `pattern` ends anyway."""
    safe_cut = _safe_cut_for(pattern)
    # utf-8-sig: a byte order mark (Windows tools write one) is no text; the readers drop it from documents.
    # The readers' opener: .gz and .zst are decompressed as they are read, never held whole.
    with io.TextIOWrapper(open_binary(os.fspath(path)), encoding="utf-8-sig", errors="replace", newline="") as f:
        carry = ""
        while block := f.read(_CHUNK_CHARS):
            floor = max(0, len(carry) - 2)  # the carry holds no cut (a cut needs the two characters before it)
            block = carry + block
            cut = _last_safe_cut(block, floor, safe_cut)
            if cut == 0:  # no safe place yet (one very long line): keep reading
                carry = block
                continue
            carry = block[cut:]
            yield block[:cut]
        if carry:
            yield carry


def _corpus_files(corpus: str | os.PathLike | list) -> list[str]:
    """The files the data pipeline would read for these paths (readers.expand_inputs): in a folder only
    files of a format the readers know, hidden ones skipped (a folder's .git internals, a binary file,
    were read as text before); a file named explicitly must be of such a format."""
    paths = [os.fspath(p) for p in ([corpus] if isinstance(corpus, (str, os.PathLike)) else corpus)]
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"corpus: no file or directory at {p!r}")
        if not os.path.isdir(p) and file_format(p) is None:
            raise ValueError(
                f"corpus: {p!r} is no format the data readers read: expected one of "
                f"{TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES} (text and JSONL optionally + .gz/.zst)"
            )
    files = expand_inputs(paths)
    check_readers_available(files)  # a missing zstandard / pyarrow fails now, not after some of the files
    return files


def _corpus_texts(files: list[str], pattern: str) -> Iterator[str]:
    """The texts of `files` as the data pipeline reads them: JSONL and Parquet files document by document
    (the text field); text files (plain or compressed) in chunks (_file_chunks), not as the one document
    a .txt file is to the readers, which would hold a big file whole (or skip it, over max_document_bytes).
    Bad input is skipped as the pipeline skips it, and counted in a warning at the end."""
    report = ReadReport()
    for path in files:
        if file_format(path) == "text":
            try:
                yield from _file_chunks(path, pattern)
            except read_errors("text") as err:  # a truncated .gz: what was read before is kept, as the readers do
                report.add("unreadable", path, 0, f"{type(err).__name__}: {err}")
        else:
            yield from (doc.text for doc in read_file(path, report=report))
    if report.counts:
        first = {kind: shown[0] for kind, shown in report.examples.items() if shown}
        warnings.warn(f"corpus: bad input skipped while reading, by kind: {dict(report.counts)}; the first of each: "
                      f"{first}", stacklevel=2)


def _as_the_tokenizer_reads(text: str) -> str:
    """`text` as tiktoken encodes it: a Python str may hold surrogates (no UTF-8 text can), which tiktoken
    reads through UTF-16, so a pair becomes its character and a lone one U+FFFD. Counted as they are,
    training learned merges of bytes the tokenizer never sees."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _corpus_jobs(corpus, pattern: str = GPT2_PATTERN) -> Iterator[list[str]]:
    """Lists of texts of about _CHUNK_CHARS characters in all (files cut where `pattern` ends a piece)."""
    if isinstance(corpus, (str, os.PathLike)) or (
        isinstance(corpus, (list, tuple)) and corpus and all(isinstance(p, os.PathLike) for p in corpus)
    ):
        texts: Iterable[str] = _corpus_texts(_corpus_files(corpus), pattern)
    else:  # only texts given as str may hold surrogates: the readers make bad UTF-8 and JSON's "\ud800" U+FFFD
        texts = (_as_the_tokenizer_reads(text) if isinstance(text, str) else text for text in corpus)
    job: list[str] = []
    size = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"corpus: expected texts (str), got an item of type {type(text).__name__}")
        job.append(text)
        size += len(text)
        if size >= _CHUNK_CHARS:
            yield job
            job, size = [], 0
    if job:
        yield job


# --- pre-tokenization -----------------------------------------------------------------------


def _special_regex(special_tokens: tuple[str, ...]):
    """One regular expression of the special tokens, the longest first: an alternation takes the first that
    matches, so with "<|end" listed before "<|endoftext|>" the longer one was cut short, its rest ("oftext",
    "|>") counted as text, and the words depended on the order the tokens were given in."""
    import regex

    return regex.compile("|".join(regex.escape(s) for s in sorted(special_tokens, key=len, reverse=True)))


def _count_words(args: tuple[list[str], str, tuple[str, ...]]) -> collections.Counter:
    import regex

    texts, pattern, special_tokens = args
    word = regex.compile(pattern)
    special = _special_regex(special_tokens) if special_tokens else None
    counts: collections.Counter = collections.Counter()
    for text in texts:
        for piece in special.split(text) if special else (text,):
            counts.update(word.findall(piece))
    return counts


@functools.lru_cache(maxsize=1)
def gpt2_char_classes() -> bytes:
    """Per code point 0..0x10FFFF a bit set: 1 = \\p{L}, 2 = \\p{N}, 4 = \\s, as `regex` decides."""
    import numpy as np
    import regex

    code_points = np.arange(0x110000, dtype="<u4")
    code_points = code_points[(code_points < 0xD800) | (code_points >= 0xE000)]  # no surrogates
    every_char = code_points.tobytes().decode("utf-32-le")
    table = np.zeros(0x110000, dtype=np.uint8)
    for bit, cls in ((1, r"\p{L}"), (2, r"\p{N}"), (4, r"\s")):
        members = regex.sub(rf"[^{cls}]+", "", every_char)
        table[np.frombuffer(members.encode("utf-32-le"), dtype="<u4")] |= bit
    return table.tobytes()


def _split_on_specials(texts: list[str], special_tokens: tuple[str, ...]) -> list[str]:
    if not special_tokens:
        return texts
    special = _special_regex(special_tokens)
    pieces = []
    for text in texts:
        pieces.extend(special.split(text) if any(s in text for s in special_tokens) else (text,))
    return pieces


def _count_words_cpp(corpus, special_tokens: tuple[str, ...], num_threads: int, bar) -> collections.Counter:
    """GPT-2's pattern only: the split and the counting in C++ threads, without the GIL."""
    from .. import _cpu

    counter = _cpu.Gpt2WordCounter(gpt2_char_classes())
    for texts in _corpus_jobs(corpus):
        pieces = _split_on_specials(texts, special_tokens)
        # surrogatepass: a lone surrogate stays one (unclassified) character, as in `regex`.
        counter.add([p.encode("utf-8", errors="surrogatepass") for p in pieces], num_threads)
        if bar is not None:
            bar.update(sum(map(len, texts)))
    words, counts = counter.words()
    return collections.Counter(dict(zip((w.decode("utf-8", errors="surrogatepass") for w in words), counts)))


def count_words(
    corpus,
    pattern: str = GPT2_PATTERN,
    special_tokens: tuple[str, ...] = (),
    num_workers: int = 1,
    progress: bool = False,
) -> collections.Counter:
    """Pre-tokenized words of the corpus (special tokens cut out) and how often each occurs.

    GPT-2's pattern is split in C++ (num_workers threads); any other pattern with the
    `regex` package (num_workers processes).
    """
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="pre-tokenizing", unit=" chars", unit_scale=True)
    if pattern == GPT2_PATTERN:
        try:
            return _count_words_cpp(corpus, tuple(special_tokens), num_workers, bar)
        finally:
            if bar is not None:
                bar.close()
    jobs = ((texts, pattern, tuple(special_tokens)) for texts in _corpus_jobs(corpus, pattern))
    total: collections.Counter = collections.Counter()
    pool = None
    if num_workers > 1:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(num_workers)
        results = pool.imap_unordered(_count_words, jobs)
    else:
        results = map(_count_words, jobs)
    try:
        for counts in results:
            total.update(counts)
            if bar is not None:
                bar.update(sum(len(word) * n for word, n in counts.items()))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    return total


# --- training -------------------------------------------------------------------------------


def _resolve_pattern(pattern: str) -> str:
    pattern = PATTERNS.get(pattern, pattern)
    import regex

    try:
        regex.compile(pattern)
    except regex.error as err:
        raise ValueError(f"pattern: not a valid regular expression ({err}): {pattern!r}") from err
    return pattern


def _check_out_path(out_path) -> str:
    """`out_path` as a str, its folder created and found writable: before training, not after."""
    if not isinstance(out_path, (str, os.PathLike)):
        raise TypeError(f"out_path: expected a path (str or PathLike), got {type(out_path).__name__}")
    out_path = os.fspath(out_path)
    if not out_path or os.path.isdir(out_path):
        raise ValueError(f"out_path: expected the path of a .tiktoken file to write, got the folder {out_path!r}")
    folder = os.path.dirname(os.path.abspath(out_path))
    try:
        os.makedirs(folder, exist_ok=True)
        probe = out_path + _atomic.TMP_SUFFIX  # the name the atomic writer will use
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as err:
        raise type(err)(f"out_path: cannot write {out_path!r} ({err.strerror or err})") from err
    return out_path


def train_bpe(
    corpus,
    vocab_size: int,
    out_path: str | os.PathLike,
    special_tokens: tuple[str, ...] = (ENDOFTEXT,),
    pattern: str = "gpt2",
    min_frequency: int = 1,
    num_workers: int | None = None,
    progress: bool = False,
):
    """Train a byte-level BPE of `vocab_size` tokens (bytes + merges + special tokens).

    corpus: a file or directory path (str or PathLike), a list of pathlib.Path, or an
    iterable of texts. Files are read as the data pipeline reads its inputs (readers.py): text,
    JSONL (the "text" field) and Parquet files, plain or .gz/.zst; a folder's hidden files and
    files of other formats are skipped, and named explicitly they are a ValueError. pattern:
    "gpt2", "cl100k", or a regular expression (`regex` syntax, which tiktoken must also accept).
    Training stops early when no pair occurs `min_frequency` times, so a small corpus may give
    fewer tokens. progress: a progress bar while pre-tokenizing. Returns the tokenizer (get_tokenizer(out_path)).
    """
    from .. import _cpu

    special_tokens = tuple(special_tokens)
    if ENDOFTEXT not in special_tokens:
        raise ValueError(
            f"special_tokens: must include {ENDOFTEXT!r} (llmkern separates documents with it), got {special_tokens!r}"
        )
    if len(set(special_tokens)) != len(special_tokens) or not all(isinstance(s, str) and s for s in special_tokens):
        raise ValueError(f"special_tokens: expected distinct non-empty strings, got {special_tokens!r}")
    # bool is an int subclass: min_frequency=True or num_workers=True would pass as 1
    ints = {"vocab_size": vocab_size, "min_frequency": min_frequency}
    if num_workers is not None:
        ints["num_workers"] = num_workers
    for name, value in ints.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}: expected an int, got {value!r} of type {type(value).__name__}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size: expected an int >= {256 + len(special_tokens)} (bytes + special tokens), got {vocab_size!r}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency: expected an int >= 1, got {min_frequency!r}")
    if num_workers is not None and num_workers < 0:  # 0 (as None) means the default
        raise ValueError(f"num_workers: expected an int >= 0 or None, got {num_workers!r}")
    pattern = _resolve_pattern(pattern)
    out_path = _check_out_path(out_path)
    num_workers = num_workers or min(os.cpu_count() or 1, 8)

    counts = count_words(corpus, pattern, special_tokens, num_workers, progress)
    if not counts:  # else a tokenizer of bytes alone is written as if it were trained
        raise ValueError("corpus: holds no text to learn merges from (empty files, an empty folder or no texts)")
    if progress:
        print(f"learning {vocab_size - 256 - len(special_tokens)} merges from {len(counts)} distinct words")
    words = [w.encode("utf-8") for w in counts]  # no surrogates: _corpus_jobs read them as tiktoken does
    merges = _cpu.bpe_train(words, list(counts.values()), vocab_size - 256 - len(special_tokens), min_frequency)

    # ids from bpe_train: 0..255 are bytes, new tokens count up from 256 in the order learned.
    token_bytes = [bytes([b]) for b in range(256)]
    for left, right, merged, _ in merges:
        if merged == len(token_bytes):
            token_bytes.append(token_bytes[left] + token_bytes[right])
    ranks = {bytes([b]): rank for rank, b in enumerate(gpt2_byte_order())}
    ranks.update({tok: i for i, tok in enumerate(token_bytes) if i >= 256})

    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in by_rank]
    special = {tok: len(ranks) + i for i, tok in enumerate(special_tokens)}
    text = "".join(lines)
    # Each file is replaced atomically (written aside, then renamed), but not the two as a pair: the
    # sidecar names the .tiktoken contents it belongs to, so that a crash between the two renames
    # (a new sidecar beside old ranks) is an error when the pair is loaded, not wrong special ids.
    meta = {"pattern": pattern, "special_tokens": special, "trained_by": "llmkern.data.bpe.train_bpe",
            "tiktoken_sha256": hashlib.sha256(text.encode("ascii")).hexdigest()}
    write_json_atomic(sidecar_path(out_path), meta)
    write_text_atomic(out_path, text)
    return get_tokenizer(out_path)
