"""RoPE: the op against a float64 rotation written with complex numbers, its gradient (the
inverse rotation), per-row angles, strided inputs, the cos/sin tables, and bad input; then the
Triton kernels (interpreted without a GPU) and the CUDA kernel against the same truth, opcheck
and torch.compile.

The CUDA kernel runs on a GPU (tests marked `cuda`) and, on any machine, on CPU tensors in the
emulator of python_tests/simt (tests marked `simt`, ids with "cuda-simt"): the same checks with
small shapes, plus one that the results do not depend on the order threads and blocks run in.
"""

import importlib
import math

import pytest
import torch

import llmkern
import simt
from llmkern.model import GPTConfig
from llmkern.ops import reference
from llmkern.nn import RotaryCache
from numerics import assert_close_to_ref

SHAPES = [(1, 1, 1, 2), (2, 3, 17, 64), (3, 2, 123, 6), (1, 4, 33, 128)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def angles(rows: tuple[int, ...], half: int) -> torch.Tensor:
    return torch.rand(*rows, half, dtype=torch.float64) * 20 - 10


def rotate_complex(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Pair i is the complex number x[i] + j x[i + D/2], turned by e^(j theta): float64 truth."""
    half = x.size(-1) // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    if theta.dim() == 3:  # (B, S, D/2): broadcast over heads
        theta = theta[:, None]
    z = z * torch.polar(torch.ones_like(theta), theta)
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [False, True])
def test_rope_matches_complex_rotation(shape, dtype, per_row):
    b, h, s, d = shape
    theta = angles((b, s) if per_row else (s,), d // 2)
    x = torch.randn(shape, dtype=dtype)
    out = llmkern.ops.rope(x, theta.cos().float(), theta.sin().float(), backend="torch")
    assert out.dtype == dtype and out.shape == x.shape
    truth = rotate_complex(x, theta)
    # torch's own low-precision computation of the same formula
    x1, x2 = x.chunk(2, dim=-1)
    cos = theta.cos().to(dtype)
    sin = theta.sin().to(dtype)
    if per_row:
        cos, sin = cos[:, None], sin[:, None]
    theirs = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    assert_close_to_ref(out, truth, theirs, f"rope {dtype} {shape}", atol=1e-5)


def test_rope_gradient_is_the_inverse_rotation():
    theta = angles((17,), 8)
    x = torch.randn(2, 3, 17, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 3, 17, 16, dtype=torch.float64)
    llmkern.ops.rope(x, theta.cos(), theta.sin(), backend="torch").backward(dy)
    torch.testing.assert_close(x.grad, rotate_complex(dy, -theta))


def test_rope_takes_strided_views():
    qkv = torch.randn(2, 9, 3, 4, 16)  # (B, T, q/k/v, H, D) as a fused projection makes it
    q = qkv[:, :, 0].transpose(1, 2)  # (B, H, T, D), not contiguous
    theta = angles((9,), 8)
    out = llmkern.ops.rope(q, theta.cos().float(), theta.sin().float())
    torch.testing.assert_close(out.double(), rotate_complex(q, theta), rtol=1e-5, atol=1e-5)


def test_rotary_cache_tables():
    cache = RotaryCache(head_dim=8, max_positions=50, theta=500.0)
    p, i = 37, 3
    angle = torch.tensor(p * 500.0 ** (-2 * i / 8), dtype=torch.float64)
    assert abs(cache.cos[p, i].item() - angle.cos().item()) < 1e-6
    assert abs(cache.sin[p, i].item() - angle.sin().item()) < 1e-6
    cos, sin = cache(None, 5)
    assert cos.shape == (5, 4)
    positions = torch.tensor([[0, 4], [7, 2]])
    assert torch.equal(cache(positions, 2)[1], cache.sin[positions])
    cache = cache.to(torch.bfloat16)  # a model cast to bf16 keeps fp32 tables
    assert cache.cos.dtype == torch.float32 and abs(cache.cos[p, i].item() - angle.cos().item()) < 1e-6
    assert cache.state_dict() == {}  # not saved in checkpoints: rebuilt


def longrope_scaling(half: int, original: int, attention_factor: float) -> dict:
    """A longrope scaling of random factors: short ones near 1, long ones up to 8 (as Phi-3's are)."""
    return {"rope_type": "longrope", "short_factor": (1 + 0.5 * torch.rand(half, dtype=torch.float64)).tolist(),
            "long_factor": (1 + 7 * torch.rand(half, dtype=torch.float64)).tolist(),
            "original_max_position_embeddings": original, "attention_factor": attention_factor}


def longrope_reference(head_dim: int, seq_len: int, theta: float, scaling: dict) -> tuple[list, list]:
    """LongRoPE's cos and sin for positions 0 .. seq_len - 1 as Hugging Face computes them in a forward pass over
    seq_len tokens, from its definition in float64 Python: pair i turns by position / (factor_i * theta^(2i / D)),
    the factors long_factor's when seq_len is past original_max_position_embeddings (short_factor's otherwise),
    and both tables are scaled by attention_factor."""
    long = seq_len > scaling["original_max_position_embeddings"]
    factors = scaling["long_factor" if long else "short_factor"]
    scale = scaling["attention_factor"]
    angles = [[p / (f * theta ** (2 * i / head_dim)) for i, f in enumerate(factors)] for p in range(seq_len)]
    return ([[scale * math.cos(a) for a in row] for row in angles],
            [[scale * math.sin(a) for a in row] for row in angles])


def as_tables(reference: tuple[list, list]) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(table, dtype=torch.float32) for table in reference)


@pytest.mark.parametrize("max_positions, takes", [(24, "short_factor"), (64, "short_factor"), (65, "long_factor"),
                                                  (300, "long_factor")])
def test_rotary_cache_longrope_tables(max_positions, takes):
    """cos and sin are the tables of a sequence of max_positions tokens: short_factor up to the original 64
    positions, long_factor past them; both scaled by attention_factor (here not 1, so a table left unscaled is
    seen). Past 64, short_cos and short_sin hold the short_factor tables of the first 64 positions."""
    scaling = longrope_scaling(8, 64, attention_factor=1.19)
    cache = RotaryCache(head_dim=16, max_positions=max_positions, theta=500.0, scaling=scaling)
    cos, sin = as_tables(longrope_reference(16, max_positions, 500.0, scaling))
    torch.testing.assert_close(cache.cos, cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(cache.sin, sin, rtol=0, atol=1e-6)
    other = "long_factor" if takes == "short_factor" else "short_factor"
    wrong = as_tables(longrope_reference(16, max_positions, 500.0, {**scaling, takes: scaling[other]}))
    assert not torch.allclose(cache.cos, wrong[0], atol=1e-3)
    if takes == "short_factor":
        assert cache.short_cos is None and cache.short_sin is None and "long_factor" not in repr(cache)
    else:
        short = as_tables(longrope_reference(16, 64, 500.0, scaling))
        torch.testing.assert_close((cache.short_cos, cache.short_sin), short, rtol=0, atol=1e-6)
        assert "short_factor up to it, long_factor past it: original_max_position_embeddings=64" in repr(cache)
    assert "short_factor" in repr(cache)
    # a bf16 cast or a move from the meta device rebuilds the same scaled tables, the short ones too
    cast = cache.to(torch.bfloat16)
    assert torch.equal(cast.cos, cos) and cast.cos.dtype == torch.float32
    with torch.device("meta"):
        empty = RotaryCache(head_dim=16, max_positions=max_positions, theta=500.0, scaling=scaling)
    empty.to_empty(device="cpu")
    assert torch.equal(empty.sin, cache.sin)
    if cache.short_sin is not None:
        assert torch.equal(empty.short_sin, cache.short_sin) and cast.short_cos.dtype == torch.float32


@pytest.mark.parametrize("seq_len", [1, 40, 64, 65, 100])
def test_rotary_cache_longrope_picks_the_factors_by_the_sequence_length(seq_len):
    """A context of 100 positions past the original 64: each call takes the tables of Hugging Face's forward
    pass over its sequence, short_factor up to 64 tokens and long_factor past them. The sequence's length is
    seq_len without positions, max(positions) + 1 over the whole batch with them (a decode step at position 70
    is a sequence of 71 tokens), compiled as eager."""
    scaling = longrope_scaling(8, 64, attention_factor=1.19)
    cache = RotaryCache(head_dim=16, max_positions=100, theta=500.0, scaling=scaling)
    cos, sin = as_tables(longrope_reference(16, seq_len, 500.0, scaling))
    got = cache(None, seq_len)
    torch.testing.assert_close(got, (cos, sin), rtol=0, atol=1e-6)
    # rows 0 .. seq_len - 1 at random, the last position in one row only
    positions = torch.randint(0, seq_len, (2, 5))
    positions[1, 3] = seq_len - 1
    compiled = torch.compile(cache, fullgraph=True, backend="eager")
    for tables in (cache(positions, 5), compiled(positions, 5)):
        torch.testing.assert_close(tables, (cos[positions], sin[positions]), rtol=0, atol=1e-6)
    # a decode step's position alone: a sequence of position + 1 tokens
    step = torch.tensor([[seq_len - 1]])
    torch.testing.assert_close(cache(step, 1), (cos[step], sin[step]), rtol=0, atol=1e-6)
    other = "long_factor" if seq_len <= 64 else "short_factor"
    wrong = as_tables(longrope_reference(16, seq_len, 500.0, {**scaling, "short_factor": scaling[other],
                                                              "long_factor": scaling[other]}))
    assert seq_len == 1 or not torch.allclose(got[1], wrong[1], atol=1e-3)  # position 0's sin is 0 either way


def test_rotary_cache_longrope_refuses_positions_outside_its_tables(monkeypatch):
    """With short tables too, a position past the context (or, on a GPU, a negative one) fails the lookup, and is
    never clamped into the short tables."""
    cache = RotaryCache(head_dim=16, max_positions=100, theta=500.0, scaling=longrope_scaling(8, 64, 1.19))
    with pytest.raises(ValueError, match=r"positions holds 100; positions are in \[0, 100\)"):
        cache(torch.tensor([[0, 100]]), 2)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for bad in (-1, 100):
        with pytest.raises(IndexError):
            cache(torch.tensor([[0, bad]]), 2)
    assert cache(torch.tensor([[0, 1]])[:, :0], 0)[0].shape == (1, 0, 8)


LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0],
            "original_max_position_embeddings": 16, "attention_factor": 1.1}


@pytest.mark.parametrize("change, words", [
    ({"short_factor": [1.0, 1.5, 2.0]}, r"rope_scaling\['short_factor'\] must be a list of head_dim / 2 = 4 numbers"),
    ({"long_factor": [2.0] * 8}, r"rope_scaling\['long_factor'\] must be a list of head_dim / 2 = 4"),
    ({"long_factor": (2.0, 4.0, 8.0, 16.0)}, r"rope_scaling\['long_factor'\] must be a list"),
    ({"short_factor": [1.0, 0.0, 2.0, 3.0]}, r"rope_scaling\['short_factor\[1\]'\] must be a finite number > 0"),
    ({"long_factor": [2.0, 4.0, float("inf"), 16.0]}, r"rope_scaling\['long_factor\[2\]'\] must be a finite"),
    ({"long_factor": [2.0, 4.0, float("nan"), 16.0]}, r"rope_scaling\['long_factor\[2\]'\] must be a finite"),
    ({"short_factor": [1.0, True, 2.0, 3.0]}, r"rope_scaling\['short_factor\[1\]'\] must be a finite"),
    ({"attention_factor": -1.0}, r"rope_scaling\['attention_factor'\] must be a finite number > 0"),
    ({"original_max_position_embeddings": 16.0}, r"rope_scaling\['original_max_position_embeddings'\] must be an int"),
    ({"original_max_position_embeddings": 0}, r"rope_scaling\['original_max_position_embeddings'\] must be an int"),
    ({"attention_factor": None}, r"rope_scaling\['attention_factor'\] must be a finite number"),
    ({"factor": 2.0}, r"longrope scaling takes .*unknown \['factor'\]"),
    ({"rope_type": "su"}, "rope_type 'llama3', 'longrope' or 'linear'"),
])
def test_a_bad_longrope_scaling_is_refused(change, words):
    scaling = {**LONGROPE, **change}
    with pytest.raises(ValueError, match=words):
        RotaryCache(head_dim=8, max_positions=32, scaling=scaling)
    with pytest.raises(ValueError, match=words):  # heads of 8: n_embd 32 over 4 heads
        GPTConfig.from_preset("tiny-llama", n_embd=32, n_head=4, n_kv_head=4, rope_scaling=scaling)
    missing = {k: v for k, v in LONGROPE.items() if k != "attention_factor"}
    with pytest.raises(ValueError, match=r"missing \['attention_factor'\]"):
        RotaryCache(head_dim=8, max_positions=32, scaling=missing)
    assert RotaryCache(head_dim=8, max_positions=32, scaling=LONGROPE).max_positions == 32


@pytest.mark.parametrize("seq_len", [51, -1])
def test_rotary_cache_refuses_positions_past_its_tables(seq_len):
    """Tables for 50 positions: 51 (or -1) is an error naming seq_len, not 50 rows (or 49) cut silently."""
    cache = RotaryCache(head_dim=8, max_positions=50)
    with pytest.raises(ValueError, match="seq_len"):
        cache(None, seq_len)
    assert cache(None, 50)[0].shape == (50, 4)


@pytest.mark.parametrize("bad", [-1, -50, 50])
def test_rotary_cache_refuses_positions_outside_its_tables(bad, monkeypatch):
    """Position -1 indexed the tables' last row (49), silently; 50 was an IndexError in torch's words (a
    device assert on a GPU). On the CPU both are a ValueError naming positions."""
    cache = RotaryCache(head_dim=8, max_positions=50)
    positions = torch.tensor([[0, 3], [bad, 2]])
    with pytest.raises(ValueError, match=rf"positions holds {bad}; positions are in \[0, 50\)"):
        cache(positions, 2)
    # Where the check would wait for a GPU (or under torch.compile) a negative position is sent past the
    # tables, so that the lookup fails as for one >= max_positions: never the wrapped row.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(IndexError):
        cache(positions, 2)
    assert torch.equal(cache(torch.tensor([[0, 49]]), 2)[0], cache.cos[torch.tensor([[0, 49]])])


@pytest.mark.parametrize("positions", [torch.tensor([[0.0, 1.0]]), torch.tensor([[True, False]]),
                                       torch.tensor([[1, 0]], dtype=torch.uint8), [[0, 1]]])
def test_rotary_cache_refuses_positions_that_are_not_integer_tensors(positions):
    """A bool or uint8 tensor indexed the tables as a mask (rows selected, not looked up), silently; a
    nested list as several indices (rows of the wrong shape)."""
    cache = RotaryCache(head_dim=8, max_positions=2)
    with pytest.raises(TypeError, match="positions must"):
        cache(positions, 2)


@pytest.mark.parametrize("kwargs, words", [(dict(theta=0.0), "theta"), (dict(theta=-10.0), "theta"),
                                           (dict(theta=float("nan")), "theta"), (dict(max_positions=-1), "max_positions")])
def test_rotary_cache_refuses_bad_arguments(kwargs, words):
    """A theta <= 0 made tables of NaN without a word; a negative max_positions failed inside torch.arange."""
    with pytest.raises(ValueError, match=words):
        RotaryCache(**{"head_dim": 8, "max_positions": 16, **kwargs})


@pytest.mark.parametrize(
    "x, cos_shape, cos_dtype, error, words",
    [
        (torch.randn(1, 1, 4, 5), (4, 2), torch.float32, ValueError, "must be even"),
        (torch.randn(1, 4, 8), (4, 4), torch.float32, ValueError, "must be 4-D"),
        (torch.randn(1, 1, 4, 8), (4, 8), torch.float32, ValueError, "(S, D/2) = (4, 4)"),
        (torch.randn(1, 1, 4, 8), (3, 4), torch.float32, ValueError, "cos must have shape"),
        (torch.randn(1, 1, 4, 8), (4, 4), torch.float16, TypeError, "cos must have dtype"),
        (torch.zeros(1, 1, 4, 8, dtype=torch.long), (4, 4), torch.float32, TypeError, "x must have dtype"),
    ],
)
def test_rope_errors(x, cos_shape, cos_dtype, error, words):
    cos = torch.ones(cos_shape, dtype=cos_dtype)
    with pytest.raises(error) as info:
        llmkern.ops.rope(x, cos, cos)
    assert words in str(info.value)


def test_rope_refuses_the_cuda_backend_for_cpu_tensors():
    x, cos = torch.randn(1, 1, 4, 8), torch.ones(4, 4)
    with pytest.raises(ValueError, match="cannot run rope"):
        llmkern.ops.rope(x, cos, cos, backend="cuda")


def test_cuda_takes_no_float64(monkeypatch):
    """The CUDA kernel has fp32 tables and no fp64 x: "auto" passes it over, an explicit
    backend="cuda" is a TypeError (raised before any device work, so checked here on a CPU)."""
    rope_op = importlib.import_module("llmkern.ops.rope")
    x, x64, t, t64 = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8, dtype=torch.float64), torch.ones(4, 4), \
        torch.ones(4, 4, dtype=torch.float64)
    assert rope_op._fits_backend("cuda", x, t, t)
    assert not rope_op._fits_backend("cuda", x64, t, t)
    assert not rope_op._fits_backend("cuda", x, t, t64)
    assert rope_op._fits_backend("triton", x64, t64, t64)
    monkeypatch.setattr(llmkern._backend, "can_run", lambda backend, op, device: True)
    with pytest.raises(TypeError, match="x must have dtype float32, float16 or bfloat16 for backend 'cuda'"):
        llmkern.ops.rope(x64, t, t, backend="cuda")
    with pytest.raises(TypeError, match="cos and sin must be float32 for backend 'cuda'"):
        llmkern.ops.rope(x, t, t64, backend="cuda")


