"""Generation: the KV cache changes nothing but speed, batches equal single prompts (greedy, and
seeded sampling), sampling emits only allowed tokens, eos stops a row, and bad arguments are
refused clearly."""

import pytest
import torch

from llmkern.model import GPT, GPTConfig, generate
from llmkern.model.generate import _inverse_cdf, _sample

VOCAB = 200
SHARPEN = 10.0

LAYOUTS = {
    "learned": dict(),
    "rope": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    "rope-gqa": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1),
    "learned-gqa": dict(n_kv_head=2),
    # Qwen3's: QK-norm, heads of 32 (q 128 wide) in a model 64 wide
    "qwen3": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, head_dim=32, qk_norm=True),
    # sliding windows shorter than the prompts and the generations: in the masks of left-padded prompts too
    "rope-window": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, sliding_window=4),
    "learned-window": dict(sliding_window=5),
}


def make_model(layout: str = "learned", block_size: int = 48, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=4, n_embd=64, **LAYOUTS[layout])
    cfg.update(overrides)
    model = GPT(GPTConfig.from_dict(cfg))
    # Larger weights than GPT-2's init: sharp attention and sharp predictions, so that the tokens
    # depend strongly on positions and on which keys are seen (a wrong position or mask shows).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(SHARPEN)
    return model.eval()


