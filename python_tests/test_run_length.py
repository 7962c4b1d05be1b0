"""A run's length against its schedule and its checkpoints: schedule settings that contradict each other are
refused at config time, a run shorter than its warmup is said, and a resume from a checkpoint at or past
max_steps says what it does instead of quietly "finishing" (and rewrites nothing)."""

import json
import os
import signal
import warnings

import pytest
import torch

from llmkern.data.shards import tokenize_documents
from llmkern.data.tokenizer import ByteTokenizer
from llmkern.finetune import FinetuneConfig
from llmkern.finetune.data import encode_prompt_response, make_lm_batch
from llmkern.finetune.loop import fit
from llmkern.model import GPT, GPTConfig
from llmkern.train import TrainConfig, Trainer, TrainingInterrupted, load_config
from llmkern.train import checkpoint as ckpt
from llmkern.train import trainer as trainer_module
from llmkern.train.metrics import read_metrics
from llmkern.train.schedules import learning_rate
from llmkern.train.trainer import check_run_folder

# --- schedule settings --------------------------------------------------------------------------------

@pytest.mark.parametrize("max_steps, warmup, fraction", [(100, 20, 0.9), (7, 2, 0.8), (50, 49, 0.05), (10, 1, 1.0)])
def test_a_wsd_decay_that_would_begin_inside_the_warmup_is_refused(max_steps, warmup, fraction):
    with pytest.raises(ValueError, match=rf"decay_fraction={fraction} of max_steps={max_steps}\).*"
                                         rf"warmup_steps={warmup}"):
        TrainConfig(schedule="wsd", max_steps=max_steps, warmup_steps=warmup, decay_fraction=fraction).validate()
    with pytest.raises(ValueError, match="schedule='wsd' decays over the last"):
        load_config(None, ["--schedule=wsd", f"--max_steps={max_steps}", f"--warmup_steps={warmup}",
                           f"--decay_fraction={fraction}"])


def test_the_values_a_refused_wsd_schedule_suggests_are_accepted_and_decay_as_asked():
    with pytest.raises(ValueError) as refused:
        TrainConfig(schedule="wsd", max_steps=30, warmup_steps=9, decay_fraction=0.75, lr=1.0, min_lr=0.0).validate()
    message = str(refused.value)
    assert "decays over the last 22 steps" in message  # round(0.75 * 30)
    fraction = float(message.split("lower decay_fraction to at most ")[1].split()[0])
    warmup = int(message.split("warmup_steps to at most ")[1].split()[0])
    assert (fraction, warmup) == (0.7, 8)
    for steps, fraction_of in ((9, fraction), (warmup, 0.75)):
        cfg = TrainConfig(schedule="wsd", max_steps=30, warmup_steps=steps, decay_fraction=fraction_of, lr=1.0,
                          min_lr=0.0).validate()
        lrs = [learning_rate(s, cfg) for s in range(30)]
        decay = round(30 * cfg.decay_fraction)
        start = 30 - decay  # the decay begins where asked, after the warmup and a stable phase (maybe none)
        assert start >= cfg.warmup_steps
        assert lrs[cfg.warmup_steps - 1 : start] == [1.0] * (start - cfg.warmup_steps + 1)
        assert lrs[start:] == pytest.approx([1.0 - i / decay for i in range(decay)])


def test_a_run_shorter_than_its_warmup_is_said_not_refused():
    # the first steps of a longer run (a resume with a higher max_steps continues the warmup): allowed
    for schedule in ("cosine", "wsd"):
        with pytest.warns(UserWarning, match=r"warmup_steps=20 is longer than max_steps=7: .*never reaches "
                                             r"lr=0.002"):
            cfg = TrainConfig(schedule=schedule, max_steps=7).validate()
        assert learning_rate(6, cfg) == pytest.approx(0.002 * 7 / 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warmup that ends with the run reaches lr: nothing to say
        TrainConfig(max_steps=20, warmup_steps=20).validate()
        TrainConfig(schedule="wsd", max_steps=100, warmup_steps=20, decay_fraction=0.8).validate()


def tiny_gpt(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=64, n_layer=1, n_head=2, n_embd=32,
                                     backend="torch"))


def lm_loss(model, batch):
    _, loss = model(batch["idx"], batch["targets"])
    return loss, {}


def arithmetic_examples(n):
    tok = ByteTokenizer()
    return [encode_prompt_response(tok, f"{i} * 3 = ", str(3 * i), 16) for i in range(n)]


