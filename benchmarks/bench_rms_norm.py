"""RMSNorm: forward, backward and forward+backward, GB/s and ratios, every provider side by side.

    python benchmarks/bench_rms_norm.py                 # bf16, rows 16384/32768 x hidden 768/4096/8192
    python benchmarks/bench_rms_norm.py --rows 4096 --hidden 4096 --dtype float16
    python benchmarks/bench_rms_norm.py --autocast      # a Llama block's second norm under bf16 autocast

GB/s counts the bytes the op must move at least (the same for every provider): forward reads x
and writes y (2 x rows x hidden elements), backward reads dy and x and writes dx (3 x), plus the
weight and its gradient. Providers: eager PyTorch (the reference, upcasting to fp32),
torch.nn.functional.rms_norm, torch.compile of the eager version, llmkern triton, llmkern cuda,
and Liger-Kernel's RMSNorm when it is importable.

--autocast times the norm where a Llama block puts it under autocast: the bf16 attention branch
joins the fp32 residual stream, and the normed sum goes to a bf16 matmul. The minimum is to read
x (2 bytes) and the stream (4), write h (4) and y (2); backward to read dy (2), h (4) and the
stream's gradient (4), and write the stream's (4) and the branch's (2). llmkern's kernels do just
that (out_dtype, a 16-bit x beside an fp32 residual); the torch providers add, norm and cast as an
eager model does (F.rms_norm of the promoted sum, then the cast autocast's matmul would make).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Result, add_common_args, bench_device, compiled, measured, optional, saving, selected,  # noqa: E402
                    time_modes)

import llmkern  # noqa: E402
from llmkern import _backend  # noqa: E402
from llmkern.ops import reference  # noqa: E402

EPS = 1e-6
BASELINES = ("torch eager", "F.rms_norm", "torch.compile", "liger")


def providers(device: torch.device) -> dict:
    """name -> fn(x, w) for every provider that can run here."""
    out = {
        "torch eager": lambda x, w: reference.rms_norm(x, w, EPS),
        "F.rms_norm": lambda x, w: F.rms_norm(x, (x.size(-1),), w, EPS),
        "torch.compile": compiled(lambda x, w: reference.rms_norm(x, w, EPS)),
    }
    for backend in ("triton", "cuda"):
        if _backend.can_run(backend, "rms_norm", device):
            out[f"llmkern {backend}"] = (lambda b: lambda x, w: llmkern.ops.rms_norm(x, w, EPS, backend=b))(backend)
    liger = optional("liger_kernel.ops.rms_norm", "LigerRMSNormFunction")
    if liger is not None:
        out["liger"] = lambda x, w: liger.apply(x, w, EPS)
    return out


def autocast_providers(device: torch.device, half: torch.dtype) -> dict:
    """name -> fn(x, stream, w) returning (y, h) for --autocast."""

    def eager(x, stream, w):
        h = x + stream  # type promotion: the fp32 sum
        return F.rms_norm(h, (h.size(-1),), w, EPS).to(half), h

    out = {"F.rms_norm": eager, "torch.compile": compiled(eager)}
    for backend in ("triton", "cuda"):
        if _backend.can_run(backend, "rms_norm", device):
            out[f"llmkern {backend}"] = (lambda b: lambda x, stream, w: llmkern.ops.rms_norm(
                x, w, EPS, residual=stream, backend=b, out_dtype=half))(backend)
    return out


def _params(hidden, dtype, device, n_params) -> list[torch.Tensor]:
    """The weight (around 1), and the bias (around 0) when n_params is 2."""
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_(True)
    return [w] + [(0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_(True)] * (n_params - 1)


def bench_autocast(name, fn, rows, hidden, half, device, op="rms_norm", n_params=1) -> list[Result]:
    x = torch.randn(rows, hidden, device=device).to(half).requires_grad_(True)
    stream = torch.randn(rows, hidden, device=device, requires_grad=True)
    params = _params(hidden, torch.float32, device, n_params)
    grads = (torch.randn(rows, hidden, device=device).to(half), torch.randn(rows, hidden, device=device))
    n, el = rows * hidden, torch.finfo(half).bits // 8
    nbytes = {"forward": n * (2 * el + 2 * 4) + n_params * hidden * 4,
              "backward": n * (2 * el + 3 * 4) + 2 * n_params * hidden * 4}
    nbytes["forward+backward"] = nbytes["forward"] + nbytes["backward"]
    times = time_modes(lambda: fn(x, stream, *params), grads, grad_to_none=[x, stream, *params])
    shape = f"{rows}x{hidden} autocast"
    return [Result(op, mode, shape, name, ms, nbytes[mode] / ms / 1e6, "GB/s") for mode, ms in times.items()]


def bench_one(name, fn, rows, hidden, dtype, device, op="rms_norm", n_params=1) -> list[Result]:
    x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
    params = _params(hidden, dtype, device, n_params)
    dy = torch.randn_like(x)
    el = x.element_size()
    nbytes = {
        "forward": 2 * rows * hidden * el + n_params * hidden * el,
        "backward": 3 * rows * hidden * el + 2 * n_params * hidden * el,
        "forward+backward": 5 * rows * hidden * el + 3 * n_params * hidden * el,
    }
    times = time_modes(lambda: fn(x, *params), dy, grad_to_none=[x, *params])
    shape = f"{rows}x{hidden}"
    return [Result(op, mode, shape, name, ms, nbytes[mode] / ms / 1e6, "GB/s") for mode, ms in times.items()]


def main(argv=None, op="rms_norm", title="RMSNorm", n_params=1, make_providers=None, make_autocast_providers=None,
         baselines=BASELINES, description=__doc__) -> int:
    """The command line of this benchmark and of bench_layer_norm.py (op, title, its parameters and
    providers)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--hidden", type=int, nargs="+", default=[768, 4096, 8192])
    parser.add_argument("--autocast", action="store_true",
                        help="a 16-bit x and y beside an fp32 stream, as in a transformer block under autocast")
    add_common_args(parser)
    args = parser.parse_args(argv)
    device = bench_device(f"bench_{op}", args.device)
    if device is None:
        return 1
    dtype = getattr(torch, args.dtype)
    if args.autocast and dtype == torch.float32:
        parser.error("--autocast takes --dtype bfloat16 or float16 (the matmuls' dtype)")
    results: list[Result] = []
    each = (make_autocast_providers or autocast_providers)(device, dtype) if args.autocast else \
        (make_providers or providers)(device)
    bench = bench_autocast if args.autocast else bench_one
    with saving(results, f"{title} {args.dtype}{' autocast' if args.autocast else ''}", baselines):
        # every provider at a shape before the next shape: a run cut short keeps whole comparisons
        for rows in args.rows:
            for hidden in args.hidden:
                for name, fn in selected(each, args.providers).items():
                    results.extend(measured(name, f"{rows}x{hidden}",
                                            lambda: bench(name, fn, rows, hidden, dtype, device, op, n_params)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
