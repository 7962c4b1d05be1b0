"""Row norms in Triton, forward and backward, with an optional fused residual add: RMSNorm, and
LayerNorm as its centered form (CENTERED subtracts the row mean first; HAS_BIAS adds a bias).

Same contract as csrc/cuda/norm.cuh: h = x (+ residual), rounded to the stream's dtype (h's);
    RMSNorm    y = h * rstd * w                  rstd = rsqrt(mean(h^2) + eps)
    LayerNorm  y = (h - mean) * rstd * w + b     rstd = rsqrt(mean((h - mean)^2) + eps)
all in fp32; dweight (and dbias) reduced over rows in fp32 (each program keeps an fp32 partial row,
and torch sums the partials in fp32). Every tensor is typed by its own pointer, so x and y (and
dy) may be 16-bit beside an fp32 h, as under autocast.

Rows up to MAX_SINGLE_PASS elements stay in registers between the reductions and the output;
longer rows are walked again in blocks of MAX_SINGLE_PASS (once more for LayerNorm's variance,
taken about the mean rather than as E[h^2] - mean^2, which cancels; the re-reads mostly hit L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from .._cuda_bridge import on_device

MAX_SINGLE_PASS = 16384


@triton.jit
def _load_h(X, R, H, x_row, r_row, h_row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """h of these columns in fp32: x, or x + residual rounded to h's dtype and stored."""
    h = tl.load(X + x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + r_row + cols, mask=mask, other=0.0).to(tl.float32)
        h_low = (h + r).to(H.dtype.element_ty)
        tl.store(H + h_row + cols, h_low, mask=mask)
        h = h_low.to(tl.float32)
    return h


