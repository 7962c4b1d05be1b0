"""What every benchmark shares: timing (median of many runs after warm-up), the machine's
identity, and appending results to benchmarks/results/<gpu>.csv with a chart beside it."""

from __future__ import annotations

import contextlib
import csv
import datetime
import importlib
import importlib.util
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Each shape a compiled baseline meets compiles its own graph (compiled()): more than Dynamo's default
# of 8 recompiles, after which it would quietly run the baseline eagerly.
for _limit in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _limit):
        setattr(torch._dynamo.config, _limit, 64)


def compiled(fn):
    """torch.compile of a baseline measured at several shapes, one static-shape graph a shape: with the
    default (dynamic=None) the second shape recompiles with symbolic sizes and every later shape runs
    that generic code (a looped reduction where a persistent one fits), a slower baseline than a user
    who compiles for one shape gets."""
    return torch.compile(fn, dynamic=False)


@contextlib.contextmanager
def saving(results: list, chart_title: str, baselines: tuple[str, ...] = ()):
    """The rows the block appends to `results` are saved when it ends, also when it is cut short: by an
    error, or by timeout's SIGTERM (made a SystemExit here so that this runs), which lost them all."""
    def terminated(signum, frame):
        raise SystemExit(124)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if results:
            save(results, chart_title, baselines)


@dataclass
class Result:
    bench: str  # e.g. "rms_norm"
    mode: str  # "forward" | "backward" | "forward+backward" | ...
    shape: str  # e.g. "16384x4096"
    provider: str  # e.g. "torch eager", "llmkern cuda"
    ms: float  # median milliseconds
    value: float  # the physical unit below (GB/s, TFLOP/s, tokens/s)
    unit: str
    extra: dict = field(default_factory=dict)


def add_common_args(parser, dtypes: tuple[str, ...] = ("bfloat16", "float16", "float32")) -> None:
    """--dtype, --providers and --device, which every op benchmark takes after its own shape arguments."""
    parser.add_argument("--dtype", default="bfloat16", choices=list(dtypes))
    parser.add_argument("--providers", nargs="*", help="only these providers (names as printed)")
    add_device_arg(parser)


def add_device_arg(parser) -> None:
    parser.add_argument("--device", default="cuda",
                        help="the GPU to measure (cuda, cuda:1, ...); cpu runs every provider that runs on a CPU "
                             "(a check of the benchmark itself: its figures are not the ones the issues ask for)")


# The device of the benchmark running in this process: median_ms times GPU work with CUDA events,
# CPU work with the host's clock.
_measured_device = torch.device("cuda")


def bench_device(bench: str, device: str) -> torch.device | None:
    """torch.device(device) for the benchmark to run on; None, having said why on stderr, when it
    cannot run here (the caller exits non-zero)."""
    global _measured_device
    try:
        chosen = torch.device(device)
    except RuntimeError as err:
        print(f"{bench}: --device {device!r} is not a device: {err}", file=sys.stderr)
        return None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        print(f"{bench} needs a CUDA GPU (--device cpu runs it on the CPU, to check it, not to measure)",
              file=sys.stderr)
        return None
    if chosen.type not in ("cuda", "cpu"):
        print(f"{bench}: --device must be a CUDA device or cpu; got {device!r}", file=sys.stderr)
        return None
    _measured_device = chosen
    return chosen


def selected(providers: dict, names: list[str] | None) -> dict:
    """The providers named by --providers, in their own order; all of them when none were named."""
    return {name: fn for name, fn in providers.items() if not names or name in names}


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, "" when it has none (a bare AssertionError)."""
    return (str(err).splitlines() or [""])[0][:200]


def measured(name: str, where: str, run) -> list:
    """run()'s rows, or none when it fails: one provider's failure at one shape (out of memory, a shape
    a backend refuses, Triton's OutOfResources or CompilationError, which are no RuntimeErrors) must not
    end the benchmark and lose the rows of the providers after it. The `skipped` line says why."""
    try:
        return run()
    except Exception as err:
        print(f"skipped {name} at {where}: {type(err).__name__}: {first_line(err)}", file=sys.stderr)
    # out of the except block, whose traceback held the failed run's tensors: now they can be freed
    with contextlib.suppress(Exception):  # after a sticky CUDA error this raises again
        torch.cuda.empty_cache()
    return []


def optional(module: str, name: str):
    """module.name from an optional kernel library (Liger, flash-attn, apex), or None, said on stderr,
    when it is not installed or does not import (built for another PyTorch or Triton): a provider that
    cannot run must not end the benchmark before it starts."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        print(f"skipped {module.split('.')[0]}: not installed", file=sys.stderr)
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as err:
        print(f"skipped {module}.{name}: {type(err).__name__}: {first_line(err)}", file=sys.stderr)
        return None


def median_ms(fn, warmup_ms: int = 25, rep_ms: int = 100, grad_to_none=None) -> float:
    """Median time of fn() in milliseconds: on a GPU triton.testing.do_bench's (it flushes L2
    between runs), on the CPU the host clock's over as many runs as fit in rep_ms (at least 2)."""
    if _measured_device.type != "cuda":
        return _cpu_median_ms(fn, rep_ms, grad_to_none)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                         return_mode="median"))


