"""Instruction SFT: prompt masking, the response loss falls on real examples, the saved run loads and
generates, LoRA SFT trains only the adapters and saves them."""

import json
import os

import pytest
import torch

from llmkern.data.tokenizer import get_tokenizer
from llmkern.finetune import get_method, load_finetune_config
from llmkern.finetune.base import load_base, save_finetuned
from llmkern.finetune.data import IGNORE, format_prompt, make_lm_batch
from llmkern.finetune.lora import LoRALinear, apply_lora, load_lora_state_dict, read_lora_adapters
from llmkern.finetune.sft import SFTConfig, encode_examples, run_sft
from llmkern.model import GPT, GPTConfig
from llmkern.train.checkpoint import load_checkpoint
from llmkern.train.inference import load_trained_model, sample_text


def make_base(path: str, block_size: int = 320) -> str:
    """A tiny random byte-level GPT saved as a checkpoint that load_base reads."""
    config = GPTConfig.from_preset("tiny", vocab_size=257, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                                   backend="torch")
    model = GPT(config)
    save_finetuned(path, 0, model.state_dict(), {"model_config": config.to_dict(), "tokenizer": "bytes"})
    return path


def instruction_file(shared_data: str, tmp_path, n: int = 8) -> str:
    """The n shortest real Alpaca examples (short ones fit the tiny model's context)."""
    with open(os.path.join(shared_data, "instruction-data.json"), encoding="utf-8") as f:
        examples = json.load(f)
    examples.sort(key=lambda ex: len(format_prompt(ex)) + len(ex["output"]))
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(examples[:n]), encoding="utf-8")
    return str(path)


def sft_config(base: str, data: str, out_dir, **overrides) -> SFTConfig:
    settings = dict(base=base, data=data, out_dir=str(out_dir), max_steps=30, batch_size=4, lr=3e-3, min_lr=3e-4,
                    warmup_steps=3, eval_interval=0, val_fraction=0.0, max_len=320, num_samples=2,
                    max_new_tokens=12, device="cpu", progress=False)
    settings.update(overrides)
    return SFTConfig(**settings).validate()


def test_prompt_masking_puts_ignore_exactly_on_prompt_tokens():
    tok = get_tokenizer("bytes")
    examples = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                {"instruction": "Say hi.", "output": "Hi there!"}]
    encoded, dropped = encode_examples(examples, tok, max_len=512, mask_prompt=True)
    assert dropped == 0
    for ex, (tokens, labels) in zip(examples, encoded):
        prompt = tok.encode(format_prompt(ex))
        response = tok.encode(ex["output"]) + [tok.eot_token]
        assert tokens == prompt + response
        assert labels == [IGNORE] * len(prompt) + response
    unmasked, _ = encode_examples(examples, tok, max_len=512, mask_prompt=False)
    assert all(tokens == labels for tokens, labels in unmasked)
    # The next-token batch: the targets of the prompt's positions are -1 up to the response's first token.
    batch = make_lm_batch(encoded, tok.eot_token)
    prompt_len = len(tok.encode(format_prompt(examples[1])))
    row = batch["targets"][1].tolist()
    assert row[: prompt_len - 1] == [IGNORE] * (prompt_len - 1)
    assert row[prompt_len - 1 : prompt_len - 1 + 10] == tok.encode("Hi there!") + [tok.eot_token]
    assert row[prompt_len - 1 + 10 :] == [IGNORE] * (len(row) - prompt_len + 1 - 10)  # padding
    # Cut so short that no response token is left: the example is dropped.
    kept, dropped = encode_examples(examples, tok, max_len=20)
    assert kept == [] and dropped == 2


