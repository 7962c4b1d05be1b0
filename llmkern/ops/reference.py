"""Plain-PyTorch reference of every op: the "torch" backend and the tests' oracle.

Each function computes in fp32 (or in the input's precision when that is float64) and returns
the input's dtype, so it serves both as a readable definition and as a ground truth when
called on float64 inputs.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
):
    """y = h / sqrt(mean(h**2, -1) + eps) * weight, with h = x (+ residual).

    Returns y (in out_dtype, default h's dtype), or (y, h) when residual is given: h is the
    pre-norm residual stream, rounded to residual's dtype as a transformer would store it (a
    16-bit x joins an fp32 residual exactly), and the norm is taken of that rounded h.
    """
    h = x if residual is None else x + residual  # type promotion: a bf16 x joins an fp32 stream
    ct = _compute_dtype(h.dtype)
    hf = h.to(ct)
    rstd = torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = (hf * rstd * weight.to(ct)).to(h.dtype if out_dtype is None else out_dtype)
    return y if residual is None else (y, h)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
):
    """y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias over the last dimension, h = x (+ residual);
    rounding as rms_norm's: h in residual's dtype, the norm in fp32 (float64 for float64 inputs), y in
    out_dtype (default h's). Returns y, or (y, h) when residual is given."""
    h = x if residual is None else x + residual  # type promotion: a bf16 x joins an fp32 stream
    ct = _compute_dtype(h.dtype)
    y = torch.nn.functional.layer_norm(
        h.to(ct), (h.size(-1),), weight.to(ct), None if bias is None else bias.to(ct), eps
    ).to(h.dtype if out_dtype is None else out_dtype)
    return y if residual is None else (y, h)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    attn_mask: torch.Tensor | None = None,
):
    """Softmax attention in fp32, layout (B, H, S, D); k and v may have fewer heads (GQA).

    Query i sits at position p = i + Sk - Sq (aligned to the bottom right). With causal, it sees key
    j only when j <= p; with a window (needs causal) also only when p - j < window, the last `window`
    keys up to its own. doc_ids (B, S), when given, masks packed documents too: query i sees key j
    only when doc_ids[b, i] == doc_ids[b, j]. attn_mask, when given, a boolean mask broadcastable to
    (B, H, Sq, Sk), True where a query sees a key (generation's mask), masks them too.
    softcap: Gemma 2's soft cap of the scaled scores, s -> softcap * tanh(s / softcap), before the masks
    (attn_logit_softcapping); None: none. The Triton kernels take it too (ops.attention); the CUDA ones do not,
    nor SDPA, so generation's masked path with a cap is this, with the (B, H, Sq, Sk) scores in memory.
    A query that sees no key at all (causal with Sq > Sk: the first Sq - Sk rows; a row of attn_mask all
    False) gets o = 0 and zero gradients, as the kernels give it, rather than softmax's NaN over an empty row.
    """
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be an int >= 1 or None; got {window!r}")
    if window is not None and not causal:
        raise ValueError("window needs causal=True")
    hq, hkv = q.size(1), k.size(1)
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    ct = _compute_dtype(q.dtype)
    scale = q.size(-1) ** -0.5 if scale is None else scale
    # Autocast off: it would run both matmuls in 16 bits (and round fp32 inputs to them), where the
    # kernels, and this definition, compute in fp32 whatever autocast says.
    with torch.autocast(q.device.type, enabled=False):
        scores = (q.to(ct) @ k.to(ct).transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
        if softcap is not None:
            scores = soft_cap(scores, softcap)
        sq, sk = q.size(2), k.size(2)
        empty = None  # (Sq, 1) the queries that see no key: only causal with Sq > Sk has them
        if causal:
            query_positions = torch.arange(sq, device=q.device) + (sk - sq)
            key_positions = torch.arange(sk, device=q.device)
            distance = query_positions[:, None] - key_positions[None, :]  # (Sq, Sk) how far back key j lies
            visible = distance >= 0
            if window is not None:
                visible = visible & (distance < window)
            empty = ~visible.any(dim=1, keepdim=True)
            visible = visible | empty  # softmax over all keys there (finite, no NaN in the gradient), then 0
            scores = scores.masked_fill(~visible, float("-inf"))
        if doc_ids is not None:  # a query always sees itself in its document: no row goes empty
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, Sq, Sk)
            scores = scores.masked_fill(~same_doc[:, None], float("-inf"))
        if attn_mask is not None:  # a row it leaves empty is another empty query
            unseen = ~attn_mask.any(dim=-1, keepdim=True)
            scores = scores.masked_fill(~(attn_mask | unseen), float("-inf"))
            empty = unseen if empty is None else empty | unseen
        probs = scores.softmax(dim=-1)
        if empty is not None:
            probs = probs.masked_fill(empty, 0.0)
        return (probs @ v.to(ct)).to(q.dtype)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma 2's soft-capping of attention scores and of logits: about x where |x| << cap,
    never past +-cap) in fp32 (float64 for float64 inputs), returned in x's dtype."""
    ct = _compute_dtype(x.dtype)
    return (torch.tanh(x.to(ct) / cap) * cap).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin].

    x (B, H, S, D); cos, sin (S, D/2) or (B, S, D/2), one angle per pair (x[i], x[i + D/2]).
    """
    ct = _compute_dtype(x.dtype)
    if cos.dim() == 3:  # per batch row: broadcast over the heads
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(ct), sin.to(ct)
    x1, x2 = x.to(ct).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32 (float64 for float64 inputs), returned in gate's dtype."""
    ct = _compute_dtype(gate.dtype)
    return (torch.nn.functional.silu(gate.to(ct)) * up.to(ct)).to(gate.dtype)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu(gate) (tanh-approximated, Gemma's) * up in fp32 (float64 for float64 inputs), returned in gate's dtype."""
    ct = _compute_dtype(gate.dtype)
    return (torch.nn.functional.gelu(gate.to(ct), approximate="tanh") * up.to(ct)).to(gate.dtype)


def adamw_grad_norm(
    grads: list[torch.Tensor],
    max_norm: float,
    grad_norm: torch.Tensor,
    clip_state: torch.Tensor,
    skipped: torch.Tensor,
) -> None:
    """The global gradient norm and the clip factor of llmkern.optim.AdamW, on the device.

    Writes grad_norm (0-d fp32) = ||grads||_2 accumulated in fp32; clip_state[0] = the factor
    min(1, max_norm / (norm + 1e-6)) that torch.nn.utils.clip_grad_norm_ applies;
    clip_state[1] = 1.0 when the norm is finite, else 0.0 (the step is skipped) and
    skipped (int64) is incremented. No value comes back to the host.
    """
    # Each norm in fp32 at least: a float64 gradient keeps its own precision (vector_norm refuses to narrow).
    norms = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).float() for g in grads]
    norm = torch.linalg.vector_norm(torch.stack(norms))
    grad_norm.copy_(norm)
    clip_state[0].copy_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    finite = torch.isfinite(norm)
    clip_state[1].copy_(finite.to(torch.float32))
    skipped.add_((~finite).to(skipped.dtype))


def adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    masters: list[torch.Tensor] | None,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip_state: torch.Tensor | None = None,
) -> None:
    """One AdamW step over lists of tensors, in place, with the math of torch.optim.AdamW:

        p *= 1 - lr * weight_decay                      (decoupled decay)
        m  = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
        p -= lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

    steps hold each tensor's step count, already incremented for this step. masters, when
    given, hold for each param an fp32 copy of it (or None): the update runs on the copy (with
    fp32 moments) and the param receives the rounded result. clip_state, when given, is
    [grad scale, finite flag] from adamw_grad_norm: the grads are scaled, and when the flag
    is 0 nothing changes (selected on the device, so the host never waits).
    """
    if masters is None:
        masters = [None] * len(params)
    weights = [p if m is None else m for p, m in zip(params, masters)]
    grads = [g.to(w.dtype) for g, w in zip(grads, weights)]
    if clip_state is not None:
        grads = torch._foreach_mul(grads, clip_state[0])
        originals = (weights, exp_avgs, exp_avg_sqs)
        # Update copies; commit them below only where the gradient norm was finite.
        weights, exp_avgs, exp_avg_sqs = ([t.clone() for t in ts] for ts in originals)

    torch._foreach_mul_(weights, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    for w, m, v, step in zip(weights, exp_avgs, exp_avg_sqs, steps):
        # Bias corrections in float64 from the device step (as torch does on the host).
        step64 = step.to(device=w.device, dtype=torch.float64)
        step_size = (lr / (1 - beta1**step64)).to(torch.float32)
        bias_correction2_sqrt = torch.sqrt(1 - beta2**step64).to(torch.float32)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        w.add_((m / denom) * -step_size)

    if clip_state is not None:
        finite = clip_state[1] > 0
        for original, updated in zip(sum(originals, []), [*weights, *exp_avgs, *exp_avg_sqs]):
            original.copy_(torch.where(finite, updated, original))
        weights = originals[0]
    for p, m, w in zip(params, masters, weights):
        if m is not None:
            p.copy_(w)


def fused_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    num_classes: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """F.cross_entropy(x @ weight^T + bias, target) with the full logits: the matmul in x's dtype
    (an fp32 weight is cast to a 16-bit x's dtype, as autocast does), the cross-entropy in fp32
    (float64 for float64 inputs). x (N, H), target (N,); the classes are weight's first
    num_classes rows (None: all). softcap (None or 0: none): the logits capped to
    softcap * tanh(logits / softcap) in that precision first (Gemma 2's). Returns the 0-d loss in
    that precision."""
    if num_classes is not None:
        weight = weight[:num_classes]
        bias = None if bias is None else bias[:num_classes]
    # Autocast off: the matmul runs in x's dtype, as the kernels' does (autocast's fp32 x the op has cast
    # already; a 16-bit x of the other type would otherwise be rounded to autocast's).
    with torch.autocast(x.device.type, enabled=False):
        logits = torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    logits = logits.to(_compute_dtype(x.dtype))
    if softcap:
        logits = soft_cap(logits, softcap)
    return torch.nn.functional.cross_entropy(
        logits, target.long(), ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )
