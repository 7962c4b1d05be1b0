"""Fused linear + cross-entropy (the LM head and its loss): time and peak memory of forward+backward.

    python benchmarks/bench_fused_linear_cross_entropy.py            # bf16, N 8192/16384 x H 768/1024/2048, V 50304
    python benchmarks/bench_fused_linear_cross_entropy.py --rows 16384 --hidden 768 --vocab 50257
    python benchmarks/bench_fused_linear_cross_entropy.py --softcap 30 --hidden 2304 --vocab 256000   # Gemma 2 2B

The work is three matmuls of N x H x V (logits, grad of x, grad of the weight): TFLOP/s counts
6 N H V FLOPs. Peak memory ("peak_mib" in the CSV's extra column) is what the step allocates on
top of its inputs, the gradients included; the unfused providers hold the N x V logits and
their gradient. Providers: eager PyTorch (matmul, then F.cross_entropy in fp32, as the model's
plain path does), torch.compile of it, llmkern triton and cuda, and Liger-Kernel's fused linear
cross-entropy when it is importable. With --softcap C every provider takes the loss of the capped
logits C * tanh(logits / C) (Gemma 2's final_logit_softcapping), the eager one as the model's plain
path does; Liger is left out then (its cap argument moved between versions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Result, add_common_args, bench_device, compiled, measured, median_ms, optional, saving,  # noqa: E402
                    selected)

import llmkern  # noqa: E402
from llmkern import _backend  # noqa: E402

BASELINES = ("torch eager", "torch.compile", "liger")
MODE = "forward+backward"


def eager_loss(x, w, t, softcap=None):
    logits = (x @ w.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, t)


def providers(device: torch.device, softcap: float | None = None) -> dict:
    """name -> fn(x, w, target) -> loss, for every provider that can run here (of logits capped at softcap)."""
    def eager(x, w, t):
        return eager_loss(x, w, t, softcap)

    out = {"torch eager": eager, "torch.compile": compiled(eager)}
    for backend in ("triton", "cuda"):
        if _backend.can_run(backend, "fused_linear_cross_entropy", device):
            out[f"llmkern {backend}"] = (lambda x, w, t, backend=backend: llmkern.ops.fused_linear_cross_entropy(
                x, w, t, backend=backend, softcap=softcap))
    liger = optional("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")
    if liger is not None and softcap is None:
        out["liger"] = lambda x, w, t: _loss_of(liger.apply(x, w, t))
    return out


def _loss_of(output):
    """The loss, from Liger's output: the loss alone in its early versions, then (loss, z_loss) and
    (loss, z_loss, token_accuracy) tuples."""
    return output[0] if isinstance(output, (tuple, list)) else output


def peak_mib(step, tensors, device: torch.device) -> float:
    """MiB allocated by one step above what was allocated before it (its inputs); NaN on the CPU,
    whose allocator keeps no count."""
    if device.type != "cuda":
        return float("nan")
    for t in tensors:
        t.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def bench_one(name, fn, rows, hidden, vocab, dtype, device, softcap=None) -> Result | None:
    x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) * 0.02).to(dtype).requires_grad_(True)
    target = torch.randint(0, vocab, (rows,), device=device)

    def step():
        fn(x, w, target).backward()

    shape = f"{rows}x{hidden}x{vocab}"

    def times() -> list[tuple[float, float]]:
        step()  # compiles / autotunes before anything is measured
        return [(peak_mib(step, (x, w), device), median_ms(step, grad_to_none=[x, w]))]

    timed = measured(name, shape, times)
    if not timed:
        return None
    peak, ms = timed[0]
    tflops = 6 * rows * hidden * vocab / ms / 1e9
    return Result("fused_linear_cross_entropy", MODE, shape, name, ms, tflops, "TFLOP/s",
                  {"peak_mib": round(peak, 1), "dtype": str(dtype).replace("torch.", ""), "softcap": softcap})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--hidden", type=int, nargs="+", default=[768, 1024, 2048])
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--softcap", type=float, default=None,
                        help="the loss of logits capped at C * tanh(logits / C) (Gemma 2: 30); default: no cap")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.softcap is not None and not 0 < args.softcap < float("inf"):
        parser.error(f"--softcap must be a finite number > 0, got {args.softcap}")
    device = bench_device("bench_fused_linear_cross_entropy", args.device)
    if device is None:
        return 1
    dtype = getattr(torch, args.dtype)
    results: list[Result] = []
    capped = "" if args.softcap is None else f", logits soft-capped at {args.softcap:g}"
    with saving(results, f"Fused linear + cross-entropy {args.dtype}{capped}", BASELINES):
        each = selected(providers(device, args.softcap), args.providers)
        # every provider at a shape before the next shape: a run cut short keeps whole comparisons
        for rows in args.rows:
            for hidden in args.hidden:
                for name, fn in each.items():
                    result = bench_one(name, fn, rows, hidden, args.vocab, dtype, device, args.softcap)
                    if result is not None:
                        results.append(result)
                        print(f"{name:>16} {result.shape:>18} {result.ms:8.2f} ms {result.value:6.1f} TFLOP/s "
                              f"peak {result.extra['peak_mib']:8.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
