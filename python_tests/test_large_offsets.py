"""Element offsets past 2**31: every kernel forms its row (or chunk) offsets in 64 bits.

A classic GPU bug is `row * stride` in 32-bit integers: a Triton program id is int32 and so is an
integer argument below 2**31, and in CUDA `int row = blockIdx.x` times an int stride is an int. The
product wraps once a tensor holds over 2**31 elements (RMSNorm over 40000 rows of 65536, the logits of a
fused cross-entropy chunk, a 2**31-element parameter in AdamW) or once a view's rows are far apart
(the q/k/v views of a fused QKV projection), and the kernel reads or writes outside the tensor.

These tests run each kernel on views whose rows lie 2**30 + 64 elements apart, so row 2 starts
past 2**31 elements, while the kernel touches only a few rows: the storage is a sparse file of
8 GB (32 GB for AdamW, whose single tensor has 2**31 + 1000 elements; the Triton launch is cut
down to its last two chunks), mapped into memory, of which only the written pages take any. A wrapped
offset reads outside the mapping and kills the process, so each backend runs in a child process.
On a CPU machine Triton runs in its interpreter (whose int32 arithmetic wraps as the GPU's does) and
the CUDA kernels in the emulator (python_tests/simt); on a GPU the storage is GPU memory.

Triton attention has its own such test in test_attention.py (test_triton_interpreter_row_offsets_past_int32).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkern import _backend

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()

_SCRIPT = r"""
import contextlib
import sys
import time

import torch
import torch.nn.functional as F

backend, device, path = sys.argv[1], sys.argv[2], sys.argv[3]
ops = sys.argv[4].split(",")
emulate = contextlib.nullcontext()
if backend == "cuda" and device == "cpu":
    import simt
    emulate = simt.emulating(simt.module())
from llmkern.ops import attention, layer_norm, reference, rms_norm, rope, swiglu

STRIDE = 2**30 + 64  # elements between the rows of every view below: row 2 starts past 2**31
ROWS, WIDTH = 3, 512
SIZE = STRIDE * (ROWS - 1) + WIDTH


def storage(numel):
    # fp32 storage of numel elements that takes memory only where written
    if device == "cpu":
        with open(path, "wb") as f:
            f.truncate(numel * 4)  # sparse
        return torch.from_file(path, shared=True, size=numel, dtype=torch.float32)
    return torch.empty(numel, dtype=torch.float32, device=device)


def fits(numel):
    return device == "cpu" or torch.cuda.mem_get_info()[0] > numel * 4 + 2**30


def views(store, k, width, dtype=torch.float32):
    # k (ROWS, width) views side by side in rows STRIDE elements apart, filled anew: detached leaves
    rows = store.view(dtype)[:SIZE].as_strided((ROWS, WIDTH), (STRIDE, 1))
    block = rows[:, : k * width]
    block.copy_(torch.randn(ROWS, k * width, device=device))
    return [block[:, i * width:(i + 1) * width].detach().requires_grad_() for i in range(k)]


def close(got, want, what, tol=1e-4):
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def check(name, fn, ref, inputs, tol=1e-4):
    # fn against ref, outputs and input gradients; ref runs on contiguous copies
    refs = [t.detach().clone().requires_grad_() for t in inputs]
    out, want = fn(*inputs), ref(*refs)
    close(out, want, name, tol)
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    for i, (a, b) in enumerate(zip(inputs, refs)):
        close(a.grad, b.grad, f"{name}: gradient of input {i}", tol)


def cross_entropy_rows(store):
    if backend == "cuda":
        from llmkern.cuda.fused_linear_cross_entropy import cross_entropy_rows as kernel
    else:
        from llmkern.triton.fused_linear_cross_entropy import cross_entropy_rows as kernel
    v = 300
    (logits,) = views(store, 1, v)
    logits = logits.detach()
    z = logits.clone()
    target = torch.tensor([7, -100, v - 1], device=device)
    loss = torch.full((ROWS,), float("nan"), device=device)
    kernel(logits, target, loss, torch.ones(1, device=device), -100, 0.0, True)
    close(loss, F.cross_entropy(z, target, ignore_index=-100, reduction="none"), "cross-entropy rows: loss")
    want = torch.softmax(z, -1) - F.one_hot(target.clamp(min=0), v)
    want[1] = 0  # ignored row
    close(logits, want, "cross-entropy rows: gradient written over the logits")


def adamw():
    numel, span = 2**31 + 1000, 2**31 + 4096
    if not fits(4 * span):
        print("adamw skipped: not enough device memory", flush=True)
        return
    store = storage(4 * span)
    p, g, m, v = (store[i * span: i * span + numel] for i in range(4))
    lo = 2**31 - 4096  # the last two chunks: [2**31 - 4096, 2**31) and [2**31, numel)
    if backend == "cuda":  # a persistent grid walks every chunk: zeros elsewhere (which stay zeros)
        from llmkern.cuda import adamw as A
        for t in (p, g, m, v):
            t[:lo].zero_()
    else:  # the launch cut down to the last two chunks: 2 programs, not 524289
        from llmkern.triton import adamw as A
        whole = A._chunk_table
        A._chunk_table = lambda numels: whole(numels)[-2:]
    for t in (p, g, m, v):
        t[lo:].copy_(torch.randn(numel - lo, device=device))
    v[lo:].abs_()
    want = [t[lo:].clone() for t in (p, g, m, v)]
    step = torch.tensor(3.0, device=device)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    A.step([p], [g], [m], [v], [step], None, clip_state=None, cache={}, **hyper)
    reference.adamw_step(want[:1], want[1:2], want[2:3], want[3:], [step], None, **hyper)
    for got, w, name in zip((p, m, v), (want[0], want[2], want[3]), ("param", "exp_avg", "exp_avg_sq")):
        close(got[lo:], w, f"adamw: {name}")
    norm = torch.zeros((), device=device)
    clip, skipped = torch.zeros(2, device=device), torch.zeros((), dtype=torch.int64, device=device)
    A.grad_norm([g], 1.0, norm, clip, skipped, cache={})
    close(norm, torch.linalg.vector_norm(g[lo:]), "adamw: gradient norm of the same chunks")


