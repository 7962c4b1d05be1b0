"""Edge cases of instruction SFT and classification: gradient accumulation over micro-batches of uneven size
(rows of other lengths, an epoch's short last batch) steps as one batch of them all would, and the classifier's
arguments are checked."""

import json

import pytest
import torch

from llmkern.finetune.base import save_finetuned
from llmkern.finetune.classify import (
    ClassifyConfig,
    GPTClassifier,
    classify_texts,
    run_classify,
)
from llmkern.finetune.sft import SFTConfig, run_sft
from llmkern.model import GPT, GPTConfig
from llmkern.train.metrics import read_metrics


@pytest.fixture(autouse=True)
def no_charts(monkeypatch):
    """The PNG charts each run draws take most of these tiny runs' time and are not what is tested here."""
    from llmkern.finetune import loop
    from llmkern.train import metrics

    for module in (loop, metrics):
        monkeypatch.setattr(module, "plot_metrics", lambda *args, **kwargs: None)


def tiny_gpt() -> GPT:
    torch.manual_seed(7)
    return GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=96, n_layer=1, n_head=2, n_embd=32,
                                     backend="torch"))


def make_base(path) -> str:
    model = tiny_gpt()
    save_finetuned(str(path), 0, model.state_dict(), {"model_config": model.config.to_dict(), "tokenizer": "bytes"})
    return str(path)


def train_records(out_dir) -> list[tuple[float, float]]:
    """(loss, grad_norm) of each logged training step."""
    return [(r["loss"], r["grad_norm"]) for r in read_metrics(f"{out_dir}/metrics.jsonl") if r["kind"] == "train"]


