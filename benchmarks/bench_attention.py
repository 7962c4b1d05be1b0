"""Attention: forward, backward and forward+backward in TFLOP/s, every provider side by side.

    python benchmarks/bench_attention.py                        # bf16, hidden 2048, 16k tokens, S 512..16k
    python benchmarks/bench_attention.py --seqlens 4096 --head-dims 128 --causal true

Shapes follow the FlashAttention papers: hidden 2048 split as D=64 x 32 heads or D=128 x 16
heads, batch B = tokens / S (16k tokens), q, k and v of one head count. FLOPs: the forward does
4 * B * H * S^2 * D (two matmuls), halved when causal; the backward 2.5x that (five matmuls,
one of them recomputing q k^T); forward+backward 3.5x. The same count for every provider, so
TFLOP/s compare like times.

Providers: eager math attention (the fp32 reference: materializes S x S; skipped where it runs
out of memory), SDPA forced to its flash and its cuDNN backends, llmkern triton, llmkern cuda,
and flash-attn's flash_attn_func when it is importable. Two more are llmkern with a switch set
while they run (SWITCHES): "llmkern cuda rows128", the CUDA forward at 128 query rows a block
(8 warps) beside the default 64, and "llmkern triton atomic-dq", the Triton backward summing dq
by atomics in the dk/dv kernel instead of a third kernel.

    python benchmarks/bench_attention.py --doc-len 1024 --seqlens 8192 --head-dims 128

With --doc-len L, rows are packed with documents of L tokens (the last one shorter), each token
attending causally within its own document: llmkern's doc_ids against PyTorch's own ways of
saying that, FlexAttention with a document block mask (compiled; the mask made once a batch,
outside the timing, as a model makes it once for all its layers) and SDPA's memory-efficient
backend with a boolean (B, 1, S, S) mask. FLOPs count only the visible pairs, sum of L^2 / 2.

    python benchmarks/bench_attention.py --window 4096 --seqlens 16384 --head-dims 128

With --window W, each token attends causally to the last W tokens up to its own (Mistral's sliding
window): llmkern's window against FlexAttention with a sliding-window block mask, SDPA's
memory-efficient backend with a boolean mask, and flash-attn's window_size=(W - 1, 0) when it is
importable. FLOPs count the visible pairs, min(W, p + 1) keys for the query at position p.

    python benchmarks/bench_attention.py --softcap 50 --seqlens 4096 8192 --head-dims 256

With --softcap C, causal attention whose scaled scores s become C * tanh(s / C) (Gemma 2's
attn_logit_softcapping): llmkern triton against the eager math reference, FlexAttention with a
score_mod that caps (compiled, with a causal block mask made once outside the timing) and
flash-attn's softcap=C when it is importable. SDPA and llmkern cuda have no cap. With --window W
too, a capped sliding window (Gemma 2's local layers); --doc-len is refused. FLOPs are the causal
(or windowed) count: the cap's tanh is not counted, the same for every provider.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Result, add_common_args, bench_device, compiled, measured, optional, saving, selected,  # noqa: E402
                    time_modes)

import llmkern  # noqa: E402
from llmkern import _backend  # noqa: E402
from llmkern.cli import true_or_false  # noqa: E402
from llmkern.ops import reference  # noqa: E402
from llmkern.ops.attention import SOFTCAP_BACKENDS  # noqa: E402

BASELINES = ("SDPA flash", "SDPA cuDNN", "flash-attn")
MODES = ("forward", "backward", "forward+backward")
FLOP_FACTOR = {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


# Providers that are another provider with llmkern's environment switches set while they run (forward
# and backward): name -> (the provider, {variable: value}).
SWITCHES = {
    "llmkern cuda rows128": ("llmkern cuda", {"LLMKERN_CUDA_ATTENTION_ROWS": "128"}),
    "llmkern triton atomic-dq": ("llmkern triton", {"LLMKERN_TRITON_ATTENTION_DQ": "atomic"}),
}


@contextlib.contextmanager
def switches(name: str):
    """The environment switches of provider `name` (SWITCHES), set for the time of the block."""
    settings = SWITCHES.get(name, (None, {}))[1]
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def providers(device: torch.device) -> dict:
    """name -> fn(q, k, v, causal) on (B, H, S, D) tensors, for every provider that can run here."""
    out = {
        "eager math": lambda q, k, v, causal: reference.attention(q, k, v, causal=causal),
        "SDPA flash": _sdpa("FLASH_ATTENTION"),
        "SDPA cuDNN": _sdpa("CUDNN_ATTENTION"),
    }
    for backend in ("triton", "cuda"):
        if _backend.can_run(backend, "attention", device):
            out[f"llmkern {backend}"] = (
                lambda b: lambda q, k, v, causal: llmkern.ops.attention(q, k, v, causal=causal, backend=b)
            )(backend)
    for name, (base, _) in SWITCHES.items():
        if base in out:
            out[name] = out[base]  # the same call, under switches(name)
    flash_attn_func = optional("flash_attn", "flash_attn_func")
    if flash_attn_func is not None:
        def flash_attn(q, k, v, causal):  # flash-attn's layout is (B, S, H, D)
            o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
            return o.transpose(1, 2)

        out["flash-attn"] = flash_attn
    return out


def masked_providers(device: torch.device, batch: int, seq: int, visible, **llmkern_masks) -> dict:
    """name -> fn(q, k, v) attending where visible(b, h, q_idx, kv_idx) holds (a FlexAttention mask_mod, also
    evaluated once into SDPA's dense mask), for every provider that can run here; llmkern is given the same
    rule as its own arguments (llmkern_masks: doc_ids, window). Masks are made here, once, as a model makes
    them once a batch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    positions = torch.arange(seq, device=device)
    rows = torch.arange(batch, device=device)[:, None, None]
    dense_mask = visible(rows, None, positions[None, :, None], positions[None, None, :])[:, None]  # (B, 1, S, S)

    def sdpa_masked(q, k, v):
        if device.type != "cuda":  # the CPU has no memory-efficient backend: SDPA's own choice
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)

    out = {"FlexAttention": flex_provider(device, batch, seq, visible), "SDPA efficient + mask": sdpa_masked}
    for backend in ("triton", "cuda"):
        if _backend.can_run(backend, "attention", device):
            out[f"llmkern {backend}"] = (
                lambda b: lambda q, k, v: llmkern.ops.attention(q, k, v, causal=True, backend=b, **llmkern_masks)
            )(backend)
    return out


