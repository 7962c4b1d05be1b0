"""The trainer: schedules, config errors, learning, bitwise resume, NaN skips, checkpoints, early stopping."""

import json
import math
import os
import pickle
import random
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from numerics import InfGradient
from safetensors.torch import load_file, save_file

from llmkern.data.shards import load_manifest, tokenize_documents
from llmkern.train import TrainConfig, Trainer, TrainingDiverged, load_config
from llmkern.train import checkpoint as ckpt
from llmkern.train.metrics import mfu, peak_flops_of, read_metrics
from llmkern.train.schedules import cosine_lr, learning_rate, wsd_lr
from llmkern.train.trainer import seed_everything

TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32}


def synthetic_documents(n_docs=150, seed=0):
    """Short documents of a small grammar: easy to learn, so a few steps lower the loss."""
    rng = random.Random(seed)
    subjects, verbs, objects = ["the cat", "a dog", "my bird", "the fox"], ["sees", "eats", "likes"], ["fish", "bread", "the moon"]
    return [" ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(rng.randint(5, 12)))
            for _ in range(n_docs)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("shards"))
    tokenize_documents(synthetic_documents(), "bytes", path, val_fraction=0.15, seed=0)
    return path


def tiny_config(out_dir, data_dir, **overrides):
    settings = dict(out_dir=str(out_dir), data_dir=data_dir, preset="tiny", model=dict(TINY_MODEL), batch_tokens=256,
                    micro_batch=4, seq_len=32, max_steps=12, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=0,
                    eval_steps=2, ckpt_interval=0, log_interval=1, progress=False, seed=7)
    settings.update(overrides)
    return TrainConfig(**settings).validate()


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"}


# --- schedules ------------------------------------------------------------------------------------

def test_cosine_schedule_warms_up_linearly_then_decays_to_the_floor():
    lrs = [cosine_lr(s, 1.0, 0.1, warmup=10, total=110) for s in range(120)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # half way down the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[110:] == [0.1] * 10


def test_wsd_schedule_holds_then_decays_linearly():
    lrs = [wsd_lr(s, 2.0, 0.0, warmup=5, total=100, decay_fraction=0.2) for s in range(101)]
    assert lrs[4] == pytest.approx(2.0) and lrs[0] == pytest.approx(0.4)
    assert set(lrs[5:80]) == {2.0}
    assert lrs[90] == pytest.approx(1.0)
    assert lrs[100] == 0.0
    cfg = TrainConfig(schedule="wsd", lr=2.0, min_lr=0.0, warmup_steps=5, max_steps=100, decay_fraction=0.2)
    assert learning_rate(90, cfg) == lrs[90]


# --- config ----------------------------------------------------------------------------------------

def test_config_from_toml_json_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 0.002\nbetas = [0.8, 0.9]\nschedule = "wsd"\n[model]\nn_layer = 3\n')
    cfg = load_config(str(toml), ["--max_steps=7", "--model.n_embd=48", "--compile=true", "--min-lr=1e-5"])
    assert (cfg.lr, cfg.betas, cfg.schedule, cfg.max_steps, cfg.compile, cfg.min_lr) == (0.002, (0.8, 0.9), "wsd", 7, True, 1e-5)
    assert cfg.model == {"n_layer": 3, "n_embd": 48}
    js = tmp_path / "run.json"
    js.write_text(json.dumps(cfg.to_dict()))
    assert load_config(str(js)) == cfg
    assert load_config(None, ["--betas=0.9,0.99"]).betas == (0.9, 0.99)


@pytest.mark.parametrize("overrides, message", [
    (["--learning_rate=1"], "unknown setting 'learning_rate'"),
    (["--max_step=1"], "unknown setting 'max_step' in command line; did you mean 'max_steps'"),
    (["--max_steps"], "'max_steps' in command line must be an integer, got 'true'"),  # a bare --key is =true
    (["--max_steps=ten"], "'max_steps' in command line must be an integer"),
    (["--lr=fast"], "'lr' in command line must be a number"),
    (["--compile=maybe"], "'compile' in command line must be a boolean"),
    (["--model.n_layers=2"], "unknown model setting 'model.n_layers'"),
    (["--model.n_layer=two"], "'model.n_layer' in command line must be an integer"),
    (["--optim.lr=1"], "only model.<field> keys may be dotted"),
    (["max_steps=3"], "--key=value"),
    (["--schedule=linear"], "schedule must be one of"),
    (["--batch_tokens=1000"], "batch_tokens must be a multiple of"),
    (["--betas=0.9"], "'betas' in command line must be 2 numbers"),
    (["--grad_clip=nan"], "grad_clip and weight_decay must be >= 0"),  # NaN compares false both ways
    (["--weight_decay=nan"], "grad_clip and weight_decay must be >= 0"),
    (["--weight_decay=inf"], "grad_clip and weight_decay must be >= 0"),  # every weight went to NaN
    (["--lr=inf"], "need a finite lr > 0"),  # every step was NaN, then TrainingDiverged
    (["--seed=-1"], r"seed must be in \[0, 2\*\*32 - 1\]"),  # numpy refused it once the data was ready
    (["--seed=4294967296"], r"seed must be in \[0, 2\*\*32 - 1\]"),
    (["--out_dir="], "out_dir must name the run folder"),  # the run went into the current folder
    (["--corpus_max_bytes=0"], "corpus_max_bytes must be >= 1"),
    (["--patience=3", "--eval_interval=0"], "patience=3 .* eval_interval=0 evaluates only at the end"),
    # the model settings were checked only once the data was ready
    (["--preset=gpt3"], "unknown preset 'gpt3'"),
    (["--model.n_head=3"], r"n_embd \(128\) must be a multiple of n_head \(3\)"),
    (["--model.pos=alibi"], "pos must be one of"),
    (["--model.block_size=64"], "seq_len=128 is longer than model.block_size=64"),
    (["--init_from=runs/x", "--model.n_layer=2"], r"init_from takes the model's shape .* drop the model"),
])
def test_config_errors_name_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("fields, message", [
    (dict(schedule="cosine", decay_fraction=0.5), "decay_fraction=0.5 has no effect: only schedule='wsd'"),
    (dict(model={"rope_theta": 5e5}), "model.rope_theta=500000.0 has no effect: .* pos='learned'"),
    (dict(init_from="runs/x", preset="gpt2"), "preset='gpt2' has no effect: init_from='runs/x'"),
])
def test_a_setting_the_config_does_not_read_is_warned_about(fields, message):
    with pytest.warns(UserWarning, match=message):
        TrainConfig(**fields).validate()


def test_settings_that_are_read_are_not_warned_about(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(schedule="wsd", decay_fraction=0.5).validate()
        TrainConfig(preset="tiny-llama", model={"rope_theta": 5e5}).validate()
        TrainConfig(init_from="runs/x").validate()
        load_config(None, ["--tokenizer=bpe:512", "--corpus_max_bytes=1000"])  # the built-in corpus reads them
        load_config(None, ["--data_dir=shards"], defaults={"tokenizer": "bpe:2048"})  # the main job's default


def test_corpus_settings_beside_a_data_dir_are_warned_about(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('tokenizer = "gpt2"\n')
    with pytest.warns(UserWarning, match="tokenizer set but not used: .* data_dir='shards'"):
        load_config(str(toml), ["--data_dir=shards"])
    with pytest.warns(UserWarning, match="corpus_max_bytes set but not used"):
        load_config(None, ["--data_dir=shards", "--corpus_max_bytes=1000"])


@pytest.mark.parametrize("fields, error, message", [
    (dict(preset="gpt3"), ValueError, "unknown preset 'gpt3'"),
    (dict(init_from="no/such/run"), FileNotFoundError, "init_from 'no/such/run' does not exist"),
    (dict(backend="cuda", device="cpu"), ValueError, "backend='cuda' cannot run adamw"),
])
def test_a_bad_model_or_backend_is_refused_before_the_corpus_is_prepared(tmp_path, monkeypatch, fields, error,
                                                                         message):
    def no_corpus(self):
        raise AssertionError("the corpus was prepared before the settings were checked")

    monkeypatch.setattr(Trainer, "_prepare_builtin_corpus", no_corpus)
    with pytest.raises(error, match=message):
        Trainer(TrainConfig(out_dir=str(tmp_path / "run"), progress=False, **fields))


@pytest.mark.parametrize("samples", ["-1", "5"])
def test_a_sample_count_the_prompts_cannot_give_is_refused_before_training(samples, monkeypatch, capsys):
    import llmkern.train.main_job as main_job
    from llmkern.cli import main

    def no_training(*args, **kwargs):
        raise AssertionError("trained before --samples was checked")

    monkeypatch.setattr(main_job, "run_train", no_training)
    assert main(["train", f"--samples={samples}"]) == 2  # before: 5 printed 4 samples, -1 none
    assert "--samples must be 0 to 4" in capsys.readouterr().err


@pytest.mark.parametrize("fields, message", [
    (dict(overwrite="false"), "'overwrite' in TrainConfig must be a boolean"),  # a str "false" is true
    (dict(max_steps=10.5), "'max_steps' in TrainConfig must be an integer"),
    (dict(lr="0.1"), "'lr' in TrainConfig must be a number"),
    (dict(betas=(0.9, "a")), "'betas' in TrainConfig must be a number"),
    (dict(seed=None), "'seed' in TrainConfig must be an integer"),
    (dict(model={"n_layer": "2"}), "'model.n_layer' in TrainConfig must be an integer"),
    (dict(model=[1]), "'model' in TrainConfig must be a table"),
])
def test_a_config_made_in_python_is_type_checked(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields).validate()
    cfg = TrainConfig(lr=1, betas=[0.9, 0.99]).validate()  # what a file could give: made the fields' types
    assert (cfg.lr, cfg.betas) == (1.0, (0.9, 0.99)) and isinstance(cfg.lr, float)


def test_config_file_errors(tmp_path):
    bad_type = tmp_path / "bad.toml"
    bad_type.write_text('max_steps = "100"\n')
    with pytest.raises(ValueError, match="'max_steps' in .*bad.toml must be an integer"):
        load_config(str(bad_type))
    script = tmp_path / "run.py"
    script.write_text("import os\nos.remove('x')\n")
    with pytest.raises(ValueError, match=".toml or .json"):  # never executed
        load_config(str(script))
    broken = tmp_path / "broken.json"
    broken.write_text("{lr: 1")
    with pytest.raises(ValueError, match="cannot parse"):
        load_config(str(broken))
    with pytest.raises(FileNotFoundError, match="none.toml"):
        load_config(str(tmp_path / "none.toml"))


# --- training ------------------------------------------------------------------------------------

def test_tiny_model_loss_falls(tmp_path, data_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=25, eval_interval=25))
    before = trainer.evaluate()
    summary = trainer.fit()
    assert before == pytest.approx(math.log(257), rel=0.1)  # an untrained byte model is near uniform
    assert summary["val_loss"] < before - 1.0
    losses = train_losses(tmp_path / "run")
    assert losses[25] < losses[1] - 1.0
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert {r["kind"] for r in records} == {"train", "eval"}
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in records if r["kind"] == "train")
    for chart in ("loss.png", "lr.png", "throughput.png"):
        assert os.path.getsize(tmp_path / "run" / chart) > 1000
    assert not any("aux_loss" in r for r in records)  # a dense model has no load-balancing loss
    assert not os.path.exists(tmp_path / "run" / "aux_loss.png")


def test_a_moe_run_logs_the_cross_entropy_and_the_mean_load_balancing_loss(tmp_path, data_dir, monkeypatch):
    from llmkern.model import GPT

    # each training micro-batch's cross-entropy (before the aux loss is added) and load-balancing loss
    cross_entropies, aux_losses = [], []
    forward, logits_and_loss = GPT.forward, GPT._logits_and_loss

    def forward_spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            aux_losses.append(float(self.aux_loss))
        return out

    def logits_and_loss_spy(self, *args, **kwargs):
        logits, loss = logits_and_loss(self, *args, **kwargs)
        if self.training:
            cross_entropies.append(float(loss.detach()))
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward_spy)
    monkeypatch.setattr(GPT, "_logits_and_loss", logits_and_loss_spy)
    config = tiny_config(tmp_path / "run", data_dir, preset="tiny-moe", max_steps=4, log_interval=2,
                         model={**TINY_MODEL, "router_aux_loss_coef": 0.5})
    trainer = Trainer(config)
    assert trainer.grad_accum == 2
    trainer.fit()
    assert len(aux_losses) == len(cross_entropies) == 4 * 2
    train = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        first = (r["step"] - 1) * 2  # the step's micro-batches
        assert r["aux_loss"] == pytest.approx(np.mean(aux_losses[first:first + 2]), rel=1e-6)
        assert r["loss"] == pytest.approx(np.mean(cross_entropies[first:first + 2]), rel=1e-6)
        # near k = 2, its value for even routing (a young router): the loss itself, not coef times it
        assert r["aux_loss"] == pytest.approx(2.0, rel=0.2)
    assert os.path.getsize(tmp_path / "run" / "aux_loss.png") > 1000


