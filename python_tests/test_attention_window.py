"""Sliding-window attention (llmkern.ops.attention(..., window=W)) against a float64 brute force.

Query i sits at position p = i + Sk - Sq (bottom-right alignment) and sees key j when p - W < j <= p
(and, with doc_ids, only keys of its own document). The brute force below builds that mask entry by
entry from the positions and takes a plain softmax over it; every backend is checked against it:
- the Triton kernels in Triton's interpreter (fp16/fp32: the interpreter's bf16 dot is wrong);
- the CUDA kernels in the CPU emulator (marker `simt`, backend "cuda" on CPU tensors);
- both kernel backends on a GPU (marker `cuda`), at larger sizes.
A low-precision result passes when its error is at most 2x (plus a small atol) that of PyTorch's SDPA
in the same dtype with the same mask (python_tests/numerics.py).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close_to_ref

from llmkern import _backend
from llmkern.ops import attention, reference

CPU = torch.device("cpu")
interp = pytest.mark.skipif(
    not _backend.can_run("triton", "attention", CPU), reason="Triton interpreter not enabled (TRITON_INTERPRET=1)"
)

# (backend, device, dtype, head dim); the GPU ones also get larger sizes (see `scaled`).
KERNELS = [
    pytest.param("triton", "cpu", torch.float32, 32, marks=interp, id="triton-interp-fp32"),
    pytest.param("triton", "cpu", torch.float16, 32, marks=interp, id="triton-interp-fp16"),
    pytest.param("cuda", "cpu", torch.bfloat16, 64, marks=pytest.mark.simt, id="cuda-simt"),
    pytest.param("triton", "cuda", torch.bfloat16, 64, marks=pytest.mark.cuda, id="triton-gpu"),
    pytest.param("cuda", "cuda", torch.bfloat16, 128, marks=pytest.mark.cuda, id="cuda-gpu"),
]


def require_backend(backend: str, device: str) -> None:
    if not _backend.can_run(backend, "attention", torch.device(device)):
        pytest.skip(f"backend {backend} has no attention kernels on {device} here")


def scaled(device: str, n: int) -> int:
    """A length n of the CPU cases, made longer on a GPU (several of its 64- and 128-row tiles)."""
    return n if device == "cpu" else 13 * n


# --- the brute force ----------------------------------------------------------------------------


def window_mask(sq: int, sk: int, window: int | None, doc_ids: torch.Tensor | None = None,
                causal: bool = True) -> torch.Tensor:
    """(B or 1, 1, Sq, Sk) bool: whether query i sees key j, decided pair by pair from the positions."""
    shift = sk - sq

    def sees(i: int, j: int) -> bool:
        position = i + shift
        return not causal or (j <= position and (window is None or position - j < window))

    rows = [[sees(i, j) for j in range(sk)] for i in range(sq)]
    mask = torch.tensor(rows, dtype=torch.bool).reshape(1, 1, sq, sk)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None].cpu()
    return mask


def brute_force(q, k, v, mask, scale=None):
    """softmax(q k^T * scale over the visible keys) @ v in float64; a row that sees no key gives 0."""
    q, k, v = (t.double() for t in (q, k, v))
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    mask = mask.to(q.device)
    scores = q @ k.transpose(-2, -1) * (q.size(-1) ** -0.5 if scale is None else scale)
    scores = scores.masked_fill(~mask, float("-inf"))
    sees_a_key = mask.any(dim=-1, keepdim=True)
    scores = torch.where(sees_a_key, scores, 0.0)  # no -inf-only rows: softmax stays finite there
    return (scores.softmax(dim=-1) * mask) @ v


# --- checks ---------------------------------------------------------------------------------------


def make_qkv(b, hq, hkv, sq, sk, d, dtype, device):
    q = torch.randn(b, hq, sq, d, dtype=dtype, device=device)
    k = torch.randn(b, hkv, sk, d, dtype=dtype, device=device)
    v = torch.randn(b, hkv, sk, d, dtype=dtype, device=device)
    return [t.requires_grad_() for t in (q, k, v)]


def packed_doc_ids(b: int, s: int, device) -> torch.Tensor:
    """Documents of random lengths (some of length 1) packed one after another, ids increasing."""
    starts = torch.rand(b, s) < 0.1
    starts[:, 0] = True
    return (starts.cumsum(dim=1) - 1).to(device)


def check_window(backend, device, dtype, d, b, hq, hkv, sq, sk, window, doc_ids=None):
    """o, dq, dk, dv of attention(..., window=window) vs the brute force, bounded by SDPA's own error."""
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype, device)
    o = attention(q, k, v, causal=True, backend=backend, doc_ids=doc_ids, window=window)
    do = torch.randn(o.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(o, (q, k, v), do)

    mask = window_mask(sq, sk, window, doc_ids)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = brute_force(q64, k64, v64, mask)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), do.double())

    lowp = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(device), enable_gqa=hq != hkv)
    lowp_grads = torch.autograd.grad(lowp, (q, k, v), do)

    name = f"{backend} window={window}"
    assert_close_to_ref(o, want, lowp, f"{name} o")
    for grad_name, got, ref, low in zip(("dq", "dk", "dv"), grads, want_grads, lowp_grads):
        assert got.shape == ref.shape and got.dtype == dtype
        assert_close_to_ref(got, ref, low, f"{name} {grad_name}")


