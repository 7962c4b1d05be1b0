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
