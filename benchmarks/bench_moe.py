"""A mixture-of-experts MLP layer (MoEMLP): forward, backward and forward+backward in TFLOP/s and tokens/s.

    python benchmarks/bench_moe.py                           # bf16, Mixtral- and Qwen3-MoE-like layers, 4k/16k tokens
    python benchmarks/bench_moe.py --shapes mixtral --tokens 16384
    python benchmarks/bench_moe.py --shapes 1024x512x16x4    # N_EMBDxHIDDENxEXPERTSxK

Shapes: "mixtral" is Mixtral 8x7B's layer (n_embd 4096, hidden 14336, 8 experts, top 2), "qwen3-moe" Qwen3-30B-A3B's
(n_embd 2048, hidden 768, 128 experts, top 8); any other layer as N_EMBDxHIDDENxEXPERTSxK. The tokens are one
(tokens, n_embd) batch.

FLOPs count the active experts' matmuls only (gate, up and down projections of each token's k experts):
2 * 3 * n_embd * hidden * k a token forward, twice that backward, three times forward+backward; not the router's
(2 * n_embd * E a token, under 1% at both shapes), nor the sorting, the weighting or the sum. The same count for
every provider, so TFLOP/s compare like times. tokens/s is in the CSV's extra column.

Routing: a router with no preference loads every expert alike but for sampling noise, while a trained model's loads
are uneven, and uneven blocks are what the expert matmuls must schedule. Here each expert's logit gets a fixed
offset: the router's rows
are N(0, 1 / n_embd), so a token's logits are N(0, 1) each, and every input is z + m, z ~ N(0, I) and m a fixed
vector whose dot product with the router's rows is N(0, imbalance^2) (--imbalance, default 0.2). The routing is
drawn on the CPU, the same on every device: at 4096 or 16384 tokens the experts of Mixtral's shape get 0.7 to 1.5
times the mean load, Qwen3-MoE's 0.3 to 2.2 times. The loads measured (the busiest and the idlest expert's slots over
the mean) are printed and kept in extra.

Providers, all on the same weights and inputs:
- "torch eager": a ModuleList of per-expert MLPs (three nn.Linear, the weights views of MoEMLP's stacks) as
  transformers' Mixtral block runs them: for each expert, index_select its tokens, run its MLP, index_add the
  weighted result.
- "llmkern loop" and "llmkern grouped": MoEMLP with LLMKERN_MOE_EXPERTS=loop or grouped set while it runs (one
  matmul pair per expert, or one grouped_mm per matmul over the expert-sorted rows); grouped is skipped, with the
  error, where this torch or device has no grouped_mm for the dtype.
- "llmkern grouped compiled": torch.compile of MoEMLP on the grouped path (the loop's host sync breaks the graph).
Before timing, each provider's output and input gradient are compared with the first provider's at this shape (at
the dtype's tolerance); a provider that differs is skipped, saying by how much, never reported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Result,
    add_common_args,
    bench_device,
    compiled,
    measured,
    saving,
    selected,
    time_modes,
)

from llmkern.nn import MoEMLP
from llmkern.nn.moe import EXPERTS_ENV

BASELINES = ("torch eager", "llmkern loop")
FLOP_FACTOR = {"forward": 1, "backward": 2, "forward+backward": 3}
# name -> (n_embd, hidden, experts, experts per token)
PRESETS = {"mixtral": (4096, 14336, 8, 2), "qwen3-moe": (2048, 768, 128, 8)}
# (the largest error norm over the reference's norm, the largest error of one element over the reference's RMS) of a
# provider that agrees with the reference. Measured on the CPU in bf16, llmkern against the plain block (whose SwiGLU
# rounds twice, llmkern's once): 0.004-0.006 and 0.05-0.1 at 4M elements, the element errors Gaussian-like, so their
# largest grows slowly with the size; fp16 has 8x less rounding error, fp32 only the sums' order. A wrong routing,
# weight or expert misses by about the RMS itself, even on a single token's elements.
TOLERANCE = {torch.bfloat16: (2e-2, 0.25), torch.float16: (5e-3, 0.06), torch.float32: (1e-4, 1e-3)}
# The expert path each llmkern provider forces while it runs (MoEMLP reads it at each forward).
EXPERT_PATHS = {"llmkern loop": "loop", "llmkern grouped": "grouped", "llmkern grouped compiled": "grouped"}
# What each provider's numbers are checked on before it is timed.
CHECKED = ("output", "input gradient")


@dataclass(frozen=True)
class Layer:
    n_embd: int
    hidden: int
    experts: int
    k: int


class PlainExpert(nn.Module):
    """One Mixtral expert as transformers writes it: w2(silu(w1(x)) * w3(x))."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.w1, self.w3, self.w2 = (_linear_on(w) for w in (gate, up, down))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PlainMoE(nn.Module):
    """transformers' eager Mixtral sparse-MoE block, on the weights of `moe` (views of its tensors, no copy; gradients
    of their own): the same routing (fp32 softmax, top k, renormalized, cast to x's dtype), then each expert on the
    tokens that chose it, its weighted output index_add-ed into the sum."""

    def __init__(self, moe: MoEMLP):
        super().__init__()
        self.k = moe.experts_per_token
        self.norm_topk_prob = moe.norm_topk_prob
        self.gate = _linear_on(moe.router.weight)
        hidden = moe.hidden
        self.experts = nn.ModuleList(
            PlainExpert(moe.gate_up[e, :hidden], moe.gate_up[e, hidden:], moe.proj[e]) for e in range(moe.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (N, E)
        weights, chosen = probs.topk(self.k, dim=-1)  # (N, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # a host sync, as transformers' loop has
            if token.numel():
                # in place, as transformers adds: a copy of the (N, C) sum per expert would be the baseline's own cost
                out.index_add_(0, token, expert(x.index_select(0, token)) * weights[token, slot, None])
        return out


def _linear_on(weight: torch.Tensor) -> nn.Linear:
    """A bias-free nn.Linear whose weight is `weight`'s storage (detached: a leaf of its own)."""
    linear = nn.Linear(weight.size(1), weight.size(0), bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach())
    return linear


@contextlib.contextmanager
def expert_path(name: str):
    """LLMKERN_MOE_EXPERTS set to provider `name`'s path (EXPERT_PATHS) for the time of the block."""
    path = EXPERT_PATHS.get(name)
    saved = os.environ.get(EXPERTS_ENV)
    if path is not None:
        os.environ[EXPERTS_ENV] = path
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(EXPERTS_ENV, None)
        else:
            os.environ[EXPERTS_ENV] = saved


def _moe_output(moe: MoEMLP, plain: PlainMoE, x: torch.Tensor) -> torch.Tensor:
    return moe(x)[0]


def _plain_output(moe: MoEMLP, plain: PlainMoE, x: torch.Tensor) -> torch.Tensor:
    return plain(x)


def providers(device: torch.device) -> dict:
    """name -> fn(moe, plain, x) -> (N, C) output, for every provider; the first is the others' reference."""
    return {
        "torch eager": _plain_output,
        "llmkern loop": _moe_output,
        "llmkern grouped": _moe_output,
        "llmkern grouped compiled": compiled(_moe_output),
    }


def parse_layer(spec: str) -> Layer:
    """A preset's name or N_EMBDxHIDDENxEXPERTSxK."""
    if spec in PRESETS:
        return Layer(*PRESETS[spec])
    parts = spec.split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"a shape is one of {', '.join(PRESETS)} or N_EMBDxHIDDENxEXPERTSxK (positive integers); got {spec!r}")
    layer = Layer(*(int(p) for p in parts))
    if layer.k > layer.experts:
        raise argparse.ArgumentTypeError(f"K must be at most EXPERTS in {spec!r}")
    return layer


@dataclass
class Weights:
    """One layer's MoEMLP and the plain block on its weights, with the router's input shift (see make_weights)."""

    layer: Layer
    moe: MoEMLP
    plain: PlainMoE
    shift: torch.Tensor  # (n_embd,) fp32: every input's fixed part m


def make_weights(layer: Layer, imbalance: float, dtype, device) -> Weights:
    """The layer drawn in fp32, then cast: weights of unit-scale outputs, and m, the shift of every input whose dot
    product with router row e is expert e's logit offset (N(0, imbalance^2)). What decides the routing (the router,
    m, and make_case's inputs) is drawn on the CPU from seed 0, the same on every device; the experts' weights,
    billions of numbers at Mixtral's shape, on `device` from its own generator."""
    cpu_gen = torch.Generator().manual_seed(0)
    router = torch.randn(layer.experts, layer.n_embd, generator=cpu_gen) / layer.n_embd ** 0.5
    offsets = imbalance * torch.randn(layer.experts, 1, generator=cpu_gen, dtype=torch.float64)
    # the least-norm m with router @ m = offsets (the router's E rows are independent): |m| ~ |offsets|, next to the
    # sqrt(n_embd) of the random part, so the experts see inputs of the same scale
    shift = torch.linalg.lstsq(router.double(), offsets).solution[:, 0].float()
    device_gen = torch.Generator(device).manual_seed(0)
    with torch.device(device):
        moe = MoEMLP(layer.n_embd, layer.hidden, layer.experts, layer.k)
    with torch.no_grad():
        moe.router.weight.copy_(router)
        moe.gate_up.normal_(0.0, layer.n_embd ** -0.5, generator=device_gen)
        moe.proj.normal_(0.0, layer.hidden ** -0.5, generator=device_gen)
    moe = moe.to(dtype)
    return Weights(layer, moe, PlainMoE(moe), shift)


@dataclass
class Case:
    """One layer at one token count: its weights, the input and the output's gradient, the experts' loads."""

    shape: str
    tokens: int
    weights: Weights
    x: torch.Tensor
    dy: torch.Tensor
    loads: dict

    def leaves(self) -> list[torch.Tensor]:
        """What each timed backward writes a gradient to: the input and every provider's weights."""
        return [self.x, *self.weights.moe.parameters(), *self.weights.plain.parameters()]


def make_case(weights: Weights, tokens: int, dtype, device) -> Case:
    """tokens inputs z + m, z ~ N(0, I), and an output gradient of N(0, 1) elements, drawn on the CPU from seed 1."""
    layer = weights.layer
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, layer.n_embd, generator=gen) + weights.shift
    dy = torch.randn(tokens, layer.n_embd, generator=gen)
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    dy = dy.to(device=device, dtype=dtype)
    shape = f"{tokens}x{layer.n_embd}x{layer.hidden} E{layer.experts} k{layer.k}"
    return Case(shape, tokens, weights, x, dy, _loads(weights.moe, x))


