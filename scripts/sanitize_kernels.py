"""Every CUDA kernel of llmkern, launched a few times on small odd shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize_kernels.py
    python3 scripts/sanitize_kernels.py --ops attention --backend triton     # no sanitizer: a quick check

One process covers every kernel, so the sanitizer pays PyTorch's start once per tool (a pytest
selection pays it too, and then runs hundreds of cases 10-100x slower). The shapes are small
because the sanitizers are slow, and odd because the edges of tiles are where an index goes out
of bounds. Each result is also compared with the reference, loosely: a kernel that reads the
wrong bytes without faulting shows up here as a wrong answer. Inputs are drawn and references
computed on the CPU in float64, so that on the GPU little but llmkern's kernels runs under the
sanitizer (racecheck would otherwise crawl through cuBLAS). Exit status: 0 when every case
matched, 1 otherwise (the sanitizer's own --error-exitcode says whether it found anything).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import llmkern
import llmkern.cuda.attention as cuda_attention
from llmkern.ops import reference

# Loose on purpose: this is a smoke check under the sanitizer; the numerics live in the tests.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}
FAILURES: list[str] = []


def _check(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1e-30) -> None:
    """got against want, relative to want's norm (or `scale` when that is larger)."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    err = ((got - want).norm() / want.norm().clamp_min(scale)).item()
    ok = bool(torch.isfinite(got).all()) and err <= TOLERANCE[dtype]
    print(f"{'ok  ' if ok else 'FAIL'} {name}: relative error {err:.2e}", flush=True)
    if not ok:
        FAILURES.append(name)


