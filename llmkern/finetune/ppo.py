"""PPO for RLHF (Ouyang et al., 2022; Schulman et al., 2017): improve a policy's responses to
prompts under a reward model, kept close to a frozen reference by a per-token KL penalty.

Each iteration:
  1. rollout: sample a response to each of rollout_batch prompts (stop at end-of-text or at the template's end
     marker, as chat does: a chat-tuned policy may go on past it into a made-up next turn), generation_batch rows
     per generate call (0: all at once; fewer bound the KV cache's memory and sample the same responses);
  2. score: per-token log-probs of the policy and the reference, the policy's value estimates, and
     per-token rewards  r_t = -kl_coef * (logp_t - ref_logp_t),  plus the reward model's score of the
     whole text on the last response token (a response ended at its marker read with end-of-text after it,
     as the reward model was trained: with_end_of_text); each model reads batch_size rows a forward pass (as
     the evaluation's scoring does), so that no pass outgrows a training minibatch's memory;
  3. advantages by GAE over each response (gae below; padding handled by a mask);
  4. ppo_epochs passes over the rollout in minibatches of batch_size: the clipped policy loss plus
     vf_coef times the clipped value loss, one AdamW step per grad_accum minibatches.
The value head is a linear layer on the policy's last hidden states (one value per token); it is a
training aid and is not saved. Mean reward, KL, clip fraction and value loss go to metrics.jsonl.

Every log-prob (the policy's at sampling and in the updates, the reference's, in training and in evaluation) is
of the distribution the responses are sampled from, softmax(logits / temperature) (as TRL's trainers take them):
the ratio and the KL are then those of the sampling policy. top_k's truncation is not part of it.

Under torchrun (parallel="ddp") every rank holds the whole policy, value head, reference and optimizer
state, identical on all ranks. Each iteration draws world_size * rollout_batch prompts and every rank
samples, scores and learns from its own share (as many prompts on every rank, see rank_prompts) with its
own sampling seed (the weights and the other random numbers start the same everywhere); the advantages are whitened
with the mean and std over all ranks' response tokens, the gradients are averaged over the ranks before
each step (so every rank clips, skips and steps alike and the weights stay equal), and rank 0 logs the
metrics averaged over the ranks, evaluates, and writes files.

Layout: a rollout is a (B, T) right-padded batch of prompt + response where position t predicts
token t + 1 (targets -1 on the prompt and the padding), so log-probs, values, rewards and advantages
of a response token all sit at the position that predicts it; `mask` marks those positions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..data.sequences import cut_left, encode_sequence, keep_last
from .config import FinetuneConfig


@dataclass
class PPOConfig(FinetuneConfig):
    """FinetuneConfig plus PPO's settings. data: prompts (instruction and optional input), put in config.template.
    max_steps > 0: that many PPO iterations; else epochs passes over the prompts, rollout_batch at a time.
    batch_size is the PPO minibatch (rows per forward/backward), and the most rows any scoring pass (the log-probs,
    values and reward-model scores of a rollout or an evaluation) reads at once: one sized to train fits them."""

    reward_model: str = ""  # the reward model's run folder (llmkern finetune reward); required
    kl_coef: float = 0.05  # weight of the per-token KL penalty against the reference
    clip_range: float = 0.2  # the policy ratio is clipped to [1 - clip_range, 1 + clip_range]
    value_clip: float = 0.2  # new values may move at most this far from the rollout's (0 = no clip)
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE's lambda: 0 = one-step TD errors, 1 = Monte Carlo returns
    ppo_epochs: int = 2  # passes over each rollout
    rollout_batch: int = 16  # prompts sampled per iteration
    # rows sampled per generate call (its KV cache holds that many); 0 = all of an iteration's at once. Any value
    #   samples the same responses (see sample_responses), so a resumed run may take another
    generation_batch: int = 0
    max_new_tokens: int = 64  # the longest response
    temperature: float = 1.0  # sampling temperature (> 0: PPO needs a stochastic policy)
    top_k: int = 0  # sample among the k likeliest tokens; 0 = all
    whiten_advantages: bool = True  # normalise the advantages of each rollout to mean 0, std 1
    vf_coef: float = 0.5  # weight of the value loss
    lr: float = 1e-5
    min_lr: float = 1e-6

    EVALUATES_HELD_OUT_ONLY: ClassVar[bool] = True  # val_fraction=0: no evaluation

    def validate(self) -> PPOConfig:
        """The common checks and PPO's; the reward model is checked by run_ppo (it may be passed in)."""
        super().validate()
        if not self.data:
            raise ValueError("data must name a prompt file (.json or .jsonl with instruction and optional input)")
        for name in ("kl_coef", "vf_coef"):  # inf: every reward, or the loss, NaN
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not self.clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")
        if not self.value_clip >= 0:
            raise ValueError(f"value_clip must be >= 0 (0 = no clipping), got {self.value_clip}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("ppo_epochs", "rollout_batch", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.temperature < math.inf:  # inf: tokens drawn uniformly, whatever the policy says
            raise ValueError(f"temperature must be a finite number > 0 (PPO samples its responses), got "
                             f"{self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        check_generation_batch(self.generation_batch)
        if self.max_new_tokens >= self.max_len:  # the model's block_size may cut max_len further: run_ppo checks
            raise ValueError(f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt in max_len="
                             f"{self.max_len} tokens")
        return self


def check_generation_batch(generation_batch: int) -> None:
    """A ValueError unless generation_batch (a PPOConfig's or GRPOConfig's) is 0 (every row in one generate call)
    or a number of rows >= 1."""
    if generation_batch < 0:  # its type: the config's field check
        raise ValueError(f"generation_batch must be >= 1 (rows per generate call) or 0 (all of an iteration's rows "
                         f"in one call), got {generation_batch}")


# --- the losses and advantages ----------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over ragged rows: (advantages, returns), both (B, T).

    rewards, values, mask: (B, T). mask marks the real steps of each row (1) and the padding (0);
    a run of real steps is one episode, and the step after its last one is terminal (value 0), so
    right padding, left padding or a response in the middle of a row all work. Advantages and
    returns are 0 where mask is 0. With lam = 1, returns are the discounted rewards-to-go; with
    lam = 0, advantages are the one-step TD errors.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    for name, v, low in (("gamma", gamma, 0.0), ("lam", lam, 0.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    mask = mask.to(rewards.dtype)
    values = values.detach().to(rewards.dtype) * mask
    rewards = rewards.detach() * mask
    steps = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,) the advantage of the step after t
    for t in reversed(range(steps)):
        # The next step continues the episode only when it is real; past the end it is terminal.
        if t + 1 < steps:
            next_live, next_value = mask[:, t + 1], values[:, t + 1]
        else:
            next_live, next_value = torch.zeros_like(running), torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value * next_live - values[:, t]
        running = delta + gamma * lam * next_live * running
        advantages[:, t] = running * mask[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is set (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_moments(x: torch.Tensor, mask: torch.Tensor, sum_over_ranks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of x over the masked positions (two passes: the mean, then the squared deviations).

    sum_over_ranks (a data-parallel run's all-reduce sum of a 1-D tensor; None: one process) makes them
    the statistics of every rank's masked positions together, as one process with the whole batch would
    compute them."""
    total = sum_over_ranks or (lambda t: t)
    m = mask.to(x.dtype)
    sums = total(torch.stack([(x * m).sum(), m.sum()]))
    count = sums[1].clamp(min=1.0)
    mean = sums[0] / count
    var = total(((x - mean) ** 2 * m).sum().reshape(1))[0] / count
    return mean, var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, sum_over_ranks=None) -> torch.Tensor:
    """x shifted and scaled to mean 0 and std 1 over the masked positions (0 elsewhere); with
    sum_over_ranks, over the masked positions of all ranks (see masked_moments)."""
    _check_same_shape(x=x, mask=mask)
    mean, var = masked_moments(x, mask, sum_over_ranks)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def all_reduce_sum(info):
    """A sum over the ranks of a torchrun job for masked_moments (None in one process)."""
    if not info.is_distributed:
        return None
    import torch.distributed as dist

    def total(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    return total


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss and the fraction of tokens where the clip was active.

    ratio = exp(logprobs - old_logprobs); per token max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)),
    averaged over the masked tokens (the pessimistic bound of Schulman et al., 2017).
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    per_token, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_range)
    return masked_mean(per_token, mask), masked_mean(clipped.float(), mask).detach()


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float, clip_range_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (the loss max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range_high)), where the clip
    was active (bool)), ratio = exp(logprobs - old_logprobs); clip_range_high None: clip_range (DAPO's
    "clip-higher" sets it larger). Unreduced, for ppo_policy_loss and GRPO's aggregations."""
    high = clip_range if clip_range_high is None else clip_range_high
    # c <= 0 (or NaN) clamps every ratio into an empty range: a wrong loss, no error
    for name, c in (("clip_range", clip_range), ("clip_range_high", high)):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
            raise ValueError(f"{name} must be a number > 0, got {c!r}")
    ratio = torch.exp(logprobs - old_logprobs.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   value_clip: float) -> torch.Tensor:
    """0.5 * the larger of the squared errors of the new values and of the values clipped to
    old_values +- value_clip, averaged over the masked tokens (value_clip <= 0: no clipping)."""
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    # NaN would read as "no clipping" below
    if isinstance(value_clip, bool) or not isinstance(value_clip, (int, float)) or math.isnan(value_clip):
        raise ValueError(f"value_clip must be a number (<= 0: no clipping), got {value_clip!r}")
    error = (values - returns) ** 2
    if value_clip > 0:
        clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        error = torch.maximum(error, (clipped - returns) ** 2)
    return 0.5 * masked_mean(error, mask)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shape = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, time), got shape {tuple(t.shape)}")
        if shape is None:
            shape, first = t.shape, name
        elif t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, {first} has {tuple(shape)}: they must match")


# --- the policy and its value head -------------------------------------------------------------------

class PolicyWithValue(nn.Module):
    """A GPT policy and a scalar value head on its last hidden states (one value per position)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.n_embd, 1).to(policy.device)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: the first advantages are the returns
        nn.init.zeros_(self.value_head.bias)

    @property
    def device(self) -> torch.device:
        """The policy's device (a GPT's, which the value head shares)."""
        return self.policy.device

    def forward(self, ids: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(targets) (B, T), values (B, T)), both fp32; log-probs are 0 where targets is -1, of
        softmax(logits / temperature)."""
        logprobs, values, _ = self.outputs_with_aux_loss(ids, targets, temperature=temperature)
        return logprobs, values

    def outputs_with_aux_loss(self, ids: torch.Tensor, targets: torch.Tensor, token_mask: torch.Tensor | None = None,
                              temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """forward's (log-probs, values), and the policy's load-balancing loss over the real tokens (token_mask
        (B, T) bool; None: all), None for a dense policy or in eval mode (see finetune.aux_loss)."""
        from ..eval.logprobs import logprobs_from_hidden

        # (B, T, C): one forward pass for both outputs
        hidden, aux = self.policy.hidden_states_with_aux_loss(ids, token_mask)
        logprobs = logprobs_from_hidden(self.policy, hidden, targets, temperature)  # (B, T)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # (B, T)
        return logprobs.float(), values.float(), aux


# --- rollouts -------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """A batch of sampled responses and what PPO needs of them; tensors (B, T) unless noted."""

    ids: torch.Tensor  # prompt + response, minus the last token, right-padded
    targets: torch.Tensor  # the next token at each position; -1 on the prompt and the padding
    mask: torch.Tensor  # bool: the positions that predict a response token
    logprobs: torch.Tensor  # the policy's, at sampling time
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor  # the KL penalty per token plus the score on the last response token
    scores: torch.Tensor  # (B,) the reward model's
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None  # bool: where ids holds a real token, not padding (None: everywhere)


def rollout_rows(prompts: list[list[int]], responses: list[list[int]], pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, targets) (B, T) of prompt + response rows: position t predicts token t + 1, and only
    response tokens are targets (-1 elsewhere)."""
    from .data import IGNORE, pad_batch

    id_rows, target_rows = [], []
    for prompt, response in zip(prompts, responses):
        tokens = prompt + response
        id_rows.append(tokens[:-1])
        target_rows.append([IGNORE] * (len(prompt) - 1) + response)
    ids = pad_batch(id_rows, pad_id)
    return ids, pad_batch(target_rows, IGNORE, ids.size(1))


def check_rows_per_pass(rows_per_pass: int | None) -> None:
    """A ValueError unless rows_per_pass is None (every row in one pass) or an int >= 1."""
    if rows_per_pass is not None and (isinstance(rows_per_pass, bool) or not isinstance(rows_per_pass, int)
                                      or rows_per_pass < 1):
        raise ValueError(f"rows_per_pass must be an int >= 1 (rows per forward pass) or None (all in one), got "
                         f"{rows_per_pass!r}")


def in_row_chunks(forward, rows_per_pass: int | None, *batch: torch.Tensor):
    """forward(*batch) run on rows_per_pass rows of the batch's tensors (each (B, ...)) at a time (None: all B
    in one pass), its outputs (a tensor, or a tuple of them, each (rows, ...)) put back together along the rows.

    A forward pass's memory grows with its rows (the logits alone are (rows, T, V)), so the scoring passes over a
    whole rollout take no more rows than a training minibatch, which fits. Each row is computed from its own
    inputs, as in one pass, so the outputs are one pass's up to the rounding of another batch size."""
    check_rows_per_pass(rows_per_pass)
    rows = batch[0].size(0)
    per_pass = rows_per_pass or max(rows, 1)
    outputs = [forward(*(t[start : start + per_pass] for t in batch)) for start in range(0, max(rows, 1), per_pass)]
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)


@torch.no_grad()
def frozen_logprobs(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, rows_per_pass: int | None,
                    temperature: float = 1.0) -> torch.Tensor:
    """token_logprobs of `model` (B, T) fp32 at `temperature`, without gradients, rows_per_pass rows a forward
    pass (in_row_chunks; None: all at once)."""
    from ..eval.logprobs import token_logprobs

    return in_row_chunks(lambda i, t: token_logprobs(model, i, t, temperature).float(), rows_per_pass, ids, targets)


@torch.no_grad()
def score_rollout(model: PolicyWithValue, reference: nn.Module, reward_model, prompts: list[list[int]],
                  responses: list[list[int]], pad_id: int, kl_coef: float, bos_token: int | None = None,
                  temperature: float = 1.0, stop=None, rows_per_pass: int | None = None) -> Rollout:
    """Log-probs, reference log-probs, values, reward-model scores and per-token rewards of sampled
    responses (each at least one token long). pad_id: end-of-text, which also pads. bos_token: the tokenizer's
    begin-of-sequence token, which starts every prompt and stays first in what the reward model reads (None: the
    tokenizer has none). temperature: the sampling temperature, which the log-probs are taken at. stop: the
    sampling's (templates.response_stop): a response ended at the template's end marker is scored with
    end-of-text after it (with_end_of_text). rows_per_pass: the most rows each model (policy, reference, reward
    model) reads in one forward pass (in_row_chunks; None: all at once)."""
    device = next(model.parameters()).device
    ids, targets = rollout_rows(prompts, responses, pad_id)
    ids, targets = ids.to(device), targets.to(device)
    mask = targets != -1
    logprobs, values = in_row_chunks(lambda i, t: model(i, t, temperature), rows_per_pass, ids, targets)
    ref_logprobs = frozen_logprobs(reference, ids, targets, rows_per_pass, temperature)

    scores = reward_model_scores(reward_model, prompts, with_end_of_text(responses, pad_id, stop), pad_id, device,
                                 bos_token, rows_per_pass)

    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = torch.tensor([len(p) + len(r) - 2 for p, r in zip(prompts, responses)], device=device)
    rewards[torch.arange(len(prompts), device=device), last] += scores
    token_mask = torch.arange(ids.size(1), device=device) <= last.unsqueeze(-1)  # a row's ids end at `last`
    return Rollout(ids, targets, mask, logprobs * mask, ref_logprobs * mask, values * mask, rewards, scores,
                   token_mask=token_mask)


@torch.no_grad()
def reward_model_scores(reward_model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                        device: torch.device, bos_token: int | None = None, rows_per_pass: int | None = None
                        ) -> torch.Tensor:
    """(B,) fp32 the reward model's score of each prompt + response text (its ids on `device`). bos_token: as
    score_rollout's; rows_per_pass: the most texts it reads in one forward pass (None: all at once), each padded as
    in one pass of all of them."""
    from .reward import make_score_batch

    # The reward model reads the whole text; a llmkern RewardModel only its last block_size tokens.
    limit = reward_model.body.config.block_size if hasattr(reward_model, "body") else None
    keep_first = 0 if bos_token is None else 1
    texts = [keep_last(p + r, limit, keep_first) if limit else p + r for p, r in zip(prompts, responses)]
    score_ids, lengths = make_score_batch(texts, pad_id)
    return in_row_chunks(lambda i, n: reward_model(i, n).float().reshape(-1), rows_per_pass, score_ids.to(device),
                         lengths.to(device))


def with_end_of_text(responses: list[list[int]], eot: int, stop=None) -> list[list[int]]:
    """The responses as a reward model is to read them: one that sampling ended at the template's end marker
    (`stop`, templates.response_stop) with `eot` after it, since a reward model is trained on prompt + output +
    end marker + end-of-text and reads its score there (reward.encode_pair_text); the others (ended at eot, or cut
    at max_new_tokens) as they are."""
    return [response + [eot] if ended_at_marker(response, eot, stop) else response for response in responses]


def ended_at_marker(response: list[int], eot: int, stop=None) -> bool:
    """Whether `response` ends with the template's end marker (`stop` true of it), not with end-of-text; never
    without a stop."""
    return stop is not None and response[-1:] != [eot] and bool(stop(response))


def sample_responses(policy: nn.Module, prompts: list[list[int]], config, eot: int, seed: int, stop=None,
                     first_row: int = 0) -> list[list[int]]:
    """A sampled response (new tokens, ending with eot unless cut at max_new_tokens) per prompt, in the prompts'
    order; config gives max_new_tokens, temperature, top_k and generation_batch (a PPOConfig's or GRPOConfig's).
    Rows of one prompt repeated draw different responses (each row its own stream of `seed`). stop:
    generate's (templates.response_stop: a response also ends with the template's end marker); None: at eot
    alone.

    The rows go to generate generation_batch at a time (0: all in one call), so that its KV cache holds no more;
    each call is told where its rows start (generate's first_row), so that every row draws from the stream it
    would in one call of all the rows: the responses are the same whatever generation_batch (up to generate's
    batching rounding; and for a longrope model, whose tables a call picks by its longest row, but where a call's
    rows cross the original context). first_row: the index of prompts[0] among a larger batch sampled a part at a
    time (the evaluation's, rollout_batch prompts a part), whose rows then draw as in one call of it all."""
    from ..model import generate

    per_call = config.generation_batch or max(len(prompts), 1)
    responses = []
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start : start + per_call]
        out = generate(policy, chunk, config.max_new_tokens, temperature=config.temperature,
                       top_k=config.top_k or None, eos_token=eot, seed=seed, stop=stop, first_row=first_row + start)
        responses += [row[len(prompt):] for prompt, row in zip(chunk, out)]
    return responses


def logprob_temperature(config) -> float:
    """The temperature every log-prob of a recipe's rollout is taken at: config's sampling temperature (a
    PPOConfig's or GRPOConfig's), so that the ratios and the KL are of the distribution sampled; 1 (the policy's
    own) for a config that names none (a caller's own minibatch settings for ppo_update or grpo_update)."""
    return getattr(config, "temperature", 1.0)


# --- one PPO update --------------------------------------------------------------------------------------

def ppo_update(model: PolicyWithValue, optimizer, rollout: Rollout, config: PPOConfig, lr_at, step: int,
               autocast, info=None) -> tuple[int, dict[str, float]]:
    """ppo_epochs passes of minibatch updates over a scored rollout with advantages; returns the next
    optimizer step and the means of the losses ("loss" the objective: policy_loss + vf_coef * value_loss, plus
    router_aux_loss_coef * aux_loss for a mixture-of-experts policy, see finetune.aux_loss) and the clip fraction.
    Under torchrun (`info`) every rank
    must hold as many rows, so that all take the same number of steps; the gradients are averaged over
    the ranks before each one."""
    from ..train import distributed
    from .aux_loss import with_aux_loss

    info = info or distributed.detect()
    trainable = [p for p in model.parameters() if p.requires_grad]
    rows = rollout.ids.size(0)
    totals = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0}
    count = pending = 0
    # Train mode, for activation checkpointing. The old log-probs were taken in eval mode, so any dropout
    # (the model's or LoRA's) makes the ratios noisy: PPO is best run with dropout 0.
    model.train()
    n_minibatches = -(-rows // config.batch_size)
    for _ in range(config.ppo_epochs):
        order = torch.randperm(rows, device=rollout.ids.device)
        for index, start in enumerate(range(0, rows, config.batch_size)):
            # each step's gradient the mean of its minibatches': a short last group is not scaled down
            in_group = min(config.grad_accum, n_minibatches - index // config.grad_accum * config.grad_accum)
            mb = order[start : start + config.batch_size]
            token_mask = None if rollout.token_mask is None else rollout.token_mask[mb]
            with autocast():
                logprobs, values, aux = model.outputs_with_aux_loss(rollout.ids[mb], rollout.targets[mb], token_mask,
                                                                    temperature=logprob_temperature(config))
            mask = rollout.mask[mb]
            policy_loss, clip_fraction = ppo_policy_loss(logprobs, rollout.logprobs[mb], rollout.advantages[mb],
                                                         mask, config.clip_range)
            value_loss = ppo_value_loss(values, rollout.values[mb], rollout.returns[mb], mask, config.value_clip)
            loss, aux_metrics = policy_loss + config.vf_coef * value_loss, {}
            if aux is not None:  # a mixture-of-experts policy's load balancing (finetune.aux_loss)
                loss, aux_metrics = with_aux_loss(loss, aux, model.policy.config)
            (loss / in_group).backward()
            pending += 1
            last_minibatch = start + config.batch_size >= rows
            if pending == config.grad_accum or last_minibatch:
                optimizer_step(optimizer, trainable, lr_at(step), info)
                step, pending = step + 1, 0
            totals["loss"] += float(loss.detach())
            totals["policy_loss"] += float(policy_loss.detach())
            totals["value_loss"] += float(value_loss.detach())
            totals["clip_fraction"] += float(clip_fraction)
            if "aux_loss" in aux_metrics:  # its "loss" is the one before the aux term; PPO logs the objective
                totals["aux_loss"] = totals.get("aux_loss", 0.0) + float(aux_metrics["aux_loss"])
            count += 1
    return step, {k: v / count for k, v in totals.items()}


def optimizer_step(optimizer, trainable: list[nn.Parameter], lr: float, info) -> None:
    """One step of an on-policy recipe's update (PPO's, GRPO's) at learning rate lr, its gradients first averaged
    over the ranks (the same averaged norm everywhere: all clip or skip alike), then cleared."""
    from .loop import average_gradients

    for group in optimizer.param_groups:
        group["lr"] = lr
    average_gradients(trainable, info)
    optimizer.step()  # skips itself on a non-finite gradient norm
    optimizer.zero_grad(set_to_none=True)


def mean_over_ranks(metrics: dict[str, float], info, device: torch.device) -> dict[str, float]:
    """An iteration's metrics averaged over the ranks (each rank's from as many responses: the mean of the ranks'
    means is the whole mean), tokens_per_s summed (the job's throughput); as they are in one process."""
    from ..train import distributed

    if not info.is_distributed:
        return metrics
    means = distributed.all_reduce_mean(torch.tensor(list(metrics.values()), dtype=torch.float64, device=device),
                                        info).tolist()
    metrics = dict(zip(metrics, means))
    metrics["tokens_per_s"] *= info.world_size
    return metrics


def ppo_iteration(model: PolicyWithValue, reference: nn.Module, reward_model, optimizer, prompts: list[list[int]],
                  config: PPOConfig, eot: int, seed: int, lr_at, step: int, autocast, info=None,
                  bos_token: int | None = None, stop=None) -> tuple[int, dict[str, float]]:
    """Sample, score and learn from one batch of prompts; (next optimizer step, metrics). Under torchrun
    (`info`) `prompts` is this rank's share (as many on every rank) and `seed` its own; the metrics are
    the means over the ranks (tokens_per_s their sum). bos_token: as score_rollout's; stop: sample_responses's."""
    from ..train import distributed

    info = info or distributed.detect()
    started = time.perf_counter()
    model.eval()
    with autocast():
        responses = sample_responses(model.policy, prompts, config, eot, seed, stop)
        rollout = score_rollout(model, reference, reward_model, prompts, responses, eot, config.kl_coef, bos_token,
                                logprob_temperature(config), stop, rows_per_pass=config.batch_size)
    advantages, returns = gae(rollout.rewards, rollout.values, rollout.mask, config.gamma, config.lam)
    rollout.returns = returns
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, rollout.mask, sum_over_ranks=all_reduce_sum(info))
    rollout.advantages = advantages
    step, losses = ppo_update(model, optimizer, rollout, config, lr_at, step, autocast, info)

    kl_per_row = (rollout.logprobs - rollout.ref_logprobs).sum(dim=1)  # (B,) summed over the response
    new_tokens = sum(len(r) for r in responses)
    metrics = {
        "reward": float(rollout.scores.mean()),
        "kl": float(kl_per_row.mean()),
        "non_score_reward": float((rollout.rewards.sum(dim=1) - rollout.scores).mean()),
        "response_length": new_tokens / len(responses),
        **losses,  # "loss" first: the objective trained on (with a MoE policy's load balancing, finetune.aux_loss)
        "tokens_per_s": new_tokens / max(time.perf_counter() - started, 1e-9),
    }
    return step, mean_over_ranks(metrics, info, rollout.ids.device)


@torch.no_grad()
def evaluate_prompts(model: PolicyWithValue, reference: nn.Module, reward_model, prompts: list[list[int]],
                     config: PPOConfig, eot: int, autocast, bos_token: int | None = None, stop=None
                     ) -> dict[str, float]:
    """Mean reward-model score and KL of the policy's samples on held-out prompts (a fixed seed), the KL at the
    sampling temperature as in training. bos_token: as score_rollout's; stop: sample_responses's."""
    model.eval()
    scores, kls = [], []
    for start in range(0, len(prompts), config.rollout_batch):
        chunk = prompts[start : start + config.rollout_batch]
        with autocast():
            responses = sample_responses(model.policy, chunk, config, eot, seed=config.seed + 1, stop=stop,
                                         first_row=start)
            rollout = score_rollout(model, reference, reward_model, chunk, responses, eot, config.kl_coef, bos_token,
                                    logprob_temperature(config), stop, rows_per_pass=config.batch_size)
        scores += rollout.scores.tolist()
        kls += (rollout.logprobs - rollout.ref_logprobs).sum(dim=1).tolist()
    return {"val_reward": sum(scores) / len(scores), "val_kl": sum(kls) / len(kls)}


# --- the run ----------------------------------------------------------------------------------------------

def rank_prompts(batch: list, info) -> list:
    """This rank's share of an iteration's prompts: every world_size-th from the rank-th, cut to the
    shortest share (a short batch at an epoch's end drops at most world_size - 1 prompts), since every
    rank must take as many optimizer steps. A batch of fewer prompts than ranks (an epoch's last) gives
    each rank one of them, some to two ranks (which sample different responses): else every rank had
    none, and an iteration of no prompts cannot take its steps."""
    if len(batch) < info.world_size:
        return [batch[info.rank % len(batch)]]
    share = len(batch) // info.world_size
    return batch[info.rank :: info.world_size][:share]


def sampling_seed(seed: int, iteration: int, info) -> int:
    """The seed of an iteration's sampling on this rank: the ranks draw different responses (one process:
    seed * 1_000_003 + iteration)."""
    return (seed * 1_000_003 + iteration) * info.world_size + info.rank


MAX_EVAL_PROMPTS = 64  # held-out prompts sampled at each evaluation

# The settings that make PPO's objective, its rollouts and its rewards: a resumed run must share them. The
# reward model is compared by content, not by its path (reward_model_sha256), and the reference is the base
# (base_sha256).
PPO_OBJECTIVE = ("kl_coef", "clip_range", "value_clip", "gamma", "lam", "ppo_epochs", "max_new_tokens",
                 "temperature", "top_k", "whiten_advantages", "vf_coef")


def load_prompts(path: str, tokenizer, max_prompt_len: int, prompt_format=None) -> list[list[int]]:
    """The prompt of each example (instruction and optional input) in prompt_format (default Alpaca), as
    tokens, keeping the last max_prompt_len tokens of a longer one (its end, e.g. "### Response:", leads
    into the response); the tokenizer's begin-of-sequence token, where it has one, stays first and counts
    in max_prompt_len."""
    from .data import load_prompt_data

    return encode_prompts(load_prompt_data(path), tokenizer, max_prompt_len, prompt_format)


def encode_prompts(rows: list[dict[str, Any]], tokenizer, max_prompt_len: int, prompt_format=None) -> list[list[int]]:
    """load_prompts of examples already read (load_prompt_data)."""
    from .templates import PromptFormat

    fmt = prompt_format or PromptFormat()
    return [cut_left(tokenizer, encode_sequence(tokenizer, fmt.prompt(row)), max_prompt_len) for row in rows]


def module_fingerprint(module) -> str | None:
    """A sha256 of a reward model passed to run_ppo as a module: its class's name and its state dict (names,
    dtypes, shapes and values), so that a resumed run scores with the same one. Its code is not seen: two
    classes of one name and the same weights count as one. None for a scorer that is no nn.Module."""
    if not isinstance(module, nn.Module):
        return None
    digest = hashlib.sha256(type(module).__qualname__.encode("utf-8"))
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode("utf-8"))
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


PPO_CHARTS = ("reward", "kl")  # metrics.jsonl's charts beyond loss and lr


def _check_before_loading(config: PPOConfig, reward_model: nn.Module | None) -> list[dict[str, Any]]:
    """What can be told wrong before any model is loaded: the settings, the base, the prompt file, the run folder
    and the reward model's folder; the prompt file's rows."""
    from .base import check_exists, require_base
    from .data import load_prompt_data
    from .loop import check_run_folder

    if not isinstance(config, PPOConfig):
        raise TypeError(f"config must be a PPOConfig, got {type(config).__name__}")
    config.validate()
    refuse_sharding_and_float16(config, "PPO")
    if reward_model is None and not config.reward_model:
        raise ValueError("reward_model must name a reward model's run folder (train one with "
                         "`llmkern finetune reward`)")
    require_base(config)
    prompt_rows = load_prompt_data(config.data)
    check_run_folder(config)
    if reward_model is None:
        check_exists("reward_model", config.reward_model)
    return prompt_rows


def refuse_sharding_and_float16(config, method: str) -> None:
    """The settings an on-policy recipe (`method`: "PPO", "GRPO") cannot run: parallel='fsdp' (every rank samples
    with the whole policy) and dtype='float16' (its updates do not scale the loss)."""
    if config.parallel != "ddp":
        raise ValueError(f"{method} runs in one process or data-parallel under torchrun (parallel='ddp') and takes "
                         f"no parallel={config.parallel!r}; only the supervised recipes (sft, classify, reward, dpo) "
                         f"shard with parallel='fsdp'")
    if config.dtype == "float16":  # its updates do not scale the loss (yet): fp16 gradients would underflow
        raise ValueError(f"{method} takes dtype 'auto', 'bfloat16' or 'float32', not 'float16'; only the supervised "
                         f"recipes (sft, classify, reward, dpo) train in float16 with loss scaling")


def _max_prompt_len(config: PPOConfig, policy: nn.Module) -> int:
    """The longest prompt that leaves room for max_new_tokens within max_len and the model's block_size."""
    from .base import effective_max_len

    max_total = effective_max_len(config, policy)
    if config.max_new_tokens >= max_total:
        raise ValueError(f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in "
                         f"{max_total} tokens (max_len and the model's block_size)")
    return max_total - config.max_new_tokens


def _load_reward_model(config: PPOConfig, device: torch.device, tokenizer, fmt) -> tuple[nn.Module, str]:
    """config.reward_model's run on `device` and its fingerprint (by content, as the base's: a moved copy of the
    reward model resumes, another one at that path does not). Its tokenizer must be the policy's; a warning
    when it was trained on another template than the policy's prompts use."""
    from ..data.tokenizer import same_tokenizer
    from .base import base_fingerprint, checkpoint_of
    from .reward import load_reward_run
    from .templates import saved_prompt_format

    source = checkpoint_of(config.reward_model)  # resolved once, so the weights hashed are the ones loaded
    reward_model, rm_tokenizer, rm_meta = load_reward_run(source, device)
    reward_sha256 = base_fingerprint(source, reward_model.body.config.to_dict())
    if not same_tokenizer(rm_tokenizer.spec, tokenizer.spec):
        raise ValueError(f"the reward model uses tokenizer {rm_tokenizer.spec!r}, the policy "
                         f"{tokenizer.spec!r}: they must match")
    rm_format = saved_prompt_format(rm_meta)
    if rm_format != fmt:  # it will score text laid out unlike anything it was trained on
        warnings.warn(f"the reward model {config.reward_model!r} was trained with template "
                      f"{rm_format.template!r} (system prompt {rm_format.system_prompt!r}), the policy's prompts "
                      f"use {fmt.template!r} (system prompt {fmt.system_prompt!r})",
                      stacklevel=4)  # at the caller of run_ppo (through _frozen_reward_model)
    return reward_model, reward_sha256


def _frozen_reward_model(config: PPOConfig, reward_model, device: torch.device, tokenizer, fmt
                         ) -> tuple[Any, str | None]:
    """(the reward model to score with, its fingerprint for the run's position): `reward_model` if given, else
    config.reward_model's run; a module is moved to `device`, put in eval mode and frozen."""
    if reward_model is None:
        reward_model, reward_sha256 = _load_reward_model(config, device, tokenizer, fmt)
    else:
        reward_sha256 = module_fingerprint(reward_model)
    if isinstance(reward_model, nn.Module):
        reward_model.to(device).eval().requires_grad_(False)
    return reward_model, reward_sha256


def _train_and_val_prompts(prompt_rows: list[dict[str, Any]], tokenizer, max_prompt_len: int, fmt, config: PPOConfig,
                           info) -> tuple[list[list[int]], list[list[int]]]:
    """The prompts as tokens, split into training prompts (at least one per rank) and at most MAX_EVAL_PROMPTS
    held-out ones."""
    return split_prompts(encode_prompts(prompt_rows, tokenizer, max_prompt_len, fmt), config, info)


def split_prompts(prompts: list, config, info) -> tuple[list, list]:
    """(training prompts, held-out prompts): config.val_fraction of `prompts` (any items: token lists, or GRPO's
    prompts with their answers) held out by a seeded shuffle and cut to MAX_EVAL_PROMPTS; a ValueError when
    fewer training prompts than ranks are left (each needs at least one)."""
    from .data import split_examples

    train, val = split_examples(prompts, config.val_fraction, config.seed)
    val = val[:MAX_EVAL_PROMPTS]
    if len(train) < info.world_size:
        raise ValueError(f"data has {len(train)} training prompts, fewer than the {info.world_size} processes: "
                         f"each needs at least one")
    return train, val


def _ppo_position(train: list[list[int]], config: PPOConfig, iterations: int, world_size: int,
                  fingerprints: dict[str, str | None], objective: tuple[str, ...] = PPO_OBJECTIVE) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the number of iterations, the prompts, the batch
    and seed settings, the template, LoRA's settings, the objective's settings (`objective`: their names; GRPO
    passes its own), and the base and reward model (fingerprints: base_sha256 and reward_model_sha256)."""
    from .loop import examples_fingerprint, lora_position, template_position

    return {"iterations": iterations, "prompts": len(train), "rollout_batch": config.rollout_batch,
            "batch_size": config.batch_size, "grad_accum": config.grad_accum, "seed": config.seed,
            "world_size": world_size, **template_position(config), **lora_position(config),
            **{name: getattr(config, name) for name in objective},
            "examples_sha256": examples_fingerprint(train), **fingerprints}


class _PPORun:
    """run_ppo's training: the policy with its value head, the frozen reference and reward model, the optimizer,
    schedule and metrics log, and the counters an iteration hands to the next (PPO iterations done, optimizer
    steps taken), which the training state saves and a resumed run restores. run_ppo calls its methods in the
    algorithm's order. Another on-policy recipe (GRPO) subclasses it: METHOD, CHARTS, updates_per_iteration,
    run_position, learn and evaluate_prompts are what differ."""

    METHOD: ClassVar[str] = "ppo"  # in the progress bar and the messages
    CHARTS: ClassVar[tuple[str, ...]] = PPO_CHARTS

    def __init__(self, model: PolicyWithValue, reference: nn.Module, reward_model, train: list[list[int]],
                 val: list[list[int]], config: PPOConfig, info, eot: int, fingerprints: dict[str, str | None],
                 bos_token: int | None = None, stop=None):
        """Count the iterations and optimizer steps, make the optimizer and open the run folder: a fresh log, or
        on resume the training state restored (weights, optimizer, RNG states) and the counters. bos_token: the
        tokenizer's begin-of-sequence token, which starts every prompt (None: it has none); stop: what ends a
        sampled response besides eot (templates.response_stop; None: eot alone)."""
        from ..train.metrics import CollectiveMetricsLog
        from .loop import make_optimizer, open_run, train_state_dir

        self.model, self.reference, self.reward_model = model, reference, reward_model
        self.train_prompts, self.val, self.config, self.info, self.eot = train, val, config, info, eot
        self.bos_token, self.stop = bos_token, stop
        self.device = model.device
        self.global_batch = config.rollout_batch * info.world_size  # prompts per iteration, over all ranks
        self.iterations = config.max_steps or config.epochs * math.ceil(len(train) / self.global_batch)
        self.total_updates = self.iterations * self.updates_per_iteration()
        self.optimizer = make_optimizer(list(model.parameters()), config)
        self.state_dir = train_state_dir(config)
        self.position = self.run_position(fingerprints)
        log, self.counters, evals = open_run(config, model, self.optimizer, self.position)
        # every rank calls its writes and plots alike; rank 0's evaluation alone writes log.plain (evaluate_on_rank_0)
        self.log = CollectiveMetricsLog(log, info, self.device)
        self.first_eval, self.last_eval = (evals[0], evals[-1]) if evals else (None, None)
        self.last_metrics: dict[str, float] = {}
        self.start_it = self.step = 0  # PPO iterations done, optimizer steps taken
        self.evaluates = bool(val) and info.is_main  # the ranks hold the same policy: one evaluation tells all
        self.started = math.nan  # when the iterations began (train)

    def updates_per_iteration(self) -> int:
        """Optimizer steps per iteration: ppo_epochs passes over rollout_batch rows, batch_size rows a minibatch,
        grad_accum minibatches a step."""
        config = self.config
        return config.ppo_epochs * math.ceil(math.ceil(config.rollout_batch / config.batch_size) / config.grad_accum)

    def run_position(self, fingerprints: dict[str, str | None]) -> dict[str, Any]:
        """What a resumed run must share with this one (_ppo_position)."""
        return _ppo_position(self.train_prompts, self.config, self.iterations, self.info.world_size, fingerprints)

    def learn(self, it: int, prompts: list) -> tuple[int, dict[str, float]]:
        """Iteration `it` on this rank's prompts: (the next optimizer step, the metrics)."""
        return ppo_iteration(self.model, self.reference, self.reward_model, self.optimizer, prompts, self.config,
                             self.eot, seed=sampling_seed(self.config.seed, it, self.info), lr_at=self.lr_at,
                             step=self.step, autocast=self.autocast, info=self.info, bos_token=self.bos_token,
                             stop=self.stop)

    def evaluate_prompts(self) -> dict[str, float]:
        """The held-out prompts' metrics (evaluate_prompts)."""
        return evaluate_prompts(self.model, self.reference, self.reward_model, self.val, self.config, self.eot,
                                self.autocast, self.bos_token, self.stop)

    def lr_at(self, step: int) -> float:
        from ..train.schedules import cosine_lr

        return cosine_lr(step, self.config.lr, self.config.min_lr, self.config.warmup_steps, self.total_updates)

    def autocast(self):
        from .loop import autocast_context

        return autocast_context(self.config, self.device)

    def start(self) -> None:
        """A resumed run takes up its saved counters (and warns when the schedule no longer gives the step it
        continues with the learning rate it would have had); a resumed finished one trains nothing (a warning
        says so) and evaluates only when its log lost the final evaluation; a fresh one evaluates the untrained
        policy."""
        from ..train.schedules import warn_if_schedule_changed
        from .loop import already_complete, evaluated_at

        counters = self.counters
        if counters is not None:
            self.start_it, self.step = counters["step"], counters["optimizer_step"]
            if already_complete(self.config, self.start_it, self.iterations, "iterations"):
                if self.val and not evaluated_at(self.log.path, self.iterations):
                    self.evaluate_on_rank_0(self.iterations)
            elif self.info.is_main:
                warn_if_schedule_changed(counters.get("next_lr"), self.lr_at(self.step), self.step)
        elif self.val:
            self.first_eval = self.evaluate_on_rank_0(0)

    def train(self) -> None:
        """The PPO iterations from start_it on, each on this rank's share of the next global batch of prompts,
        evaluating every eval_interval and at the end, saving every ckpt_interval; the charts."""
        from tqdm import tqdm

        from ..train.interrupt import StopOnSignal
        from .loop import evaluation_due, micro_batches, save_or_stop

        batches = micro_batches(self.train_prompts, self.global_batch, self.config.seed)
        for _ in range(self.start_it):  # the prompts the iterations before start_it took
            next(batches)
        self.started = time.perf_counter()
        stop = StopOnSignal(enabled=not self.info.is_distributed)
        with stop:
            for it in tqdm(range(self.start_it, self.iterations), desc=self.METHOD, unit="iter",
                           disable=not (self.config.progress and self.info.is_main), dynamic_ncols=True):
                self.iteration(it, rank_prompts(next(batches), self.info))
                done = it + 1 == self.iterations
                if self.val and evaluation_due(it + 1, done, self.config):
                    self.evaluate_on_rank_0(it + 1)
                save_or_stop(stop, it + 1, done, self.config, self.save, self.log.plain, self.CHARTS)
        self.log.plot(self.config.out_dir, self.CHARTS)

    def iteration(self, it: int, prompts: list) -> None:
        """Iteration `it` (0-based) on this rank's prompts, logged; FinetuneDiverged when a metric is not
        finite."""
        lr = self.lr_at(self.step)
        self.step, metrics = self.learn(it, prompts)
        self.log.write("train", step=it + 1, lr=lr, **metrics)
        self.last_metrics = metrics
        if not all(math.isfinite(v) for v in metrics.values()):
            from .loop import FinetuneDiverged

            raise FinetuneDiverged(f"{self.METHOD.upper()} iteration {it + 1} gave non-finite metrics {metrics}; "
                                   f"try a lower lr")

    def evaluate_on_rank_0(self, at: int) -> dict[str, float] | None:
        """evaluate(at) on rank 0 (None on the others); every rank calls this. An evaluation or log write that
        fails there stops every rank, not rank 0 alone while the others wait for it at the next collective."""
        from ..train import distributed

        with distributed.fail_together(self.info, self.device, f"evaluating the policy after iteration {at}"):
            return self.evaluate(at) if self.evaluates else None

    def evaluate(self, at: int) -> dict[str, float]:
        """The held-out prompts' mean reward and KL after `at` iterations, logged; now last_eval."""
        self.last_eval = self.evaluate_prompts()
        self.log.plain.write("eval", step=at, **self.last_eval)  # rank 0 alone: inside evaluate_on_rank_0's check
        return self.last_eval

    def save(self, done_its: int) -> str | None:
        """Write the training state after done_its iterations (every rank: it gathers their RNG states); rank 0
        gets the path."""
        from .loop import save_train_state

        counters = {"step": done_its, "optimizer_step": self.step, "next_lr": self.lr_at(self.step)}
        return save_train_state(self.state_dir, self.model, self.optimizer, self.position, counters)


def _save_policy(policy: nn.Module, wrapped, tokenizer, config: PPOConfig, iterations: int, method: str = "ppo"
                 ) -> tuple[str, str | None]:
    """(the checkpoint, LoRA's adapters or None): the trained policy (LoRA merged) saved to config.out_dir with
    `method` and config in its meta's "finetune", and the training state dropped."""
    from .base import save_finetuned
    from .loop import drop_train_state
    from .lora import save_and_merge_lora

    lora_path = save_and_merge_lora(policy, config, wrapped)
    meta = {"model_config": policy.config.to_dict(), "tokenizer": tokenizer.spec,
            "finetune": {"method": method, **config.to_dict()}}
    path = save_finetuned(config.out_dir, iterations, policy.state_dict(), meta)
    drop_train_state(config)
    return path, lora_path


def run_ppo(config: PPOConfig, reward_model: nn.Module | None = None) -> dict[str, Any]:
    """PPO on config.data's prompts from config.base under config.reward_model (or `reward_model`, any
    module with the RewardModel scoring interface rm(ids, lengths) -> (B,), using the policy's
    tokenizer); saves the policy to config.out_dir; the summary. Under torchrun: data-parallel (see the
    module's docstring); every rank calls it, rank 0 writes (and alone evaluates: first_eval and last_eval
    are None on the other ranks)."""
    from .base import load_base
    from .loop import data_parallel_setup
    from .lora import apply_lora_from_config, check_lora_targets
    from .templates import response_stop, settle_template

    prompt_rows = _check_before_loading(config, reward_model)
    torch.manual_seed(config.seed)  # the same on every rank: the same LoRA init; sampling seeds are per rank
    policy, tokenizer, base_meta = load_base(config)
    check_lora_targets(policy, config)  # before the reward model is loaded; the adapters come after
    config, fmt = settle_template(config, base_meta)  # the SFT run's template, unless config names one
    device = policy.device
    info = data_parallel_setup(device)
    max_prompt_len = _max_prompt_len(config, policy)
    reward_model, reward_sha256 = _frozen_reward_model(config, reward_model, device, tokenizer, fmt)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)  # the base: base_sha256 identifies it
    wrapped = apply_lora_from_config(policy, config)
    model = PolicyWithValue(policy)
    train, val = _train_and_val_prompts(prompt_rows, tokenizer, max_prompt_len, fmt, config, info)

    stop = response_stop(tokenizer, fmt)  # a response ends at end-of-text or the template's end marker
    run = _PPORun(model, reference, reward_model, train, val, config, info, tokenizer.eot_token,
                  {"base_sha256": base_meta["base_sha256"], "reward_model_sha256": reward_sha256}, tokenizer.bos_token,
                  stop=stop)
    run.start()
    run.train()
    path, lora_path = _save_policy(policy, wrapped, tokenizer, config, run.iterations)
    return {"method": "ppo", "out_dir": config.out_dir, "checkpoint": path, "template": fmt.template, "lora": lora_path,
            "iterations": run.iterations, "optimizer_steps": run.step,
            "train_prompts": len(train), "val_prompts": len(val), "first_eval": run.first_eval,
            "last_eval": run.last_eval, "train": run.last_metrics,
            "seconds": time.perf_counter() - run.started, "metrics": run.log.path}
