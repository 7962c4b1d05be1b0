"""Multi-tensor AdamW and global gradient norm in Triton (the optimizer is llmkern/optim/adamw.py).

One launch updates every tensor of a dtype: a pointer table (one row of addresses per tensor)
and a chunk table (one row per program: which tensor, which chunk of it) tell each program
where its BLOCK elements live. Both tables are built on the host and cached per parameter
list, so a step whose tensors did not move uploads nothing and can be captured in a CUDA
graph. Everything that changes during training (step counts, a device lr, the clip factor)
is read on the device.

The norm: one fp32 partial sum of squares per chunk, then one program sums the partials in
a fixed order and writes the norm, the clip factor, the finite flag and the skip counter.
No float atomics, so the norm is bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._cuda_bridge import on_device
from .._multi_tensor import group_by_dtype_and_master, group_indices

BLOCK = 4096  # elements per program (fp32: 16 KiB of each of p, g, m, v)
FINALIZE_BLOCK = 1024
NUM_WARPS = 8

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# The update's pointer table has one row of 7 int64 per tensor (the kernel's `row * 7`).
_COLUMNS = 7


@triton.jit
def _pointer(table, index, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The tensor address at table[index] as a pointer to DTYPE. ALIGNED promises 16-byte
    alignment, which Triton cannot know of an address it loaded: with it, 16-byte accesses."""
    pointer = tl.load(table + index).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _adamw_elements(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, offsets, mask,
    scale, decay, step_size, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr, LERP_FROM_START: tl.constexpr,
):
    """Load, update (torch.optim.AdamW's math in fp32) and store BLOCK elements; mask None: all."""
    if HAS_MASTER:
        w = tl.load(master_ptr + offsets, mask=mask)
    else:
        w = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32) * scale
    m = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)

    w = w * decay
    if LERP_FROM_START:
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - one_minus_beta1)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    w = w + tl.div_rn(m, denom) * -step_size

    tl.store(exp_avg_ptr + offsets, m.to(STATE_DTYPE), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v.to(STATE_DTYPE), mask=mask)
    if HAS_MASTER:
        tl.store(master_ptr + offsets, w, mask=mask)
    tl.store(param_ptr + offsets, w.to(PARAM_DTYPE), mask=mask)


