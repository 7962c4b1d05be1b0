"""The trainer's edge cases (test_train.py holds its main behaviour): a signal during the final evaluation, saves
after a writer of the same pid crashed, a checkpoint's durability, a NaN validation loss's perplexity."""

import os
import signal

import pytest
import torch
from test_train import synthetic_documents, tiny_config

from llmkern.data.shards import tokenize_documents
from llmkern.train import Trainer
from llmkern.train import checkpoint as ckpt
from llmkern.train.metrics import read_metrics


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("shards"))
    tokenize_documents(synthetic_documents(), "bytes", path, val_fraction=0.15, seed=0)
    return path


class _Killed(Exception):
    """What the test's own signal handlers raise: the defaults would end the test run (SIGTERM) or stop it (SIGINT)."""


def _raise_killed(signum, frame):
    raise _Killed(signal.Signals(signum).name)


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_final_evaluation_still_saves_the_finished_run(tmp_path, data_dir, signal_name):
    # The signal handlers covered the steps alone: a Ctrl-C or a scheduler's SIGTERM during the final evaluation
    # (minutes on a large eval set) ended the process before the final save, so with ckpt_interval=0 ("only at the
    # end") the whole run was lost, and otherwise every step since the last interval's checkpoint
    previous = {name: signal.signal(getattr(signal, name), _raise_killed) for name in ("SIGINT", "SIGTERM")}
    try:
        trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=3, eval_interval=0, ckpt_interval=0))
        real_evaluate = trainer.evaluate

        def evaluate_with_signal():
            os.kill(os.getpid(), getattr(signal, signal_name))
            return real_evaluate()

        trainer.evaluate = evaluate_with_signal
        summary = trainer.fit()
        assert all(signal.getsignal(getattr(signal, name)) is _raise_killed for name in previous)  # put back
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
    assert (summary["steps"], summary["stop_reason"]) == (3, "max_steps")
    assert ckpt.load_checkpoint(str(tmp_path / "run")).step == 3
    evals = [r["step"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "eval"]
    assert evals == [3]


def _kill_in_the_deletion_after_the_swap(monkeypatch, module):
    """Make shutil.rmtree of `module`, given the copy swapped out (a name ending in .old or .old_<pid>), delete one
    of its files, then die: a writer killed while deleting that copy, leaving it partly deleted under its name."""
    real_rmtree = module.shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        if ".old" not in os.path.basename(path) or not os.path.isdir(path):
            return real_rmtree(path, *args, **kwargs)
        monkeypatch.setattr(module.shutil, "rmtree", real_rmtree)
        os.remove(os.path.join(path, min(os.listdir(path))))
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(module.shutil, "rmtree", killed_while_deleting)


def test_a_step_saved_again_after_a_crash_left_its_swapped_out_copy_under_this_pid(tmp_path, monkeypatch):
    # A re-save of a step (a resumed run stopped at once, or an early-stopped one saving its end again) moves the
    # old copy to step_N.old_<pid>. Killed while deleting that copy, the folder keeps both; a process with the same
    # pid (a container's entrypoint is pid 1 on every start) saving step N again failed: the rename onto the
    # leftover, not empty, raised OSError, so the run could not save until someone deleted it by hand.
    empty = {"state": {}, "param_groups": []}
    weights = [{"w": torch.randn(3)} for _ in range(3)]
    ckpt.save_checkpoint(str(tmp_path), 4, weights[0], empty, {}, keep=1)
    _kill_in_the_deletion_after_the_swap(monkeypatch, ckpt)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(str(tmp_path), 4, weights[1], empty, {}, keep=1)
    monkeypatch.undo()
    assert os.listdir(ckpt.step_dir(str(tmp_path), 4) + f".old_{os.getpid()}")  # the leftover, not empty
    path = ckpt.save_checkpoint(str(tmp_path), 4, weights[2], empty, {}, keep=1)
    assert sorted(os.listdir(ckpt.checkpoints_dir(str(tmp_path)))) == [os.path.basename(path)]
    assert torch.equal(ckpt.load_checkpoint(str(tmp_path)).model["w"], weights[2]["w"])


def test_a_folder_published_again_after_a_crash_left_its_old_copy_under_this_pid(tmp_path, monkeypatch):
    # write_folder_atomic (export) moves the folder it replaces aside to a name made of its pid, and deletes it
    # after: killed while deleting, the next export by a process of the same pid failed to move the folder aside
    from llmkern import _atomic

    out = tmp_path / "export"
    for text in ("first", "second"):
        if text == "second":
            _kill_in_the_deletion_after_the_swap(monkeypatch, _atomic)
        try:
            with _atomic.write_folder_atomic(str(out)) as tmp:
                for name in ("a.txt", "b.txt"):
                    with open(os.path.join(tmp, name), "w") as f:
                        f.write(text)
        except KeyboardInterrupt:
            pass
    monkeypatch.undo()
    assert (out / "a.txt").read_text() == "second"
    with _atomic.write_folder_atomic(str(out)) as tmp, open(os.path.join(tmp, "a.txt"), "w") as f:
        f.write("third")
    assert sorted(os.listdir(out)) == ["a.txt"] and (out / "a.txt").read_text() == "third"
    assert sorted(os.listdir(tmp_path)) == ["export"]  # nothing left beside it


def test_a_nan_validation_loss_is_logged_with_a_nan_perplexity(tmp_path, data_dir):
    # exp(loss) for loss < 700, else inf: a NaN loss is not < 700, so a diverged model's perplexity was logged as
    # inf, a number it never had, beside its NaN loss
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=2))
    trainer.evaluate = lambda: float("nan")
    trainer._evaluate_and_check_patience()
    trainer.evaluate = lambda: 800.0  # past exp's range: inf, as before
    trainer._evaluate_and_check_patience()
    evals = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "eval"]
    assert [(r["val_loss"], r["val_ppl"]) for r in evals] == [("nan", "nan"), (800.0, "inf")]