def greedy_by_hand(model: GPT, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding from the definition: rerun model.forward on the whole sequence each step."""
    seq = list(prompt)
    for _ in range(steps):
        window = torch.tensor([seq[-model.config.block_size :]])
        logits, _ = model(window)
        seq.append(int(logits[0, -1].argmax()))
    return seq


PROMPTS = [[5, 17, 3], [101, 2, 2, 9, 44, 180, 7], [60]]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cached_greedy_equals_uncached_and_the_definition(layout):
    model = make_model(layout)
    cached = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    uncached = generate(model, PROMPTS, max_new_tokens=12, temperature=0, use_cache=False)
    assert cached == uncached
    # Each row of the left-padded batch equals its prompt decoded alone, from the definition.
    for prompt, row in zip(PROMPTS, cached):
        assert row == greedy_by_hand(model, prompt, 12)


@pytest.mark.parametrize("layout", ["learned", "rope-gqa", "rope-window"])
def test_generation_past_block_size_slides_the_window(layout):
    model = make_model(layout, block_size=16)
    prompts = [list(range(10, 30)), [3, 4, 5]]  # the first is longer than block_size: cropped
    cached = generate(model, prompts, max_new_tokens=20, temperature=0)
    assert cached == generate(model, prompts, max_new_tokens=20, temperature=0, use_cache=False)
    for prompt, row in zip(prompts, cached):
        assert len(row) == len(prompt) + 20
        assert row == greedy_by_hand(model, prompt, 20)


def test_a_longrope_generation_that_grows_past_the_original_context_recomputes_its_cache():
    """A longrope model takes short_factor up to original_max_position_embeddings (12 here) tokens, long_factor past
    them. The keys cached with short_factor are recomputed with long_factor at the first step past 12, as
    transformers' Phi3ForCausalLM.generate does (its "enforce re-compute cache"): the cached generation is the
    uncached one and the definition's. Kept, they gave other tokens. (In a batch the longest row's length
    decides for every row, as in transformers: the definition is checked prompt by prompt.)"""
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0 ** i for i in range(8)],
               "original_max_position_embeddings": 12, "attention_factor": 1.0}
    model = make_model("rope", rope_scaling=scaling)
    cached = generate(model, PROMPTS, max_new_tokens=16, temperature=0)
    assert cached == generate(model, PROMPTS, max_new_tokens=16, temperature=0, use_cache=False)
    for prompt in PROMPTS:
        assert generate(model, [prompt], max_new_tokens=16, temperature=0) == [greedy_by_hand(model, prompt, 16)]


@pytest.mark.parametrize("layout", ["rope-window", "learned-window"])
def test_the_sliding_window_changes_what_is_generated(layout):
    """The windowed layouts above would pass with a window that every path ignored: here it is seen to matter."""
    windowed = make_model(layout)
    plain = make_model(layout, sliding_window=None)
    plain.load_state_dict(windowed.state_dict())
    assert (generate(windowed, PROMPTS, max_new_tokens=12, temperature=0)
            != generate(plain, PROMPTS, max_new_tokens=12, temperature=0))


def test_tensor_prompts_and_zero_new_tokens():
    model = make_model()
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(model, prompts, max_new_tokens=4, temperature=0)
    assert out == generate(model, prompts.tolist(), max_new_tokens=4, temperature=0)
    assert [r[:3] for r in out] == prompts.tolist() and all(len(r) == 7 for r in out)
    assert generate(model, [[1, 2]], max_new_tokens=0) == [[1, 2]]


def allowed_tokens(model: GPT, row: list[int], prompt_len: int, keep) -> None:
    """Check that each new token of `row` is among keep(logits) for the logits before it."""
    logits, _ = model(torch.tensor([row]))
    for t in range(prompt_len, len(row)):
        allowed = keep(logits[0, t - 1])
        assert allowed[row[t]], f"token {row[t]} at step {t - prompt_len} was not allowed"


def test_top_k_samples_only_the_k_most_likely():
    model = make_model("rope")
    k = 3
    prompts = [[7, 8, 9]] * 6
    out = generate(model, prompts, max_new_tokens=10, temperature=1.5, top_k=k, seed=1)

    def keep(logits):  # the k largest, with a little slack for ties between cached and full logits
        return logits >= logits.topk(k).values[-1] - 1e-4

    for row in out:
        allowed_tokens(model, row, 3, keep)
    assert len({tuple(r) for r in out}) > 1  # it does sample (6 rows, 10 steps, 3 choices each)


def test_top_p_samples_only_the_nucleus():
    model = make_model("learned")
    top_p, temperature = 0.6, 0.8
    out = generate(model, [[11, 12]] * 6, max_new_tokens=10, temperature=temperature, top_p=top_p, seed=2)

    def keep(logits):
        probs = (logits / temperature).softmax(-1)
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        keep_sorted = mass_before < top_p + 1e-4  # the smallest prefix reaching top_p (plus slack)
        kept = torch.zeros_like(keep_sorted)
        kept[order] = keep_sorted
        assert kept.sum() < VOCAB // 2  # the nucleus is a real restriction here
        return kept

    for row in out:
        allowed_tokens(model, row, 2, keep)


def draw(logits: list[float], n: int = 4000, **kwargs) -> set[int]:
    """The tokens that n draws from one row of logits produce."""
    rows = torch.tensor([logits]).log().expand(n, -1)  # logits given as probabilities
    uniforms = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return set(_sample(rows, uniforms=uniforms, **kwargs).tolist())


def test_sample_filters_on_known_distributions():
    probs = [0.1, 0.4, 0.2, 0.3]  # sorted: 1 (0.4), 3 (0.3), 2 (0.2), 0 (0.1)
    plain = dict(temperature=1.0, top_k=None, top_p=None)
    assert draw(probs, **plain) == {0, 1, 2, 3}
    assert draw(probs, **plain | dict(top_k=2)) == {1, 3}
    assert draw(probs, **plain | dict(top_k=1)) == {1}
    assert draw(probs, **plain | dict(top_p=0.41)) == {1, 3}  # 0.4 < 0.41, so the 0.3 joins
    assert draw(probs, **plain | dict(top_p=0.39)) == {1}  # 0.4 already reaches 0.39
    assert draw(probs, **plain | dict(top_p=0.75)) == {1, 3, 2}
    assert draw(probs, **plain | dict(top_p=1.0)) == {0, 1, 2, 3}
    # top-k first, then top-p on the renormalised rest: 0.4/0.9 + 0.3/0.9 = 0.78 reaches 0.75.
    assert draw(probs, **plain | dict(top_k=3, top_p=0.75)) == {1, 3}
    assert draw(probs, **plain | dict(temperature=0)) == {1}


def test_sample_draws_each_token_with_its_tempered_and_renormalised_probability():
    # Evenly spaced uniforms take the inverse CDF exactly: each token's share of the draws is its
    # probability to within 1 / n. Temperature T gives p ** (1 / T), renormalised over the tokens kept.
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    n = 10000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for temperature, top_k, kept in ((0.5, None, [0, 1, 2, 3]), (2.0, None, [0, 1, 2, 3]), (2.0, 3, [1, 2, 3])):
        logits = probs.float().log()[None].expand(n, -1)
        tokens = _sample(logits, temperature=temperature, top_k=top_k, top_p=None, uniforms=uniforms)
        expected = torch.zeros(4, dtype=torch.float64)
        expected[kept] = probs[kept] ** (1 / temperature)
        expected /= expected.sum()
        shares = torch.bincount(tokens, minlength=4).double() / n
        torch.testing.assert_close(shares, expected, rtol=0, atol=2 / n)


def test_top_k_one_is_greedy():
    model = make_model("rope-gqa")
    assert generate(model, PROMPTS, 8, temperature=1.0, top_k=1, seed=0) == generate(model, PROMPTS, 8, temperature=0)


def test_seed_makes_sampling_reproducible():
    model = make_model()
    first = generate(model, PROMPTS, 10, temperature=1.0, seed=123)
    assert generate(model, PROMPTS, 10, temperature=1.0, seed=123) == first
    assert generate(model, PROMPTS, 10, temperature=1.0, seed=123, use_cache=False) == first


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("layout", ["learned", "rope-gqa"])
def test_a_seeded_prompt_samples_the_same_in_any_batch(layout, use_cache):
    # One generator for the whole batch gave prompts[0] other tokens once other prompts came along. On a
    # CPU in fp32 batching changes the logits by rounding (~3e-6, padded or not: a GEMM of B rows vs one),
    # which moves a draw only when it lands that close to the edge between two tokens: not for these seeds.
    model = make_model(layout)
    prompt, same_length, other_lengths = [5, 17, 3], [[9, 9, 9], [101, 2, 44]], [[101, 2, 2, 9, 44, 180, 7], [60]]
    for seed in (0, 1, 7):
        sample = dict(temperature=1.0, seed=seed, use_cache=use_cache)
        alone = generate(model, [prompt], 12, **sample)[0]
        assert generate(model, [prompt] + same_length, 12, **sample)[0] == alone
        assert generate(model, [prompt] + other_lengths, 12, **sample)[0] == alone
        # Row i's draws depend on i, not on the batch's size or its other prompts.
        assert (generate(model, same_length + [prompt], 12, **sample)[2]
                == generate(model, [[1, 2, 3], [4, 5, 6], prompt, [7, 8, 9]], 12, **sample)[2])
        # A row that stops early (eos) does not shift the others' draws.
        eos = generate(model, [[1], [60]], 12, **sample)[1][1 + 2]  # the 3rd token [60] samples as row 1
        stopped = generate(model, [prompt, [60]], 12, eos_token=eos, **sample)
        assert stopped[0] == generate(model, [prompt], 12, eos_token=eos, **sample)[0]
        assert stopped[1][-1] == eos and len(stopped[1]) <= 1 + 3
    # The seed does pick the sample.
    assert len({tuple(generate(model, [prompt], 12, temperature=1.0, seed=seed)[0]) for seed in range(4)}) == 4


def test_identical_prompts_in_one_batch_get_different_samples():
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every token equally likely: rows can agree only if their draws do
    out = generate(model, [[1, 2]] * 4, 8, temperature=1.0, seed=3)
    assert len({tuple(r) for r in out}) == 4
    assert out[0] == generate(model, [[1, 2]], 8, temperature=1.0, seed=3)[0]


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_batch_sampled_a_part_at_a_time_with_first_row_draws_what_one_call_draws(use_cache):
    """Row i of a call with first_row=s draws from row s + i's stream: the parts of a batch of identical prompts
    (whose rows differ only by their streams) give the whole call's samples; without first_row they repeat."""
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every token equally likely: rows can agree only if their draws do
    sample = dict(temperature=1.0, seed=3, use_cache=use_cache)
    whole = generate(model, [[1, 2]] * 5, 8, **sample)
    parts = [generate(model, [[1, 2]] * len(rows), 8, first_row=start, **sample)
             for start, rows in ((0, range(2)), (2, range(2)), (4, range(1)))]
    assert [row for part in parts for row in part] == whole
    assert generate(model, [[1, 2]] * 2, 8, **sample) != whole[2:4]
    for bad in (-1, 1.5, None):
        with pytest.raises(ValueError, match="first_row must be an int >= 0"):
            generate(model, [[1, 2]], 2, first_row=bad)


