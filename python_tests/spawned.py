"""The two-process (gloo) tests' workers: set up as torchrun would set them up, and ended cleanly."""

from __future__ import annotations

import faulthandler
import os
import socket
import sys

import torch

WORLD = 2


def assert_same_run(single_dir, other_dir, keys=("loss", "grad_norm", "train_loss", "val_loss")) -> None:
    """A run of several processes (or resumed in them) did what one process did: the same records (kind
    and step) in its metrics.jsonl with the same numbers up to summation order, and a final checkpoint
    with the same whole model."""
    import pytest

    from llmkern.train import checkpoint as ckpt
    from llmkern.train.metrics import read_metrics

    single, other = (read_metrics(os.path.join(str(d), "metrics.jsonl")) for d in (single_dir, other_dir))
    assert [(r["kind"], r["step"]) for r in other] == [(r["kind"], r["step"]) for r in single]
    for a, b in zip(single, other):
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a["step"])
    one, two = ckpt.load_checkpoint(str(single_dir)), ckpt.load_checkpoint(str(other_dir))
    assert set(two.model) == set(one.model)
    for name in one.model:
        torch.testing.assert_close(two.model[name], one.model[name], rtol=1e-4, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def enter(rank: int, port: int) -> None:
    """Give a spawned worker torchrun's environment (rank, world size, rendezvous) and one thread."""
    faulthandler.enable()  # a crash in C++ (gloo) prints the Python stack of where it happened
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def leave() -> None:
    """Leave the process group once every rank is done with it, then end the process at once.

    Everything a test reads is written and closed by then. What os._exit skips is the interpreter's
    teardown, where gloo's threads aborted a worker once in about 25 CI runs ("terminate called
    without an active exception", SIGABRT, no Python frame left): a failure of a test whose results
    were complete, not of the code under test."""
    from llmkern.train import distributed

    distributed.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def record_checkpoint_reads(reads: list[str]) -> None:
    """Append to `reads`, in this process, the name of each checkpoint read made from here on: a whole
    checkpoint (load_checkpoint), its weights alone (load_model_checkpoint), a whole tensor file (safetensors'
    load_file, as llmkern.train.checkpoint calls it), or one without weights (load_checkpoint_without_weights)."""
    from llmkern.train import checkpoint as ckpt

    def recording(name, function):
        def record(*args, **kwargs):
            reads.append(name)
            return function(*args, **kwargs)
        return record

    for name in ("load_checkpoint", "load_model_checkpoint", "load_file", "load_checkpoint_without_weights"):
        if hasattr(ckpt, name):  # an llmkern from before the reads without weights lacks it
            setattr(ckpt, name, recording(name, getattr(ckpt, name)))


# --- a failure of rank 0 alone -----------------------------------------------------------------------

def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device (injected)")


def fail_in(module: str, name: str) -> None:
    """Make module's `name` (a function, or "Class.method") raise as a full disk does, in this process."""
    import importlib

    owner = importlib.import_module(module)
    *path, attribute = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, attribute, _disk_full)


def record_and_exit(folder: str, rank: int, run) -> None:
    """Run run(), write down how it ended ("finished", or the error it raised) as folder/error.rank<rank>,
    and end the process. Rank 0 stays alive until rank 1 has ended (30 s at most), as a failed rank whose
    death nccl does not notice: rank 1 must stop by itself, not because rank 0's exit closed the connection."""
    import time

    from llmkern.train import distributed

    try:
        run()
        message = "finished"
    except Exception as err:
        message = f"{type(err).__name__}: {err}"
    with open(os.path.join(folder, f"error.rank{rank}.tmp"), "w") as f:
        f.write(message)
    os.rename(os.path.join(folder, f"error.rank{rank}.tmp"), os.path.join(folder, f"error.rank{rank}"))
    if rank == 0:
        end = time.monotonic() + 30
        while not os.path.exists(os.path.join(folder, "error.rank1")) and time.monotonic() < end:
            time.sleep(0.05)
    distributed.shutdown(wait_for_others=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def run_failing_pair(worker, folder: str, *args) -> tuple[list[str], list[int | None]]:
    """Start worker(rank, port, folder, *args) in WORLD spawned processes (it ends with record_and_exit);
    (what each rank wrote down, their exit codes)."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    port = free_port()
    workers = [context.Process(target=worker, args=(rank, port, folder, *args)) for rank in range(WORLD)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)  # a rank that hangs still ends when rank 0 gives up waiting for it (30 s)
    for w in workers:
        if w.is_alive():
            w.kill()
    errors = []
    for rank in range(WORLD):
        with open(os.path.join(folder, f"error.rank{rank}")) as f:
            errors.append(f.read())
    return errors, [w.exitcode for w in workers]
