"""Soft-capped attention (llmkern.ops.attention(..., softcap=c)): each scaled score s -> c * tanh(s / c), then the masks.

The Triton kernels (in Triton's interpreter here: fp32 and fp16, its bf16 dot is wrong) are checked, output and
every gradient, against llmkern.ops.reference.attention in float64, across causal or not, sliding windows, document
masks, GQA, Sq != Sk both ways and odd lengths, with caps small enough to bend most scores (q and k scaled up, so the
scaled scores reach several times the cap) and a large one (50, Gemma 2's). A result passes when its error is at
most 2x (plus a small atol) that of the same capped attention computed by plain PyTorch in the inputs' dtype
(python_tests/numerics.py). Then: the custom op's opcheck, the refusals (bad caps, the cuda backend, which has no
cap), the choice of "auto", and CausalSelfAttention's capped attention on the triton backend.
"""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from numerics import assert_close_to_ref

from llmkern import _backend
from llmkern.nn import attention as nn_attention
from llmkern.ops import attention, reference

CPU = torch.device("cpu")
interp = pytest.mark.skipif(
    not _backend.can_run("triton", "attention", CPU), reason="Triton interpreter not enabled (TRITON_INTERPRET=1)"
)


def ops_attention():
    return importlib.import_module("llmkern.ops.attention")


