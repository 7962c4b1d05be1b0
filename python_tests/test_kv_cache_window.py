"""The sliding layers' rolling KV cache: a ring of `window` slots per sliding layer. Generation with it equals
generation without a cache and the full forward's argmax (left-padded prompts, prompts longer than the window,
many times around the ring, windows of 1 and 2, Gemma 3's mix of sliding and full layers), the sliding layers
hold `window` slots and the full ones capacity, and the ring reports which column each slot holds."""

import sys

import pytest
import torch

from llmkern.model import GPT, GPTConfig, generate
from llmkern.model.kv_cache import KVCache

VOCAB = 200
ROPE = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
LAYOUTS = {
    "rope-window-3": dict(ROPE, n_kv_head=2, sliding_window=3),
    "learned-window-4": {"sliding_window": 4},
    "window-1": dict(ROPE, sliding_window=1),
    "window-2": dict(ROPE, n_kv_head=1, sliding_window=2),
    # Gemma 3's: sliding layers with their own RoPE base beside a full one, QK-norm and sandwich norms
    "mixed": dict(ROPE, n_layer=3, n_kv_head=2, sliding_window=3, qk_norm=True, post_norms=True, rope_theta=1e6,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_local_theta=1e4),
}
# Left-padded: lengths 3, 9 and 1, the longest past every window above.
PROMPTS = [[5, 17, 3], [101, 2, 2, 9, 44, 180, 7, 66, 12], [60]]


def make_model(layout: str, block_size: int = 64) -> GPT:
    torch.manual_seed(0)
    cfg = {"vocab_size": VOCAB, "block_size": block_size, "n_layer": 2, "n_head": 4, "n_embd": 64}
    model = GPT(GPTConfig.from_dict({**cfg, **LAYOUTS[layout]}))
    with torch.no_grad():  # sharp attention and predictions: a key seen wrongly, or missed, changes the tokens
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(10.0)
    return model.eval()