def _cpu_median_ms(fn, rep_ms: int, grad_to_none) -> float:
    fn()  # warm-up: first calls compile, allocate, fill caches
    times: list[float] = []
    while len(times) < 2 or (sum(times) < rep_ms and len(times) < 100):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gpu_name() -> str:
    """The measured GPU's name, or "cpu" (so a CPU run's rows never land in a GPU's file)."""
    if _measured_device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(_measured_device)
    return "cpu"


def git_commit() -> str:
    """The commit the results come from ("-dirty" with uncommitted changes). The GPU machine gets a copy
    of the working tree without .git: there LLMKERN_COMMIT, which `gpu_check.sh prebuild` prints into
    the device command, says it."""
    if os.environ.get("LLMKERN_COMMIT"):
        return os.environ["LLMKERN_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    env = {"gpu": gpu_name(), "torch": torch.__version__, "cuda": torch.version.cuda or "", "commit": git_commit()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = ""
    return env


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "unknown"


def save(results: list[Result], chart_title: str, baselines: tuple[str, ...] = ()) -> Path:
    """Append results (with ratios to each baseline of the same mode and shape) to
    results/<gpu>.csv, write results/<gpu>_<bench>.png, print a table; returns the CSV path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = environment()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    by_key = {(r.mode, r.shape, r.provider): r for r in results}
    path = RESULTS_DIR / f"{_slug(env['gpu'])}.csv"
    new = not path.exists()
    fields = ["time", *env.keys(), "bench", "mode", "shape", "provider", "ms", "value", "unit", "ratios", "extra"]
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for r in results:
            ratios = {}
            for b in baselines:
                base = by_key.get((r.mode, r.shape, b))
                if base is not None and base.value > 0 and b != r.provider:
                    ratios[b] = round(r.value / base.value, 3)
            row = {"time": stamp, **env, **{k: v for k, v in asdict(r).items() if k != "extra"}}
            row["ratios"] = ";".join(f"{k}={v}" for k, v in ratios.items())
            row["extra"] = ";".join(f"{k}={v}" for k, v in r.extra.items())
            writer.writerow(row)
            print(f"{r.mode:>18} {r.shape:>14} {r.provider:>22} {r.ms:9.4f} ms {r.value:10.1f} {r.unit}  "
                  + " ".join(f"x{v:.2f} vs {k}" for k, v in ratios.items()))
    if results:
        chart(results, RESULTS_DIR / f"{_slug(env['gpu'])}_{_slug(results[0].bench)}.png",
              f"{chart_title} ({env['gpu']})")
    return path


def chart(results: list[Result], path: Path, title: str) -> None:
    """One panel per mode: grouped bars of value per shape and provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r.mode for r in results))
    shapes = list(dict.fromkeys(r.shape for r in results))
    providers = list(dict.fromkeys(r.provider for r in results))
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8, 1.6 * len(shapes) * len(providers) / 3), 3.5 * len(modes)),
                             squeeze=False)
    width = 0.8 / max(1, len(providers))
    for ax, mode in zip(axes[:, 0], modes):
        for i, prov in enumerate(providers):
            vals = [next((r.value for r in results if r.mode == mode and r.shape == s and r.provider == prov), 0.0)
                    for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=prov)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=20)
        ax.set_title(mode)
        ax.set_ylabel(results[0].unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def time_modes(run, grad_out, grad_to_none) -> dict[str, float]:
    """Median ms of "forward" (run()), "backward" (of one forward whose graph is kept) and
    "forward+backward", for an op whose output(s) receive the gradient(s) grad_out."""
    outputs = run()
    return {
        "forward": median_ms(run),
        "backward": median_ms(lambda: torch.autograd.backward(outputs, grad_out, retain_graph=True),
                              grad_to_none=grad_to_none),
        "forward+backward": median_ms(lambda: torch.autograd.backward(run(), grad_out), grad_to_none=grad_to_none),
    }
