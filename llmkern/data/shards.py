"""Token shards: the files the trainer's loader memory-maps.

Format (version 1), in one output directory:
- `{split}_{index:06d}.bin`: raw little-endian token ids, no header; uint16 when the
  tokenizer's n_vocab <= 65536, else uint32.
- `manifest.json`: {"format": "llmkern-shards", "version": 1, "tokenizer": <spec>,
  "n_vocab": int, "eot_token": int, "dtype": "uint16" | "uint32",
  "splits": {"train": [{"file": ..., "tokens": int, "sha256": hex}, ...], "val": [...]}},
  plus "bos_token": int where the tokenizer has a begin-of-sequence token.

tokenize_documents puts the end-of-text token before every document, so a document starts
right after each EOT (the loader finds document boundaries there). With a tokenizer that has a
begin-of-sequence token (Llama 3's), each document is BOS + its tokens + EOT instead, as that
model's pretraining data, and a document starts at each BOS; the manifest's "bos_token" tells the
loader so.

Every file is written under a temporary name and renamed, so a crash never leaves a
half-written shard or manifest behind a valid name.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
from typing import Iterable, Iterator, Sequence

import numpy as np

from .._atomic import file_sha256, write_json_atomic
FORMAT = "llmkern-shards"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("uint16", "uint32")
_TMP_SUFFIX = ".tmp"


def dtype_for_vocab(n_vocab: int) -> str:
    """The smallest shard dtype that holds every id of an n_vocab-token vocabulary."""
    return "uint16" if n_vocab <= 2**16 else "uint32"


def _check_dtype(dtype: object) -> np.dtype:
    name = np.dtype(dtype).name if isinstance(dtype, (np.dtype, type)) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    # Little-endian on every machine: the files are portable.
    return np.dtype(name).newbyteorder("<")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def _fsync_replace(tmp_path: str, final_path: str) -> None:
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, final_path)


class ShardWriter:
    """Streams tokens of one split into shards of `tokens_per_shard` tokens (the last smaller).

    Memory stays constant: tokens go straight to the open shard file, and its checksum is
    updated as they go.
    """

    def __init__(self, out_dir: str, split: str, dtype: str, tokens_per_shard: int = 100_000_000) -> None:
        if not isinstance(split, str) or not split or "/" in split or os.sep in split:
            raise ValueError(f"split: expected a non-empty name without path separators, got {split!r}")
        if not isinstance(tokens_per_shard, int) or tokens_per_shard <= 0:
            raise ValueError(f"tokens_per_shard: expected a positive int, got {tokens_per_shard!r}")
        self.out_dir = os.fspath(out_dir)
        self.split = split
        self.dtype = _check_dtype(dtype)
        self.tokens_per_shard = tokens_per_shard
        self._max_id = np.iinfo(self.dtype).max
        self._entries: list[dict] = []
        self._file = None
        self._hash = None
        self._count = 0
        self._closed = False
        os.makedirs(self.out_dir, exist_ok=True)

    def _open_next(self) -> None:
        name = shard_name(self.split, len(self._entries))
        self._file = open(os.path.join(self.out_dir, name + _TMP_SUFFIX), "wb")
        self._hash = hashlib.sha256()
        self._count = 0

    def _finish_current(self) -> None:
        if self._file is None:
            return
        name = shard_name(self.split, len(self._entries))
        self._file.close()
        path = os.path.join(self.out_dir, name)
        _fsync_replace(path + _TMP_SUFFIX, path)
        self._entries.append({"file": name, "tokens": self._count, "sha256": self._hash.hexdigest()})
        self._file = None

    def _as_array(self, tokens: np.ndarray | Sequence[int]) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens: expected a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size == 0:
            return arr.astype(self.dtype)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"tokens: expected integer token ids, got dtype {arr.dtype}")
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high > self._max_id:
            raise ValueError(
                f"tokens: ids must lie in [0, {self._max_id}] for dtype {self.dtype.name}, "
                f"got values in [{low}, {high}]"
            )
        return arr.astype(self.dtype, copy=False)

    def write(self, tokens: np.ndarray | Sequence[int]) -> None:
        """Append token ids to the split."""
        if self._closed:
            raise ValueError("ShardWriter.write: the writer is closed")
        arr = self._as_array(tokens)
        while arr.size:
            if self._file is None:
                self._open_next()
            take = min(arr.size, self.tokens_per_shard - self._count)
            data = arr[:take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += take
            arr = arr[take:]
            if self._count == self.tokens_per_shard:
                self._finish_current()

    def close(self) -> list[dict]:
        """Finish the last shard; the manifest entries {"file", "tokens", "sha256"} of the split."""
        if not self._closed:
            self._finish_current()
            self._closed = True
        return list(self._entries)

    def __enter__(self) -> "ShardWriter":
        return self

    def abort(self) -> None:
        """Stop after a failure: delete the unfinished shard (finished ones stay)."""
        if self._file is not None:
            self._file.close()
            os.remove(self._file.name)
            self._file = None
        self._closed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_manifest(
    out_dir: str, tokenizer_spec: str, n_vocab: int, eot_token: int, dtype: str, splits: dict,
    bos_token: int | None = None,
) -> str:
    """Write `out_dir/manifest.json` atomically; returns its path. bos_token: the begin-of-sequence token that
    starts every document, where the tokenizer has one (recorded only then)."""
    dt = _check_dtype(dtype)
    if not isinstance(splits, dict):
        raise TypeError(f"splits: expected a dict split -> list of shard entries, got {type(splits).__name__}")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": tokenizer_spec,
        "n_vocab": int(n_vocab),
        "eot_token": int(eot_token),
        "dtype": dt.name,
        "splits": {name: list(entries) for name, entries in splits.items()},
    }
    if bos_token is not None:
        manifest["bos_token"] = int(bos_token)
    from .tokenizer import is_file_spec, tokenizer_file_sha256

    file_hash = tokenizer_file_sha256(tokenizer_spec) if is_file_spec(tokenizer_spec) else None
    if file_hash is not None:
        # what the tokens were made with, should the file move or change: see tokenizer.same_tokenizer
        manifest["tokenizer_sha256"] = file_hash
    _validate_manifest(manifest, where="write_manifest")
    path = os.path.join(os.fspath(out_dir), MANIFEST)
    write_json_atomic(path, manifest)
    return path


def _validate_manifest(m: object, where: str) -> None:
    def bad(why: str) -> ValueError:
        return ValueError(f"{where}: invalid shard manifest: {why}")

    if not isinstance(m, dict):
        raise bad(f"expected a JSON object, got {type(m).__name__}")
    if m.get("format") != FORMAT:
        raise bad(f"format: expected {FORMAT!r}, got {m.get('format')!r}")
    if m.get("version") != VERSION:
        raise bad(f"version: expected {VERSION}, got {m.get('version')!r}")
    for key, typ in (("tokenizer", str), ("n_vocab", int), ("eot_token", int), ("dtype", str), ("splits", dict)):
        if not isinstance(m.get(key), typ):
            raise bad(f"{key}: expected {typ.__name__}, got {m.get(key)!r}")
    if "bos_token" in m and (isinstance(m["bos_token"], bool) or not isinstance(m["bos_token"], int)):
        raise bad(f"bos_token: expected int, got {m['bos_token']!r}")
    if m["dtype"] not in DTYPES:
        raise bad(f"dtype: expected one of {DTYPES}, got {m['dtype']!r}")
    if m["n_vocab"] > 2**16 and m["dtype"] == "uint16":
        raise bad(f"dtype uint16 cannot hold a vocabulary of {m['n_vocab']} tokens")
    for split, entries in m["splits"].items():
        if not isinstance(entries, list):
            raise bad(f"splits[{split!r}]: expected a list of shard entries")
        for e in entries:
            if not (
                isinstance(e, dict)
                and isinstance(e.get("file"), str)
                and isinstance(e.get("tokens"), int)
                and isinstance(e.get("sha256"), str)
            ):
                expected = "{'file': str, 'tokens': int, 'sha256': str}"
                raise bad(f"splits[{split!r}]: expected entries {expected}, got {e!r}")


def load_manifest(directory: str) -> dict:
    """Read and check `directory/manifest.json`."""
    path = os.path.join(os.fspath(directory), MANIFEST)
    if not os.path.isfile(path):
        inside = os.path.join(os.fspath(directory), "tokens")
        if os.path.isfile(os.path.join(inside, MANIFEST)):  # `data prepare`'s output folder, not its shards
            raise FileNotFoundError(f"no shard manifest at {path}: {directory!r} is a `data prepare` output; its "
                                    f"token shards are in {inside!r}")
        raise FileNotFoundError(f"no shard manifest at {path} (is {directory!r} a tokenized-shard directory?)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt shard manifest {path}: {err}") from err
    _validate_manifest(manifest, where=path)
    return manifest


def open_split(directory: str, split: str) -> list[np.memmap]:
    """Read-only memory maps of every shard of `split`, in order."""
    manifest = load_manifest(directory)
    if split not in manifest["splits"]:
        raise KeyError(f"split: {split!r} is not in {directory}; it has {sorted(manifest['splits'])}")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    maps = []
    for entry in manifest["splits"][split]:
        path = os.path.join(os.fspath(directory), entry["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
        expected = entry["tokens"] * dtype.itemsize
        size = os.path.getsize(path)
        if size != expected:
            raise ValueError(f"shard {path}: expected {expected} bytes ({entry['tokens']} tokens), found {size}")
        maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(entry["tokens"],)))
    return maps




def verify(directory: str) -> dict[str, int]:
    """Check every shard's size and checksum against the manifest; tokens per split.

    Raises ValueError listing every shard that is missing or differs.
    """
    manifest = load_manifest(directory)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    problems = []
    totals = {}
    for split, entries in manifest["splits"].items():
        totals[split] = 0
        for entry in entries:
            path = os.path.join(os.fspath(directory), entry["file"])
            if not os.path.isfile(path):
                problems.append(f"{entry['file']}: missing")
            elif os.path.getsize(path) != entry["tokens"] * itemsize:
                size, expected = os.path.getsize(path), entry["tokens"] * itemsize
                problems.append(f"{entry['file']}: {size} bytes, expected {expected}")
            elif file_sha256(path) != entry["sha256"]:
                problems.append(f"{entry['file']}: sha256 differs from the manifest")
            totals[split] += entry["tokens"]
    if problems:
        raise ValueError(f"shards in {directory} fail verification: " + "; ".join(problems))
    return totals


# --- tokenizing documents into shards -------------------------------------------------------


def _seed_salt(seed: int) -> bytes:
    # blake2b's salt holds at most 16 bytes; another seed gives another split.
    return int(seed).to_bytes(16, "little", signed=False)


def hash_rank(text: str, seed: int = 0) -> int:
    """A document's place in the split order: a 64-bit hash of its text and `seed`."""
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed!r}")
    data = text.encode("utf-8", errors="surrogatepass")
    digest = hashlib.blake2b(data, digest_size=8, salt=_seed_salt(seed)).digest()
    return int.from_bytes(digest, "little")


