"""PPO: GAE against a plain double loop, the clipped losses against hand computations, config checks,
a short end-to-end run whose mean reward rises under a toy reward model, resume, and two gloo processes
(data-parallel: their own samples, the same weights, advantages whitened over both, exact resume)."""

import copy
import dataclasses
import json
import math
import os
import shutil
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from llmkern.finetune.base import save_finetuned
from llmkern.finetune.ppo import PPOConfig, gae, masked_whiten, ppo_policy_loss, ppo_value_loss, run_ppo
from llmkern.model import GPT, GPTConfig
from llmkern.train.checkpoint import load_checkpoint
from llmkern.train.inference import load_trained_model
from llmkern.train.metrics import read_metrics

import spawned
from spawned import WORLD


# --- GAE ---------------------------------------------------------------------------------------------

def gae_by_loops(rewards, values, mask, gamma, lam):
    """Advantages straight from the definition: A_t = sum_l (gamma lam)^l delta_{t+l} over the run of
    real steps that t belongs to, delta_k = r_k + gamma V_{k+1} [k+1 real] - V_k."""
    batch, steps = rewards.shape
    adv = torch.zeros(batch, steps, dtype=torch.float64)
    for b in range(batch):
        def live(k):
            return k < steps and bool(mask[b, k])

        def delta(k):
            next_value = values[b, k + 1].item() if live(k + 1) else 0.0
            return rewards[b, k].item() + gamma * next_value - values[b, k].item()

        for t in range(steps):
            if not live(t):
                continue
            total, k, weight = 0.0, t, 1.0
            while live(k):
                total += weight * delta(k)
                weight *= gamma * lam
                k += 1
            adv[b, t] = total
    return adv, (adv + values.double()) * mask.double()


def ragged_batch(batch, steps, seed):
    """Random rewards and values, and masks of one response per row at a random start and length."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, steps, generator=g, dtype=torch.float64)
    values = torch.randn(batch, steps, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, steps, dtype=torch.bool)
    for b in range(batch):
        start = int(torch.randint(0, steps, (1,), generator=g))
        length = int(torch.randint(1, steps - start + 1, (1,), generator=g))
        mask[b, start : start + length] = True
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 1.0), (1.0, 0.0), (0.0, 0.5)])
def test_gae_matches_double_loop(gamma, lam):
    rewards, values, mask = ragged_batch(6, 13, seed=int(100 * gamma + 10 * lam))
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_by_loops(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


def test_gae_any_mask_and_edge_cases():
    rewards, values, _ = ragged_batch(5, 17, seed=7)
    mask = torch.rand(5, 17, generator=torch.Generator().manual_seed(8)) < 0.6  # several runs per row
    for gamma, lam in ((0.95, 0.9), (1.0, 1.0)):
        adv, ret = gae(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = gae_by_loops(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(adv, ref_adv)
        torch.testing.assert_close(ret, ref_ret)

    rewards, values, mask = ragged_batch(4, 11, seed=9)
    m = mask.double()
    # lam = 1: returns are the discounted rewards-to-go of each response, whatever the values.
    for gamma in (1.0, 0.9):
        _, ret = gae(rewards, values, mask, gamma, 1.0)
        to_go = torch.zeros_like(rewards)
        running = torch.zeros(4, dtype=torch.float64)
        for t in reversed(range(11)):
            running = (rewards[:, t] + gamma * running) * m[:, t]
            to_go[:, t] = running
        torch.testing.assert_close(ret, to_go)
    # lam = 0: one-step TD errors; gamma = 0: reward minus value.
    adv, _ = gae(rewards, values, mask, 0.0, 0.7)
    torch.testing.assert_close(adv, (rewards - values) * m)
    with pytest.raises(ValueError, match="lam"):
        gae(rewards, values, mask, 1.0, 1.5)
    with pytest.raises(ValueError, match="mask"):
        gae(rewards, values, mask[:, :5], 1.0, 0.9)


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, -7.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    w = masked_whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 5.0])
    expected = (real - real.mean()) / real.std(unbiased=False)
    torch.testing.assert_close(w[mask], expected, atol=1e-5, rtol=1e-5)
    assert torch.all(w[~mask] == 0)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3\), x has \(2, 4\)"):  # was torch's broadcast error
        masked_whiten(x, mask[:, :3])


# --- the clipped losses --------------------------------------------------------------------------------

def test_ppo_policy_loss_hand_computed():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.5, 9.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]], dtype=torch.float64)
    new = (old + ratios.double().log()).requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -2.0, -1.0, 50.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)  # the last token is padding
    loss, clip_fraction = ppo_policy_loss(new, old, advantages, mask, clip_range=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)): -1.2 (clipped), -0.5, 2.2, 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2 + 0.8) / 4)
    assert clip_fraction.item() == pytest.approx(0.5)
    loss.backward()
    # d/d logp of -A r is -A r; the clipped tokens and the padding get no gradient
    expected_grad = torch.tensor([[0.0, -0.5, 2.2, 0.0, 0.0]], dtype=torch.float64) / 4
    torch.testing.assert_close(new.grad, expected_grad)


def test_ppo_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.0, 4.0]])
    old = torch.tensor([[0.5, 0.0, 0.0]])
    returns = torch.tensor([[2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    # token 0: (1 - 2)^2 = 1 vs clipped (0.7 - 2)^2 = 1.69; token 1: 1 vs 1
    loss = ppo_value_loss(values, old, returns, mask, value_clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert ppo_value_loss(values, old, returns, mask, value_clip=0.0).item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)


def test_score_rollout_rewards_are_the_kl_penalty_plus_the_score_on_the_last_response_token():
    """Every field of a scored rollout against each row scored alone by plain log-softmax: the per-token
    reward is -kl_coef * (log pi - log pi_ref) on the response's positions, plus the reward model's score
    on the position that predicts the response's last token; 0 on the prompt and the padding."""
    from llmkern.finetune.ppo import PolicyWithValue, score_rollout

    def tiny(seed):
        torch.manual_seed(seed)
        return GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                         backend="torch")).eval()

    model, reference = PolicyWithValue(tiny(0)), tiny(1)
    torch.nn.init.normal_(model.value_head.weight)  # non-zero values, so that a misplaced one shows
    prompts, responses = [[5, 6, 7], [8, 9, 10, 11, 12]], [[200, 3, 150, 99], [7]]  # the shorter response pads

    class LengthReward(nn.Module):  # a score of its own per row: 0.5 * its text's length
        def forward(self, ids, lengths):
            return 0.5 * lengths.float()

    kl_coef = 0.3
    rollout = score_rollout(model, reference, LengthReward(), prompts, responses, pad_id=256, kl_coef=kl_coef)
    assert rollout.scores.tolist() == [3.5, 3.0]
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        row = torch.tensor([prompt + response])
        policy_lp = torch.log_softmax(model.policy(row[:, :-1])[0].double(), -1)[0]
        ref_lp = torch.log_softmax(reference(row[:, :-1])[0].double(), -1)[0]
        values = model.value_head(model.policy.hidden_states(row[:, :-1])).squeeze(-1)[0]
        start, end = len(prompt) - 1, len(prompt) + len(response) - 1  # the positions that predict the response
        expected = torch.zeros(rollout.rewards.size(1), dtype=torch.float64)
        for t in range(start, end):
            token = row[0, t + 1]
            expected[t] = -kl_coef * (policy_lp[t, token] - ref_lp[t, token])
            torch.testing.assert_close(rollout.logprobs[b, t].double(), policy_lp[t, token], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rollout.ref_logprobs[b, t].double(), ref_lp[t, token], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rollout.values[b, t], values[t], rtol=1e-5, atol=1e-5)
        expected[end - 1] += rollout.scores[b]
        torch.testing.assert_close(rollout.rewards[b].double(), expected, rtol=1e-5, atol=1e-5)
        assert rollout.mask[b].nonzero().flatten().tolist() == list(range(start, end))
        outside = ~rollout.mask[b]
        for field in (rollout.logprobs, rollout.ref_logprobs, rollout.values):
            assert torch.all(field[b][outside] == 0)


