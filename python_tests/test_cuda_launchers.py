"""The host side of llmkern._cuda, checked where no GPU can run a kernel.

Two things a GPU run should not be the first to find:
- a Python launcher (llmkern/cuda/*.py) whose argument list no longer matches its pybind11
  binding, or whose sizes, strides or pointers the C++ launcher rejects: here each launcher
  runs on CPU tensors of valid shapes and must get as far as the first CUDA call, which fails
  with "no CUDA device" (pybind11 would raise TypeError for a wrong argument list, the launcher
  cudaErrorInvalidValue for rejected sizes);
- a C++ launcher that lets bad sizes reach a kernel: each must come back as
  cudaErrorInvalidValue before any CUDA call (so these run without a GPU too).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import llmkern.cuda.adamw as cuda_adamw
import llmkern.cuda.attention as cuda_attention
import llmkern.cuda.fused_linear_cross_entropy as cuda_flce
import llmkern.cuda.layer_norm as cuda_layer_norm
import llmkern.cuda.rms_norm as cuda_rms_norm
import llmkern.cuda.rope as cuda_rope
import llmkern.cuda.swiglu as cuda_swiglu
from llmkern import _backend

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="checks the host side where no GPU is present"),
    pytest.mark.skipif(_backend.cuda_module() is None, reason="llmkern._cuda is not built here"),
]

NO_DEVICE = "no CUDA device"
INVALID = "cudaErrorInvalidValue"
BF16 = 2  # DType code of bfloat16 (csrc/common/dtype.h)


# --- Python launchers against their bindings ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset-pointer"])
def test_rms_norm_launchers_reach_the_device(dtype, offset):
    rows, cols = 5, 72
    x = torch.randn(rows * cols + offset, dtype=dtype)[offset:].view(rows, cols)
    w, r = torch.ones(cols, dtype=torch.float32), torch.randn(rows, cols, dtype=dtype)
    y, h = torch.empty_like(r), torch.empty_like(r)
    for residual, out_h in ((None, None), (r, h)):
        with pytest.raises(RuntimeError, match=NO_DEVICE):
            cuda_rms_norm.forward(x, w, residual, 1e-6, y, out_h)
    for extra in (None, r):
        with pytest.raises(RuntimeError, match=NO_DEVICE):
            cuda_rms_norm.backward(r, x, w, extra, 1e-6, y, torch.empty_like(w))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_rms_norm_launchers_take_autocast_dtypes(half):
    """A 16-bit x and y (and dy) beside an fp32 stream and weight, as under autocast."""
    rows, cols = 5, 72
    x, y, dy = (torch.randn(rows, cols, dtype=half) for _ in range(3))
    r, h, dh, w = torch.randn(rows, cols), torch.empty(rows, cols), torch.empty(rows, cols), torch.ones(cols)
    for source, residual, out_h in ((r, None, None), (x, r, h)):  # fp32 x -> 16-bit y; 16-bit x + fp32 stream
        with pytest.raises(RuntimeError, match=NO_DEVICE):
            cuda_rms_norm.forward(source, w, residual, 1e-6, y, out_h)
    with pytest.raises(RuntimeError, match=NO_DEVICE):
        cuda_rms_norm.backward(dy, h, w, r, 1e-6, dh, torch.empty_like(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_launchers_reach_the_device(dtype):
    rows, cols = 5, 72
    x, r = torch.randn(rows, cols, dtype=dtype), torch.randn(rows, cols, dtype=dtype)
    w, b = torch.ones(cols), torch.zeros(cols)
    y, h = torch.empty_like(r), torch.empty_like(r)
    for bias in (None, b):
        for residual, out_h in ((None, None), (r, h)):
            with pytest.raises(RuntimeError, match=NO_DEVICE):
                cuda_layer_norm.forward(x, w, bias, residual, 1e-5, y, out_h)
        for extra in (None, r):
            with pytest.raises(RuntimeError, match=NO_DEVICE):
                cuda_layer_norm.backward(r, x, w, extra, 1e-5, y, torch.empty_like(w),
                                         None if bias is None else torch.empty_like(b))


def test_layer_norm_refuses_bad_sizes():
    mod = _backend.cuda_module()
    with pytest.raises(RuntimeError, match=f"layer_norm_forward.*{INVALID}"):  # a residual without h
        mod.layer_norm_forward(FAKE, FAKE, FAKE, FAKE, FAKE, 0, 4, 8, 8, 8, 8, 8, 1e-5, BF16, BF16, BF16, BF16, 0)
    with pytest.raises(RuntimeError, match=f"layer_norm_backward.*{INVALID}"):  # no dweight
        mod.layer_norm_backward(FAKE, FAKE, FAKE, 0, FAKE, 0, FAKE, FAKE, 1 << 20, 4, 8, 8, 8, 0, 8, 1e-5,
                                BF16, BF16, BF16, 0)
    assert mod.layer_norm_backward_workspace(4, 8, True) == 0  # no device to size it for


def _qkv(batch=2, q_heads=4, kv_heads=2, seq=24, head_dim=64):
    q = torch.randn(batch, q_heads, seq, head_dim, dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, seq, head_dim, dtype=torch.bfloat16)
    v = torch.randn(batch, kv_heads, seq, head_dim, dtype=torch.bfloat16)
    return q, k, v


@pytest.mark.parametrize("layout", ["contiguous", "fused-qkv-views", "offset-pointer", "odd-stride-of-size-1-dim"])
@pytest.mark.parametrize("with_docs", [False, True])
def test_attention_launchers_reach_the_device(layout, with_docs):
    q, k, v = _qkv()
    if layout == "fused-qkv-views":  # (B, S, H, D) projections seen as (B, H, S, D): no copy needed
        qkv = torch.randn(2, 24, 4 + 2 + 2, 64, dtype=torch.bfloat16)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([4, 2, 2], dim=2))
    elif layout == "offset-pointer":  # 2 bytes off 16-byte alignment: the launcher must copy it
        storage = torch.empty(q.numel() + 1, dtype=q.dtype)
        q = storage[1:].view(q.shape).copy_(q)
    elif layout == "odd-stride-of-size-1-dim":  # "contiguous" to torch, yet batch stride 1
        k = k[:1].clone().as_strided((1, *k.shape[1:]), (1, *k.stride()[1:]))
        q, v = q[:1], v[:1]
    doc_ids = torch.zeros(q.size(0), 24, dtype=torch.int32) if with_docs else None
    o, lse = torch.empty(q.shape, dtype=q.dtype), torch.empty(q.shape[:3], dtype=torch.float32)
    with pytest.raises(RuntimeError, match=NO_DEVICE):
        cuda_attention.forward(q, k, v, doc_ids, True, 0, 0.125, o, lse)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v))
    with pytest.raises(RuntimeError, match=NO_DEVICE):
        cuda_attention.backward(torch.randn_like(o), q, k, v, o, lse, doc_ids, True, 0, 0.125, dq, dk, dv)


def test_adamw_launchers_reach_the_device():
    params = [torch.randn(n) for n in (1, 4097)] + [torch.randn(9, dtype=torch.bfloat16)]
    grads = [torch.randn_like(p) for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.ones(()) for _ in params]
    masters = [None, None, params[2].float()]
    hyper = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, cache={})
    for lr, clip_state in ((1e-3, None), (torch.tensor(1e-3), torch.ones(2))):
        with pytest.raises(RuntimeError, match=NO_DEVICE):
            cuda_adamw.step(params, grads, exp_avgs, exp_avg_sqs, steps, masters, lr=lr, clip_state=clip_state,
                            **hyper)
    # With the partials' capacity cached, the norm goes straight to the sum-of-squares launch.
    cache = {"counts": (2, 1), "device": torch.device("cpu"), "capacity": 64}
    with pytest.raises(RuntimeError, match=NO_DEVICE):
        cuda_adamw.grad_norm(grads, 1.0, torch.empty(()), torch.ones(2), torch.zeros((), dtype=torch.int64), cache)
    # Without it, the device query that sizes them fails first, with a clear message.
    with pytest.raises(RuntimeError, match="could not query the current CUDA device"):
        cuda_adamw.grad_norm(grads, 1.0, torch.empty(()), torch.ones(2), torch.zeros((), dtype=torch.int64), {})


def test_adamw_grad_norm_makes_new_partials_on_another_device(monkeypatch):
    """The cached partials and their capacity belong to the device they were made on: once the
    parameters move, the sum-of-squares kernels must write partials on the new device (the old ones
    would be another GPU's memory, an illegal address) sized for its SM count."""
    calls = []

    class FakeModule:  # records what the launcher passes; 8 partials per tensor "on this device"
        def adamw_grad_sumsq_workspace(self, count):
            return 8 * count

        def adamw_grad_sumsq(self, grads, numels, dtype, partials, capacity, stream):
            calls.append(("sumsq", partials, capacity))
            return 1

        def adamw_grad_norm_finalize(self, partials, count, max_norm, grad_norm, clip_state, skipped, stream):
            calls.append(("finalize", partials, count))

    monkeypatch.setattr(_backend, "cuda_module", lambda: FakeModule())
    grads = [torch.randn(3), torch.randn(5)]
    # What a first step on another device left: the same tensor count, its capacity, its partials.
    cache = {"counts": (2,), "capacity": 64, "partials": torch.empty(64, device="meta")}
    cuda_adamw.grad_norm(grads, 1.0, torch.empty(()), torch.ones(2), torch.zeros((), dtype=torch.int64), cache)
    partials = cache["partials"]
    assert partials.device == grads[0].device and partials.numel() >= 16
    assert calls == [("sumsq", partials.data_ptr(), 16), ("finalize", partials.data_ptr(), 1)]
    # A second step on the same device reuses them.
    calls.clear()
    cuda_adamw.grad_norm(grads, 1.0, torch.empty(()), torch.ones(2), torch.zeros((), dtype=torch.int64), cache)
    assert cache["partials"] is partials and calls[0] == ("sumsq", partials.data_ptr(), 16)


# --- C++ launchers refuse what no kernel can take ------------------------------------------------

FAKE = 1 << 20  # a 16-byte aligned address that the launchers must never touch


FP32, FP16 = 0, 1


@pytest.mark.parametrize(
    "change",
    [dict(cols=0), dict(rows=-1), dict(x=0), dict(h=0), dict(dtype=7), dict(dtype=FP16, weight_dtype=BF16),
     dict(x_dtype=FP16), dict(y_dtype=FP16), dict(dtype=FP32, weight_dtype=FP32, residual=0, h=0, x_dtype=BF16)],
    ids=["no-columns", "negative-rows", "null-x", "residual-without-h", "unknown-dtype", "mixed-half-dtypes",
         "half-x-beside-a-bf16-stream", "half-y-beside-a-bf16-stream", "x-not-the-stream-without-a-residual"],
)
def test_rms_norm_forward_refuses_bad_sizes(change):
    a = dict(x=FAKE, residual=FAKE, weight=FAKE, y=FAKE, h=FAKE, rows=4, cols=8, x_dtype=None, dtype=BF16,
             y_dtype=None, weight_dtype=BF16)
    a.update(change)
    with pytest.raises(RuntimeError, match=f"rms_norm_forward.*{INVALID}"):
        _backend.cuda_module().rms_norm_forward(
            a["x"], a["residual"], a["weight"], a["y"], a["h"], a["rows"], a["cols"], 8, 8, 8, 8, 1e-6,
            a["dtype"] if a["x_dtype"] is None else a["x_dtype"], a["dtype"],
            a["dtype"] if a["y_dtype"] is None else a["y_dtype"], a["weight_dtype"], 0,
        )


@pytest.mark.parametrize(
    "change", [dict(rows=0), dict(dweight=0), dict(dh=0), dict(dy_dtype=FP32), dict(dtype=FP16, weight_dtype=FP16)],
    ids=["no-rows", "null-dweight", "null-dh", "fp32-dy-beside-a-bf16-h", "bf16-dy-beside-a-half-h"],
)
def test_rms_norm_backward_refuses_bad_sizes(change):
    a = dict(rows=4, dweight=FAKE, dh=FAKE, dy_dtype=BF16, dtype=BF16, weight_dtype=BF16)
    a.update(change)
    with pytest.raises(RuntimeError, match=f"rms_norm_backward.*{INVALID}"):
        _backend.cuda_module().rms_norm_backward(
            FAKE, FAKE, FAKE, 0, a["dh"], a["dweight"], FAKE, 1 << 20, a["rows"], 8, 8, 8, 0, 8, 1e-6,
            a["dy_dtype"], a["dtype"], a["weight_dtype"], 0,
        )


def test_rms_norm_workspace_query_is_zero_without_a_device():
    assert _backend.cuda_module().rms_norm_backward_workspace(4, 8) == 0


@pytest.mark.parametrize(
    "change",
    [dict(batch=65536), dict(q_heads=65536, kv_heads=1), dict(seq_k=16, doc=FAKE), dict(scale=0.0),
     dict(seq_q=0), dict(kv_heads=0), dict(rows=96)],
    ids=["batch-over-grid-z", "heads-over-grid-y", "docs-need-equal-lengths", "zero-scale", "no-queries",
         "no-kv-heads", "block-rows-not-64-or-128"],
)
def test_attention_launchers_refuse_bad_sizes(change):
    a = dict(batch=1, q_heads=4, kv_heads=2, seq_q=8, seq_k=8, doc=0, scale=0.125)
    a.update(change)
    st = (4 * 8 * 64, 8 * 64, 64)
    mod = _backend.cuda_module()
    sizes = (a["batch"], a["q_heads"], a["kv_heads"], a["seq_q"], a["seq_k"], 64)
    with pytest.raises(RuntimeError, match=f"attention_forward.*{INVALID}"):
        mod.attention_forward(FAKE, FAKE, FAKE, a["doc"], FAKE, FAKE, *sizes, st, st, st, st, a["scale"], True, 0,
                              BF16, a.get("rows", 64), 0)
    if "rows" in change:
        return  # the forward's own setting; the backward has none
    with pytest.raises(RuntimeError, match=f"attention_backward.*{INVALID}"):
        mod.attention_backward(FAKE, FAKE, FAKE, FAKE, FAKE, FAKE, a["doc"], FAKE, FAKE, FAKE, FAKE, *sizes,
                               st, st, st, st, st, st, st, st, a["scale"], True, 0, BF16, 0)


@pytest.mark.parametrize("bad", ["dk-misaligned", "dv-stride", "delta-null"])
def test_attention_backward_checks_its_outputs(bad):
    st, odd = (4 * 8 * 64, 8 * 64, 64), (4 * 8 * 64, 8 * 64, 68)
    dk = FAKE + 4 if bad == "dk-misaligned" else FAKE
    dv_stride = odd if bad == "dv-stride" else st
    delta = 0 if bad == "delta-null" else FAKE
    with pytest.raises(RuntimeError, match=f"attention_backward.*{INVALID}"):
        _backend.cuda_module().attention_backward(
            FAKE, FAKE, FAKE, FAKE, FAKE, FAKE, 0, FAKE, dk, FAKE, delta, 1, 4, 2, 8, 8, 64,
            st, st, st, st, st, st, st, dv_stride, 0.125, False, 0, BF16, 0,
        )


def test_adamw_launcher_refuses_master_weights_for_fp32_params():
    args = dict(param_dtype=0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, lr_device=0,
                clip_state=0, stream=0)
    with pytest.raises(RuntimeError, match=f"adamw_step.*{INVALID}"):
        _backend.cuda_module().adamw_step([FAKE], [FAKE], [FAKE], [FAKE], masters=[FAKE], steps=[FAKE], numels=[4],
                                          **args)
    with pytest.raises(ValueError, match="one entry per tensor"):
        _backend.cuda_module().adamw_step([FAKE], [FAKE], [FAKE], [FAKE], masters=[FAKE, FAKE], steps=[FAKE],
                                          numels=[4], **args)
    with pytest.raises(RuntimeError, match=f"adamw_grad_norm_finalize.*{INVALID}"):
        _backend.cuda_module().adamw_grad_norm_finalize(FAKE, 4, 1.0, 0, FAKE, FAKE, 0)


# --- RoPE and SwiGLU -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "fused-qk-view", "offset-pointer", "odd-head-dim", "per-row"])
def test_rope_launcher_reaches_the_device(dtype, layout):
    b, h, s, d = 2, 3, 5, 64
    x = torch.randn(b, h, s, d, dtype=dtype)
    cos = sin = torch.randn(s, d // 2)
    if layout == "fused-qk-view":  # q's and k's heads of a fused (B, S, H + 2 Hkv, D) projection
        x = torch.randn(b, s, h + 2, d, dtype=dtype)[:, :, :h].transpose(1, 2)
    elif layout == "offset-pointer":  # off 16-byte alignment: the scalar kernel
        x = torch.randn(x.numel() + 1, dtype=dtype)[1:].view(b, h, s, d)
    elif layout == "odd-head-dim":
        x, cos, sin = torch.randn(b, h, s, 6, dtype=dtype), torch.randn(s, 3), torch.randn(s, 3)
    elif layout == "per-row":
        cos = sin = torch.randn(b, s, d // 2)
    y = torch.empty(x.shape, dtype=dtype)
    for inverse in (False, True):
        with pytest.raises(RuntimeError, match=NO_DEVICE):
            cuda_rope.forward(x, cos, sin, y, inverse)


def test_rope_launcher_refuses_float64_tables():
    x = torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match="float32 cos"):
        cuda_rope.forward(x, torch.ones(3, 4, dtype=torch.float64), torch.ones(3, 4), torch.empty_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "fused-halves", "offset-pointer", "odd-cols", "one-row"])
def test_swiglu_launchers_reach_the_device(dtype, layout):
    rows, cols = 4, 96
    gate, up = torch.randn(rows, cols, dtype=dtype), torch.randn(rows, cols, dtype=dtype)
    if layout == "fused-halves":  # row stride 2 * cols
        gate, up = torch.randn(rows, 2 * cols, dtype=dtype).split(cols, dim=-1)
    elif layout == "offset-pointer":
        gate = torch.randn(rows * cols + 1, dtype=dtype)[1:].view(rows, cols)
    elif layout == "odd-cols":
        gate, up = torch.randn(rows, 17, dtype=dtype), torch.randn(rows, 17, dtype=dtype)
    elif layout == "one-row":  # an arbitrary stride on a size-1 dim
        gate = torch.randn(1, cols, dtype=dtype).as_strided((1, cols), (3, 1))
        up = torch.randn(1, cols, dtype=dtype)
    y, dgate, dup = (torch.empty(gate.shape, dtype=dtype) for _ in range(3))
    with pytest.raises(RuntimeError, match=NO_DEVICE):
        cuda_swiglu.forward(gate, up, y)
    with pytest.raises(RuntimeError, match=NO_DEVICE):
        cuda_swiglu.backward(torch.randn(gate.shape, dtype=dtype), gate, up, dgate, dup)


def _rope_args(**change):
    """rope_forward's arguments for a valid (1, 4, 8, 64) bf16 rotation, with `change` applied."""
    a = dict(x=FAKE, cos=FAKE, sin=FAKE, y=FAKE, batch=1, heads=4, seq=8, head_dim=64, dtype=BF16)
    a.update(change)
    st, table = (4 * 8 * 64, 8 * 64, 64), (0, 32)
    return (a["x"], a["cos"], a["sin"], a["y"], a["batch"], a["heads"], a["seq"], a["head_dim"], st, st, table,
            table, False, a["dtype"], 0)


@pytest.mark.parametrize(
    "change",
    [dict(head_dim=63), dict(head_dim=0), dict(batch=-1), dict(seq=-2), dict(x=0), dict(y=0), dict(cos=0),
     dict(sin=0), dict(dtype=7)],
    ids=["odd-head-dim", "no-head-dim", "negative-batch", "negative-seq", "null-x", "null-y", "null-cos",
         "null-sin", "unknown-dtype"],
)
def test_rope_launcher_refuses_bad_sizes(change):
    with pytest.raises(RuntimeError, match=f"rope_forward.*{INVALID}"):
        _backend.cuda_module().rope_forward(*_rope_args(**change))


@pytest.mark.parametrize("empty", ["batch", "heads", "seq"])
def test_rope_launcher_does_nothing_for_empty_tensors(empty):
    """Nothing to rotate: no CUDA call at all (so no 'no CUDA device' error), null pointers fine."""
    _backend.cuda_module().rope_forward(*_rope_args(x=0, y=0, cos=0, sin=0, **{empty: 0}))


@pytest.mark.parametrize(
    "change",
    [dict(cols=0), dict(rows=-1), dict(a=0), dict(b=0), dict(out=0), dict(dtype=7)],
    ids=["no-columns", "negative-rows", "null-first-input", "null-second-input", "null-output", "unknown-dtype"],
)
def test_swiglu_launchers_refuse_bad_sizes(change):
    a = dict(rows=4, cols=8, a=FAKE, b=FAKE, out=FAKE, dtype=BF16)
    a.update(change)
    mod = _backend.cuda_module()
    with pytest.raises(RuntimeError, match=f"swiglu_forward.*{INVALID}"):
        mod.swiglu_forward(a["a"], a["b"], a["out"], a["rows"], a["cols"], 16, 16, 8, a["dtype"], 0)
    with pytest.raises(RuntimeError, match=f"swiglu_backward.*{INVALID}"):
        mod.swiglu_backward(FAKE, a["a"], a["b"], a["out"], FAKE, a["rows"], a["cols"], 8, 16, 16, 8, 8, a["dtype"], 0)
    with pytest.raises(RuntimeError, match=f"swiglu_backward.*{INVALID}"):
        mod.swiglu_backward(FAKE, a["a"], a["b"], FAKE, a["out"], a["rows"], a["cols"], 8, 16, 16, 8, 8, a["dtype"], 0)


def test_swiglu_launchers_do_nothing_for_no_rows():
    mod = _backend.cuda_module()
    mod.swiglu_forward(0, 0, 0, 0, 8, 8, 8, 8, BF16, 0)
    mod.swiglu_backward(0, 0, 0, 0, 0, 0, 8, 8, 8, 8, 8, 8, BF16, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_rows_launcher_reaches_the_device(dtype):
    logits = torch.randn(3, 70).to(dtype)[:, :65]  # a padded row stride, as the chunk loop has
    with pytest.raises(RuntimeError, match=f"fused_linear_cross_entropy_rows.*{NO_DEVICE}"):
        cuda_flce.cross_entropy_rows(logits, torch.tensor([1, -100, 64], dtype=torch.int32), torch.empty(3),
                                     torch.ones(1), -100, 0.1, True)


@pytest.mark.parametrize(
    "change",
    [dict(n_classes=0), dict(stride=4), dict(rows=-1), dict(logits=0), dict(target=0), dict(loss=0),
     dict(scale=0), dict(smoothing=1.5), dict(smoothing=float("nan")), dict(softcap=-1.0),
     dict(softcap=float("inf")), dict(softcap=float("nan")), dict(dtype=7)],
    ids=["no-classes", "stride-below-classes", "negative-rows", "null-logits", "null-target", "null-loss",
         "null-scale", "smoothing-over-1", "smoothing-nan", "negative-softcap", "infinite-softcap", "softcap-nan",
         "unknown-dtype"],
)
def test_cross_entropy_rows_launcher_refuses_bad_sizes(change):
    a = dict(rows=4, n_classes=8, stride=8, logits=FAKE, target=FAKE, loss=FAKE, scale=FAKE, smoothing=0.0,
             softcap=0.0, dtype=BF16)
    a.update(change)
    with pytest.raises(RuntimeError, match=f"fused_linear_cross_entropy_rows.*{INVALID}"):
        _backend.cuda_module().fused_linear_cross_entropy_rows(
            a["logits"], a["target"], a["loss"], a["scale"], a["rows"], a["n_classes"], a["stride"], -100,
            a["smoothing"], a["softcap"], True, a["dtype"], 0)


def test_cross_entropy_rows_launcher_does_nothing_for_no_rows():
    _backend.cuda_module().fused_linear_cross_entropy_rows(0, 0, 0, 0, 0, 8, 8, -100, 0.0, 0.0, True, BF16, 0)


# --- the 16-byte paths really compile to 16-byte accesses --------------------------------------

NVCC = shutil.which("nvcc")
CSRC = Path(__file__).resolve().parent.parent / "csrc"


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("source", ["rope.cu", "gated_activation.cu"])
def test_vector_kernels_compile_to_16_byte_accesses(source, tmp_path):
    """nvcc may split a 16-byte store into 2- and 4-byte ones when it cannot follow the address
    (it did for rope's first version): in every kernel instantiated with G = 4 or 8 elements per
    pack, each global load and store of the PTX must be a v4 one."""
    ptx = tmp_path / "out.ptx"
    subprocess.run([NVCC, "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{CSRC}", "-arch=sm_90", "-ptx",
                    str(CSRC / "cuda" / source), "-o", str(ptx)], check=True, capture_output=True)
    kernels = re.findall(r"\.entry (\w+)\((.*?)\n\}", ptx.read_text(), re.S)
    vector = [(name, body) for name, body in kernels if re.search(r"Li[48]E", name)]
    assert len(vector) == len(kernels) // 2 > 0, [name for name, _ in kernels]
    for name, body in vector:
        accesses = re.findall(r"\b(?:ld|st)\.global[.\w]*", body)
        assert accesses and all(".v4." in a for a in accesses), f"{name}: {sorted(set(accesses))}"


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_norm_register_kernels_move_whole_16_byte_packs(tmp_path, op):
    """The norms' `regs` kernels with 4 or 8 elements per pack: every load and every store of x, y, h,
    dy, dh, the weight and the bias is one v4 access (nvcc once split the 4-pack kernels' stores, see
    vec.cuh); only the backward's fp32 partials of dweight (and dbias) are written a float at a time."""
    ptx = tmp_path / "out.ptx"
    subprocess.run([NVCC, "-std=c++17", "-O3", f"-I{CSRC}", "-arch=sm_90", "-ptx",
                    str(CSRC / "cuda" / f"{op}.cu"), "-o", str(ptx)], check=True, capture_output=True)
    kernels = re.findall(r"\.entry (\w+)\((.*?)\n\}", ptx.read_text(), re.S)
    vector = [(name, body) for name, body in kernels if "_regs" in name and re.search(r"Li[48]ELi[124]E", name)]
    # For each dtype combination, K = 1, 2, 4 (LayerNorm's backward: 1, 2): forward, 16-bit streams with
    # their own or an fp32 weight (4) and an fp32 stream with x and y of any float type (9); backward,
    # 4 and an fp32 h with any dy (3)
    backward_ks = 3 if op == "rms_norm" else 2
    assert len(vector) == (4 + 9) * 3 + (4 + 3) * backward_ks, [name for name, _ in kernels]
    for name, body in vector:
        g, k = map(int, re.search(r"Li([48])ELi([124])E", name).groups())
        loads = re.findall(r"\bld\.global[.\w]*", body)
        stores = re.findall(r"\bst\.global[.\w]*", body)
        assert loads and all(".v4." in a for a in loads), f"{name}: {sorted(set(loads))}"
        narrow = [s for s in stores if ".v4." not in s]
        # one st.global.f32 per dweight element of a thread, and for LayerNorm per dbias element, where
        # nvcc may copy the dweight stores into both branches of has_bias
        allowed = {0}
        if "backward" in name:
            allowed = {k * g} if op == "rms_norm" else {2 * k * g, 3 * k * g}
        assert len(stores) > len(narrow) and set(narrow) <= {"st.global.f32"} and len(narrow) in allowed, \
            f"{name}: {len(narrow)} narrow stores {sorted(set(stores))}"
