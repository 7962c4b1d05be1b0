"""GRPO: group advantages and the loss against direct float64 computations, answer rewards by GSM8K's rules,
config checks, a short end-to-end run whose mean reward rises on a verifiable task (always answer 7), a reward
model with LoRA and a KL term, resume, and two gloo processes (in sync, each its own groups)."""

import dataclasses
import json
import math
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from llmkern.finetune import get_method
from llmkern.finetune.base import save_finetuned
from llmkern.finetune.grpo import (
    GRPOConfig,
    answer_reward,
    final_answer,
    group_advantages,
    grpo_loss,
    prompt_answers,
    run_grpo,
    step_normalizers,
)
from llmkern.model import GPT, GPTConfig
from llmkern.train.checkpoint import load_checkpoint
from llmkern.train.inference import load_trained_model
from llmkern.train.metrics import read_metrics
from test_ppo import scripted_generate

import spawned
from spawned import WORLD

ONE_PROCESS = SimpleNamespace(is_distributed=False, rank=0, world_size=1, is_main=True)


# --- advantages ----------------------------------------------------------------------------------------------------

def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,  2.0, 2.0, 2.0, 2.0,  0.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    eps = 1e-4
    adv, std, flat = group_advantages(rewards, 4, scale_rewards=True, eps=eps)
    # group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3); group 1 flat; group 2: mean 0.75, sample std 1.5
    s0 = math.sqrt(1 / 3)
    expected = [0.5 / (s0 + eps), -0.5 / (s0 + eps), -0.5 / (s0 + eps), 0.5 / (s0 + eps), 0, 0, 0, 0,
                -0.75 / (1.5 + eps), -0.75 / (1.5 + eps), -0.75 / (1.5 + eps), 2.25 / (1.5 + eps)]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(std, torch.tensor([s0, 0.0, 1.5], dtype=torch.float64))
    assert flat.tolist() == [False, True, False]

    adv, _, _ = group_advantages(rewards, 4, scale_rewards=False, eps=eps)  # Dr. GRPO: centred only
    expected = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))


def test_a_flat_group_has_exactly_zero_advantage_whatever_its_mean_rounds_to():
    # 0.1 * 3 / 3 is not 0.1 in floating point: centred, the group was a tiny non-zero divided by a tiny std + eps
    for dtype in (torch.float32, torch.float64):
        rewards = torch.tensor([0.1] * 7 + [0.7] * 7, dtype=dtype)
        for scale in (True, False):
            adv, _, flat = group_advantages(rewards, 7, scale_rewards=scale)
            assert flat.tolist() == [True, True]
            assert torch.all(adv == 0)


def test_group_advantages_refuse_bad_arguments():
    with pytest.raises(ValueError, match="not a whole number of groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        group_advantages(torch.zeros(6), 1)
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        group_advantages(torch.zeros(6), 3, eps=0.0)


# --- the loss ------------------------------------------------------------------------------------------------------

def ragged_inputs(batch, steps, seed):
    """Random log-probs (new, old, reference), advantages, and masks of one response per row (random start and
    length, at least one token)."""
    g = torch.Generator().manual_seed(seed)
    new = -torch.rand(batch, steps, generator=g, dtype=torch.float64) * 3
    old = new + 0.4 * torch.randn(batch, steps, generator=g, dtype=torch.float64)  # ratios on both sides of the clip
    ref = new + 0.5 * torch.randn(batch, steps, generator=g, dtype=torch.float64)
    advantages = torch.randn(batch, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, steps, dtype=torch.bool)
    for b in range(batch):
        start = int(torch.randint(0, steps, (1,), generator=g))
        length = int(torch.randint(1, steps - start + 1, (1,), generator=g))
        mask[b, start : start + length] = True
    return new, old, ref, advantages, mask


def loss_by_loops(new, old, ref, advantages, mask, low, high, kl_coef, aggregation):
    """GRPO's loss straight from its definition, token by token, in float64."""
    rows = []
    for b in range(new.size(0)):
        terms = []
        for t in range(new.size(1)):
            if not mask[b, t]:
                continue
            ratio = torch.exp(new[b, t] - old[b, t])
            a = advantages[b]
            term = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - low, 1 + high))
            d = ref[b, t] - new[b, t]
            terms.append(term + kl_coef * (torch.exp(d) - d - 1))
        rows.append(terms)
    if aggregation == "token":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    return sum(sum(r) / len(r) for r in rows) / len(rows)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
