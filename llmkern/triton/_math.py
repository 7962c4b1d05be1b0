"""Math that tl lacks, shared by the Triton kernels.

tanh_and_slope(x): tanh(x) and its derivative 1 - tanh(x)^2, for Gemma 2's soft caps (attention.py,
fused_linear_cross_entropy.py) and GeGLU's gelu_tanh (gated_activation.py). tl has no tanh, and
libdevice's is per GPU vendor and missing from Triton's interpreter (3.6 to 3.9), so it is written here
from exp, in the input's precision (fp32 or fp64):

- |x| >= SERIES_END: tanh |x| = (1 - e) / (1 + e) with e = exp(-2|x|) <= 1, so nothing overflows (at
  +-inf e = 0: tanh +-1, slope 0). 1 - e >= 0.18 there, so e's rounding costs a few units in the last
  place, relative.
- |x| < SERIES_END: 1 - e would cancel (it is ~2|x|: the old 1 - 2 / (exp(2x) + 1) lost all precision
  near 0, 0 for |x| < ~3e-8), so tanh is its odd Taylor series about 0, x - x^3/3 + 2x^5/15 - ...,
  to the term past which the rest is below the precision's rounding. It is x itself for tiny and subnormal x.
- the slope is 4e / (1 + e)^2 past SERIES_END: positive terms only, so it keeps its relative precision
  where tanh -> +-1 (1 - t*t cancels to 0 there; a GPU's fp32 exp, ex2.approx of -2|x| log2(e) rounded to fp32,
  costs it about |x| ulps more) and is exactly 0 only where e underflows; below it,
  1 - t*t (at least 0.94 there, so nothing cancels, and a rounding or two closer than 4e / (1 + e)^2).
NaN gives NaN (both), +-inf gives +-1 and slope 0, and every finite x a finite result.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Where the series takes over from the exp formula (|x| below it), and how many terms it needs there:
# fp32 through x^9 (the rest below 1e-8 relative at 0.25), fp64 through x^13 (below 2e-17 at 0.1).
SERIES_END_FP32 = tl.constexpr(0.25)
SERIES_END_FP64 = tl.constexpr(0.1)


@triton.jit
def _tanh_series(x):
    """tanh(x) for small |x| from its Taylor series: x * (1 + z * p(z)), z = x^2, p by Horner (a product, not
    x + x * z * p, so that tanh(-0) is -0)."""
    z = x * x
    if x.dtype == tl.float64:
        p = -929569.0 / 638512875.0
        p = p * z + 21844.0 / 6081075.0
        p = p * z - 1382.0 / 155925.0
        p = p * z + 62.0 / 2835.0
    else:
        p = 62.0 / 2835.0
    p = p * z - 17.0 / 315.0
    p = p * z + 2.0 / 15.0
    p = p * z - 1.0 / 3.0
    return x * (1.0 + z * p)


@triton.jit
def tanh_and_slope(x):
    """(tanh(x), 1 - tanh(x)^2) elementwise, in x's precision (fp32 or fp64); see the module docstring."""
    if x.dtype == tl.float64:
        series_end = SERIES_END_FP64
    else:
        series_end = SERIES_END_FP32
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    r = 1.0 / (1.0 + e)  # one division for both results
    t_abs = (1.0 - e) * r
    small = ax < series_end
    t = tl.where(small, _tanh_series(x), tl.where(x < 0, -t_abs, t_abs))
    # Near 0, 1 - t^2 (>= 0.94, no cancellation) is more precise than the product of e's and r's roundings.
    slope = tl.where(small, 1.0 - t * t, 4.0 * e * r * r)
    return t, slope