@pytest.mark.parametrize("clip_range", [0.0, -0.2, math.nan, True, "0.2"])
def test_ppo_policy_loss_refuses_a_clip_range_that_is_not_a_positive_number(clip_range):
    # A negative clip_range clamped every ratio to 1 - c > 1 + c: a loss of the wrong sign and no error.
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="clip_range must be a number > 0"):
        ppo_policy_loss(x, x, x, x > -1, clip_range=clip_range)


@pytest.mark.parametrize("value_clip", [math.nan, True, "0.2"])
def test_ppo_value_loss_refuses_a_value_clip_that_is_not_a_number(value_clip):
    # NaN compared as "no clipping" and silently trained unclipped.
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="value_clip must be a number"):
        ppo_value_loss(x, x, x, x > -1, value_clip=value_clip)


# --- end to end ------------------------------------------------------------------------------------------

MAX_NEW = 8


class HighByteReward(nn.Module):
    """A hand-made reward model with RewardModel's interface: the fraction of a response's tokens that are
    bytes 128..255 (the prompts are ASCII, so counting over the whole row counts the response)."""

    def forward(self, ids, lengths):
        real = torch.arange(ids.size(1), device=ids.device)[None, :] < lengths[:, None]
        high = (ids >= 128) & (ids < 256) & real
        return high.float().sum(dim=1) / MAX_NEW


def make_ppo_run(tmp_path, **overrides):
    """Writes a tiny base and 12 prompts; a PPOConfig on them."""
    write_ppo_data(tmp_path)
    return ppo_config(tmp_path, **overrides)


def write_ppo_data(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_size=257, block_size=64, n_layer=1, n_head=2, n_embd=32,
                                   backend="torch")
    model = GPT(config)
    save_finetuned(str(tmp_path / "base"), 0, model.state_dict(),
                   {"model_config": config.to_dict(), "tokenizer": "bytes"})
    prompts = [{"instruction": f"Write {word}.", "input": ""}
               for word in ("a word", "a number", "a name", "a colour", "a city", "a fruit", "a verb", "an animal",
                            "a song", "a poem", "a joke", "a date")]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))


def ppo_config(tmp_path, **overrides):
    settings = dict(base=str(tmp_path / "base"), data=str(tmp_path / "prompts.json"), out_dir=str(tmp_path / "ppo"),
                    reward_model="(hand-made)", max_steps=20, rollout_batch=16, batch_size=8, max_len=40,
                    max_new_tokens=MAX_NEW, lr=1e-2, min_lr=1e-3, warmup_steps=2, kl_coef=0.01,
                    val_fraction=0.2, eval_interval=0, device="cpu", progress=False)
    return PPOConfig(**{**settings, **overrides})