@pytest.mark.parametrize("high", [None, 0.28])
def test_grpo_loss_and_gradient_match_a_float64_loop(aggregation, kl_coef, high):
    new, old, ref, advantages, mask = ragged_inputs(6, 11, seed=int(10 * kl_coef) + (high is None))
    new32 = new.float().requires_grad_(True)
    loss, stats = grpo_loss(new32, old.float(), advantages.float(), mask, 0.2, high,
                            ref.float() if kl_coef else None, kl_coef, aggregation)
    new64 = new.clone().requires_grad_(True)
    expected = loss_by_loops(new64, old, ref, advantages, mask, 0.2, high or 0.2, kl_coef, aggregation)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(new32.grad.double(), new64.grad, rtol=1e-4, atol=1e-6)
    assert torch.all(new32.grad[~mask] == 0)
    ratio = torch.exp(new - old)
    hi = 1 + (high or 0.2)
    clipped = ((advantages[:, None] > 0) & (ratio > hi)) | ((advantages[:, None] < 0) & (ratio < 0.8))
    assert stats["clip_fraction"].item() == pytest.approx(clipped[mask].double().mean().item())
    assert 0 < stats["clip_fraction"].item() < 1  # the inputs reach the clip on some tokens, not all
    assert ("kl" in stats) == bool(kl_coef)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_minibatch_losses_with_the_step_normalizer_add_up_to_the_whole_batch_loss(aggregation):
    new, old, _, advantages, mask = ragged_inputs(7, 9, seed=3)
    whole, _ = grpo_loss(new, old, advantages, mask, 0.2, aggregation=aggregation)
    parts = [torch.arange(0, 3), torch.arange(3, 5), torch.arange(5, 7)]
    [normalizer] = step_normalizers([parts], mask, aggregation, ONE_PROCESS)
    assert normalizer == (mask.sum().item() if aggregation == "token" else 7)
    total = sum(grpo_loss(new[p], old[p], advantages[p], mask[p], 0.2, aggregation=aggregation,
                          normalizer=normalizer)[0] for p in parts)
    torch.testing.assert_close(total, whole)


def test_token_and_sequence_aggregation_differ_on_ragged_responses():
    new, old, _, advantages, mask = ragged_inputs(5, 12, seed=4)
    token, _ = grpo_loss(new, old, advantages, mask, 0.2, aggregation="token")
    sequence, _ = grpo_loss(new, old, advantages, mask, 0.2, aggregation="sequence")
    assert not torch.allclose(token, sequence)


def test_grpo_loss_refuses_bad_arguments():
    new, old, _ref, advantages, mask = ragged_inputs(2, 5, seed=5)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        grpo_loss(new, old, advantages, mask, 0.2, kl_coef=0.1)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        grpo_loss(new, old, advantages, mask, 0.2, aggregation="mean")
    with pytest.raises(ValueError, match=r"advantages must be a tensor of shape \(2,\)"):
        grpo_loss(new, old, advantages[:, None].expand(2, 5), mask, 0.2)
    with pytest.raises(ValueError, match="clip_range_high must be a number > 0"):
        grpo_loss(new, old, advantages, mask, 0.2, clip_range_high=-0.1)


# --- scoring a rollout -------------------------------------------------------------------------------------------------

def test_score_groups_against_each_row_scored_alone():
    """Rewards, group advantages, masks and the log-probs of the policy (grpo_epochs > 1) and the reference against
    each row scored alone by plain log-softmax; no old log-probs with grpo_epochs=1, none of a missing reference."""
    from llmkern.finetune.grpo import repeat_groups, score_groups

    def tiny(seed):
        torch.manual_seed(seed)
        return GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                         backend="torch")).eval()

    policy, reference = tiny(0), tiny(1)
    prompts = repeat_groups([[5, 6, 7], [8, 9, 10, 11, 12]], 3)
    responses = [[200, 3, 150, 99], [7], [1, 2], [4, 4, 4, 4, 4], [9], [250, 251]]
    calls = []

    def length_reward(prompts_in, responses_in, answers, device):  # a reward of its own per row
        calls.append(answers)
        return torch.tensor([float(len(r)) for r in responses_in])

    config = SimpleNamespace(group_size=3, scale_rewards=True, std_eps=1e-4, grpo_epochs=2, batch_size=4)
    answers = repeat_groups(["7", "8"], 3)
    rollout = score_groups(policy, reference, length_reward, prompts, answers, responses, config, pad_id=256)
    assert calls == [answers]
    rewards = torch.tensor([4.0, 1, 2, 5, 1, 2])
    torch.testing.assert_close(rollout.rewards, rewards)
    torch.testing.assert_close(rollout.advantages, group_advantages(rewards, 3, True, 1e-4)[0])
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        row = torch.tensor([prompt + response])
        start, end = len(prompt) - 1, len(prompt) + len(response) - 1  # the positions that predict the response
        assert rollout.mask[b].nonzero().flatten().tolist() == list(range(start, end))
        assert rollout.token_mask[b].nonzero().flatten().tolist() == list(range(end))
        for model, got in ((policy, rollout.old_logprobs), (reference, rollout.ref_logprobs)):
            logp = torch.log_softmax(model(row[:, :-1])[0].double(), -1)[0]
            expected = torch.zeros(got.size(1), dtype=torch.float64)
            expected[start:end] = logp[torch.arange(start, end), row[0, start + 1 : end + 1]]
            torch.testing.assert_close(got[b].double(), expected, rtol=1e-5, atol=1e-5)
    config.grpo_epochs = 1
    rollout = score_groups(policy, None, length_reward, prompts, answers, responses, config, pad_id=256)
    assert rollout.old_logprobs is None and rollout.ref_logprobs is None