def test_a_moe_run_resumes_bitwise_with_its_load_balancing_loss(tmp_path, data_dir):
    config = tiny_config(tmp_path / "run", data_dir, preset="tiny-moe", max_steps=4, ckpt_interval=2,
                         model={**TINY_MODEL, "dropout": 0.1})
    Trainer(config).fit()

    def logged():
        return {r["step"]: (r["loss"], r["aux_loss"], r["grad_norm"])
                for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"}

    uninterrupted = logged()
    for step, path in ckpt.step_dirs(str(tmp_path / "run")):
        if step == 4:  # "crash" after step 2
            shutil.rmtree(path)
    Trainer(config).fit(resume=True)
    assert logged() == uninterrupted  # exact floats


def test_document_masking_gives_the_model_the_document_of_every_token(tmp_path, data_dir, monkeypatch):
    from llmkern.model import GPT

    seen = []
    forward = GPT.forward

    def spy(self, idx, targets=None, doc_ids=None):
        seen.append((idx, doc_ids))
        return forward(self, idx, targets, doc_ids)

    monkeypatch.setattr(GPT, "forward", spy)
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=2, eval_interval=2, seq_len=128,
                                  batch_tokens=512, document_masking=True))
    trainer.fit()
    assert seen and all(d is not None and d.shape == x.shape for x, d in seen)
    eot = int(load_manifest(data_dir)["eot_token"])
    for x, d in seen:  # a new document (a higher id) starts exactly at each eot token
        starts = torch.diff(d, dim=1) > 0
        assert torch.equal(starts, x[:, 1:] == eot)
    assert any(bool((torch.diff(d, dim=1) > 0).any()) for _, d in seen), "no row crossed a document"


@pytest.mark.parametrize("optimizer", ["llmkern", "torch"])
def test_resume_continues_bitwise_identically(tmp_path, data_dir, optimizer):
    # dropout uses the RNG, so the RNG states must be restored too
    config = tiny_config(tmp_path / "run", data_dir, max_steps=8, ckpt_interval=4, eval_interval=4,
                         model={**TINY_MODEL, "dropout": 0.1}, optimizer=optimizer)
    Trainer(config).fit()
    uninterrupted = train_losses(tmp_path / "run")
    final = ckpt.load_checkpoint(str(tmp_path / "run"))
    assert final.step == 8
    # "crash" after step 4: only its checkpoint is left
    for step, path in ckpt.step_dirs(str(tmp_path / "run")):
        if step == 8:
            os.rename(path, str(tmp_path / "final_step8"))
    summary = Trainer(config).fit(resume=True)
    resumed = train_losses(tmp_path / "run")
    assert summary["steps"] == 8
    assert resumed == uninterrupted  # exact floats, steps 1-4 kept from the first run
    again = ckpt.load_checkpoint(str(tmp_path / "run"))
    for name, tensor in final.model.items():
        assert torch.equal(again.model[name], tensor), name
    assert again.meta["loader"] == final.meta["loader"]
    # extended past its cosine's end: it goes on, and says that step 9 no longer has the saved run's lr
    with pytest.warns(UserWarning, match=r"schedule changed since the checkpoint: step 9 trains with lr 0.00"):
        Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=10, ckpt_interval=4, eval_interval=4,
                            model={**TINY_MODEL, "dropout": 0.1}, optimizer=optimizer)).fit(resume=True)


def test_accumulated_micro_batches_step_like_one_micro_batch_of_all(tmp_path, data_dir):
    # The same 8 windows a step, as 2 micro-batches of 4 or 1 of 8: the same mean loss, gradient (its norm)
    # and so the same next losses; a micro-batch loss not divided by their count doubles the norm.
    logged = {}
    for micro_batch in (8, 4):
        run = tmp_path / f"micro{micro_batch}"
        Trainer(tiny_config(run, data_dir, max_steps=3, micro_batch=micro_batch, grad_clip=0.0)).fit()
        logged[micro_batch] = [(r["loss"], r["grad_norm"]) for r in read_metrics(str(run / "metrics.jsonl"))
                               if r["kind"] == "train"]
    assert len(logged[8]) == len(logged[4]) == 3
    for (loss_one, norm_one), (loss_two, norm_two) in zip(logged[8], logged[4]):
        assert loss_two == pytest.approx(loss_one, rel=1e-5)
        assert norm_two == pytest.approx(norm_one, rel=1e-4)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        Trainer(tiny_config(tmp_path / "run", data_dir)).fit(resume=True)


def test_data_without_a_val_split_is_a_clear_error(tmp_path):
    tokenize_documents(synthetic_documents(20), "bytes", str(tmp_path / "shards"), val_fraction=0.0)
    with pytest.raises(ValueError, match="no 'val' split"):
        Trainer(tiny_config(tmp_path / "run", str(tmp_path / "shards")))


class NaNLossAt(torch.nn.Module):
    """Wraps a model; its loss is NaN on the chosen forward calls (counted from 1), and so are its
    gradients unless finite_gradients."""

    def __init__(self, model, bad_calls, finite_gradients=False):
        super().__init__()
        self.inner, self.bad_calls, self.calls, self.finite_gradients = model, bad_calls, 0, finite_gradients

    def forward(self, x, y):
        logits, loss = self.inner(x, y)
        self.calls += 1
        if self.training and self.bad_calls(self.calls):
            nan = float("nan")
            loss = loss + loss.detach() * nan if self.finite_gradients else loss * nan
        return logits, loss


@pytest.mark.parametrize("optimizer", ["llmkern", "torch"])
@pytest.mark.parametrize("finite_gradients", [False, True], ids=["nan-gradients", "finite-gradients"])
def test_nan_loss_skips_the_step_and_is_logged(tmp_path, data_dir, optimizer, finite_gradients):
    # llmkern's AdamW skips on the device on a non-finite gradient norm: a NaN loss with finite
    # gradients must reach that check too
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=6, batch_tokens=128,  # 1 micro-batch a step
                                  optimizer=optimizer))
    trainer.model = NaNLossAt(trainer.model, lambda call: call == 3, finite_gradients)
    weights = {}

    original_step = trainer._train_step

    def spy():
        before = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters()}
        result = original_step()
        weights[trainer.step + 1] = (before, {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters()})
        return result

    trainer._train_step = spy
    summary = trainer.fit()
    assert summary["steps"] == 6
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    skips = [r for r in records if r["kind"] == "skip"]
    assert [(r["step"], r["loss"], r["reason"]) for r in skips] == [(3, "nan", "non-finite loss")]
    before, after = weights[3]
    assert all(torch.equal(before[n], after[n]) for n in before)  # the NaN step changed nothing
    before, after = weights[4]
    assert not all(torch.equal(before[n], after[n]) for n in before)  # the next one trains again


def test_an_eval_and_checkpoint_due_at_a_skipped_step_come_at_the_next_step_that_trains(tmp_path, data_dir):
    # they were dropped: the next checkpoint came two intervals later, doubling the work a crash loses
    def config():
        return tiny_config(tmp_path / "run", data_dir, max_steps=8, batch_tokens=128, eval_interval=3,
                           ckpt_interval=3, keep_checkpoints=10)

    trainer = Trainer(config())
    trainer.model = NaNLossAt(trainer.model, lambda call: trainer.step == 2)  # step 3 (trainer.step counts after)
    trainer.fit()
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in records if r["kind"] == "skip"] == [3]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 4, 6, 8]
    assert [s for s, _ in ckpt.step_dirs(str(tmp_path / "run"))] == [4, 6, 8]
    uninterrupted = train_losses(tmp_path / "run")
    # "crash" after step 5: the checkpoint of step 4 resumes bit for bit
    for step, path in ckpt.step_dirs(str(tmp_path / "run")):
        if step > 4:
            os.rename(path, str(tmp_path / f"later_step{step}"))
    Trainer(config()).fit(resume=True)
    assert train_losses(tmp_path / "run") == uninterrupted


def test_an_eval_due_at_a_skipped_step_that_a_signal_stopped_comes_after_resuming(tmp_path, data_dir):
    # a SIGTERM in step 3, skipped, when its eval was due: the run saved step 3 and the resumed run left the
    # overdue eval out (evals at 0, 6, 8, where the run that went on had 0, 4, 6, 8: patience counted otherwise)
    import signal

    from llmkern.train import TrainingInterrupted

    def config(run):
        return tiny_config(tmp_path / run, data_dir, max_steps=8, batch_tokens=128, eval_interval=3)

    def nan_at_step_3(trainer, kill):
        def bad(call):
            if trainer.step == 2 and kill:
                os.kill(os.getpid(), signal.SIGTERM)
            return trainer.step == 2
        trainer.model = NaNLossAt(trainer.model, bad)
        return trainer

    nan_at_step_3(Trainer(config("whole")), kill=False).fit()
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 3"):
        nan_at_step_3(Trainer(config("stopped")), kill=True).fit()
    Trainer(config("stopped")).fit(resume=True)
    evals = {run: [(r["step"], r["val_loss"]) for r in read_metrics(str(tmp_path / run / "metrics.jsonl"))
                   if r["kind"] == "eval"] for run in ("whole", "stopped")}
    assert [step for step, _ in evals["whole"]] == [0, 4, 6, 8]
    assert evals["stopped"] == evals["whole"]
    assert train_losses(tmp_path / "stopped") == train_losses(tmp_path / "whole")


def test_repeated_nan_stops_with_clear_message_and_keeps_last_checkpoint(tmp_path, data_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=20, batch_tokens=128, ckpt_interval=3,
                                  max_bad_steps=3))
    trainer.model = NaNLossAt(trainer.model, lambda call: call >= 5)
    with pytest.raises(TrainingDiverged, match=r"step 7: .* 3 steps in a row.*step_0000003"):
        trainer.fit()
    assert [s for s, _ in ckpt.step_dirs(str(tmp_path / "run"))] == [3]
    good = ckpt.load_checkpoint(str(tmp_path / "run"))
    assert all(torch.isfinite(t).all() for t in good.model.values())