def test_sft_response_loss_falls_and_run_loads(shared_data, tmp_path):
    base = make_base(str(tmp_path / "base"))
    data = instruction_file(shared_data, tmp_path)
    out = tmp_path / "sft"
    summary = run_sft(sft_config(base, data, out))
    assert summary["steps"] == 30
    assert summary["examples"]["train"] == 8
    assert summary["train_loss_after"] < 0.75 * summary["train_loss_before"], summary
    assert summary["val_loss_before"] is None  # val_fraction=0

    model, tok, state = load_trained_model(str(out), device="cpu")
    assert state.meta["finetune"]["method"] == "sft"
    text = sample_text(model, tok, ["### Instruction:\nSay hi.\n\n### Response:\n"], max_new_tokens=8)
    assert len(text) == 1 and text[0].startswith("### Instruction")
    responses = json.loads((out / "responses.json").read_text(encoding="utf-8"))
    assert len(responses) == 2
    assert set(responses[0]) == {"instruction", "input", "reference", "response"}
    assert all(isinstance(r["response"], str) for r in responses)
    assert (out / "metrics.jsonl").is_file()


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_the_reported_loss_is_the_bases_mean_over_the_scored_tokens(shared_data, tmp_path, mask_prompt):
    # The run's loss before training against the base scored by hand: the response tokens (and end-of-text)
    # only under mask_prompt, else every token after the first; a token-weighted mean over batches of 3.
    # Sharp predictions, so that tokens differ in loss (a random base scores every token about log 257).
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=320, n_layer=1, n_head=2, n_embd=32,
                                      backend="torch")).eval()
    with torch.no_grad():
        model.wte.weight.mul_(30)
    base = str(tmp_path / "base")
    save_finetuned(base, 0, model.state_dict(), {"model_config": model.config.to_dict(), "tokenizer": "bytes"})
    data = instruction_file(shared_data, tmp_path, n=5)
    summary = run_sft(sft_config(base, data, tmp_path / "sft", max_steps=1, batch_size=3, num_samples=0,
                                 max_new_tokens=128, mask_prompt=mask_prompt))
    tok = get_tokenizer("bytes")
    nll, count = 0.0, 0
    for ex in json.loads(open(data, encoding="utf-8").read()):
        prompt, response = tok.encode(format_prompt(ex)), tok.encode(ex["output"]) + [tok.eot_token]
        row = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(row[:, :-1])[0][0].double(), -1)
        first = len(prompt) if mask_prompt else 1  # the first scored token
        nll -= sum(logp[t - 1, row[0, t]].item() for t in range(first, row.size(1)))
        count += row.size(1) - first
    assert summary["train_loss_before"] == pytest.approx(nll / count, rel=1e-5)


def test_lora_sft_trains_only_adapters_and_saves_them(shared_data, tmp_path):
    base = make_base(str(tmp_path / "base"))
    data = instruction_file(shared_data, tmp_path)
    out = tmp_path / "lora"
    config = sft_config(base, data, out, max_steps=8, lr=1e-2, lora_rank=4, lora_targets="qkv,fc",
                        val_fraction=0.25, num_samples=1)
    summary = run_sft(config)
    assert summary["examples"] == {"train": 6, "val": 2, "dropped_too_long": 0, "packed_rows": None}
    assert summary["trainable_params"] == 2 * (4 * 32 + 96 * 4) + 2 * (4 * 32 + 128 * 4)
    assert summary["val_loss_after"] is not None

    adapters, info = read_lora_adapters(str(out / "lora.safetensors"))
    assert info["rank"] == 4 and info["modules"] == ["blocks.0.attn.qkv", "blocks.0.mlp.fc",
                                                     "blocks.1.attn.qkv", "blocks.1.mlp.fc"]
    assert all(not torch.equal(v, torch.zeros_like(v)) for k, v in adapters.items() if k.endswith("lora_B"))

    # The saved model is the base plus B @ A * scale on the wrapped layers, and exactly the base elsewhere.
    base_state = load_checkpoint(base).model
    tuned = load_checkpoint(str(out)).model
    assert set(tuned) == set(base_state)
    changed = {k for k in base_state if not torch.equal(base_state[k], tuned[k])}
    assert changed == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "mlp.fc")}
    # Base + the saved adapters gives the saved (merged) model.
    rebuilt, _, _ = load_base(config)
    apply_lora(rebuilt, info["rank"], info["alpha"], targets=info["modules"])
    load_lora_state_dict(rebuilt, adapters)
    merged, _, _ = load_trained_model(str(out), device="cpu")
    ids = torch.randint(0, 257, (2, 24))
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(ids)[0], merged(ids)[0], rtol=1e-4, atol=1e-5)
    assert isinstance(rebuilt.blocks[0].attn.qkv, LoRALinear)


