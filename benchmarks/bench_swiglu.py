"""SwiGLU (or GeGLU, --activation gelu_tanh: the same kernels with Gemma's activation) on the two
halves of a fused gate/up projection: forward, backward and forward+backward, in GB/s.

    python benchmarks/bench_swiglu.py                      # bf16, GPT-2-medium and Llama-like MLPs
    python benchmarks/bench_swiglu.py --shapes 16384x11008 --dtype float16
    python benchmarks/bench_swiglu.py --activation gelu_tanh   # GeGLU

A shape is ROWSxHIDDEN (rows = batch x sequence). Every provider takes gate and up as views of
one (rows, 2 x hidden) tensor, as SwiGLUMLP makes them. GB/s counts the bytes the op must move
at least, the same for every provider: forward reads gate and up and writes y (3 x rows x
hidden elements); backward reads dy, gate and up and writes dgate and dup (5 x).

Providers: eager PyTorch (the reference, fp32 math), F.silu(gate) * up (GeGLU: F.gelu(gate,
approximate="tanh") * up) in the input dtype, torch.compile of the reference, llmkern triton,
llmkern cuda, and Liger-Kernel's SwiGLU (GeGLU) when importable.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Result, add_common_args, bench_device, compiled, measured, optional, saving, selected,  # noqa: E402
                    time_modes)

import llmkern  # noqa: E402
from llmkern import _backend  # noqa: E402
from llmkern.ops import reference  # noqa: E402

BASELINES = ("torch eager", "torch.compile", "liger")
DEFAULT_SHAPES = ["16384x4096", "16384x11008", "32768x8192"]


@dataclass(frozen=True)
class Activation:
    op: str  # llmkern.ops' name, and the results' op column
    title: str
    plain_name: str  # the provider of PyTorch's own low-precision computation
    plain: object
    liger: tuple[str, str]  # Liger-Kernel's module and autograd Function


ACTIVATIONS = {
    "silu": Activation("swiglu", "SwiGLU", "F.silu * up", lambda gate, up: F.silu(gate) * up,
                       ("liger_kernel.ops.swiglu", "LigerSiLUMulFunction")),
    "gelu_tanh": Activation("geglu", "GeGLU", "F.gelu(tanh) * up",
                            lambda gate, up: F.gelu(gate, approximate="tanh") * up,
                            ("liger_kernel.ops.geglu", "LigerGELUMulFunction")),
}


def providers(device: torch.device, activation: str = "silu") -> dict:
    """name -> fn(gate, up) for every provider that can run here."""
    act = ACTIVATIONS[activation]
    ref = getattr(reference, act.op)
    out = {"torch eager": ref, act.plain_name: act.plain, "torch.compile": compiled(ref)}
    op = getattr(llmkern.ops, act.op)
    for backend in ("triton", "cuda"):
        if _backend.can_run(backend, act.op, device):
            out[f"llmkern {backend}"] = lambda gate, up, b=backend: op(gate, up, backend=b)
    liger = optional(*act.liger)
    if liger is not None:
        out["liger"] = liger.apply
    return out


def bench_one(name, fn, shape: str, dtype, device, op: str = "swiglu") -> list[Result]:
    rows, hidden = (int(v) for v in shape.split("x"))
    fused = torch.randn(rows, 2 * hidden, dtype=dtype, device=device, requires_grad=True)
    gate, up = fused.split(hidden, dim=-1)
    dy = torch.randn(rows, hidden, dtype=dtype, device=device)
    el = fused.element_size()
    nbytes = {
        "forward": 3 * rows * hidden * el,
        "backward": 5 * rows * hidden * el,
        "forward+backward": 8 * rows * hidden * el,
    }
    times = time_modes(lambda: fn(gate, up), dy, grad_to_none=[fused])
    return [Result(op, mode, shape, name, ms, nbytes[mode] / ms / 1e6, "GB/s") for mode, ms in times.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="ROWSxHIDDEN")
    parser.add_argument("--activation", choices=list(ACTIVATIONS), default="silu",
                        help="silu: SwiGLU (Llama's MLP); gelu_tanh: GeGLU (Gemma's)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    device = bench_device("bench_swiglu", args.device)
    if device is None:
        return 1
    dtype = getattr(torch, args.dtype)
    results: list[Result] = []
    act = ACTIVATIONS[args.activation]
    with saving(results, f"{act.title} {args.dtype}", BASELINES):
        each = selected(providers(device, args.activation), args.providers)
        # every provider at a shape before the next shape: a run cut short keeps whole comparisons
        for shape in args.shapes:
            for name, fn in each.items():
                results.extend(measured(name, shape, lambda: bench_one(name, fn, shape, dtype, device, act.op)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
