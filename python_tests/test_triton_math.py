"""llmkern/triton/_math.py: tanh_and_slope, the tanh (and its slope 1 - tanh^2) of the soft caps and GeGLU.

A one-line kernel stores both results for a tensor of inputs; they are checked against torch.tanh in float64
by relative error over a dense grid of [-50, 50] plus tiny, subnormal and huge inputs (the old formulas,
1 - 2 / (exp(2x) + 1) and 2 sigmoid(2x) - 1, had no relative precision near 0: tanh(1e-8) came out 0), and
at +-inf, +-0 and NaN. Without a GPU the kernel runs in Triton's interpreter (conftest), and its GPU code is
built for sm_90 (see triton_build.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from llmkern.triton._math import tanh_and_slope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Max relative error allowed, in units of the dtype's eps. The interpreter's exp is numpy's (correctly
# rounded); a GPU's fp32 exp (ex2.approx) and division (div.full) are each good to ~2 ulp, hence more there.
# The old formulas' relative error near 0 was ~1 (all bits lost).
ULPS = {torch.float32: 4.0 if DEVICE == "cpu" else 16.0, torch.float64: 8.0}


def exp_rounding_ulps(x: torch.Tensor) -> torch.Tensor:
    """The ulps of relative error that the slope may have at each x beyond its own roundings. A GPU's fp32 tl.exp is
    ex2.approx of -2|x| log2(e) rounded to fp32 first: that rounding (up to half an ulp of ~2.9|x|), and fp32
    log2(e)'s own, are an absolute error of the exponent, so a relative one of e = exp(-2|x|) and of the slope
    4e/(1+e)^2 past the series: up to ~1.22 |x| ulps (~33 at |x| = 44, where the slope turns subnormal, on the grid
    below). tanh, (1-e)/(1+e) there, hardly feels it. The interpreter's exp (numpy's) and a GPU's fp64 exp
    (libdevice's) round correctly: 0 there."""
    if DEVICE == "cuda" and x.dtype == torch.float32:
        return 1.25 * x.double().abs()
    return torch.zeros(x.shape, dtype=torch.float64)


@triton.jit
def _tanh_and_slope_kernel(X, T, SLOPE, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t, slope = tanh_and_slope(tl.load(X + offs, mask=mask))
    tl.store(T + offs, t, mask=mask)
    tl.store(SLOPE + offs, slope, mask=mask)


def tanh_and_slope_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(DEVICE)
    t, slope = torch.full_like(x, math.nan), torch.full_like(x, math.nan)
    block = 1024
    _tanh_and_slope_kernel[(triton.cdiv(x.numel(), block),)](x, t, slope, x.numel(), BLOCK=block)
    return t.cpu(), slope.cpu()


def inputs(dtype: torch.dtype) -> torch.Tensor:
    """A dense grid of [-50, 50], then +-10^k from the smallest subnormal up to 50 (the series' region, where
    the old formulas lost everything, and the series/exp boundary at 0.1 or 0.25 in between), in dtype."""
    tiny = torch.finfo(dtype).smallest_normal
    dense = torch.linspace(-50, 50, 200_001, dtype=torch.float64)
    logs = torch.logspace(math.log10(tiny) - 7, math.log10(50), 20_001, dtype=torch.float64)
    boundary = torch.linspace(0.09, 0.26, 20_001, dtype=torch.float64)
    points = torch.tensor([1e-30, 1e-8, tiny, tiny / 2**10, tiny * 2**-22 if dtype == torch.float32 else 5e-324],
                          dtype=torch.float64)
    x = torch.cat([dense, logs, boundary, points])
    return torch.cat([x, -x]).to(dtype)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return (got.double() - want).abs() / want.abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_tanh_and_slope_keep_their_relative_precision(dtype):
    x = inputs(dtype)
    t, slope = tanh_and_slope_of(x)
    want_t = torch.tanh(x.double())
    want_slope = torch.cosh(x.double()).reciprocal().square()  # 1 - tanh^2, without its cancellation
    assert not t.isnan().any() and not slope.isnan().any(), "NaN from a finite input"
    eps = torch.finfo(dtype).eps
    normal = want_slope >= torch.finfo(dtype).smallest_normal  # a subnormal result has no relative precision
    t_err = relative_error(t, want_t).max().item()
    slope_ulps = relative_error(slope[normal], want_slope[normal]) / eps - exp_rounding_ulps(x)[normal]
    assert t_err <= ULPS[dtype] * eps, f"tanh: max relative error {t_err:.3e}"
    assert slope_ulps.max().item() <= ULPS[dtype], f"slope: {slope_ulps.max().item():.1f} ulps of relative error"
    # Where the slope is subnormal (|x| past ~44 in fp32; none in fp64), it is within a few of the smallest steps.
    subnormal_step = torch.finfo(dtype).smallest_normal * eps
    exp_error = exp_rounding_ulps(x)[~normal] * eps * want_slope[~normal]
    assert (slope[~normal].double() - want_slope[~normal]).abs().le(4 * subnormal_step + exp_error).all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's x * x of the largest x
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_tanh_and_slope_at_the_edges(dtype):
    big = torch.finfo(dtype).max
    x = torch.tensor([math.inf, -math.inf, big, -big, 0.0, -0.0, 1e-30, -1e-30, math.nan], dtype=dtype)
    t, slope = tanh_and_slope_of(x)
    torch.testing.assert_close(t[:8], torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, -0.0, 1e-30, -1e-30], dtype=dtype),
                               rtol=0, atol=0)
    assert torch.equal(t[:6].signbit(), torch.tensor([False, True, False, True, False, True])), "tanh(-0) is -0"
    torch.testing.assert_close(slope[:8], torch.tensor([0.0] * 4 + [1.0] * 4, dtype=dtype), rtol=0, atol=0)
    assert t[8].isnan() and slope[8].isnan(), "NaN must stay NaN"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above run the compiled kernel")
def test_tanh_and_slope_build_for_sm90():
    """The interpreter runs tanh_and_slope's Python; this builds its GPU code for both precisions, whose
    series is a compile-time choice on the input's dtype."""
    pytest.importorskip("triton.backends.nvidia")
    from triton_build import run_build

    out = run_build('''
    import sys
    sys.path.insert(0, "python_tests")
    from test_triton_math import _tanh_and_slope_kernel
    for ty in ("fp32", "fp64"):
        build(_tanh_and_slope_kernel, {"X": f"*{ty}", "T": f"*{ty}", "SLOPE": f"*{ty}", "n": "i32"},
              {"BLOCK": 1024}, 90, num_warps=4)
        print(ty)
    ''')
    assert out.split() == ["fp32", "fp64"], out
