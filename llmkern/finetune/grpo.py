"""GRPO, group relative policy optimization (Shao et al., 2024, DeepSeekMath; DeepSeek-R1's RL): PPO's clipped
objective without a value model. The baseline of a response is the other responses to its prompt.

Each iteration:
  1. rollout: sample group_size responses to each of rollout_batch prompts (stop at end-of-text or at the
     template's end marker, as chat does: a chat-tuned policy may go on past it into a made-up next turn),
     generation_batch rows per generate call (0: all rollout_batch * group_size at once; fewer bound the KV cache's
     memory and sample the same responses, see ppo.sample_responses);
  2. reward each response: a reward model's score (reward="model"), 1.0 when its final answer matches the
     prompt's "answer" field, else 0.0 (reward="answer", see answer_reward), or a Python function's value of the
     prompt's and response's texts and the row's answer (reward="function": format, code or other custom
     verifiable rewards); the response text read ends before the first end marker or end-of-text's text, and a
     reward model reads a response ended at its marker with end-of-text after it, as it was trained (ModelReward,
     ppo.with_end_of_text), batch_size texts a forward pass (as every scoring pass: pi_old's, pi_ref's, the
     evaluation's), so that none outgrows a training minibatch's memory;
  3. advantages: each response's reward minus its group's mean, divided by the group's std (scale_rewards; Dr. GRPO
     leaves the std out), the same for every token of the response; a group whose rewards are all equal ("flat")
     has advantage 0 and teaches nothing;
  4. grpo_epochs passes over the rollout in minibatches of batch_size responses: per token PPO's clipped surrogate
     max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range_high)), r = pi / pi_old, plus kl_coef times the k3
     estimate of KL(pi || pi_ref), exp(ref - logp) - (ref - logp) - 1, against the frozen base (a term of the loss,
     not of the reward), averaged as loss_aggregation says; one AdamW step per grad_accum minibatches.
With grpo_epochs=1 the log-probs of the policy being trained stand in for pi_old (detached): every ratio is 1 and
the clip never triggers, and no extra forward pass is spent on the rollout. When an iteration takes several
optimizer steps (rollout_batch * group_size > batch_size * grad_accum), its later minibatches are then a little
off-policy, uncorrected; grpo_epochs > 1 takes pi_old once, after sampling, and the clip bounds every pass.
Every log-prob (pi, pi_old, pi_ref; in training and in evaluation's KL) is of the distribution the responses are
sampled from, softmax(logits / temperature) (as TRL's GRPO trainer takes them), so that the ratio and the KL are
those of the sampling policy; top_k's truncation is not part of it.

Metrics per iteration in metrics.jsonl: reward (the mean over the responses), reward_std (the mean over the groups
of their std), flat_groups (the fraction of groups of equal rewards), response_length, loss, clip_fraction, kl (the
k3 estimate per response token; only with kl_coef > 0), tokens_per_s.

Under torchrun (parallel="ddp") every rank holds the whole policy, optimizer state and reference, identical on all
ranks, as PPO's do (finetune.ppo): each samples and rewards whole groups from its own share of the prompts (a group
never splits across ranks, so its advantages need no other rank), with its own sampling seed; the gradients are
averaged over the ranks before each step, and the "token" aggregation divides by the response tokens of the step
on all ranks. Rank 0 logs the metrics averaged over the ranks, evaluates and writes files.
"""

from __future__ import annotations

import copy
import importlib
import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import FinetuneConfig
from .ppo import (
    _check_same_shape,
    _PPORun,
    check_generation_batch,
    frozen_logprobs,
    logprob_temperature,
)

REWARDS = ("model", "answer", "function")
AGGREGATIONS = ("token", "sequence")


