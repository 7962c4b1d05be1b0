"""Generation's edge cases a demanding caller meets: numbers as NumPy gives them, and temperatures as
Python's integers can write them."""

import numpy as np
import pytest
from test_generate import PROMPTS, make_model

from llmkern.model import generate


def test_numpy_scalars_are_taken_as_the_numbers_they_are():
    # As every llmkern op and optimizer takes them (numbers.Integral / numbers.Real): a NumPy int64 token id,
    # from list(array), was "not an int", and an np.float32 temperature "not a number".
    model = make_model("rope")
    plain = generate(model, PROMPTS, 6, temperature=0.7, top_k=20, top_p=0.9, seed=3, eos_token=7)
    numpy_prompts = [list(np.array(p, dtype=np.int64)) for p in PROMPTS]
    numpy_args = {"temperature": np.float32(0.7), "top_k": np.int64(20), "top_p": np.float64(0.9),
                  "seed": np.int64(3), "eos_token": np.int32(7)}
    # float32's 0.7 is not float64's: the tempered logits differ by ~1e-8, which moves no draw for this seed
    out = generate(model, numpy_prompts, np.int64(6), **numpy_args)
    assert out == plain
    assert all(type(tok) is int for row in out for tok in row)  # the ids come back as Python ints


@pytest.mark.parametrize("temperature", [np.float32(-0.5), np.float64("nan"), np.bool_(True)])
def test_bad_numpy_temperatures_are_still_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        generate(make_model(), [[1, 2]], 2, temperature=temperature)


def test_a_temperature_too_large_for_a_float_samples_as_infinity():
    # An int past int64 failed in torch's division ("int too big to convert"), one past float64 in float().
    model = make_model("rope")
    assert generate(model, PROMPTS, 6, temperature=10**30, seed=1) == generate(model, PROMPTS, 6, temperature=1e30,
                                                                               seed=1)
    assert generate(model, PROMPTS, 6, temperature=10**400, top_k=3, seed=1) == generate(
        model, PROMPTS, 6, temperature=float("inf"), top_k=3, seed=1)


@pytest.mark.parametrize("prompts", ["hey", []])
def test_sample_text_takes_a_list_of_texts_not_one_text(prompts):
    # A str is a sequence of texts too: "hey" was sampled as three prompts, "h", "e" and "y", silently.
    from llmkern.data.tokenizer import get_tokenizer
    from llmkern.train.inference import sample_text

    model = make_model("rope", vocab_size=257)
    with pytest.raises(TypeError, match="prompts must be a non-empty list of texts"):
        sample_text(model, get_tokenizer("bytes"), prompts, max_new_tokens=2)
    for texts in (["hey"], ("hey",)):
        assert len(sample_text(model, get_tokenizer("bytes"), texts, max_new_tokens=2)) == 1


def test_the_kv_cache_is_let_go_once_generation_slides_past_it(monkeypatch):
    # Past block_size each step reruns the window without the cache, which held on to every layer's keys and
    # values (at 7B scale and a 4k context, GBs a row) for the rest of the call, beside the window's activations.
    import importlib
    import weakref

    generate_module = importlib.import_module("llmkern.model.generate")  # the attribute is the function

    caches = []

    class RecordedCache(generate_module.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(weakref.ref(self))

    monkeypatch.setattr(generate_module, "KVCache", RecordedCache)
    model = make_model("rope-window", block_size=16)
    prompts = [[5, 17, 3], [101, 2, 2, 9, 44, 180, 7]]
    alive = {}  # after each step (by the new tokens so far): whether the cache still exists

    def note(new):
        alive[len(new)] = caches[0]() is not None
        return False

    out = generate(model, prompts, 20, temperature=0, stop=note)
    assert len(caches) == 1
    # The longest prompt (7) fills the 16-token cache at its 10th new token; the 11th step runs the window.
    assert [alive[n] for n in range(1, 21)] == [True] * 10 + [False] * 10
    assert out == generate(model, prompts, 20, temperature=0, use_cache=False)