def flex_provider(device: torch.device, batch: int, seq: int, visible, score_mod=None):
    """fn(q, k, v): FlexAttention attending where visible(b, h, q_idx, kv_idx) holds, scores changed by
    score_mod when given; compiled on a GPU (on the CPU its eager forward, a check of the benchmark), its
    block mask made here, once, outside the timing."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(visible, batch, None, seq, seq, device=device)
    flex = compiled(flex_attention) if device.type == "cuda" else flex_attention
    return lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block_mask)


def flash_attn_provider(**options):
    """fn(q, k, v): flash-attn's causal flash_attn_func with these options (window_size, softcap), or None
    when it is not importable."""
    flash_attn_func = optional("flash_attn", "flash_attn_func")
    if flash_attn_func is None:
        return None

    def flash_attn(q, k, v):  # flash-attn's layout is (B, S, H, D)
        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, **options)
        return o.transpose(1, 2)

    return flash_attn


def causal_mask_mod(window: int | None = None):
    """FlexAttention's mask_mod for causal attention, to the last `window` keys when given."""
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def causal_in_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return causal if window is None else causal_in_window


def document_providers(device: torch.device, doc_ids: torch.Tensor) -> dict:
    """masked_providers attending causally within the documents of doc_ids (B, S)."""
    def causal_in_document(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    batch, seq = doc_ids.shape
    return masked_providers(device, batch, seq, causal_in_document, doc_ids=doc_ids)


def window_providers(device: torch.device, batch: int, seq: int, window: int) -> dict:
    """masked_providers attending causally to the last `window` keys, and flash-attn's own window when it is
    importable."""
    out = masked_providers(device, batch, seq, causal_mask_mod(window), window=window)
    flash_attn = flash_attn_provider(window_size=(window - 1, 0))
    if flash_attn is not None:
        out["flash-attn"] = flash_attn
    return out


def capped_providers(device: torch.device, batch: int, seq: int, softcap: float, window: int | None = None) -> dict:
    """name -> fn(q, k, v) of causal attention with its scaled scores soft-capped at `softcap` (Gemma 2), in a
    sliding window of `window` keys when given, for every provider that can run here: the eager reference,
    FlexAttention with a capping score_mod, llmkern's backends that take a cap, flash-attn's softcap when it is
    importable. SDPA has no cap, so no SDPA provider."""
    def capped(score, b, h, q_idx, kv_idx):  # FlexAttention's score is the scaled one, as llmkern's cap takes it
        return softcap * torch.tanh(score / softcap)

    out = {
        "eager math": lambda q, k, v: reference.attention(q, k, v, causal=True, window=window, softcap=softcap),
        "FlexAttention": flex_provider(device, batch, seq, causal_mask_mod(window), score_mod=capped),
    }
    for backend in ("triton", "cuda"):
        if backend in SOFTCAP_BACKENDS and _backend.can_run(backend, "attention", device):
            out[f"llmkern {backend}"] = functools.partial(llmkern.ops.attention, causal=True, window=window,
                                                          softcap=softcap, backend=backend)
    flash_attn = flash_attn_provider(softcap=softcap, window_size=(-1, -1) if window is None else (window - 1, 0))
    if flash_attn is not None:
        out["flash-attn"] = flash_attn
    return out


def print_tuned_tiles() -> None:
    """The tile Triton's autotuner chose for each key it tuned (length bucket, head dim, causal,
    documents, dtypes): what the candidate lists in llmkern/triton/attention.py should keep."""
    if "llmkern.triton.attention" not in sys.modules:
        return
    kernels = sys.modules["llmkern.triton.attention"]
    for name in ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"):
        for key, config in getattr(getattr(kernels, name), "cache", {}).items():
            print(f"tuned tile: {name} {key} -> {config}")


def packed_doc_ids(batch: int, seq: int, doc_len: int, device: torch.device) -> torch.Tensor:
    """(batch, seq) ids of documents of doc_len tokens each, the last of a row cut at seq."""
    return (torch.arange(seq, device=device) // doc_len).expand(batch, seq).contiguous()


def forward_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, doc_len: int | None = None,
                  window: int | None = None) -> float:
    """4 FLOPs a head dim per visible (query, key) pair: S^2 of them, half when causal; with
    documents the sum of L^2 / 2 over each row's documents; with a window min(W, p + 1) for the
    query at position p."""
    if window is not None:
        return 4.0 * batch * heads * head_dim * sum(min(window, p + 1) for p in range(seq))
    if doc_len is not None:
        lengths = [min(doc_len, seq - start) for start in range(0, seq, doc_len)]
        return 4.0 * batch * heads * head_dim * sum(n * n for n in lengths) / 2
    flops = 4.0 * batch * heads * seq * seq * head_dim
    return flops / 2 if causal else flops


def bench_one(name, fn, batch, heads, seq, head_dim, causal, dtype, device, doc_len=None,
              window=None, softcap=None) -> list[Result]:
    """fn(q, k, v, causal), or with doc_len, window or softcap fn(q, k, v) over rows of documents of doc_len
    tokens, in a sliding window of `window` tokens, with scores capped at softcap (which only names the
    shape: fn caps)."""
    shape = f"B{batch} H{heads} S{seq} D{head_dim}" + (" causal" if causal else "")
    if doc_len is not None:
        shape += f" docs{doc_len}"
    if window is not None:
        shape += f" window{window}"
    if softcap is not None:
        shape += f" softcap{softcap:g}"
    q, k, v = (torch.randn(batch, heads, seq, head_dim, dtype=dtype, device=device, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    grads = [q, k, v]
    fixed_mask = doc_len is not None or window is not None or softcap is not None  # fn knows its own mask
    run = (lambda: fn(q, k, v)) if fixed_mask else (lambda: fn(q, k, v, causal))
    fwd = forward_flops(batch, heads, seq, head_dim, causal, doc_len, window)
    # eager at long S runs out of memory, a backend may refuse a shape: measured() skips that one
    return measured(name, shape, lambda: [
        Result("attention", mode, shape, name, ms, FLOP_FACTOR[mode] * fwd / ms / 1e9, "TFLOP/s",
               {"dtype": str(dtype).replace("torch.", "")})
        for mode, ms in time_modes(run, do, grad_to_none=grads).items()
    ])


def bench_capped(args, device: torch.device, dtype: torch.dtype) -> None:
    """--softcap: every capped provider at each shape, in a sliding window with --window."""
    title = f"Attention soft-capped at {args.softcap:g}" + (f" in a window of {args.window} tokens" if args.window
                                                           else "") + f", {args.dtype}"
    results: list[Result] = []
    with saving(results, title, ("FlexAttention", "flash-attn")):  # PyTorch's best with a cap, and the library's
        for seq in args.seqlens:
            batch = max(1, args.tokens // seq)
            each = selected(capped_providers(device, batch, seq, args.softcap, args.window), args.providers)
            for head_dim in args.head_dims:
                for name, fn in each.items():
                    results.extend(bench_one(name, fn, batch, args.hidden // head_dim, seq, head_dim, True, dtype,
                                             device, window=args.window, softcap=args.softcap))
    print_tuned_tiles()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", type=true_or_false, nargs="+", default=[True, False])
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden / head dim")
    parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens / S (at least 1)")
    parser.add_argument("--doc-len", type=int, help="rows packed with documents of this many tokens (causal "
                                                    "within each); compares document masking instead")
    parser.add_argument("--window", type=int, help="a sliding window of this many tokens (causal); compares "
                                                   "sliding-window attention instead")
    parser.add_argument("--softcap", type=float, help="soft-cap the scaled scores at this value (Gemma 2: 50; "
                                                      "causal, or a capped sliding window with --window); "
                                                      "compares capped attention instead")
    add_common_args(parser, dtypes=("bfloat16", "float16"))
    args = parser.parse_args(argv)
    if args.doc_len is not None and args.doc_len < 1:
        parser.error(f"--doc-len must be at least 1; got {args.doc_len}")
    if args.window is not None and args.window < 1:
        parser.error(f"--window must be at least 1; got {args.window}")
    if args.window is not None and args.doc_len is not None:
        parser.error("--window and --doc-len compare different masks: give one")
    if args.softcap is not None and not (math.isfinite(args.softcap) and args.softcap > 0):
        parser.error(f"--softcap must be a finite number > 0; got {args.softcap}")
    if args.softcap is not None and args.doc_len is not None:
        parser.error("--softcap compares capped causal or sliding-window attention, not documents: "
                     "give --softcap or --doc-len")
    device = bench_device("bench_attention", args.device)
    if device is None:
        return 1
    dtype = getattr(torch, args.dtype)
    results: list[Result] = []
    if args.softcap is not None:
        bench_capped(args, device, dtype)
        return 0
    if args.doc_len is not None:
        with saving(results, f"Attention with documents of {args.doc_len} tokens, {args.dtype}", ("FlexAttention",)):
            for seq in args.seqlens:
                batch = max(1, args.tokens // seq)
                doc_ids = packed_doc_ids(batch, seq, args.doc_len, device)
                each = selected(document_providers(device, doc_ids), args.providers)
                for head_dim in args.head_dims:
                    for name, fn in each.items():
                        results.extend(bench_one(name, fn, batch, args.hidden // head_dim, seq, head_dim, True,
                                                 dtype, device, args.doc_len))
        print_tuned_tiles()
        return 0
    if args.window is not None:
        with saving(results, f"Attention in a window of {args.window} tokens, {args.dtype}", ("FlexAttention",)):
            for seq in args.seqlens:
                batch = max(1, args.tokens // seq)
                each = selected(window_providers(device, batch, seq, args.window), args.providers)
                for head_dim in args.head_dims:
                    for name, fn in each.items():
                        results.extend(bench_one(name, fn, batch, args.hidden // head_dim, seq, head_dim, True,
                                                 dtype, device, window=args.window))
        print_tuned_tiles()
        return 0
    with saving(results, f"Attention {args.dtype}", BASELINES):
        each = selected(providers(device), args.providers)
        # every provider at a shape before the next shape: a run cut short keeps whole comparisons
        for head_dim in args.head_dims:
            heads = args.hidden // head_dim
            for causal in args.causal:
                for seq in args.seqlens:
                    batch = max(1, args.tokens // seq)
                    for name, fn in each.items():
                        with switches(name):
                            results.extend(bench_one(name, fn, batch, heads, seq, head_dim, causal, dtype, device))
    print_tuned_tiles()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