def test_ppo_end_to_end_raises_reward(tmp_path):
    config = make_ppo_run(tmp_path)
    summary = run_ppo(config, reward_model=HighByteReward())
    assert summary["method"] == "ppo" and summary["out_dir"] == config.out_dir
    records = read_metrics(summary["metrics"])
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21))
    rewards = [r["reward"] for r in train]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1, rewards
    for key in ("reward", "kl", "clip_fraction", "value_loss", "policy_loss", "lr"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert [r["kind"] for r in records].count("eval") == 2  # before and after
    assert summary["first_eval"]["val_kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert summary["last_eval"]["val_reward"] > summary["first_eval"]["val_reward"]
    model, tokenizer, _ = load_trained_model(str(tmp_path / "ppo"), "cpu")
    assert isinstance(model, GPT) and tokenizer.spec == "bytes"
    assert os.path.isfile(tmp_path / "ppo" / "loss.png")


def test_ppo_with_saved_reward_model_and_lora(tmp_path):
    from llmkern.data.tokenizer import get_tokenizer
    from llmkern.finetune.reward import RewardModel, save_reward_model

    torch.manual_seed(1)
    rm = RewardModel(GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=32, n_layer=1, n_head=2,
                                               n_embd=32, backend="torch")))
    save_reward_model(str(tmp_path / "rm"), 0, rm, get_tokenizer("bytes"))
    config = make_ppo_run(tmp_path, reward_model=str(tmp_path / "rm"), max_steps=2, lora_rank=4, lr=1e-3)
    summary = run_ppo(config)
    assert summary["iterations"] == 2 and summary["optimizer_steps"] == 2 * 2 * 2
    assert all(math.isfinite(r["reward"]) for r in read_metrics(summary["metrics"]) if r["kind"] == "train")
    model, _, _ = load_trained_model(str(tmp_path / "ppo"), "cpu")  # LoRA merged: a plain GPT
    base, _, _ = load_trained_model(str(tmp_path / "base"), "cpu")
    assert set(model.state_dict()) == set(base.state_dict())
    assert not torch.equal(model.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)
    assert summary["lora"] == str(tmp_path / "ppo" / "lora.safetensors") and os.path.isfile(summary["lora"])


def test_ppo_prompts_in_its_template_and_warns_when_the_reward_model_learned_another(tmp_path):
    from llmkern.data.tokenizer import get_tokenizer
    from llmkern.finetune.reward import RewardModel, save_reward_model
    from llmkern.finetune.templates import saved_prompt_format

    rm = RewardModel(GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=32, n_layer=1, n_head=2,
                                               n_embd=32, backend="torch")))
    save_reward_model(str(tmp_path / "rm"), 0, rm, get_tokenizer("bytes"))  # saves no template: alpaca
    config = make_ppo_run(tmp_path, reward_model=str(tmp_path / "rm"), max_steps=1, template="plain")
    with pytest.warns(UserWarning, match="trained with template 'alpaca'.*use 'plain'"):
        summary = run_ppo(config)
    assert summary["template"] == "plain"
    assert saved_prompt_format(load_checkpoint(str(tmp_path / "ppo")).meta).template == "plain"


@pytest.mark.parametrize("overrides,match", [
    (dict(reward_model=""), "reward_model"),
    (dict(kl_coef=-0.1), "kl_coef"),
    (dict(clip_range=0.0), "clip_range"),
    (dict(lam=1.5), "lam"),
    (dict(temperature=0.0), "temperature"),
    (dict(max_new_tokens=40), "max_new_tokens"),
])
def test_ppo_bad_config(tmp_path, overrides, match):
    config = make_ppo_run(tmp_path, **overrides)
    with pytest.raises(ValueError, match=match):
        run_ppo(config)


