"""LayerNorm (with bias): forward, backward and forward+backward, GB/s and ratios, every provider side by side.

    python benchmarks/bench_layer_norm.py               # bf16, rows 16384/32768 x hidden 768/4096/8192
    python benchmarks/bench_layer_norm.py --autocast    # a GPT-2 block's second norm under bf16 autocast

GB/s counts the bytes the op must move at least, as bench_rms_norm.py does, plus the bias and its
gradient. Providers: F.layer_norm (eager PyTorch), torch.compile of it, llmkern triton, llmkern cuda,
and Liger-Kernel's LayerNorm when it is importable.

--autocast times the norm where a GPT-2 block puts it under autocast: the bf16 attention branch
joins the fp32 residual stream and the normed sum goes to a bf16 matmul. llmkern's kernels read the
bf16 branch and write bf16 (out_dtype); the torch providers add, norm and cast as an eager model
does (F.layer_norm of the promoted sum, then the cast autocast's matmul would make).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_rms_norm  # noqa: E402  (the shared timing, byte counts and command line)
from common import compiled, optional  # noqa: E402

import llmkern  # noqa: E402
from llmkern import _backend  # noqa: E402

EPS = 1e-5
BASELINES = ("F.layer_norm", "torch.compile", "liger")


def providers(device: torch.device) -> dict:
    """name -> fn(x, w, b) for every provider that can run here."""

    def eager(x, w, b):
        return F.layer_norm(x, (x.size(-1),), w, b, EPS)

    out = {"F.layer_norm": eager, "torch.compile": compiled(eager)}
    for backend in ("triton", "cuda"):
        if _backend.can_run(backend, "layer_norm", device):
            out[f"llmkern {backend}"] = (lambda be: lambda x, w, b: llmkern.ops.layer_norm(x, w, b, EPS, backend=be))(
                backend)
    liger = optional("liger_kernel.ops.layer_norm", "LigerLayerNormFunction")
    if liger is not None:
        out["liger"] = lambda x, w, b: liger.apply(x, w, b, EPS)
    return out


def autocast_providers(device: torch.device, half: torch.dtype) -> dict:
    """name -> fn(x, stream, w, b) returning (y, h) for --autocast."""

    def eager(x, stream, w, b):
        h = x + stream  # type promotion: the fp32 sum
        return F.layer_norm(h, (h.size(-1),), w, b, EPS).to(half), h

    out = {"F.layer_norm": eager, "torch.compile": compiled(eager)}
    for backend in ("triton", "cuda"):
        if _backend.can_run(backend, "layer_norm", device):
            out[f"llmkern {backend}"] = (lambda be: lambda x, stream, w, b: llmkern.ops.layer_norm(
                x, w, b, EPS, residual=stream, backend=be, out_dtype=half))(backend)
    return out


def main(argv=None) -> int:
    return bench_rms_norm.main(argv, op="layer_norm", title="LayerNorm", n_params=2, make_providers=providers,
                               make_autocast_providers=autocast_providers, baselines=BASELINES,
                               description=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