def test_llmkern_optimizer_clips_as_torch_clip_then_adamw(tmp_path, data_dir):
    # the trainer hands clipping to llmkern's AdamW (fused, no host sync); grad_clip small enough to
    # clip every step, so a step without the clip would differ at once
    runs = {}
    for optimizer in ("llmkern", "torch"):
        Trainer(tiny_config(tmp_path / optimizer, data_dir, max_steps=6, grad_clip=0.05, optimizer=optimizer)).fit()
        runs[optimizer] = [r for r in read_metrics(str(tmp_path / optimizer / "metrics.jsonl")) if r["kind"] == "train"]
    assert all(r["grad_norm"] > 0.1 for r in runs["torch"])  # so every step clipped
    for ours, theirs in zip(runs["llmkern"], runs["torch"], strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)


def test_a_step_is_read_after_the_next_is_queued_unless_the_loop_acts_on_it(tmp_path, data_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=7, log_interval=4, ckpt_interval=6))
    events = []
    queue, read = trainer._train_step, trainer._read

    def queue_spy():
        record = queue()
        events.append(("queue", record.step))
        return record

    def read_spy(record, bar):
        events.append(("read", record.step))
        return read(record, bar)

    trainer._train_step, trainer._read = queue_spy, read_spy
    trainer.fit()
    order = [f"{kind[0]}{step}" for kind, step in events]
    # steps 4 (log), 6 (checkpoint) and 7 (the last) are read at once, the others one step late
    assert order == ["q1", "q2", "r1", "q3", "r2", "q4", "r3", "r4", "q5", "q6", "r5", "r6", "q7", "r7"]


# --- float16 and loss scaling ----------------------------------------------------------------------

def test_loss_scale_backs_off_on_overflow_and_grows_after_clean_steps():
    from llmkern.train.loss_scale import DynamicLossScale

    scale = DynamicLossScale(init_scale=8.0, growth_interval=3)
    scale.update(overflowed=True)
    assert (scale.scale, scale.clean_steps) == (4.0, 0)
    for _ in range(2):
        scale.update(overflowed=False)
    assert scale.scale == 4.0
    scale.update(overflowed=False)  # the third clean step in a row
    assert (scale.scale, scale.clean_steps) == (8.0, 0)
    for _ in range(5):
        scale.update(overflowed=True)
    assert scale.scale == 1.0 and not scale.can_back_off()  # never below 1
    restored = DynamicLossScale()
    restored.load_state_dict({**scale.state_dict(), "clean_steps": 2})
    assert (restored.scale, restored.clean_steps) == (1.0, 2)
    for bad in (dict(init_scale=0.5), dict(init_scale=math.inf), dict(growth_factor=1.0), dict(backoff_factor=1.0),
                dict(growth_interval=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DynamicLossScale(**bad)


def test_unscale_then_clip_equals_clipping_the_unscaled_gradients():
    from llmkern.train.loss_scale import unscale_

    for max_norm in (0.5, 1e9):  # clipped, and only unscaled
        params = [torch.nn.Parameter(torch.randn(s)) for s in ((3, 5), (7,), (1,))]
        grads = [torch.randn_like(p) for p in params]
        expected = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for e, g in zip(expected, grads):
            e.grad = g.clone()
        expected_norm = float(torch.nn.utils.clip_grad_norm_(expected, max_norm))
        for p, g in zip(params, grads):
            p.grad = g * 1024.0
        unscale_(params, 1024.0)
        assert float(torch.nn.utils.clip_grad_norm_(params, max_norm)) == pytest.approx(expected_norm, rel=1e-6)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad, e.grad, rtol=1e-6, atol=0)
    params[0].grad[0, 0] = math.inf
    unscale_(params, 1024.0)
    assert params[0].grad[0, 0] == math.inf  # an overflow stays one, for the skip


class OverflowAt(NaNLossAt):
    """Wraps a model; the loss is finite, its gradients inf, on the chosen forward calls (from 1)."""

    def forward(self, x, y):
        logits, loss = self.inner(x, y)
        self.calls += 1
        if self.training and self.bad_calls(self.calls):
            loss = InfGradient.apply(loss)
        return logits, loss


def test_float16_training_learns_and_logs_its_loss_scale(tmp_path, data_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, dtype="float16", max_steps=20, eval_interval=20))
    assert trainer.autocast_dtype == torch.float16 and trainer.loss_scale.scale == 2.0**16
    trainer.fit()
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert evals[-1] < evals[0] - 0.5
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 20 and all(r["loss_scale"] == 2.0**16 for r in train)
    Trainer(tiny_config(tmp_path / "fp32", data_dir, max_steps=1)).fit()  # the same first step in float32
    fp32 = [r for r in read_metrics(str(tmp_path / "fp32" / "metrics.jsonl")) if r["kind"] == "train"][0]
    assert train[0]["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=0.02)  # unscaled, not 65536 times it
    assert all(math.isfinite(p.detach().sum()) and p.dtype == torch.float32 for p in trainer.raw_model.parameters())


def test_float16_overflow_halves_the_scale_and_is_not_divergence(tmp_path, data_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, dtype="float16", max_steps=8, batch_tokens=128,
                                  max_bad_steps=2))  # one micro-batch a step
    trainer.model = OverflowAt(trainer.model, lambda call: call in (2, 3, 4))  # 3 in a row > max_bad_steps
    before = {}
    original_step = trainer._train_step

    def spy():
        before[trainer.step + 1] = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters()}
        return original_step()

    trainer._train_step = spy
    assert trainer.fit()["steps"] == 8
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    skips = [(r["step"], r["reason"]) for r in records if r["kind"] == "skip"]
    assert skips == [(2, "float16 gradient overflow: loss scale 65536 -> 32768"),
                     (3, "float16 gradient overflow: loss scale 32768 -> 16384"),
                     (4, "float16 gradient overflow: loss scale 16384 -> 8192")]
    assert all(torch.equal(before[3][n], before[4][n]) for n in before[3])  # the skipped step 3 changed nothing
    assert [r["loss_scale"] for r in records if r["kind"] == "train"] == [65536.0] + [8192.0] * 4
    assert trainer.bad_steps == 0


def test_float16_overflow_at_the_smallest_scale_is_divergence(tmp_path, data_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, dtype="float16", max_steps=8, batch_tokens=128,
                                  max_bad_steps=2))
    trainer.loss_scale.scale = 2.0  # one halving left: then an overflow is not the scale's doing
    trainer.model = OverflowAt(trainer.model, lambda call: call >= 2)
    with pytest.raises(TrainingDiverged, match="step 4: .* 2 steps in a row"):
        trainer.fit()
    assert trainer.loss_scale.scale == 1.0