def accumulated_like_one_batch(tmp_path, rows: list[dict], splits, run) -> None:
    """Train on `rows` (written as data.json beside a tiny base) once per (batch_size, grad_accum) of `splits`, by
    run(settings) (settings: the base, data, out_dir and batch settings every recipe reads), and assert that each
    split logs the same steps as the first."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    base = make_base(tmp_path / "base")
    logged = []
    for batch_size, grad_accum in splits:
        out = tmp_path / f"split{batch_size}x{grad_accum}"
        run({"base": base, "data": str(data), "out_dir": str(out), "max_steps": 2, "batch_size": batch_size,
             "grad_accum": grad_accum, "lr": 1e-2, "warmup_steps": 1, "val_fraction": 0.0, "eval_interval": 0,
             "device": "cpu", "progress": False})
        logged.append(train_records(out))
    for accumulated in logged[1:]:
        assert_same_steps(logged[0], accumulated)


def assert_same_steps(one, accumulated) -> None:
    assert len(one) == len(accumulated) > 0
    for (loss_one, norm_one), (loss_acc, norm_acc) in zip(one, accumulated):
        assert loss_acc == pytest.approx(loss_one, rel=1e-5)
        assert norm_acc == pytest.approx(norm_one, rel=1e-4)


@pytest.mark.parametrize("pack", [False, True])
def test_sft_accumulation_over_responses_of_other_lengths_steps_like_one_batch(tmp_path, pack):
    # Responses of 1 to 40 bytes: the micro-batches hold very different numbers of scored tokens. The loss is
    # the mean over the scored tokens of the step, as one batch of both micro-batches gives it: a mean of the
    # micro-batches' means would weigh each token of a short response many times more.
    examples = [{"instruction": f"Repeat {i}.", "output": "x" * (1 + 13 * (i % 4))} for i in range(8)]
    accumulated_like_one_batch(tmp_path, examples, ((4, 1), (2, 2)), lambda settings: run_sft(SFTConfig(
        **settings, max_len=96, pack=pack, template="plain", num_samples=0)))


def test_classify_accumulation_with_an_epochs_short_last_batch_steps_like_one_batch(tmp_path):
    # 6 examples in micro-batches of 4: each epoch is a batch of 4 and one of 2, accumulated into one step. Each
    # example counts once in the step's mean, as in one batch of all 6; not the 2 of the short batch twice as much.
    rows = [{"text": "abc" * (i + 1), "label": i % 2} for i in range(6)]
    accumulated_like_one_batch(tmp_path, rows, ((6, 1), (4, 2)),
                               lambda settings: run_classify(ClassifyConfig(**settings, max_len=32)))


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_classify_texts_refuses_a_batch_size_that_is_no_positive_int(batch_size):
    from llmkern.data.tokenizer import get_tokenizer

    clf = GPTClassifier(tiny_gpt(), num_classes=2)
    with pytest.raises((TypeError, ValueError), match="batch_size"):
        classify_texts(clf, get_tokenizer("bytes"), ["abc", "de"], batch_size=batch_size)


@pytest.mark.parametrize("max_len", [0, -3, 2.5])
def test_a_classifier_refuses_a_max_len_that_is_no_positive_int(max_len):
    # max_len=-3 would cut every text's last 3 tokens off (ids[:-3]), silently
    with pytest.raises((TypeError, ValueError), match="max_len"):
        GPTClassifier(tiny_gpt(), num_classes=2, max_len=max_len)


@pytest.mark.parametrize("recipe", ["dpo", "reward"])
def test_pair_recipes_accumulate_an_epochs_short_last_batch_like_one_batch(tmp_path, recipe):
    # 6 pairs in micro-batches of 4: a batch of 4 and one of 2 accumulated into a step count each pair once, as
    # one batch of all 6 does (the short batch's 2 pairs counted twice as much before).
    from llmkern.finetune.dpo import DPOConfig, run_dpo
    from llmkern.finetune.reward import RewardConfig, run_reward

    pairs = [{"instruction": f"Say {i}.", "input": "", "chosen": "yes" * (i + 1), "rejected": "no" * (2 * i + 1)}
             for i in range(6)]
    config, run = (DPOConfig, run_dpo) if recipe == "dpo" else (RewardConfig, run_reward)
    accumulated_like_one_batch(tmp_path, pairs, ((6, 1), (4, 2)),
                               lambda settings: run(config(**settings, template="plain")))


def test_weighed_micro_batches_are_weighed_on_the_host_and_moved_to_the_device_one_at_a_time(monkeypatch):
    # All of a step's micro-batches must be weighed before the first trains (per_rank needs them all); weighed on
    # the device, each weight was a wait on it, and every micro-batch of the step sat there at once.
    from llmkern.data.tokenizer import ByteTokenizer
    from llmkern.finetune import FinetuneConfig, loop
    from llmkern.finetune.data import encode_prompt_response, make_lm_batch
    from llmkern.finetune.sft import lm_loss, scored_targets

    events = []
    real_to_device = loop.to_device

    def to_device(batch, device):
        if isinstance(batch, dict):  # a whole micro-batch (to_device calls itself on each tensor in it)
            events.append("to_device")
        return real_to_device(batch, device)

    monkeypatch.setattr(loop, "to_device", to_device)

    def weigh(batch):
        events.append("weigh")
        return scored_targets(batch)

    def loss_fn(model, batch):
        events.append("loss")
        return lm_loss(model, batch)

    tok = ByteTokenizer()
    rows = [encode_prompt_response(tok, f"{i} + 1 = ", "x" * (1 + 5 * i), 48) for i in range(4)]
    batches = iter([rows[:2], rows[2:]])
    config = FinetuneConfig(out_dir="unused", grad_accum=2, device="cpu")
    model = tiny_gpt().train()
    loss, _ = loop._accumulate_gradients(model, loss_fn, batches, lambda r: make_lm_batch(r, 0), config,
                                         torch.device("cpu"), weigh=weigh)
    assert events == ["weigh", "weigh", "to_device", "loss", "to_device", "loss"]
    with torch.no_grad():  # and the step's loss is still the mean over all its scored tokens
        whole = make_lm_batch(rows, 0)
        assert loss == pytest.approx(float(model(whole["idx"], whole["targets"])[1]), rel=1e-5)


def test_a_state_saved_with_lora_targets_as_typed_resumes_under_their_one_spelling(tmp_path):
    # validate spells "qkv, fc" as "qkv,fc" now; a state saved before recorded it as typed, and was refused.
    from llmkern.finetune import FinetuneConfig, loop

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    saved = {"lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_targets": "qkv, fc"}
    loop.save_train_state(str(tmp_path), model, optimizer, saved, {"step": 1})
    config = FinetuneConfig(lora_rank=8, lora_alpha=16.0, lora_targets="qkv, fc", out_dir=str(tmp_path)).validate()
    assert config.lora_targets == "qkv,fc"
    loop.restore_train_state(str(tmp_path), model, optimizer, loop.lora_position(config))