def test_without_a_seed_sampling_follows_torchs_global_rng():
    model = make_model()
    torch.manual_seed(5)
    first = generate(model, PROMPTS, 10, temperature=1.0)
    torch.manual_seed(5)
    assert generate(model, PROMPTS, 10, temperature=1.0) == first
    assert generate(model, PROMPTS, 10, temperature=1.0) != first  # the global RNG moved on


def test_inverse_cdf_draws_by_cumulative_probability_and_never_a_zero():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]] * 5)
    uniforms = torch.tensor([0.0, 0.05, 0.3, 0.65, 0.99], dtype=torch.float64)
    assert _inverse_cdf(probs, uniforms).tolist() == [0, 0, 1, 2, 3]
    # Tokens of probability 0, among them the last: never drawn, even by u just below 1 (where u * total
    # may round up to the total) or by u = 0.
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    uniforms = torch.tensor([0.0, 0.49, 0.5, 1 - 2**-53], dtype=torch.float64)
    assert _inverse_cdf(probs, uniforms).tolist() == [1, 1, 3, 3]
    # A total that is not exactly 1 (float32 softmax) scales the draw.
    probs = torch.tensor([[0.25, 0.25, 0.0]]) * (1 + 1e-6)
    assert _inverse_cdf(probs, torch.tensor([1 - 2**-53], dtype=torch.float64)).tolist() == [1]