def test_settings_from_the_command_line(tmp_path):
    config_cls, run = get_method("sft")
    assert config_cls is SFTConfig and run is run_sft
    config = load_finetune_config(SFTConfig, None, ["--mask_prompt=false", "--num_samples=0", "--max_new_tokens=5"])
    assert (config.mask_prompt, config.num_samples, config.max_new_tokens) == (False, 0, 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SFTConfig(max_new_tokens=0).validate()
    with pytest.raises(ValueError, match="num_samples"):
        SFTConfig(num_samples=-1).validate()
    with pytest.raises(ValueError, match="base"):
        run_sft(SFTConfig(data="x.json", out_dir=str(tmp_path)))


def test_packed_sft_learns_from_fewer_rows(shared_data, tmp_path):
    base = make_base(str(tmp_path / "base"), block_size=640)  # room for 3 of these examples in a row
    data = instruction_file(shared_data, tmp_path)
    summary = run_sft(sft_config(base, data, tmp_path / "sft", pack=True, max_len=640, batch_size=2, num_samples=0))
    assert summary["examples"]["train"] == 8 and 2 <= summary["examples"]["packed_rows"] < 8
    assert summary["train_loss_after"] < 0.75 * summary["train_loss_before"], summary


def test_a_resume_checks_the_base_by_content_not_by_path(tmp_path):
    """The training state records the base model's fingerprint: the same base resumes, and so does a moved
    and renamed copy of it (or its checkpoint folder named directly); another base of the same shape is
    refused. A state saved before the fingerprint was recorded resumes on any base, as before."""
    torch.manual_seed(0)
    base = make_base(str(tmp_path / "base"), block_size=256)
    other = make_base(str(tmp_path / "other"), block_size=256)  # the same shape, other random weights
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(6)]))

    def config(base_path, **kw):
        return sft_config(base_path, str(data), tmp_path / "sft", max_steps=3, batch_size=2, max_len=256,
                          ckpt_interval=2, keep_train_state=True, num_samples=1, max_new_tokens=2, **kw)

    run_sft(config(base))  # its training state at its end, step 3, is kept
    with pytest.raises(ValueError, match="base_sha256: --base is not the model the run started from"):
        run_sft(config(other, resume=True))
    assert run_sft(config(base, resume=True))["steps"] == 3
    moved = str(tmp_path / "moved" / "renamed")
    os.makedirs(os.path.dirname(moved))
    os.rename(base, moved)
    assert run_sft(config(moved, resume=True))["steps"] == 3
    assert run_sft(config(load_checkpoint(moved).path, resume=True))["steps"] == 3

    meta_path = tmp_path / "sft" / "train_state" / "checkpoints" / "step_0000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["finetune_state"]["position"]["base_sha256"]  # as an older llmkern wrote it
    meta_path.write_text(json.dumps(meta))
    assert run_sft(config(other, resume=True))["steps"] == 3


def test_an_example_cut_inside_its_prompt_is_dropped_with_or_without_prompt_masking():
    # Cut to max_len inside its prompt, an example keeps no response token: it is dropped (and counted) whether
    # or not the prompt is masked, never kept as a row of prompt text alone.
    tok = get_tokenizer("bytes")
    examples = [{"instruction": "Summarize the following long text, please.", "output": "Short."},
                {"instruction": "Hi.", "output": "Hello!"}]
    long_prompt = len(tok.encode(format_prompt(examples[0])))
    short_prompt = len(tok.encode(format_prompt(examples[1])))
    max_len = short_prompt + 3
    assert max_len < long_prompt
    for mask_prompt in (True, False):
        encoded, dropped = encode_examples(examples, tok, max_len=max_len, mask_prompt=mask_prompt)
        assert dropped == 1
        assert len(encoded) == 1
        tokens, labels = encoded[0]
        assert tokens == (tok.encode(format_prompt(examples[1])) + tok.encode("Hello!"))[:max_len]
        assert labels == ([IGNORE] * short_prompt if mask_prompt else tokens[:short_prompt]) + tokens[short_prompt:]


def test_a_run_that_drops_examples_warns_before_training(tmp_path):
    tok = get_tokenizer("bytes")
    examples = [{"instruction": "Summarize the following long text, please, in a few words.", "output": "Short."}]
    examples += [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(3)]
    max_len = len(tok.encode(format_prompt(examples[1]))) + 3
    assert max_len < len(tok.encode(format_prompt(examples[0])))
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(examples))
    base = make_base(str(tmp_path / "base"))
    with pytest.warns(UserWarning, match=rf"1 of 4 examples dropped: their prompt fills max_len={max_len} ") as seen:
        summary = run_sft(sft_config(base, str(data), tmp_path / "sft", max_steps=1, max_len=max_len, num_samples=0))
    assert summary["examples"]["dropped_too_long"] == 1
    assert any(w.filename == __file__ for w in seen if "dropped" in str(w.message))  # at the caller of run_sft
