"""Training metrics: a JSONL log, model FLOPs utilization (MFU), and PNG charts.

Each line of metrics.jsonl is one JSON object with a "kind":
    {"kind": "train", "step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gib"}
                                                          (+ "loss_scale" with dtype float16)
    {"kind": "eval", "step", "val_loss", "val_ppl"}
    {"kind": "skip", "step", "loss", "grad_norm", "reason"}  (a NaN/inf loss or gradient norm, or a float16
                                                          overflow: the step was not applied)
A model with mixture-of-experts layers also has "aux_loss" after "loss" in its train and skip records: the mean
load-balancing loss of the step's micro-batches. Its "loss" is then the cross-entropy alone, as a dense model's
and the validation loss are; it trained on loss + router_aux_loss_coef * aux_loss.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from .._atomic import write_text_atomic
from . import distributed

# Dense bf16 tensor-core peaks in FLOP/s (no sparsity), matched against the GPU's name, first match wins.
GPU_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("H20", 148e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),  # before "L4", which its name contains
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("A6000", 155e12),
    ("V100", 125e12),  # fp16: V100 has no bf16
    ("T4", 65e12),  # fp16
)


def peak_flops(device: torch.device | str) -> float | None:
    """The GPU's peak bf16 FLOP/s from the table, or None (a CPU, or a GPU not in the table)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(gpu_name: str) -> float | None:
    for pattern, flops in GPU_PEAK_BF16_FLOPS:
        # not followed by a digit: "A100" is in the name of a small RTX A1000, "T4" in a T400's
        if re.search(re.escape(pattern) + r"(?![0-9])", gpu_name):
            return flops
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the peak of all the GPUs (None without a peak)."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * world_size)


def peak_memory_gib(device: torch.device | str) -> float | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class MetricsLog:
    """Appends metric records to a JSONL file (only where `enabled`: rank 0)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(self, kind: str, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, **{k: _json_number(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run repeats them)."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        # atomically: a crash while rewriting must leave the old log, not half of it
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))


class CollectiveMetricsLog:
    """Rank 0's MetricsLog for code that every rank runs in step (the trainer, finetune's fit). Each method is a
    collective: every rank calls it at the same point, in the same order. Rank 0 does the file work; when that
    fails (disk full), every rank raises (distributed.fail_together) instead of the others waiting for rank 0 at
    the next collective. Without a process group it takes no collective. A call on rank 0 alone would hang: code
    where rank 0 logs alone (PPO's evaluation) keeps a plain MetricsLog inside its own fail_together."""

    def __init__(self, plain: MetricsLog, info: distributed.DistInfo, device: torch.device | None):
        """plain: the MetricsLog rank 0 writes (enabled on rank 0 only); device: where fail_together reduces its
        flags (None: the process group's)."""
        self.plain, self.info, self.device = plain, info, device

    @classmethod
    def open(cls, path: str, info: distributed.DistInfo, device: torch.device | None) -> CollectiveMetricsLog:
        """The log at `path`; rank 0 makes its folder."""
        with distributed.fail_together(info, device, "making the run folder"):
            plain = MetricsLog(path, enabled=info.is_main)
        return cls(plain, info, device)

    @property
    def path(self) -> str:
        return self.plain.path

    def write(self, kind: str, **values: Any) -> None:
        """Rank 0 appends the record."""
        with distributed.fail_together(self.info, self.device, "writing the metrics log"):
            self.plain.write(kind, **values)

    def truncate_after(self, step: int) -> None:
        """Rank 0 drops the records past `step` (a resumed run repeats them)."""
        with distributed.fail_together(self.info, self.device, "truncating the metrics log"):
            self.plain.truncate_after(step)

    def plot(self, out_dir: str, extra: Sequence[str] = ()) -> None:
        """Rank 0 draws the charts of the log into out_dir (plot_metrics)."""
        with distributed.fail_together(self.info, self.device, "plotting the metrics"):
            if self.info.is_main:
                plot_metrics(self.path, out_dir, extra=extra)


def _json_number(v: Any) -> Any:
    """NaN and inf are not JSON: they are written as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        # A process killed while appending leaves a record cut short: that record was never complete
        # (its step is redone on resume), and it must not stop the run from resuming or being plotted.
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    return [json.loads(line) for line in lines if line.strip()]


def plot_metrics(metrics_path: str, out_dir: str, extra: Sequence[str] = ()) -> list[str]:
    """loss.png (train and val), lr.png and throughput.png from a metrics.jsonl, aux_loss.png when the train records
    have an aux_loss (a model with MoE layers), and <name>.png for each name in `extra` (its train values beside the
    eval records' "val_<name>"); the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isfile(metrics_path):  # no log yet (a run stopped by a signal before its first record)
        return []
    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    charts = [
        ("loss.png", "loss", [("train", train, "loss"), ("val", evals, "val_loss")]),
        ("lr.png", "learning rate", [("lr", train, "lr")]),
        ("throughput.png", "tokens / s", [("tokens/s", train, "tokens_per_s")]),
    ]
    if any("aux_loss" in r for r in train):
        charts.append(("aux_loss.png", "load-balancing loss", [("train", train, "aux_loss")]))
    charts += [(f"{name}.png", name.replace("_", " "), [("train", train, name), ("val", evals, f"val_{name}")])
               for name in extra]
    written = []
    for filename, ylabel, series in charts:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, rows, key in series:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if rows is evals else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, filename)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