def visible_pairs(sq: int, sk: int, causal: bool, window: int | None, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """(B or 1, 1, Sq, Sk) bool: query i (at position i + Sk - Sq) sees key j."""
    distance = (torch.arange(sq)[:, None] + (sk - sq)) - torch.arange(sk)[None, :]  # how far back key j lies
    mask = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        mask = distance >= 0
        if window is not None:
            mask = mask & (distance < window)
    mask = mask[None, None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    return mask


def capped_attention_in_dtype(q, k, v, causal, scale, window, doc_ids, softcap):
    """The capped attention by plain PyTorch in the inputs' own dtype (PyTorch's low-precision computation of
    it, the error the kernels are held to): a query that sees no key gets 0."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-2, -1) * scale
    scores = torch.tanh(scores / softcap) * softcap
    mask = visible_pairs(q.size(2), k.size(2), causal, window, None if doc_ids is None else doc_ids.cpu())
    mask = mask.to(q.device)
    sees_a_key = mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~(mask | ~sees_a_key), float("-inf"))  # an empty row: finite softmax, zeroed below
    return (scores.softmax(dim=-1) * sees_a_key) @ v


def random_qkv(b, hq, hkv, sq, sk, d, dtype, spread, device="cpu"):
    """Fresh q, k, v; q and k times `spread`, so that the scaled scores' spread is about spread**2."""
    q = torch.randn(b, hq, sq, d, device=device) * spread
    k = torch.randn(b, hkv, sk, d, device=device) * spread
    v = torch.randn(b, hkv, sk, d, device=device)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def packed_doc_ids(b: int, s: int) -> torch.Tensor:
    """Documents of random lengths (some of one token), ids increasing along each row."""
    starts = torch.rand(b, s) < 0.15
    starts[:, 0] = True
    return starts.cumsum(dim=1) - 1


def check_capped_against_reference(b, hq, hkv, sq, sk, d, dtype, causal, softcap, window=None, docs=False,
                                   scale=None, spread=2.0, device="cpu"):
    """o, dq, dk, dv of the triton backend with softcap vs the float64 reference, within 2x PyTorch's own error
    in dtype. The scores must reach past the cap, or the cap would not be tested."""
    q, k, v = random_qkv(b, hq, hkv, sq, sk, d, dtype, spread, device)
    doc_ids = packed_doc_ids(b, sq).to(device) if docs else None
    o = attention(q, k, v, causal=causal, scale=scale, backend="triton", doc_ids=doc_ids, window=window,
                  softcap=softcap)
    assert o.shape == (b, hq, sq, d) and o.dtype == dtype
    do = torch.randn(o.shape, dtype=dtype)
    grads = torch.autograd.grad(o, (q, k, v), do)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, causal=causal, scale=scale, doc_ids=doc_ids, window=window,
                              softcap=softcap)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())

    scale = d**-0.5 if scale is None else scale
    raw = (q64 @ k64.repeat_interleave(hq // hkv, dim=1).transpose(-2, -1) * scale).abs().max().item()
    assert raw > 1.5 * softcap or softcap >= 50, f"scores up to {raw:.2f} barely meet the cap {softcap}"

    lowp = capped_attention_in_dtype(q, k, v, causal, scale, window, doc_ids, softcap)
    lowp_grads = torch.autograd.grad(lowp, (q, k, v), do)
    assert_close_to_ref(o, ref, lowp, "o")
    for name, got, want, theirs in zip(("dq", "dk", "dv"), grads, ref_grads, lowp_grads):
        assert got.shape == want.shape and got.dtype == dtype
        assert_close_to_ref(got, want, theirs, name)


# (B, Hq, Hkv, Sq, Sk, D, causal, softcap, window, docs): odd lengths across several 16-row interpreter tiles.
CASES = [
    pytest.param(1, 4, 2, 37, 37, 32, True, 2.0, None, False, id="causal-gqa"),
    pytest.param(2, 3, 1, 21, 45, 32, False, 1.0, None, False, id="not-causal-mqa-short-queries"),
    pytest.param(1, 2, 2, 19, 40, 32, True, 3.0, None, False, id="causal-short-queries"),
    pytest.param(1, 4, 2, 29, 13, 32, True, 5.0, None, False, id="causal-queries-that-see-no-key"),
    pytest.param(1, 4, 1, 40, 40, 32, True, 2.0, 7, False, id="window"),
    pytest.param(2, 2, 1, 33, 33, 32, True, 1.5, None, True, id="docs-causal"),
    pytest.param(1, 2, 2, 33, 33, 32, False, 4.0, None, True, id="docs-not-causal"),
    pytest.param(1, 2, 1, 35, 35, 32, True, 2.0, 9, True, id="window-docs"),
    pytest.param(1, 2, 1, 23, 23, 64, True, 50.0, None, False, id="large-cap"),
]


@interp
@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,causal,softcap,window,docs", CASES)
def test_triton_capped_matches_reference_fp32(b, hq, hkv, sq, sk, d, causal, softcap, window, docs):
    spread = 4.0 if softcap >= 50 else 2.0  # Gemma 2's cap of 50 bends only scores of tens
    check_capped_against_reference(b, hq, hkv, sq, sk, d, torch.float32, causal, softcap, window, docs,
                                   spread=spread)


@interp
@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,causal,softcap,window,docs", [
    CASES[0], CASES[1], CASES[4], CASES[7],
])
def test_triton_capped_matches_reference_fp16(b, hq, hkv, sq, sk, d, causal, softcap, window, docs):
    check_capped_against_reference(b, hq, hkv, sq, sk, d, torch.float16, causal, softcap, window, docs)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,causal,softcap,window,docs", [
    pytest.param(2, 8, 2, 1000, 1000, 128, True, 50.0, None, False, id="gemma2-cap-d128"),
    pytest.param(1, 8, 4, 777, 777, 64, True, 5.0, 300, False, id="window-d64"),
    pytest.param(2, 4, 4, 513, 513, 128, True, 3.0, None, True, id="docs-d128"),
    pytest.param(1, 4, 2, 300, 1100, 64, False, 2.0, None, False, id="not-causal-short-queries"),
])
def test_triton_capped_matches_reference_on_a_gpu(b, hq, hkv, sq, sk, d, causal, softcap, window, docs, dtype):
    """The compiled kernels (bf16 is only checkable here: the interpreter's bf16 dot is wrong), longer rows."""
    if not _backend.can_run("triton", "attention", torch.device("cuda")):
        pytest.skip("Triton cannot run attention on this GPU")
    spread = 4.0 if softcap >= 50 else 2.0
    check_capped_against_reference(b, hq, hkv, sq, sk, d, dtype, causal, softcap, window, docs, spread=spread,
                                   device="cuda")