def test_eos_stops_each_row():
    model = make_model("rope")
    free = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    eos = free[0][len(PROMPTS[0]) + 3]  # the 4th token greedy emits for the first prompt
    stopped = generate(model, PROMPTS, max_new_tokens=10, temperature=0, eos_token=eos)
    for prompt, full, row in zip(PROMPTS, free, stopped):
        new = full[len(prompt) :]
        expected = new[: new.index(eos) + 1] if eos in new else new
        assert row == prompt + expected
    assert stopped[0][-1] == eos and len(stopped[0]) == len(PROMPTS[0]) + 4


def test_stop_function_ends_each_row_where_it_says():
    model = make_model("rope")
    free = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    pair = free[0][len(PROMPTS[0]) + 2 : len(PROMPTS[0]) + 4]  # the 3rd and 4th tokens greedy emits for row 0
    seen = []

    def ends_with_pair(new):
        seen.append(list(new))
        return new[-2:] == pair

    stopped = generate(model, PROMPTS, max_new_tokens=10, temperature=0, stop=ends_with_pair)
    for prompt, full, row in zip(PROMPTS, free, stopped):
        new = full[len(prompt) :]
        ends = [i + 2 for i in range(len(new) - 1) if new[i : i + 2] == pair]
        assert row == prompt + new[: ends[0] if ends else len(new)]
    assert len(stopped[0]) == len(PROMPTS[0]) + 4
    assert all(len(new) >= 1 and len(new) <= 10 for new in seen) and seen[0] == free[0][len(PROMPTS[0]):][:1]


def test_a_tiny_temperature_samples_like_greedy():
    # logits / 1e-40 overflow float32 to inf, and a softmax of infs is NaN: the limit is greedy.
    model = make_model("rope")
    greedy = generate(model, PROMPTS, 6, temperature=0)
    assert generate(model, PROMPTS, 6, temperature=1e-40, seed=0) == greedy
    assert generate(model, PROMPTS, 6, temperature=1e-40, top_k=5, top_p=0.9, seed=0) == greedy
    # Below float32's smallest subnormal the temperature itself rounds to 0 in the division: 0 / 0 was
    # a NaN probability and torch.multinomial failed.
    for temperature in (1e-50, 5e-324):
        assert generate(model, PROMPTS, 6, temperature=temperature, seed=0) == greedy
        assert generate(model, PROMPTS, 6, temperature=temperature, top_k=5, top_p=0.9, seed=0) == greedy