def test_float16_resume_continues_bitwise_with_the_loss_scale(tmp_path, data_dir):
    config = tiny_config(tmp_path / "run", data_dir, dtype="float16", max_steps=8, ckpt_interval=4, eval_interval=4)

    def trainer():
        t = Trainer(config)
        t.loss_scale.growth_interval = 3  # the scale changes across the resume at step 4
        return t

    trainer().fit()
    uninterrupted = [(r["step"], r["loss"], r["loss_scale"]) for r in read_metrics(
        str(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    assert len({s for _, _, s in uninterrupted}) == 3  # 65536, then doubled twice
    for step, path in ckpt.step_dirs(str(tmp_path / "run")):
        if step == 8:
            os.rename(path, str(tmp_path / "final_step8"))
    trainer().fit(resume=True)
    resumed = [(r["step"], r["loss"], r["loss_scale"]) for r in read_metrics(
        str(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    assert resumed == uninterrupted


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.fixture
def saved_run(tmp_path, data_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=2))
    trainer.fit()
    return trainer


def test_an_evaluation_larger_than_the_val_split_scores_each_window_once(saved_run, data_dir):
    from llmkern.data.loader import TokenLoader
    from llmkern.train.inference import evaluate_run

    windows = TokenLoader(data_dir, "val", 1, 32, mode="sequential").windows_per_epoch
    assert 4 < windows < 1000
    every_window = evaluate_run(saved_run.run_dir, data_dir, batch_size=windows, seq_len=32)
    for batch_size in (windows + 1, 10 * windows):  # before: one batch wrapped around the split
        got = evaluate_run(saved_run.run_dir, data_dir, batch_size=batch_size, seq_len=32)
        assert got["tokens"] == every_window["tokens"] == windows * 32
        assert got["loss"] == pytest.approx(every_window["loss"], rel=1e-6)
    # the trainer's evaluation likewise stops at the split's last whole step of windows
    trainer = saved_run
    per_step = trainer.config.micro_batch
    trainer.config.eval_steps = windows // per_step
    exact = trainer.evaluate()
    for eval_steps in (windows // per_step + 1, 3 * windows + 1):  # past the end, by part of a pass
        trainer.config.eval_steps = eval_steps
        assert trainer.evaluate() == exact  # the same windows, in the same steps



def test_a_val_split_smaller_than_one_micro_batch_is_scored_once_per_window(tmp_path, data_dir):
    # The val split holds fewer windows than a micro-batch: that one batch wrapped around the split and
    # scored its first windows twice. Now the trainer scores each window once, like evaluate_run.
    from llmkern.data.loader import TokenLoader
    from llmkern.train.trainer import evaluate_loss

    windows = TokenLoader(data_dir, "val", 1, 32, mode="sequential").windows_per_epoch
    micro_batch = windows + 3
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, micro_batch=micro_batch, batch_tokens=micro_batch * 32,
                                  eval_steps=3))
    every_window = evaluate_loss(trainer.model, TokenLoader(data_dir, "val", windows, 32, mode="sequential"), 1)
    assert trainer.evaluate() == pytest.approx(every_window, rel=1e-6)


@pytest.mark.parametrize("settings, message", [
    (dict(max_batches=0), "max_batches must be an int >= 1, got 0"),  # scored one batch all the same
    (dict(max_batches=-3), "max_batches must be an int >= 1, got -3"),
    (dict(max_batches=True), "max_batches must be an int >= 1, got True"),
    (dict(seq_len=0), "seq_len must be an int >= 1 or None, got 0"),  # ran at the model's block_size
    (dict(seq_len=16.0), "seq_len must be an int >= 1 or None, got 16.0"),
])
def test_evaluate_run_refuses_a_count_it_would_not_score(saved_run, data_dir, settings, message):
    from llmkern.train.inference import evaluate_run

    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate_run(saved_run.run_dir, data_dir, batch_size=2, **{"max_batches": 2, **settings})


def test_evaluate_loss_refuses_zero_steps(saved_run, data_dir):
    from llmkern.data.loader import TokenLoader
    from llmkern.train.trainer import evaluate_loss

    loader = TokenLoader(data_dir, "val", 2, 32, mode="sequential")
    for steps in (0, -1, 1.0):  # 0: torch.stack of no losses, an error that named nothing
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            evaluate_loss(saved_run.model, loader, steps)

def test_a_bad_device_or_sample_count_is_a_clear_error(saved_run, tmp_path, data_dir, capsys):
    from llmkern.cli import main

    generate = ["generate", "--run", saved_run.run_dir, "--prompt", "the"]
    cases = [(generate + ["--device", "bogus"], "device must be"),
             (generate + ["--num-samples", "0"], "--num-samples must be at least 1"),
             (["train", f"--out_dir={tmp_path / 'new'}", f"--data_dir={data_dir}", "--device=bogus"], "device must be")]
    if not torch.cuda.is_available():
        cases.append((generate + ["--device", "cuda"], "no CUDA GPU is available"))
    for args, message in cases:
        assert main(args) == 2, args
        assert message in capsys.readouterr().err, args


def test_checkpoint_round_trip_keeps_tied_weights_and_optimizer_state(saved_run):
    state = ckpt.load_checkpoint(saved_run.run_dir)
    assert state.step == 2
    model_state = saved_run.raw_model.state_dict()
    assert set(state.model) == set(model_state)
    assert all(torch.equal(state.model[k], model_state[k]) for k in model_state)
    assert state.meta["aliases"] == {"lm_head.weight": "wte.weight"}  # tied: stored once
    optim = saved_run.optimizer.state_dict()
    assert state.optimizer["param_groups"] == json.loads(json.dumps(optim["param_groups"]))
    for key, entry in optim["state"].items():
        for name, value in entry.items():
            assert torch.equal(state.optimizer["state"][key][name], value)


def test_a_crash_while_saving_leaves_the_previous_checkpoint(saved_run, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    saved_run.step = 3
    with pytest.raises(OSError, match="disk full"):
        saved_run.save()
    assert [s for s, _ in ckpt.step_dirs(saved_run.run_dir)] == [2]
    assert ckpt.load_checkpoint(saved_run.run_dir).step == 2


def test_corrupt_or_missing_checkpoints_are_clear_errors(saved_run, tmp_path):
    path = ckpt.latest_checkpoint(saved_run.run_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(str(tmp_path / "empty"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.load_checkpoint(str(tmp_path / "empty"))

    model_file = os.path.join(path, "model.safetensors")
    with open(model_file, "rb") as f:
        data = f.read()
    with open(model_file, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged: cannot read model.safetensors"):
        ckpt.load_checkpoint(path)

    # a pickle in place of the tensors (the model's or the optimizer's) is refused, never unpickled
    marker = tmp_path / "unpickled"
    with open(model_file, "wb") as f:
        f.write(data)
    for name in ("model.safetensors", "state.safetensors"):
        file = os.path.join(path, name)
        shutil.copy(file, str(tmp_path / name))
        with open(file, "wb") as f:
            pickle.dump(_WritesAFileWhenUnpickled(str(marker)), f)
        with pytest.raises(ValueError, match=f"damaged: cannot read {name}"):
            ckpt.load_checkpoint(path)
        assert not marker.exists()
        shutil.copy(str(tmp_path / name), file)
    assert ckpt.load_checkpoint(path).step == 2
    # a file missing from the folder is named
    for name in ("model.safetensors", "state.safetensors"):
        os.replace(os.path.join(path, name), str(tmp_path / name))
        with pytest.raises(FileNotFoundError, match=f"incomplete: {name} is missing"):
            ckpt.load_checkpoint(path)
        os.replace(str(tmp_path / name), os.path.join(path, name))

    with open(os.path.join(path, "meta.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        ckpt.load_checkpoint(path)
    os.remove(os.path.join(path, "meta.json"))
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("name", ["model.safetensors", "state.safetensors"])
def test_a_bit_flipped_in_a_tensor_file_is_detected_not_loaded(tmp_path, name):
    # safetensors checks its header and sizes only: a flipped bit among the tensors' bytes loaded silently
    model = {"w": torch.randn(16, 8), "b": torch.randn(8)}
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(16, 8)}},
                 "param_groups": [{"lr": 0.1, "params": [0]}]}
    path = ckpt.save_checkpoint(str(tmp_path), 5, model, optimizer, {})
    assert torch.equal(ckpt.load_checkpoint(path).model["w"], model["w"])
    file = os.path.join(path, name)
    with open(file, "rb") as f:
        data = bytearray(f.read())
    data[-20] ^= 0x01  # inside the last tensor's values: the header still parses
    with open(file, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(ValueError, match=f"damaged: {name} differs from the file it was saved with"):
        ckpt.load_checkpoint(path)


def test_a_tensor_file_gone_between_its_load_and_its_hash_is_a_damaged_checkpoint(tmp_path, monkeypatch):
    # a save pruning the folder while another process loads it: the loader's error, not a bare FileNotFoundError
    path = ckpt.save_checkpoint(str(tmp_path), 1, {"w": torch.randn(4, 4)}, {"state": {}, "param_groups": []}, {})
    real_load = ckpt.load_file

    def load_then_vanish(file):
        tensors = real_load(file)
        os.remove(file)
        return tensors

    monkeypatch.setattr(ckpt, "load_file", load_then_vanish)
    with pytest.raises(ValueError, match="damaged: cannot read model.safetensors"):
        ckpt.load_checkpoint(path)


def test_a_checkpoint_saved_before_the_file_hashes_still_loads(tmp_path):
    model = {"w": torch.randn(4, 4)}
    path = ckpt.save_checkpoint(str(tmp_path), 1, model, {"state": {}, "param_groups": []}, {})
    meta_file = os.path.join(path, "meta.json")
    with open(meta_file) as f:
        meta = json.load(f)
    del meta["sha256"]
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    assert torch.equal(ckpt.load_checkpoint(path).model["w"], model["w"])


@pytest.mark.parametrize("key, value", [("aliases", []), ("optimizer", "x"), ("rng", None), ("step", "5"),
                                        ("sha256", ["x"])])
def test_a_meta_json_value_of_the_wrong_kind_is_a_damaged_checkpoint(tmp_path, key, value):
    path = ckpt.save_checkpoint(str(tmp_path), 1, {"w": torch.zeros(2)}, {"state": {}, "param_groups": []}, {})
    meta_file = os.path.join(path, "meta.json")
    with open(meta_file) as f:
        meta = json.load(f)
    meta[key] = value  # was an AttributeError or TypeError from deep inside the loading
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=f"damaged: meta.json's '{key}' is not a JSON"):
        ckpt.load_checkpoint(path)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    weights = {"w": torch.randn(3, 5)}
    for step in (1, 2, 3):
        ckpt.save_checkpoint(str(tmp_path), step, weights, {"state": {}, "param_groups": []}, {}, keep=2)
    assert [s for s, _ in ckpt.step_dirs(str(tmp_path))] == [2, 3]
    assert not [n for n in os.listdir(ckpt.checkpoints_dir(str(tmp_path))) if n.startswith(".tmp")]
    assert torch.equal(ckpt.load_checkpoint(str(tmp_path)).model["w"], weights["w"])



@pytest.mark.parametrize("step, keep, error, message", [
    (3, 0, ValueError, "keep must be >= 1, got 0"),  # kept every checkpoint: a [:-0] slice is empty
    (3, -1, ValueError, "keep must be >= 1, got -1"),
    (3, True, TypeError, "keep must be an int, got bool"),
    (-1, 2, ValueError, "step must be >= 0, got -1"),  # wrote step_-000001, which no resume finds
    (True, 2, TypeError, "step must be an int, got bool"),
    (2.0, 2, TypeError, "step must be an int, got float"),
])
def test_a_bad_step_or_keep_is_refused_before_anything_is_written(tmp_path, step, keep, error, message):
    weights, empty = {"w": torch.randn(3)}, {"state": {}, "param_groups": []}
    for saved in (1, 2):
        ckpt.save_checkpoint(str(tmp_path), saved, weights, empty, {}, keep=2)
    with pytest.raises(error, match=message):
        ckpt.save_checkpoint(str(tmp_path), step, weights, empty, {}, keep=keep)
    assert sorted(os.listdir(ckpt.checkpoints_dir(str(tmp_path)))) == ["step_0000001", "step_0000002"]


def test_a_new_checkpoint_is_made_durable_before_an_older_one_is_deleted(tmp_path, monkeypatch):
    # Until the folder holding the renamed checkpoint is flushed, a power loss may undo the rename; the
    # rotation's deletions then could leave no checkpoint at all.
    weights, empty = {"w": torch.randn(3)}, {"state": {}, "param_groups": []}
    ckpt.save_checkpoint(str(tmp_path), 1, weights, empty, {}, keep=1)
    root = ckpt.checkpoints_dir(str(tmp_path))
    flushed = []
    monkeypatch.setattr(ckpt, "fsync_dir", lambda path: flushed.append((path, sorted(os.listdir(path)))))
    ckpt.save_checkpoint(str(tmp_path), 2, weights, empty, {}, keep=1)
    assert flushed[-1] == (root, ["step_0000001", "step_0000002"])  # (before it: the new folder's own flush)
    assert sorted(os.listdir(root)) == ["step_0000002"]


def test_an_atomic_write_flushes_its_folder(tmp_path, monkeypatch):
    from llmkern import _atomic

    _atomic.fsync_dir(str(tmp_path))  # really flushes a folder here, and is no error
    flushed = []
    monkeypatch.setattr(_atomic, "fsync_dir", flushed.append)
    _atomic.write_json_atomic(str(tmp_path / "progress.json"), {"done": 3})
    assert flushed == [str(tmp_path)]
    assert json.loads((tmp_path / "progress.json").read_text()) == {"done": 3}


def test_a_fresh_run_in_a_reused_folder_keeps_its_own_checkpoint(tmp_path):
    # An earlier run left step 10; a fresh run writes step 5. Rotation must keep the checkpoint just
    # written (it used to delete it and keep the old run's), and resume must not find the old one.
    old, new = {"w": torch.randn(3, 5)}, {"w": torch.randn(3, 5)}
    empty = {"state": {}, "param_groups": []}
    ckpt.save_checkpoint(str(tmp_path), 10, old, empty, {}, keep=1)
    path = ckpt.save_checkpoint(str(tmp_path), 5, new, empty, {}, keep=1)
    assert os.path.isdir(path)
    assert [s for s, _ in ckpt.step_dirs(str(tmp_path))] == [5]
    assert torch.equal(ckpt.load_checkpoint(str(tmp_path)).model["w"], new["w"])


def test_a_writer_killed_while_swapping_a_step_out_leaves_that_step_loadable(tmp_path, monkeypatch):
    # The same step saved again (a finished run resumed) moves the old copy aside, then renames the new one
    # in: killed between the two renames, the run had no step_* folder, and with keep=1 nothing to resume.
    first, second = {"w": torch.randn(3)}, {"w": torch.randn(3)}
    empty = {"state": {}, "param_groups": []}
    ckpt.save_checkpoint(str(tmp_path), 8, first, empty, {}, keep=1)
    real_rename, renames = os.rename, []

    def killed_after_the_first_rename(src, dst):
        real_rename(src, dst)
        renames.append(dst)
        if len(renames) == 1:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "rename", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(str(tmp_path), 8, second, empty, {}, keep=1)
    monkeypatch.undo()
    assert ".old_" in renames[0]  # the crash came where it should: the old copy aside, the new not in place
    assert [s for s, _ in ckpt.step_dirs(str(tmp_path))] == [8]
    assert torch.equal(ckpt.load_checkpoint(str(tmp_path)).model["w"], first["w"])
    path = ckpt.save_checkpoint(str(tmp_path), 8, second, empty, {}, keep=1)  # the save again: tidy after it
    assert sorted(os.listdir(ckpt.checkpoints_dir(str(tmp_path)))) == [os.path.basename(path)]
    assert torch.equal(ckpt.load_checkpoint(str(tmp_path)).model["w"], second["w"])


@pytest.mark.parametrize("older", [[], [1]])
def test_a_swapped_out_copy_that_is_its_steps_checkpoint_counts_toward_keep(tmp_path, older):
    # killed between a re-save's two renames, step 2 is left only as step_2.old_<pid>: step_dirs takes it for
    # step 2's checkpoint, and the next save deleted it by name, leaving fewer than `keep` (or older) checkpoints
    empty = {"state": {}, "param_groups": []}
    saved = {step: {"w": torch.randn(3)} for step in (1, 2, 3)}
    for step in [*older, 2]:
        ckpt.save_checkpoint(str(tmp_path), step, saved[step], empty, {}, keep=2)
    in_place = ckpt.step_dir(str(tmp_path), 2)
    os.rename(in_place, in_place + ".old_999999")
    ckpt.save_checkpoint(str(tmp_path), 3, saved[3], empty, {}, keep=2)
    assert [s for s, _ in ckpt.step_dirs(str(tmp_path))] == [2, 3]
    assert sorted(os.listdir(ckpt.checkpoints_dir(str(tmp_path)))) == ["step_0000002", "step_0000003"]
    assert torch.equal(ckpt.load_checkpoint(in_place).model["w"], saved[2]["w"])


def test_cuda_rng_states_are_restored_in_device_order(monkeypatch):
    tensors, meta = ckpt.capture_rng_states()
    tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.cuda.")}
    for i in range(12):  # a 12-GPU machine: "rng.cuda.10" sorts before "rng.cuda.2" as a string
        tensors[f"rng.cuda.{i}"] = torch.full((4,), i, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 12)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    ckpt.restore_rng_states({"tensors": tensors, "meta": meta})
    assert [int(s[0]) for s in restored] == list(range(12))


def random_draws():
    """A few numbers from each generator a checkpoint restores."""
    return torch.rand(3).tolist(), np.random.rand(2).tolist(), [random.random() for _ in range(2)]


def rewrite_as_unranked(path):
    """Turn a one-process checkpoint into the layout from before per-rank RNG states ("rng.torch", ...)."""
    tensors = load_file(os.path.join(path, "state.safetensors"))
    save_file({k.replace("rng.rank0.", "rng."): v for k, v in tensors.items()}, os.path.join(path, "state.safetensors"))
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    meta["rng"] = meta["rng"]["ranks"][0]
    del meta["sha256"]  # nor file hashes then
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)


def test_each_rank_restores_its_own_rng_states(tmp_path):
    per_rank, expected = [], []
    for rank in range(2):  # two processes' generators, one after the other
        seed_everything(10 + rank)
        per_rank.append(ckpt.capture_rng_states())
        expected.append(random_draws())
    empty = {"state": {}, "param_groups": []}
    path = ckpt.save_checkpoint(str(tmp_path), 1, {"w": torch.zeros(2)}, empty, {},
                                rng=ckpt.ranked_rng_states(per_rank))
    rng = ckpt.load_checkpoint(path).rng
    assert {"rng.rank0.torch", "rng.rank1.torch", "rng.rank0.numpy", "rng.rank1.numpy"} <= set(rng["tensors"])
    for rank in (1, 0):
        seed_everything(99)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same number of processes: nothing to warn about
            ckpt.restore_rng_states(rng, rank=rank, world_size=2)
        assert random_draws() == expected[rank]

    # more processes than saved: rank 0 warns, a rank the checkpoint lacks takes rank 0's states
    with pytest.warns(UserWarning, match="RNG states of 2 processes, this run has 3"):
        ckpt.restore_rng_states(rng, rank=0, world_size=3)
    seed_everything(99)
    ckpt.restore_rng_states(rng, rank=2, world_size=3)
    assert random_draws() == expected[0]
    with pytest.warns(UserWarning, match="RNG states of 2 processes, this run has 1"):
        ckpt.restore_rng_states(rng)  # one process, no process group: rank 0 of 1
    with pytest.raises(ValueError, match="rank must be in"):
        ckpt.restore_rng_states(rng, rank=2, world_size=2)


def test_one_process_checkpoints_and_old_unranked_ones_restore_rng_states(tmp_path):
    seed_everything(5)
    empty = {"state": {}, "param_groups": []}
    path = ckpt.save_checkpoint(str(tmp_path), 1, {"w": torch.zeros(2)}, empty, {})  # no rng: this process's
    expected = random_draws()
    assert "rng.rank0.torch" in ckpt.load_checkpoint(path).rng["tensors"]
    seed_everything(99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.restore_rng_states(ckpt.load_checkpoint(path).rng)
    assert random_draws() == expected

    rewrite_as_unranked(path)  # as written before per-rank states: every rank restores those
    rng = ckpt.load_checkpoint(path).rng
    assert "rng.torch" in rng["tensors"] and "ranks" not in rng["meta"]
    seed_everything(99)
    ckpt.restore_rng_states(rng)
    assert random_draws() == expected
    seed_everything(99)
    ckpt.restore_rng_states(rng, rank=1, world_size=2)
    assert random_draws() == expected
    with pytest.warns(UserWarning, match="one process's RNG states"):
        ckpt.restore_rng_states(rng, rank=0, world_size=2)


def test_a_checkpoint_without_weights_holds_meta_and_the_ranks_own_rng_states(tmp_path, monkeypatch):
    # What a rank other than 0 reads under FSDP2: never the weights nor the optimizer's tensors (84 GB for a
    # 7B model, on every rank), only meta.json and the RNG states it restores
    per_rank, expected = [], []
    for rank in range(3):
        seed_everything(20 + rank)
        per_rank.append(ckpt.capture_rng_states())
        expected.append(random_draws())
    model = {"w": torch.randn(16, 8)}
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(16, 8)}},
                 "param_groups": [{"lr": 0.1, "params": [0]}]}
    path = ckpt.save_checkpoint(str(tmp_path), 4, model, optimizer, {"extra": [1, 2]},
                                rng=ckpt.ranked_rng_states(per_rank))
    whole = ckpt.load_checkpoint(path)
    monkeypatch.setattr(ckpt, "load_file", lambda *a, **k: pytest.fail("a whole tensor file was read"))
    for rank, restores in ((1, 1), (2, 2), (4, 0)):  # a rank the checkpoint lacks restores rank 0's states
        state = ckpt.load_checkpoint_without_weights(str(tmp_path), rank)  # a run folder: its latest checkpoint
        assert (state.path, state.step, state.model, state.optimizer) == (path, 4, {}, {})
        assert state.meta == whole.meta and state.rng["meta"] == whole.rng["meta"]
        prefix = f"rng.rank{restores}."
        assert set(state.rng["tensors"]) == {k for k in whole.rng["tensors"] if k.startswith(prefix)}
        for key, tensor in state.rng["tensors"].items():
            assert torch.equal(tensor, whole.rng["tensors"][key]), key
        seed_everything(99)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 5 ranks resuming 3 ranks' states: rank 0 alone warns
            ckpt.restore_rng_states(state.rng, rank=rank, world_size=5 if rank == 4 else 3)
        assert random_draws() == expected[restores]

    with pytest.raises(TypeError, match="rank must be an int"):
        ckpt.load_checkpoint_without_weights(path, True)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        ckpt.load_checkpoint_without_weights(path, -1)


def test_a_checkpoint_without_weights_of_the_old_layout_or_damaged(tmp_path):
    seed_everything(5)
    empty = {"state": {}, "param_groups": []}
    path = ckpt.save_checkpoint(str(tmp_path), 1, {"w": torch.zeros(2)}, empty, {})
    expected = random_draws()
    rewrite_as_unranked(path)  # one process's states, unranked: every rank restores those
    state = ckpt.load_checkpoint_without_weights(path, 1)
    assert sorted(state.rng["tensors"]) == sorted(k for k in ckpt.load_checkpoint(path).rng["tensors"])
    seed_everything(99)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt.restore_rng_states(state.rng, rank=1, world_size=2)
    assert random_draws() == expected

    state_file = os.path.join(path, "state.safetensors")
    with open(state_file, "rb") as f:
        data = f.read()
    with open(state_file, "wb") as f:
        f.write(data[:20])  # the header cut short
    with pytest.raises(ValueError, match="damaged: cannot read state.safetensors"):
        ckpt.load_checkpoint_without_weights(path, 1)
    os.remove(state_file)
    with pytest.raises(FileNotFoundError, match="incomplete: state.safetensors is missing"):
        ckpt.load_checkpoint_without_weights(path, 1)
    with open(os.path.join(path, "meta.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        ckpt.load_checkpoint_without_weights(path, 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint_without_weights(str(tmp_path / "nothing"), 1)


def test_skipped_steps_count_in_tokens_per_second(tmp_path, data_dir, monkeypatch):
    import llmkern.train.trainer as trainer_module

    class Clock:  # every training step takes exactly one second
        now = 0.0

        def perf_counter(self):
            self.now += 1.0  # called at the start and at the end of a step
            return self.now

    monkeypatch.setattr(trainer_module, "time", Clock())
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=4, batch_tokens=128, log_interval=2))
    trainer.model = NaNLossAt(trainer.model, lambda call: call == 3)  # step 3 is skipped
    trainer.fit()
    rates = {r["step"]: r["tokens_per_s"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
             if r["kind"] == "train"}
    assert rates == {2: 128.0, 4: 128.0}


class _WritesAFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# --- early stopping, metrics -----------------------------------------------------------------------

def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path, data_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=40, eval_interval=2, patience=2))
    # evaluations at steps 0, 2, 4, 6: the best at step 2, then two that are not better
    val_losses = iter([3.0, 2.5, 2.6, 2.5, 2.4])
    trainer.evaluate = lambda: next(val_losses)
    summary = trainer.fit()
    assert summary["stop_reason"] == "early_stopping"
    assert summary["steps"] == 6 and summary["best_val_loss"] == 2.5
    assert ckpt.load_checkpoint(str(tmp_path / "run")).step == 6  # the final checkpoint is written


def test_resuming_an_early_stopped_run_trains_no_further(tmp_path, data_dir):
    config = tiny_config(tmp_path / "run", data_dir, max_steps=40, eval_interval=2, patience=2)
    val_losses = {0: 3.0, 2: 2.5, 4: 2.6, 6: 2.7, 8: 2.8}

    class FakeEval(Trainer):
        def evaluate(self):
            return val_losses[self.step]

    assert FakeEval(config).fit()["steps"] == 6
    before = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    summary = FakeEval(config).fit(resume=True)
    # the uninterrupted run ended at step 6: so does the resumed one, with no records added
    assert (summary["steps"], summary["stop_reason"]) == (6, "early_stopping")
    assert read_metrics(str(tmp_path / "run" / "metrics.jsonl")) == before
    # with more patience it goes on from there
    more = tiny_config(tmp_path / "run", data_dir, max_steps=40, eval_interval=2, patience=3)
    assert FakeEval(more).fit(resume=True)["steps"] == 8


def test_a_metrics_record_cut_short_by_a_crash_does_not_stop_a_resume(tmp_path, data_dir):
    config = tiny_config(tmp_path / "run", data_dir, max_steps=4, ckpt_interval=2)
    Trainer(config).fit()
    whole = train_losses(tmp_path / "run")
    # killed after step 2's checkpoint, while appending a record of step 3
    shutil.rmtree(ckpt.step_dir(str(tmp_path / "run"), 4))
    log = tmp_path / "run" / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:2]) + lines[2][:25])
    assert Trainer(config).fit(resume=True)["steps"] == 4
    assert train_losses(tmp_path / "run") == whole


def test_a_crash_while_the_log_is_cut_back_leaves_the_old_log(tmp_path, monkeypatch):
    from llmkern.train import metrics

    log = metrics.MetricsLog(str(tmp_path / "metrics.jsonl"))
    for step in range(1, 5):
        log.write("train", step=step, loss=1.0 / step)
    before = (tmp_path / "metrics.jsonl").read_text()
    calls, real_dumps = [], json.dumps

    def dumps_then_crash(obj, *args, **kwargs):  # the process dies while writing the second record
        calls.append(obj)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr(metrics.json, "dumps", dumps_then_crash)
    with pytest.raises(KeyboardInterrupt):
        log.truncate_after(2)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == before
    log.truncate_after(2)
    assert [r["step"] for r in metrics.read_metrics(log.path)] == [1, 2]


def test_an_out_dir_that_is_a_file_is_refused_before_training(tmp_path, data_dir):
    not_a_folder = tmp_path / "run"
    not_a_folder.write_text("notes")
    with pytest.raises(ValueError, match="out_dir .* is a file"):
        Trainer(tiny_config(not_a_folder, data_dir))
    assert not_a_folder.read_text() == "notes"


def test_resuming_a_finished_run_logs_its_final_evaluation_once(tmp_path, data_dir):
    config = tiny_config(tmp_path / "run", data_dir, max_steps=4, eval_interval=2)
    Trainer(config).fit()
    before = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in before if r["kind"] == "eval"] == [0, 2, 4]
    assert Trainer(config).fit(resume=True)["steps"] == 4
    assert read_metrics(str(tmp_path / "run" / "metrics.jsonl")) == before


