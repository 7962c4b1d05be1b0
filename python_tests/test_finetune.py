"""The fine-tuning foundation: settings, Alpaca data, log-probabilities, the shared loop, saving."""

import dataclasses
import json
import math
import re
import os

import pytest
import torch
from numerics import InfGradient

from llmkern.data.tokenizer import ByteTokenizer
from llmkern.eval import sequence_logprobs, token_logprobs
from llmkern.finetune import FinetuneConfig, get_method, load_finetune_config
from llmkern.finetune.base import load_base, save_finetuned
from llmkern.finetune.data import (
    IGNORE, encode_prompt_response, format_prompt, load_instruction_data, load_preference_data, make_lm_batch,
    make_packed_batch, pack_examples, pad_batch, split_examples,
)
from llmkern.finetune.loop import FinetuneDiverged, fit
from llmkern.model import GPT, GPTConfig


def tiny_gpt(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    settings = dict(vocab_size=257, block_size=64, n_layer=1, n_head=2, n_embd=32, backend="torch")
    settings.update(overrides)
    return GPT(GPTConfig.from_preset("tiny", **settings))


# --- settings ---------------------------------------------------------------------------------

def test_config_overrides_are_typed_and_checked(tmp_path):
    cfg = load_finetune_config(FinetuneConfig, None, ["--lr=3e-4", "--lora_rank=8", "--progress=false"])
    assert (cfg.lr, cfg.lora_rank, cfg.progress) == (3e-4, 8, False)
    path = tmp_path / "ft.json"
    path.write_text(json.dumps({"epochs": 3, "base": "runs/x"}))
    cfg = load_finetune_config(FinetuneConfig, str(path), ["--epochs=4"])
    assert (cfg.epochs, cfg.base) == (4, "runs/x")
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        load_finetune_config(FinetuneConfig, None, ["--nope=1"])
    with pytest.raises(ValueError, match="'epochs'.*integer"):
        load_finetune_config(FinetuneConfig, None, ["--epochs=two"])
    with pytest.raises(ValueError, match="val_fraction"):
        load_finetune_config(FinetuneConfig, None, ["--val_fraction=1.5"])
    for name in ("grad_clip", "weight_decay", "min_lr", "lr"):
        with pytest.raises(ValueError, match=rf"\b{name}\b.*nan"):
            load_finetune_config(FinetuneConfig, None, [f"--{name}=nan"])
    with pytest.raises(ValueError, match="unknown fine-tuning method"):
        get_method("rlhf9000")


# --- settings checked at config time, settings of another recipe, settings a run would not read --------

@pytest.mark.parametrize("args,match", [
    (["--lr=inf"], "finite lr"),  # trained to NaN weights and saved them, with exit status 0
    (["--weight_decay=inf"], "weight_decay"),
    (["--seed=-1"], "seed"),
    (["--seed=18446744073709551616"], "seed"),  # torch's "Overflow when unpacking long long", naming nothing
    (["--out_dir="], "out_dir"),  # wrote checkpoints/, metrics.jsonl and the charts into the current folder
    (["--max_len=1"], "max_len must be at least 2"),  # an error once the base was loaded and the data encoded
    (["--lora_rank=4", "--lora_alpha=inf"], "lora_alpha"),  # an infinite LoRA scale: NaN weights, saved
    (["--lora_rank=4", "--lora_targets=,"], "lora_targets"),  # read as '' (every projection)
    (["--device=gpu"], "device"),  # refused only once the base was loaded
])
def test_edge_values_are_refused_at_config_time(args, match):
    from llmkern.finetune.sft import SFTConfig

    with pytest.raises(ValueError, match=match):
        load_finetune_config(SFTConfig, None, args)


def test_a_backend_the_optimizer_cannot_run_is_refused_at_config_time():
    from llmkern import _backend
    from llmkern.finetune.sft import SFTConfig

    if _backend.can_run("cuda", "adamw", torch.device("cpu")):
        pytest.skip("the CUDA kernels run on CPU tensors here (the emulator)")
    # before: refused by llmkern's AdamW once the base was loaded and the data encoded
    with pytest.raises(ValueError, match="backend='cuda' cannot run adamw"):
        load_finetune_config(SFTConfig, None, ["--device=cpu", "--backend=cuda"])
    load_finetune_config(SFTConfig, None, ["--device=cpu", "--backend=torch"])


def test_a_config_made_in_python_has_its_types_checked():
    from llmkern.finetune.sft import SFTConfig

    with pytest.raises(ValueError, match="'overwrite'.*boolean"):  # "false" was a true overwrite
        SFTConfig(overwrite="false").validate()
    with pytest.raises(ValueError, match="'lr'.*number"):
        SFTConfig(lr="1e-4").validate()
    assert SFTConfig(lr=1, min_lr=0).validate().lr == 1.0


def test_a_setting_of_another_recipe_names_the_recipes_that_read_it(tmp_path):
    from llmkern.finetune.dpo import DPOConfig
    from llmkern.finetune.sft import SFTConfig

    with pytest.raises(ValueError, match=r"'beta' in command line is read only by `llmkern finetune dpo`, "
                                         r"not by sft"):
        load_finetune_config(SFTConfig, None, ["--beta=0.2"])
    with pytest.raises(ValueError, match=r"'reward_model' .* `llmkern finetune ppo\|grpo`, not by dpo"):
        load_finetune_config(DPOConfig, None, ["--data=x.json", "--reward_model=runs/rm"])
    with pytest.raises(ValueError, match=r"'num_samples' .* `llmkern finetune sft`, not by dpo"):
        load_finetune_config(DPOConfig, None, ["--data=x.json", "--num_samples=2"])
    path = tmp_path / "ppo.json"
    path.write_text(json.dumps({"kl_coef": 0.1}))
    with pytest.raises(ValueError, match=rf"'kl_coef' in {path} .* `llmkern finetune ppo\|grpo`, not by sft"):
        load_finetune_config(SFTConfig, str(path))
    with pytest.raises(ValueError, match="unknown setting 'nope'"):  # the others as before
        load_finetune_config(SFTConfig, None, ["--nope=1"])


@pytest.mark.parametrize("args,values", [
    (["--model.n_layer=2"], None),  # was "only model.<field> keys may be dotted", then "unknown setting 'model'"
    (["--lora.rank=4"], None),
    ([], {"model": {"n_layer": 2}}),  # was "unknown setting 'model'"
])
def test_nested_and_dotted_settings_are_refused(tmp_path, args, values):
    from llmkern.finetune.sft import SFTConfig

    path = None
    if values is not None:
        path = tmp_path / "nested.json"
        path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="fine-tuning settings are plain names"):
        load_finetune_config(SFTConfig, str(path) if path else None, args)