def test_a_huge_temperature_still_ranks_tokens_by_their_logits():
    # Past float32's range (or inf) every scaled logit is 0: top-k kept every token and top-p the first ids.
    probs = [0.1, 0.4, 0.2, 0.3]  # ranked: 1, 3, 2, 0
    for temperature in (1e39, float("inf")):
        assert draw(probs, temperature=temperature, top_k=None, top_p=None) == {0, 1, 2, 3}  # uniform
        assert draw(probs, temperature=temperature, top_k=2, top_p=None) == {1, 3}
        assert draw(probs, temperature=temperature, top_k=None, top_p=0.3) == {1, 3}  # 1/4 < 0.3, 2/4 >= 0.3
        assert draw(probs, temperature=temperature, top_k=3, top_p=0.5) == {1, 3}  # 1/3 < 0.5, 2/3 >= 0.5
    model = make_model("rope")
    greedy = generate(model, PROMPTS, 6, temperature=0)
    assert generate(model, PROMPTS, 6, temperature=float("inf"), top_k=1, seed=0) == greedy


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_nan_logits_are_an_error_not_a_token(use_cache, temperature):
    model = make_model("rope")  # untied: a NaN in one input embedding reaches only the rows that read it
    with torch.no_grad():
        model.wte.weight[101, 0] = float("nan")  # only PROMPTS[1] holds token 101
    # Greedy's argmax took the NaN for the largest logit, and gave token 0 for every step of that row.
    with pytest.raises(RuntimeError, match=r"logits hold NaN for prompts\[1\] at new token 0"):
        generate(model, PROMPTS, 4, temperature=temperature, use_cache=use_cache, seed=0)
    assert len(generate(model, [PROMPTS[0], PROMPTS[2]], 4, temperature=temperature, use_cache=use_cache, seed=0)) == 2


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_infinite_logits_are_an_error_not_a_token(use_cache, temperature, monkeypatch):
    """An overflowed (inf) logit made sampling's probabilities NaN (inf - inf), and the inverse CDF then
    gave token VOCAB, an id outside the vocabulary, as prompts[1]'s new token, silently."""
    model = make_model("rope")
    head = model.head

    def overflowing_head(hidden):
        logits = head(hidden)
        logits[1, 7] = float("inf")
        return logits

    monkeypatch.setattr(model, "head", overflowing_head)
    with pytest.raises(RuntimeError, match=r"logits hold inf for prompts\[1\] at new token 0"):
        generate(model, PROMPTS, 1, temperature=temperature, use_cache=use_cache, seed=0)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("temperature,seed", [(0, None), (1.0, 5), (1.0, None)])
def test_a_finished_row_is_fed_padding_and_changes_no_other_row(use_cache, temperature, seed, monkeypatch):
    """A row that had stopped (eos) was still fed its new samples. Once its logits went NaN (allowed for a
    finished row) sampling gave it the id VOCAB, and the next step's embedding lookup failed the batch."""
    model = make_model("rope")
    head = model.head
    seen = []  # each step's logits, to compare the running rows' bit for bit

    def recording_head(hidden, nan_after_first=False):
        logits = head(hidden)
        if nan_after_first and seen:
            logits[0] = float("nan")  # only row 0, finished after its first token
        seen.append(logits.clone())
        return logits

    sample = dict(temperature=temperature, seed=seed, use_cache=use_cache)
    monkeypatch.setattr(model, "head", recording_head)
    torch.manual_seed(0)
    free = generate(model, PROMPTS, 6, **sample)
    free_logits, seen[:] = list(seen), []
    eos = free[0][len(PROMPTS[0])]  # row 0's first new token: it stops there
    assert all(eos not in row[len(p) :] for p, row in zip(PROMPTS[1:], free[1:]))  # the others run on
    monkeypatch.setattr(model, "head", lambda hidden: recording_head(hidden, nan_after_first=True))
    torch.manual_seed(0)
    stopped = generate(model, PROMPTS, 6, eos_token=eos, **sample)
    assert stopped[0] == PROMPTS[0] + [eos]
    assert stopped[1:] == free[1:]
    # Bitwise: what row 0 is fed does not reach the other rows' logits, nor do its draws shift theirs.
    assert len(seen) == len(free_logits) == 6
    for ours, theirs in zip(seen, free_logits):
        assert torch.equal(ours[1:], theirs[1:])


def test_generate_command_refuses_an_input_without_an_instruction(capsys):
    from llmkern.cli import main

    # --input belongs in an instruction's template; with --prompt it would be dropped, silently.
    assert main(["generate", "--run", "no-such-run", "--prompt", "x", "--input", "2 and 3"]) == 2
    assert "--input" in capsys.readouterr().err