def is_val_document(text: str, val_fraction: float, seed: int) -> bool:
    """Deterministic split by content: identical documents always land in the same split.

    (tokenize_documents also moves the lowest-ranked documents to val when this picks none.)"""
    if val_fraction <= 0:
        return False
    return hash_rank(text, seed) < val_fraction * 2**64


def _tokenize_batch(args: tuple[str, list[str], float, int]) -> tuple[np.ndarray, np.ndarray, int, int, tuple]:
    """Tokens of a batch of documents, EOT before each (BOS before and EOT after each, with a tokenizer that
    has a BOS): (train ids, val ids, train docs, val docs, lowest) where lowest = (rank, [(start, length) in
    train ids, ...]) of the train documents of the lowest hash rank in the batch (several when identical);
    None when none or val_fraction is 0."""
    from .tokenizer import get_tokenizer

    spec, docs, val_fraction, seed = args
    tok = get_tokenizer(spec)
    bos = tok.bos_token
    encoded = tok.encode_batch(docs, num_threads=1)
    flat: dict[bool, list[int]] = {False: [], True: []}  # is_val -> ids
    docs_in: dict[bool, int] = {False: 0, True: 0}
    lowest = None
    for text, ids in zip(docs, encoded):
        split = is_val_document(text, val_fraction, seed)
        if not split and val_fraction > 0:
            rank = hash_rank(text, seed)
            place = (len(flat[False]), len(ids) + (1 if bos is None else 2))
            if lowest is None or rank < lowest[0]:
                lowest = (rank, [place])
            elif rank == lowest[0]:
                lowest[1].append(place)
        # list.append and extend, then one np.array: the fastest way out of Python ints
        if bos is None:
            flat[split].append(tok.eot_token)
            flat[split].extend(ids)
        else:
            flat[split].append(bos)
            flat[split].extend(ids)
            flat[split].append(tok.eot_token)
        docs_in[split] += 1
    dtype = dtype_for_vocab(tok.n_vocab)
    return (np.array(flat[False], dtype=dtype), np.array(flat[True], dtype=dtype), docs_in[False], docs_in[True],
            lowest)