# ----------------------------------------------------------------------------- Triton kernels
# Without a GPU they run in the interpreter (conftest sets TRITON_INTERPRET=1); shapes stay small.

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON_SHAPES = [(1, 2, 1, 32), (2, 3, 17, 64), (1, 2, 123, 128), (2, 5, 17, 32), (1, 1, 3, 6)]
# The CUDA kernel's shapes: D = 2 and 6 and 130 take its scalar path (D/2 not a whole number of
# 16-byte packs), 64 and 128 the vector path; S from 1 to 4097.
CUDA_SHAPES = [(1, 1, 1, 2), (2, 3, 17, 64), (3, 2, 123, 128), (1, 5, 4097, 64), (2, 4, 33, 6), (1, 2, 17, 130)]
# (backend, device) pairs: "cuda" skips without a GPU; "cuda-simt" runs the CUDA kernel on CPU
# tensors in the emulator (python_tests/simt) on any machine.
BACKENDS = [
    pytest.param("triton", DEVICE, id="triton"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
    pytest.param("cuda", "cpu", id="cuda-simt", marks=pytest.mark.simt),
]
# The devices of the tests of the CUDA kernel alone: a GPU, or CPU tensors in the emulator.
CUDA_DEVICES = [pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
                pytest.param("cpu", id="cuda-simt", marks=pytest.mark.simt)]


def _shape_id(shape) -> str:
    return "x".join(map(str, shape))


ROTATION_CASES = (
    [pytest.param("triton", DEVICE, s, id="triton-" + _shape_id(s)) for s in TRITON_SHAPES]
    + [pytest.param("cuda", "cuda", s, id="cuda-" + _shape_id(s), marks=pytest.mark.cuda) for s in CUDA_SHAPES]
    + [pytest.param("cuda", "cpu", s, id="cuda-simt-" + _shape_id(s), marks=pytest.mark.simt) for s in CUDA_SHAPES]
)


def rotate_lowp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """torch's own computation of the rotation in x's dtype: the yardstick of the numerics rule."""
    cos, sin = theta.cos().to(x.dtype), theta.sin().to(x.dtype)
    if theta.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def tables(theta: torch.Tensor, device=DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    return theta.cos().float().to(device), theta.sin().float().to(device)


@pytest.mark.parametrize("backend,device,shape", ROTATION_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_kernels_match_complex_rotation_with_gradient(backend, device, shape, dtype, per_row):
    b, _, s, d = shape
    theta = angles((b, s) if per_row else (s,), d // 2)
    cos, sin = tables(theta, device)
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(shape, dtype=dtype, device=device)
    out = llmkern.ops.rope(x, cos, sin, backend=backend)
    out.backward(dy)
    assert out.dtype == dtype and out.shape == x.shape
    x_cpu, dy_cpu = x.detach().cpu(), dy.cpu()
    assert_close_to_ref(out.cpu(), rotate_complex(x_cpu, theta), rotate_lowp(x_cpu, theta), f"rope {dtype} {shape}")
    # The gradient is the inverse rotation of dy.
    assert_close_to_ref(x.grad.cpu(), rotate_complex(dy_cpu, -theta), rotate_lowp(dy_cpu, -theta),
                        f"rope dx {dtype} {shape}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernels_take_q_and_k_views_of_a_fused_projection(backend, device):
    b, t, h, hkv, d = 2, 17, 4, 2, 32
    qkv = torch.randn(b, t, h + 2 * hkv, d, device=device)  # as CausalSelfAttention makes it
    q = qkv[:, :, :h].transpose(1, 2)  # (B, H, T, D): strided, not contiguous
    k = qkv[:, :, h : h + hkv].transpose(1, 2)
    qk = qkv[:, :, : h + hkv].transpose(1, 2)  # q's and k's heads in one view, as the model rotates them
    theta = angles((t,), d // 2)
    cos, sin = tables(theta, device)
    for x in (q, k, qk):
        out = llmkern.ops.rope(x, cos, sin, backend=backend)
        torch.testing.assert_close(out.cpu().double(), rotate_complex(x.cpu(), theta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernels_take_a_strided_last_dimension_and_strided_tables(backend, device):
    x = torch.randn(2, 3, 32, 9, device=device).transpose(-1, -2)  # (2, 3, 9, 32), last-dim stride 9
    theta = angles((9,), 16)
    cos, sin = tables(theta, device)
    cos = torch.cat([cos, torch.zeros_like(cos)], dim=-1)[:, :16]  # rows of a wider table: strides (32, 1)
    sin = torch.stack([sin, sin], dim=-1)[..., 0]  # strides (32, 2): copied before the kernel
    assert cos.stride() == (32, 1) and sin.stride() == (32, 2)
    out = llmkern.ops.rope(x, cos, sin, backend=backend)
    torch.testing.assert_close(out.cpu().double(), rotate_complex(x.cpu(), theta), rtol=1e-5, atol=1e-5)


def test_triton_float64_passes_gradcheck_and_gradgradcheck():
    theta = angles((3,), 2)
    cos, sin = theta.cos().to(DEVICE), theta.sin().to(DEVICE)
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fn = lambda x: llmkern.ops.rope(x, cos, sin, backend="triton")  # noqa: E731
    torch.testing.assert_close(fn(x).detach().cpu(), rotate_complex(x.detach().cpu(), theta))
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("inverse", [False, True])
def test_triton_kernel_writes_every_element_through_its_strides(inverse, monkeypatch):
    """The output is a strided view of a NaN-filled buffer: every element of the view must be
    written, and nothing outside it. A small MAX_TILE makes the kernel loop over head and pair
    blocks, as it does for big heads on a GPU."""
    kernels = importlib.import_module("llmkern.triton.rope")
    monkeypatch.setattr(kernels, "MAX_TILE", 8)
    b, h, s, d = 2, 5, 7, 40
    x = torch.randn(b, s, h, d, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)
    theta = angles((b, s), d // 2)
    cos, sin = tables(theta)
    buffer = torch.full((b, s, h + 1, d), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    y = buffer[:, :, :h].transpose(1, 2)  # (B, H, S, D) with the strides of a fused layout
    kernels.forward(x, cos, sin, y, inverse)
    assert not y.isnan().any()
    assert buffer[:, :, h].isnan().all()  # the head outside the view is untouched
    turn = -theta if inverse else theta
    assert_close_to_ref(y.cpu(), rotate_complex(x.cpu(), turn), rotate_lowp(x.cpu(), turn), "rope kernel")


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_triton_launches_a_big_batch_in_slices(per_row, monkeypatch):
    """The batch is grid axis 1, which CUDA caps at 65535 blocks: a bigger batch goes in slices
    (per-row tables sliced with it). A cap of 2 makes a batch of 5 take three launches."""
    kernels = importlib.import_module("llmkern.triton.rope")
    monkeypatch.setattr(kernels, "MAX_GRID_Y", 2)
    b, h, s, d = 5, 2, 3, 8
    x = torch.randn(b, h, s, d, device=DEVICE)
    theta = angles((b, s) if per_row else (s,), d // 2)
    cos, sin = tables(theta)
    y = torch.full_like(x, float("nan"))
    kernels.forward(x, cos, sin, y)
    torch.testing.assert_close(y.cpu(), rotate_complex(x.cpu(), theta).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernels_empty_and_zero_sized_inputs(backend, device):
    x = torch.randn(0, 2, 5, 8, device=device, requires_grad=True)
    cos = torch.ones(5, 4, device=device)
    y = llmkern.ops.rope(x, cos, cos, backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernels_refuse_tables_that_require_grad(backend, device):
    x = torch.randn(1, 1, 4, 8, device=device)
    cos = torch.ones(4, 4, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="do not differentiate cos and sin"):
        llmkern.ops.rope(x, cos, cos.detach(), backend=backend)
    with torch.no_grad():  # nothing to differentiate: fine
        llmkern.ops.rope(x, cos, cos, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
def test_opcheck(backend, device, inverse):
    theta = angles((2, 5), 4)
    cos, sin = tables(theta, device)
    x = torch.randn(2, 3, 5, 8, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.llmkern.rope.default, (x, cos, sin, inverse, backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_compile_fullgraph_has_no_graph_break(backend, device):
    """On a CPU aot_eager checks the tracing (fake kernel, autograd); on a GPU inductor runs."""
    compiler = "inductor" if device == "cuda" else "aot_eager"
    theta = angles((6,), 8)
    cos, sin = tables(theta, device)

    def block(q, k):
        q = llmkern.ops.rope(q, cos, sin, backend=backend)
        k = llmkern.ops.rope(k, cos, sin, backend=backend)
        return (q * k).sum()

    qk = torch.randn(2, 6, 6, 16, device=device)  # (B, T, q and k heads, D)
    q, k = (t.transpose(1, 2).detach().requires_grad_(True) for t in (qk[:, :, :3], qk[:, :, 3:]))
    loss = torch.compile(block, fullgraph=True, backend=compiler)(q, k)
    loss.backward()
    q2, k2 = (t.detach().requires_grad_(True) for t in (q, k))
    expected = (reference.rope(q2, cos, sin) * reference.rope(k2, cos, sin)).sum()
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.grad, k2.grad, rtol=1e-5, atol=1e-5)


def test_auto_is_torch_on_cpu_tensors():
    assert llmkern._backend.resolve("rope", "auto", torch.device("cpu")) == "torch"


def test_auto_passes_over_the_kernels_for_tables_that_require_grad(monkeypatch):
    """Learned angles (tables that require grad): on a GPU "auto" takes the torch backend, which
    differentiates them, instead of a kernel that refuses the call (as an explicit one still does)."""
    rope_op = importlib.import_module("llmkern.ops.rope")
    monkeypatch.setattr(llmkern._backend, "can_run", lambda backend, op, device: True)
    x, theta = torch.randn(1, 2, 4, 8), angles((4,), 4).float().requires_grad_()
    cos, sin = theta.cos(), theta.sin()

    def auto():
        return llmkern._backend.resolve("rope", "auto", torch.device("cuda"),
                                        fits=lambda b: rope_op._fits_backend(b, x, cos, sin))

    assert auto() == "torch"
    with torch.no_grad():  # nothing to differentiate: the kernels again
        assert auto() == "triton"
    for backend in ("triton", "cuda"):
        with pytest.raises(ValueError, match=f"rope's {backend} kernels do not differentiate cos and sin"):
            rope_op._check_backend_limits(backend, x, cos, sin)


@pytest.mark.cuda
def test_auto_differentiates_learned_tables_on_a_gpu():
    theta = angles((5,), 4).float().cuda().requires_grad_()
    x = torch.randn(2, 3, 5, 8, device="cuda")
    llmkern.ops.rope(x, theta.cos(), theta.sin()).sum().backward()
    theta64 = theta.detach().double().requires_grad_()
    reference.rope(x.double(), theta64.cos(), theta64.sin()).sum().backward()
    torch.testing.assert_close(theta.grad.double(), theta64.grad, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
def test_auto_picks_triton_on_a_gpu():
    assert llmkern._backend.resolve("rope", "auto", torch.device("cuda")) == "triton"


LLAMA = (4, 32, 1023, 128)  # (B, H, S, D)


@pytest.mark.parametrize("backend, device, size", [
    pytest.param("auto", "cuda", LLAMA, id="auto-llama", marks=pytest.mark.cuda),  # auto: the triton kernels
    pytest.param("cuda", "cuda", LLAMA, id="cuda-llama", marks=pytest.mark.cuda),
    pytest.param("cuda", "cpu", (2, 4, 63, 128), id="cuda-simt-small", marks=pytest.mark.simt),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_q_of_a_fused_projection_with_gradient(backend, device, size, dtype):
    """Training shapes on the GPU (small ones in the emulator): q is a strided view of a fused
    qkv projection; bf16 rounding is round-to-nearest, so the rule holds tightly."""
    b, h, s, d = size
    theta = angles((s,), d // 2)
    cos, sin = tables(theta, device)
    qkv = torch.randn(b, s, 3 * h, d, dtype=dtype, device=device)
    q = qkv[:, :, :h].transpose(1, 2).detach().requires_grad_(True)
    dy = torch.randn(b, h, s, d, dtype=dtype, device=device)
    out = llmkern.ops.rope(q, cos, sin, backend=backend)
    out.backward(dy)
    x_cpu = q.detach().cpu()
    assert_close_to_ref(out.cpu(), rotate_complex(x_cpu, theta), rotate_lowp(x_cpu, theta), f"rope {dtype}")
    assert_close_to_ref(q.grad.cpu(), rotate_complex(dy.cpu(), -theta), rotate_lowp(dy.cpu(), -theta), "dx")


# ----------------------------------------------------------------------------- the CUDA kernel
@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", ["fused", "offset", "odd-head-dim"])
def test_cuda_kernel_writes_every_element_through_its_strides(device, inverse, dtype, layout):
    """The output is a strided view of a NaN-filled buffer: every element of the view must be
    written, and nothing outside it. "fused" takes the 16-byte path; "offset" (the view one
    element into its buffer) and "odd-head-dim" (D/2 = 5) take the scalar one."""
    kernels = importlib.import_module("llmkern.cuda.rope")
    b, h, s, d = 2, 5, 7, 10 if layout == "odd-head-dim" else 64
    x = torch.randn(b, s, h, d, dtype=dtype, device=device).transpose(1, 2)
    theta = angles((b, s), d // 2)
    cos, sin = tables(theta, device)
    buffer = torch.full((b * s * (h + 1) * d + 1,), float("nan"), dtype=dtype, device=device)
    start = 1 if layout == "offset" else 0
    fused = buffer[start : start + b * s * (h + 1) * d].view(b, s, h + 1, d)
    y = fused[:, :, :h].transpose(1, 2)  # (B, H, S, D) with the strides of a fused layout
    kernels.forward(x, cos, sin, y, inverse)
    assert not y.isnan().any()
    assert fused[:, :, h].isnan().all()  # the head outside the view is untouched
    turn = -theta if inverse else theta
    assert_close_to_ref(y.cpu(), rotate_complex(x.cpu(), turn), rotate_lowp(x.cpu(), turn), f"rope {layout}")


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("shape", [(1, 300, 3, 2), (2, 3, 2, 2050), (2, 2, 3, 1024), (3, 40, 5, 128)],
                         ids=["300-heads", "odd-2050", "1024", "40-heads"])
def test_cuda_loops_over_heads_and_pairs(device, shape):
    """More heads or pairs than one block's threads: the kernel's head and pair loops."""
    b, _, s, d = shape
    theta = angles((b, s), d // 2)
    cos, sin = tables(theta, device)
    x = torch.randn(shape, dtype=torch.bfloat16, device=device)
    out = llmkern.ops.rope(x, cos, sin, backend="cuda")
    assert_close_to_ref(out.cpu(), rotate_complex(x.cpu(), theta), rotate_lowp(x.cpu(), theta), f"rope {shape}")


@pytest.mark.cuda
def test_cuda_auto_passes_over_it_for_float64(monkeypatch):
    """With cuda first in the preference, float64 x or tables still go to another backend."""
    monkeypatch.setitem(llmkern._backend.PREFERENCE, "rope", ("cuda", "triton"))
    kernels = importlib.import_module("llmkern.cuda.rope")
    theta = angles((5,), 4)
    x = torch.randn(2, 3, 5, 8, device="cuda")
    cos, sin = tables(theta, "cuda")
    with pytest.raises(TypeError, match="for backend 'cuda'"):
        llmkern.ops.rope(x.double(), cos, sin, backend="cuda")

    def refuse(*args):
        raise AssertionError("the cuda kernel was called")

    monkeypatch.setattr(kernels, "forward", refuse)
    for xs, ts in ((x.double(), (cos, sin)), (x, (cos.double(), sin.double()))):
        out = llmkern.ops.rope(xs, *ts)
        torch.testing.assert_close(out.cpu().double(), rotate_complex(xs.cpu(), theta), rtol=1e-5, atol=1e-5)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns (so -0.0 and 0.0, or two NaNs, compare as what they are)."""
    return t.detach().view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.simt
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 3, 17, 64), (2, 4, 33, 6), (1, 40, 3, 130)], ids=["vector", "scalar", "loops"])
def test_cuda_simt_results_do_not_depend_on_the_schedule(shape, dtype):
    """The emulator runs threads and blocks forward, reversed and shuffled: a race between them
    (two threads writing one element, a read of another's output) would change the bits."""
    b, h, s, d = shape
    theta = angles((b, s), d // 2)
    cos, sin = tables(theta, "cpu")
    x = torch.randn(b, s, h, d, dtype=dtype).transpose(1, 2)  # strided, as q of a fused projection
    dy = torch.randn(shape, dtype=dtype)
    orders = ("forward", "reverse", "random:7", "random:11")
    results = []
    for order in orders:
        with simt.schedule(order):
            leaf = x.detach().requires_grad_(True)
            out = llmkern.ops.rope(leaf, cos, sin, backend="cuda")
            out.backward(dy)
        results.append((out.detach(), leaf.grad))
    (y, dx), others = results[0], results[1:]
    for order, (y_other, dx_other) in zip(orders[1:], others):
        assert torch.equal(_bits(y_other), _bits(y)), f"y changes with the schedule {order}"
        assert torch.equal(_bits(dx_other), _bits(dx)), f"dx changes with the schedule {order}"
    assert_close_to_ref(y, rotate_complex(x, theta), rotate_lowp(x, theta), f"rope {dtype} {shape}")
    assert_close_to_ref(dx, rotate_complex(dy, -theta), rotate_lowp(dy, -theta), f"rope dx {dtype} {shape}")


def test_triton_kernel_builds_for_sm80_and_sm90():
    """The interpreter never lowers the kernel; this builds its GPU code (see triton_build.py)."""
    pytest.importorskip("triton.backends.nvidia")
    from triton_build import run_build

    out = run_build('''
    import triton.language as tl
    from llmkern.triton import rope as k
    ints = ("x_stride_b", "x_stride_h", "x_stride_s", "y_stride_b", "y_stride_h", "y_stride_s", "cos_stride_b",
            "cos_stride_s", "sin_stride_b", "sin_stride_s", "n_heads", "half")
    for arch in (80, 90):
        for inverse in (False, True):
            build(k._rope_kernel, {"X": "*bf16", "COS": "*fp32", "SIN": "*fp32", "Y": "*bf16",
                                   **{n: "i32" for n in ints}},
                  {"INVERSE": inverse, "COMPUTE": tl.float32, "BLOCK_H": 32, "BLOCK_D": 64}, arch, num_warps=4)
    print("built")
    ''')
    assert "built" in out