def test_resuming_a_finished_run_whose_final_save_was_cut_before_pruning_prunes(tmp_path, data_dir, monkeypatch):
    # killed after the final checkpoint's rename, before the rotation: the resume of the finished run returned
    # at once and never pruned, so keep_checkpoints=2 ended with 3 checkpoints
    config = tiny_config(tmp_path / "run", data_dir, max_steps=3, ckpt_interval=1, keep_checkpoints=2)
    real_rmtree = shutil.rmtree

    def killed_when_pruning(path, *args, **kwargs):
        if re.match(r"step_\d+$", os.path.basename(path)):
            raise KeyboardInterrupt("killed")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_when_pruning)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config).fit()
    monkeypatch.undo()
    assert [s for s, _ in ckpt.step_dirs(str(tmp_path / "run"))] == [1, 2, 3]
    with pytest.warns(UserWarning, match="already complete"):
        assert Trainer(config).fit(resume=True)["steps"] == 3
    assert [s for s, _ in ckpt.step_dirs(str(tmp_path / "run"))] == [2, 3]


def test_mfu():
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert peak_flops_of("NVIDIA L40") == 181e12  # not the L4's 121e12, a pattern its name contains
    assert peak_flops_of("NVIDIA L40S") == 362e12 and peak_flops_of("NVIDIA L4") == 121e12
    assert peak_flops_of("Some Future GPU") is None
    # a name that holds a table entry followed by more digits is another GPU, not that one
    assert peak_flops_of("NVIDIA RTX A1000") is None  # was the A100's 312e12
    assert peak_flops_of("NVIDIA T400 4GB") is None  # was the T4's 65e12
    assert peak_flops_of("NVIDIA A10G") == 125e12 and peak_flops_of("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops_of("NVIDIA H200") == 989e12 and peak_flops_of("NVIDIA H20") == 148e12
    assert mfu(1000.0, 6e9, 989e12) == pytest.approx(6e12 / 989e12)
    assert mfu(1000.0, 6e9, 100e12, world_size=4) == pytest.approx(6e12 / 400e12)
    assert mfu(1000.0, 6e9, None) is None


# --- the command, the corpus, the benchmark's dry run ------------------------------------------------

def test_settings_lists_every_setting_with_its_default_and_documentation(capsys):
    """`--settings` reads each field's comment from the source: a trailing one, continued on the lines below
    it, else the block over the field; a section title ("# optimization") documents no field."""
    import dataclasses

    from llmkern.cli import main
    from llmkern.finetune import get_method
    from llmkern.train.config import toml_value

    assert main(["train", "--settings"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert any(line.startswith(f"  {f.name} = {toml_value(default)}") for line in lines), f.name
    assert "  keep_checkpoints = 2    # the newest N step folders are kept" in lines
    init_from = next(line for line in lines if line.startswith("  init_from = "))
    assert "Llama-family model.safetensors (continued pretraining; data in its tokenizer)" in init_from
    assert "  max_steps = 200" in lines  # not "# optimization", the title of its section
    assert any(line.startswith("  document_masking = false    # Packed rows hold several documents") for line in lines)
    assert "main job's defaults" in lines[-1]

    assert main(["finetune", "sft", "--settings"]) == 0
    lines = capsys.readouterr().out.splitlines()
    sft, _ = get_method("sft")
    assert len([line for line in lines if line.startswith("  ")]) == len(dataclasses.fields(sft))
    # SFT's own default, with the documentation of the field it overrides
    assert '  out_dir = "runs/sft"    # the run folder: checkpoints/, metrics.jsonl, charts' in lines


def test_train_generate_eval_commands(tmp_path, data_dir, capsys):
    from llmkern.cli import main

    run = str(tmp_path / "run")
    args = ["train", f"--out_dir={run}", f"--data_dir={data_dir}", "--model.n_layer=1", "--model.n_head=2",
            "--model.n_embd=32", "--batch_tokens=128", "--micro_batch=4", "--seq_len=32", "--max_steps=4",
            "--eval_interval=2", "--eval_steps=1", "--progress=false", "--samples=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(1 process, float32)" in out  # the header says how it computes
    assert "validation loss:" in out and "(step 0) -> " in out and "(step 2) -> " in out and "--- sample 1 (prompt 'def ') ---" in out
    assert main(args + ["--resume", "--max_steps=6"]) == 0  # continue the same run for two more steps
    assert ckpt.load_checkpoint(run).step == 6
    assert main(args + ["--resume=true", "--max_steps=7"]) == 0  # the README's form, as finetune takes it
    assert ckpt.load_checkpoint(run).step == 7
    capsys.readouterr()
    assert main(args) == 2  # a fresh start over a run: refused, nothing lost
    assert "already holds a run" in capsys.readouterr().err and ckpt.load_checkpoint(run).step == 7
    assert main(args + ["--overwrite=true"]) == 0
    assert ckpt.load_checkpoint(run).step == 4
    capsys.readouterr()

    assert main(["generate", "--run", run, "--prompt", "the cat", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    assert main(["generate", "--run", run, "--prompt", "the", "--max-new-tokens", "3", "--top-k", "0"]) == 0  # no filter
    assert capsys.readouterr().out.startswith("the")
    assert main(["eval", "--run", run, "--data", data_dir, "--batch-size", "2", "--max-batches", "2"]) == 0
    assert "val loss " in capsys.readouterr().out
    # underscores, as train and finetune spell their settings: an "unrecognized arguments" error before
    assert main(["generate", "--run", run, "--prompt", "the cat", "--max_new_tokens=5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    assert main(["eval", "--run", run, "--data", data_dir, "--batch_size", "2", "--max_batches=2"]) == 0
    assert "val loss " in capsys.readouterr().out
    assert main(["generate", "--run", run, "--prompt", "x", "--max_new_tokenz=5"]) == 2  # a misspelling stays one
    assert "unrecognized arguments: --max_new_tokenz=5" in capsys.readouterr().err

    assert main(["train", "--max_steps=zero"]) == 2
    assert "'max_steps' in command line must be an integer" in capsys.readouterr().err
    assert main(["generate", "--run", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ctrl_c_stops_after_the_step_saves_and_resumes_bitwise(tmp_path, data_dir, capsys):
    import signal

    from llmkern.train import TrainingInterrupted

    config = tiny_config(tmp_path / "whole", data_dir, max_steps=8, eval_interval=4, model={**TINY_MODEL, "dropout": 0.1})
    Trainer(config).fit()
    whole = train_losses(tmp_path / "whole")

    stopped = tiny_config(tmp_path / "run", data_dir, max_steps=8, eval_interval=4, model={**TINY_MODEL, "dropout": 0.1})
    trainer = Trainer(stopped)
    original_step = trainer._train_step

    def step_with_ctrl_c():
        if trainer.step == 2:  # in step 3: the signal arrives mid-step, the step still completes
            os.kill(os.getpid(), signal.SIGINT)
        return original_step()

    trainer._train_step = step_with_ctrl_c
    with pytest.raises(TrainingInterrupted, match=r"SIGINT at step 3: the run is saved .*step_0000003.*--resume") as info:
        trainer.fit()
    assert info.value.exit_status == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is gone again
    assert ckpt.load_checkpoint(str(tmp_path / "run")).step == 3
    assert (tmp_path / "run" / "loss.png").is_file()
    Trainer(stopped).fit(resume=True)
    assert train_losses(tmp_path / "run") == whole  # exact floats: nothing of step 3 was lost or repeated


def test_a_second_ctrl_c_stops_at_once():
    import signal

    from llmkern.train.interrupt import StopOnSignal

    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's: stop after the step
        os.kill(os.getpid(), signal.SIGTERM)  # said twice: the same request
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C while it waits: at once
    with StopOnSignal(enabled=False) as stop:  # under torchrun: the usual meaning
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_train_command_reports_an_interruption_with_the_signals_status(monkeypatch, capsys):
    from llmkern.cli import main
    from llmkern.train import TrainingInterrupted
    from llmkern.train import main_job

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted("SIGTERM at step 5: the run is saved (x); continue it with --resume", "SIGTERM")

    monkeypatch.setattr(main_job, "run_train", interrupted)
    assert main(["train"]) == 143
    assert "stopped by SIGTERM at step 5" in capsys.readouterr().err


def test_stdlib_corpus_is_deterministic_and_capped(tmp_path):
    from llmkern.data.loader import TokenLoader
    from llmkern.train.corpus import gather_corpus, prepare_corpus_shards

    docs = gather_corpus(200_000)
    assert docs == gather_corpus(200_000)
    assert 0 < sum(len(d.encode()) for d in docs) <= 200_000
    assert any("def " in d for d in docs)
    path = prepare_corpus_shards(str(tmp_path / "corpus"), "bytes", 200_000, val_fraction=0.2)
    manifest_time = os.path.getmtime(os.path.join(path, "manifest.json"))
    assert prepare_corpus_shards(path, "bytes", 200_000) == path  # reused, not rebuilt
    assert os.path.getmtime(os.path.join(path, "manifest.json")) == manifest_time
    x, y = TokenLoader(path, "val", 2, 64).next_batch()
    assert x.shape == (2, 64) and int(x.max()) <= 256

    bpe_dir = prepare_corpus_shards(str(tmp_path / "bpe"), "bpe:300", 200_000, val_fraction=0.2)
    manifest = load_manifest(bpe_dir)
    assert manifest["n_vocab"] == 300 and manifest["tokenizer"].endswith("bpe300.tiktoken")
    assert manifest["splits"]["train"][0]["tokens"] < 0.9 * sum(len(d.encode()) for d in docs)  # merges compress
    with pytest.raises(ValueError, match="bpe:<N>"):
        prepare_corpus_shards(str(tmp_path / "bad"), "bpe:lots", 200_000)


def test_the_main_job_trains_on_the_builtin_corpus(tmp_path, capsys):
    """`llmkern train` with neither data nor a config file, the README's main job cut short: the standard
    library's sources, a BPE trained on them (the CPU default), a falling validation loss, the run folder
    and a sample."""
    from llmkern.cli import main

    run = tmp_path / "run"
    assert main(["train", f"--out_dir={run}", "--device=cpu", "--max_steps=6", "--corpus_max_bytes=300000",
                 "--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2", "--eval_interval=3", "--eval_steps=1",
                 "--warmup_steps=1", "--lr=1e-2", "--progress=false", "--samples=1"]) == 0
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"([0-9.]+) \(step \d+\)", out)]
    assert len(losses) == 3 and losses[-1] < losses[0], out
    assert "--- sample 1 (prompt 'def ') ---" in out
    assert load_manifest(str(tmp_path / "data" / "stdlib-bpe_2048-300000-seed1337"))["n_vocab"] == 2048
    assert ckpt.load_checkpoint(str(run)).step == 6
    for name in ("metrics.jsonl", "loss.png", "lr.png", "throughput.png"):
        assert os.path.getsize(run / name) > 0, name


def test_bench_train_dry_run_on_cpu(capsys):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import bench_train
    finally:
        sys.path.pop(0)
    assert bench_train.main(["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq-len", "16", "--steps", "1",
                             "--warmup", "1", "--no-save", "--providers", "plain pytorch,llmkern cuda"]) == 0
    out = capsys.readouterr().out
    assert "plain pytorch:" in out and "llmkern torch:" in out


@pytest.mark.simt
def test_cuda_backend_trains_like_the_torch_backend_in_the_emulator(tmp_path, data_dir):
    """The trainer on the cuda backend: attention, RMSNorm, RoPE, SwiGLU, the fused loss's row kernel and
    AdamW (the trainer clips with torch), all CUDA kernels, emulated on CPU tensors under bf16 autocast. Step by
    step, the same losses as the torch backend (bf16 rounding apart)."""
    losses = {}
    for backend in ("cuda", "torch"):
        run = tmp_path / backend
        config = tiny_config(run, data_dir, preset="tiny-llama", model=dict(n_layer=1), max_steps=5, backend=backend,
                             dtype="bfloat16", grad_clip=0.5)
        Trainer(config).fit()
        losses[backend] = train_losses(run)
    assert losses["cuda"].keys() == losses["torch"].keys() == set(range(1, 6))
    assert losses["cuda"][5] < losses["cuda"][1]
    for step, loss in losses["torch"].items():
        assert losses["cuda"][step] == pytest.approx(loss, rel=1e-2), step


# --- on a GPU -------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_gpu_bf16_training_loss_falls_and_reports_mfu_and_memory(tmp_path, data_dir, backend):
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=25, eval_interval=25, device="cuda",
                                  backend=backend))
    assert trainer.autocast_dtype == torch.bfloat16  # dtype "auto" on a GPU
    before = trainer.evaluate()
    summary = trainer.fit()
    assert summary["val_loss"] < before - 1.0
    records = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    assert all(r["peak_mem_gib"] > 0 for r in records)
    if peak_flops_of(torch.cuda.get_device_name()) is not None:
        assert all(0 < r["mfu"] < 1 for r in records)


@pytest.mark.cuda
def test_gpu_readback_gives_the_values_of_its_step():
    from llmkern.train.readback import Readback

    x = torch.randn(1 << 24, device="cuda")
    expected = x[:2].tolist()
    readback = Readback(x[0], x[1])
    for _ in range(10):
        x.mul_(2)  # queued after it: must not show
    assert readback.read() == expected


@pytest.mark.cuda
def test_gpu_a_nan_step_read_late_is_still_skipped_and_logged(tmp_path, data_dir):
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=8, batch_tokens=128, log_interval=4,
                                  device="cuda"))
    assert trainer.skips_on_device
    trainer.model = NaNLossAt(trainer.model, lambda call: call == 3, finite_gradients=True)
    trainer.fit()
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [(r["step"], r["reason"]) for r in records if r["kind"] == "skip"] == [(3, "non-finite loss")]
    assert [r["step"] for r in records if r["kind"] == "train"] == [4, 8]
    assert trainer.optimizer.skipped_steps == 1 and trainer.bad_steps == 0


@pytest.mark.cuda
def test_gpu_compiled_training_matches_eager(tmp_path, data_dir):
    losses = {}
    for compiled in (False, True):
        run = tmp_path / f"run_{compiled}"
        Trainer(tiny_config(run, data_dir, max_steps=6, device="cuda", dtype="float32", compile=compiled)).fit()
        losses[compiled] = train_losses(run)
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, rel=2e-3), step


def test_init_from_continues_pretraining_from_a_run(tmp_path, data_dir):
    """A run started from another run's weights begins where that one ended: its step-0 validation
    loss is the first run's final one (same data, same evaluation windows)."""
    first = Trainer(tiny_config(tmp_path / "first", data_dir, max_steps=6, eval_interval=3)).fit()
    config = tiny_config(tmp_path / "second", data_dir, max_steps=2, eval_interval=2, model={},
                         init_from=str(tmp_path / "first"), lr=1e-6, min_lr=1e-6)
    Trainer(config).fit()
    evals = [r for r in read_metrics(os.path.join(str(tmp_path / "second"), "metrics.jsonl")) if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[0]["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)

    with pytest.raises(ValueError, match="drop the model"):
        Trainer(tiny_config(tmp_path / "third", data_dir, init_from=str(tmp_path / "first")))
    with pytest.raises(ValueError, match="longer than the block_size"):
        Trainer(tiny_config(tmp_path / "third", data_dir, model={}, seq_len=4096, batch_tokens=4096 * 4,
                            init_from=str(tmp_path / "first")))
    with pytest.raises(FileNotFoundError):
        Trainer(tiny_config(tmp_path / "third", data_dir, model={}, init_from=str(tmp_path / "nothing")))


def test_init_from_a_hugging_face_llama_file(tmp_path, data_dir):
    """A HF file records no tokenizer: the data's (bytes here) is taken as its own, for Llama's as for GPT-2's
    (a Llama file was taken for an llmkern run and refused as trained with another tokenizer)."""
    import json

    from safetensors.torch import save_file

    from llmkern.model import GPT, GPTConfig, to_hf_llama

    torch.manual_seed(0)
    llama = GPT(GPTConfig.from_preset("tiny-llama", vocab_size=257, block_size=64, n_embd=32, n_head=2))
    state, hf_config = to_hf_llama(llama)
    os.makedirs(tmp_path / "llama")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "llama" / "model.safetensors"))
    (tmp_path / "llama" / "config.json").write_text(json.dumps(hf_config))
    config = tiny_config(tmp_path / "run", data_dir, max_steps=1, model={}, preset="tiny-llama",
                         init_from=str(tmp_path / "llama" / "model.safetensors"))
    trainer = Trainer(config)
    assert trainer.raw_model.config.n_embd == 32 and trainer.raw_model.config.pos == "rope"
    torch.testing.assert_close(trainer.raw_model.wte.weight[:257], llama.wte.weight[:257])  # padding rows: zeros
    # the run records the family it came from (for `llmkern export` once the file has moved), not as "source",
    # which would mark it a Hugging Face file with no tokenizer of its own
    trainer.fit()
    meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path / "run"))).meta
    assert meta["hf_source"] == "hf-llama" and "source" not in meta