def _read_tokens(directory: str, entries: list[dict], dtype: np.dtype, chunk: int = 1 << 24) -> Iterator[np.ndarray]:
    """The tokens of a split's shards, in order, in pieces of at most `chunk` tokens."""
    for entry in entries:
        with open(os.path.join(directory, entry["file"]), "rb") as f:
            while (piece := np.fromfile(f, dtype=dtype, count=chunk)).size:
                yield piece


def _move_to_val(out_dir: str, train_entries: list[dict], places: list[tuple[int, int]], dtype: str,
                 tokens_per_shard: int, val: "ShardWriter") -> list[dict]:
    """Move the token ranges `places` (start, length; sorted, disjoint) of the written train split
    to `val`; the entries of the train split rewritten without them."""
    dt = _check_dtype(dtype)
    for start, length in places:  # the val tokens first, read from the train shards
        offset = start
        for entry in train_entries:
            if offset < entry["tokens"]:
                take = min(length, entry["tokens"] - offset)
                with open(os.path.join(out_dir, entry["file"]), "rb") as f:
                    f.seek(offset * dt.itemsize)
                    val.write(np.fromfile(f, dtype=dt, count=take))
                length -= take
                offset = 0
                if not length:
                    break
            else:
                offset -= entry["tokens"]
    # The train split again without those ranges, written aside, then renamed over the old shards.
    aside = os.path.join(out_dir, ".train-rewrite" + _TMP_SUFFIX)
    os.makedirs(aside, exist_ok=True)
    try:
        with ShardWriter(aside, "train", dtype, tokens_per_shard) as train:
            position = 0
            cuts = list(places)
            for piece in _read_tokens(out_dir, train_entries, dt):
                end = position + piece.size
                keep_from = 0
                while cuts and cuts[0][0] < end:
                    start, length = cuts[0]
                    train.write(piece[keep_from:max(start - position, keep_from)])
                    keep_from = max(keep_from, min(start + length - position, piece.size))
                    if start + length > end:  # the range goes on in the next piece
                        break
                    cuts.pop(0)
                train.write(piece[keep_from:])
                position = end
        entries = train.close()
        for entry in entries:
            os.replace(os.path.join(aside, entry["file"]), os.path.join(out_dir, entry["file"]))
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return entries