def test_training_mode_is_restored():
    model = make_model()
    model.train()
    generate(model, [[1]], 2, temperature=0)
    assert model.training


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(prompts=[[]]), ValueError, "non-empty list"),
        (dict(prompts=[]), TypeError, "non-empty list"),
        (dict(prompts=[[1, VOCAB]]), ValueError, f"[0, {VOCAB})"),
        (dict(prompts=[[1, -1]]), ValueError, "token ids are ints"),
        (dict(prompts=torch.zeros(2, 3)), ValueError, "integer ids"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(temperature=-0.5), ValueError, "temperature"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(eos_token="</s>"), TypeError, "eos_token"),
        # ids the model never emits: the rows would never stop (VOCAB + 10 is a padding row of the head)
        (dict(eos_token=VOCAB), ValueError, f"eos_token must be a token id in [0, {VOCAB})"),
        (dict(eos_token=VOCAB + 10), ValueError, f"eos_token must be a token id in [0, {VOCAB})"),
        (dict(eos_token=-1), ValueError, f"eos_token must be a token id in [0, {VOCAB})"),
        (dict(use_cache=1), TypeError, "use_cache"),
        (dict(stop="<|im_end|>"), TypeError, "stop"),
    ],
)
def test_argument_errors(kwargs, error, words):
    model = make_model()
    args = dict(prompts=[[1, 2]], max_new_tokens=2) | kwargs
    with pytest.raises(error) as info:
        generate(model, **args)
    assert words in str(info.value)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["learned", "rope-gqa"])
def test_cached_greedy_on_gpu_bf16(layout):
    model = make_model(layout, n_embd=256).cuda().to(torch.bfloat16)  # heads of 64: the cuda attention runs them
    cached = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    uncached = generate(model, PROMPTS, max_new_tokens=12, temperature=0, use_cache=False)
    # bf16 rounding differs between the cached and full paths; the first tokens must agree.
    assert [r[: len(p) + 3] for r, p in zip(cached, PROMPTS)] == [r[: len(p) + 3] for r, p in zip(uncached, PROMPTS)]


@pytest.mark.cuda
def test_seeded_sampling_on_gpu_is_reproducible_and_batch_independent():
    model = make_model("rope-gqa", n_embd=256).cuda()
    prompt, others = [5, 17, 3], [[101, 2, 2, 9, 44, 180, 7], [60]]
    alone = generate(model, [prompt], 8, temperature=1.0, seed=4)[0]
    batch = generate(model, [prompt] + others, 8, temperature=1.0, seed=4)
    assert generate(model, [prompt] + others, 8, temperature=1.0, seed=4) == batch
    # fp32 rounding differs between a batch and one row; the first tokens must agree.
    assert batch[0][: len(prompt) + 3] == alone[: len(prompt) + 3]


@pytest.mark.parametrize("options", [["--top-k", "50"], ["--top-k", "0"], ["--top-p", "0.9"], ["--seed", "1"],
                                     ["--top-k", "5", "--seed", "1"]])
def test_generate_command_refuses_sampling_options_when_greedy(options, capsys):
    from llmkern.cli import main

    # --temperature 0 is greedy: top-k, top-p and the seed would change nothing, silently.
    assert main(["generate", "--run", "no-such-run", "--prompt", "x", "--temperature", "0", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmkern generate: error: --") and "--temperature 0 is greedy" in err
    assert all(o in err for o in options if o.startswith("--"))
    # left out, they are no error (the run, which does not exist, is)
    assert main(["generate", "--run", "no-such-run", "--prompt", "x", "--temperature", "0"]) == 2
    assert "greedy" not in capsys.readouterr().err


def test_generate_command_says_what_to_give_for_a_file(tmp_path, capsys):
    # a model.safetensors (llmkern's or a Hugging Face GPT-2 file) was "checkpoint '...' does not exist"
    from llmkern.cli import main

    step = tmp_path / "run" / "checkpoints" / "step_0000002"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    (step / "model.safetensors").write_bytes(b"")
    (tmp_path / "model.safetensors").write_bytes(b"")
    for path, words in ((step / "model.safetensors", f"give its checkpoint folder '{step}'"),
                        (tmp_path / "model.safetensors", "--init_from=FILE")):
        assert main(["generate", "--run", str(path), "--prompt", "x"]) == 2
        err = capsys.readouterr().err
        assert "is a file" in err and words in err and "does not exist" not in err