@triton.jit
def _forward_kernel(
    X, R, W, B, Y, H,  # input, residual (or X), weight, bias (or W), output, residual-stream output
    x_stride, r_stride, y_stride, h_stride,  # row strides in elements
    n_cols, eps,
    CENTERED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # columns per step: next power of 2 of n_cols when SINGLE_PASS
    SINGLE_PASS: tl.constexpr,  # the whole row fits in one BLOCK
):
    row = tl.program_id(0).to(tl.int64)
    x_row, r_row, y_row, h_row = row * x_stride, row * r_stride, row * y_stride, row * h_stride
    offs = tl.arange(0, BLOCK)
    if SINGLE_PASS:
        mask = offs < n_cols
        h = _load_h(X, R, H, x_row, r_row, h_row, offs, mask, HAS_RESIDUAL)
        if CENTERED:
            h = tl.where(mask, h - tl.sum(h, axis=0) / n_cols, 0.0)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        y = h * rstd * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + y_row + offs, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: h (stored with a residual), and its sum (LayerNorm) or sum of squares (RMSNorm).
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            h = _load_h(X, R, H, x_row, r_row, h_row, cols, mask, HAS_RESIDUAL)
            acc += h if CENTERED else h * h
        # What h is re-read from: the stored sum, or x itself.
        if HAS_RESIDUAL:
            SRC, src_row = H, h_row
        else:
            SRC, src_row = X, x_row
        mean = 0.0
        if CENTERED:  # pass 2: the variance about the mean
            mean = tl.sum(acc, axis=0) / n_cols
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                h = tl.load(SRC + src_row + cols, mask=mask, other=0.0).to(tl.float32)
                h = tl.where(mask, h - mean, 0.0)
                acc += h * h
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            h = tl.load(SRC + src_row + cols, mask=mask, other=0.0).to(tl.float32)
            y = (h - mean) * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    DY, H, W, E, DH, PARTIAL,  # grad of y, normed input, weight, extra grad of h (or DY), grad of h, fp32 partials
    dy_stride, h_stride, e_stride, dh_stride,  # row strides in elements
    n_rows, n_cols, eps,
    CENTERED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EXTRA: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    # With g = dy * w and hhat = (h - mean) * rstd (mean = 0 for RMSNorm), per row:
    #   dh = rstd * (g - mean(g) - hhat * mean(g * hhat)) (+ extra)     (no mean(g) for RMSNorm)
    # Program p handles rows p, p + P, ... and owns row p of PARTIAL (P x n_cols fp32, dweight's)
    # and, with a bias, row P + p (dbias's).
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    pid64 = pid.to(tl.int64)  # row offsets in int64: rows * stride may pass 2**31
    partial_w = PARTIAL + pid64 * n_cols
    partial_b = PARTIAL + (n_programs + pid64) * n_cols
    if SINGLE_PASS:
        mask = offs < n_cols
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, tl.cdiv(n_rows - pid, n_programs)):
            row = pid64 + i * n_programs
            h = tl.load(H + row * h_stride + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * dy_stride + offs, mask=mask, other=0.0).to(tl.float32)
            if CENTERED:
                h = tl.where(mask, h - tl.sum(h, axis=0) / n_cols, 0.0)
            rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
            hhat = h * rstd
            g = dy * w
            dh = g - hhat * (tl.sum(g * hhat, axis=0) / n_cols)
            if CENTERED:
                dh -= tl.sum(g, axis=0) / n_cols
            dh *= rstd
            if HAS_EXTRA:
                dh += tl.load(E + row * e_stride + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DH + row * dh_stride + offs, dh.to(DH.dtype.element_ty), mask=mask)
            dw += dy * hhat
            db += dy
        tl.store(partial_w + offs, dw, mask=mask)
        if HAS_BIAS:
            tl.store(partial_b + offs, db, mask=mask)
    else:
        for start in range(0, n_cols, BLOCK):  # PARTIAL is not zeroed by the host
            cols = start + offs
            tl.store(partial_w + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < n_cols)
            if HAS_BIAS:
                tl.store(partial_b + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < n_cols)
        for i in range(0, tl.cdiv(n_rows - pid, n_programs)):
            row = pid64 + i * n_programs
            h_row, dy_row = row * h_stride, row * dy_stride
            mean = 0.0
            if CENTERED:
                sum_h = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, n_cols, BLOCK):
                    cols = start + offs
                    sum_h += tl.load(H + h_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
                mean = tl.sum(sum_h, axis=0) / n_cols
            sumsq = tl.zeros([BLOCK], dtype=tl.float32)
            dot = tl.zeros([BLOCK], dtype=tl.float32)  # sum of g * (h - mean)
            sum_g = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                h = tl.load(H + h_row + cols, mask=mask, other=0.0).to(tl.float32)
                h = tl.where(mask, h - mean, 0.0)
                dy = tl.load(DY + dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                sumsq += h * h
                dot += g * h
                sum_g += g
            rstd = tl.rsqrt(tl.sum(sumsq, axis=0) / n_cols + eps)
            mean_ghhat = tl.sum(dot, axis=0) * rstd / n_cols
            mean_g = 0.0
            if CENTERED:
                mean_g = tl.sum(sum_g, axis=0) / n_cols
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                hhat = (tl.load(H + h_row + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
                dy = tl.load(DY + dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                dh = rstd * (dy * w - mean_g - hhat * mean_ghhat)
                if HAS_EXTRA:
                    dh += tl.load(E + row * e_stride + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DH + row * dh_stride + cols, dh.to(DH.dtype.element_ty), mask=mask)
                acc = tl.load(partial_w + cols, mask=mask, other=0.0)
                tl.store(partial_w + cols, acc + dy * hhat, mask=mask)
                if HAS_BIAS:
                    acc = tl.load(partial_b + cols, mask=mask, other=0.0)
                    tl.store(partial_b + cols, acc + dy, mask=mask)


def _block_and_warps(n_cols: int) -> tuple[int, bool, int]:
    block = min(triton.next_power_of_2(n_cols), MAX_SINGLE_PASS)
    single_pass = n_cols <= MAX_SINGLE_PASS
    num_warps = 4 if block <= 2048 else 8 if block <= 4096 else 16
    return block, single_pass, num_warps


def _num_programs(x: torch.Tensor, n_rows: int) -> int:
    """Programs of the backward grid: a few per SM, so the fp32 partials of dweight stay small."""
    if x.device.type != "cuda" or triton_interpreted():
        return max(1, min(n_rows, 4))
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(n_rows, sms * 4))


def forward(x, weight, bias, residual, eps, y, h, centered: bool) -> None:
    """y (and h when residual is given) from 2-D (rows, N) views."""
    n_rows, n_cols = x.shape
    block, single_pass, num_warps = _block_and_warps(n_cols)
    has_residual = residual is not None
    r = residual if has_residual else x
    h_out = h if has_residual else y
    with on_device(x.device):  # Triton launches on the current GPU, which need not be x's
        _forward_kernel[(n_rows,)](
            x, r, weight, weight if bias is None else bias, y, h_out,
            x.stride(0), r.stride(0), y.stride(0), h_out.stride(0),
            n_cols, eps,
            CENTERED=centered, HAS_BIAS=bias is not None, HAS_RESIDUAL=has_residual,
            BLOCK=block, SINGLE_PASS=single_pass, num_warps=num_warps,
        )


def backward(dy, h, weight, dh_extra, eps, dh, dweight, dbias, centered: bool) -> None:
    """dh (plus dh_extra), dweight and (when dbias is given) dbias from 2-D (rows, N) views."""
    n_rows, n_cols = h.shape
    block, single_pass, num_warps = _block_and_warps(n_cols)
    n_programs = _num_programs(h, n_rows)
    has_bias = dbias is not None
    partial = torch.empty((2 * n_programs if has_bias else n_programs, n_cols), dtype=torch.float32,
                          device=h.device)
    has_extra = dh_extra is not None
    e = dh_extra if has_extra else dy
    with on_device(h.device):  # Triton launches on the current GPU, which need not be h's
        _backward_kernel[(n_programs,)](
            dy, h, weight, e, dh, partial,
            dy.stride(0), h.stride(0), e.stride(0), dh.stride(0),
            n_rows, n_cols, eps,
            CENTERED=centered, HAS_BIAS=has_bias, HAS_EXTRA=has_extra,
            BLOCK=block, SINGLE_PASS=single_pass, num_warps=num_warps,
        )
    dweight.copy_(partial[:n_programs].sum(dim=0))
    if has_bias:
        dbias.copy_(partial[n_programs:].sum(dim=0))