def k3_tokens_at(policy, reference, prompt, response, temperature):
    """Per response token the k3 estimate exp(d) - d - 1, d = log pi_ref - log pi, both of softmax(logits /
    temperature), in float64 (a list)."""
    row = torch.tensor([prompt + response])
    start, end = len(prompt) - 1, len(prompt) + len(response) - 1  # the positions that predict the response
    targets = row[0, start + 1 : end + 1]
    with torch.no_grad():
        policy_lp, ref_lp = (torch.log_softmax(model(row[:, :-1])[0][0].double() / temperature, -1)
                             [torch.arange(start, end), targets] for model in (policy, reference))
    d = ref_lp - policy_lp
    return (torch.exp(d) - d - 1).tolist()


def test_grpo_takes_its_log_probs_kl_and_loss_at_the_sampling_temperature(monkeypatch):
    """temperature=0.5 samples from softmax(logits / 0.5): the logged KL and loss (training) and the evaluation's
    KL are of that distribution, against float64 from logits / 0.5. Every reward equal: the advantages are 0 and
    the loss is kl_coef times the mean k3 over the response tokens."""
    import contextlib
    import copy

    from llmkern.finetune import grpo, ppo

    def tiny(seed):
        torch.manual_seed(seed)
        return GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                         backend="torch")).eval()

    policy, reference = tiny(0), tiny(1)
    before = copy.deepcopy(policy)
    sampled = []
    real_sample = ppo.sample_responses

    def sample(*args, **kwargs):
        sampled.append(real_sample(*args, **kwargs))
        return sampled[-1]

    def flat_reward(prompts, responses, answers, device):
        return torch.ones(len(responses), device=device)

    monkeypatch.setattr(ppo, "sample_responses", sample)
    config = GRPOConfig(temperature=0.5, group_size=2, rollout_batch=2, batch_size=4, max_new_tokens=6, kl_coef=0.1,
                        max_len=32)
    prompts = [([5, 6, 7], None), ([8, 9, 10, 11, 12], None)]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    _, metrics = grpo.grpo_iteration(policy, reference, flat_reward, optimizer, prompts, config, eot=256, seed=3,
                                     lr_at=lambda step: 1e-2, step=0, autocast=contextlib.nullcontext, info=ONE_PROCESS)

    def mean_k3(model, rows, responses, temperature):
        tokens = [k for p, r in zip(rows, responses) for k in k3_tokens_at(model, reference, p, r, temperature)]
        return sum(tokens) / len(tokens)

    rows = grpo.repeat_groups([tokens for tokens, _ in prompts], config.group_size)
    kl = mean_k3(before, rows, sampled[0], 0.5)
    assert metrics["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert metrics["loss"] == pytest.approx(config.kl_coef * kl, rel=1e-4, abs=1e-8)
    assert abs(mean_k3(before, rows, sampled[0], 1.0) - kl) > 0.1 * kl  # the temperature tells: the check can fail

    evaluation = grpo.evaluate_groups(policy, reference, flat_reward, prompts, config, 256, contextlib.nullcontext)
    rows = [tokens for tokens, _ in prompts]  # one response per held-out prompt
    assert evaluation["val_kl"] == pytest.approx(mean_k3(policy, rows, sampled[1], 0.5), rel=1e-4, abs=1e-7)


# --- answer rewards --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("response,answer,reward", [
    ("so it is 3 + 4.\n#### 7", "7", 1.0),  # strict-match
    ("#### 7 apples", "Lots of working.\n#### 7", 1.0),  # a whole GSM8K solution as the answer
    ("#### 5, or maybe 7", "7", 0.0),  # the strict answer is 5: a later 7 does not count
    ("3 + 4 = 7.", "7", 1.0),  # flexible-extract: the last number, its trailing period dropped
    ("It costs $7,000", "7000", 1.0),  # "$" and "," normalized away
    ("I owe -3", "-3", 1.0),
    ("7 is wrong, 8 is right", "7", 0.0),  # the last number counts
    ("no number here", "7", 0.0),
    ("", "7", 0.0),
])
def test_answer_reward(response, answer, reward):
    assert answer_reward(response, answer) == reward


def test_final_answer_prefers_the_strict_form():
    assert final_answer("first 3 then #### 12 and 9") == "12"
    assert final_answer("first 3 then 9") == "9"


def test_prompt_answers_name_the_row_without_one():
    assert prompt_answers([{"instruction": "a", "answer": "7"}, {"instruction": "b", "answer": 12}], "d.json") == [
        "7", "12"]
    with pytest.raises(ValueError, match=r"d.json: example 1 needs an 'answer'.*keys \['instruction'\]"):
        prompt_answers([{"instruction": "a", "answer": "7"}, {"instruction": "b"}], "d.json")
    with pytest.raises(ValueError, match="example 0 needs an 'answer'"):
        prompt_answers([{"instruction": "a", "answer": True}], "d.json")
    with pytest.raises(ValueError, match="example 0: 'answer' '\\$' holds no answer"):
        prompt_answers([{"instruction": "a", "answer": "$"}], "d.json")


# --- end to end ------------------------------------------------------------------------------------------------------