with emulate:
    store = storage(SIZE) if any(op != "adamw" for op in ops) else None
    for op in ops:
        t0 = time.time()
        if op in ("rms_norm", "layer_norm"):
            fn, ref = (rms_norm, reference.rms_norm) if op == "rms_norm" else (layer_norm, reference.layer_norm)
            w = torch.randn(64, device=device)
            # without a residual h is x itself: the backward reads it at x's strides too
            check(op, lambda x: fn(x, w, backend=backend), lambda x: ref(x, w), views(store, 1, 64))
            x, r = views(store, 2, 64)  # the residual beside x in the same rows
            (y, h), (y_ref, h_ref) = fn(x, w, residual=r, backend=backend), ref(x, w, residual=r)
            close(y, y_ref, op + " with a residual: y")
            close(h, h_ref, op + " with a residual: h")
        elif op == "swiglu":  # the halves of a fused gate/up projection
            check(op, lambda g, u: swiglu(g, u, backend=backend), reference.swiglu, views(store, 2, 64))
        elif op == "rope":  # (B, H, S, D) = (1, 2, 3, 32): the positions are the rows, two heads in each
            (row,) = views(store, 1, 64)
            x = row.detach().as_strided((1, 2, ROWS, 32), (0, 32, STRIDE, 1)).requires_grad_()
            theta = torch.rand(ROWS, 16, device=device) * 6
            cos, sin = theta.cos(), theta.sin()
            check(op, lambda x: rope(x, cos, sin, backend=backend), lambda x: reference.rope(x, cos, sin), [x])
        elif op == "attention":  # a fused QKV projection's rows (B, S, 3, D), S = 3 positions far apart
            dtype = torch.bfloat16 if backend == "cuda" else torch.float32
            (row,) = views(store, 1, 96, dtype)
            qkv = [row.detach()[:, i * 32:(i + 1) * 32][None, None].requires_grad_() for i in range(3)]
            # the oracle: the fp32 reference on copies (not the kernel itself, which would agree with
            # its own wrong answer); bf16 rounds the kernel's output and gradients, hence the tolerance
            check(op, lambda q, k, v: attention(q, k, v, causal=True, backend=backend),
                  lambda q, k, v: reference.attention(q, k, v, causal=True), qkv,
                  tol=2e-2 if dtype == torch.bfloat16 else 1e-4)
        elif op == "cross_entropy_rows":
            cross_entropy_rows(store)
        elif op == "adamw":
            adamw()
        else:
            raise ValueError(op)
        print(op, "ok", f"{time.time() - t0:.1f}s", flush=True)
print("all ok")
"""

TRITON_OPS = ["rms_norm", "layer_norm", "swiglu", "rope", "cross_entropy_rows", "adamw"]
# AdamW's CUDA kernel is persistent (a grid of resident blocks walks every chunk of the tensor):
# it cannot be cut down to the last chunks, and 2**31 elements are too many for the emulator, so
# it runs on the GPU only.
SIMT_OPS = ["rms_norm", "layer_norm", "swiglu", "rope", "cross_entropy_rows", "attention"]


def _run(backend: str, device: str, ops: list[str], tmp_path: Path) -> None:
    paths = [str(REPO), str(REPO / "python_tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    if device == "cpu" and backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", _SCRIPT, backend, device, str(tmp_path / "sparse.bin"), ",".join(ops)],
                          env=env, capture_output=True, text=True, timeout=600)
    # A wrapped offset ends the child by SIGSEGV (returncode -11): the last op printed passed, the next did not.
    assert done.returncode == 0 and "all ok" in done.stdout, (
        f"returncode {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}")


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA or not _backend.can_run("triton", "rms_norm", torch.device("cpu")),
                    reason="the Triton interpreter runs this on a CPU machine (TRITON_INTERPRET=1)")
def test_triton_interpreter_offsets_past_int32(tmp_path):
    _run("triton", "cpu", TRITON_OPS, tmp_path)


@pytest.mark.slow
@pytest.mark.simt
def test_cuda_simt_offsets_past_int32(tmp_path):
    # the fixture built (or found) the emulator; the child loads the same build
    _run("cuda", "cpu", SIMT_OPS, tmp_path)


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_offsets_past_int32(backend, tmp_path):
    """On the GPU itself, with 8 GB of device memory (AdamW's 32 GB only where they are free)."""
    if backend == "cuda" and _backend.cuda_module() is None:
        pytest.skip("llmkern._cuda is not built")
    _run(backend, "cuda", SIMT_OPS + ["adamw"], tmp_path)