def _loads(moe: MoEMLP, x: torch.Tensor) -> dict:
    """The busiest and the idlest expert's slots over the mean (1 and 1 when even): the router's top k."""
    with torch.no_grad():
        experts = moe.router(x).topk(moe.experts_per_token, dim=-1).indices
    counts = torch.bincount(experts.reshape(-1), minlength=moe.n_experts).float()
    mean = counts.mean()
    return {"max_load": round(float(counts.max() / mean), 2), "min_load": round(float(counts.min() / mean), 2)}


def output_and_grad(fn, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """fn's output on the case's input and the input's gradient for the case's dy, detached."""
    y = fn(case.weights.moe, case.weights.plain, case.x)
    (dx,) = torch.autograd.grad(y, case.x, case.dy)
    return y.detach(), dx


def mismatch(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why got does not agree with want at dtype's TOLERANCE (on the error's norm, or on any element's error), or None
    when it does. NaN never agrees."""
    norm_tol, element_tol = TOLERANCE[dtype]
    got, want = got.float(), want.float()
    error = (got - want).abs()
    rms = want.pow(2).mean().sqrt()
    relative_norm = float(error.norm() / want.norm())
    largest = float(error.nan_to_num(float("inf")).max() / rms)
    if relative_norm <= norm_tol and largest <= element_tol:  # both False for a NaN
        return None
    return (f"error norm {relative_norm:.3g} of the reference's (at most {norm_tol:g}), largest error {largest:.3g} "
            f"x its RMS (at most {element_tol:g})")


def check_against(name: str, got: tuple[torch.Tensor, torch.Tensor], references: dict, dtype) -> None:
    """Raises ValueError where got (output, input gradient) differs from references' (those of the first provider
    that ran at this case: CHECKED -> (its name, tensor)); where there are none yet, got becomes them, once it is seen
    to be finite."""
    for what, tensor in zip(CHECKED, got):
        if what in references:
            reference_name, want = references[what]
            why = mismatch(tensor, want, dtype)
            if why is not None:
                raise ValueError(f"its {what} differs from {reference_name}'s: {why}")
        elif not tensor.isfinite().all():
            raise ValueError(f"its {what} has NaN or infinite elements")
    if not references:
        references.update({what: (name, tensor) for what, tensor in zip(CHECKED, got)})


def bench_one(name: str, fn, case: Case, dtype, references: dict) -> list[Result]:
    """The provider's rows at this case, once its numbers agree with the references' (check_against)."""
    with expert_path(name):
        check_against(name, output_and_grad(fn, case), references, dtype)
        times = time_modes(lambda: fn(case.weights.moe, case.weights.plain, case.x), case.dy,
                           grad_to_none=case.leaves())
    layer = case.weights.layer
    forward_flops = 2 * 3 * layer.n_embd * layer.hidden * layer.k * case.tokens
    return [Result("moe", mode, case.shape, name, ms, FLOP_FACTOR[mode] * forward_flops / ms / 1e9, "TFLOP/s",
                   {"tokens_per_s": round(case.tokens / ms * 1e3), **case.loads})
            for mode, ms in times.items()]


def bench_case(each: dict, case: Case, dtype, results: list[Result]) -> None:
    """Appends to results the rows of every provider in `each` that runs at this case and agrees with the first that
    ran, each provider's as it ends (a run cut short keeps those)."""
    print(f"{case.shape}: expert loads {case.loads['min_load']} to {case.loads['max_load']} x the mean")
    references: dict = {}
    for name, fn in each.items():
        results.extend(measured(name, case.shape,
                                lambda name=name, fn=fn: bench_one(name, fn, case, dtype, references)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_layer, default=[parse_layer(p) for p in PRESETS],
                        metavar="SHAPE", help=f"{' | '.join(PRESETS)} | N_EMBDxHIDDENxEXPERTSxK")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--imbalance", type=float, default=0.2,
                        help="std of each expert's fixed router-logit offset (a token's own logits have std 1)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if any(t < 1 for t in args.tokens):
        parser.error(f"--tokens must be positive; got {args.tokens}")
    if not args.imbalance >= 0:
        parser.error(f"--imbalance must be >= 0; got {args.imbalance}")
    device = bench_device("bench_moe", args.device)
    if device is None:
        return 1
    dtype = getattr(torch, args.dtype)
    results: list[Result] = []
    each = selected(providers(device), args.providers)
    with saving(results, f"MoE layer {args.dtype}", BASELINES):
        # every provider at a shape before the next shape: a run cut short keeps whole comparisons
        for layer in args.shapes:
            weights = make_weights(layer, args.imbalance, dtype, device)
            for tokens in args.tokens:
                bench_case(each, make_case(weights, tokens, dtype, device), dtype, results)
            del weights  # before the next layer's are drawn
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