# (B, Hq, Hkv, Sq, Sk, window): windows of one key, odd sizes with partial tiles, GQA, and Sq < Sk (the
# queries are the last Sq positions, as in decoding with a KV cache).
WINDOW_CASES = {
    "w1": (1, 2, 1, 80, 80, 1),
    "w5": (1, 2, 2, 80, 80, 5),
    "w17-gqa": (1, 4, 2, 67, 67, 17),
    "w33": (1, 2, 1, 80, 80, 33),
    "w16-tile": (1, 2, 1, 64, 64, 16),
    "decode-1x80-w12": (1, 2, 1, 1, 80, 12),
    "9x70-w7": (1, 2, 1, 9, 70, 7),
    "30x75-w20-gqa": (1, 4, 2, 30, 75, 20),
}


@pytest.mark.parametrize("backend,device,dtype,d", KERNELS)
@pytest.mark.parametrize("case", WINDOW_CASES)
def test_window_matches_brute_force(backend, device, dtype, d, case):
    require_backend(backend, device)
    b, hq, hkv, sq, sk, window = WINDOW_CASES[case]
    sq, sk = scaled(device, sq), scaled(device, sk)
    if device != "cpu":
        window = 1 if window == 1 else scaled(device, window)
    check_window(backend, device, dtype, d, b, hq, hkv, sq, sk, window)


@pytest.mark.parametrize("backend,device,dtype,d", KERNELS)
@pytest.mark.parametrize("window", [1, 13])
def test_window_with_doc_ids(backend, device, dtype, d, window):
    """Both masks apply: a key in the window but in another document stays hidden, and so does one of
    the same document outside the window."""
    require_backend(backend, device)
    s = scaled(device, 60)
    check_window(backend, device, dtype, d, 2, 2, 1, s, s, window, doc_ids=packed_doc_ids(2, s, torch.device(device)))


@pytest.mark.parametrize("backend,device,dtype,d", KERNELS)
@pytest.mark.parametrize("sq,sk", [(50, 50), (20, 47)])
def test_window_of_the_whole_sequence_is_plain_causal(backend, device, dtype, d, sq, sk):
    require_backend(backend, device)
    sq, sk = scaled(device, sq), scaled(device, sk)
    for window in (sk, sk + 31, 2**40):  # 2**40: past any 32-bit position arithmetic
        check_window(backend, device, dtype, d, 1, 2, 1, sq, sk, window)
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, sq, sk, d, dtype, device))
    causal = attention(q, k, v, causal=True, backend=backend)
    torch.testing.assert_close(attention(q, k, v, causal=True, backend=backend, window=sk), causal)


@pytest.mark.parametrize("backend,device,dtype,d", KERNELS)
@pytest.mark.parametrize("sq,sk,window", [(20, 7, 3), (9, 1, 1), (40, 30, 16)])
def test_window_rows_that_see_no_key(backend, device, dtype, d, sq, sk, window):
    """Sq > Sk: the first Sq - Sk queries lie before every key. They get o = 0 and zero dq, no NaN
    anywhere, and the other rows and every gradient match the brute force."""
    require_backend(backend, device)
    q, k, v = make_qkv(2, 4, 2, sq, sk, d, dtype, device)
    o = attention(q, k, v, causal=True, backend=backend, window=window)
    do = torch.randn(o.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = brute_force(q64, k64, v64, window_mask(sq, sk, window))
    want_grads = torch.autograd.grad(want, (q64, k64, v64), do.double())
    empty = sq - sk
    assert torch.all(o[:, :, :empty] == 0) and torch.all(grads[0][:, :, :empty] == 0)
    atol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, got, ref in (("o", o, want), *zip(("dq", "dk", "dv"), grads, want_grads)):
        assert not torch.isnan(got).any(), f"{backend} {name} has NaN"
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=atol, msg=f"{backend} {name}")