@torch.no_grad()
def greedy_by_hand(model: GPT, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding from the definition: the full forward (the training kernel's window) on the whole sequence."""
    seq = list(prompt)
    for _ in range(steps):
        logits, _ = model(torch.tensor([seq[-model.config.block_size :]]))
        seq.append(int(logits[0, -1].argmax()))
    return seq


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cached_greedy_equals_uncached_and_the_definition_many_times_around_the_ring(layout):
    model = make_model(layout)
    steps = 30  # 10 times around a ring of 3, 30 around one of 1
    cached = generate(model, PROMPTS, max_new_tokens=steps, temperature=0)
    assert cached == generate(model, PROMPTS, max_new_tokens=steps, temperature=0, use_cache=False)
    for prompt, row in zip(PROMPTS, cached):
        assert row == greedy_by_hand(model, prompt, steps)


@pytest.mark.parametrize("layout", ["rope-window-3", "mixed"])
def test_cached_seeded_sampling_equals_uncached(layout):
    model = make_model(layout)
    for seed in (0, 1):
        sample = {"max_new_tokens": 20, "temperature": 1.0, "top_k": 50, "seed": seed}
        assert generate(model, PROMPTS, **sample) == generate(model, PROMPTS, **sample, use_cache=False)


@pytest.mark.parametrize("layout", ["window-2", "mixed"])
def test_generation_past_block_size_with_rings(layout):
    """Once the full layers' cache is full each step reruns the last block_size tokens, as before rings."""
    model = make_model(layout, block_size=16)
    prompts = [list(range(10, 30)), [3, 4, 5]]  # the first is cropped to block_size
    cached = generate(model, prompts, max_new_tokens=24, temperature=0)
    assert cached == generate(model, prompts, max_new_tokens=24, temperature=0, use_cache=False)
    for prompt, row in zip(prompts, cached):
        assert row == greedy_by_hand(model, prompt, 24)


def test_sliding_layers_cache_window_slots_and_full_layers_capacity(monkeypatch):
    made = []

    class RecordedKVCache(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    # the module by name: llmkern.model's attribute `generate` is the function
    monkeypatch.setattr(sys.modules["llmkern.model.generate"], "KVCache", RecordedKVCache)
    model = make_model("mixed")
    generate(model, PROMPTS, max_new_tokens=20, temperature=0)
    (cache,) = made
    capacity = 9 + 20 - 1  # the longest prompt and every new token but the last
    assert cache.capacity == capacity
    batch, hkv, head_dim = len(PROMPTS), model.config.n_kv_head, model.config.head_dim
    for layer, slots in enumerate([3, capacity, 3]):  # sliding, full, sliding
        assert cache.k[layer].shape == cache.v[layer].shape == (batch, hkv, slots, head_dim)


def column_keys(columns: range, batch: int = 2, hkv: int = 1, d: int = 4) -> torch.Tensor:
    """Keys whose every element is the token's column: what a slot holds reads as its column."""
    return torch.tensor(list(columns), dtype=torch.float32)[None, None, :, None].expand(batch, hkv, -1, d).clone()


def step(cache: KVCache, layer: int, columns: range) -> tuple[torch.Tensor, list[int]]:
    """One step of new tokens at `columns` into one layer: the keys' columns as stored, and as key_columns says."""
    said = cache.key_columns(layer, len(columns), torch.device("cpu"))
    k, v = cache.update(layer, column_keys(columns), -column_keys(columns))
    torch.testing.assert_close(v, -k, rtol=0, atol=0)
    stored = k[0, 0, :, 0].long()
    assert said is None or said.tolist() == stored.tolist()
    return stored, said


def test_a_wrapped_ring_returns_its_slots_and_says_their_columns():
    cache = KVCache(2, capacity=20, windows=[3, None])
    seen = []
    for columns in (range(2), range(2, 3), range(3, 4), range(4, 5), range(5, 6), range(6, 10), range(10, 11)):
        ring_keys, _ = step(cache, 0, columns)
        full_keys, full_columns = step(cache, 1, columns)
        cache.advance(len(columns))
        assert full_columns is None and full_keys.tolist() == list(range(columns.stop))  # contiguous, in order
        seen.append(ring_keys.tolist())
    assert seen == [
        [0, 1],  # a prefill of 2: the empty ring, then the new keys
        [0, 1, 2],  # column c in slot c % 3
        [3, 1, 2],
        [3, 4, 2],
        [3, 4, 5],
        [3, 4, 5, 6, 7, 8, 9],  # 4 tokens at once: the ring's keys joined to all of the new ones
        [9, 10, 8],  # then the ring kept the last 3 of them
    ]
    assert cache.k[0].shape == (2, 1, 3, 4) and cache.k[1].shape == (2, 1, 20, 4)


def test_a_prefill_longer_than_the_window_keeps_every_key_its_queries_need():
    cache = KVCache(1, capacity=20, windows=[2])
    keys, columns = step(cache, 0, range(7))
    cache.advance(7)
    assert keys.tolist() == columns.tolist() == list(range(7))
    assert step(cache, 0, range(7, 8))[1].tolist() == [6, 7]


def test_window_1_ring_holds_the_newest_token_only():
    cache = KVCache(1, capacity=8, windows=[1])
    for column in range(5):
        keys, columns = step(cache, 0, range(column, column + 1))
        cache.advance(1)
        assert keys.tolist() == columns.tolist() == [column]


def test_windows_at_or_past_capacity_keep_the_contiguous_buffer():
    cache = KVCache(3, capacity=6, windows=[6, 9, 5])
    assert cache.windows == [None, None, 5]
    assert step(cache, 0, range(3))[1] is None


@pytest.mark.parametrize("windows,error,match", [
    ([4], ValueError, r"windows must be a list with one entry per layer \(n_layer=2\)"),
    (4, ValueError, "windows must be a list with one entry per layer"),
    ([4, 0], ValueError, r"windows\[1\] must be >= 1 \(None for a full layer\), got 0"),
    ([-2, None], ValueError, r"windows\[0\] must be >= 1"),
    ([4.0, None], TypeError, r"windows\[0\] must be an int or None \(a full layer\), got float"),
    ([None, True], TypeError, r"windows\[1\] must be an int or None \(a full layer\), got bool"),
])
def test_bad_windows_are_refused(windows, error, match):
    with pytest.raises(error, match=match):
        KVCache(2, capacity=8, windows=windows)


@torch.no_grad()
def test_a_ring_shorter_than_the_layers_window_is_refused():
    """The ring would have dropped keys the layer sees: attention would skip them, silently."""
    idx = torch.zeros(1, 4, dtype=torch.long)
    model = make_model("mixed")  # windows 3, None, 3
    with pytest.raises(ValueError, match="keeps the last 2 tokens of layer 0, whose attention sees the last 3"):
        model.hidden_states(idx, cache=KVCache(3, capacity=8, windows=[2, None, 3]))
    with pytest.raises(ValueError, match="keeps the last 3 tokens of layer 1, whose attention sees all of them"):
        model.hidden_states(idx, cache=KVCache(3, capacity=8, windows=[3, 3, 3]))


@pytest.mark.parametrize("layout", ["rope-window-3", "learned-window-4", "window-1", "mixed"])
@torch.no_grad()
def test_chunks_against_rings_continue_the_sequence(layout):
    """hidden_states' default causal mask (no attn_mask) over a ring's columns: chunks of 5, 1, 3, 1 and 4 tokens
    give the whole sequence's hidden states."""
    model = make_model(layout)
    idx = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(1))
    full = model.hidden_states(idx)
    windows = [model.config.layer_window(i) for i in range(model.config.n_layer)]
    cache = KVCache(model.config.n_layer, capacity=14, windows=windows)
    bounds = ((0, 5), (5, 6), (6, 9), (9, 10), (10, 14))
    chunks = [model.hidden_states(idx[:, a:b], cache=cache) for a, b in bounds]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-4, atol=1e-4)
