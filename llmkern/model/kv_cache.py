"""The keys and values of earlier tokens, kept across generation steps."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, allocated at the first step in the dtype the attention layer makes (bf16
    under autocast, say).

    Each attention layer calls update() with the keys/values of the new tokens (already rotated, for RoPE) and gets
    back those it attends to; the model calls advance() once every layer has seen the step. Tokens are counted in
    columns: the first cached token is column 0, as in generation's attn_mask.

    A layer without a sliding window keeps a contiguous (B, Hkv, capacity, D) buffer: update() returns columns
    0..n-1 in order. A sliding layer (windows[layer], as GPTConfig.layer_window says) keeps only the last `window`
    tokens, all its queries can still see: a ring buffer (B, Hkv, window, D) where column c lives in slot
    c % window, so its memory is O(window), not O(capacity) (Mistral's 4096 window at 32k tokens: an eighth). Its
    keys come back in slot order, and key_columns() says which column each is, so that the attention layer takes
    its mask's columns for them and measures the window by column distance. A window >= capacity keeps the
    contiguous buffer (a ring would save nothing).
    """

    def __init__(self, n_layer: int, capacity: int, windows: list[int | None] | None = None):
        """windows: each layer's sliding window, None for a full layer; None: every layer full (as before
        windows existed: a sliding layer's attention then masks the keys past its window)."""
        # checked here: a float would fail only at the first update, in torch's words
        for name, value, least in (("n_layer", n_layer, 1), ("capacity", capacity, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.capacity = capacity
        # Each layer's ring size, None for a contiguous buffer of capacity.
        self.windows = [None if w is None or w >= capacity else w for w in _checked_windows(windows, n_layer)]
        self.length = 0  # tokens stored

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's keys and values (B, Hkv, T, D); return those the step's queries attend to: every
        column so far for a full layer, and for a sliding one the columns key_columns() lists."""
        self._check_layer(layer)
        t = k.size(2)
        if self.length + t > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens; {self.length} + {t} do not fit")
        if self.k[layer] is None:
            b, hkv, _, d = k.shape
            slots = self.windows[layer] or self.capacity
            self.k[layer] = k.new_zeros(b, hkv, slots, d)
            self.v[layer] = v.new_zeros(b, hkv, slots, d)
        self._check_like_cache(layer, k, v)
        if self.windows[layer] is None:
            return self._append(layer, k, v)
        return self._roll(layer, k, v)

    def key_columns(self, layer: int, t: int, device: torch.device) -> torch.Tensor | None:
        """The column of each key that update() returns for a step of t new tokens (before advance()), a (Tk,)
        long tensor; None for a full layer, whose keys are columns 0..Tk-1 in order."""
        self._check_layer(layer)
        window = self.windows[layer]
        if window is None:
            return None
        if t == 1:
            return _slot_columns(self.length + 1, window, device)
        new_columns = torch.arange(self.length, self.length + t, device=device)
        return torch.cat([_slot_columns(self.length, window, device), new_columns])

    def advance(self, t: int) -> None:
        """Count the step's t new tokens as stored, once every layer has update()d them."""
        # checked: a negative t moved length back, and the next update overwrote cached keys and returned too few
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"t must be an int (the step's new tokens), got {type(t).__name__}")
        if t < 0:
            raise ValueError(f"t must be >= 0 (the step's new tokens), got {t}")
        if self.length + t > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens; {self.length} + {t} do not fit")
        self.length += t

    @property
    def full(self) -> bool:
        return self.length >= self.capacity

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < len(self.k):
            raise ValueError(f"layer must be in [0, {len(self.k)}) (the cache's n_layer); got {layer}")

    def _check_like_cache(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        cached = self.k[layer]
        for name, new in (("k", k), ("v", v)):
            # The copy into the cache broadcasts: a batch of 1 would fill every row of a larger cache, silently.
            if new.dim() != 4 or new.shape[:2] != cached.shape[:2] or new.size(3) != cached.size(3):
                raise ValueError(f"{name} must be (B, Hkv, T, D) = ({cached.size(0)}, {cached.size(1)}, T, "
                                 f"{cached.size(3)}) as the cache holds; got {tuple(new.shape)}")
            # The copy would cast silently, and attention would then meet q and k of two dtypes.
            if new.dtype != cached.dtype or new.device != cached.device:
                raise ValueError(f"{name} must have the cache's dtype and device ({cached.dtype} on {cached.device}) "
                                 f"as the first step made it; got {new.dtype} on {new.device}")

    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def _roll(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.windows[layer]
        if k.size(2) == 1:
            # A decode step: its query sees the last `window` tokens, itself included, which is what the ring
            # holds once the new token has taken the oldest one's slot. The ring itself is returned, no copy.
            self._write_ring(layer, k, v)
            filled = min(self.length + 1, window)
            return self.k[layer][:, :, :filled], self.v[layer][:, :, :filled]
        # Several tokens (a prefill): the first query needs keys that the later tokens overwrite in the ring, so
        # the step gets the ring's keys joined to all the new ones, and the ring then keeps the last `window`.
        filled = min(self.length, window)
        keys = torch.cat([self.k[layer][:, :, :filled], k], dim=2)
        values = torch.cat([self.v[layer][:, :, :filled], v], dim=2)
        self._write_ring(layer, k, v)
        return keys, values

    def _write_ring(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The last `window` new tokens into their slots (column % window): one slice, or two where they wrap."""
        window, t = self.windows[layer], k.size(2)
        kept = min(t, window)
        first_slot = (self.length + t - kept) % window
        before_end = min(kept, window - first_slot)
        # (ring slot, index among the new tokens, how many): up to the ring's end, then the rest (maybe none) at 0
        for slot, start, n in ((first_slot, t - kept, before_end), (0, t - kept + before_end, kept - before_end)):
            self.k[layer][:, :, slot : slot + n] = k[:, :, start : start + n]
            self.v[layer][:, :, slot : slot + n] = v[:, :, start : start + n]


def _slot_columns(length: int, window: int, device: torch.device) -> torch.Tensor:
    """The column each filled slot of a ring holds once `length` tokens have been written: slot s holds the latest
    column c < length with c % window == s. Slots fill in order, so the first min(length, window) are filled."""
    last = length - 1
    slots = torch.arange(min(length, window), device=device)
    return last - (last - slots) % window


def _checked_windows(windows: object, n_layer: int) -> list[int | None]:
    if windows is None:
        return [None] * n_layer
    if not isinstance(windows, (list, tuple)) or len(windows) != n_layer:
        raise ValueError(f"windows must be a list with one entry per layer (n_layer={n_layer}), got {windows!r:.80}")
    for i, window in enumerate(windows):
        if window is None:
            continue
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"windows[{i}] must be an int or None (a full layer), got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"windows[{i}] must be >= 1 (None for a full layer), got {window}")
    return list(windows)