def write_grpo_data(tmp_path, with_answers=True):
    """A tiny base and 16 prompts whose answer is always 7."""
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_size=257, block_size=64, n_layer=1, n_head=2, n_embd=32,
                                   backend="torch")
    save_finetuned(str(tmp_path / "base"), 0, GPT(config).state_dict(),
                   {"model_config": config.to_dict(), "tokenizer": "bytes"})
    rows = [{"instruction": f"Question {i}?", "input": "", **({"answer": "7"} if with_answers else {})}
            for i in range(16)]
    (tmp_path / "prompts.json").write_text(json.dumps(rows))


def grpo_config(tmp_path, **overrides):
    settings = {"base": str(tmp_path / "base"), "data": str(tmp_path / "prompts.json"),
                "out_dir": str(tmp_path / "grpo"), "reward": "answer", "template": "plain", "max_steps": 15,
                "rollout_batch": 4, "group_size": 8, "batch_size": 16, "max_len": 40, "max_new_tokens": 4, "lr": 3e-2,
                "min_lr": 1e-3, "warmup_steps": 0, "val_fraction": 0.25, "device": "cpu", "progress": False}
    return GRPOConfig(**{**settings, **overrides})


def make_grpo_run(tmp_path, **overrides):
    write_grpo_data(tmp_path)
    return grpo_config(tmp_path, **overrides)


def test_grpo_end_to_end_learns_to_answer_7_without_loading_a_reference(tmp_path, monkeypatch):
    from llmkern.finetune import grpo

    def no_copy(*args, **kwargs):
        raise AssertionError("kl_coef=0 copied the model for a reference")

    monkeypatch.setattr(grpo, "copy", SimpleNamespace(deepcopy=no_copy))
    config = make_grpo_run(tmp_path)
    summary = run_grpo(config)
    assert summary["method"] == "grpo" and summary["iterations"] == 15 and summary["optimizer_steps"] == 30
    records = read_metrics(summary["metrics"])
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 16))
    rewards = [r["reward"] for r in train]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    for key in ("reward", "reward_std", "flat_groups", "response_length", "loss", "clip_fraction", "lr"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert "kl" not in train[0]
    assert all(r["clip_fraction"] == 0 for r in train)  # grpo_epochs=1: every ratio is 1
    assert train[0]["flat_groups"] > train[-1]["flat_groups"]  # the untrained policy rarely says 7 at all
    assert [r["kind"] for r in records].count("eval") == 2
    assert 0 <= summary["last_eval"]["val_reward"] <= 1
    model, tokenizer, _ = load_trained_model(config.out_dir, "cpu")
    assert isinstance(model, GPT) and tokenizer.spec == "bytes"
    assert load_checkpoint(config.out_dir).meta["finetune"]["method"] == "grpo"
    assert os.path.isfile(tmp_path / "grpo" / "flat_groups.png")


def test_grpo_samples_generation_batch_rows_a_generate_call(tmp_path, monkeypatch):
    """32 rows an iteration, 5 a call: 6 calls of 5 and one of 2, each group's rows in order; the 4 held-out prompts
    (one response each) fit one call."""
    import llmkern.model

    real_generate, calls = llmkern.model.generate, []

    def counting_generate(model, prompts, *args, **kwargs):
        calls.append([tuple(p) for p in prompts])
        return real_generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(llmkern.model, "generate", counting_generate)
    config = make_grpo_run(tmp_path, max_steps=2, generation_batch=5)
    summary = run_grpo(config)
    assert summary["iterations"] == 2 and summary["optimizer_steps"] == 4
    assert [len(c) for c in calls] == [4] + [5] * 6 + [2] + [5] * 6 + [2] + [4]
    for first in (1, 8):  # an iteration's rows: group_size copies of each of its 4 prompts, in turn
        rows = [row for call in calls[first : first + 7] for row in call]
        assert rows == [prompt for prompt in dict.fromkeys(rows) for _ in range(8)] and len(set(rows)) == 4
    train = [r for r in read_metrics(summary["metrics"]) if r["kind"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r[k]) for r in train for k in ("reward", "loss", "reward_std"))
    assert train[0]["response_length"] > 0


def test_grpo_reads_gsm8k_rows_question_and_solution_as_they_come(tmp_path, monkeypatch):
    """GSM8K's own rows ({"question", "answer": "... #### N"}) train as written: the question is the prompt, the
    solution's final number the answer; TRL's {"prompt"} rows read too. Both used to need an "instruction"."""
    from llmkern.finetune import ppo
    from llmkern.finetune.data import load_prompt_data

    write_grpo_data(tmp_path)
    gsm8k = [{"question": f"Question {i}?", "answer": f"3 + 4 = <<3+4=7>>7\n#### 7"} for i in range(16)]
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm8k))
    (tmp_path / "trl.json").write_text(json.dumps([{"prompt": "Say 7."}]))
    (tmp_path / "mixed.json").write_text(json.dumps([{"instruction": None, "question": "Q?"}]))
    assert load_prompt_data(str(tmp_path / "trl.json"))[0]["instruction"] == "Say 7."
    assert load_prompt_data(str(tmp_path / "mixed.json"))[0]["instruction"] == "Q?"
    sampled, real_sample = [], ppo.sample_responses

    def sample(policy, prompts, *args, **kwargs):
        sampled.extend(prompts)
        return real_sample(policy, prompts, *args, **kwargs)

    monkeypatch.setattr(ppo, "sample_responses", sample)
    summary = run_grpo(grpo_config(tmp_path, data=str(tmp_path / "gsm8k.jsonl"), max_steps=1))
    assert summary["iterations"] == 1
    assert sampled and all(b"Question" in bytes(t for t in p if t < 256) for p in sampled)  # the questions