@pytest.mark.parametrize("backend,device,dtype,d", KERNELS)
def test_kernels_skip_the_tiles_outside_the_window(backend, device, dtype, d):
    """With window 8, keys [0, g) are NaN and so are queries [S - g, S), g a whole number of every
    kernel's tiles (S = 5g). A query block from 2g on lies wholly past the window of the NaN keys, and a
    key block before S - 2g wholly before the window of the NaN queries: a kernel that still visited
    those tiles (masking them is not enough: 0 * NaN is NaN) would spread NaN into their o, dq, dk or
    dv. (The rows before 2g read the NaN tile, so their o, and the dk of the keys they see, are NaN.)"""
    require_backend(backend, device)
    g = 16 if backend == "triton" and device == "cpu" else 128  # the interpreter's tiles are 16 x 16
    s, window = 5 * g, 8
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, s, s, d, dtype, device))
    k[:, :, :g] = v[:, :, :g] = float("nan")
    q[:, :, s - g:] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = attention(q, k, v, causal=True, backend=backend, window=window)
    do = torch.randn(o.shape, dtype=dtype, device=device)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)

    clean = [t.detach().double().nan_to_num(0.0).requires_grad_() for t in (q, k, v)]
    want = brute_force(*clean, window_mask(s, s, window))
    want_dq, want_dk, want_dv = torch.autograd.grad(want, clean, do.double())
    rows, keys = slice(2 * g, s - g), slice(2 * g, s - 2 * g)
    atol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, got, ref in (("o", o[:, :, rows], want[:, :, rows]), ("dq", dq[:, :, rows], want_dq[:, :, rows]),
                           ("dk", dk[:, :, keys], want_dk[:, :, keys]), ("dv", dv[:, :, keys], want_dv[:, :, keys])):
        assert not torch.isnan(got).any(), f"{backend} {name}: a tile outside the window was read"
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=atol, msg=f"{backend} {name}")


@interp
@pytest.mark.parametrize("case", ["w5", "w17-gqa", "9x70-w7"])
def test_triton_window_with_dq_by_atomics(case, monkeypatch):
    """LLMKERN_TRITON_ATTENTION_DQ=atomic: the dk/dv kernel's walk over the window's query blocks also
    gives dq."""
    from llmkern.triton import attention as triton_attention

    monkeypatch.setenv(triton_attention.DQ_ENV, "atomic")
    b, hq, hkv, sq, sk, window = WINDOW_CASES[case]
    check_window("triton", "cpu", torch.float32, 32, b, hq, hkv, sq, sk, window)