@dataclass
class GRPOConfig(FinetuneConfig):
    """FinetuneConfig plus GRPO's settings. data: prompts (instruction and optional input, and "answer" for
    reward="answer", optional for reward="function"), put in config.template. max_steps > 0: that many GRPO
    iterations; else epochs passes over the prompts, rollout_batch at a time. batch_size is the minibatch in
    responses (rows per forward/backward): each pass over a rollout takes ceil(rollout_batch * group_size /
    (batch_size * grad_accum)) optimizer steps. It is also the most rows any scoring pass (the log-probs of pi_old
    and pi_ref, a reward model's scores, the evaluation's) reads at once: one sized to train fits them."""

    # "model": reward_model's score of each prompt + response; "answer": 1.0 when the response's final answer (GSM8K's
    #   rules: the number after "#### ", else the last number) matches the prompt's "answer" field, else 0.0;
    #   "function": reward_function's value
    reward: str = "model"
    reward_model: str = ""  # the reward model's run folder (llmkern finetune reward), for reward="model"
    # for reward="function": "module:function" (importable, e.g. on PYTHONPATH), called for each response as
    #   function(prompt, response, answer) -> a finite float: the prompt's text as the model read it (template
    #   included), the response's (up to its end marker or end-of-text), the row's "answer" (None without one).
    #   A resumed run must name the same one (its code is not compared)
    reward_function: str = ""
    group_size: int = 8  # responses sampled per prompt (G); each is judged against the others of its group
    rollout_batch: int = 16  # prompts per iteration (on each rank): rollout_batch * group_size responses
    # rows (responses) sampled per generate call (its KV cache holds that many); 0 = all rollout_batch * group_size
    #   at once. Any value samples the same responses (see ppo.sample_responses)
    generation_batch: int = 0
    max_new_tokens: int = 256  # the longest response
    temperature: float = 1.0  # sampling temperature (> 0: the group must differ to be compared)
    top_k: int = 0  # sample among the k likeliest tokens; 0 = all
    clip_range: float = 0.2  # the policy ratio is clipped to [1 - clip_range, 1 + clip_range_high] (grpo_epochs > 1)
    clip_range_high: float = 0.0  # the upper clip, larger in DAPO's "clip-higher" (e.g. 0.28); 0 = clip_range
    kl_coef: float = 0.0  # beta: weight of the per-token KL (k3) to the frozen base in the loss; 0 loads no reference
    scale_rewards: bool = True  # divide each group's centred rewards by its std (GRPO); false: centre only (Dr. GRPO)
    std_eps: float = 1e-4  # added to a group's std before dividing by it
    # "token": the mean over all response tokens of a step's responses (DAPO: long responses weigh more); "sequence":
    #   the mean over each response's tokens, then over the responses (GRPO's paper)
    loss_aggregation: str = "token"
    grpo_epochs: int = 1  # passes over each rollout; 1: every ratio is 1 and the clip never triggers
    lr: float = 1e-6
    min_lr: float = 1e-7

    EVALUATES_HELD_OUT_ONLY: ClassVar[bool] = True  # val_fraction=0: no evaluation

    def validate(self) -> GRPOConfig:
        """The common checks and GRPO's; the reward model is checked by run_grpo (it may be passed in)."""
        super().validate()
        if not self.data:
            raise ValueError("data must name a prompt file (.json or .jsonl with instruction, optional input, and "
                             "answer for reward='answer')")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.reward == "function":
            split_reward_function(self.reward_function)  # its form; run_grpo imports it
        if self.loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {AGGREGATIONS}, got {self.loss_aggregation!r}")
        if not 0 <= self.kl_coef < math.inf:  # inf: the loss NaN
            raise ValueError(f"kl_coef must be a finite number >= 0, got {self.kl_coef}")
        if not self.clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")
        if not self.clip_range_high >= 0:
            raise ValueError(f"clip_range_high must be >= 0 (0 = clip_range), got {self.clip_range_high}")
        if self.group_size < 2:  # one response has no group to be compared with: every advantage 0
            raise ValueError(f"group_size must be at least 2 (responses compared within a prompt's group), got "
                             f"{self.group_size}")
        for name in ("rollout_batch", "max_new_tokens", "grpo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.temperature < math.inf:  # inf: tokens drawn uniformly, whatever the policy says
            raise ValueError(f"temperature must be a finite number > 0 (GRPO samples its groups), got "
                             f"{self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        check_generation_batch(self.generation_batch)
        if not 0 < self.std_eps < math.inf:  # 0: a flat group's 0 / 0
            raise ValueError(f"std_eps must be a finite number > 0, got {self.std_eps}")
        if self.max_new_tokens >= self.max_len:  # the model's block_size may cut max_len further: run_grpo checks
            raise ValueError(f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt in max_len="
                             f"{self.max_len} tokens")
        return self

    def unread_settings(self) -> dict[str, str]:
        """FinetuneConfig's, and GRPO's settings that another one turns off."""
        unread = super().unread_settings()
        default = type(self)()
        off = {"reward_model": (self.reward != "model", f"reward={self.reward!r} uses no reward model"),
               "reward_function": (self.reward != "function", f"reward={self.reward!r} calls no function"),
               "std_eps": (not self.scale_rewards, "scale_rewards=false divides by no std"),
               "clip_range": (self.grpo_epochs == 1, "grpo_epochs=1 makes every ratio 1, which no clip changes"),
               "clip_range_high": (self.grpo_epochs == 1, "grpo_epochs=1 makes every ratio 1, which no clip changes")}
        for name, (is_off, why) in off.items():
            if is_off and getattr(self, name) != getattr(default, name):
                unread[name] = why
        return unread

    @property
    def upper_clip(self) -> float:
        """The upper clip in use: clip_range_high, or clip_range where it is 0."""
        return self.clip_range_high or self.clip_range


# --- advantages and the loss -------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True, eps: float = 1e-4
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages (N,), each group's std (N / group_size,), whether each group is flat (bool)) of the rewards (N,)
    of consecutive groups (rows i * group_size ... (i + 1) * group_size - 1 answer prompt i).

    A response's advantage is its reward minus its group's mean, divided by (the group's std + eps) with
    scale_rewards (GRPO), else not (Dr. GRPO). The std is the sample std (divided by group_size - 1). A flat group
    (all its rewards equal) gets exactly 0, whatever rounding its mean has."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor, got {getattr(rewards, 'shape', type(rewards).__name__)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a whole number of groups of {group_size}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    groups = rewards.reshape(-1, group_size)  # (prompts, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1)  # (prompts,)
    flat = groups.amax(dim=1) == groups.amin(dim=1)
    advantages = centred / (std.unsqueeze(1) + eps) if scale_rewards else centred
    advantages = advantages.masked_fill(flat.unsqueeze(1), 0.0)
    return advantages.reshape(-1), std, flat


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per token the k3 estimate of KL(pi || pi_ref) from a token sampled by pi: exp(d) - d - 1, d = ref - logp
    (unbiased, always >= 0; its gradient pulls logp toward ref). 0 where both are 0 (padding)."""
    d = ref_logprobs.detach() - logprobs
    return torch.exp(d) - d - 1.0


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_range: float, clip_range_high: float | None = None, ref_logprobs: torch.Tensor | None = None,
              kl_coef: float = 0.0, aggregation: str = "token", normalizer: float | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss of a batch of responses and its statistics {"clip_fraction", and "kl" with ref_logprobs}.

    logprobs, old_logprobs, mask (and ref_logprobs): (B, T), mask marking each response's tokens; advantages (B,),
    one per response. Per token: max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range_high)), r = exp(logprobs -
    old_logprobs), plus kl_coef * kl_k3(logprobs, ref_logprobs). aggregation "token": the sum over all masked
    tokens divided by their count; "sequence": each response's mean over its tokens, summed over the responses and
    divided by their count. normalizer replaces that count (the tokens, or responses, of a whole optimizer step:
    its minibatches' losses then add up to the step's). clip_fraction and kl are means over the masked tokens."""
    from .ppo import clipped_surrogate, masked_mean

    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    if not isinstance(advantages, torch.Tensor) or advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be a tensor of shape ({logprobs.size(0)},) (one per response), got "
                         f"{getattr(advantages, 'shape', type(advantages).__name__)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not 0 <= kl_coef < math.inf:
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs (the reference's log-probs of the tokens)")
    per_token, clipped = clipped_surrogate(logprobs, old_logprobs, advantages.unsqueeze(1).expand_as(logprobs),
                                           clip_range, clip_range_high)
    stats = {"clip_fraction": masked_mean(clipped.float(), mask).detach()}
    if ref_logprobs is not None:
        _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
        kl = kl_k3(logprobs, ref_logprobs)
        stats["kl"] = masked_mean(kl, mask).detach()
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
    m = mask.to(per_token.dtype)
    if aggregation == "token":
        total, count = (per_token * m).sum(), m.sum()
    else:
        total, count = ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).sum(), float(m.size(0))
    return total / (count if normalizer is None else normalizer), stats


# --- rewards -------------------------------------------------------------------------------------------------------

def final_answer(response: str) -> str:
    """The answer a response gives, by eval.gsm8k's rules: the number after its first "#### " (strict-match), else
    its last number-like run (flexible-extract); gsm8k.INVALID when it has neither."""
    from ..eval.gsm8k import INVALID, flexible_extract, strict_match

    strict = strict_match(response)
    return strict if strict != INVALID else flexible_extract(response)


def answer_reward(response: str, answer: str) -> float:
    """1.0 when the response's final_answer equals `answer` once both are normalized as GSM8K's exact match does
    (eval.gsm8k.is_exact_match: commas, "$", everything up to the last "#### " and one trailing "." removed, then
    lower-cased: `answer` may be a bare number or a whole GSM8K solution ending "#### N"), else 0.0. A response
    with "#### N" is judged by that N alone, even when a later number would match."""
    from ..eval.gsm8k import INVALID, is_exact_match

    found = final_answer(response)
    return float(found != INVALID and is_exact_match(found, answer))


def prompt_answers(rows: list[dict[str, Any]], path: str) -> list[str]:
    """Each row's "answer" (a string, or an int written as one) for reward="answer"; a ValueError naming the first
    row without a usable one."""
    from ..eval.gsm8k import normalize_answer

    answers = []
    for i, row in enumerate(rows):
        answer = row.get("answer")
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):  # a data file's row: a bad value, like a missing key (data._check_keys)
            raise ValueError(  # noqa: TRY004
                f"{path}: example {i} needs an 'answer' (a string or an int) for reward='answer', which compares "
                f"each response's final answer with it; it has keys {sorted(row)}")
        if not normalize_answer(answer).strip():  # no response could match it: its groups would all be flat
            raise ValueError(f"{path}: example {i}: 'answer' {answer!r} holds no answer once normalized")
        answers.append(answer)
    return answers


def row_answers(rows: list[dict[str, Any]], config: GRPOConfig) -> list[Any]:
    """Each row's answer as config.reward reads it (part of the prompts' fingerprint): "answer": prompt_answers;
    "function": the row's "answer" as it is, None without one; "model": None (a reward model reads none)."""
    if config.reward == "answer":
        return prompt_answers(rows, config.data)
    if config.reward == "function":
        return [row.get("answer") for row in rows]
    return [None] * len(rows)


class AnswerReward:
    """reward="answer": answer_reward of each response's text against its prompt's answer; the text ends before
    the first of stop_texts (the template's end marker, PromptFormat.stop_texts) or end-of-text (its token, or
    its text written out in ordinary tokens): what follows is no part of the answer."""

    def __init__(self, tokenizer, stop_texts: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop_texts = (*stop_texts, tokenizer.decode([tokenizer.eot_token]))

    def __call__(self, prompts: list[list[int]], responses: list[list[int]], answers: list[str | None],
                 device: torch.device) -> torch.Tensor:
        """(B,) fp32 rewards on `device`."""
        return torch.tensor([answer_reward(text, answer) for text, answer in zip(self.response_texts(responses),
                                                                                 answers)],
                            dtype=torch.float32, device=device)

    def response_texts(self, responses: list[list[int]]) -> list[str]:
        """Each response's text, end-of-text left out and cut before the first stop text."""
        from .templates import cut_at_texts

        tok = self.tokenizer
        # ids past the tokenizer's (a model's padded vocabulary) have no text
        return [cut_at_texts(tok.decode([t for t in r if t != tok.eot_token and t < tok.n_vocab]), self.stop_texts)
                for r in responses]


def split_reward_function(spec: str) -> tuple[str, str]:
    """(module, attribute path) of a reward_function "module:function" (the function may be dotted:
    "module:Class.method"); a ValueError for any other form."""
    module, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not (sep and module.strip() and attr.strip()):
        raise ValueError(f"reward='function' needs reward_function='module:function' (a Python function of the "
                         f"prompt's and response's texts and the row's answer, returning a float), got {spec!r}")
    return module.strip(), attr.strip()


def load_reward_function(spec: str):
    """The callable that reward_function `spec` ("module:function") names, imported; a ValueError naming it when
    its module cannot be imported or has no such attribute, a TypeError when that is not callable."""
    module_name, attr = split_reward_function(spec)
    try:
        found = importlib.import_module(module_name)
    except ImportError as e:  # the user's module: its folder must be importable
        raise ValueError(f"reward_function={spec!r}: cannot import {module_name!r} ({e}); put its folder on "
                         f"PYTHONPATH") from e
    for name in attr.split("."):
        if not hasattr(found, name):
            raise ValueError(f"reward_function={spec!r}: {module_name!r} has no {attr!r}")
        found = getattr(found, name)
    if not callable(found):
        raise TypeError(f"reward_function={spec!r} names a {type(found).__name__}, not a function")
    return found


class FunctionReward(AnswerReward):
    """reward="function": a Python function's value of each response, function(prompt text, response text,
    answer) -> float; the response's text as AnswerReward reads it (up to the first end marker or end-of-text)."""

    def __init__(self, tokenizer, function, name: str, stop_texts: tuple[str, ...] = ()):
        super().__init__(tokenizer, stop_texts)
        self.function, self.name = function, name

    def __call__(self, prompts: list[list[int]], responses: list[list[int]], answers: list[Any],
                 device: torch.device) -> torch.Tensor:
        """(B,) fp32 rewards on `device`; a ValueError naming the function when a value is no finite number."""
        prompt_texts = [self.tokenizer.decode(p) for p in prompts]
        values = [self.function(p, r, a) for p, r, a in zip(prompt_texts, self.response_texts(responses), answers)]
        # a bool counts as 0 or 1, a NumPy float as the float it is; a NaN would make its group's advantages NaN
        for value in values:
            if not (isinstance(value, numbers.Real) and math.isfinite(value)):
                raise ValueError(f"reward_function {self.name!r} returned {value!r}; it must return a finite float")
        return torch.tensor(values, dtype=torch.float32, device=device)


class ModelReward:
    """reward="model": a reward model's score of each prompt + response (ppo.reward_model_scores). A response that
    sampling ended at the template's end marker (`stop`, templates.response_stop) is read with end-of-text (`eot`,
    also the padding) after it: a reward model is trained on prompt + output + end marker + end-of-text and reads
    its score there (reward.encode_pair_text, ppo.with_end_of_text, as PPO's); one cut at max_new_tokens is read as
    it is."""

    def __init__(self, reward_model, eot: int, bos_token: int | None, stop=None, rows_per_pass: int | None = None):
        """rows_per_pass: the most texts the reward model reads in one forward pass (None: all of a call's)."""
        from .ppo import check_rows_per_pass

        check_rows_per_pass(rows_per_pass)
        self.reward_model, self.eot, self.bos_token, self.stop = reward_model, eot, bos_token, stop
        self.rows_per_pass = rows_per_pass

    def __call__(self, prompts: list[list[int]], responses: list[list[int]], answers: list[Any],
                 device: torch.device) -> torch.Tensor:
        """(B,) fp32 scores on `device`."""
        from .ppo import reward_model_scores, with_end_of_text

        return reward_model_scores(self.reward_model, prompts, with_end_of_text(responses, self.eot, self.stop),
                                   self.eot, device, self.bos_token, self.rows_per_pass)


# --- rollouts ------------------------------------------------------------------------------------------------------

@dataclass
class GroupRollout:
    """A batch of sampled groups and what GRPO needs of them; tensors (B, T) unless noted, B = prompts * group_size,
    a group's rows consecutive."""

    ids: torch.Tensor  # prompt + response, minus the last token, right-padded
    targets: torch.Tensor  # the next token at each position; -1 on the prompt and the padding
    mask: torch.Tensor  # bool: the positions that predict a response token
    token_mask: torch.Tensor  # bool: where ids holds a real token, not padding
    rewards: torch.Tensor  # (B,)
    advantages: torch.Tensor  # (B,)
    group_std: torch.Tensor  # (prompts,)
    flat: torch.Tensor  # (prompts,) bool: the group's rewards all equal
    old_logprobs: torch.Tensor | None  # the policy's after sampling; None with grpo_epochs=1 (the current ones)
    ref_logprobs: torch.Tensor | None  # the reference's; None without one


def policy_logprobs(policy: nn.Module, ids: torch.Tensor, targets: torch.Tensor,
                    token_mask: torch.Tensor | None = None, temperature: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(targets) (B, T) fp32 under softmax(logits / temperature), 0 where targets is -1; the load-balancing
    loss of a mixture-of-experts policy in training mode, else None: see finetune.aux_loss)."""
    from ..eval.logprobs import logprobs_from_hidden

    hidden, aux = policy.hidden_states_with_aux_loss(ids, token_mask)
    return logprobs_from_hidden(policy, hidden, targets, temperature).float(), aux


def repeat_groups(items: list, group_size: int) -> list:
    """Each item group_size times in a row: the rows of a rollout's groups."""
    return [item for item in items for _ in range(group_size)]


def score_groups(policy: nn.Module, reference: nn.Module | None, reward, prompts: list[list[int]],
                 answers: list[str | None], responses: list[list[int]], config: GRPOConfig, pad_id: int
                 ) -> GroupRollout:
    """The rollout of sampled responses (each at least one token long; prompts, answers and responses one per row,
    groups of config.group_size consecutive rows): rewards, group advantages, and the log-probs the loss needs (at
    config.temperature, the sampling's)."""
    from .ppo import rollout_rows

    device = policy.device
    ids, targets = rollout_rows(prompts, responses, pad_id)
    ids, targets = ids.to(device), targets.to(device)
    mask = targets != -1
    last = torch.tensor([len(p) + len(r) - 2 for p, r in zip(prompts, responses)], device=device)
    token_mask = torch.arange(ids.size(1), device=device) <= last.unsqueeze(-1)  # a row's ids end at `last`
    rewards = reward(prompts, responses, answers, device).float().reshape(-1)
    advantages, std, flat = group_advantages(rewards, config.group_size, config.scale_rewards, config.std_eps)
    rows_per_pass, temperature = config.batch_size, logprob_temperature(config)
    old = frozen_logprobs(policy, ids, targets, rows_per_pass, temperature) if config.grpo_epochs > 1 else None
    ref = None if reference is None else frozen_logprobs(reference, ids, targets, rows_per_pass, temperature)
    return GroupRollout(ids, targets, mask, token_mask, rewards, advantages, std, flat, old, ref)


# --- one GRPO update -----------------------------------------------------------------------------------------------

def step_normalizers(steps: list[list[torch.Tensor]], mask: torch.Tensor, aggregation: str, info) -> list[float]:
    """The divisor of each optimizer step's loss on this rank (steps: each a list of minibatches' row indices):
    "sequence": its responses (as many on every rank); "token": the response tokens of the step on all ranks over
    world_size, so that the ranks' gradients, averaged, are those of the mean over all the step's tokens."""
    if aggregation == "sequence":
        return [float(sum(len(mb) for mb in step)) for step in steps]
    from ..train import distributed

    tokens = torch.stack([sum(mask[mb].sum() for mb in step) for step in steps]).double()
    if info.is_distributed:  # one all-reduce per pass, not per step
        tokens = distributed.all_reduce_mean(tokens, info)
    return tokens.clamp(min=1.0).tolist()


def grpo_update(policy: nn.Module, optimizer, rollout: GroupRollout, config: GRPOConfig, lr_at, step: int,
                autocast, info=None) -> tuple[int, dict[str, float]]:
    """grpo_epochs passes of minibatch updates over a scored rollout; returns the next optimizer step and the means
    over the steps of the loss ("loss": the objective, with a mixture-of-experts policy's load balancing, see
    finetune.aux_loss) and over the minibatches of clip_fraction (and kl with a reference). Under torchrun every
    rank must hold as many rows, so that all take the same steps; the gradients are averaged over the ranks."""
    from ..train import distributed
    from .aux_loss import with_aux_loss
    from .ppo import optimizer_step

    info = info or distributed.detect()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    rows = rollout.ids.size(0)
    totals: dict[str, float] = {"loss": 0.0, "clip_fraction": 0.0}
    steps_taken = minibatches_seen = 0
    # Train mode, for activation checkpointing. With grpo_epochs > 1 the old log-probs were taken in eval mode, so
    # any dropout (the model's or LoRA's) makes the ratios noisy: GRPO is best run with dropout 0.
    policy.train()
    for _ in range(config.grpo_epochs):
        order = torch.randperm(rows, device=rollout.ids.device)
        minibatches = [order[s : s + config.batch_size] for s in range(0, rows, config.batch_size)]
        steps = [minibatches[s : s + config.grad_accum] for s in range(0, len(minibatches), config.grad_accum)]
        for minibatches_of_step, normalizer in zip(steps, step_normalizers(steps, rollout.mask,
                                                                          config.loss_aggregation, info)):
            step_loss = 0.0
            for mb in minibatches_of_step:
                with autocast():
                    logprobs, aux = policy_logprobs(policy, rollout.ids[mb], rollout.targets[mb],
                                                    rollout.token_mask[mb], logprob_temperature(config))
                old = logprobs.detach() if rollout.old_logprobs is None else rollout.old_logprobs[mb]
                ref = None if rollout.ref_logprobs is None else rollout.ref_logprobs[mb]
                loss, stats = grpo_loss(logprobs, old, rollout.advantages[mb], rollout.mask[mb], config.clip_range,
                                        config.upper_clip, ref, config.kl_coef, config.loss_aggregation, normalizer)
                if aux is not None:  # a mixture-of-experts policy's load balancing: the minibatches' mean
                    loss, aux_metrics = with_aux_loss(loss, aux / len(minibatches_of_step), policy.config)
                    totals["aux_loss"] = totals.get("aux_loss", 0.0) + float(aux_metrics["aux_loss"])
                loss.backward()
                step_loss += float(loss.detach())
                for name, value in stats.items():
                    totals[name] = totals.get(name, 0.0) + float(value)
                minibatches_seen += 1
            optimizer_step(optimizer, trainable, lr_at(step), info)
            step, steps_taken = step + 1, steps_taken + 1
            totals["loss"] += step_loss
    # the loss and the load-balancing loss are sums over a step's minibatches; the statistics means over them
    return step, {name: value / (steps_taken if name in ("loss", "aux_loss") else minibatches_seen)
                  for name, value in totals.items()}


def grpo_iteration(policy: nn.Module, reference: nn.Module | None, reward, optimizer, prompts: list[tuple],
                   config: GRPOConfig, eot: int, seed: int, lr_at, step: int, autocast, info=None, stop=None
                   ) -> tuple[int, dict[str, float]]:
    """Sample group_size responses to each of `prompts` ((tokens, answer or None) pairs), reward them and learn;
    (next optimizer step, metrics). Under torchrun `prompts` is this rank's share (as many on every rank) and `seed`
    its own; the metrics are the means over the ranks (tokens_per_s their sum). stop: sample_responses's."""
    from ..train import distributed
    from .ppo import mean_over_ranks, sample_responses

    info = info or distributed.detect()
    started = time.perf_counter()
    rows = repeat_groups([tokens for tokens, _ in prompts], config.group_size)
    answers = repeat_groups([answer for _, answer in prompts], config.group_size)
    policy.eval()
    with autocast():
        responses = sample_responses(policy, rows, config, eot, seed, stop)
        rollout = score_groups(policy, reference, reward, rows, answers, responses, config, eot)
    step, losses = grpo_update(policy, optimizer, rollout, config, lr_at, step, autocast, info)

    new_tokens = sum(len(r) for r in responses)
    metrics = {
        "reward": float(rollout.rewards.mean()),
        "reward_std": float(rollout.group_std.mean()),
        "flat_groups": float(rollout.flat.float().mean()),
        "response_length": new_tokens / len(responses),
        **losses,
        "tokens_per_s": new_tokens / max(time.perf_counter() - started, 1e-9),
    }
    return step, mean_over_ranks(metrics, info, rollout.ids.device)  # every rank sampled as many groups


@torch.no_grad()
def evaluate_groups(policy: nn.Module, reference: nn.Module | None, reward, prompts: list[tuple], config: GRPOConfig,
                    eot: int, autocast, stop=None) -> dict[str, float]:
    """The mean reward of one sampled response per held-out prompt (a fixed seed), and with a reference the k3 KL
    per response token (at the sampling temperature, as in training). stop: sample_responses's."""
    from .ppo import rollout_rows, sample_responses

    policy.eval()
    rewards, kl_sum, kl_tokens = [], 0.0, 0
    for start in range(0, len(prompts), config.rollout_batch):
        chunk = prompts[start : start + config.rollout_batch]
        rows, answers = [tokens for tokens, _ in chunk], [answer for _, answer in chunk]
        with autocast():
            responses = sample_responses(policy, rows, config, eot, seed=config.seed + 1, stop=stop, first_row=start)
            rewards += reward(rows, responses, answers, policy.device).tolist()
            if reference is not None:
                ids, targets = (t.to(policy.device) for t in rollout_rows(rows, responses, eot))
                mask = targets != -1
                temperature = logprob_temperature(config)
                kl = kl_k3(frozen_logprobs(policy, ids, targets, config.batch_size, temperature),
                           frozen_logprobs(reference, ids, targets, config.batch_size, temperature))
                kl_sum, kl_tokens = kl_sum + float((kl * mask).sum()), kl_tokens + int(mask.sum())
    out = {"val_reward": sum(rewards) / len(rewards)}
    if reference is not None:
        out["val_kl"] = kl_sum / max(kl_tokens, 1)
    return out


# --- the run -------------------------------------------------------------------------------------------------------

# The settings that make GRPO's objective, its rollouts and its rewards: a resumed run must share them. The reward
# model is compared by content (reward_model_sha256), a reward function by its name; the answers are part of the
# prompts' fingerprint.
GRPO_OBJECTIVE = ("reward", "reward_function", "group_size", "kl_coef", "clip_range", "clip_range_high",
                  "scale_rewards", "std_eps", "loss_aggregation", "grpo_epochs", "max_new_tokens", "temperature",
                  "top_k")


class _GRPORun(_PPORun):
    """run_grpo's training: PPO's run (finetune.ppo: the counters, resume, evaluation and saving) with GRPO's
    iteration; `model` is the policy itself, `reward_model` an AnswerReward or ModelReward."""

    METHOD: ClassVar[str] = "grpo"
    CHARTS: ClassVar[tuple[str, ...]] = ("reward", "flat_groups", "response_length")

    def updates_per_iteration(self) -> int:
        config = self.config
        minibatches = math.ceil(config.rollout_batch * config.group_size / config.batch_size)
        return config.grpo_epochs * math.ceil(minibatches / config.grad_accum)

    def run_position(self, fingerprints: dict[str, str | None]) -> dict[str, Any]:
        from .ppo import _ppo_position

        return _ppo_position(self.train_prompts, self.config, self.iterations, self.info.world_size, fingerprints,
                             GRPO_OBJECTIVE)

    def learn(self, it: int, prompts: list) -> tuple[int, dict[str, float]]:
        from .ppo import sampling_seed

        return grpo_iteration(self.model, self.reference, self.reward_model, self.optimizer, prompts, self.config,
                              self.eot, seed=sampling_seed(self.config.seed, it, self.info), lr_at=self.lr_at,
                              step=self.step, autocast=self.autocast, info=self.info, stop=self.stop)

    def evaluate_prompts(self) -> dict[str, float]:
        return evaluate_groups(self.model, self.reference, self.reward_model, self.val, self.config, self.eot,
                               self.autocast, self.stop)


def _check_before_loading(config: GRPOConfig, reward_model) -> list[dict[str, Any]]:
    """What can be told wrong before any model is loaded: the settings, the base, the prompt file (and its answers),
    the run folder, the reward model's folder and the reward function; the prompt file's rows."""
    from .base import check_exists, require_base
    from .data import load_prompt_data
    from .loop import check_run_folder
    from .ppo import refuse_sharding_and_float16

    if not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a GRPOConfig, got {type(config).__name__}")
    config.validate()
    refuse_sharding_and_float16(config, "GRPO")
    by_model = config.reward == "model"
    if by_model and reward_model is None and not config.reward_model:
        raise ValueError("reward='model' needs reward_model: a reward model's run folder (train one with `llmkern "
                         "finetune reward`); or reward='answer' with an 'answer' in every prompt")
    if not by_model and reward_model is not None:
        uses = {"answer": "compares final answers", "function": "calls reward_function"}[config.reward]
        raise ValueError(f"a reward_model was passed to run_grpo, but reward={config.reward!r} {uses}")
    require_base(config)
    rows = load_prompt_data(config.data)
    if config.reward == "answer":
        prompt_answers(rows, config.data)
    check_run_folder(config)
    if by_model and reward_model is None:
        check_exists("reward_model", config.reward_model)
    if config.reward == "function":
        load_reward_function(config.reward_function)
    return rows


def run_grpo(config: GRPOConfig, reward_model: nn.Module | None = None) -> dict[str, Any]:
    """GRPO on config.data's prompts from config.base, rewarded by config.reward: config.reward_model's scores (or
    `reward_model`'s, any module with the RewardModel scoring interface rm(ids, lengths) -> (B,), using the policy's
    tokenizer), the prompts' answers, or config.reward_function's values; saves the policy to config.out_dir (LoRA
    merged; its adapters kept beside); the summary. Under torchrun: data-parallel (see the module's docstring);
    every rank calls it, rank 0 writes (and alone evaluates: first_eval and last_eval are None on the other
    ranks)."""
    from .base import load_base
    from .loop import data_parallel_setup
    from .lora import apply_lora_from_config, check_lora_targets
    from .ppo import (
        _frozen_reward_model,
        _max_prompt_len,
        _save_policy,
        encode_prompts,
        split_prompts,
    )
    from .templates import response_stop, settle_template

    rows = _check_before_loading(config, reward_model)
    torch.manual_seed(config.seed)  # the same on every rank: the same LoRA init; sampling seeds are per rank
    policy, tokenizer, base_meta = load_base(config)
    check_lora_targets(policy, config)  # before the reward model is loaded; the adapters come after
    config, fmt = settle_template(config, base_meta)  # the SFT run's template, unless config names one
    device = policy.device
    info = data_parallel_setup(device)
    max_prompt_len = _max_prompt_len(config, policy)
    stop = response_stop(tokenizer, fmt)  # a response ends at end-of-text or the template's end marker
    if config.reward == "model":
        scorer, reward_sha256 = _frozen_reward_model(config, reward_model, device, tokenizer, fmt)
        reward = ModelReward(scorer, tokenizer.eot_token, tokenizer.bos_token, stop, rows_per_pass=config.batch_size)
    elif config.reward == "answer":
        reward, reward_sha256 = AnswerReward(tokenizer, fmt.stop_texts), None
    else:
        function = load_reward_function(config.reward_function)
        reward, reward_sha256 = FunctionReward(tokenizer, function, config.reward_function, fmt.stop_texts), None
    # kl_coef = 0 (the default) needs no reference: no copy of the model is held
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if config.kl_coef > 0 else None
    wrapped = apply_lora_from_config(policy, config)
    prompts = list(zip(encode_prompts(rows, tokenizer, max_prompt_len, fmt), row_answers(rows, config)))
    train, val = split_prompts(prompts, config, info)

    run = _GRPORun(policy, reference, reward, train, val, config, info, tokenizer.eot_token,
                   {"base_sha256": base_meta["base_sha256"], "reward_model_sha256": reward_sha256},
                   tokenizer.bos_token, stop=stop)
    run.start()
    run.train()
    path, lora_path = _save_policy(policy, wrapped, tokenizer, config, run.iterations, method="grpo")
    return {"method": "grpo", "out_dir": config.out_dir, "checkpoint": path, "template": fmt.template,
            "lora": lora_path, "reward": config.reward, "iterations": run.iterations, "optimizer_steps": run.step,
            "train_prompts": len(train), "val_prompts": len(val), "first_eval": run.first_eval,
            "last_eval": run.last_eval, "train": run.last_metrics, "seconds": time.perf_counter() - run.started,
            "metrics": run.log.path}