def test_a_finetuning_run_shorter_than_its_warmup_is_said(tmp_path):
    def collate(rows):
        return make_lm_batch(rows, 0)

    cfg = FinetuneConfig(out_dir=str(tmp_path / "a"), max_steps=3, warmup_steps=5, batch_size=4, lr=1e-2,
                         min_lr=1e-3, progress=False)
    with pytest.warns(UserWarning, match=r"warmup_steps=5 is longer than the run's 3 steps \(max_steps=3\): the "
                                         r"learning rate ends at 0.006, never reaching lr=0.01"):
        fit(tiny_gpt(), lm_loss, arithmetic_examples(12), collate, cfg)
    cfg = FinetuneConfig(out_dir=str(tmp_path / "b"), epochs=2, batch_size=4, progress=False)  # warmup_steps=10
    with pytest.warns(UserWarning, match=r"warmup_steps=10 is longer than the run's 6 steps \(epochs=2 over"):
        fit(tiny_gpt(), lm_loss, arithmetic_examples(12), collate, cfg)
    cfg = FinetuneConfig(out_dir=str(tmp_path / "c"), max_steps=3, warmup_steps=3, batch_size=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(tiny_gpt(), lm_loss, arithmetic_examples(12), collate, cfg)


# --- resuming at or past max_steps --------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("shards"))
    documents = [" ".join(f"word{(i * 7 + j) % 23} is {j}." for j in range(10)) for i in range(120)]
    tokenize_documents(documents, "bytes", path, val_fraction=0.15, seed=0)
    return path


def tiny_config(out_dir, data_dir, **overrides):
    settings = {"out_dir": str(out_dir), "data_dir": data_dir, "model": {"n_layer": 1, "n_head": 2, "n_embd": 32},
                "batch_tokens": 256, "micro_batch": 4, "seq_len": 32, "max_steps": 4, "lr": 3e-3, "min_lr": 3e-4,
                "warmup_steps": 1, "eval_interval": 2, "eval_steps": 2, "ckpt_interval": 0, "log_interval": 1,
                "progress": False, "seed": 3}
    return TrainConfig(**{**settings, **overrides}).validate()


def run_folder_files(run):
    """{path: (bytes, mtime_ns, inode)} of every file of a run folder: what a resume that trains nothing keeps."""
    found = {}
    for folder, _, names in os.walk(run):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, run)] = (f.read(), os.stat(path).st_mtime_ns, os.stat(path).st_ino)
    return found


def test_resuming_past_max_steps_is_refused_and_leaves_the_run_as_it_was(tmp_path, data_dir):
    run = tmp_path / "run"
    Trainer(tiny_config(run, data_dir)).fit()
    before = run_folder_files(run)
    with pytest.raises(ValueError, match=r"step 4 is past max_steps=3; to train on from it, give a max_steps "
                                         r"above 4"):
        Trainer(tiny_config(run, data_dir, max_steps=3)).fit(resume=True)
    assert run_folder_files(run) == before
    with pytest.raises(ValueError, match="step 4 is past max_steps=2"):
        check_run_folder(str(run), resume=True, overwrite=False, max_steps=2)  # a caller's check before the data
    check_run_folder(str(run), resume=True, overwrite=False)  # without max_steps: as before
    # what the message says to do: a higher max_steps trains on from the checkpoint
    with pytest.warns(UserWarning, match="schedule changed"):  # a longer cosine: as any resume that lengthens one
        summary = Trainer(tiny_config(run, data_dir, max_steps=6)).fit(resume=True)
    assert summary["steps"] == 6 and ckpt.load_checkpoint(str(run)).step == 6
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl")) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_resuming_a_finished_run_says_it_is_complete_and_rewrites_nothing(tmp_path, data_dir):
    run = tmp_path / "run"
    finished = Trainer(tiny_config(run, data_dir)).fit()
    before = run_folder_files(run)
    trainer = Trainer(tiny_config(run, data_dir))
    with pytest.warns(UserWarning, match=r"is already complete: its checkpoint is at max_steps=4, evaluated; "
                                         r"nothing to train \(to train on, resume with a higher max_steps\)"):
        summary = trainer.fit(resume=True)
    assert {k: summary[k] for k in ("steps", "stop_reason", "val_loss", "best_val_loss")} == {
        k: finished[k] for k in ("steps", "stop_reason", "val_loss", "best_val_loss")}
    after = run_folder_files(run)
    assert after["metrics.jsonl"][0] == before["metrics.jsonl"][0]  # (the resume's cut rewrites it the same)
    # nothing else is written again: not the checkpoint (a new copy swapped in), not the charts
    assert {p: v for p, v in after.items() if p != "metrics.jsonl"} == {p: v for p, v in before.items()
                                                                       if p != "metrics.jsonl"}
    # the resumed trainer holds the finished model (a caller's samples come from it)
    saved = ckpt.load_checkpoint(str(run)).model
    assert all(torch.equal(v, saved[k]) for k, v in trainer.raw_model.state_dict().items() if k in saved)


def test_a_run_stopped_after_its_last_step_still_finishes_on_resume(tmp_path, data_dir, monkeypatch):
    # a signal during the last step: the checkpoint is at max_steps but its final evaluation was never run,
    # so resuming runs it and saves, as the run would have (not "already complete")
    real_step = trainer_module.Trainer._train_step

    def signalled_during_the_last_step(self):
        record = real_step(self)
        if self.step + 1 == self.config.max_steps:
            os.kill(os.getpid(), signal.SIGINT)
        return record

    run = tmp_path / "run"
    monkeypatch.setattr(trainer_module.Trainer, "_train_step", signalled_during_the_last_step)
    with pytest.raises(TrainingInterrupted, match="SIGINT at step 4"):
        Trainer(tiny_config(run, data_dir)).fit()
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl")) if r["kind"] == "eval"] == [0, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        summary = Trainer(tiny_config(run, data_dir)).fit(resume=True)
    assert (summary["steps"], summary["stop_reason"]) == (4, "max_steps")
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl")) if r["kind"] == "eval"] == [0, 2, 4]
    with open(os.path.join(ckpt.latest_checkpoint(str(run)), "meta.json")) as f:
        assert json.load(f)["trainer"]["last_eval_step"] == 4
