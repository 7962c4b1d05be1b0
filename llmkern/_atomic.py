"""Writing a file so that a crash never leaves it half-written: the text goes to `<path>.tmp`, is
flushed to disk, and the temporary file is renamed over `path` (atomic on POSIX). A reader sees the
old file or the new one, never a mix."""

from __future__ import annotations

import json
import os
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