def test_grpo_with_a_saved_reward_model_lora_kl_and_several_epochs(tmp_path):
    from llmkern.data.tokenizer import get_tokenizer
    from llmkern.finetune.reward import RewardModel, save_reward_model

    torch.manual_seed(1)
    rm = RewardModel(GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=32, n_layer=1, n_head=2,
                                               n_embd=32, backend="torch")))
    save_reward_model(str(tmp_path / "rm"), 0, rm, get_tokenizer("bytes"))
    write_grpo_data(tmp_path, with_answers=False)
    config = grpo_config(tmp_path, reward="model", reward_model=str(tmp_path / "rm"), template="alpaca", max_steps=2,
                         lora_rank=4, lr=1e-2, kl_coef=0.1, grpo_epochs=2, loss_aggregation="sequence",
                         rollout_batch=2, group_size=4, batch_size=3, clip_range_high=0.28)
    summary = run_grpo(config)
    # 8 responses an iteration, 3 a minibatch: 3 steps a pass, 2 passes
    assert summary["iterations"] == 2 and summary["optimizer_steps"] == 2 * 2 * 3
    train = [r for r in read_metrics(summary["metrics"]) if r["kind"] == "train"]
    assert all(math.isfinite(r[k]) for r in train for k in ("reward", "kl", "loss", "clip_fraction"))
    assert train[0]["flat_groups"] == 0  # a reward model's scores are never all equal
    assert "val_kl" in summary["last_eval"]
    model, _, _ = load_trained_model(config.out_dir, "cpu")  # LoRA merged: a plain GPT
    base, _, _ = load_trained_model(str(tmp_path / "base"), "cpu")
    assert set(model.state_dict()) == set(base.state_dict())
    assert not torch.equal(model.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)
    assert summary["lora"] == str(tmp_path / "grpo" / "lora.safetensors") and os.path.isfile(summary["lora"])


def test_a_stopped_grpo_run_resumes_to_the_same_policy(tmp_path, monkeypatch):
    """5 iterations, the state saved every 2 (with several minibatches and two epochs, so that the restored RNG
    orders them alike, and 16 rows sampled 5 a call): stopping in iteration 4 and resuming from 2 ends with the
    uninterrupted run's policy, bit for bit (CPU), and its log."""
    from llmkern.finetune import grpo

    settings = {"max_steps": 5, "ckpt_interval": 2, "grpo_epochs": 2, "group_size": 4, "batch_size": 4,
                "grad_accum": 2, "kl_coef": 0.05, "val_fraction": 0.0, "generation_batch": 5}
    whole = run_grpo(make_grpo_run(tmp_path / "a", **settings))
    real_iteration, calls = grpo.grpo_iteration, {"n": 0}

    def stops_in_iteration_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_iteration(*args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_iteration", stops_in_iteration_4)
    config = make_grpo_run(tmp_path / "b", **settings)
    with pytest.raises(KeyboardInterrupt):
        run_grpo(config)
    monkeypatch.setattr(grpo, "grpo_iteration", real_iteration)
    resumed = run_grpo(dataclasses.replace(config, resume=True))
    assert resumed["optimizer_steps"] == whole["optimizer_steps"]
    a, b = load_checkpoint(whole["checkpoint"]).model, load_checkpoint(resumed["checkpoint"]).model
    assert all(torch.equal(a[k], b[k]) for k in a)

    def numbers(summary):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(summary["metrics"])]

    assert numbers(resumed) == numbers(whole)