def _leaves(t: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """t (drawn on the CPU) as a leaf on device, and as a float64 leaf on the CPU for the reference."""
    return (t.detach().to(device, copy=True).requires_grad_(True),
            t.detach().to(torch.float64, copy=True).requires_grad_(True))


def rms_norm(backend: str, device: torch.device) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for rows, hidden in ((3, 17), (5, 4097), (2, 8192)):
            x, x_ref = _leaves(torch.randn(rows, hidden, dtype=dtype), device)
            r, r_ref = _leaves(torch.randn(rows, hidden, dtype=dtype), device)
            w, w_ref = _leaves((1 + 0.1 * torch.randn(hidden)).to(dtype), device)
            dy, dh = torch.randn(rows, hidden, dtype=dtype), torch.randn(rows, hidden, dtype=dtype)
            y, h = llmkern.ops.rms_norm(x, w, residual=r, backend=backend)
            y_ref, h_ref = reference.rms_norm(x_ref, w_ref, residual=r_ref)
            torch.autograd.backward((y, h), (dy.to(device), dh.to(device)))
            torch.autograd.backward((y_ref, h_ref), (dy.double(), dh.double()))
            name = f"rms_norm {rows}x{hidden} {dtype}"
            _check(name + " y", y, y_ref, dtype)
            _check(name + " h", h, h_ref, dtype)
            for label, a, b in (("dx", x, x_ref), ("dweight", w, w_ref), ("dresidual", r, r_ref)):
                _check(f"{name} {label}", a.grad, b.grad, dtype)
    # Autocast's dtypes: a bf16 branch joins an fp32 stream (fp32 weight), y and dy are bf16.
    for rows, hidden in ((3, 17), (5, 4096)):
        bf16 = torch.bfloat16
        x, x_ref = _leaves(torch.randn(rows, hidden, dtype=bf16), device)
        r, r_ref = _leaves(torch.randn(rows, hidden), device)
        w, w_ref = _leaves(1 + 0.1 * torch.randn(hidden), device)
        dy, dh = torch.randn(rows, hidden, dtype=bf16), torch.randn(rows, hidden)
        y, h = llmkern.ops.rms_norm(x, w, residual=r, backend=backend, out_dtype=bf16)
        y_ref, h_ref = reference.rms_norm(x_ref, w_ref, residual=r_ref)
        torch.autograd.backward((y, h), (dy.to(device), dh.to(device)))
        torch.autograd.backward((y_ref, h_ref), (dy.double(), dh.double()))
        name = f"rms_norm {rows}x{hidden} bf16 x and y beside an fp32 stream"
        _check(name + " y", y, y_ref, bf16)
        _check(name + " h", h, h_ref, torch.float32)
        for label, a, b in (("dx", x, x_ref), ("dweight", w, w_ref), ("dresidual", r, r_ref)):
            _check(f"{name} {label}", a.grad, b.grad, bf16)


def layer_norm(backend: str, device: torch.device) -> None:
    # (x's, the stream's and y's dtypes): one dtype, and autocast's bf16 branch and output beside fp32
    bf16, fp32 = torch.bfloat16, torch.float32
    for x_dtype, stream_dtype, out_dtype in ((fp32, fp32, fp32), (bf16, bf16, bf16), (bf16, fp32, bf16)):
        for rows, hidden, with_bias in ((3, 17, True), (5, 4096, True), (2, 8192, False), (2, 20000, True)):
            x, x_ref = _leaves(torch.randn(rows, hidden).to(x_dtype), device)
            r, r_ref = _leaves(torch.randn(rows, hidden).to(stream_dtype) + 2, device)
            w, w_ref = _leaves((1 + 0.1 * torch.randn(hidden)).to(stream_dtype), device)
            b, b_ref = _leaves(0.1 * torch.randn(hidden).to(stream_dtype), device) if with_bias else (None, None)
            dy, dh = torch.randn(rows, hidden).to(out_dtype), torch.randn(rows, hidden).to(stream_dtype)
            y, h = llmkern.ops.layer_norm(x, w, b, residual=r, backend=backend, out_dtype=out_dtype)
            y_ref, h_ref = reference.layer_norm(x_ref, w_ref, b_ref, residual=r_ref)
            torch.autograd.backward((y, h), (dy.to(device), dh.to(device)))
            torch.autograd.backward((y_ref, h_ref), (dy.double(), dh.double()))
            name = f"layer_norm {rows}x{hidden} x {x_dtype} stream {stream_dtype} bias={with_bias}"
            lowest = bf16 if bf16 in (x_dtype, out_dtype) else stream_dtype  # what the gradients went through
            _check(name + " y", y, y_ref, out_dtype)
            _check(name + " h", h, h_ref, stream_dtype)
            leaves = [("dx", x, x_ref), ("dweight", w, w_ref), ("dresidual", r, r_ref)]
            for label, a, c in leaves + ([("dbias", b, b_ref)] if with_bias else []):
                _check(f"{name} {label}", a.grad, c.grad, lowest)


def attention(backend: str, device: torch.device) -> None:
    cases = [  # (B, Hq, Hkv, Sq, Sk, D, causal, documents, CUDA forward rows per block, sliding window)
        (1, 2, 2, 130, 130, 64, True, False, 64, None),
        (2, 4, 2, 17, 17, 128, False, False, 64, None),
        (1, 4, 1, 100, 73, 128, True, False, 64, None),  # Sq > Sk: the first rows see no key
        (1, 2, 1, 77, 77, 32, True, True, 64, None),
        (1, 2, 2, 65, 65, 96, False, True, 64, None),
        (1, 2, 1, 200, 200, 128, True, False, 128, None),  # the 8-warp forward: a whole block and a partial one
        (1, 2, 2, 150, 150, 64, False, True, 128, None),
        # Windows: the kernels start each query block's keys (and end each key block's queries) at its edge
        (1, 2, 1, 150, 150, 64, True, False, 64, 37),
        (1, 4, 2, 70, 190, 128, True, False, 64, 50),  # Sq < Sk
        (1, 2, 1, 190, 70, 32, True, False, 64, 1),  # Sq > Sk: rows that see no key; a window of one key
        (1, 2, 2, 200, 200, 96, True, True, 128, 65),  # with documents and the 8-warp forward
    ]
    for dtype in (torch.float16, torch.bfloat16):
        for b, hq, hkv, sq, sk, d, causal, documents, rows, window in cases:
            os.environ[cuda_attention.FORWARD_ROWS_ENV] = str(rows)
            q, q_ref = _leaves(torch.randn(b, hq, sq, d, dtype=dtype), device)
            k, k_ref = _leaves(torch.randn(b, hkv, sk, d, dtype=dtype), device)
            v, v_ref = _leaves(torch.randn(b, hkv, sk, d, dtype=dtype), device)
            do = torch.randn(b, hq, sq, d, dtype=dtype)
            doc_ids = None
            if documents:  # three documents of uneven lengths
                doc_ids = (torch.arange(sq) * 3 // sq).repeat(b, 1).to(torch.int32)
            o = llmkern.ops.attention(q, k, v, causal=causal, backend=backend, window=window,
                                      doc_ids=None if doc_ids is None else doc_ids.to(device))
            o_ref = reference.attention(q_ref, k_ref, v_ref, causal=causal, doc_ids=doc_ids, window=window)
            o.backward(do.to(device))
            o_ref.backward(do.double())
            name = (f"attention B{b} H{hq}/{hkv} S{sq}x{sk} D{d} {'causal' if causal else 'full'}"
                    + (" docs" if documents else "") + (f" window{window}" if window else "") + f" rows{rows} {dtype}")
            _check(name + " o", o, o_ref, dtype)
            for label, a, r in (("dq", q, q_ref), ("dk", k, k_ref), ("dv", v, v_ref)):
                # relative to at least an rms of 1e-2: with a window of one key dq = dk = 0 (a softmax over
                # one key has no gradient), and the kernels leave a rest of the rounding's size there
                _check(f"{name} {label}", a.grad, r.grad, dtype, scale=1e-2 * r.grad.numel() ** 0.5)
    os.environ.pop(cuda_attention.FORWARD_ROWS_ENV, None)


def adamw(backend: str, device: torch.device) -> None:
    for master in (False, True):
        dtype = torch.bfloat16 if master else torch.float32
        shapes = [(1,), (3,), (1000003,), (17, 33), (257,)]
        start = [torch.randn(s).to(dtype) for s in shapes]
        ours = [torch.nn.Parameter(p.to(device, copy=True)) for p in start]
        theirs = [torch.nn.Parameter(p.double()) for p in start]
        opt = llmkern.optim.AdamW(ours, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, master_weights=master,
                                  backend=backend)
        ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            for p, q in zip(ours, theirs):
                g = torch.randn(q.shape).to(dtype)
                p.grad, q.grad = g.to(device), g.double()
            torch.nn.utils.clip_grad_norm_(theirs, 1.0)
            opt.step()
            ref.step()
        for i, (p, q, p0) in enumerate(zip(ours, theirs, start)):
            name = f"adamw{' master' if master else ''} param {i} {tuple(p.shape)}"
            if master:  # bf16 parameters: their rounding swamps three small updates
                _check(name, p, q, dtype)
            else:  # the updates themselves, which the starting values would hide; relative to at least one
                # step's size (lr a element), since three steps of random sign may nearly cancel, and then
                # a last-bit rounding of the fp32 parameter is a large part of what is left
                _check(name + " update", p.detach().cpu() - p0, q - p0.double(), dtype, scale=1e-2 * p.numel() ** 0.5)


def rope(backend: str, device: torch.device) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        b, h, s, d = 2, 3, 37, 64
        qkv = torch.randn(b, s, 3, h, d, dtype=dtype).to(device)
        x = qkv[:, :, 0].transpose(1, 2).requires_grad_(True)  # a strided view, as from a fused QKV projection
        x_ref = x.detach().cpu().double().requires_grad_(True)
        angles = torch.randn(s, d // 2)
        y = llmkern.ops.rope(x, angles.cos().to(device), angles.sin().to(device), backend=backend)
        y_ref = reference.rope(x_ref, angles.cos().double(), angles.sin().double())
        dy = torch.randn(b, h, s, d, dtype=dtype)
        y.backward(dy.to(device))
        y_ref.backward(dy.double())
        _check(f"rope {b}x{h}x{s}x{d} strided {dtype}", y, y_ref, dtype)
        _check(f"rope {b}x{h}x{s}x{d} strided {dtype} dx", x.grad, x_ref.grad, dtype)


def _gated_activation(op: str, backend: str, device: torch.device) -> None:
    """SwiGLU or GeGLU (op), one kernel source with two activations."""
    for dtype in (torch.float32, torch.bfloat16):
        for rows, hidden in ((3, 17), (7, 4100)):
            fused, fused_ref = _leaves(torch.randn(rows, 2 * hidden, dtype=dtype), device)
            # the two halves of a fused gate/up projection: views with a row stride of 2 * hidden
            y = getattr(llmkern.ops, op)(fused[:, :hidden], fused[:, hidden:], backend=backend)
            y_ref = getattr(reference, op)(fused_ref[:, :hidden], fused_ref[:, hidden:])
            dy = torch.randn(rows, hidden, dtype=dtype)
            y.backward(dy.to(device))
            y_ref.backward(dy.double())
            name = f"{op} {rows}x{hidden} {dtype}"
            _check(name, y, y_ref, dtype)
            _check(name + " dgate|dup", fused.grad, fused_ref.grad, dtype)


def swiglu(backend: str, device: torch.device) -> None:
    _gated_activation("swiglu", backend, device)


def geglu(backend: str, device: torch.device) -> None:
    _gated_activation("geglu", backend, device)


def fused_linear_cross_entropy(backend: str, device: torch.device) -> None:
    # softcap 2: small enough to bend these logits (|z| ~ 1), so the capped kernels' slope is exercised
    for dtype, softcap in ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 2.0)):
        n, hidden, vocab = 37, 64, 1003
        x, x_ref = _leaves(torch.randn(n, hidden, dtype=dtype), device)
        w, w_ref = _leaves((0.1 * torch.randn(vocab, hidden)).to(dtype), device)
        classes = vocab - 3  # and three padding rows
        target = torch.randint(0, classes, (n,))
        target[::5] = -100  # ignored rows
        loss = llmkern.ops.fused_linear_cross_entropy(x, w, target.to(device), label_smoothing=0.1,
                                                      backend=backend, chunk_rows=16, num_classes=classes,
                                                      softcap=softcap)
        loss_ref = reference.fused_linear_cross_entropy(x_ref, w_ref, target, label_smoothing=0.1,
                                                        num_classes=classes, softcap=softcap)
        loss.backward()
        loss_ref.backward()
        name = f"fused_linear_cross_entropy {n}x{hidden} V{vocab} {dtype} softcap {softcap}"
        _check(name, loss, loss_ref, dtype)
        _check(name + " dx", x.grad, x_ref.grad, dtype)
        _check(name + " dweight", w.grad, w_ref.grad, dtype)


OPS = {f.__name__: f for f in (rms_norm, layer_norm, attention, adamw, rope, swiglu, geglu,
                                fused_linear_cross_entropy)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--backend", default="cuda", choices=("cuda", "triton"))
    parser.add_argument("--device", default="cuda",
                        help="cuda; or cpu for a dry run (Triton's interpreter, or the tests' CUDA emulator)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_kernels.py needs a CUDA GPU (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    for name in args.ops:
        torch.manual_seed(0)  # each op its own draws: cases added to one op leave the others' inputs alone
        start = time.perf_counter()
        try:
            OPS[name](args.backend, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as err:  # one op's error (a launch that fails, a refused shape) must not hide the others'
            print(f"FAIL {name}: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}", flush=True)
            FAILURES.append(f"{name} raised {type(err).__name__}")
        print(f"-- {name}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"{len(FAILURES)} cases wrong" + (": " + ", ".join(FAILURES) if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    raise SystemExit(main())