@interp
@pytest.mark.parametrize("causal,window,docs", [(True, None, False), (True, 6, True)])
def test_triton_capped_dq_by_atomics(causal, window, docs, monkeypatch):
    """dq summed by atomics in the dk/dv kernel (LLMKERN_TRITON_ATTENTION_DQ=atomic) goes through the cap too."""
    monkeypatch.setenv(importlib.import_module("llmkern.triton.attention").DQ_ENV, "atomic")
    check_capped_against_reference(1, 4, 2, 27, 27, 32, torch.float32, causal, 2.0, window, docs)


@interp
def test_triton_capped_with_a_custom_scale():
    """The cap applies to the scores after the softmax scale, whatever that is."""
    check_capped_against_reference(1, 2, 1, 26, 26, 32, torch.float32, True, 2.0, scale=0.5, spread=1.0)


@interp
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp, on purpose
def test_triton_cap_of_huge_scores_is_finite():
    """Scores hundreds of times the cap (tanh's exp overflows or underflows in fp32): the capped result is
    finite and right, no NaN, in both directions."""
    q, k, v = random_qkv(1, 2, 1, 20, 20, 32, torch.float32, spread=30.0)  # scaled scores up to ~1e3 * 5
    o = attention(q, k, v, causal=False, backend="triton", softcap=1.0)
    grads = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, causal=False, softcap=1.0)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
    for name, got, want in (("o", o, ref), *zip(("dq", "dk", "dv"), grads, ref_grads)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=name)


@interp
def test_triton_without_a_cap_is_unchanged_and_a_cap_changes_it():
    """softcap=None runs the kernels without the cap (bit for bit those of a call that does not name it), and a
    cap gives another result: the switch reaches the kernels."""
    q, k, v = random_qkv(1, 2, 1, 24, 24, 32, torch.float32, spread=2.0)
    plain = attention(q, k, v, backend="triton")
    assert torch.equal(attention(q, k, v, backend="triton", softcap=None), plain)
    capped = attention(q, k, v, backend="triton", softcap=2.0)
    assert (capped - plain).abs().max() > 1e-2


@interp
def test_triton_opcheck_with_a_cap():
    q, k, v = random_qkv(1, 2, 1, 9, 9, 32, torch.float32, spread=2.0)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.llmkern.attention_fwd.default, (q, k, v, None, True, 0.2, "triton", 0, 1.5))
    o, lse = torch.ops.llmkern.attention_fwd(q, k, v, doc_ids, True, 0.2, "triton", 3, 1.5)
    bwd_args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), doc_ids, True,
                0.2, "triton", 3, 1.5)
    torch.library.opcheck(torch.ops.llmkern.attention_bwd.default, bwd_args)


@interp
def test_triton_capped_compiles_fullgraph():
    q, k, v = random_qkv(1, 2, 2, 12, 12, 32, torch.float32, spread=2.0)

    def loss(q, k, v):
        return attention(q, k, v, causal=True, backend="triton", softcap=2.0).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_torch_backend_and_auto_on_cpu_take_the_cap():
    """The torch backend is the reference with the cap; "auto" on a CPU is the torch backend."""
    q, k, v = random_qkv(1, 4, 2, 15, 15, 32, torch.float32, spread=2.0)
    want = reference.attention(q, k, v, causal=True, window=6, softcap=2.0)
    for backend in ("torch", "auto"):
        torch.testing.assert_close(attention(q, k, v, backend=backend, window=6, softcap=2.0), want, rtol=0, atol=0)


@pytest.mark.parametrize("bad,error", [
    (0.0, ValueError), (-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError), (1e39, ValueError),
    ("2.0", TypeError), (True, TypeError), (torch.tensor(2.0), TypeError),
])
def test_rejects_bad_softcaps(bad, error):
    q, k, v = random_qkv(1, 2, 1, 8, 8, 32, torch.float32, spread=1.0)
    with pytest.raises(error, match="softcap must be"):
        attention(q, k, v, backend="torch", softcap=bad)


