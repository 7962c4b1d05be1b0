"""RoPE: the op against a float64 rotation written with complex numbers, its gradient (the
inverse rotation), per-row angles, strided inputs, the cos/sin tables, and bad input."""

import pytest
import torch

import llmkern
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


def test_rope_refuses_a_backend_without_kernels():
    x, cos = torch.randn(1, 1, 4, 8), torch.ones(4, 4)
    with pytest.raises(ValueError, match="cannot run rope"):
        llmkern.ops.rope(x, cos, cos, backend="cuda")