def _batches(docs: Iterable[str], batch_size: int) -> Iterator[list[str]]:
    it = iter(docs)
    while batch := list(itertools.islice(it, batch_size)):
        for d in batch:
            if not isinstance(d, str):
                raise TypeError(f"docs: expected an iterable of str, got an item of type {type(d).__name__}")
        yield batch


def _resolve_tokenizer(tokenizer) -> tuple[object, str]:
    """(the tokenizer, its spec): the spec is what the worker processes and the manifest name it by."""
    from .tokenizer import get_tokenizer

    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    spec = getattr(tok, "spec", None)
    if not isinstance(spec, str):
        raise TypeError(f"tokenizer: expected a spec str or a tokenizer from get_tokenizer(), got {tokenizer!r}")
    return tok, spec


def _check_tokenize_arguments(val_fraction: float, num_workers: int, batch_size: int, seed: int) -> None:
    """Reject bad arguments before anything is written to the output directory."""
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction: expected a number in [0, 1), got {val_fraction!r}")
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers: expected an int >= 1, got {num_workers!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed!r}")


def _start_tokenizing(jobs: Iterator[tuple],
                      num_workers: int) -> tuple[multiprocessing.pool.Pool | None, Iterator[tuple]]:
    """(the worker pool, None when tokenizing in this process; the results of `jobs`, in their order)."""
    if num_workers > 1:
        # fork: the workers start at once, without importing torch again.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(num_workers)
        return pool, pool.imap(_tokenize_batch, jobs, chunksize=1)  # ordered: deterministic output
    return None, map(_tokenize_batch, jobs)


def _progress_bar(progress: bool):
    """A tqdm bar counting the documents tokenized; None without progress."""
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(unit="doc", desc="tokenizing")


class _Tally:
    """What the shards hold so far: train tokens, documents per split, and the lowest-ranked train documents."""

    def __init__(self) -> None:
        self.train_tokens = self.docs_train = self.docs_val = 0
        # (rank, [(start, length) in the train split, ...]) of the lowest-ranked train docs (several when identical)
        self.lowest: tuple | None = None

    def add(self, train_tokens: int, n_train: int, n_val: int, batch_lowest: tuple | None) -> None:
        """Count a batch (its `lowest` as _tokenize_batch gives it) that follows the tokens counted so far."""
        if batch_lowest is not None and (self.lowest is None or batch_lowest[0] <= self.lowest[0]):
            # the batch's places start at its first train token: shift them to the split's
            places = [(self.train_tokens + start, length) for start, length in batch_lowest[1]]
            ties = self.lowest[1] if self.lowest and self.lowest[0] == batch_lowest[0] else []
            self.lowest = (batch_lowest[0], ties + places)
        self.train_tokens += train_tokens
        self.docs_train += n_train
        self.docs_val += n_val