def test_custom_op_rejects_bad_softcaps_and_the_cuda_backend():
    """The public op checks its cap too, and refuses one on the cuda backend, whose kernels would drop it."""
    q, k, v = random_qkv(1, 2, 1, 8, 8, 64, torch.float16, spread=1.0)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        torch.ops.llmkern.attention_fwd(q, k, v, None, True, 0.2, "triton", 0, 0.0)
    with pytest.raises(ValueError, match="backend 'cuda' has no soft cap"):
        torch.ops.llmkern.attention_fwd(q, k, v, None, True, 0.2, "cuda", 0, 2.0)
    o = torch.zeros_like(q)
    lse = torch.zeros(q.shape[:3])
    with pytest.raises(ValueError, match="backend 'cuda' has no soft cap"):
        torch.ops.llmkern.attention_bwd(o, q, k, v, o, lse, None, True, 0.2, "cuda", 0, 2.0)


@pytest.mark.simt
def test_cuda_backend_refuses_a_cap():
    """backend="cuda" (its kernels in the CPU emulator) with a cap: a clear error, not an uncapped result."""
    q, k, v = random_qkv(1, 2, 1, 8, 8, 64, torch.float16, spread=1.0)
    with pytest.raises(ValueError, match="backend 'cuda' has no soft cap; softcap=2.0"):
        attention(q, k, v, backend="cuda", softcap=2.0)
    attention(q, k, v, backend="cuda")  # runs without one


@pytest.mark.parametrize("preference", [("triton", "cuda"), ("cuda", "triton")])
def test_auto_on_a_gpu_skips_the_cuda_backend_for_a_cap(preference, monkeypatch):
    """On a GPU "auto" picks, for a capped call, the first preferred backend that has a cap (whatever the
    preference order), torch when Triton cannot run; without a cap, the first preferred."""
    q, _, _ = random_qkv(1, 2, 1, 8, 8, 64, torch.float16, spread=1.0)
    gpu = torch.device("cuda")
    monkeypatch.setitem(_backend.PREFERENCE, "attention", preference)
    runs = {"cuda", "triton"}
    monkeypatch.setattr(_backend, "can_run", lambda backend, op, device: backend in runs)

    def auto(softcap):
        return _backend.resolve("attention", "auto", gpu, fits=lambda b: ops_attention().fits_backend(b, q, softcap))

    assert auto(None) == preference[0]
    assert auto(2.0) == "triton"
    runs.discard("triton")
    assert auto(2.0) == "torch"
    assert auto(None) == "cuda"


def _layer(backend, softcap, window=None):
    return nn_attention.CausalSelfAttention(128, 4, 2, backend=backend, window=window, softcap=softcap)  # D = 32