@triton.jit
def _adamw_update_kernel(
    table,  # int64 (tensors, 7): param, grad, exp_avg, exp_avg_sq, master, step addresses; numel
    chunks,  # int32 (programs, 2): tensor row, chunk index inside that tensor
    lr_ptr,  # fp32 0-d lr on the device (LR_ON_DEVICE), else unused
    lr_hi, lr_lo,  # the float64 lr as two fp32 that sum to it (Triton passes floats as fp32)
    beta1_hi, beta1_lo, beta2_hi, beta2_lo,  # float64 betas split the same way, for bias corrections
    one_minus_beta1,  # fp32 lerp weight, rounded from float64 as torch rounds it
    beta2, one_minus_beta2, eps,  # fp32, as torch uses them
    weight_decay,  # fp32; the decay 1 - lr * weight_decay is formed in float64
    clip_state,  # fp32 [grad scale, finite flag] (HAS_CLIP), else unused
    PARAM_DTYPE: tl.constexpr,  # dtype of param and grad
    STATE_DTYPE: tl.constexpr,  # dtype of exp_avg, exp_avg_sq (fp32 with master weights)
    HAS_MASTER: tl.constexpr,  # update the fp32 master and round it into the param
    HAS_CLIP: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    LERP_FROM_START: tl.constexpr,  # torch's lerp: m + w * (g - m) for w < 0.5, else g - (g - m) * (1 - w)
    ALIGNED: tl.constexpr,  # every address in the table is 16-byte aligned
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(chunks + 2 * pid).to(tl.int64) * 7
    chunk = tl.load(chunks + 2 * pid + 1).to(tl.int64)
    numel = tl.load(table + row + 6)
    scale = 1.0
    if HAS_CLIP:
        scale = tl.load(clip_state)
        # A non-finite norm makes every tensor look empty: all loads and stores are masked off.
        numel = tl.where(tl.load(clip_state + 1) != 0.0, numel, 0)

    param_ptr = _pointer(table, row + 0, PARAM_DTYPE, ALIGNED)
    grad_ptr = _pointer(table, row + 1, PARAM_DTYPE, ALIGNED)
    exp_avg_ptr = _pointer(table, row + 2, STATE_DTYPE, ALIGNED)
    exp_avg_sq_ptr = _pointer(table, row + 3, STATE_DTYPE, ALIGNED)
    master_ptr = _pointer(table, row + 4, tl.float32, ALIGNED)  # unused without masters
    step_ptr = tl.load(table + row + 5).to(tl.pointer_type(tl.float32))

    # Per-tensor scalars in float64, like torch's host-side Python floats.
    step = tl.load(step_ptr).to(tl.float64)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = tl.cast(lr_hi, tl.float64) + tl.cast(lr_lo, tl.float64)
    beta1_64 = tl.cast(beta1_hi, tl.float64) + tl.cast(beta1_lo, tl.float64)
    beta2_64 = tl.cast(beta2_hi, tl.float64) + tl.cast(beta2_lo, tl.float64)
    bias_correction1 = 1.0 - tl.exp(step * tl.log(beta1_64))  # 1 - beta1**step (beta1 = 0 gives 1)
    bias_correction2 = 1.0 - tl.exp(step * tl.log(beta2_64))
    step_size = (lr / bias_correction1).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
    decay = (1.0 - lr * tl.cast(weight_decay, tl.float64)).to(tl.float32)

    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    if (chunk + 1) * BLOCK <= numel:  # a whole chunk: no mask, so the loads can be vectorized
        _adamw_elements(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, offsets, None,
                        scale, decay, step_size, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2,
                        eps, PARAM_DTYPE, STATE_DTYPE, HAS_MASTER, LERP_FROM_START)
    else:
        _adamw_elements(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, offsets, offsets < numel,
                        scale, decay, step_size, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2,
                        eps, PARAM_DTYPE, STATE_DTYPE, HAS_MASTER, LERP_FROM_START)


@triton.jit
def _sumsq_kernel(
    table,  # int64 (tensors, 2): grad address, numel
    chunks,  # int32 (programs, 2): tensor row, chunk index inside that tensor
    partials,  # fp32: this launch writes partials[first + pid]
    first,
    GRAD_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,  # every grad address is 16-byte aligned
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(chunks + 2 * pid).to(tl.int64) * 2
    chunk = tl.load(chunks + 2 * pid + 1).to(tl.int64)
    grad_ptr = _pointer(table, row, GRAD_DTYPE, ALIGNED)
    numel = tl.load(table + row + 1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    if (chunk + 1) * BLOCK <= numel:  # a whole chunk: unmasked, vectorizable loads
        g = tl.load(grad_ptr + offsets).to(tl.float32)
    else:
        g = tl.load(grad_ptr + offsets, mask=offsets < numel, other=0.0).to(tl.float32)
    tl.store(partials + first + pid, tl.sum(g * g, axis=0))


@triton.jit
def _norm_finalize_kernel(
    partials, count,  # fp32 partial sums of squares, summed in a fixed order
    max_norm,  # fp32 (inf: no clipping, only the finite check)
    grad_norm,  # fp32 0-d out: the global norm
    clip_state,  # fp32 [2] out: min(1, max_norm / (norm + 1e-6)), 1.0 if the norm is finite else 0.0
    skipped,  # int64 0-d, incremented when the norm is not finite
    BLOCK: tl.constexpr,
):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        acc += tl.load(partials + offsets, mask=offsets < count, other=0.0)
    norm = tl.sqrt_rn(tl.sum(acc, axis=0))
    finite = norm < float("inf")  # false for inf and NaN
    tl.store(grad_norm, norm)
    # (With a non-finite norm the factor is never used; dividing by 1 keeps NaN out of it.)
    tl.store(clip_state, tl.minimum(max_norm / (tl.where(finite, norm, 1.0) + 1e-6), 1.0))
    tl.store(clip_state + 1, finite.to(tl.float32))
    tl.store(skipped, tl.load(skipped) + (1 - finite.to(tl.int64)))


# --- host side ----------------------------------------------------------------------------


def _split_double(x: float) -> tuple[float, float]:
    """x as hi + lo, both exactly representable in fp32, so a kernel rebuilds x in float64."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return values
    # From pinned memory the copy is asynchronous; the host never waits on the GPU.
    return values.pin_memory().to(device, non_blocking=True)


def _cached(cache: dict, name: str, key: tuple, build, device: torch.device) -> torch.Tensor:
    """The device tensor built by build() for `key`, rebuilt and uploaded only when key or device changes:
    parameters moved to another GPU may keep their sizes, and even their addresses there (the key), while a
    table left on the old device would be read by kernels running on the new one (an illegal address)."""
    hit = cache.get(name)
    if hit is not None and hit[0] == key and hit[1].device == device:
        return hit[1]
    table = _to_device(build(), device)
    cache[name] = (key, table)
    return table


def _chunk_table(numels: tuple[int, ...]) -> torch.Tensor:
    """(programs, 2) int32: for each BLOCK-sized chunk of each tensor, (tensor row, chunk index)."""
    counts = torch.tensor([triton.cdiv(n, BLOCK) for n in numels], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    chunk_index = torch.arange(int(counts.sum())) - first_chunk[rows]
    return torch.stack([rows, chunk_index], dim=1).to(torch.int32).contiguous()


def grad_norm(
    grads: list[torch.Tensor],
    max_norm: float,
    grad_norm: torch.Tensor,
    clip_state: torch.Tensor,
    skipped: torch.Tensor,
    cache: dict,
) -> None:
    """The global gradient norm, the clip factor and the finite flag, on the device (see
    llmkern.ops.reference.adamw_grad_norm for the contract)."""
    device = grad_norm.device
    per_dtype = group_indices([g.dtype for g in grads])
    tables = []
    count = 0
    for dtype, idx in per_dtype.items():
        numels = tuple(grads[i].numel() for i in idx)
        key = tuple(grads[i].data_ptr() for i in idx) + numels
        table = _cached(
            cache, f"norm_table_{dtype}", key,
            lambda: torch.tensor([[grads[i].data_ptr(), grads[i].numel()] for i in idx], dtype=torch.int64), device,
        )
        chunks = _cached(cache, f"norm_chunks_{dtype}", numels, lambda: _chunk_table(numels), device)
        aligned = all(grads[i].data_ptr() % 16 == 0 for i in idx)
        tables.append((dtype, table, chunks, count, aligned))
        count += chunks.size(0)
    partials = cache.get("partials")
    if partials is None or partials.numel() < max(count, 1) or partials.device != device:  # see _cached
        partials = cache["partials"] = torch.empty(max(count, 1), dtype=torch.float32, device=device)
    with on_device(device):
        for dtype, table, chunks, first, aligned in tables:
            if chunks.size(0) > 0:
                _sumsq_kernel[(chunks.size(0),)](
                    table, chunks, partials, first, GRAD_DTYPE=_TL_DTYPES[dtype], ALIGNED=aligned,
                    BLOCK=BLOCK, num_warps=NUM_WARPS,
                )
        _norm_finalize_kernel[(1,)](
            partials, count, float(max_norm), grad_norm, clip_state, skipped, BLOCK=FINALIZE_BLOCK, num_warps=4
        )


def step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    masters: list[torch.Tensor | None] | None,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip_state: torch.Tensor | None,
    cache: dict,
) -> None:
    """One AdamW step in place, one launch per (param dtype, master or not); the contract is
    llmkern.ops.reference.adamw_step's. The optimizer checked every tensor."""
    device = params[0].device
    if masters is None:
        masters = [None] * len(params)
    lr_on_device = isinstance(lr, torch.Tensor)
    lr_hi, lr_lo = (0.0, 0.0) if lr_on_device else _split_double(lr)
    beta1_hi, beta1_lo = _split_double(beta1)
    beta2_hi, beta2_lo = _split_double(beta2)
    per_kind = group_by_dtype_and_master(params, masters)
    with on_device(device):
        for (dtype, has_master), idx in per_kind.items():
            addresses = [
                (params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                 0 if masters[i] is None else masters[i].data_ptr(), steps[i].data_ptr(), params[i].numel())
                for i in idx
            ]
            numels = tuple(row[-1] for row in addresses)
            table = _cached(
                cache, f"table_{dtype}_{has_master}", tuple(addresses),
                lambda: torch.tensor(addresses, dtype=torch.int64).reshape(-1, _COLUMNS), device,
            )
            chunks = _cached(cache, f"chunks_{dtype}_{has_master}", numels, lambda: _chunk_table(numels), device)
            if chunks.size(0) == 0:
                continue
            state_dtype = torch.float32 if has_master else dtype
            _adamw_update_kernel[(chunks.size(0),)](
                table, chunks,
                lr if lr_on_device else table,  # any pointer when lr is not on the device
                lr_hi, lr_lo, beta1_hi, beta1_lo, beta2_hi, beta2_lo,
                float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps), float(weight_decay),
                clip_state if clip_state is not None else table,
                PARAM_DTYPE=_TL_DTYPES[dtype], STATE_DTYPE=_TL_DTYPES[state_dtype],
                HAS_MASTER=has_master, HAS_CLIP=clip_state is not None, LR_ON_DEVICE=lr_on_device,
                LERP_FROM_START=(1.0 - beta1) < 0.5, ALIGNED=all(a % 16 == 0 for row in addresses for a in row[:5]),
                BLOCK=BLOCK, num_warps=NUM_WARPS,
            )
