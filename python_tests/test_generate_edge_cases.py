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


# --- keep_first: the begin-of-sequence token stays in the window ------------------------------------------

def greedy_keeping_the_first(model, prompt: list[int], steps: int, keep_first: int) -> list[int]:
    """Greedy decoding from the definition, where a sequence past block_size is read as its first keep_first
    tokens, then its last ones (llmkern.data.sequences.keep_last)."""
    import torch

    from llmkern.data.sequences import keep_last

    seq = list(prompt)
    for _ in range(steps):
        logits, _ = model(torch.tensor([keep_last(seq, model.config.block_size, keep_first)]))
        seq.append(int(logits[0, -1].argmax()))
    return seq


BOS = 1
# with a BOS first: one longer than block_size 16 (cropped at once), one that slides past it while generating,
# one that never reaches it
BOS_PROMPTS = [[BOS, *range(10, 30)], [BOS, 101, 2, 2, 9, 44, 180, 7], [BOS, 60]]


@pytest.mark.parametrize("layout", ["learned", "rope-gqa", "rope-window"])
@pytest.mark.parametrize("keep_first", [1, 3])
def test_keep_first_keeps_each_rows_first_tokens_when_the_window_slides(layout, keep_first):
    # Llama 3's and Gemma's first token is an attention sink: generate cut it off with the rest of a long
    # prompt's start, and again once generation slid past block_size.
    model = make_model(layout, block_size=16)
    cached = generate(model, BOS_PROMPTS, 14, temperature=0, keep_first=keep_first)
    assert cached == generate(model, BOS_PROMPTS, 14, temperature=0, keep_first=keep_first, use_cache=False)
    for prompt, row in zip(BOS_PROMPTS, cached):
        assert row == greedy_keeping_the_first(model, prompt, 14, keep_first)
    # it matters: without it the long rows read another window (and the short one, which fits, the same); where
    # every layer slides (window 4) no query reaches the first tokens, and the relative RoPE positions are the same
    dropped = generate(model, BOS_PROMPTS, 14, temperature=0)
    assert (dropped[0] == cached[0]) == (layout == "rope-window") and dropped[2] == cached[2]


def test_keep_first_samples_the_same_cached_or_not():
    model = make_model("rope", block_size=16)
    sample = {"temperature": 1.0, "top_k": 20, "seed": 7, "keep_first": 1}
    assert generate(model, BOS_PROMPTS, 14, **sample) == generate(model, BOS_PROMPTS, 14, use_cache=False, **sample)


@pytest.mark.parametrize("keep_first, error", [(-1, ValueError), (16, ValueError), (1.0, TypeError),
                                               (True, TypeError)])
def test_keep_first_must_leave_room_in_the_window(keep_first, error):
    with pytest.raises(error, match="keep_first must be an int"):
        generate(make_model(block_size=16), [[1, 2]], 2, keep_first=keep_first)


def test_sample_text_keeps_the_bos_of_a_tokenizer_that_has_one(monkeypatch):
    from types import SimpleNamespace

    import llmkern.model
    from llmkern.train.inference import sample_text

    calls = []

    def recording_generate(model, prompts, max_new_tokens, **kwargs):
        calls.append(kwargs["keep_first"])
        return [list(p) for p in prompts]

    monkeypatch.setattr(llmkern.model, "generate", recording_generate)
    for bos, keep_first in ((256, 1), (None, 0)):
        tokenizer = SimpleNamespace(bos_token=bos, eot_token=257, encode=lambda text: list(text.encode()),
                                    decode=lambda ids: bytes(ids).decode())
        assert sample_text(None, tokenizer, ["hi"]) == ["hi"]
        assert calls.pop() == keep_first


# --- the generate command --------------------------------------------------------------------------------

def test_generate_command_reports_non_finite_logits_as_an_error(monkeypatch, capsys):
    import torch

    import llmkern.train.inference
    from llmkern.cli import main
    from llmkern.data.tokenizer import get_tokenizer

    model = make_model("rope", vocab_size=257)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    monkeypatch.setattr(llmkern.train.inference, "load_trained_model",
                        lambda run, device: (model, get_tokenizer("bytes"), None))
    assert main(["generate", "--run", "a-run", "--prompt", "hi", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmkern generate: error: the model's logits hold NaN") and "Traceback" not in err


@pytest.mark.parametrize("options, words", [(["--temperature", "-1"], "temperature"), (["--top-k", "-2"], "top_k"),
                                            (["--top-p", "1.5"], "top_p"), (["--max-new-tokens", "-3"],
                                                                            "max_new_tokens")])
def test_generate_command_checks_sampling_before_loading_the_model(options, words, monkeypatch, capsys):
    import llmkern.train.inference
    from llmkern.cli import main

    def slow_load(run, device):
        raise AssertionError("the model was loaded before the sampling arguments were checked")

    monkeypatch.setattr(llmkern.train.inference, "load_trained_model", slow_load)
    assert main(["generate", "--run", "a-run", "--prompt", "hi", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmkern generate: error:") and words in err


# --- memory ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [True, False])
def test_a_huge_max_new_tokens_costs_no_memory_until_tokens_come(use_cache):
    # The token buffer was B x (prompt + max_new_tokens) from the start: 10**15 failed to allocate, though the
    # rows stop after 3 tokens.
    model = make_model("rope", block_size=16)
    out = generate(model, PROMPTS, 10**15, temperature=0, use_cache=use_cache, stop=lambda new: len(new) == 3)
    assert out == generate(model, PROMPTS, 3, temperature=0, use_cache=use_cache)


def test_a_generation_that_outgrows_the_first_buffer_matches_the_definition(monkeypatch):
    import importlib

    generate_module = importlib.import_module("llmkern.model.generate")  # the attribute is the function
    monkeypatch.setattr(generate_module, "_FIRST_ROOM", 1)  # the buffer grows at the 2nd, 6th and 14th new token
    model = make_model("rope-gqa", block_size=16)
    prompts = [[5, 17, 3], [60]]
    cached = generate(model, prompts, 20, temperature=0, keep_first=1)
    assert cached == generate(model, prompts, 20, temperature=0, keep_first=1, use_cache=False)
    for prompt, row in zip(prompts, cached):
        assert row == greedy_keeping_the_first(model, prompt, 20, 1)