@pytest.mark.parametrize("settings,name", [
    (dict(lora_alpha=32.0), "lora_alpha"),
    (dict(lora_dropout=0.1), "lora_dropout"),
    (dict(lora_targets="qkv"), "lora_targets"),
    (dict(max_steps=5, epochs=3), "epochs"),
    (dict(resume=True, overwrite=True), "overwrite"),
    (dict(base="runs/main", base_tokenizer="bytes"), "base_tokenizer"),
    (dict(num_samples=0, max_new_tokens=8), "max_new_tokens"),
])
def test_settings_the_run_would_not_read_are_warned_about(settings, name):
    from llmkern.finetune.sft import SFTConfig

    with pytest.warns(UserWarning, match=f"{name}=.* has no effect"):
        SFTConfig(**settings).validate()


def test_settings_the_run_reads_warn_nothing():
    import warnings

    from llmkern.finetune.dpo import DPOConfig
    from llmkern.finetune.sft import SFTConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SFTConfig().validate()
        SFTConfig(lora_rank=4, lora_alpha=32.0, lora_targets="qkv", max_steps=5, base="gpt2/model.safetensors",
                  base_tokenizer="bytes", num_samples=2, max_new_tokens=8, overwrite=True).validate()
        DPOConfig(data="x.json", reference="gpt2/model.safetensors", base_tokenizer="bytes").validate()


def recipe_inputs(tmp_path) -> dict[str, dict]:
    """Each recipe's settings on data files that exist, from a base that never needs to load."""
    instructions = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(4)]
    pairs = [{"instruction": f"Say {i}.", "input": "", "chosen": str(i), "rejected": "no"} for i in range(4)]
    (tmp_path / "sft.json").write_text(json.dumps(instructions))
    (tmp_path / "pref.json").write_text(json.dumps(pairs))
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n"
                                                  for i in range(4)))
    common = dict(base=str(tmp_path / "base"), out_dir=str(tmp_path / "out"), device="cpu", progress=False)
    return {"sft": dict(common, data=str(tmp_path / "sft.json")),
            "classify": dict(common, data=str(tmp_path / "texts.jsonl")),
            "dpo": dict(common, data=str(tmp_path / "pref.json")),
            "reward": dict(common, data=str(tmp_path / "pref.json")),
            "ppo": dict(common, data=str(tmp_path / "sft.json"), reward_model=str(tmp_path / "sft.json"), max_len=64,
                        max_new_tokens=16)}


@pytest.mark.parametrize("method", ["sft", "classify", "dpo", "reward", "ppo"])
def test_a_wrong_out_dir_data_file_or_model_path_is_told_before_any_model_loads(tmp_path, monkeypatch, method):
    """Each of these was told only after the base (and DPO's reference, PPO's reward model) was loaded, the
    data encoded and, in DPO, the reference's log-probs computed."""
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr("llmkern.finetune.base.load_gpt", no_loading)
    monkeypatch.setattr("llmkern.train.checkpoint.load_checkpoint", no_loading)
    monkeypatch.setattr("llmkern.train.checkpoint.load_model_checkpoint", no_loading)
    config_cls, run = get_method(method)
    settings = recipe_inputs(tmp_path)[method]
    model = tiny_gpt()
    save_finetuned(str(tmp_path / "held"), 3, model.state_dict(), {"model_config": model.config.to_dict(),
                                                                  "tokenizer": "bytes"})
    with pytest.raises(ValueError, match="already holds a run"):  # a fresh start over a run needs overwrite
        run(config_cls(**{**settings, "out_dir": str(tmp_path / "held")}))
    with pytest.raises(ValueError, match="the run finished"):
        run(config_cls(**{**settings, "out_dir": str(tmp_path / "held"), "resume": True}))
    with pytest.raises(FileNotFoundError, match="no training state"):
        run(config_cls(**{**settings, "resume": True}))
    if method != "classify":  # classify read its data first already
        with pytest.raises(FileNotFoundError, match="missing.json"):
            run(config_cls(**{**settings, "data": str(tmp_path / "missing.json")}))
    if method == "dpo":
        with pytest.raises(FileNotFoundError, match="reference .*nowhere"):
            run(config_cls(**{**settings, "reference": str(tmp_path / "nowhere")}))
    if method == "ppo":
        with pytest.raises(FileNotFoundError, match="reward_model .*nowhere"):
            run(config_cls(**{**settings, "reward_model": str(tmp_path / "nowhere")}))


@pytest.mark.parametrize("method,later", [
    ("sft", "llmkern.finetune.sft.encode_examples"),  # the data's encoding
    ("classify", "llmkern.finetune.classify.encode_texts"),
    ("dpo", "llmkern.finetune.dpo.load_reference"),  # the reference, then its log-probs over all the data
    ("ppo", "llmkern.finetune.reward.load_reward_run"),  # the reward model
])
def test_lora_targets_naming_no_layer_are_told_once_the_base_is_loaded(tmp_path, monkeypatch, method, later):
    def too_late(*args, **kwargs):
        raise AssertionError(f"{later} ran before the LoRA targets were checked")

    monkeypatch.setattr(later, too_late)
    model = tiny_gpt()
    save_finetuned(str(tmp_path / "base"), 1, model.state_dict(), {"model_config": model.config.to_dict(),
                                                                  "tokenizer": "bytes"})
    config_cls, run = get_method(method)
    settings = recipe_inputs(tmp_path)[method]
    with pytest.raises(ValueError, match=r"LoRA targets \['atn.qkv'\] match no linear layer"):
        run(config_cls(**settings, lora_rank=2, lora_targets="atn.qkv"))