def test_a_grpo_resume_with_other_objective_settings_or_answers_is_refused(tmp_path):
    config = make_grpo_run(tmp_path, max_steps=2, ckpt_interval=1, keep_train_state=True, val_fraction=0.0)
    run_grpo(config)
    with pytest.raises(ValueError, match=r"'loss_aggregation': \('token', 'sequence'\)"):
        run_grpo(dataclasses.replace(config, resume=True, loss_aggregation="sequence"))
    rows = json.loads((tmp_path / "prompts.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps([{**r, "answer": "8"} for r in rows]))  # the same prompts
    with pytest.raises(ValueError, match="examples_sha256"):
        run_grpo(dataclasses.replace(config, resume=True, data=str(tmp_path / "other.json")))


@pytest.mark.parametrize("overrides,match", [
    ({"reward": "exact"}, "reward must be one of"),
    ({"loss_aggregation": "mean"}, "loss_aggregation must be one of"),
    ({"group_size": 1}, "group_size must be at least 2"),
    ({"clip_range": 0.0, "grpo_epochs": 2}, "clip_range must be > 0"),
    ({"clip_range_high": -0.1, "grpo_epochs": 2}, "clip_range_high must be >= 0"),
    ({"kl_coef": -0.1}, "kl_coef"),
    ({"kl_coef": math.inf}, "kl_coef"),
    ({"std_eps": 0.0}, "std_eps"),
    ({"grpo_epochs": 0}, "grpo_epochs"),
    ({"rollout_batch": 0}, "rollout_batch"),
    ({"temperature": 0.0}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"generation_batch": -1}, "generation_batch must be >= 1"),
    ({"max_new_tokens": 40}, "max_new_tokens"),
])
def test_grpo_bad_settings(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        grpo_config(tmp_path, **overrides).validate()


def test_grpo_refusals_before_any_model_loads(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    write_grpo_data(tmp_path, with_answers=False)
    monkeypatch.setattr("llmkern.finetune.base.load_gpt", no_loading)
    shutil.copytree(tmp_path / "base", tmp_path / "grpo")  # out_dir holds a run
    with pytest.raises(ValueError, match="already holds a run"):  # a fresh start over it needs overwrite
        run_grpo(grpo_config(tmp_path, reward="model", reward_model=str(tmp_path / "base")))
    shutil.rmtree(tmp_path / "grpo")
    with pytest.raises(ValueError, match=r"prompts.json: example 0 needs an 'answer'"):
        run_grpo(grpo_config(tmp_path))
    with pytest.raises(ValueError, match="reward='model' needs reward_model"):
        run_grpo(grpo_config(tmp_path, reward="model"))
    with pytest.raises(FileNotFoundError, match="reward_model .*nowhere"):
        run_grpo(grpo_config(tmp_path, reward="model", reward_model=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="reward='answer' compares final answers"):
        run_grpo(grpo_config(tmp_path), reward_model=torch.nn.Identity())
    with pytest.raises(ValueError, match="GRPO takes dtype .* not 'float16'"):
        run_grpo(grpo_config(tmp_path, dtype="float16"))
    with pytest.raises(TypeError, match="config must be a GRPOConfig"):
        run_grpo(get_method("ppo")[0]())
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="GRPO runs in one process or data-parallel.*parallel='fsdp'"):
        run_grpo(grpo_config(tmp_path, parallel="fsdp"))


def test_settings_turned_off_by_others_warn(tmp_path):
    with pytest.warns(UserWarning, match="std_eps=0.01 has no effect: scale_rewards=false"):
        grpo_config(tmp_path, scale_rewards=False, std_eps=0.01).validate()
    with pytest.warns(UserWarning, match="clip_range_high=0.28 has no effect: grpo_epochs=1"):
        grpo_config(tmp_path, clip_range_high=0.28).validate()
    with pytest.warns(UserWarning, match="reward_model='rm' has no effect: reward='answer'"):
        grpo_config(tmp_path, reward_model="rm").validate()


def test_grpo_is_a_finetune_method():
    config_cls, run = get_method("grpo")
    assert config_cls is GRPOConfig and run is run_grpo


def test_grpo_responses_end_at_the_templates_end_marker(tmp_path, monkeypatch):
    """A chat-tuned policy that goes on past its turn's end marker (ChatML's <|im_end|>, ordinary text to the bytes
    tokenizer) into a made-up next turn: sampling stops at the marker, so neither the loss nor the answer reward
    sees the made-up turn, whose last number (8) would otherwise be read as the answer."""
    import llmkern.model
    from llmkern.data.tokenizer import ENDOFTEXT

    script = list(b"It is 7.<|im_end|>\n<|im_start|>user\nNo, 8")

    monkeypatch.setattr(llmkern.model, "generate", scripted_generate(script))
    config = make_grpo_run(tmp_path, template="chatml", max_steps=1, max_len=64, max_new_tokens=len(script))
    summary = run_grpo(config)
    [train] = [r for r in read_metrics(summary["metrics"]) if r["kind"] == "train"]
    assert train["response_length"] == len(b"It is 7.<|im_end|>")
    assert train["reward"] == 1.0 and summary["last_eval"]["val_reward"] == 1.0

    from llmkern.data.tokenizer import get_tokenizer
    from llmkern.finetune.grpo import AnswerReward

    # the eot's text written as ordinary bytes, and the marker, each end the text the answer is read from
    reward = AnswerReward(get_tokenizer("bytes"), ("<|im_end|>",))
    responses = [list(f"It is 7.{ENDOFTEXT} So 8".encode()), list(b"7<|im_end|>8"), list(b"8<|im_end|>7"), [55, 256]]
    assert reward([[1]] * 4, responses, ["7"] * 4, torch.device("cpu")).tolist() == [1.0, 1.0, 0.0, 1.0]


def test_a_reward_model_reads_a_response_ended_at_its_marker_with_end_of_text_as_it_was_trained():
    """Sampling stops at the template's end marker; a reward model reads its score at end-of-text (reward.
    encode_pair_text: prompt + output + marker + end-of-text), so that is what it is given. A response cut at
    max_new_tokens stays as it is."""
    from llmkern.data.tokenizer import get_tokenizer
    from llmkern.finetune.grpo import ModelReward
    from llmkern.finetune.templates import PromptFormat, response_stop

    tokenizer = get_tokenizer("bytes")
    seen = []

    def reward_model(ids, lengths):
        seen.extend(row[:n].tolist() for row, n in zip(ids, lengths))
        return lengths.float()

    reward = ModelReward(reward_model, tokenizer.eot_token, None, response_stop(tokenizer, PromptFormat("chatml")))
    prompt, marker = [65, 66], list(b"<|im_end|>")
    responses = [[55] + marker, [55] + marker + [256], [55, 55, 55], [55, 256]]
    scores = reward([prompt] * 4, responses, [None] * 4, torch.device("cpu"))
    assert seen == [prompt + [55] + marker + [256], prompt + [55] + marker + [256], prompt + [55, 55, 55],
                    prompt + [55, 256]]
    assert scores.tolist() == [float(len(s)) for s in seen]


def test_a_reward_models_scores_in_chunks_are_one_passs_and_no_pass_reads_more_rows():
    """7 texts of ragged lengths, 3 a pass (the last chunk short): one pass's scores, each text read once, every
    chunk padded as in one pass."""
    from test_ppo import CountingReward, ragged_prompts, tiny_reward_model

    from llmkern.finetune.grpo import ModelReward

    scorer = CountingReward(tiny_reward_model(4))
    prompts = ragged_prompts(7, seed=9)
    responses = [[int(t) for t in torch.randint(0, 256, (n,))] for n in (3, 1, 5, 2, 6, 4, 1)]
    cpu = torch.device("cpu")
    whole = ModelReward(scorer, 256, None)(prompts, responses, [None] * 7, cpu)
    assert scorer.rows == [7] and whole.unique().numel() == 7
    chunked = ModelReward(scorer, 256, None, rows_per_pass=3)(prompts, responses, [None] * 7, cpu)
    assert scorer.rows[1:] == [3, 3, 1]
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_a_grpo_run_reads_no_more_than_batch_size_rows_in_any_forward_pass(tmp_path, monkeypatch):
    """8 rows an iteration and 4 held-out prompts, batch_size=3 and generation_batch=3, a reward model, a reference
    and pi_old (grpo_epochs=2): sampling, rewards, log-probs, evaluation and the updates each read at most 3 rows a
    pass."""
    from test_ppo import CountingReward, RowCounter

    counter = RowCounter(monkeypatch)
    reward = CountingReward(HighByteReward())
    config = make_grpo_run(tmp_path, reward="model", max_steps=1, rollout_batch=2, group_size=4, batch_size=3,
                           generation_batch=3, kl_coef=0.1, grpo_epochs=2, val_fraction=0.25)
    summary = run_grpo(config, reward_model=reward)
    assert summary["val_prompts"] == 4
    assert max(counter.rows) == max(reward.rows) == 3
    assert sum(reward.rows) == 8 + 2 * 4  # the iteration's rows, and the two evaluations'


REWARD_MODULE = '''
import math

CALLS = []


def odd_length(prompt, response, answer):
    """1.0 for a response of an odd number of characters: something an untrained policy's groups differ in."""
    CALLS.append((prompt, response, answer))
    return float(len(response) % 2)


NOT_A_FUNCTION = 3


def returns(value):
    return lambda prompt, response, answer: value
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """An importable module of reward functions (a fresh import for each test)."""
    import importlib
    import sys

    name = f"grpo_rewards_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, importlib.import_module(name)
    sys.modules.pop(name, None)


def test_grpo_with_a_reward_function_of_the_prompt_response_and_answer(tmp_path, reward_module):
    name, module = reward_module
    write_grpo_data(tmp_path)
    rows = json.loads((tmp_path / "prompts.json").read_text())
    for row in rows[::2]:
        row.pop("answer")  # optional: the function gets None
    (tmp_path / "prompts.json").write_text(json.dumps(rows))
    config = grpo_config(tmp_path, reward="function", reward_function=f"{name}:odd_length", max_steps=2,
                         val_fraction=0.0, template="chatml", ckpt_interval=1, keep_train_state=True)
    summary = run_grpo(config)
    train = [r for r in read_metrics(summary["metrics"]) if r["kind"] == "train"]
    rows_per_iteration = config.rollout_batch * config.group_size
    assert len(module.CALLS) == 2 * rows_per_iteration
    for it, record in enumerate(train):
        calls = module.CALLS[it * rows_per_iteration : (it + 1) * rows_per_iteration]
        assert record["reward"] == pytest.approx(sum(len(r) % 2 for _, r, _ in calls) / rows_per_iteration)
    for prompt, response, answer in module.CALLS:  # the prompt's text as the model read it (cut to max_len)
        question = int(re.search(r"(\d+)\?<\|im_end\|>\n<\|im_start\|>assistant\n$", prompt).group(1))
        assert answer == rows[question].get("answer")
        assert "<|endoftext|>" not in response and "<|im_end|>" not in response
    assert {answer for _, _, answer in module.CALLS} == {None, "7"}
    with pytest.raises(ValueError, match="reward_function"):  # part of the run's position
        run_grpo(dataclasses.replace(config, resume=True, reward_function=f"{name}:returns"))


def test_reward_function_refusals(tmp_path, reward_module):
    from llmkern.data.tokenizer import get_tokenizer
    from llmkern.finetune.grpo import FunctionReward, load_reward_function

    name, module = reward_module
    for spec in ("", "nocolon", ":f", f"{name}:"):
        with pytest.raises(ValueError, match="reward_function='module:function'"):
            grpo_config(tmp_path, reward="function", reward_function=spec).validate()
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'"):
        load_reward_function("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no 'missing'"):
        load_reward_function(f"{name}:missing")
    with pytest.raises(TypeError, match="names a int, not a function"):
        load_reward_function(f"{name}:NOT_A_FUNCTION")
    assert load_reward_function(f" {name} : odd_length ") is module.odd_length
    tokenizer = get_tokenizer("bytes")
    for bad in (math.nan, "1.0", None, math.inf):
        reward = FunctionReward(tokenizer, module.returns(bad), "f")
        with pytest.raises(ValueError, match="reward_function 'f' returned .*; it must return a finite float"):
            reward([[65]], [[66]], [None], torch.device("cpu"))
    for good, value in ((True, 1.0), (0, 0.0), (-2.5, -2.5)):
        reward = FunctionReward(tokenizer, module.returns(good), "f")
        assert reward([[65]], [[66]], [None], torch.device("cpu")).tolist() == [value]
    write_grpo_data(tmp_path, with_answers=False)  # answers are optional; a missing module is told before loading
    with pytest.raises(ValueError, match="cannot import"):
        run_grpo(grpo_config(tmp_path, reward="function", reward_function="no_such_module_xyz:f"))
    with pytest.warns(UserWarning, match="reward_function=.* has no effect: reward='answer' calls no function"):
        grpo_config(tmp_path, reward_function=f"{name}:odd_length").validate()


# --- data-parallel (torchrun) ------------------------------------------------------------------------------------

class HighByteReward(torch.nn.Module):
    """A hand-made reward model with RewardModel's interface: the number of bytes 128..255 in the text (the prompts
    are ASCII, so it counts the response's); an untrained policy's groups differ in it."""

    def forward(self, ids, lengths):
        real = torch.arange(ids.size(1), device=ids.device)[None, :] < lengths[:, None]
        return ((ids >= 128) & (ids < 256) & real).float().sum(dim=1)


def _grpo_worker(rank, port, tmp_path):
    """A 2-process GRPO run of 2 iterations; each rank writes its final weights and the responses it sampled."""
    spawned.enter(rank, port)
    from llmkern.finetune import base, ppo

    sampled = []
    real_sample, real_save = ppo.sample_responses, base.save_finetuned

    def sample(policy, prompts, config, eot, seed, stop=None, first_row=0):
        responses = real_sample(policy, prompts, config, eot, seed, stop, first_row)
        sampled.append({"seed": seed, "prompts": prompts, "responses": responses})
        return responses

    def save(out_dir, step, model_state, meta, keep=1):  # every rank's weights, not only rank 0's
        save_file({k: v.clone() for k, v in model_state.items()}, str(tmp_path / f"rank{rank}.safetensors"))
        return real_save(out_dir, step, model_state, meta, keep)

    ppo.sample_responses, base.save_finetuned = sample, save
    run_grpo(grpo_config(tmp_path, reward="model", max_steps=2, rollout_batch=2, group_size=4, batch_size=3,
                         val_fraction=0.0, seed=3), reward_model=HighByteReward())
    (tmp_path / f"sampled_rank{rank}.json").write_text(json.dumps(sampled))
    # "token" divides each step by its tokens on both ranks (over 2: the ranks' gradients are averaged)
    from llmkern.train import distributed

    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, : 2 + 3 * rank] = True  # rank 0: 2 tokens a row, rank 1: 5
    steps = [[torch.tensor([0, 1])], [torch.tensor([2]), torch.tensor([3])]]
    normalizers = {a: step_normalizers(steps, mask, a, distributed.detect()) for a in ("token", "sequence")}
    (tmp_path / f"normalizers_rank{rank}.json").write_text(json.dumps(normalizers))
    spawned.leave()


def test_two_process_grpo_samples_whole_groups_per_rank_and_stays_in_sync(tmp_path):
    write_grpo_data(tmp_path)
    mp.start_processes(_grpo_worker, args=(spawned.free_port(), tmp_path), nprocs=WORLD, join=True,
                       start_method="spawn")
    sampled = [json.loads((tmp_path / f"sampled_rank{r}.json").read_text()) for r in range(WORLD)]
    for a, b in zip(*sampled):
        assert a["seed"] != b["seed"]
        for rank_sample in (a, b):  # two prompts, each four times in a row: whole groups on one rank
            prompts = rank_sample["prompts"]
            assert len(prompts) == 8 and prompts[0] == prompts[3] != prompts[4] == prompts[7]
        assert a["prompts"][0] != b["prompts"][0]  # each rank its own prompts
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    base = load_checkpoint(str(tmp_path / "base")).model
    assert not torch.equal(weights[0]["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])
    train = [r for r in read_metrics(str(tmp_path / "grpo" / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    for rank in range(WORLD):  # both steps: 2 rows on each rank, (2 * 2 + 2 * 5) / 2 tokens
        normalizers = json.loads((tmp_path / f"normalizers_rank{rank}.json").read_text())
        assert normalizers == {"token": [7.0, 7.0], "sequence": [2.0, 2.0]}
