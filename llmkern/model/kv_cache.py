"""The keys and values of earlier tokens, kept across generation steps."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, each (B, Hkv, capacity, D), allocated at the first step
    in the dtype the attention layer makes (bf16 under autocast, say).

    Each attention layer calls update() with the keys/values of the new tokens (already
    rotated, for RoPE) and gets back those of all tokens so far; the model calls advance()
    once every layer has seen the step. A model with a sliding window (GPTConfig.sliding_window, on the layers
    GPTConfig.layer_types says) still gets every key back: each sliding layer's attention masks out those past its
    window (a rolling buffer would save memory, not compute).
    """

    def __init__(self, n_layer: int, capacity: int):
        # checked here: a float would fail only at the first update, in torch's words
        for name, value, least in (("n_layer", n_layer, 1), ("capacity", capacity, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.capacity = capacity
        self.length = 0  # tokens stored

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer < len(self.k):
            raise ValueError(f"layer must be in [0, {len(self.k)}) (the cache's n_layer); got {layer}")
        t = k.size(2)
        end = self.length + t
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens; {self.length} + {t} do not fit")
        if self.k[layer] is None:
            b, hkv, _, d = k.shape
            self.k[layer] = k.new_zeros(b, hkv, self.capacity, d)
            self.v[layer] = v.new_zeros(b, hkv, self.capacity, d)
        cached = self.k[layer]
        for name, new in (("k", k), ("v", v)):
            # The copy below broadcasts: a batch of 1 would fill every row of a larger cache, silently.
            if new.dim() != 4 or new.shape[:2] != cached.shape[:2] or new.size(3) != cached.size(3):
                raise ValueError(f"{name} must be (B, Hkv, T, D) = ({cached.size(0)}, {cached.size(1)}, T, "
                                 f"{cached.size(3)}) as the cache holds; got {tuple(new.shape)}")
            # The copy below would cast silently, and attention would then meet q and k of two dtypes.
            if new.dtype != cached.dtype or new.device != cached.device:
                raise ValueError(f"{name} must have the cache's dtype and device ({cached.dtype} on {cached.device}) "
                                 f"as the first step made it; got {new.dtype} on {new.device}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    @property
    def full(self) -> bool:
        return self.length >= self.capacity