@pytest.mark.parametrize("overrides,match", [
    (dict(kl_coef=math.inf), "kl_coef"),  # every reward NaN
    (dict(vf_coef=math.inf), "vf_coef"),
    (dict(temperature=math.inf), "temperature"),  # tokens drawn uniformly, whatever the policy
    (dict(max_new_tokens=40), "max_new_tokens"),  # max_len=40: was told only once the base was loaded
])
def test_ppo_settings_are_checked_at_config_time(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        ppo_config(tmp_path, **overrides).validate()


def test_a_stopped_ppo_run_resumes_to_the_same_policy(tmp_path, monkeypatch):
    """5 iterations, the state saved every 2: stopping in iteration 4 and resuming from 2 ends with the
    policy of the run that never stopped, bit for bit (CPU). Its state kept (keep_train_state=true) is that of
    its end: resumed again, the run is complete and trains nothing, whatever its lr now."""
    import llmkern.finetune.ppo as ppo

    whole = run_ppo(make_ppo_run(tmp_path / "a", max_steps=5, ckpt_interval=2, eval_interval=0),
                    reward_model=HighByteReward())
    real_iteration = ppo.ppo_iteration
    calls = {"n": 0}

    def stops_in_iteration_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_iteration(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_iteration", stops_in_iteration_4)
    config = make_ppo_run(tmp_path / "b", max_steps=5, ckpt_interval=2, eval_interval=0)
    with pytest.raises(KeyboardInterrupt):
        run_ppo(config, reward_model=HighByteReward())
    monkeypatch.setattr(ppo, "ppo_iteration", real_iteration)
    stopped = tmp_path / "stopped"
    shutil.copytree(config.out_dir, stopped)  # its state of iteration 2, for the lr change below
    resumed = run_ppo(dataclasses.replace(config, resume=True, keep_train_state=True), reward_model=HighByteReward())
    assert resumed["optimizer_steps"] == whole["optimizer_steps"]
    a, b = load_checkpoint(whole["checkpoint"]).model, load_checkpoint(resumed["checkpoint"]).model
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(resumed["metrics"]) if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    with pytest.warns(UserWarning, match="schedule changed since the checkpoint"):  # from the iteration-2 state
        run_ppo(dataclasses.replace(config, out_dir=str(stopped), resume=True, lr=config.lr / 2),
                reward_model=HighByteReward())

    log = read_metrics(resumed["metrics"])
    def no_iteration(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(ppo, "ppo_iteration", no_iteration)
    with pytest.warns(UserWarning, match=r"already complete: .* at its end \(5 iterations\), so nothing is trained"):
        again = run_ppo(dataclasses.replace(config, resume=True, lr=config.lr / 2), reward_model=HighByteReward())
    assert (again["iterations"], again["optimizer_steps"]) == (5, whole["optimizer_steps"])
    c = load_checkpoint(again["checkpoint"]).model
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert read_metrics(again["metrics"]) == log


def test_a_ppo_resume_with_other_prompts_or_objective_settings_is_refused(tmp_path):
    """The number of prompts alone lets another prompt file of as many slip by, and kl_coef, clip_range, ...
    make another objective: the saved state records a fingerprint of the prompts and PPO's settings."""
    config = make_ppo_run(tmp_path, max_steps=2, ckpt_interval=1, eval_interval=0, keep_train_state=True)
    run_ppo(config, reward_model=HighByteReward())  # its state at iteration 1 is kept
    prompts = json.loads((tmp_path / "prompts.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps([{**p, "instruction": p["instruction"].upper()} for p in prompts]))
    with pytest.raises(ValueError, match="examples_sha256"):
        run_ppo(dataclasses.replace(config, resume=True, data=str(tmp_path / "other.json")),
                reward_model=HighByteReward())
    with pytest.raises(ValueError, match=r"'kl_coef': \(0.01, 0.5\)"):
        run_ppo(dataclasses.replace(config, resume=True, kl_coef=0.5), reward_model=HighByteReward())
    # 5 rows per generate call sample what one call of 16 does: a run out of memory resumes with fewer
    resumed = run_ppo(dataclasses.replace(config, resume=True, generation_batch=5), reward_model=HighByteReward())
    assert resumed["iterations"] == 2


def test_ppo_refuses_fsdp_under_torchrun(tmp_path, monkeypatch):
    config = make_ppo_run(tmp_path, parallel="fsdp")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="PPO runs in one process or data-parallel.*parallel='fsdp'"):
        run_ppo(config, reward_model=HighByteReward())


def test_ppo_refuses_float16(tmp_path):
    with pytest.raises(ValueError, match="PPO takes dtype .* not 'float16'"):
        run_ppo(make_ppo_run(tmp_path, dtype="float16"), reward_model=HighByteReward())


class RecordingReward(nn.Module):
    """A reward model that keeps every text it is given (ids up to its length) and scores each by its length."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, ids, lengths):
        self.seen.extend(row[:n].tolist() for row, n in zip(ids, lengths))
        return lengths.float() / 100


def scripted_generate(script: list[int]):
    """A stand-in for llmkern.model.generate that writes `script` after every prompt, keeping generate's contract:
    a row stops after eos_token, or once stop(its new tokens) is true."""
    def generate(model, prompts, max_new_tokens, eos_token=None, stop=None, **kwargs):
        rows = []
        for prompt in prompts:
            new = []
            for token in script[:max_new_tokens]:
                new.append(token)
                if token == eos_token or (stop is not None and stop(new)):
                    break
            rows.append(list(prompt) + new)
        return rows

    return generate


def test_ppo_responses_end_at_the_templates_end_marker_and_are_scored_with_end_of_text(tmp_path, monkeypatch):
    """A chat-tuned policy that goes on past its turn's end marker (ChatML's <|im_end|>, ordinary text to the bytes
    tokenizer) into a made-up next turn: sampling stops at the marker, so PPO neither trains on the made-up turn nor
    has it scored, and the reward model reads the response with end-of-text after its marker, as it was trained
    (reward.encode_pair_text), in training and in evaluation."""
    import llmkern.model

    script = list(b"It is 7.<|im_end|>\n<|im_start|>user\nNo, 8")
    answer = list(b"It is 7.<|im_end|>")

    monkeypatch.setattr(llmkern.model, "generate", scripted_generate(script))
    reward = RecordingReward()
    config = make_ppo_run(tmp_path, template="chatml", max_steps=1, max_len=64, max_new_tokens=len(script),
                          rollout_batch=4)
    summary = run_ppo(config, reward_model=reward)
    [train] = [r for r in read_metrics(summary["metrics"]) if r["kind"] == "train"]
    assert train["response_length"] == len(answer)
    # the iteration's responses, and those of the evaluations before and after it
    assert len(reward.seen) == config.rollout_batch + 2 * summary["val_prompts"] > config.rollout_batch
    for text in reward.seen:
        assert text[-len(answer) - 1 :] == answer + [256], bytes(t for t in text if t < 256)


def tiny_gpt(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                     backend="torch")).eval()


# --- sampling in chunks (generation_batch) ----------------------------------------------------------------

def sampling_settings(generation_batch, temperature=1.0):
    return SimpleNamespace(max_new_tokens=6, temperature=temperature, top_k=0, generation_batch=generation_batch)


def ragged_prompts(count, seed):
    """`count` prompts of 1 to 5 random bytes: the chunks left-pad differently from the whole batch."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def test_sampling_in_one_call_whatever_generation_batch_covers_every_row_is_generates_sample():
    """0, exactly the rows, or more: one generate call of every row with the iteration's seed, as before chunking."""
    from llmkern.finetune.ppo import sample_responses
    from llmkern.model import generate

    policy, prompts = tiny_gpt(3), ragged_prompts(7, seed=4)
    whole = [row[len(p):] for p, row in zip(prompts, generate(policy, prompts, 6, eos_token=256, seed=11))]
    for generation_batch in (0, 7, 100):
        assert sample_responses(policy, prompts, sampling_settings(generation_batch), 256, seed=11) == whole


@pytest.mark.parametrize("generation_batch", [1, 3, 4])
def test_chunked_greedy_sampling_gives_every_row_its_own_prompts_response_in_order(generation_batch):
    """Greedy decoding draws no random numbers: chunked or not, row i must be prompt i's continuation, so any
    mix-up of the chunks' order, a dropped or repeated row shows."""
    from llmkern.finetune.ppo import sample_responses

    policy, prompts = tiny_gpt(3), ragged_prompts(10, seed=5)
    alone = [sample_responses(policy, [p], sampling_settings(0, temperature=0.0), 256, seed=1)[0] for p in prompts]
    assert len(set(map(tuple, alone))) > 1  # distinct responses, or the order would not show
    chunked = sample_responses(policy, prompts, sampling_settings(generation_batch, temperature=0.0), 256, seed=1)
    assert chunked == alone


@pytest.mark.parametrize("generation_batch", [1, 3, 5])
def test_chunked_sampling_draws_what_one_call_of_every_row_draws(generation_batch):
    """Each chunk tells generate where its rows start, so every row keeps its stream: a group of one prompt
    repeated and ragged prompts, sampled at temperature 1 a few rows a call, get one call's responses."""
    from llmkern.finetune.ppo import sample_responses

    policy = tiny_gpt(3)
    prompts = [[72, 105, 33]] * 4 + ragged_prompts(6, seed=6)  # a group of 4 (GRPO's rows), then others
    whole = sample_responses(policy, prompts, sampling_settings(0), 256, seed=11)
    assert len(set(map(tuple, whole[:4]))) == 4  # the group's rows differ: a reused stream would repeat one
    assert sample_responses(policy, prompts, sampling_settings(generation_batch), 256, seed=11) == whole


def test_a_part_sampled_with_its_first_row_draws_what_the_whole_call_draws():
    """The evaluation samples its prompts rollout_batch at a time, each part told its first row: its responses
    are then those of one call, whatever rollout_batch (each part drew from rows 0.. before)."""
    from llmkern.finetune.ppo import sample_responses

    policy = tiny_gpt(3)
    prompts = [[72, 105, 33]] * 6
    whole = sample_responses(policy, prompts, sampling_settings(0), 256, seed=11)
    parts = [sample_responses(policy, prompts[start : start + 4], sampling_settings(0), 256, seed=11, first_row=start)
             for start in (0, 4)]
    assert parts[0] + parts[1] == whole and parts[1] != whole[:2]


def test_generation_batch_is_checked_and_read_from_the_command_line(tmp_path):
    from llmkern.finetune.config import load_finetune_config

    config = load_finetune_config(PPOConfig, None, ["--data=x.json", "--generation_batch=4"])
    assert config.generation_batch == 4 and PPOConfig().generation_batch == 0
    with pytest.raises(ValueError, match="generation_batch must be >= 1 .* or 0 .* got -2"):
        load_finetune_config(PPOConfig, None, ["--data=x.json", "--generation_batch=-2"])
    with pytest.raises(ValueError, match="generation_batch"):
        load_finetune_config(PPOConfig, None, ["--data=x.json", "--generation_batch=2.5"])


# --- scoring in chunks (batch_size rows a forward pass) ---------------------------------------------------

class RowCounter:
    """Records the rows of every forward pass of every GPT (generate's, training's, scoring's: all go through
    _hidden_states_and_routing) while installed with monkeypatch."""

    def __init__(self, monkeypatch):
        real = GPT._hidden_states_and_routing
        self.rows = []

        def counted(model, idx, *args, **kwargs):
            self.rows.append(idx.size(0))
            return real(model, idx, *args, **kwargs)

        monkeypatch.setattr(GPT, "_hidden_states_and_routing", counted)


class CountingReward(nn.Module):
    """Wraps a reward model, recording the rows of each forward pass."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, []

    def forward(self, ids, lengths):
        self.rows.append(ids.size(0))
        return self.inner(ids, lengths)


def tiny_reward_model(seed):
    from llmkern.finetune.reward import RewardModel

    return RewardModel(tiny_gpt(seed)).eval()


def test_in_row_chunks_puts_tensor_and_tuple_outputs_back_in_row_order():
    from llmkern.finetune.ppo import in_row_chunks

    x, y = torch.randn(7, 3), torch.randn(7)
    seen = []

    def forward(a, b):
        seen.append(a.size(0))
        return a * b[:, None], b.sum().expand(a.size(0))  # the second: a per-pass value, to show the chunks

    whole = in_row_chunks(forward, None, x, y)
    assert seen == [7]
    torch.testing.assert_close(whole[0], x * y[:, None])
    chunked = in_row_chunks(forward, 3, x, y)
    assert seen[1:] == [3, 3, 1]
    torch.testing.assert_close(chunked[0], x * y[:, None])
    expected = torch.cat([y[s : s + 3].sum().expand(len(y[s : s + 3])) for s in (0, 3, 6)])
    torch.testing.assert_close(chunked[1], expected)
    torch.testing.assert_close(in_row_chunks(lambda a: a + 1, 2, x), x + 1)
    assert in_row_chunks(lambda a: a + 1, 4, x[:0]).shape == (0, 3)  # no rows: one pass of none


@pytest.mark.parametrize("rows_per_pass", [0, -1, True, 2.5, "3"])
def test_in_row_chunks_refuses_rows_per_pass_that_is_no_positive_int(rows_per_pass):
    from llmkern.finetune.grpo import ModelReward
    from llmkern.finetune.ppo import in_row_chunks

    with pytest.raises(ValueError, match="rows_per_pass must be an int >= 1"):
        in_row_chunks(lambda a: a, rows_per_pass, torch.zeros(3))
    with pytest.raises(ValueError, match="rows_per_pass must be an int >= 1"):
        ModelReward(HighByteReward(), 256, None, rows_per_pass=rows_per_pass)


@pytest.mark.parametrize("rows_per_pass", [1, 3, 4])
def test_score_rollout_in_chunks_gives_one_passs_scores_and_no_pass_reads_more_rows(rows_per_pass, monkeypatch):
    """7 ragged rows (not a multiple of the chunk): every field of the rollout equals one pass's, to fp32
    rounding; the policy, the reference and the reward model each read every row once, at most rows_per_pass a
    pass."""
    from llmkern.finetune.ppo import PolicyWithValue, score_rollout

    model, reference = PolicyWithValue(tiny_gpt(0)), tiny_gpt(1)
    torch.nn.init.normal_(model.value_head.weight)  # non-zero values, so that a misplaced one shows
    reward = CountingReward(tiny_reward_model(2))
    prompts = ragged_prompts(7, seed=8)
    responses = [[int(t) for t in torch.randint(0, 257, (n,))] for n in (4, 1, 6, 2, 5, 3, 1)]
    args = (model, reference, reward, prompts, responses, 256, 0.3)
    whole = score_rollout(*args, temperature=0.7)
    counter = RowCounter(monkeypatch)
    reward.rows.clear()
    chunked = score_rollout(*args, temperature=0.7, rows_per_pass=rows_per_pass)
    for field in ("ids", "targets", "mask", "token_mask"):
        assert torch.equal(getattr(chunked, field), getattr(whole, field)), field
    for field in ("logprobs", "ref_logprobs", "values", "rewards", "scores"):
        torch.testing.assert_close(getattr(chunked, field), getattr(whole, field), rtol=1e-6, atol=1e-6)
    assert whole.scores.unique().numel() == 7  # a real reward model: every row its own score
    assert max(counter.rows) == max(reward.rows) == min(rows_per_pass, 7)
    assert sum(counter.rows) == 3 * 7 and sum(reward.rows) == 7  # GPTs: the policy, the reference, the RM's body


def test_a_ppo_run_reads_no_more_than_batch_size_rows_in_any_forward_pass(tmp_path, monkeypatch):
    """rollout_batch=6 and 6 held-out prompts, batch_size=4 and generation_batch=4: sampling, scoring (policy,
    values, reference, reward model), evaluation and the updates each read at most 4 rows a pass."""
    counter = RowCounter(monkeypatch)
    reward = CountingReward(HighByteReward())
    config = make_ppo_run(tmp_path, max_steps=1, rollout_batch=6, batch_size=4, generation_batch=4,
                          val_fraction=0.5, ppo_epochs=1)
    summary = run_ppo(config, reward_model=reward)
    assert summary["val_prompts"] == 6
    assert max(counter.rows) == max(reward.rows) == 4
    assert sum(reward.rows) == 6 + 2 * 6  # the iteration's rows, and the two evaluations'


def kl_sum_at(policy, reference, prompt, response, temperature):
    """Sum over the response's tokens of log pi - log pi_ref, both of softmax(logits / temperature), in float64."""
    row = torch.tensor([prompt + response])
    start, end = len(prompt) - 1, len(prompt) + len(response) - 1  # the positions that predict the response
    targets = row[0, start + 1 : end + 1]
    total = 0.0
    with torch.no_grad():
        for model, sign in ((policy, 1.0), (reference, -1.0)):
            logp = torch.log_softmax(model(row[:, :-1])[0][0].double() / temperature, -1)
            total += sign * float(logp[torch.arange(start, end), targets].sum())
    return total


def test_ppo_takes_its_log_probs_and_kl_at_the_sampling_temperature(monkeypatch):
    """temperature=0.5 samples from softmax(logits / 0.5): the logged KL (training and evaluation) is of that
    distribution, against float64 from logits / 0.5, and the update's first ratios (the same weights, at the same
    temperature) are all 1, so nothing is clipped."""
    import contextlib

    from llmkern.finetune import ppo

    model, reference = ppo.PolicyWithValue(tiny_gpt(0)), tiny_gpt(1)
    before = copy.deepcopy(model.policy)
    sampled = []
    real_sample = ppo.sample_responses

    def sample(*args, **kwargs):
        sampled.append(real_sample(*args, **kwargs))
        return sampled[-1]

    monkeypatch.setattr(ppo, "sample_responses", sample)
    config = PPOConfig(temperature=0.5, max_new_tokens=6, rollout_batch=4, batch_size=4, ppo_epochs=1, kl_coef=0.1,
                       max_len=32, lr=1e-2)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [40, 41], [70, 71, 72, 73]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, metrics = ppo.ppo_iteration(model, reference, HighByteReward(), optimizer, prompts, config, eot=256, seed=3,
                                   lr_at=lambda step: 1e-2, step=0, autocast=contextlib.nullcontext)
    kls = [kl_sum_at(before, reference, p, r, 0.5) for p, r in zip(prompts, sampled[0])]
    assert metrics["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4, abs=1e-6)
    untempered = [kl_sum_at(before, reference, p, r, 1.0) for p, r in zip(prompts, sampled[0])]
    assert abs(sum(untempered) - sum(kls)) / len(kls) > 1e-2  # the temperature tells: the check can fail
    assert metrics["clip_fraction"] == 0.0

    evaluation = ppo.evaluate_prompts(model, reference, HighByteReward(), prompts, config, 256,
                                      contextlib.nullcontext)
    kls = [kl_sum_at(model.policy, reference, p, r, 0.5) for p, r in zip(prompts, sampled[1])]
    assert evaluation["val_kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4, abs=1e-6)


# --- data-parallel (torchrun) ------------------------------------------------------------------------------


class ThreadSum:
    """A fake all-reduce for `world` threads, one per rank: each rank's sum_over_ranks returns the sum of
    the tensors all ranks passed in this round."""

    def __init__(self, world):
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world

    def for_rank(self, rank):
        def total(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()  # every rank has put its tensor
            out = torch.stack(self.slots).sum(dim=0)
            self.barrier.wait()  # every rank has read them all before the next round overwrites them
            return out

        return total


def test_whitening_over_ranks_equals_one_process_on_the_whole_batch():
    # Two ranks' advantages with their own padding widths and response lengths.
    shards = [ragged_batch(3, 7, seed=11)[::2], ragged_batch(5, 12, seed=12)[::2]]
    shards = [(x * 3 + 2 * rank, m) for rank, (x, m) in enumerate(shards)]  # unlike statistics on each rank
    fake = ThreadSum(2)
    out = [None, None]

    def rank_work(rank):
        x, m = shards[rank]
        out[rank] = masked_whiten(x, m, sum_over_ranks=fake.for_rank(rank))

    threads = [threading.Thread(target=rank_work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # one process: the rows of both ranks in one batch, padded to the wider one
    width = max(x.size(1) for x, _ in shards)
    whole_x = torch.cat([nn.functional.pad(x, (0, width - x.size(1))) for x, _ in shards])
    whole_m = torch.cat([nn.functional.pad(m, (0, width - m.size(1))) for _, m in shards])
    whole = masked_whiten(whole_x, whole_m)
    got = torch.cat([out[r][shards[r][1]] for r in range(2)])
    torch.testing.assert_close(got, whole[whole_m])
    real = whole_x[whole_m]
    torch.testing.assert_close(got, (real - real.mean()) / real.std(unbiased=False))
    for rank, (x, m) in enumerate(shards):  # whitening each rank alone gives other numbers
        assert not torch.allclose(masked_whiten(x, m)[m], out[rank][m])
        assert torch.all(out[rank][~m] == 0)


class _Stop(Exception):
    pass


def _ppo_worker(rank, port, tmp_path):
    """Three 2-process PPO runs of 4 iterations: one uninterrupted, one stopped in iteration 3 and then
    resumed from the state saved at 2. Each rank writes its final weights and what it sampled and scored."""
    spawned.enter(rank, port)
    import llmkern.finetune.base as base
    import llmkern.finetune.ppo as ppo

    events, name, iterations = [], {"run": ""}, {"stopped": 0}
    real_sample, real_score, real_save, real_iteration = (ppo.sample_responses, ppo.score_rollout,
                                                          base.save_finetuned, ppo.ppo_iteration)

    def sample(policy, prompts, config, eot, seed, stop=None, first_row=0):
        responses = real_sample(policy, prompts, config, eot, seed, stop, first_row)
        events.append({"run": name["run"], "seed": seed, "responses": responses})
        return responses

    def score(*args, **kwargs):
        rollout = real_score(*args, **kwargs)
        events[-1]["scores"] = rollout.scores.tolist()
        return rollout

    def save(out_dir, step, model_state, meta, keep=1):  # every rank's weights, not only rank 0's
        weights = {k: v.clone() for k, v in model_state.items()}  # clones: tied weights stored apart
        save_file(weights, str(tmp_path / f"{name['run']}_rank{rank}.safetensors"))
        return real_save(out_dir, step, model_state, meta, keep)

    def stops_in_iteration_3(*args, **kwargs):
        iterations["stopped"] += 1
        if iterations["stopped"] == 3:  # on both ranks, before either takes a collective of iteration 3
            raise _Stop
        return real_iteration(*args, **kwargs)

    ppo.sample_responses, ppo.score_rollout, base.save_finetuned = sample, score, save
    for run in ("whole", "stopped", "resumed"):
        name["run"] = run
        out = "whole" if run == "whole" else "stopped"
        ppo.ppo_iteration = stops_in_iteration_3 if run == "stopped" else real_iteration
        config = _distributed_ppo_config(tmp_path, out, resume=run == "resumed")
        try:
            run_ppo(config, reward_model=HighByteReward())
        except _Stop:
            pass
    (tmp_path / f"events_rank{rank}.json").write_text(json.dumps(events))
    spawned.leave()


def _distributed_ppo_config(tmp_path, out, **overrides):
    # 10 training prompts, 4 per rank an iteration: each epoch an iteration of 4 per rank, then one of 1
    return ppo_config(tmp_path, out_dir=str(tmp_path / out), max_steps=4, rollout_batch=4, batch_size=2,
                        ckpt_interval=2, eval_interval=0, seed=5, **overrides)



def train_numbers(run_dir):
    """The train records of a run, without its timings."""
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records if r["kind"] == "train"]


def test_two_process_ppo_stays_in_sync_samples_per_rank_and_resumes_exactly(tmp_path):
    write_ppo_data(tmp_path)
    mp.start_processes(_ppo_worker, args=(spawned.free_port(), tmp_path), nprocs=WORLD, join=True, start_method="spawn")
    events = [json.loads((tmp_path / f"events_rank{r}.json").read_text()) for r in range(WORLD)]
    eval_seed = 5 + 1  # evaluate_prompts' fixed seed: rank 0 alone evaluates
    train = [[e for e in rank_events if e["run"] == "whole" and e["seed"] != eval_seed] for rank_events in events]
    assert [len(t) for t in train] == [4, 4]
    assert [e["seed"] for e in events[1] if e["seed"] == eval_seed] == []

    # (a) the ranks sampled their own responses, yet hold the same weights, bit for bit, and they learned
    assert [len(e["responses"]) for e in train[0]] == [4, 1, 4, 1] == [len(e["responses"]) for e in train[1]]
    for a, b in zip(*train):
        assert a["seed"] != b["seed"] and a["responses"] != b["responses"]
    weights = [load_file(str(tmp_path / f"whole_rank{r}.safetensors")) for r in range(WORLD)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    base = load_checkpoint(str(tmp_path / "base")).model
    assert not torch.equal(weights[0]["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])
    whole = train_numbers(tmp_path / "whole")
    assert [r["step"] for r in whole] == [1, 2, 3, 4]
    for record, a, b in zip(whole, *train):  # rank 0 logs the mean over the ranks (as many rows on each)
        assert record["reward"] == pytest.approx((sum(a["scores"]) / len(a["scores"]) +
                                                  sum(b["scores"]) / len(b["scores"])) / 2, abs=1e-6)

    # (b) the run stopped in iteration 3 and resumed from iteration 2 ends as the uninterrupted one did
    stopped = [e for e in events[0] if e["run"] == "stopped" and e["seed"] != eval_seed]
    assert len(stopped) == 2
    assert train_numbers(tmp_path / "stopped") == whole
    for rank in range(WORLD):
        resumed = load_file(str(tmp_path / f"resumed_rank{rank}.safetensors"))
        assert all(torch.equal(resumed[k], weights[rank][k]) for k in weights[rank]), rank
    for rank_events in events:  # and sampled the same responses in iterations 3 and 4
        again = [e for e in rank_events if e["run"] == "resumed" and e["seed"] != eval_seed]
        ran = [e for e in rank_events if e["run"] == "whole" and e["seed"] != eval_seed][2:]
        assert again == [dict(e, run="resumed") for e in ran]


def test_each_rank_gets_prompts_even_from_a_batch_smaller_than_the_world():
    from types import SimpleNamespace

    from llmkern.finetune.ppo import rank_prompts

    def shares(batch, world):
        return [rank_prompts(batch, SimpleNamespace(rank=r, world_size=world)) for r in range(world)]

    assert shares(list("abcdefg"), 3) == [["a", "d"], ["b", "e"], ["c", "f"]]  # as many on every rank
    # An epoch's last batch of 1 or 2 prompts on 3 ranks: one prompt each (it gave every rank none).
    assert shares(["a"], 3) == [["a"], ["a"], ["a"]]
    assert shares(["a", "b"], 3) == [["a"], ["b"], ["a"]]


class _Lookup(nn.Module):
    """A policy with a value head in one table: log-prob and value of a position are entries of w."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16) * 0.1)

    def forward(self, ids, targets):
        return self.w[ids], self.w[targets.clamp(min=0)]

    def outputs_with_aux_loss(self, ids, targets, token_mask=None, temperature=1.0):
        """PolicyWithValue's training pass: forward's outputs, and no load-balancing loss (no experts); a
        temperature of 1 (the test's config names none) leaves them as they are."""
        assert temperature == 1.0
        return (*self(ids, targets), None)


class _GradientRecorder:
    """An optimizer that keeps the gradient each step would apply."""

    def __init__(self, param):
        self.param, self.param_groups, self.grads = param, [{"lr": 0.0}], []

    def step(self):
        self.grads.append(self.param.grad.clone())

    def zero_grad(self, set_to_none=True):
        self.param.grad = None


@pytest.mark.parametrize("rows,grad_accum", [(3, 2), (7, 3)])
def test_ppo_update_gives_a_short_last_group_of_minibatches_its_mean_gradient(rows, grad_accum):
    """Each step's gradient is the mean of its minibatches' gradients: a last group with fewer than
    grad_accum minibatches is not scaled down by the ones it lacks."""
    import contextlib
    from types import SimpleNamespace

    from llmkern.finetune.ppo import Rollout, ppo_update

    model = _Lookup()
    ids, targets = torch.randint(0, 16, (rows, 4)), torch.randint(0, 16, (rows, 4))
    with torch.no_grad():
        old_logprobs, old_values = model(ids, targets)
        old_logprobs, old_values = old_logprobs + 0.05 * torch.randn(rows, 4), old_values.clone()
    rollout = Rollout(ids=ids, targets=targets, mask=torch.rand(rows, 4) > 0.3, logprobs=old_logprobs,
                      ref_logprobs=old_logprobs, values=old_values, rewards=torch.zeros(rows, 4),
                      scores=torch.zeros(rows), advantages=torch.randn(rows, 4), returns=torch.randn(rows, 4))
    rollout.mask[:, 0] = True  # every row scores a token
    config = SimpleNamespace(ppo_epochs=1, batch_size=1, grad_accum=grad_accum, clip_range=0.2, vf_coef=0.5,
                             value_clip=0.2)
    recorder = _GradientRecorder(model.w)
    torch.manual_seed(7)
    order = torch.randperm(rows)
    torch.manual_seed(7)
    ppo_update(model, recorder, rollout, config, lambda step: 0.0, 0, contextlib.nullcontext)

    def gradient_of(row):
        model.w.grad = None
        r = slice(row, row + 1)
        logprobs, values = model(ids[r], targets[r])
        policy, _ = ppo_policy_loss(logprobs, old_logprobs[r], rollout.advantages[r], rollout.mask[r], 0.2)
        (policy + 0.5 * ppo_value_loss(values, old_values[r], rollout.returns[r], rollout.mask[r], 0.2)).backward()
        return model.w.grad.clone()

    groups = [order[i : i + grad_accum].tolist() for i in range(0, rows, grad_accum)]
    assert len(recorder.grads) == len(groups)
    for got, group in zip(recorder.grads, groups):
        expected = torch.stack([gradient_of(row) for row in group]).mean(0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_token_logprobs_at_a_tiny_temperature_are_the_greedy_limit_not_nan():
    # logits / 1e-42 overflowed to +-inf, and the log-softmax of infs is NaN: the limit is 0 for the likeliest token
    # and -inf (or past -1e30) for the others
    from llmkern.eval.logprobs import token_logprobs

    model = tiny_gpt(0)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        likeliest = model(ids)[0].argmax(dim=-1)  # (1, 4)
        others = (likeliest + 1) % model.config.vocab_size
        top, rest = (token_logprobs(model, ids, targets, temperature=1e-42) for targets in (likeliest, others))
    assert torch.equal(top, torch.zeros_like(top)) and bool((rest < -1e30).all()), (top, rest)
    # and at an ordinary temperature the shift changes nothing: the log-softmax of logits / t
    with torch.no_grad():
        direct = torch.log_softmax(model(ids)[0].float() / 0.7, dim=-1).gather(-1, others[..., None])[..., 0]
        torch.testing.assert_close(token_logprobs(model, ids, others, temperature=0.7), direct)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan, True, "0.5"])
def test_token_logprobs_refuses_a_temperature_that_is_not_a_finite_positive_number(temperature):
    from llmkern.eval.logprobs import token_logprobs

    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        token_logprobs(tiny_gpt(0), ids, ids, temperature=temperature)
