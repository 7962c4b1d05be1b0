"""Two gloo processes (DDP or FSDP2) train like one process at the same global batch, and resume exactly,
each rank with its own RNG states."""

import ctypes
import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp

from llmkern.data.shards import tokenize_documents
from llmkern.train import TrainConfig, Trainer
from llmkern.train import checkpoint as ckpt
from llmkern.train import distributed
from llmkern.train.metrics import CollectiveMetricsLog, MetricsLog, read_metrics

from test_train import TINY_MODEL, synthetic_documents
import spawned
from spawned import WORLD



def config(out_dir, data_dir, parallel, **model):
    # batch_tokens = 2 micro-batches of 4 x 32: accumulated in one process, one per rank in two
    return TrainConfig(out_dir=str(out_dir), data_dir=data_dir, preset="tiny", model={**TINY_MODEL, **model},
                       batch_tokens=256,
                       micro_batch=4, seq_len=32, max_steps=5, lr=3e-3, warmup_steps=1, eval_interval=0, eval_steps=2,
                       ckpt_interval=3, log_interval=1, progress=False, seed=3, parallel=parallel).validate()


def _worker(rank, port, out_dir, data_dir, parallel, resume):
    spawned.enter(rank, port)

    Trainer(config(out_dir, data_dir, parallel)).fit(resume=resume)
    spawned.leave()


def run_two_processes(out_dir, data_dir, parallel, resume):
    mp.start_processes(_worker, args=(spawned.free_port(), str(out_dir), data_dir, parallel, resume), nprocs=WORLD,
                       join=True, start_method="spawn")


def _recording_worker(rank, port, out_dir, data_dir, parallel, resume):
    """_worker, writing down the checkpoint reads this rank made (spawned.record_checkpoint_reads) as
    out_dir/reads.rank<rank>.json."""
    spawned.enter(rank, port)
    reads = []
    spawned.record_checkpoint_reads(reads)
    Trainer(config(out_dir, data_dir, parallel)).fit(resume=resume)
    with open(os.path.join(out_dir, f"reads.rank{rank}.json"), "w") as f:
        json.dump(reads, f)
    spawned.leave()


def _dropout_worker(rank, port, tmp, data_dir, parallel):
    """Train 5 steps with dropout, each rank drawing its own masks; keep that run's log and last
    checkpoint; then resume the run from its step-3 checkpoint in the same processes."""
    spawned.enter(rank, port)

    run = os.path.join(tmp, "run")
    trainer = Trainer(config(run, data_dir, parallel, dropout=0.2))
    torch.manual_seed(100 + rank)  # from here on the ranks' generators differ, as their dropout masks may
    trainer.fit()
    distributed.barrier(trainer.dist)
    if rank == 0:  # what the uninterrupted run ended with; its step-3 checkpoint stays to resume from
        os.rename(ckpt.step_dir(run, 5), os.path.join(tmp, "uninterrupted_step5"))
        shutil.copy(os.path.join(run, "metrics.jsonl"), os.path.join(tmp, "uninterrupted.jsonl"))
    distributed.barrier(trainer.dist)
    torch.manual_seed(999)  # the same on both ranks: only the restored states can tell them apart again
    Trainer(config(run, data_dir, parallel, dropout=0.2)).fit(resume=True)
    spawned.leave()



def muon_config(out_dir, data_dir, **fields):
    # Muon under FSDP2 on shards cut unevenly and across projections: 3 experts (2 | 1 a process), a router of 3
    # rows (2 | 1), and GQA's fused qkv of 48 rows (q: 32, k and v: 8) cut at row 24, inside q
    return dataclasses.replace(config(out_dir, data_dir, "fsdp"), preset="tiny-moe", optimizer="muon",
                               model={**TINY_MODEL, "n_head": 4, "n_kv_head": 1, "n_experts": 3}, **fields).validate()


def _muon_worker(rank, port, out_dir, data_dir, resume):
    spawned.enter(rank, port)
    Trainer(muon_config(out_dir, data_dir)).fit(resume=resume)
    spawned.leave()


def run_muon_in_two_processes(out_dir, data_dir, resume):
    mp.start_processes(_muon_worker, args=(spawned.free_port(), str(out_dir), data_dir, resume), nprocs=WORLD,
                       join=True, start_method="spawn")


