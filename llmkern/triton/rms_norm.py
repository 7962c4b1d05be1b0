"""RMSNorm forward and backward in Triton, with an optional fused residual add.

Same contract as csrc/cuda/rms_norm.cu: h = x (+ residual), rounded to the input dtype; y =
h * rsqrt(mean(h^2) + eps) * w in fp32; dweight reduced over rows in fp32 (each program keeps
an fp32 partial row, and torch sums the partials in fp32).

Rows up to MAX_SINGLE_PASS elements stay in registers between the reduction and the output;
longer rows are walked twice in blocks of MAX_SINGLE_PASS (the second pass mostly hits L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted

MAX_SINGLE_PASS = 16384


@triton.jit
def _forward_kernel(
    X, R, W, Y, H,  # input, residual (or X when absent), weight, output, residual-stream output
    x_stride, r_stride, y_stride, h_stride,  # row strides in elements
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # columns per step: next power of 2 of n_cols when SINGLE_PASS
    SINGLE_PASS: tl.constexpr,  # the whole row fits in one BLOCK
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if SINGLE_PASS:
        mask = offs < n_cols
        h = tl.load(X + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + row * r_stride + offs, mask=mask, other=0.0).to(tl.float32)
            h_low = (h + r).to(H.dtype.element_ty)
            tl.store(H + row * h_stride + offs, h_low, mask=mask)
            h = h_low.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * y_stride + offs, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            h = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(R + row * r_stride + cols, mask=mask, other=0.0).to(tl.float32)
                h_low = (h + r).to(H.dtype.element_ty)
                tl.store(H + row * h_stride + cols, h_low, mask=mask)
                h = h_low.to(tl.float32)
            acc += h * h
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            if HAS_RESIDUAL:
                h = tl.load(H + row * h_stride + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                h = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + row * y_stride + cols, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    DY, H, W, E, DH, PARTIAL,  # grad of y, normed input, weight, extra grad of h (or DY), grad of h, fp32 partials
    dy_stride, h_stride, e_stride, dh_stride,  # row strides in elements
    n_rows, n_cols, eps,
    HAS_EXTRA: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    # Program p handles rows p, p + P, ... and owns row p of PARTIAL (P x n_cols, fp32).
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    pid64 = pid.to(tl.int64)  # row offsets in int64: rows * stride may pass 2**31
    partial = PARTIAL + pid64 * n_cols
    if SINGLE_PASS:
        mask = offs < n_cols
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, tl.cdiv(n_rows - pid, n_programs)):
            row = pid64 + i * n_programs
            h = tl.load(H + row * h_stride + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * dy_stride + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
            hhat = h * rstd
            g = dy * w
            mean_ghhat = tl.sum(g * hhat, axis=0) / n_cols
            dh = rstd * (g - hhat * mean_ghhat)
            if HAS_EXTRA:
                dh += tl.load(E + row * e_stride + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DH + row * dh_stride + offs, dh.to(DH.dtype.element_ty), mask=mask)
            dw += dy * hhat
        tl.store(partial + offs, dw, mask=mask)
    else:
        for start in range(0, n_cols, BLOCK):  # PARTIAL is not zeroed by the host
            cols = start + offs
            tl.store(partial + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < n_cols)
        for i in range(0, tl.cdiv(n_rows - pid, n_programs)):
            row = pid64 + i * n_programs
            sumsq = tl.zeros([BLOCK], dtype=tl.float32)
            dot = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                h = tl.load(H + row * h_stride + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                sumsq += h * h
                dot += dy * w * h
            rstd = tl.rsqrt(tl.sum(sumsq, axis=0) / n_cols + eps)
            mean_ghhat = tl.sum(dot, axis=0) * rstd / n_cols
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                h = tl.load(H + row * h_stride + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                hhat = h * rstd
                dh = rstd * (dy * w - hhat * mean_ghhat)
                if HAS_EXTRA:
                    dh += tl.load(E + row * e_stride + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DH + row * dh_stride + cols, dh.to(DH.dtype.element_ty), mask=mask)
                acc = tl.load(partial + cols, mask=mask, other=0.0)
                tl.store(partial + cols, acc + dy * hhat, mask=mask)


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


def forward(x, weight, residual, eps, y, h) -> None:
    """y (and h when residual is given) from 2-D (rows, N) views."""
    n_rows, n_cols = x.shape
    block, single_pass, num_warps = _block_and_warps(n_cols)
    has_residual = residual is not None
    r = residual if has_residual else x
    h_out = h if has_residual else y
    _forward_kernel[(n_rows,)](
        x, r, weight, y, h_out,
        x.stride(0), r.stride(0), y.stride(0), h_out.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=has_residual, BLOCK=block, SINGLE_PASS=single_pass, num_warps=num_warps,
    )


def backward(dy, h, weight, dh_extra, eps, dh, dweight) -> None:
    """dh (plus dh_extra) and dweight from 2-D (rows, N) views."""
    n_rows, n_cols = h.shape
    block, single_pass, num_warps = _block_and_warps(n_cols)
    n_programs = _num_programs(h, n_rows)
    partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=h.device)
    has_extra = dh_extra is not None
    e = dh_extra if has_extra else dy
    _backward_kernel[(n_programs,)](
        dy, h, weight, e, dh, partial,
        dy.stride(0), h.stride(0), e.stride(0), dh.stride(0),
        n_rows, n_cols, eps,
        HAS_EXTRA=has_extra, BLOCK=block, SINGLE_PASS=single_pass, num_warps=num_warps,
    )
    dweight.copy_(partial.sum(dim=0))