# --- data -------------------------------------------------------------------------------------

def test_alpaca_prompt_with_and_without_input():
    with_input = format_prompt({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert "### Input" not in format_prompt({"instruction": "Say hi.", "input": "", "output": "hi"})


def test_real_instruction_and_preference_files_load(shared_data):
    sft = load_instruction_data(f"{shared_data}/instruction-data.json")
    pref = load_preference_data(f"{shared_data}/instruction-data-with-preference.json")
    assert len(sft) == len(pref) == 1100
    assert all(isinstance(r["chosen"], str) and isinstance(r["rejected"], str) for r in pref)


def test_bad_data_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(ValueError, match=r"example 1 needs a string 'output'"):
        load_instruction_data(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2"):
        load_instruction_data(str(broken))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_instruction_data(str(tmp_path / "missing.json"))


def test_split_is_seeded_and_disjoint():
    train, val = split_examples(list(range(103)), 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == list(range(103))
    assert split_examples(list(range(103)), 0.1, seed=3) == (train, val)
    assert split_examples(list(range(103)), 0.1, seed=4) != (train, val)
    assert len(split_examples([1, 2], 0.1)[1]) == 1  # at least one held out
    assert split_examples([1, 2], 0.9)[1] in ([1], [2])  # never all: one is left to train on
    # a lone example trains (round(0.6) held it out: SFT then blamed max_len for having no training example)
    assert split_examples([7], 0.6) == ([7], []) and split_examples([], 0.5) == ([], [])


def test_prompt_tokens_are_masked_and_batches_shift():
    tok = ByteTokenizer()
    tokens, labels = encode_prompt_response(tok, "Q: ", "ab", max_len=100)
    assert tokens == [*b"Q: ab", 256] and labels == [IGNORE] * 3 + [*b"ab", 256]
    cut_tokens, cut_labels = encode_prompt_response(tok, "Q: ", "ab", max_len=4)
    assert cut_tokens == tokens[:4] and cut_labels == labels[:4]
    batch = make_lm_batch([(tokens, labels), ([1, 2, 3], [IGNORE, 2, 3])], pad_id=0)
    assert batch["idx"].tolist() == [tokens[:-1], [1, 2, 3, 0, 0]]
    assert batch["targets"].tolist() == [labels[1:], [2, 3, IGNORE, IGNORE, IGNORE]]
    assert pad_batch([[1], [2, 3]], 9).tolist() == [[1, 9], [2, 3]]


# --- log-probabilities ----------------------------------------------------------------------

def test_logprobs_match_log_softmax_and_skip_ignored():
    model = tiny_gpt()
    ids = torch.randint(0, 257, (3, 11))
    targets = torch.randint(0, 257, (3, 11))
    targets[1, 4:] = IGNORE
    logits, _ = model(ids)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected[targets == IGNORE] = 0
    got = token_logprobs(model, ids, targets)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sequence_logprobs(model, ids, targets).double(), expected.sum(1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(model, ids, torch.full_like(ids, 300))


def test_right_padding_does_not_change_a_rows_score():
    model = tiny_gpt(seed=1)
    row = torch.randint(0, 256, (1, 7))
    alone = sequence_logprobs(model, row[:, :-1], row[:, 1:])
    padded = torch.cat([row, torch.zeros(1, 5, dtype=torch.long)], 1)
    targets = padded[:, 1:].clone()
    targets[:, 6:] = IGNORE
    torch.testing.assert_close(sequence_logprobs(model, padded[:, :-1], targets), alone, rtol=1e-5, atol=1e-5)


# --- the loop ---------------------------------------------------------------------------------

def lm_loss(model, batch):
    _, loss = model(batch["idx"], batch["targets"])
    return loss, {}


def test_micro_batches_take_every_example_once_an_epoch_in_a_new_seeded_order():
    from itertools import islice

    from llmkern.finetune.loop import micro_batches

    examples = list(range(11))
    batches = list(islice(micro_batches(examples, 4, seed=5), 9))  # 3 epochs of 4 + 4 + 3
    assert [len(b) for b in batches] == [4, 4, 3] * 3
    epochs = [sum(batches[i : i + 3], []) for i in (0, 3, 6)]
    assert all(sorted(epoch) == examples for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3  # each epoch shuffled anew
    assert list(islice(micro_batches(examples, 4, seed=5), 9)) == batches
    assert list(islice(micro_batches(examples, 4, seed=6), 3)) != batches[:3]


def test_epochs_with_accumulation_take_as_many_steps_as_the_passes_hold(tmp_path):
    # 10 examples in batches of 2: 5 micro-batches an epoch, 15 in 3 epochs; 2 per step. The stream carries
    # an epoch's odd micro-batch into the next step, so 8 steps (16 micro-batches) cover the 3 epochs; rounding
    # up per epoch made 9 (18 micro-batches: into a 4th epoch, the cosine schedule stretched over it).
    from llmkern.train.schedules import cosine_lr

    tok = ByteTokenizer()
    examples = [encode_prompt_response(tok, f"{i} + {i} = ", str(2 * i), 16) for i in range(10)]
    taken = []

    def collate(rows):
        taken.append(len(rows))
        return make_lm_batch(rows, 0)

    cfg = FinetuneConfig(out_dir=str(tmp_path), epochs=3, batch_size=2, grad_accum=2, lr=1e-2, min_lr=1e-3,
                         warmup_steps=2, progress=False)
    summary = fit(tiny_gpt(), lm_loss, examples, collate, cfg)
    steps = [r for r in map(json.loads, open(summary["metrics"])) if r["kind"] == "train"]
    assert summary["steps"] == len(steps) == 8
    assert len(taken) == 8 * cfg.grad_accum == 3 * 5 + 1  # the 3 passes, one micro-batch more fills the last step
    # every step's learning rate is the schedule's over the steps taken, ending at its last step
    assert [r["lr"] for r in steps] == pytest.approx([cosine_lr(s, 1e-2, 1e-3, 2, 8) for s in range(8)])


def test_fit_lowers_the_loss_and_logs(tmp_path):
    model = tiny_gpt()
    tok = ByteTokenizer()
    examples = [encode_prompt_response(tok, f"{i} + {i} = ", str(2 * i), 32) for i in range(16)]

    def evaluate(m):
        batch = make_lm_batch(examples, 0)
        return {"val_loss": float(m(batch["idx"], batch["targets"])[1])}

    cfg = FinetuneConfig(out_dir=str(tmp_path), max_steps=30, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=3,
                         eval_interval=10, progress=False)
    def loss_and_accuracy(m, batch):
        logits, loss = m(batch["idx"], batch["targets"])
        scored = batch["targets"] != IGNORE
        accuracy = (logits.argmax(-1) == batch["targets"])[scored].float().mean()
        return loss, {"accuracy": accuracy}

    summary = fit(model, loss_and_accuracy, examples, lambda rows: make_lm_batch(rows, 0), cfg, evaluate,
                  charts=("accuracy",))
    assert summary["steps"] == 30 and summary["skipped_steps"] == 0
    assert 0 <= summary["train"]["accuracy"] <= 1
    assert summary["last_eval"]["val_loss"] < 0.6 * summary["first_eval"]["val_loss"]
    records = [json.loads(line) for line in open(summary["metrics"])]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 10, 20, 30]
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "accuracy.png").is_file()


def test_fit_trains_only_trainable_parameters_with_accumulation(tmp_path):
    model = tiny_gpt()
    for p in model.parameters():
        p.requires_grad_(False)
    model.norm_f.weight.requires_grad_(True)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    tok = ByteTokenizer()
    examples = [encode_prompt_response(tok, "x", "yz", 8)] * 5
    cfg = FinetuneConfig(out_dir=str(tmp_path), max_steps=3, batch_size=2, grad_accum=2, lr=1e-2, progress=False)
    fit(model, lm_loss, examples, lambda rows: make_lm_batch(rows, 0), cfg)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, frozen[k])}
    assert changed == {"norm_f.weight"}


def test_two_accumulated_micro_batches_step_like_one_batch_of_both(tmp_path):
    # Examples of one length, so that the mean of the two micro-batches' mean losses is the whole batch's:
    # the same gradient (norm logged) and so the same next losses as one batch of twice the size. (Not the
    # same weights to 1e-4: Adam turns the rounding noise of the zero gradient of the key bias into +-lr.)
    tok = ByteTokenizer()
    examples = [encode_prompt_response(tok, f"{i} + {i} = ", str(2 * i), 16) for i in range(10, 18)]
    logged = {}
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        cfg = FinetuneConfig(out_dir=str(tmp_path / f"accum{grad_accum}"), max_steps=3, batch_size=batch_size,
                             grad_accum=grad_accum, lr=1e-2, warmup_steps=1, progress=False)
        summary = fit(tiny_gpt(seed=3), lm_loss, examples, lambda rows: make_lm_batch(rows, 0), cfg)
        records = [json.loads(line) for line in open(summary["metrics"])]
        logged[grad_accum] = [(r["loss"], r["grad_norm"]) for r in records if r["kind"] == "train"]
    assert len(logged[1]) == len(logged[2]) == 3
    for (loss_one, norm_one), (loss_two, norm_two) in zip(logged[1], logged[2]):
        assert loss_two == pytest.approx(loss_one, rel=1e-5)
        assert norm_two == pytest.approx(norm_one, rel=1e-4)


def test_fit_skips_non_finite_steps_then_stops(tmp_path):
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss(m, batch):
        _, loss = m(batch["idx"], batch["targets"])
        return loss * math.nan, {}

    cfg = FinetuneConfig(out_dir=str(tmp_path), max_steps=20, batch_size=1, progress=False)
    tok = ByteTokenizer()
    with pytest.raises(FinetuneDiverged, match="NaN/inf 5 steps"):
        fit(model, nan_loss, [encode_prompt_response(tok, "a", "b", 8)], lambda r: make_lm_batch(r, 0), cfg)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture
def small_loss_scale(monkeypatch):
    """A first loss scale of 256: the tiny model's gradients times 65536 overflow float16 by themselves,
    and these tests want to choose their overflows."""
    import functools

    from llmkern.finetune import loop
    from llmkern.train.loss_scale import DynamicLossScale

    monkeypatch.setattr(loop, "DynamicLossScale", functools.partial(DynamicLossScale, init_scale=256.0))


def test_fit_in_float16_scales_the_loss_and_skips_overflows_without_diverging(tmp_path, small_loss_scale):
    tok = ByteTokenizer()
    examples = [encode_prompt_response(tok, f"{i} + {i} = ", str(2 * i), 32) for i in range(16)]
    calls = {"n": 0}

    def overflows_in_steps_3_to_8(m, batch):  # 6 in a row: more than the 5 bad steps that stop a run
        calls["n"] += 1
        _, loss = m(batch["idx"], batch["targets"])
        return (InfGradient.apply(loss) if 3 <= calls["n"] <= 8 else loss), {}

    def evaluate(m):
        batch = make_lm_batch(examples, 0)
        return {"val_loss": float(m(batch["idx"], batch["targets"])[1])}

    cfg = FinetuneConfig(out_dir=str(tmp_path), max_steps=30, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=3,
                         progress=False, dtype="float16")
    model = tiny_gpt()
    summary = fit(model, overflows_in_steps_3_to_8, examples, lambda rows: make_lm_batch(rows, 0), cfg, evaluate)
    assert summary["steps"] == 30 and summary["skipped_steps"] == 6
    assert summary["last_eval"]["val_loss"] < 0.7 * summary["first_eval"]["val_loss"]  # 24 steps that trained
    records = [json.loads(line) for line in open(summary["metrics"])]
    skips = [(r["step"], r["reason"]) for r in records if r["kind"] == "skip"]
    assert skips == [(s, f"float16 gradient overflow: loss scale {2 ** (11 - s):g} -> {2 ** (10 - s):g}")
                     for s in range(3, 9)]
    assert [r["loss_scale"] for r in records if r["kind"] == "train"] == [256.0] * 2 + [4.0] * 22
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="dtype must be one of"):
        FinetuneConfig(dtype="float8").validate()


def test_float16_gradients_reach_the_optimizer_unscaled(tmp_path, small_loss_scale):
    tok = ByteTokenizer()
    examples = [encode_prompt_response(tok, f"{i} - 1 = ", str(i - 1), 24) for i in range(1, 9)]
    norms = {}
    for dtype in ("float32", "float16"):
        cfg = FinetuneConfig(out_dir=str(tmp_path / dtype), max_steps=1, batch_size=8, progress=False, dtype=dtype)
        summary = fit(tiny_gpt(seed=5), lm_loss, examples, lambda rows: make_lm_batch(rows, 0), cfg)
        norms[dtype] = [r["grad_norm"] for r in map(json.loads, open(summary["metrics"])) if r["kind"] == "train"][0]
    assert norms["float16"] == pytest.approx(norms["float32"], rel=0.02)  # not 256 times it


def times_three_examples():
    """11 tiny "i * 3 = " examples in bytes, and the collate of their LM batches (the resume tests' data)."""
    tok = ByteTokenizer()
    examples = [encode_prompt_response(tok, f"{i} * 3 = ", str(3 * i), 24) for i in range(11)]
    return examples, lambda rows: make_lm_batch(rows, 0)


def test_a_stopped_float16_run_resumes_with_its_loss_scale(tmp_path, small_loss_scale):
    examples, collate = times_three_examples()
    calls = {"n": 0}

    def overflow_in_step_2(m, batch):
        calls["n"] += 1
        _, loss = m(batch["idx"], batch["targets"])
        return (InfGradient.apply(loss) if calls["n"] == 2 else loss), {}

    def settings(out, **kw):
        return FinetuneConfig(out_dir=str(tmp_path / out), max_steps=6, batch_size=3, lr=3e-3, ckpt_interval=3,
                              progress=False, dtype="float16", **kw)

    whole = tiny_gpt(seed=4)
    fit(whole, overflow_in_step_2, examples, collate, settings("whole"))
    calls["n"] = 0

    def stops_in_step_5(m, batch):
        if calls["n"] >= 4:
            raise RuntimeError("stopped")
        return overflow_in_step_2(m, batch)

    with pytest.raises(RuntimeError, match="stopped"):
        fit(tiny_gpt(seed=4), stops_in_step_5, examples, collate, settings("stopped"))
    resumed = tiny_gpt(seed=4)
    summary = fit(resumed, overflow_in_step_2, examples, collate, settings("stopped", resume=True))
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    scales = [r["loss_scale"] for r in map(json.loads, open(summary["metrics"])) if r["kind"] == "train"]
    assert scales == [256.0] + [128.0] * 4  # the halved scale came back with the state


# --- base models in and out -------------------------------------------------------------------

def test_saved_model_loads_as_a_base_and_for_generation(tmp_path):
    from llmkern.train.inference import load_trained_model

    model = tiny_gpt(seed=5)
    meta = {"model_config": model.config.to_dict(), "tokenizer": "bytes", "finetune": {"method": "test"}}
    save_finetuned(str(tmp_path / "run"), 7, model.state_dict(), meta)
    loaded, tok, base_meta = load_base(FinetuneConfig(base=str(tmp_path / "run"), device="cpu"))
    assert base_meta["finetune"] == {"method": "test"} and tok.eot_token == 256
    ids = torch.randint(0, 257, (2, 9))
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0])
    again, _, state = load_trained_model(str(tmp_path / "run"), "cpu")
    assert state.step == 7
    with pytest.raises(ValueError, match="base must name"):
        load_base(FinetuneConfig())
    with pytest.raises(FileNotFoundError):
        load_base(FinetuneConfig(base=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="model_config"):
        save_finetuned(str(tmp_path / "x"), 1, model.state_dict(), {"tokenizer": "bytes"})


def test_router_aux_loss_coef_sets_a_moe_base_and_refuses_a_dense_one(tmp_path):
    """--router_aux_loss_coef weighs a MoE base's load-balancing loss in the recipe (its fingerprint stays the
    base's); -1 keeps the base's; a dense base has no router to weigh: an error, not a setting that does nothing."""
    def save(path, model):
        save_finetuned(str(path), 1, model.state_dict(), {"model_config": model.config.to_dict(), "tokenizer": "bytes"})

    moe = tiny_gpt(seed=5, pos="rope", norm="rmsnorm", mlp="swiglu", n_experts=4, experts_per_token=2,
                   router_aux_loss_coef=0.01)
    save(tmp_path / "moe", moe)
    kept, _, kept_meta = load_base(FinetuneConfig(base=str(tmp_path / "moe"), device="cpu"))
    assert kept.config.router_aux_loss_coef == 0.01
    set_, _, set_meta = load_base(FinetuneConfig(base=str(tmp_path / "moe"), device="cpu", router_aux_loss_coef=0.5))
    assert set_.config.router_aux_loss_coef == 0.5 and set_meta["base_sha256"] == kept_meta["base_sha256"]
    ids = torch.randint(0, 257, (2, 9))
    targets = torch.randint(0, 257, (2, 9))
    torch.manual_seed(0)
    base_loss = kept.train()(ids, targets)[1] - 0.01 * kept.aux_loss
    torch.testing.assert_close(set_.train()(ids, targets)[1], base_loss + 0.5 * set_.aux_loss)
    save(tmp_path / "dense", tiny_gpt(seed=5))
    with pytest.raises(ValueError, match="no experts"):
        load_base(FinetuneConfig(base=str(tmp_path / "dense"), device="cpu", router_aux_loss_coef=0.5))
    for bad in (-0.5, float("inf")):
        with pytest.raises(ValueError, match="router_aux_loss_coef"):
            load_finetune_config(FinetuneConfig, None, [f"--router_aux_loss_coef={bad}"])


def test_a_hugging_face_gpt2_file_is_a_base(tmp_path, shared_data):
    from safetensors.torch import save_file

    from llmkern.model.hf import hf_gpt2_config, to_hf_gpt2

    model = tiny_gpt(seed=3, n_embd=128, n_head=4)  # not 64-wide heads: the count is config.json's
    hf = {k: v for k, v in to_hf_gpt2(model).items() if k != "lm_head.weight"}  # tied: HF stores it once
    path = str(tmp_path / "model.safetensors")
    save_file(hf, path)
    (tmp_path / "config.json").write_text(json.dumps(hf_gpt2_config(model.config)))  # its head count
    loaded, tok, meta = load_base(FinetuneConfig(base=path, base_tokenizer="bytes", device="cpu"))
    assert meta["source"] == "hf-gpt2" and tok.eot_token == 256
    ids = torch.randint(0, 257, (2, 9))
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0])
    with pytest.raises(ValueError, match="50257 tokens"):  # GPT-2's tokenizer on a 257-token model
        load_base(FinetuneConfig(base=path, base_tokenizer=f"{shared_data}/gpt2.tiktoken", device="cpu"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_base(FinetuneConfig(base=str(tmp_path / "bad.safetensors"), device="cpu"))


def test_the_base_fingerprint_is_by_content_not_by_path(tmp_path):
    """A run folder, its checkpoint folder and a moved copy are one base; other weights, or the same weights
    under another model config, are another. A Hugging Face file is fingerprinted by its bytes."""
    import shutil

    from safetensors.torch import save_file

    from llmkern.model.hf import to_hf_gpt2

    def fingerprint(path, **kw):
        return load_base(FinetuneConfig(base=str(path), device="cpu", **kw))[2]["base_sha256"]

    def save(path, model):
        save_finetuned(str(path), 1, model.state_dict(), {"model_config": model.config.to_dict(), "tokenizer": "bytes"})

    model = tiny_gpt(seed=5)
    save(tmp_path / "run", model)
    first = fingerprint(tmp_path / "run")
    assert fingerprint(tmp_path / "run" / "checkpoints" / "step_0000001") == first
    shutil.copytree(tmp_path / "run", tmp_path / "elsewhere" / "renamed")
    assert fingerprint(tmp_path / "elsewhere" / "renamed") == first
    save(tmp_path / "other", tiny_gpt(seed=6))
    assert fingerprint(tmp_path / "other") != first
    other_config = GPT(dataclasses.replace(model.config, norm_eps=1e-6))
    other_config.load_state_dict(model.state_dict())
    save(tmp_path / "eps", other_config)
    assert fingerprint(tmp_path / "eps") != first
    assert fingerprint(tmp_path / "run", backend="auto") == first  # saved with "torch": kernels, not the model
    # GPTConfig fields added since (rope_scaling, qkv_bias) change no fingerprint an older run recorded while
    # they hold what their absence meant; another value of them is another model
    from llmkern.finetune.base import base_fingerprint

    source = str(tmp_path / "run" / "checkpoints" / "step_0000001")
    older = {k: v for k, v in model.config.to_dict().items() if k not in ("rope_scaling", "qkv_bias")}
    assert base_fingerprint(source, model.config.to_dict()) == base_fingerprint(source, older)
    assert base_fingerprint(source, {**model.config.to_dict(), "qkv_bias": not model.config.bias}) != \
        base_fingerprint(source, older)

    hf = tiny_gpt(seed=3, n_embd=128, n_head=2)  # GPT-2 heads are 64 wide
    save_file({k: v for k, v in to_hf_gpt2(hf).items() if k != "lm_head.weight"}, str(tmp_path / "a.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_head": 2}))  # as the Hub lays it out
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert fingerprint(tmp_path / "a.safetensors", base_tokenizer="bytes") == \
        fingerprint(tmp_path / "b.safetensors", base_tokenizer="bytes")


def test_finetune_command_runs_a_recipe_and_reports_bad_settings(tmp_path, capsys):
    from llmkern.cli import main

    model = tiny_gpt(seed=2, block_size=256)  # the Alpaca prompt is about 150 bytes
    save_finetuned(str(tmp_path / "base"), 1, model.state_dict(),
                   {"model_config": model.config.to_dict(), "tokenizer": "bytes"})
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(6)]))
    common = [f"--base={tmp_path / 'base'}", f"--data={data}", f"--out_dir={tmp_path / 'sft'}", "--progress=false"]
    assert main(["finetune", "sft", *common, "--max_steps=2", "--batch_size=2", "--max_len=256",
                 "--num_samples=1", "--max_new_tokens=3", "--ckpt_interval=1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "sft" and summary["steps"] == 2
    assert not os.path.exists(tmp_path / "sft" / "train_state")  # saved at step 1, gone with the final model
    assert main(["finetune", "sft", *common, "--max_steps=2", "--resume=true"]) == 2
    assert "the run finished" in capsys.readouterr().err
    assert os.path.isdir(summary["checkpoint"]) and os.path.isfile(tmp_path / "sft" / "responses.json")
    assert main(["generate", "--run", str(tmp_path / "sft"), "--instruction", "Say 3.", "--max-new-tokens", "4",
                 "--temperature", "0", "--device", "cpu"]) == 0
    response = capsys.readouterr().out
    assert "### Response" not in response and "Below is an instruction" not in response
    assert main(["generate", "--run", str(tmp_path / "sft"), "--instruction", "x", "--prompt", "y"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["finetune", "sft", *common, "--lora_rnak=4"]) == 2
    assert "unknown setting 'lora_rnak'" in capsys.readouterr().err
    assert main(["finetune", "dpo", *common]) == 2  # an instruction file is not preference data
    assert "needs a string 'chosen'" in capsys.readouterr().err


def _cli_errors():
    from llmkern.train.interrupt import TrainingInterrupted

    # (what the recipe raises, the exit code; None: it propagates, with its traceback)
    return [(ValueError("bad setting"), 2), (OSError(28, "No space left on device"), 2),
            (FinetuneDiverged("the loss was NaN"), 1), (TrainingInterrupted("saved", "SIGTERM"), 128 + 15),
            (RuntimeError("saving the model failed on rank 0"), None), (KeyError("loss"), None),
            (KeyboardInterrupt(), 130)]  # main says "interrupted" and exits as a shell reports Ctrl-C


@pytest.mark.parametrize("error,code", _cli_errors(), ids=lambda v: type(v).__name__ if isinstance(v, BaseException)
                         else str(v))
def test_finetune_command_leaves_the_process_group_whatever_stopped_it(tmp_path, monkeypatch, capsys, error, code):
    # Under torchrun a rank whose peer failed raises a RuntimeError (distributed.fail_together): the command
    # caught only its own errors, so such a rank (and one stopped by any other error) ended without leaving
    # the process group. Now every error leaves it; the errors it reports keep their exit codes.
    import torch.distributed as dist

    from llmkern import finetune
    from llmkern.cli import main

    config_cls, _ = get_method("sft")

    def run(config):
        raise error

    monkeypatch.setattr(finetune, "get_method", lambda name: (config_cls, run))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        if code is None:
            with pytest.raises(type(error)):
                main(["finetune", "sft"])
        else:
            assert main(["finetune", "sft"]) == code
            assert str(error) in capsys.readouterr().err
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Interrupted(RuntimeError):
    pass


def test_a_stopped_run_resumes_to_the_same_weights_bitwise(tmp_path):
    """8 steps with a saved state every 3: stopping in step 5 and resuming from step 3 ends where the
    uninterrupted run ends, bit for bit (CPU), dropout and accumulation included."""
    examples, collate = times_three_examples()

    def settings(out, **kw):
        return FinetuneConfig(out_dir=str(tmp_path / out), max_steps=8, batch_size=3, grad_accum=2, lr=3e-3,
                              warmup_steps=2, ckpt_interval=3, eval_interval=4, progress=False, **kw)

    def evaluate(m):
        batch = make_lm_batch(examples, 0)
        return {"val_loss": float(m(batch["idx"], batch["targets"])[1])}

    torch.manual_seed(0)
    whole = tiny_gpt(seed=4, dropout=0.1)
    fit(whole, lm_loss, examples, collate, settings("whole"), evaluate)

    calls = {"n": 0}

    def stops_in_step_5(m, batch):
        calls["n"] += 1
        if calls["n"] > 4 * 2:  # step 5's first micro-batch
            raise Interrupted
        return lm_loss(m, batch)

    torch.manual_seed(0)
    with pytest.raises(Interrupted):
        fit(tiny_gpt(seed=4, dropout=0.1), stops_in_step_5, examples, collate, settings("stopped"), evaluate)
    torch.manual_seed(123)  # whatever happens in between is undone by the saved RNG states
    resumed = tiny_gpt(seed=4, dropout=0.1)
    summary = fit(resumed, lm_loss, examples, collate, settings("stopped", resume=True), evaluate)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert summary["first_eval"] is not None  # read back from the log
    records = [json.loads(line) for line in open(summary["metrics"])]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 4, 8]

    with pytest.raises(ValueError, match="batch_size"):  # other settings: not the same run
        fit(tiny_gpt(seed=4), lm_loss, examples, collate,
            dataclasses.replace(settings("stopped", resume=True), batch_size=2, max_steps=8))
    with pytest.raises(ValueError, match="template"):  # the same examples in another template: not the same run
        fit(tiny_gpt(seed=4), lm_loss, examples, collate, settings("stopped", resume=True, template="chatml"))
    with pytest.raises(FileNotFoundError, match="no training state"):
        fit(tiny_gpt(seed=4), lm_loss, examples, collate, settings("never", resume=True))
    with pytest.warns(UserWarning, match="schedule changed since the checkpoint: step 7 trains with lr"):
        fit(tiny_gpt(seed=4), lm_loss, examples, collate, settings("stopped", resume=True, min_lr=1e-3))


def test_a_resume_on_other_examples_or_lora_settings_of_the_same_count_is_refused(tmp_path):
    """The number of examples alone lets another data file (or max_len, ...) of as many examples slip by:
    the saved state records a fingerprint of the encoded examples and LoRA's settings. A state saved before
    they were recorded still resumes."""
    from llmkern.finetune.lora import apply_lora

    examples, collate = times_three_examples()
    tok = ByteTokenizer()
    others = [encode_prompt_response(tok, f"{i} * 4 = ", str(4 * i), 24) for i in range(11)]  # as many

    def settings(**kw):
        return FinetuneConfig(out_dir=str(tmp_path / "run"), max_steps=3, batch_size=3, ckpt_interval=2,
                              keep_train_state=True, progress=False, **{"lora_rank": 2, **kw})

    def lora_gpt(alpha=16.0):
        model = tiny_gpt(seed=4)
        apply_lora(model, 2, alpha)
        return model

    fit(lora_gpt(), lm_loss, examples, collate, settings())  # its state at its end, step 3, is kept
    with pytest.raises(ValueError, match="examples_sha256.*not the same tokens"):
        fit(lora_gpt(), lm_loss, others, collate, settings(resume=True))
    with pytest.raises(ValueError, match=r"'lora_alpha': \(16.0, 64.0\)"):
        fit(lora_gpt(64.0), lm_loss, examples, collate, settings(resume=True, lora_alpha=64.0))
    with pytest.raises(ValueError, match=r"'lora_rank': \(2, 0\)"):  # not a state_dict traceback
        fit(tiny_gpt(seed=4), lm_loss, examples, collate, settings(resume=True, lora_rank=0))

    meta_path = tmp_path / "run" / "train_state" / "checkpoints" / "step_0000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    position = meta["finetune_state"]["position"]
    for key in ("examples_sha256", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"):
        del position[key]  # as an older llmkern wrote it
    meta_path.write_text(json.dumps(meta))
    assert fit(lora_gpt(), lm_loss, examples, collate, settings(resume=True))["steps"] == 3


def test_ctrl_c_saves_the_fine_tuning_state_and_a_fresh_start_does_not_overwrite_it(tmp_path):
    import signal

    from llmkern.train import TrainingInterrupted

    examples, collate = times_three_examples()
    calls = {"n": 0}

    def ctrl_c_in_step_3(m, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # the step goes on to its end, then the state is saved
            os.kill(os.getpid(), signal.SIGINT)
        return lm_loss(m, batch)

    def settings(out, **kw):
        return FinetuneConfig(out_dir=str(tmp_path / out), max_steps=6, batch_size=3, lr=3e-3, progress=False, **kw)

    whole = tiny_gpt(seed=4)
    fit(whole, lm_loss, examples, collate, settings("whole"))
    with pytest.raises(TrainingInterrupted, match=r"SIGINT at step 3: the training state is saved .*--resume=true"):
        fit(tiny_gpt(seed=4), ctrl_c_in_step_3, examples, collate, settings("stopped"))
    with pytest.raises(ValueError, match="already holds a run .*--overwrite=true"):  # nothing lost by accident
        fit(tiny_gpt(seed=4), lm_loss, examples, collate, settings("stopped"))
    resumed = tiny_gpt(seed=4)
    fit(resumed, lm_loss, examples, collate, settings("stopped", resume=True))
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    fit(tiny_gpt(seed=4), lm_loss, examples, collate, settings("stopped", overwrite=True))  # asked for: allowed


def test_a_signal_between_the_save_and_stop_checks_still_saves_what_it_reports(tmp_path, monkeypatch):
    """The stop flag turns on in a step that does not save, after fit's "save now?" check: the state it
    reports as saved must be this step's, not an older one (nor a crash for want of any)."""
    from llmkern.finetune import loop
    from llmkern.train import TrainingInterrupted

    class SignalAfterFirstRead(loop.StopOnSignal):
        reads = 0

        @property
        def requested(self):
            SignalAfterFirstRead.reads += 1  # every later read (the step's second check) sees the signal
            return "SIGTERM" if SignalAfterFirstRead.reads > 1 else None

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(loop, "StopOnSignal", SignalAfterFirstRead)
    examples, collate = times_three_examples()
    config = FinetuneConfig(out_dir=str(tmp_path / "run"), max_steps=6, batch_size=3, progress=False,
                            ckpt_interval=0)
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM at step (\d+): the training state is saved") as info:
        fit(tiny_gpt(seed=4), lm_loss, examples, collate, config)
    step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert f"step_{step:07d})" in str(info.value)  # the checkpoint of the step it stopped at
    monkeypatch.undo()  # no more signals: the run resumes from that checkpoint to its end
    resumed = fit(tiny_gpt(seed=4), lm_loss, examples, collate, dataclasses.replace(config, resume=True))
    assert resumed["steps"] == 6


def test_a_reward_model_run_is_refused_where_a_language_model_is_needed(tmp_path, capsys):
    from llmkern.cli import main

    model = tiny_gpt(seed=2)
    state = {**model.state_dict(), "head.weight": torch.zeros(1, model.config.n_embd), "head.bias": torch.zeros(1)}
    save_finetuned(str(tmp_path / "rm"), 1, state, {"model_config": model.config.to_dict(), "tokenizer": "bytes",
                                                   "finetune": {"method": "reward"}})
    assert main(["generate", "--run", str(tmp_path / "rm"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "is not a language model: it holds a 'reward' run's weights" in err and "Traceback" not in err
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"instruction": "Say 1.", "input": "", "output": "1"}] * 4))
    assert main(["finetune", "sft", f"--base={tmp_path / 'rm'}", f"--data={data}", f"--out_dir={tmp_path / 'x'}"]) == 2
    assert "is a 'reward' run: its body learned to score text" in capsys.readouterr().err
    from llmkern.finetune.base import load_base

    body, _, _ = load_base(FinetuneConfig(base=str(tmp_path / "rm"), device="cpu"), language_model=False)
    assert isinstance(body, GPT)  # a reward model may start a new scoring head


# --- packing ----------------------------------------------------------------------------------

def test_packing_keeps_examples_whole_and_apart():
    examples = [([1, 2, 3], [IGNORE, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [IGNORE, IGNORE, 8, 9]), ([10], [10])]
    rows = pack_examples(examples, max_len=6)
    assert rows == [([1, 2, 3, 4, 5], [IGNORE, 2, 3, IGNORE, 5], [0, 0, 0, 1, 1]),
                    ([6, 7, 8, 9, 10], [IGNORE, IGNORE, 8, 9, IGNORE], [0, 0, 0, 0, 1])]
    batch = make_packed_batch([rows[0], ([1, 2], [IGNORE, 2], [0, 0])], pad_id=0)
    assert batch["idx"].tolist() == [[1, 2, 3, 4], [1, 2, 0, 0]]
    assert batch["targets"].tolist() == [[2, 3, IGNORE, 5], [2, IGNORE, IGNORE, IGNORE]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]
    with pytest.raises(ValueError, match="more than max_len"):
        pack_examples([([1] * 7, [1] * 7)], max_len=6)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_a_packed_row_scores_each_example_as_if_alone(preset):
    """The summed loss of a packed batch equals the sum of each example's own loss: document masking
    and positions restarting at each example make packing exact (learned positions and RoPE)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset, vocab_size=257, block_size=64, n_layer=2, n_embd=32, n_head=2,
                                      backend="torch"))
    tok = ByteTokenizer()
    examples = [encode_prompt_response(tok, f"Q{i}: " + "x" * i, "yes" * (i % 3 + 1), 64) for i in range(7)]

    def total_nll(batch, doc_ids=None):
        _, mean = model(batch["idx"], batch["targets"], doc_ids)
        return float(mean.detach()) * int((batch["targets"] != IGNORE).sum())

    alone = sum(total_nll(make_lm_batch([ex], 0)) for ex in examples)
    packed = make_packed_batch(pack_examples(examples, 40), 0)
    assert packed["idx"].size(0) < len(examples)  # several examples share a row
    assert total_nll(packed, packed["doc_ids"]) == pytest.approx(alone, rel=1e-5)
    assert total_nll(packed) != pytest.approx(alone, rel=1e-5)  # without the masking they would see each other
