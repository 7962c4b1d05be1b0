"""Batches of next-token windows from memory-mapped token shards.

A split's shards (llmkern/data/shards.py: the format, open_split) are memory-mapped, never read whole.
The loader yields (x, y) int64 tensors of shape (B, T), y = x shifted by one token.

Windows form one global stream, the same for every rank: global window i is decided by the seed
(random mode) or by its place in the data (sequential mode) alone. Rank r of W takes windows
r, r + W, r + 2W, ... of each global batch of B * W windows, so the ranks see disjoint windows and
together see exactly what a single process with W times the batch would see. The position is one
integer (global windows taken), so state_dict() / load_state_dict() resume exactly.

random:     each window starts at a uniformly drawn token of the split (within one shard), drawn
            from a generator seeded by (seed, block of windows): reproducible and seekable.
sequential: consecutive windows stride T tokens through the shards in manifest order, wrapping
            around at the end (an epoch); for evaluation and for one-pass training.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from .shards import load_manifest, open_split

MODES = ("random", "sequential")
RANDOM_BLOCK = 4096  # random windows drawn per seeded generator


class TokenLoader:
    """Batches (x, y) of shape (batch_size, seq_len) from one split of a shard folder.

    Args:
        data_dir: folder with manifest.json and the shard files.
        split: "train" or "val" (any split the manifest lists).
        batch_size: windows per batch on this rank (the micro batch).
        seq_len: tokens per window T.
        mode: "random" or "sequential".
        seed: decides the random windows.
        rank, world_size: this process's share of the global stream (DDP).
        device: where the batches go; on a GPU they are pinned and copied non-blocking.
        document_ids: also return, per token of x, the index of its document within the row
            (an eot token starts each document; a bos token, in shards whose manifest names one), for
            document-masked attention.
    """

    def __init__(self, data_dir: str, split: str, batch_size: int, seq_len: int, *, mode: str = "random",
                 seed: int = 0, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 document_ids: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        # bool is an int subclass: batch_size=True would be a batch of one, seed=True the stream of seed 1
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size),
                            ("rank", rank), ("seed", seed)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        if seed < 0:  # numpy's generator refuses it only at the first batch, naming no argument
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if not isinstance(document_ids, bool):  # any truthy value (the string "false") turned them on
            raise TypeError(f"document_ids must be a bool, got {document_ids!r} of type {type(document_ids).__name__}")
        manifest = load_manifest(data_dir)
        if not manifest["splits"].get(split):
            raise ValueError(f"split {split!r} has no shards in {data_dir!r}; it has {sorted(manifest['splits'])}")
        self.data_dir, self.split, self.mode = data_dir, split, mode
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.document_ids = document_ids
        self.eot_token = int(manifest["eot_token"])
        self.bos_token = manifest.get("bos_token")  # in shards of a tokenizer with one: it starts each document
        self.n_vocab = int(manifest["n_vocab"])
        self.shards_sha256 = _shards_sha256(manifest["splits"][split])
        self.shards = [s for s in open_split(data_dir, split) if len(s) > seq_len]  # a window needs seq_len + 1 tokens
        if not self.shards:
            raise ValueError(f"split {split!r} of {data_dir!r} has no shard of at least seq_len + 1 = {seq_len + 1} "
                             f"tokens (one window)")
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        # random: number of start positions per shard; sequential: number of T-strided windows per shard
        self._random_cum = np.cumsum(lengths - seq_len)
        self._sequential_cum = np.cumsum((lengths - 1) // seq_len)
        self.position = 0  # global windows taken so far, by all ranks together

    @property
    def num_tokens(self) -> int:
        return int(sum(len(s) for s in self.shards))

    @property
    def windows_per_epoch(self) -> int:
        """Sequential mode: the number of distinct windows in the split (across all ranks)."""
        return int(self._sequential_cum[-1])

    @property
    def batches_per_epoch(self) -> int:
        """Sequential mode: how many batches (of every rank together) the split holds before the loader
        wraps around to windows it has given already."""
        return self.windows_per_epoch // (self.batch_size * self.world_size)

    def _window_starts(self, first: int, count: int) -> list[tuple[int, int]]:
        """(shard, start) of global windows first .. first + count - 1."""
        index = np.arange(first, first + count, dtype=np.int64)
        if self.mode == "random":
            # window i is drawn by the generator of its block (seed, i // RANDOM_BLOCK): any window
            # can be found without replaying the ones before it
            flat = np.empty(count, dtype=np.int64)
            for block in np.unique(index // RANDOM_BLOCK):
                draws = np.random.default_rng([self.seed, int(block)]).integers(0, self._random_cum[-1], RANDOM_BLOCK)
                mine = index // RANDOM_BLOCK == block
                flat[mine] = draws[index[mine] % RANDOM_BLOCK]
            cum = self._random_cum
            shard = np.searchsorted(cum, flat, side="right")
            start = flat - np.concatenate(([0], cum[:-1]))[shard]
        else:
            cum = self._sequential_cum
            flat = index % cum[-1]
            shard = np.searchsorted(cum, flat, side="right")
            start = (flat - np.concatenate(([0], cum[:-1]))[shard]) * self.seq_len
        return list(zip(shard.tolist(), start.tolist()))

    def next_batch(self):
        """(x, y), int64 (B, T) on the loader's device; (x, y, doc_ids) with document_ids=True."""
        global_batch = self.batch_size * self.world_size
        starts = self._window_starts(self.position, global_batch)[self.rank::self.world_size]
        self.position += global_batch
        T = self.seq_len
        windows = np.stack([np.asarray(self.shards[s][i:i + T + 1]) for s, i in starts]).astype(np.int64)
        tensors = [torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])]
        if self.document_ids:
            tensors.append(self._document_ids(tensors[0]))
        return tuple(self._to_device(t.contiguous()) for t in tensors)

    def _document_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Per token, its document's index within the row: shards put eot before every document, so
        an eot starts a new one; with a bos token they hold bos + document + eot, so a bos starts one and
        the eot stays with the document it ends. Tokens attend only to tokens of an equal id."""
        first = self.eot_token if self.bos_token is None else self.bos_token
        return torch.cumsum(x == first, dim=1, dtype=torch.int32)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"split": self.split, "mode": self.mode, "seed": self.seed, "seq_len": self.seq_len,
                "position": self.position, "shards_sha256": self.shards_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. The stream must be the same (split, mode, seed, seq_len); the
        batch size and world size may differ, the windows go on where they stopped."""
        for key in ("split", "mode", "seed", "seq_len"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"cannot resume the loader: saved {key}={state.get(key)!r}, this loader has "
                                 f"{key}={getattr(self, key)!r}")
        # absent from a state saved before the shards were recorded: nothing to check then
        if state.get("shards_sha256", self.shards_sha256) != self.shards_sha256:
            raise ValueError(f"cannot resume the loader: the shards of split {self.split!r} in {self.data_dir!r} "
                             f"differ from those the saved position counts windows of (tokenized again?)")
        position = state.get("position")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ValueError(f"cannot resume the loader: saved position must be an int >= 0, got {position!r}")
        self.position = position


def _shards_sha256(entries: list[dict]) -> str:
    """One hash of a split's shards as the manifest lists them (names, token counts, checksums)."""
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