def _write_batches(results: Iterable[tuple], writers: dict[str, ShardWriter], bar) -> _Tally:
    """Write each tokenized batch to its splits' shards, in order; what they hold then."""
    tally = _Tally()
    for train_ids, val_ids, n_train, n_val, batch_lowest in results:
        writers["train"].write(train_ids)
        writers["val"].write(val_ids)
        tally.add(train_ids.size, n_train, n_val, batch_lowest)
        if bar is not None:
            bar.update(n_train + n_val)
    return tally


def _val_needs_a_document(tally: _Tally, val_fraction: float) -> bool:
    """No document hashed into val (a small corpus) though val was asked for, and train can spare one."""
    return (tally.docs_val == 0 and val_fraction > 0 and tally.lowest is not None
            and tally.docs_train > len(tally.lowest[1]))


def _move_lowest_to_val(out_dir: str, splits: dict, places: list[tuple[int, int]], dtype: str,
                        tokens_per_shard: int) -> None:
    """Move the train documents at `places` (the lowest-ranked one and its identical copies) to the empty
    val split; update `splits` to match."""
    with ShardWriter(out_dir, "val", dtype, tokens_per_shard) as val_writer:
        splits["train"] = _move_to_val(out_dir, splits["train"], places, dtype, tokens_per_shard, val_writer)
    splits["val"] = val_writer.close()


def tokenize_documents(
    docs: Iterable[str],
    tokenizer,
    out_dir: str,
    val_fraction: float = 0.001,
    num_workers: int = 1,
    seed: int = 0,
    tokens_per_shard: int = 100_000_000,
    batch_size: int = 256,
    progress: bool = False,
) -> dict:
    """Tokenize `docs` into train/val shards plus a manifest in `out_dir`; returns the manifest.

    `tokenizer` is an object from get_tokenizer() (or a spec string). Each document goes wholly
    to val with probability `val_fraction`, decided by a hash of its text and `seed`; when that
    puts no document in val (a small corpus) and val_fraction > 0, the document of the lowest
    hash rank (with any identical copies) moves there, as long as train keeps a document. With
    num_workers > 1 the batches are tokenized in that many processes; the output is the same
    as with one.
    """
    tok, spec = _resolve_tokenizer(tokenizer)
    _check_tokenize_arguments(val_fraction, num_workers, batch_size, seed)
    dtype = dtype_for_vocab(tok.n_vocab)
    # The shards about to be written replace those an earlier run's manifest lists: without that
    # manifest a run cut short leaves a directory the loader refuses, never old checksums over new shards.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(os.fspath(out_dir), MANIFEST))
    writers = {name: ShardWriter(out_dir, name, dtype, tokens_per_shard) for name in ("train", "val")}
    jobs = ((spec, batch, float(val_fraction), seed) for batch in _batches(docs, batch_size))
    pool, results = _start_tokenizing(jobs, num_workers)
    bar = _progress_bar(progress)
    try:
        tally = _write_batches(results, writers, bar)
        splits = {name: w.close() for name, w in writers.items()}
        # The rank, like the hash split, depends on the texts alone, so the document moved is the
        # same for any num_workers or batch_size.
        if _val_needs_a_document(tally, val_fraction):
            _move_lowest_to_val(out_dir, splits, tally.lowest[1], dtype, tokens_per_shard)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    write_manifest(out_dir, spec, tok.n_vocab, tok.eot_token, dtype, splits, tok.bos_token)
    _remove_stale_shards(out_dir, splits)
    return load_manifest(out_dir)


def _remove_stale_shards(out_dir: str, splits: dict) -> None:
    """Delete shards a previous, longer run left in out_dir (the manifest no longer lists them), and
    the unfinished shards (.bin.tmp) of a run killed too hard to abort its writers."""
    listed = {e["file"] for entries in splits.values() for e in entries}
    for name in os.listdir(out_dir):
        unfinished = name.endswith(".bin" + _TMP_SUFFIX)
        shard = name.removesuffix(_TMP_SUFFIX) if unfinished else name
        split, _, index = shard.removesuffix(".bin").rpartition("_")
        if not (shard.endswith(".bin") and split in splits and len(index) == 6 and index.isdigit()):
            continue
        if unfinished or name not in listed:
            os.remove(os.path.join(out_dir, name))
