"""Training throughput: tokens/s, MFU and peak memory of a full training step, per provider.

    python benchmarks/bench_train.py                      # GPT-2 124M, batch 16, context 1024, bf16, on the GPU
    python benchmarks/bench_train.py --device cpu --preset tiny --batch 4 --seq-len 64 --steps 2 --no-save
    python benchmarks/bench_train.py --loss-steps 1000 --data DIR    # loss curves of each backend vs torch

A step is forward, backward, gradient clipping to norm 1 and AdamW, on random tokens (the data
does not change the speed). Steps run back to back, as in training, and CUDA events between them
give each step's time on the GPU (step_seconds); the median is reported. Providers:
  plain pytorch        benchmarks/plain_gpt.py (SDPA attention) + torch.optim.AdamW(fused=True)
  plain torch.compile  the same model under torch.compile
  llmkern cuda         llmkern's GPT with backend="cuda" + llmkern.optim.AdamW (clip fused in)
  llmkern triton       the same with backend="triton"
  llmkern compile      llmkern's GPT (backend "auto") under torch.compile
With --loss-steps N --data DIR it instead trains N steps on real token shards with the torch
backend and with each llmkern GPU backend, and reports how far apart the loss curves get (target: 1%).
On a CPU the llmkern GPU backends cannot run; "llmkern torch" (the reference backend) stands in,
so the logic can be dry-run anywhere. MFU uses llmkern.train.metrics' table of bf16 peaks.
Results append to benchmarks/results/<gpu>.csv (GPU name, versions, git commit) with a chart.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Result, bench_device, first_line, save, saving  # noqa: E402
from plain_gpt import PlainGPT  # noqa: E402

from llmkern import _backend  # noqa: E402
from llmkern.model import GPT, GPTConfig  # noqa: E402
from llmkern.train.metrics import mfu, peak_flops  # noqa: E402

PROVIDERS = ("plain pytorch", "plain torch.compile", "llmkern cuda", "llmkern triton", "llmkern compile")
BASELINES = ("plain pytorch", "plain torch.compile")


def build(provider: str, config: GPTConfig, device: torch.device):
    """(model to call, optimizer, whether the optimizer clips, the uncompiled model), or None when the
    provider cannot run here."""
    if provider.startswith("plain"):
        model = PlainGPT(config.padded_vocab_size, config.block_size, config.n_layer, config.n_head, config.n_embd)
        model.to(device)
        optimizer = torch.optim.AdamW(model.optimizer_groups(0.1), lr=3e-4, betas=(0.9, 0.95),
                                      fused=device.type == "cuda")
        return (torch.compile(model) if "compile" in provider else model), optimizer, False, model
    backend = provider.split()[-1]
    if backend == "compile":
        backend = "auto"
    elif device.type != "cuda" and backend in ("cuda", "triton"):
        return None
    elif backend == "cuda" and _backend.cuda_module() is None:
        return None
    from llmkern.optim import AdamW

    model = GPT(GPTConfig.from_dict({**config.to_dict(), "backend": backend})).to(device)
    optimizer = AdamW(model.optimizer_groups(0.1), lr=3e-4, betas=(0.9, 0.95), max_grad_norm=1.0,
                      backend=None if backend == "auto" else backend)
    return (torch.compile(model) if provider.endswith("compile") else model), optimizer, True, model


def run(provider: str, config: GPTConfig, batch: int, seq_len: int, steps: int, warmup: int,
        device: torch.device) -> Result | None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    built = build(provider, config, device)
    if built is None:
        print(f"{provider}: cannot run on {device}, skipped")
        return None
    model, optimizer, clips_in_optimizer, raw = built
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen).to(device)
    y = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    last = {}

    def step() -> None:
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        if not clips_in_optimizer:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last["loss"] = loss.detach()

    for _ in range(warmup):
        step()
    seconds = statistics.median(step_seconds(step, steps, device))
    loss = last["loss"]
    tokens_per_s = batch * seq_len / seconds
    flops = raw.flops_per_token(seq_len)
    peak = peak_flops(device)
    util = mfu(tokens_per_s, flops, peak)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    print(f"{provider:>20}: {tokens_per_s:12,.0f} tokens/s  MFU {'-' if util is None else f'{util:6.1%}'}  "
          f"peak memory {mem:6.2f} GiB  loss {loss.item():.3f}")
    return Result(bench="train", mode="train step", shape=f"{config.n_layer}L{config.n_embd} B{batch} T{seq_len}",
                  provider=provider, ms=seconds * 1e3,
                  value=tokens_per_s, unit="tokens/s",
                  extra={"mfu": "" if util is None else round(util, 4), "peak_mem_gib": round(mem, 2),
                         "flops_per_token": flops, "dtype": "bf16" if device.type == "cuda" else "fp32"})


def loss_curves(args, device: torch.device) -> list[Result]:
    """Train the same model from the same seed on real shards with the torch backend and with each
    llmkern GPU backend (the optimizer follows the backend); the smoothed curves should agree within 1%."""
    import tempfile

    from llmkern.train import TrainConfig, Trainer
    from llmkern.train.metrics import read_metrics

    backends = ["torch"] + [b for b in ("cuda", "triton") if device.type == "cuda"
                            and (b != "cuda" or _backend.cuda_module() is not None)]
    curves: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            config = TrainConfig(out_dir=f"{tmp}/{backend}", data_dir=args.data, preset=args.preset,
                                 micro_batch=args.batch, seq_len=args.seq_len, batch_tokens=args.batch * args.seq_len,
                                 max_steps=args.loss_steps, warmup_steps=max(1, args.loss_steps // 10), lr=6e-4,
                                 min_lr=6e-5, eval_interval=0, log_interval=1, backend=backend, device=str(device))
            Trainer(config).fit()
            records = read_metrics(f"{tmp}/{backend}/metrics.jsonl")
            curves[backend] = [r["loss"] for r in records if r["kind"] == "train"]
    if len(backends) == 1:
        print(f"no llmkern GPU backend runs on {device}: the torch backend's curve has nothing to be compared with")
    window = max(1, args.loss_steps // 20)
    smooth = {b: [statistics.fmean(c[max(0, i - window + 1):i + 1]) for i in range(len(c))] for b, c in curves.items()}
    results = []
    for backend in backends[1:]:
        skip = args.loss_steps // 10  # the first steps move too fast for a relative comparison
        diffs = [abs(a - r) / r for a, r in zip(smooth[backend][skip:], smooth["torch"][skip:])]
        worst = 100 * max(diffs) if diffs else float("nan")
        print(f"loss curve, llmkern {backend} vs torch backend: max {worst:.2f}% apart over steps {skip + 1}-"
              f"{args.loss_steps} ({window}-step means); final {smooth[backend][-1]:.4f} vs {smooth['torch'][-1]:.4f}")
        results.append(Result(bench="train", mode="loss curve", shape=f"{args.preset} {args.loss_steps} steps",
                              provider=f"llmkern {backend}", ms=0.0, value=worst, unit="% max apart from torch backend",
                              extra={"final_loss": round(smooth[backend][-1], 4),
                                     "torch_final_loss": round(smooth["torch"][-1], 4)}))
    return results


def step_seconds(step, steps: int, device: torch.device) -> list[float]:
    """The time of each of `steps` calls of step(), run back to back as a training loop runs them.

    On a GPU nothing waits between steps: CUDA events between them time each step on the device,
    gaps included where the host was late to launch its kernels (a sync per step would instead
    add the host's time to queue the first kernels to every step, which the trainer never waits
    for). On a CPU, the wall clock of each call."""
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times
    torch.cuda.synchronize(device)
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    marks[0].record()
    for i in range(steps):
        step()
        marks[i + 1].record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in zip(marks, marks[1:])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="a GPTConfig preset (default gpt2, 124M)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the median counts)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (torch.compile compiles here)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated, from: " + ", ".join(PROVIDERS))
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one) | cuda | cpu")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to benchmarks/results")
    parser.add_argument("--loss-steps", type=int, default=0,
                        help="instead of timing: train this many steps per backend on --data and compare the loss curves")
    parser.add_argument("--data", default=None, help="token shards (manifest.json) for --loss-steps")
    args = parser.parse_args(argv)

    device = bench_device("bench_train", ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    if device is None:
        return 1
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {PROVIDERS}")
    if device.type != "cuda":  # the reference backend stands in for the GPU ones
        providers = list(dict.fromkeys("llmkern torch" if p in ("llmkern cuda", "llmkern triton") else p
                                       for p in providers))
    if args.loss_steps:
        if not args.data:
            parser.error("--loss-steps needs --data (a folder of token shards)")
        results = loss_curves(args, device)
        if results and not args.no_save:
            print(f"appended to {save(results, 'loss curve agreement')}")
        return 0
    config = GPTConfig.from_preset(args.preset, block_size=max(args.seq_len, 1), vocab_size=50257)
    print(f"train step: {args.preset}, batch {args.batch}, context {args.seq_len}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'} on {device}")
    results = []
    with saving(results if not args.no_save else [], "training step throughput", BASELINES):
        for provider in providers:
            try:  # one provider's failure (a compile error, out of memory) must not lose the others' rows
                result = run(provider, config, args.batch, args.seq_len, args.steps, args.warmup, device)
            except Exception as err:
                print(f"{provider}: failed: {type(err).__name__}: {first_line(err)}", file=sys.stderr)
                result = None
            finally:
                gc.collect()  # free this provider's model and optimizer before the next one
                torch._dynamo.reset()
            if result is not None:
                results.append(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