@interp
@pytest.mark.parametrize("window", [None, 5])
def test_capped_layer_runs_the_triton_kernels_and_matches_the_reference(window, monkeypatch):
    """CausalSelfAttention with a soft cap on backend triton runs the Triton kernels with the cap (forward and
    backward) and gives the reference path's output and parameter gradients."""
    layer = _layer("triton", 2.0, window)
    with torch.no_grad():  # larger q/k weights: scores well past the cap
        layer.qkv.weight.mul_(4.0)
    reference_layer = _layer("torch", 2.0, window)
    reference_layer.load_state_dict(layer.state_dict())
    kernels = importlib.import_module("llmkern.triton.attention")
    caps = []
    for name in ("forward", "backward"):
        launcher = getattr(kernels, name)

        def recording(*args, softcap=None, _launcher=launcher, **kwargs):
            caps.append(softcap)
            return _launcher(*args, softcap=softcap, **kwargs)

        monkeypatch.setattr(kernels, name, recording)
    x = torch.randn(2, 19, 128)
    y = layer(x)
    want = reference_layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    want.backward(grad)
    assert caps == [2.0, 2.0]
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    for (name, p), r in zip(layer.named_parameters(), reference_layer.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_capped_layer_on_a_backend_without_the_cap_lets_auto_choose(monkeypatch):
    """A model on backend cuda (named, or the default), or on triton with heads narrower than its kernels take,
    runs its capped attention on a backend that can, rather than fail at the op's refusal; a backend that can,
    and "auto", pass unchanged."""
    q = torch.randn(1, 2, 5, 32, dtype=torch.float16)
    monkeypatch.setattr(_backend, "_default_backend", None)
    monkeypatch.setenv("LLMKERN_BACKEND", "cuda")
    assert nn_attention._capped_backend("cuda", q, 2.0) == "auto"
    assert nn_attention._capped_backend(None, q, 2.0) == "auto"
    assert nn_attention._capped_backend("triton", q[..., :16], 2.0) == "auto"
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    assert nn_attention._capped_backend(None, q, 2.0) is None
    for backend in ("auto", "triton", "torch"):
        assert nn_attention._capped_backend(backend, q, 2.0) == backend
    layer, reference_layer = _layer("torch", 3.0), _layer("torch", 3.0)
    reference_layer.load_state_dict(layer.state_dict())
    layer.backend = "cuda"  # what a model built with backend="cuda" holds; "auto" runs torch on a CPU
    monkeypatch.setattr(nn_attention, "op_backend", lambda op, backend, device: backend)
    x = torch.randn(1, 7, 128)
    torch.testing.assert_close(layer(x), reference_layer(x), rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernels themselves")
def test_capped_triton_kernels_compile_for_sm90():
    """The interpreter runs the kernels' Python; this builds their capped GPU code (see triton_build.py), which
    catches what only the compiler rejects. Each capped kernel, with and without documents and a window, keeps
    the tensor cores' wgmma and its cp.async loads (the tanh must not cost the pipelining)."""
    pytest.importorskip("triton.backends.nvidia")
    from triton_build import run_build

    out = run_build('''
    import json
    import re
    from llmkern.triton import attention as A

    POINTER = {"LSE": "*fp32", "DELTA": "*fp32", "DOC": "*i32", "DQ32": "*fp32"}
    FLOATS = ("scale", "scale_log2", "softcap")
    KERNELS = [(A._attention_fwd_kernel, A._FWD_CONFIGS, {}),
               (A._attention_bwd_dkdv_kernel, A._DKDV_CONFIGS, {"ATOMIC_DQ": True}),
               (A._attention_bwd_dq_kernel, A._DQ_CONFIGS, {})]
    for kernel, configs, switches in KERNELS:
        tile = configs[0]
        for masks in (False, True):
            consts = dict(HEAD_DIM=128, BLOCK_D=128, CAUSAL=True, HAS_DOC=masks, HAS_WINDOW=masks, HAS_SOFTCAP=True,
                          DOT_PRECISION="tf32", DOC_SCAN=A.DOC_SCAN, **switches, **tile.kwargs)
            names = [n for n in kernel.fn.arg_names if n not in consts]
            sig = {n: POINTER.get(n, "*bf16") if n.isupper() else "fp32" if n in FLOATS else "i32" for n in names}
            aligned = [n for n in names if n.isupper() or n.startswith("stride")]
            ptx = build(kernel, sig, consts, 90, aligned, num_warps=tile.num_warps, num_stages=tile.num_stages)
            found = {op: len(re.findall(pattern, ptx)) for op, pattern in
                     (("wgmma", r"wgmma\\.mma_async"), ("cp.async", r"cp\\.async\\.c[ag]"))}
            print(json.dumps([kernel.fn.__name__, masks, found]))
    ''')
    built = [json.loads(line) for line in out.splitlines()]
    assert len(built) == 6, out
    for name, masks, found in built:
        assert found["wgmma"] > 0 and found["cp.async"] > 0, (name, masks, found)