def test_a_moved_run_loads_with_its_own_copy_of_the_tokenizer_file(tmp_path):
    """A run trained on a .tiktoken tokenizer keeps a copy of it: moved elsewhere with its data folder gone,
    or after the file was retrained, it still loads (and generates) with the tokenizer it learned."""
    import shutil

    from llmkern.data.bpe import train_bpe
    from llmkern.data.tokenizer import get_tokenizer
    from llmkern.train.inference import evaluate_run, load_trained_model

    docs = synthetic_documents()
    bpe = str(tmp_path / "data" / "bpe.tiktoken")
    os.makedirs(tmp_path / "data")
    train_bpe(docs, 300, bpe, num_workers=1)
    tokenize_documents(docs, bpe, str(tmp_path / "data" / "shards"), val_fraction=0.15, seed=0)
    Trainer(tiny_config(tmp_path / "run", str(tmp_path / "data" / "shards"), max_steps=2)).fit()
    learned, n_vocab = get_tokenizer(bpe).encode("the cat sees the moon."), get_tokenizer(bpe).n_vocab

    _, tokenizer, _ = load_trained_model(str(tmp_path / "run"), "cpu")
    assert tokenizer.spec == bpe  # the file is still where it was: named as the data names it

    shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))
    train_bpe(["something else entirely, " * 50], 290, bpe, num_workers=1)  # the file retrained
    _, tokenizer, _ = load_trained_model(str(tmp_path / "moved"), "cpu")
    assert tokenizer.spec == str(tmp_path / "moved" / "tokenizer.tiktoken")
    assert tokenizer.encode("the cat sees the moon.") == learned
    # its data still evaluates: the shards' manifest kept the hash of the file they were tokenized with
    assert evaluate_run(str(tmp_path / "moved"), str(tmp_path / "data" / "shards"), batch_size=2, max_batches=1,
                        device="cpu", seq_len=16)["loss"] > 0
    shutil.rmtree(tmp_path / "data")  # the data folder gone
    model, tokenizer, _ = load_trained_model(str(tmp_path / "moved"), "cpu")
    assert tokenizer.encode("the cat sees the moon.") == learned and tokenizer.n_vocab == n_vocab
    assert tokenizer.spec == str(tmp_path / "moved" / "tokenizer.tiktoken")

    os.remove(tmp_path / "moved" / "tokenizer.tiktoken")  # copy and original both gone: said, not silent
    with pytest.warns(UserWarning, match="has changed or gone since"):
        ckpt.load_checkpoint(str(tmp_path / "moved"))


