"""Writing a file so that a crash never leaves it half-written: the text goes to `<path>.tmp`, is
flushed to disk, and the temporary file is renamed over `path` (atomic on POSIX). A reader sees the
old file or the new one, never a mix. Also a file's sha256, by which readers tell a damaged file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

TMP_SUFFIX = ".tmp"


def write_text_atomic(path: str, text: str) -> None:
    tmp = path + TMP_SUFFIX
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(path: str) -> None:
    """Make a rename or a deletion in folder `path` durable: until the folder itself is flushed, a
    power loss may bring back the old name (the file's data, already flushed, is not enough). A no-op
    where folders cannot be opened or flushed (Windows, some network file systems): durability there
    is the file system's, and a save must not fail for it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: Any, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def write_folder_atomic(out_dir: str) -> Iterator[str]:
    """A temporary folder beside out_dir to write a folder's files into: when the block ends without an error it
    is renamed to out_dir (an out_dir already there replaced), else deleted, so that out_dir's name only ever holds
    a whole folder, the old one or the new."""
    out_dir = os.path.abspath(out_dir)
    tmp = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        _publish_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_folder(tmp: str, out_dir: str) -> None:
    """Rename the finished folder tmp to out_dir, its files flushed first; an out_dir already there is moved aside
    first and deleted after."""
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(tmp)
    old = None
    if os.path.isdir(out_dir):
        old = f"{tmp}.old"
        # left by a publish of the same pid killed while deleting it: the rename onto it would fail, and out_dir
        # is in place whole, so it is not needed
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)  # the folder that was there stays
        raise
    fsync_dir(os.path.dirname(out_dir))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (a large file is never held whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
