"""The KV cache through the model's own API: hidden_states(idx, cache=...) with the default positions
and mask continues the sequence the cache holds (what generate() does with explicit ones), and the
cache refuses keys and values of another shape."""

import pytest
import torch

from llmkern.model import GPT, GPTConfig
from llmkern.model.kv_cache import KVCache

LAYOUTS = {
    "learned": dict(),
    "rope-gqa": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, tie_embeddings=False, bias=False),
    "rope-mqa": dict(pos="rope", n_kv_head=1),
    # Qwen3's: QK-norm, heads of 32 (q 128 wide) in a model 64 wide; the cache holds keys 32 wide
    "qwen3": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, head_dim=32, qk_norm=True),
    # sliding windows shorter than the chunks' sequence: the cache keeps every key, the window masks the old ones
    "rope-window": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, sliding_window=3),
    "learned-window": dict(sliding_window=4),
}


def make_model(layout: str, block_size: int = 16) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, block_size=block_size, n_layer=2, n_head=4, n_embd=64, **LAYOUTS[layout]))
    with torch.no_grad():  # sharp attention, so that a wrong position or a key seen too early shows
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(10.0)
    return model.eval()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@torch.no_grad()
def test_default_positions_and_mask_with_a_cache_continue_the_sequence(layout):
    """Chunks of 5, 1, 3 and 1 tokens against one cache give the hidden states of the whole sequence: each
    chunk at the positions after the cached tokens, causal within itself (it was at positions 0.. and,
    for a chunk of more than one token, saw its own later tokens)."""
    model = make_model(layout)
    idx = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    full = model.hidden_states(idx)
    cache = KVCache(model.config.n_layer, capacity=10)
    chunks = [model.hidden_states(idx[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 9), (9, 10))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-4, atol=1e-4)
    assert cache.length == 10 and cache.full
    assert cache.k[0].shape == (2, model.config.n_kv_head, 10, model.config.head_dim)


def test_default_positions_past_block_size_are_refused():
    model = make_model("learned", block_size=8)
    cache = KVCache(model.config.n_layer, capacity=12)
    with torch.no_grad():
        model.hidden_states(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="positions 6 to 8 .* go past block_size=8"):
            model.hidden_states(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_keys_of_another_shape_are_refused():
    cache = KVCache(1, capacity=8)
    cache.update(0, torch.randn(3, 2, 4, 16), torch.randn(3, 2, 4, 16))
    cache.advance(4)
    # a batch of 1 used to broadcast into all 3 rows of the cache, silently
    for k in (torch.randn(1, 2, 1, 16), torch.randn(3, 1, 1, 16), torch.randn(3, 2, 1, 8)):
        with pytest.raises(ValueError, match=r"k must be \(B, Hkv, T, D\) = \(3, 2, T, 16\)"):
            cache.update(0, k, k)
    with pytest.raises(ValueError, match=r"v must be \(B, Hkv, T, D\) = \(3, 2, T, 16\)"):
        cache.update(0, torch.randn(3, 2, 1, 16), torch.randn(1, 2, 1, 16))
    assert cache.update(0, torch.randn(3, 2, 2, 16), torch.randn(3, 2, 2, 16))[0].shape == (3, 2, 6, 16)


@pytest.mark.parametrize("n_layer,capacity,error,match", [
    (2, 8.0, TypeError, "capacity must be an int, got float"),
    (2, -3, ValueError, "capacity must be >= 0, got -3"),
    (2.0, 8, TypeError, "n_layer must be an int, got float"),
    (0, 8, ValueError, "n_layer must be >= 1, got 0"),
    (2, True, TypeError, "capacity must be an int, got bool"),
])
def test_bad_sizes_are_refused_when_the_cache_is_made(n_layer, capacity, error, match):
    # a float capacity used to fail at the first update in torch's words, a bool to hold one token
    with pytest.raises(error, match=match):
        KVCache(n_layer, capacity)


def test_keys_of_another_layer_dtype_or_device_are_refused():
    cache = KVCache(2, capacity=8)
    k = torch.randn(1, 2, 3, 16, dtype=torch.bfloat16)
    cache.update(0, k, k)
    cache.advance(3)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\)"):
        cache.update(2, k, k)
    # an fp32 step (autocast off) used to be rounded into the bf16 cache silently
    with pytest.raises(ValueError, match=r"k must have the cache's dtype and device \(torch.bfloat16 on cpu\)"):
        cache.update(0, k.float(), k)
    with pytest.raises(ValueError, match=r"v must have the cache's dtype"):
        cache.update(0, k, k.half())
    got_k, got_v = cache.update(0, k[:, :, :1], k[:, :, 1:2])
    torch.testing.assert_close(got_k, torch.cat([k, k[:, :, :1]], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(got_v, torch.cat([k, k[:, :, 1:2]], dim=2), rtol=0, atol=0)


@pytest.mark.parametrize("t, error, match", [(-1, ValueError, "t must be >= 0"), (1.0, TypeError, "t must be an int"),
                                             (True, TypeError, "t must be an int"),
                                             (3, ValueError, "holds 8 tokens; 6 \\+ 3 do not fit")])
def test_advance_refuses_a_step_it_cannot_take(t, error, match):
    # A negative step moved length back: the next update overwrote cached keys, and returned too few of them.
    cache = KVCache(1, capacity=8)
    cache.update(0, torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16))
    cache.advance(6)
    with pytest.raises(error, match=match):
        cache.advance(t)
    assert cache.length == 6
    cache.advance(0)
    cache.advance(2)
    assert cache.full