def test_a_checkpoints_files_are_made_durable_in_its_folder_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    # Each file was flushed, but not the folder holding their names: after a power loss the renamed step folder
    # could lack a file (meta.json there, a tensor file missing), while the rotation had deleted the older ones
    empty = {"state": {}, "param_groups": []}
    ckpt.save_checkpoint(str(tmp_path), 1, {"w": torch.randn(3)}, empty, {}, keep=1)
    flushed = []
    monkeypatch.setattr(ckpt, "fsync_dir", lambda path: flushed.append((os.path.basename(path), sorted(os.listdir(path)))))
    ckpt.save_checkpoint(str(tmp_path), 2, {"w": torch.randn(3)}, empty, {}, keep=1)
    assert flushed == [(f".tmp_step_0000002_{os.getpid()}", ["meta.json", *ckpt.TENSOR_FILES]),
                       ("checkpoints", ["step_0000001", "step_0000002"])]


def test_a_trained_model_loads_without_reading_the_optimizer_state(tmp_path):
    """Generation, evaluation and a fine-tuning's start read meta.json and the weights alone: state.safetensors
    (AdamW's moments, twice a bf16 model's size and more) is neither read nor hashed; resuming reads it all."""
    from llmkern.model import GPT, GPTConfig
    from llmkern.train.inference import load_trained_model

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=16, backend="torch"))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 257, (1, 8)))[0].sum().backward()
    optimizer.step()
    run = tmp_path / "run"
    ckpt.save_checkpoint(str(run), 1, model.state_dict(), optimizer.state_dict(),
                         {"model_config": model.config.to_dict(), "tokenizer": "bytes"})
    state_file = os.path.join(ckpt.latest_checkpoint(str(run)), "state.safetensors")
    with open(state_file, "r+b") as f:  # damaged: a read (or its hash) would fail
        f.seek(os.path.getsize(state_file) // 2)
        f.write(b"\xff" * 8)
    loaded, _, state = load_trained_model(str(run), "cpu")
    assert state.optimizer == {} and state.rng == {}
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sha256"):
        ckpt.load_checkpoint(str(run))
