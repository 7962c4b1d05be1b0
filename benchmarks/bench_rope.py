"""RoPE on q and k of a fused QKV projection: forward, backward and forward+backward, in GB/s.

    python benchmarks/bench_rope.py                       # bf16, GPT-2 and Llama-like shapes
    python benchmarks/bench_rope.py --shapes 8x1024x12x12x64 --dtype float16

A shape is BxSxHxHkvxD. Every provider rotates q (B, H, S, D) and k (B, Hkv, S, D), the strided
views that CausalSelfAttention takes of its fused projection. GB/s counts the bytes the op must
move at least, the same for every provider: q and k read and written once (the backward reads
and writes their gradients), plus the fp32 cos and sin rows of the S positions.

Providers: eager PyTorch (the reference, fp32 math), torch.compile of it, llmkern triton and
llmkern cuda called on q and on k, the same called once on the adjacent q and k heads of the
fused projection (one launch, as the model does), and Liger-Kernel's RoPE when it is importable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Result, add_common_args, bench_device, compiled, measured, optional, saving, selected,  # noqa: E402
                    time_modes)

import llmkern  # noqa: E402
from llmkern import _backend  # noqa: E402
from llmkern.ops import reference  # noqa: E402

BASELINES = ("torch eager", "torch.compile", "liger")
DEFAULT_SHAPES = ["8x1024x12x12x64", "4x2048x32x8x128", "1x8192x32x8x128"]


def _separately(rope):
    """A provider that rotates q and k with two calls of rope(x, cos, sin)."""
    return lambda qkv, h, hkv, cos, sin: (rope(_heads(qkv, 0, h), cos, sin), rope(_heads(qkv, h, h + hkv), cos, sin))


def _heads(qkv: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Heads start..stop of a fused (B, S, heads, D) projection, as a (B, heads, S, D) view."""
    return qkv[:, :, start:stop].transpose(1, 2)


def _one_launch(backend: str):
    """A provider that rotates q's and k's adjacent heads with one call, as the model does."""

    def rotate(qkv, h, hkv, cos, sin):
        qk = llmkern.ops.rope(_heads(qkv, 0, h + hkv), cos, sin, backend=backend)
        return qk[:, :h], qk[:, h:]

    return rotate


def providers(device: torch.device) -> dict:
    """name -> fn(qkv, h, hkv, cos, sin) -> (q rotated, k rotated), for every provider that runs here."""
    out = {
        "torch eager": _separately(reference.rope),
        "torch.compile": _separately(compiled(reference.rope)),
    }
    for backend in ("triton", "cuda"):
        if _backend.can_run(backend, "rope", device):
            out[f"llmkern {backend}"] = _separately(lambda x, c, s, b=backend: llmkern.ops.rope(x, c, s, backend=b))
            out[f"llmkern {backend} q+k"] = _one_launch(backend)
    liger_rope = optional("liger_kernel.ops.rope", "LigerRopeFunction")
    if liger_rope is not None:
        tables = {}  # id(cos) -> (cos, Liger's tables): made once, as a model makes them, not in each timed call

        def liger(qkv, h, hkv, cos, sin):
            # Liger takes full-width (1, S, D) tables, each half repeated.
            if id(cos) not in tables or tables[id(cos)][0] is not cos:
                tables[id(cos)] = (cos, *(torch.cat([t, t], dim=-1)[None] for t in (cos, sin)))
            _, full_cos, full_sin = tables[id(cos)]
            return liger_rope.apply(_heads(qkv, 0, h), _heads(qkv, h, h + hkv), full_cos, full_sin)

        out["liger"] = liger
    return out


def bench_one(name, fn, shape: str, dtype, device) -> list[Result]:
    b, s, h, hkv, d = (int(v) for v in shape.split("x"))
    qkv = torch.randn(b, s, h + 2 * hkv, d, dtype=dtype, device=device, requires_grad=True)
    theta = torch.rand(s, d // 2, device=device) * 100
    cos, sin = theta.cos(), theta.sin()
    dq = torch.randn(b, h, s, d, dtype=dtype, device=device)
    dk = torch.randn(b, hkv, s, d, dtype=dtype, device=device)

    qk_bytes = 2 * b * (h + hkv) * s * d * qkv.element_size()  # read once, written once
    table_bytes = 2 * s * (d // 2) * 4
    nbytes = {"forward": qk_bytes + table_bytes, "backward": qk_bytes + table_bytes,
              "forward+backward": 2 * (qk_bytes + table_bytes)}
    times = time_modes(lambda: fn(qkv, h, hkv, cos, sin), (dq, dk), grad_to_none=[qkv])
    return [Result("rope", mode, shape, name, ms, nbytes[mode] / ms / 1e6, "GB/s") for mode, ms in times.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxSxHxHkvxD")
    add_common_args(parser)
    args = parser.parse_args(argv)
    device = bench_device("bench_rope", args.device)
    if device is None:
        return 1
    dtype = getattr(torch, args.dtype)
    results: list[Result] = []
    with saving(results, f"RoPE on q and k, {args.dtype}", BASELINES):
        each = selected(providers(device), args.providers)
        # every provider at a shape before the next shape: a run cut short keeps whole comparisons
        for shape in args.shapes:
            for name, fn in each.items():
                results.extend(measured(name, shape, lambda: bench_one(name, fn, shape, dtype, device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