@interp
def test_triton_op_schema_carries_the_window():
    """The custom ops take window as an int (0: none) after the backend, so calls without it still run."""
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, 19, 19, 32, torch.float32, "cpu"))
    torch.library.opcheck(torch.ops.llmkern.attention_fwd.default, (q, k, v, None, True, 0.2, "triton", 5))
    o, lse = torch.ops.llmkern.attention_fwd(q, k, v, None, True, 0.2, "triton", 5)
    torch.testing.assert_close(o.double(), brute_force(q, k, v, window_mask(19, 19, 5), scale=0.2), rtol=0, atol=1e-5)
    bwd_args = (torch.randn_like(o), q, k, v, o, lse, None, True, 0.2, "triton", 5)
    torch.library.opcheck(torch.ops.llmkern.attention_bwd.default, bwd_args)
    without, _ = torch.ops.llmkern.attention_fwd(q, k, v, None, True, 0.2, "triton")
    torch.testing.assert_close(without, torch.ops.llmkern.attention_fwd(q, k, v, None, True, 0.2, "triton", 0)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_window_compiles_fullgraph(backend):
    require_backend(backend, "cuda")
    q, k, v = make_qkv(2, 8, 2, 300, 300, 64, torch.bfloat16, "cuda")

    def loss(q, k, v):
        return attention(q, k, v, causal=True, backend=backend, window=100).float().square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# --- the reference (the torch backend, and what test_attention checks the kernels against) -------


@pytest.mark.parametrize("sq,sk,window", [(40, 40, 1), (40, 40, 9), (13, 50, 6), (30, 11, 4), (25, 25, 100)])
@pytest.mark.parametrize("with_docs", [False, True])
def test_reference_window_matches_brute_force(sq, sk, window, with_docs):
    doc_ids = packed_doc_ids(2, sq, CPU) if with_docs and sq == sk else None
    q, k, v = (t.detach().double() for t in make_qkv(2, 4, 2, sq, sk, 16, torch.float64, "cpu"))
    got = reference.attention(q, k, v, causal=True, doc_ids=doc_ids, window=window)
    torch.testing.assert_close(got, brute_force(q, k, v, window_mask(sq, sk, window, doc_ids)), rtol=0, atol=1e-12)
    through_op = attention(q.float(), k.float(), v.float(), backend="torch", doc_ids=doc_ids, window=window)
    torch.testing.assert_close(through_op.double(), got, rtol=0, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,sk", [(33, 33), (9, 40), (20, 7)])
@pytest.mark.parametrize("with_docs", [False, True])
def test_reference_without_window_is_unchanged(causal, sq, sk, with_docs):
    """window=None is the reference as before windows: causal (bottom right) or not, with documents."""
    doc_ids = packed_doc_ids(2, sq, CPU) if with_docs and sq == sk else None
    q, k, v = (t.detach().double() for t in make_qkv(2, 4, 2, sq, sk, 16, torch.float64, "cpu"))
    want = brute_force(q, k, v, window_mask(sq, sk, None, doc_ids, causal=causal))
    torch.testing.assert_close(reference.attention(q, k, v, causal=causal, doc_ids=doc_ids), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(reference.attention(q, k, v, causal=causal, doc_ids=doc_ids, window=None), want,
                               rtol=0, atol=1e-12)


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interp)])
@pytest.mark.parametrize("window,causal,message", [
    (0, True, "window must be at least 1"),
    (-3, True, "window must be at least 1"),
    (2.5, True, "window must be an int or None; got float"),
    (4.0, True, "window must be an int or None; got float"),
    (True, True, "window must be an int or None; got bool"),
    (4, False, "window needs causal=True"),
])
def test_bad_window_is_refused(backend, window, causal, message):
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, 8, 8, 32, torch.float16, "cpu"))
    attention(q, k, v, causal=True, backend=backend, window=3)  # a good window runs
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, causal=causal, backend=backend, window=window)


def test_reference_refuses_a_window_without_causal_or_below_one():
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, 8, 8, 16, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="window needs causal=True"):
        reference.attention(q, k, v, causal=False, window=3)
    for window in (0, -2, 2.0):  # 0 gave all zeros, where the op reads 0 as no window
        with pytest.raises(ValueError, match="window must be an int >= 1 or None"):
            reference.attention(q, k, v, window=window)


def test_the_public_custom_ops_refuse_a_window_the_kernels_would_misread():
    # torch.ops.llmkern.attention_fwd/bwd are public: a negative window ran as none, and one without causal as
    # a window over the later keys too, silently.
    import llmkern.ops.attention  # noqa: F401  (registers the ops)

    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, 8, 8, 16, torch.float32, "cpu"))
    lse = torch.zeros(1, 2, 8)
    for window, causal, message in ((-3, True, "window must be >= 0"), (4, False, "window needs causal=True")):
        with pytest.raises(ValueError, match=message):
            torch.ops.llmkern.attention_fwd(q, k, v, None, causal, 0.25, "triton", window)
        with pytest.raises(ValueError, match=message):
            torch.ops.llmkern.attention_bwd(q, q, k, v, q, lse, None, causal, 0.25, "triton", window)


def test_a_window_over_every_key_runs_the_kernels_without_one():
    from llmkern.ops.attention import NO_WINDOW, _kernel_window

    assert _kernel_window(4096, 40) == _kernel_window(40, 40) == _kernel_window(None, 40) == NO_WINDOW
    assert _kernel_window(39, 40) == 39