def test_a_tokenizer_file_deleted_after_tokenizing_never_stops_a_save(tmp_path):
    from llmkern.data.bpe import train_bpe

    docs = synthetic_documents()
    bpe = str(tmp_path / "bpe.tiktoken")
    train_bpe(docs, 280, bpe, num_workers=1)
    tokenize_documents(docs, bpe, str(tmp_path / "shards"), val_fraction=0.15, seed=0)
    os.remove(bpe)  # training needs only the shards
    with pytest.warns(UserWarning, match="is gone: the checkpoint is saved without a copy"):
        Trainer(tiny_config(tmp_path / "run", str(tmp_path / "shards"), max_steps=2)).fit()
    assert ckpt.load_checkpoint(str(tmp_path / "run")).step == 2


@pytest.mark.parametrize("spelling", ["--init_from", "--init-from"])
def test_main_job_drops_its_model_defaults_for_init_from_however_spelled(spelling, monkeypatch):
    # the command line accepts --init-from for init_from; the main job must see it too, or its
    # default model.* settings stay and the Trainer refuses them beside init_from
    import llmkern.train.trainer as trainer_module
    from llmkern.train.main_job import run_train

    class Stop(Exception):
        pass

    seen = []

    def fake_trainer(config):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(trainer_module, "Trainer", fake_trainer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Stop):
        run_train(None, [f"{spelling}=some/run", "--device=cpu"])
    assert seen[0].init_from == "some/run" and seen[0].model == {}


def test_a_save_clears_what_a_crashed_save_left(tmp_path):
    root = tmp_path / "checkpoints"
    model, empty = torch.nn.Linear(2, 2), {"state": {}, "param_groups": []}
    ckpt.save_checkpoint(str(tmp_path), 3, model.state_dict(), empty, {})
    (root / ".tmp_step_0000004_999999").mkdir(parents=True)  # died while writing
    (root / "step_0000003.old_999999").mkdir()  # died after a re-saved step 3 was in place, before the old went
    path = ckpt.save_checkpoint(str(tmp_path), 5, model.state_dict(), empty, {}, keep=2)
    assert sorted(os.listdir(root)) == ["step_0000003", "step_0000005"] and path == str(root / "step_0000005")


def test_a_stop_before_the_first_metrics_record_still_saves_and_reports_the_interruption(tmp_path, data_dir):
    # log_interval 5, no evaluations: a Ctrl-C in step 1 stops before metrics.jsonl exists; drawing the
    # charts used to raise FileNotFoundError in place of TrainingInterrupted (and its exit status)
    import signal

    from llmkern.train import TrainingInterrupted

    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=8, log_interval=5))
    original_step = trainer._train_step

    def step_with_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        return original_step()

    trainer._train_step = step_with_ctrl_c
    with pytest.raises(TrainingInterrupted, match="SIGINT at step 1: the run is saved"):
        trainer.fit()
    assert ckpt.load_checkpoint(str(tmp_path / "run")).step == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_overwriting_run_that_crashes_before_its_first_checkpoint_does_not_resume_the_old_one(tmp_path, data_dir):
    # the fresh run's log replaced the old run's at once, but its checkpoints stayed until the first save:
    # --resume after an early crash went on from the old run's weights, under the new run's log
    Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=4)).fit()
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=20, ckpt_interval=10, overwrite=True))
    original_step = trainer._train_step

    def crash_in_step_3():
        if trainer.step == 2:
            raise RuntimeError("the machine went away")
        return original_step()

    trainer._train_step = crash_in_step_3
    with pytest.raises(RuntimeError, match="went away"):
        trainer.fit()
    assert ckpt.step_dirs(str(tmp_path / "run")) == []
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=20, ckpt_interval=10)).fit(resume=True)


