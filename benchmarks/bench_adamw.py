"""AdamW: step time and GB/s on GPT-2-shaped parameter lists, every provider side by side.

    python benchmarks/bench_adamw.py                      # 124M, 350M and 1.3B, fp32, step and clip+step
    python benchmarks/bench_adamw.py --models 124M --modes step --providers "torch fused" "llmkern cuda"

GB/s counts the bytes a step must move at least: 28 per fp32 parameter for the step (read p,
g, m, v; write p, m, v), 32 for clip+step (the norm must read every gradient before the first
update can start). Modes:
  step       torch.optim.AdamW foreach and fused, apex FusedAdam (when importable), llmkern triton
             and cuda, all without clipping;
  clip+step  torch.nn.utils.clip_grad_norm_ then the foreach or fused step, against llmkern's
             AdamW(max_grad_norm=...) that reduces the norm and applies it inside its update;
  copy       a device-to-device copy of the parameter bytes: the ceiling the step is held to.
Parameter lists: the tensors of GPT-2 124M (12 x 768), 350M (24 x 1024) and a 1.3B
(24 x 2048) model with a 50257-token vocabulary and 1024 positions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Result, add_device_arg, bench_device, measured, median_ms, optional, saving  # noqa: E402

from llmkern import _backend  # noqa: E402
from llmkern.optim import AdamW  # noqa: E402

VOCAB, CONTEXT = 50257, 1024
# name -> (layers, width, vocabulary, positions); "tiny" is for --device cpu, a check of the benchmark
MODELS = {"124M": (12, 768, VOCAB, CONTEXT), "350M": (24, 1024, VOCAB, CONTEXT), "1.3B": (24, 2048, VOCAB, CONTEXT),
          "tiny": (2, 24, 97, 16)}
GPU_MODELS = [name for name in MODELS if name != "tiny"]
BYTES_PER_PARAM = {"step": 28, "clip+step": 32, "copy": 8}
BASELINES = ("torch fused", "torch foreach", "torch clip + fused", "torch clip + foreach")
MAX_GRAD_NORM = 1.0
HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def gpt2_param_shapes(n_layer: int, d_model: int, vocab: int = VOCAB, context: int = CONTEXT) -> list[tuple]:
    """The parameter shapes of a GPT-2 model, in the order model.parameters() yields them."""
    d = d_model
    shapes: list[tuple] = [(vocab, d), (context, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attention
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, MLP
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def make_params(shapes: list[tuple], device: torch.device) -> list[torch.Tensor]:
    """fp32 parameters with random gradients."""
    params = []
    for shape in shapes:
        p = torch.randn(shape, device=device).mul_(0.02).requires_grad_()
        p.grad = torch.randn_like(p)
        params.append(p)
    return params


def providers(device: torch.device) -> dict:
    """(mode, name) -> fn(params) returning the step to time, for every provider that runs here."""

    def torch_step(**kw):
        return lambda params: torch.optim.AdamW(params, **HYPER, **kw).step

    def torch_clip_step(**kw):
        def make(params):
            opt = torch.optim.AdamW(params, **HYPER, **kw)

            def step():
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=True)
                opt.step()

            return step

        return make

    def llmkern_step(backend, **kw):
        return lambda params: AdamW(params, **HYPER, backend=backend, **kw).step

    out = {
        ("step", "torch foreach"): torch_step(foreach=True),
        ("step", "torch fused"): torch_step(fused=True),
        ("clip+step", "torch clip + foreach"): torch_clip_step(foreach=True),
        ("clip+step", "torch clip + fused"): torch_clip_step(fused=True),
    }
    for backend in ("triton", "cuda"):
        if _backend.can_run(backend, "adamw", device):
            out[("step", f"llmkern {backend}")] = llmkern_step(backend)
            out[("clip+step", f"llmkern {backend}")] = llmkern_step(backend, max_grad_norm=MAX_GRAD_NORM)
    fused_adam = optional("apex.optimizers", "FusedAdam")
    if fused_adam is not None:
        out[("step", "apex")] = lambda params: fused_adam(params, **HYPER, adam_w_mode=True).step
    return out


def bench_copy(numel: int, model: str, device: torch.device) -> Result:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return Result("adamw", "copy", model, "torch copy", ms, numel * BYTES_PER_PARAM["copy"] / ms / 1e6, "GB/s",
                  {"params": numel})


def bench_model(model: str, modes: list[str], only: list[str] | None, device: torch.device) -> list[Result]:
    shapes = gpt2_param_shapes(*MODELS[model])
    numel = sum(torch.Size(s).numel() for s in shapes)
    results = []
    if "copy" in modes:
        results.append(bench_copy(numel, model, device))
    for (mode, name), make in providers(device).items():
        if mode not in modes or (only and name not in only):
            continue
        results += measured(f"{name} ({mode})", model, lambda: [bench_step(make, shapes, mode, model, name, device)])
        torch.cuda.empty_cache()
    return results


def bench_step(make, shapes: list[tuple], mode: str, model: str, name: str, device: torch.device) -> Result:
    params = make_params(shapes, device)
    step = make(params)
    step()  # creates the optimizer state outside the timing
    ms = median_ms(step)
    numel = sum(p.numel() for p in params)
    return Result("adamw", mode, model, name, ms, numel * BYTES_PER_PARAM[mode] / ms / 1e6, "GB/s",
                  {"params": numel, "tensors": len(shapes)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=GPU_MODELS, choices=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=["copy", "step", "clip+step"], choices=list(BYTES_PER_PARAM))
    parser.add_argument("--providers", nargs="*", help="only these providers (names as printed)")
    add_device_arg(parser)
    args = parser.parse_args(argv)
    device = bench_device("bench_adamw", args.device)
    if device is None:
        return 2
    results = []
    with saving(results, "AdamW step, fp32 parameters", BASELINES):
        for model in args.models:
            results += bench_model(model, args.modes, args.providers, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