def records(run_dir):
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def learning_numbers(records):
    """What a run computes, without its timings."""
    return [{k: v for k, v in r.items() if k in ("kind", "step", "loss", "lr", "grad_norm", "val_loss")} for r in records]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(tmp_path, parallel):
    data_dir = str(tmp_path / "shards")
    tokenize_documents(synthetic_documents(), "bytes", data_dir, val_fraction=0.15, seed=0)
    Trainer(config(tmp_path / "single", data_dir, parallel)).fit()
    run_two_processes(tmp_path / "multi", data_dir, parallel, resume=False)

    # and rank 0 wrote one checkpoint with the whole model, equal to the single process's
    spawned.assert_same_run(tmp_path / "single", tmp_path / "multi")
    multi = records(tmp_path / "multi")

    # resuming the 2-process run from step 3 repeats its steps 4 and 5 exactly
    for step, path in ckpt.step_dirs(str(tmp_path / "multi")):
        if step == 5:
            os.rename(path, str(tmp_path / "multi_step5"))
    run_two_processes(tmp_path / "multi", data_dir, parallel, resume=True)
    assert learning_numbers(records(tmp_path / "multi")) == learning_numbers(multi)


def largest_deviations(run_dir, reference_dir):
    """(the largest difference of a train loss, of a weight) between two runs' logs and final checkpoints."""
    losses = [abs(a["loss"] - b["loss"]) for a, b in zip(records(run_dir), records(reference_dir)) if "loss" in a]
    one, two = ckpt.load_checkpoint(str(run_dir)).model, ckpt.load_checkpoint(str(reference_dir)).model
    return max(losses), max((one[name] - two[name]).abs().max().item() for name in two)


def test_muon_under_fsdp_trains_as_one_process_and_resumes(tmp_path):
    data_dir = str(tmp_path / "shards")
    tokenize_documents(synthetic_documents(), "bytes", data_dir, val_fraction=0.15, seed=0)
    Trainer(muon_config(tmp_path / "single", data_dir)).fit()
    run_muon_in_two_processes(tmp_path / "multi", data_dir, resume=False)
    # Each step is one process's step on the same gradients (test_muon's DTensor test: bitwise), but FSDP2 sums
    # the gradients in another order, and a bfloat16 Newton-Schulz iteration (and the routing of a token among
    # the experts) turns float32 rounding differences into larger ones: the tolerance is what one process gives
    # with only its order of summation changed (one micro-batch of 8 sequences for two of 4, the same batch),
    # measured here (a weight: 1.2e-3, a loss: 3.6e-5), with a margin of 2
    Trainer(muon_config(tmp_path / "reordered", data_dir, micro_batch=8)).fit()
    noise_loss, noise_weight = largest_deviations(tmp_path / "reordered", tmp_path / "single")
    loss_deviation, weight_deviation = largest_deviations(tmp_path / "multi", tmp_path / "single")
    assert 0 < noise_weight < 1e-2 and noise_loss < 1e-3  # noise, not another run
    assert loss_deviation <= 2 * noise_loss and weight_deviation <= 2 * noise_weight, (
        loss_deviation, noise_loss, weight_deviation, noise_weight)
    assert [(r["kind"], r["step"]) for r in records(tmp_path / "multi")] == [
        (r["kind"], r["step"]) for r in records(tmp_path / "single")]
    final = ckpt.load_checkpoint(str(tmp_path / "multi"))
    qkv = final.optimizer["state"]["blocks.0.attn.qkv.weight"]["momentum_buffer"]
    assert qkv.shape == (48, 32) and torch.count_nonzero(qkv) == qkv.numel()  # gathered whole from the shards

    # resuming the 2-process run from step 3 (its momentum buffers scattered back to the shards) repeats its
    # steps 4 and 5 exactly
    uninterrupted = learning_numbers(records(tmp_path / "multi"))
    shutil.copytree(tmp_path / "multi", tmp_path / "in_one")
    for run in ("multi", "in_one"):
        shutil.rmtree(ckpt.step_dir(str(tmp_path / run), 5))
    run_muon_in_two_processes(tmp_path / "multi", data_dir, resume=True)
    assert learning_numbers(records(tmp_path / "multi")) == uninterrupted
    again = ckpt.load_checkpoint(str(tmp_path / "multi"))
    assert all(torch.equal(again.model[name], tensor) for name, tensor in final.model.items())
    # and one process resumes it (the optimizer state keyed by parameter name), as close as it ran alone
    with pytest.warns(UserWarning, match="RNG states of 2 processes"):
        Trainer(muon_config(tmp_path / "in_one", data_dir)).fit(resume=True)
    loss_deviation, weight_deviation = largest_deviations(tmp_path / "in_one", tmp_path / "single")
    assert loss_deviation <= 2 * noise_loss and weight_deviation <= 2 * noise_weight


