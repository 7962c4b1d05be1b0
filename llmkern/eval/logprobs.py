"""Log-probabilities of given tokens under a GPT: the scoring primitive of multiple-choice
evaluation, DPO, PPO, GRPO and win rates.

Rows are right-padded: with causal attention a real token never sees the padding after it, so
padding needs no attention mask; its targets are -1 and score 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -1


def token_logprobs(model, ids: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log p(targets[b, t] | ids[b, :t+1]) under `model` (a llmkern GPT), 0 where targets is -1;
    temperature: of the distribution softmax(logits / temperature) that generate samples at (PPO, GRPO).

    Differentiable (runs under the caller's grad mode). The logits are made in the model's dtype and
    the log-softmax taken in fp32 by cross_entropy, which never keeps a (B, T, V) fp32 copy (a
    temperature other than 1 makes one, for the division).
    """
    if not isinstance(ids, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("ids and targets must be tensors")
    if ids.dim() != 2 or targets.shape != ids.shape:
        raise ValueError(f"ids must be (B, T) and targets the same shape; got {tuple(ids.shape)} and "
                         f"{tuple(targets.shape)}")
    return logprobs_from_hidden(model, model.hidden_states(ids), targets, temperature)


def logprobs_from_hidden(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
                         ) -> torch.Tensor:
    """token_logprobs given the model's final hidden states (B, T, C) of the ids, for a caller that
    also needs them (PPO's value head reads the same hidden states)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden (B, T, C) and targets (B, T) must agree; got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    logits = model.head(hidden)  # (B, T, V)
    vocab = logits.size(-1)
    flat_targets = targets.reshape(-1).long()
    bad = (flat_targets != IGNORE) & ((flat_targets < 0) | (flat_targets >= vocab))
    if bool(bad.any()):
        raise ValueError(f"targets must be token ids in [0, {vocab}) or -1")
    flat_logits = logits.reshape(-1, vocab).float()
    if temperature != 1:  # divided in fp32, as generate's sampler does; 1 leaves the logits as they are
        # less the row's largest first (the log-softmax is the same): a tiny temperature would overflow the
        # logits themselves to inf (inf - inf: NaN), where the shifted ones go to -inf, or stay 0 for the largest
        flat_logits = (flat_logits - flat_logits.amax(dim=-1, keepdim=True)) / temperature
    nll = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="none")
    return -nll.view_as(targets)


def sequence_logprobs(model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) the summed log-probability of each row's scored targets (those that are not -1)."""
    return token_logprobs(model, ids, targets).sum(dim=1)
