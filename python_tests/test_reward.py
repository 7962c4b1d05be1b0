"""Reward model: the Bradley-Terry loss, last-token pooling, learning a synthetic preference, save/load."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from llmkern.data.tokenizer import get_tokenizer
from llmkern.finetune.base import save_finetuned
from llmkern.finetune.reward import (RewardConfig, RewardModel, load_reward_model, reward_loss, run_reward,
                                     save_reward_model, score, score_token_rows)
from llmkern.model import GPT, GPTConfig


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(vocab_size=257, block_size=128, n_layer=1, n_head=2, n_embd=32, backend="torch")
    return GPT(GPTConfig.from_preset("tiny", **{**settings, **overrides}))


def test_reward_loss_hand_computed():
    chosen, rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(2.0)) + math.log(2.0)) / 3
    assert reward_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    c, r = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    torch.testing.assert_close(reward_loss(c, r), -F.logsigmoid(c - r).mean())
    with pytest.raises(ValueError, match="same shape"):
        reward_loss(torch.zeros(3), torch.zeros(4))


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_reward_model_pools_last_real_token(preset):
    body = tiny_gpt(seed=3)
    if preset == "tiny-llama":
        torch.manual_seed(3)
        body = GPT(GPTConfig.from_preset("tiny-llama", vocab_size=257, block_size=64, n_embd=32, n_head=2,
                                         n_kv_head=1, backend="torch"))
    rm = RewardModel(body).eval()
    lengths = [5, 1, 17, 11]
    rows = [torch.randint(0, 256, (n,)) for n in lengths]
    ids = torch.full((len(rows), max(lengths)), 256, dtype=torch.long)  # right padding
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    with torch.no_grad():
        scores = rm(ids, torch.tensor(lengths))
        for i, row in enumerate(rows):
            alone = rm.head(body.hidden_states(row[None])[0, -1]).item()
            assert scores[i].item() == pytest.approx(alone, abs=1e-5)
    with pytest.raises(ValueError, match="lengths"):
        rm(ids, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="lengths"):
        rm(ids, torch.tensor([1, 2]))


def synthetic_pairs(n, seed):
    """Preference pairs where the chosen response contains the letter 'z' and the rejected one does not."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxy"

    def word():
        return "".join(rng.choice(letters) for _ in range(rng.randint(2, 5)))

    pairs = []
    for _ in range(n):
        words = [word() for _ in range(rng.randint(2, 4))]
        rejected = " ".join(words)
        chosen_words = list(words)
        i = rng.randrange(len(chosen_words))
        chosen_words[i] = chosen_words[i] + "z"
        pairs.append({"instruction": "Say a few words.", "input": "", "chosen": " ".join(chosen_words),
                      "rejected": rejected})
    return pairs


def test_reward_model_learns_a_synthetic_preference(tmp_path):
    body = tiny_gpt(block_size=256)
    save_finetuned(str(tmp_path / "base"), 0, body.state_dict(),
                   {"model_config": body.config.to_dict(), "tokenizer": "bytes"})
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(synthetic_pairs(64, seed=1)))
    config = RewardConfig(base=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / "rm"),
                          max_steps=60, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=5,
                          val_fraction=0.125, eval_interval=0, device="cpu", progress=False)
    summary = run_reward(config)
    assert summary["train_examples"] == 56 and summary["val_examples"] == 8
    assert summary["train_eval"]["train_accuracy"] >= 0.9
    assert summary["last_eval"]["val_accuracy"] >= 0.75

    # The saved model scores new pairs the same way.
    rm, tokenizer = load_reward_model(str(tmp_path / "rm"), "cpu")
    fresh = synthetic_pairs(16, seed=2)
    from llmkern.finetune.data import format_prompt

    prompts = [format_prompt(p) for p in fresh]
    chosen = score(rm, tokenizer, prompts, [p["chosen"] for p in fresh])
    rejected = score(rm, tokenizer, prompts, [p["rejected"] for p in fresh])
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 12


def test_reward_model_save_load_round_trip(tmp_path):
    tokenizer = get_tokenizer("bytes")
    rm = RewardModel(tiny_gpt(seed=5))
    with torch.no_grad():
        rm.head.bias.fill_(0.25)
    prompts = ["Name a colour.", "Add 2 and 3.", "x"]
    responses = ["Blue.", "5", ""]
    before = score(rm, tokenizer, prompts, responses)
    save_reward_model(str(tmp_path / "rm"), 7, rm, tokenizer)
    loaded, loaded_tokenizer = load_reward_model(str(tmp_path / "rm"), "cpu")
    assert loaded_tokenizer.spec == "bytes" and not loaded.training
    assert score(loaded, loaded_tokenizer, prompts, responses) == before
    # A reward-model run is told apart from a plain GPT checkpoint.
    save_finetuned(str(tmp_path / "gpt"), 0, rm.body.state_dict(),
                   {"model_config": rm.body.config.to_dict(), "tokenizer": "bytes"})
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_model(str(tmp_path / "gpt"), "cpu")
    with pytest.raises(ValueError, match="pair up"):
        score(rm, tokenizer, ["a", "b"], ["c"])


def test_a_lora_run_file_rebuilds_the_trained_reward_model(tmp_path, outputs_after_fit):
    """Beside the adapters the new head trains in full: lora.safetensors held only the adapters, so the base
    plus it scored with an untrained head."""
    import llmkern.finetune.loop as loop
    from llmkern.finetune.lora import apply_lora, load_lora_state_dict, read_lora_adapters

    body = tiny_gpt(block_size=256)
    save_finetuned(str(tmp_path / "base"), 0, body.state_dict(),
                   {"model_config": body.config.to_dict(), "tokenizer": "bytes"})
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(synthetic_pairs(16, seed=1)))
    ids, lengths = torch.randint(0, 256, (3, 9)), torch.tensor([9, 2, 5])
    trained = outputs_after_fit(loop, ids, lengths)  # run_reward imports loop.fit as it runs
    run_reward(RewardConfig(base=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / "rm"),
                            lora_rank=2, lora_targets="qkv", max_steps=3, batch_size=8, lr=1e-2,
                            val_fraction=0.0, device="cpu", progress=False))
    tensors, info = read_lora_adapters(str(tmp_path / "rm" / "lora.safetensors"))
    rebuilt = RewardModel(tiny_gpt(block_size=256)).eval()
    rebuilt.body.load_state_dict(body.state_dict())
    apply_lora(rebuilt, info["rank"], info["alpha"], targets=info["modules"])
    load_lora_state_dict(rebuilt, tensors)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids, lengths), trained["out"], rtol=0, atol=0)


def test_reward_config_needs_data():
    with pytest.raises(ValueError, match="data"):
        RewardConfig(base="runs/x").validate()


def test_a_response_to_a_prompt_longer_than_the_context_is_still_scored():
    tokenizer = get_tokenizer("bytes")
    rm = RewardModel(tiny_gpt(seed=6, block_size=32))
    prompt = "Describe the weather in great detail, please. " * 2  # longer than the 32-token context
    good, bad = score(rm, tokenizer, [prompt, prompt], ["A sunny and warm day.", "terrible"])
    assert good != bad  # the first 32 tokens alone (all prompt) scored them alike
    tail = tokenizer.encode(prompt + "terrible")[-31:] + [tokenizer.eot_token]
    assert bad == pytest.approx(score_token_rows(rm, [tail], tokenizer.eot_token)[0], abs=1e-6)


def test_training_rows_are_the_tokens_a_long_text_is_scored_on():
    """A pair cut to max_len keeps its last tokens, response and end-of-text, as score() reads them: cut
    from the end, a long prompt's pair would train on prompt alone, where the score is never read."""
    from llmkern.finetune.reward import encode_pair_text

    tokenizer = get_tokenizer("bytes")
    prompt = "Describe the weather in great detail, please. " * 2
    row = encode_pair_text(tokenizer, prompt, "terrible", 32)
    assert row == tokenizer.encode(prompt + "terrible")[-31:] + [tokenizer.eot_token]
    assert encode_pair_text(tokenizer, "Hi", "yo", 32) == tokenizer.encode("Hiyo") + [tokenizer.eot_token]
    with pytest.raises(ValueError, match="max_len"):
        encode_pair_text(tokenizer, prompt, "terrible", 1)


def test_pairs_that_read_the_same_are_skipped_with_a_warning(tmp_path):
    body = tiny_gpt(block_size=256)
    save_finetuned(str(tmp_path / "base"), 0, body.state_dict(),
                   {"model_config": body.config.to_dict(), "tokenizer": "bytes"})
    pairs = synthetic_pairs(3, seed=3)
    pairs.append({**pairs[0], "rejected": pairs[0]["chosen"]})
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(pairs))
    config = RewardConfig(base=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / "rm"), max_steps=1,
                          batch_size=2, val_fraction=0.0, device="cpu", progress=False)
    with pytest.warns(UserWarning, match="prefs.json: 1 of 4 examples dropped: their chosen and rejected") as seen:
        summary = run_reward(config)
    assert summary["train_examples"] == 3 and summary["skipped_examples"] == 1
    assert [w.filename for w in seen if "dropped" in str(w.message)] == [__file__]