def test_a_one_process_run_resumes_in_two_fsdp_processes(tmp_path):
    # One process's optimizer state is keyed by parameter index, an FSDP2 run's by name: the resume
    # under FSDP2 used to stop with KeyError 'state.0.step'. It continues the run instead.
    data_dir = str(tmp_path / "shards")
    tokenize_documents(synthetic_documents(), "bytes", data_dir, val_fraction=0.15, seed=0)
    Trainer(config(tmp_path / "run", data_dir, "fsdp")).fit()
    shutil.copytree(tmp_path / "run", tmp_path / "single")  # the uninterrupted run, its log and final step
    shutil.rmtree(ckpt.step_dir(str(tmp_path / "run"), 5))
    mp.start_processes(_recording_worker, args=(spawned.free_port(), str(tmp_path / "run"), data_dir, "fsdp", True),
                       nprocs=WORLD, join=True, start_method="spawn")
    spawned.assert_same_run(tmp_path / "single", tmp_path / "run")
    # rank 0 alone read the weights and the optimizer's state (and broadcast them), the other its RNG states
    reads = [json.loads((tmp_path / "run" / f"reads.rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert reads == [["load_checkpoint", "load_model_checkpoint", "load_file", "load_file"],
                     ["load_checkpoint_without_weights"]]


def test_a_two_fsdp_process_run_resumes_in_one_process(tmp_path):
    # The checkpoint holds the whole model and optimizer (gathered, the optimizer's keyed by name), and the
    # loader's position counts the windows of all ranks: one process at the same batch_tokens continues.
    data_dir = str(tmp_path / "shards")
    tokenize_documents(synthetic_documents(), "bytes", data_dir, val_fraction=0.15, seed=0)
    Trainer(config(tmp_path / "single", data_dir, "fsdp")).fit()
    run_two_processes(tmp_path / "run", data_dir, "fsdp", resume=False)
    shutil.rmtree(ckpt.step_dir(str(tmp_path / "run"), 5))
    with pytest.warns(UserWarning, match="RNG states of 2 processes"):
        Trainer(config(tmp_path / "run", data_dir, "fsdp")).fit(resume=True)
    spawned.assert_same_run(tmp_path / "single", tmp_path / "run")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_resume_each_ranks_own_random_draws(tmp_path, parallel):
    # Ranks whose dropout masks differ: a resume that gave rank 1 rank 0's RNG states (as checkpoints
    # did when they held one process's) would draw other masks on rank 1 and change the loss.
    data_dir = str(tmp_path / "shards")
    tokenize_documents(synthetic_documents(), "bytes", data_dir, val_fraction=0.15, seed=0)
    mp.start_processes(_dropout_worker, args=(spawned.free_port(), str(tmp_path), data_dir, parallel), nprocs=WORLD,
                       join=True, start_method="spawn")

    uninterrupted = learning_numbers(read_metrics(str(tmp_path / "uninterrupted.jsonl")))
    resumed = learning_numbers(records(tmp_path / "run"))
    assert [r["step"] for r in resumed if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert resumed == uninterrupted  # bitwise: the same floats
    saved = ckpt.load_checkpoint(str(tmp_path / "run"))
    assert saved.step == 5
    assert sorted(k for k in saved.rng["tensors"] if k.endswith(".torch")) == ["rng.rank0.torch", "rng.rank1.torch"]
    assert not torch.equal(saved.rng["tensors"]["rng.rank0.torch"], saved.rng["tensors"]["rng.rank1.torch"])
    expected = ckpt.load_checkpoint(str(tmp_path / "uninterrupted_step5")).model
    for name, tensor in expected.items():
        assert torch.equal(saved.model[name], tensor), name


# what rank 0 fails in, by the test's `where` ("log": a folder where rank 0 removes an old run's log)
_RANK_0_FAILS_IN = {"save": ("llmkern.train.checkpoint", "save_checkpoint"),
                    "corpus": ("llmkern.train.corpus", "prepare_corpus_shards"),
                    "plot": ("llmkern.train.metrics", "plot_metrics"),
                    "run_dir": ("llmkern.train.metrics", "MetricsLog.__init__"),
                    "metrics": ("llmkern.train.metrics", "MetricsLog.write"),
                    "resume": ("llmkern.train.metrics", "MetricsLog.truncate_after")}


def _failing_worker(rank, port, tmp, data_dir, where):
    """Rank 0 fails alone where the other ranks then wait for it (at the next collective)."""
    spawned.enter(rank, port)
    if rank == 0 and where in _RANK_0_FAILS_IN:
        spawned.fail_in(*_RANK_0_FAILS_IN[where])
    spawned.record_and_exit(tmp, rank, lambda: Trainer(config(os.path.join(tmp, "run"), "" if where == "corpus"
                                                              else data_dir, "ddp")).fit(resume=where == "resume"))


@pytest.mark.parametrize("where", ["save", "corpus", "log", "plot", "resume", "metrics", "run_dir"])
def test_a_failure_of_rank_0_alone_stops_every_rank_with_its_cause(tmp_path, where):
    # Rank 0 alone writes the run's files (its folder, the corpus shards, the metrics log, the checkpoints,
    # the charts) while the other ranks go on. When that failed (disk full, no permission), they waited at
    # the next collective for a rank that had given up: forever on nccl while it lived on, and on gloo until
    # it exited, with "Connection closed by peer". Now every rank stops at once and names what failed.
    data_dir = str(tmp_path / "shards")
    if where != "corpus":
        tokenize_documents(synthetic_documents(), "bytes", data_dir, val_fraction=0.15, seed=0)
    if where == "log":
        os.makedirs(tmp_path / "run" / "metrics.jsonl")  # rank 0 cannot remove it: IsADirectoryError
    if where == "resume":
        Trainer(config(tmp_path / "run", data_dir, "ddp")).fit()  # one process's run, to resume from
    errors, exitcodes = spawned.run_failing_pair(_failing_worker, str(tmp_path), data_dir, where)
    assert errors[0].startswith("IsADirectoryError" if where == "log" else "OSError"), errors[0]
    what = {"save": "saving the checkpoint of step 3", "corpus": "preparing the corpus shards",
            "log": "clearing the old run", "plot": "plotting the metrics",
            "resume": "truncating the metrics log", "metrics": "writing the metrics log",
            "run_dir": "making the run folder"}[where]
    assert errors[1] == f"RuntimeError: {what} failed on rank 0 (its log has the error): rank 1 stops too"
    assert exitcodes == [1, 1]


def test_a_collective_metrics_log_takes_no_collective_in_one_process(tmp_path, monkeypatch):
    # Every rank calls the log's methods under torchrun; in one process there is no group to reduce over: the log
    # writes, cuts back and plots as a plain MetricsLog, and a failure raises itself, not a RuntimeError.
    def no_collective(*args, **kwargs):
        raise AssertionError("a collective in one process")

    monkeypatch.setattr(torch.distributed, "all_reduce", no_collective)
    monkeypatch.setattr(torch.distributed, "barrier", no_collective)
    info = distributed.DistInfo()
    run_dir = tmp_path / "run"
    log = CollectiveMetricsLog.open(str(run_dir / "metrics.jsonl"), info, torch.device("cpu"))
    for step in (1, 2, 3):
        log.write("train", step=step, loss=3.0 / step, lr=1e-3 * step, tokens_per_s=100.0 * step, accuracy=0.25 * step)
    log.write("eval", step=3, val_loss=float("nan"))
    assert read_metrics(log.path)[-1] == {"kind": "eval", "step": 3, "val_loss": "nan"}
    log.truncate_after(2)
    assert read_metrics(log.path) == [{"kind": "train", "step": s, "loss": 3.0 / s, "lr": 1e-3 * s,
                                       "tokens_per_s": 100.0 * s, "accuracy": 0.25 * s} for s in (1, 2)]
    log.plot(str(run_dir), extra=["accuracy"])
    assert sorted(p.name for p in run_dir.glob("*.png")) == ["accuracy.png", "loss.png", "lr.png", "throughput.png"]
    monkeypatch.setattr(MetricsLog, "write", spawned._disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        log.write("train", step=3, loss=1.0)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux's /proc")
def test_shutdown_waits_until_gloo_workers_are_idle():
    # A gloo worker frees a collective after waking the waiting thread; one still doing so when the
    # interpreter ends aborted a finished torchrun worker (SIGABRT), or hung it when the process group was
    # destroyed. So shutdown first waits for gloo's workers: here a busy thread with their name.
    named, done = threading.Event(), threading.Event()

    def worker():
        ctypes.CDLL(None).prctl(15, distributed.GLOO_WORKER.encode(), 0, 0, 0)  # PR_SET_NAME
        named.set()
        data, end = bytes(1 << 20), time.monotonic() + 0.3
        while time.monotonic() < end:
            hashlib.sha256(data).digest()  # busy without the GIL, as a worker in C++ is
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    named.wait()
    distributed.wait_for_gloo_workers()
    assert done.is_set()
    thread.join()
    start = time.monotonic()
    distributed.wait_for_gloo_workers()  # idle ones: a moment
    assert time.monotonic() - start < 1