@pytest.mark.parametrize("crashing", ["os.remove", "os.rename", "shutil.rmtree"])
def test_an_overwriting_run_that_crashes_while_clearing_the_old_one_leaves_no_old_checkpoint_without_its_log(
        tmp_path, data_dir, monkeypatch, crashing):
    # the fresh run deleted the old log first, then the old checkpoints: killed in between, --resume went on
    # from the old run's checkpoint with its log gone
    run = tmp_path / "run"
    Trainer(tiny_config(run, data_dir, max_steps=2)).fit()
    trainer = Trainer(tiny_config(run, data_dir, max_steps=2, overwrite=True))
    module, name = crashing.split(".")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr({"os": os, "shutil": shutil}[module], name, killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(str(run))
    assert latest is None or (run / "metrics.jsonl").exists()
    if latest is not None:  # nothing cleared yet: the old run, whole
        assert ckpt.load_checkpoint(latest).step == 2 and max(train_losses(run)) == 2


def test_a_signal_while_a_step_is_checkpointed_does_not_save_that_step_again(tmp_path, data_dir, monkeypatch):
    # a scheduler's SIGTERM during step 4's checkpoint: the run stops there, and step 4's checkpoint is the
    # state to keep; writing it a second time doubled the time the grace period had to cover
    import signal

    from llmkern.train import TrainingInterrupted

    saved, real_save = [], ckpt.save_checkpoint

    def save_with_sigterm(run_dir, step, *args, **kwargs):
        saved.append(step)
        if len(saved) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_with_sigterm)
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM at step 4: the run is saved .*step_0000004"):
        Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=8, ckpt_interval=4)).fit()
    assert saved == [4]
    assert ckpt.load_checkpoint(str(tmp_path / "run")).step == 4


def test_a_run_stopped_before_its_first_step_resumes_without_evaluating_step_0_again(tmp_path, data_dir, monkeypatch):
    # A signal just after the step-0 evaluation saves step 0; the resume evaluated step 0 again: the record
    # twice in the log, and a val loss no better than itself counted against patience, so with patience=1
    # the resumed run stopped early at step 0 without training
    import signal

    from llmkern.train import TrainingInterrupted
    from llmkern.train import trainer as trainer_module

    settings = dict(max_steps=4, eval_interval=2, patience=1)
    Trainer(tiny_config(tmp_path / "whole", data_dir, **settings)).fit()

    class StopAtOnce(trainer_module.StopOnSignal):
        def __enter__(self):
            super().__enter__()
            os.kill(os.getpid(), signal.SIGINT)  # before the loop's first step
            return self

    monkeypatch.setattr(trainer_module, "StopOnSignal", StopAtOnce)
    with pytest.raises(TrainingInterrupted, match="SIGINT at step 0"):
        Trainer(tiny_config(tmp_path / "run", data_dir, **settings)).fit()
    monkeypatch.undo()
    summary = Trainer(tiny_config(tmp_path / "run", data_dir, **settings)).fit(resume=True)
    assert (summary["steps"], summary["stop_reason"]) == (4, "max_steps")
    varying = ("tokens_per_s", "mfu", "peak_mem_gib")
    records = {run: [{k: v for k, v in r.items() if k not in varying}
                     for r in read_metrics(str(tmp_path / run / "metrics.jsonl"))] for run in ("whole", "run")}
    assert records["run"] == records["whole"]  # exact floats, the step-0 evaluation once


@pytest.mark.parametrize("optimizer", ["llmkern", "torch"])
def test_a_resume_trains_with_its_own_weight_decay_and_betas(tmp_path, data_dir, optimizer):
    # lr, min_lr and grad_clip of the resuming run counted, but loading the optimizer's state put back the
    # stopped run's weight_decay and betas: a continuation asked for with other values silently kept the old
    Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=4, ckpt_interval=2, optimizer=optimizer)).fit()
    shutil.rmtree(ckpt.step_dir(str(tmp_path / "run"), 4))  # stopped after step 2's checkpoint
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=4, ckpt_interval=2, optimizer=optimizer,
                                  weight_decay=0.02, betas=(0.8, 0.9)))
    trainer.fit(resume=True)
    assert [(g["weight_decay"], tuple(g["betas"])) for g in trainer.optimizer.param_groups] == [
        (0.02, (0.8, 0.9)), (0.0, (0.8, 0.9))]  # the second group: norms and biases, never decayed
    assert ckpt.load_checkpoint(str(tmp_path / "run")).optimizer["param_groups"][0]["weight_decay"] == 0.02



def test_a_resume_may_change_how_the_model_runs_but_not_what_it_is(tmp_path, data_dir):
    # Another backend or activation checkpointing (a run moved to another GPU) was refused like another
    # model, with two whole configs to compare by eye; a change of shape is still refused, and named.
    run = tmp_path / "run"
    Trainer(tiny_config(run, data_dir, max_steps=4, ckpt_interval=2)).fit()
    uninterrupted = train_losses(run)
    shutil.rmtree(ckpt.step_dir(str(run), 4))  # stopped after step 2's checkpoint
    with pytest.raises(ValueError, match=r"model differs from the checkpoint's \(n_layer: 1 -> 2\)"):
        Trainer(tiny_config(run, data_dir, max_steps=4, model={**TINY_MODEL, "n_layer": 2})).fit(resume=True)
    moved = {**TINY_MODEL, "activation_checkpointing": True, "fused_loss": False}
    Trainer(tiny_config(run, data_dir, max_steps=4, ckpt_interval=2, backend="torch", model=moved)).fit(resume=True)
    resumed = train_losses(run)
    assert resumed.keys() == uninterrupted.keys()
    for step, loss in uninterrupted.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5)
    assert ckpt.load_checkpoint(str(run)).meta["model_config"]["activation_checkpointing"] is True


def test_a_checkpoint_saved_before_a_config_field_existed_resumes(tmp_path, data_dir):
    # GPTConfig gained rope_scaling and qkv_bias: a run saved without them (an older llmkern) has the model
    # they mean by default, and resumes; a value they do not mean is still another model.
    run = tmp_path / "run"
    Trainer(tiny_config(run, data_dir, max_steps=4, ckpt_interval=2)).fit()
    shutil.rmtree(ckpt.step_dir(str(run), 4))
    meta_path = os.path.join(ckpt.step_dir(str(run), 2), "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    for key in ("rope_scaling", "qkv_bias"):
        del meta["model_config"][key]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"qkv_bias: None -> False"):
        Trainer(tiny_config(run, data_dir, max_steps=4, model={**TINY_MODEL, "qkv_bias": False})).fit(resume=True)
    Trainer(tiny_config(run, data_dir, max_steps=4, ckpt_interval=2)).fit(resume=True)
    assert ckpt.latest_checkpoint(str(run)) == ckpt.step_dir(str(run), 4)


def test_the_train_command_checks_its_run_folder_before_the_data_and_the_model(tmp_path):
    from llmkern.train.main_job import run_train

    run = tmp_path / "run"
    ckpt.save_checkpoint(str(run), 3, {"w": torch.zeros(2)}, {"state": {}, "param_groups": []}, {})
    missing_data = f"--data_dir={tmp_path / 'no-such-data'}"  # reached only after the folder's check
    with pytest.raises(ValueError, match="already holds a run"):
        run_train(None, [f"--out_dir={run}", missing_data])
    with pytest.raises(FileNotFoundError, match="cannot resume: no checkpoint"):
        run_train(None, [f"--out_dir={tmp_path / 'empty'}", missing_data], resume=True)
    with pytest.raises(FileNotFoundError, match="no-such-data"):  # a resume with a checkpoint gets that far
        run_train(None, [f"--out_dir={run}", missing_data], resume=True)


def test_a_bare_key_is_true_only_for_a_boolean_setting():
    # a bare --out_dir was --out_dir=true: the run went to a folder named "true"
    assert load_config(None, ["--compile", "--model.bias"]).compile is True
    for bare in ("--out_dir", "--lr", "--model.n_kv_head", "--tokenizer"):
        with pytest.raises(ValueError, match=f"a bare {re.escape(bare)}, .* give {re.escape(bare)}=VALUE"):
            load_config(None, [bare, "--max_steps=3"])
    with pytest.raises(ValueError, match=re.escape("write --out_dir=runs/x (with '=', not a space)")):
        load_config(None, ["--out_dir", "runs/x"])


def test_the_main_job_trains_the_preset_asked_for(monkeypatch):
    # on a CPU the main job's defaults reshaped any --preset into 4 layers of 192: "gpt2 model, 1.85M parameters"
    import llmkern.train.config as config_module
    from llmkern.train.main_job import run_train

    seen = []

    def config_then_stop(*args, **kwargs):
        seen.append(load_config(*args, **kwargs))
        raise KeyboardInterrupt  # before the run folder, the data and the model

    monkeypatch.setattr(config_module, "load_config", config_then_stop)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for overrides, model in ((["--preset=gpt2"], {}), (["--preset=gpt2", "--model.n_layer=2"], {"n_layer": 2}),
                             ([], {"n_layer": 4, "n_embd": 192})):
        with pytest.raises(KeyboardInterrupt):
            run_train(None, ["--device=cpu", *overrides])
        assert (seen[-1].preset, seen[-1].model) == (overrides[0][9:] if overrides else "tiny", model), overrides


def test_a_device_torch_knows_but_llmkern_cannot_use_is_a_clear_error(monkeypatch):
    from llmkern.train import distributed
    from llmkern.train.distributed import DistInfo, parse_device, pick_device

    for name in ("meta", "mps", "xpu"):  # were a RuntimeError or AssertionError deep in the model
        with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
            parse_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto", DistInfo(rank=1, local_rank=1, world_size=2)) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="this machine has 2 GPUs"):
        parse_device("cuda:2")
    with pytest.raises(ValueError, match="LOCAL_RANK=3"):  # torchrun with more processes than GPUs
        pick_device("auto", DistInfo(rank=3, local_rank=3, world_size=4))
    assert distributed.pick_device("cpu", DistInfo(rank=3, local_rank=3, world_size=4)) == torch.device("cpu")


def test_a_corpus_cap_below_two_files_is_a_clear_error():
    # a cap under the first file was a RuntimeError "found no standard-library sources" (a traceback), and
    # one under two files gave one document, then "no 'val' split" pointing at `data prepare` options
    from llmkern.train.corpus import gather_corpus

    with pytest.raises(ValueError, match=r"corpus_max_bytes=100 is too small .* give at least") as err:
        gather_corpus(100)
    needed = int(re.search(r"([\d,]+) bytes; give at least", str(err.value)).group(1).replace(",", ""))
    with pytest.raises(ValueError, match=f"{needed:,} bytes"):
        gather_corpus(needed - 1)
    docs = gather_corpus(needed)
    assert len(docs) == 2 and sum(len(d.encode()) for d in docs) == needed


def test_a_failure_in_the_trainers_setup_leaves_the_process_group(tmp_path, monkeypatch):
    # The Trainer joins the process group first; a setup that failed after that (rank 0 making the run folder or
    # the corpus) left it joined: a process ending so skipped its gloo workers' wait (SIGABRT at exit) or nccl's
    # clean-up.
    import torch.distributed as dist

    import llmkern.train.trainer as trainer_module
    from llmkern.train.main_job import run_train

    def failing_setup(config):  # joins a group as Trainer does, then fails as a full disk does
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(trainer_module, "Trainer", failing_setup)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        with pytest.raises(OSError, match="No space left on device"):
            run_train(None, [f"--out_dir={tmp_path / 'run'}", "--device=cpu"])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
