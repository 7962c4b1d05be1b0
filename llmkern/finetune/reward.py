"""A reward model: a GPT body with a scalar head, trained on preference pairs (Bradley-Terry).

The score of a (prompt, response) pair is the head applied to the body's hidden state at the last
real token of prompt + response + end-of-text, so the whole text is read before it is judged. Trained
so that the chosen response of a pair outscores the rejected one: loss = -log sigmoid(s_c - s_r).

The saved run is a llmkern checkpoint whose weights are the body's GPT weights plus "head.weight" and
"head.bias", and whose meta says {"kind": "reward_model"}; load_reward_model reads it back, and
load_base can start a policy from its body.

Under parallel="fsdp" no rank holds the whole model on its GPU: rank 0 alone reads the base (onto its CPU)
and, after training, holds the whole reward model and saves it; the closing evaluation on the training pairs
runs on the sharded model.

The scoring interface (what PPO and GRPO call, and what a hand-made reward model must offer):
    rm(ids, lengths) -> (B,) float scores, ids (B, T) right-padded token ids, lengths (B,) real tokens per row.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._modes import eval_mode
from ..model import GPT, GPTConfig
from ..train import checkpoint as ckpt
from ..train.inference import resolve_device
from .config import FinetuneConfig
from .heads import LastTokenHead

KIND = "reward_model"


class RewardModel(LastTokenHead):
    """A GPT body and a linear head that maps the hidden state of each row's last real token to a score."""

    def __init__(self, body: GPT):
        if not isinstance(body, GPT):
            raise TypeError(f"body must be a llmkern.model.GPT, got {type(body).__name__}")
        super().__init__(body, 1, init_std=1.0 / math.sqrt(body.config.n_embd))  # scores start near unit scale

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) real tokens per row (1..T) -> scores (B,) in fp32."""
        return self.scores_with_aux_loss(ids, lengths)[0]

    def scores_with_aux_loss(self, ids: torch.Tensor, lengths: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(forward's scores, the body's load-balancing loss or None): the training forward pass (see
        LastTokenHead.head_outputs_with_aux_loss)."""
        outputs, aux = self.head_outputs_with_aux_loss(ids, lengths)
        return outputs.squeeze(-1).float(), aux


def reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """The Bradley-Terry loss: -log sigmoid(chosen - rejected), averaged over the pairs."""
    for name, t in (("chosen_scores", chosen_scores), ("rejected_scores", rejected_scores)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(f"chosen_scores {tuple(chosen_scores.shape)} and rejected_scores "
                         f"{tuple(rejected_scores.shape)} must have the same shape")
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


# --- encoding --------------------------------------------------------------------------------------

def encode_pair_text(tokenizer, prompt: str, response: str, max_len: int) -> list[int]:
    """The tokens a reward model reads: prompt + response + end-of-text, the last max_len of them (after
    the tokenizer's begin-of-sequence token, which stays first, where it has one). The last, since the
    score is read at the end-of-text: a long text keeps its response, and is trained on the tokens it is
    scored on (score, PPO's rollouts)."""
    from ..data.sequences import cut_left
    from .data import encode_prompt_response

    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    tokens, _ = encode_prompt_response(tokenizer, prompt, response, sys.maxsize)
    return cut_left(tokenizer, tokens, max_len)


def make_score_batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded with pad_id, lengths (B,)) of token rows."""
    from .data import pad_batch

    return pad_batch(rows, pad_id), torch.tensor([len(r) for r in rows], dtype=torch.long)


@torch.no_grad()
def score_token_rows(rm: nn.Module, rows: list[list[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """Scores of token rows, batch_size rows per forward, with rm in eval mode (restored after)."""
    device = next(rm.parameters()).device
    scores: list[float] = []
    with eval_mode(rm):
        for start in range(0, len(rows), batch_size):
            ids, lengths = make_score_batch(rows[start : start + batch_size], pad_id)
            scores += rm(ids.to(device), lengths.to(device)).tolist()
    return scores


def score(rm: RewardModel, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 16) -> list[float]:
    """The reward model's score of each (prompt, response) pair; prompts and responses are used as given
    (format them with the reward model's PromptFormat: .prompt(example), .response(text))."""
    if not isinstance(prompts, (list, tuple)) or not isinstance(responses, (list, tuple)):
        raise TypeError("prompts and responses must be lists of strings")
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses: they must pair up")
    if not prompts:
        return []
    # The last block_size tokens of each text (encode_pair_text): keeping the first ones scored every
    # response to a long prompt alike (a tie).
    max_len = rm.body.config.block_size
    rows = [encode_pair_text(tokenizer, p, r, max_len) for p, r in zip(prompts, responses)]
    return score_token_rows(rm, rows, tokenizer.eot_token, batch_size)


# --- saving and loading ----------------------------------------------------------------------------

def save_reward_model(out_dir: str, step: int, rm: RewardModel, tokenizer, extra_meta: dict[str, Any] | None = None
                      ) -> str:
    """Write rm atomically as checkpoint `step` of out_dir (LoRA layers must be merged first)."""
    from .base import save_finetuned

    meta = {"kind": KIND, "model_config": rm.body.config.to_dict(), "tokenizer": tokenizer.spec, **(extra_meta or {})}
    return save_finetuned(out_dir, step, rm.state_for_saving(), meta)


def load_reward_model(run_dir: str, device: str | torch.device = "auto") -> tuple[RewardModel, Any]:
    """(RewardModel in eval mode, tokenizer) from a reward-model run folder or checkpoint folder."""
    rm, tokenizer, _ = load_reward_run(run_dir, device)
    return rm, tokenizer


def load_reward_run(run_dir: str, device: str | torch.device = "auto") -> tuple[RewardModel, Any, dict[str, Any]]:
    """load_reward_model, plus the checkpoint's meta (its fine-tuning settings name its prompt template)."""
    from ..data.tokenizer import get_tokenizer

    state = ckpt.load_model_checkpoint(run_dir)
    if state.meta.get("kind") != KIND:
        raise ValueError(f"checkpoint {state.path!r} is not a reward model (its meta has kind="
                         f"{state.meta.get('kind')!r}); train one with `llmkern finetune reward`")
    rm = RewardModel(GPT(GPTConfig.from_dict(state.meta["model_config"])))
    rm.load_saved_state(state.model)
    rm.to(resolve_device(device)).eval()
    return rm, get_tokenizer(state.meta["tokenizer"]), state.meta


# --- training --------------------------------------------------------------------------------------

@dataclass
class RewardConfig(FinetuneConfig):
    """FinetuneConfig for a reward model; data is a preference file (instruction, input, chosen, rejected)."""

    EVALUATES_HELD_OUT_ONLY: ClassVar[bool] = True  # val_fraction=0: no evaluation

    def validate(self) -> RewardConfig:
        super().validate()
        if not self.data:
            raise ValueError("data must name a preference file (.json or .jsonl with instruction, input, "
                             "chosen, rejected)")
        return self


def collate_score_pairs(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """{"ids": (2B, T), "lengths": (2B,)}: the chosen rows, then the rejected ones."""
    ids, lengths = make_score_batch([c for c, _ in examples] + [r for _, r in examples], pad_id)
    return {"ids": ids, "lengths": lengths}


def pair_loss_and_metrics(rm: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The Bradley-Terry loss of a collate_score_pairs batch, its accuracy (chosen scored higher) and
    mean margin; a mixture-of-experts body in training mode adds its load-balancing loss (finetune.aux_loss)."""
    from .aux_loss import with_aux_loss

    scores, aux = rm.scores_with_aux_loss(batch["ids"], batch["lengths"])  # (2B,)
    half = scores.size(0) // 2
    chosen, rejected = scores[:half], scores[half:]
    loss, aux_metrics = with_aux_loss(reward_loss(chosen, rejected), aux, rm.body.config)
    return loss, {"accuracy": (chosen > rejected).float().mean().detach(),
                  "margin": (chosen - rejected).mean().detach(), **aux_metrics}


def run_reward(config: RewardConfig) -> dict[str, Any]:
    """Train a reward model from config.base on config.data; save it to config.out_dir; the summary."""
    from .base import effective_max_len, load_base, require_base
    from .data import load_preference_data, split_examples, warn_dropped
    from .loop import (
        batched_evaluation,
        check_run_folder,
        drop_train_state,
        fit,
        training_device,
    )
    from .lora import apply_lora_from_config, save_and_merge_lora
    from .templates import settle_template

    if not isinstance(config, RewardConfig):
        raise TypeError(f"config must be a RewardConfig, got {type(config).__name__}")
    config.validate()
    require_base(config)  # these first: a wrong data file or out_dir is told before the base is loaded
    raw = load_preference_data(config.data)
    check_run_folder(config)
    torch.manual_seed(config.seed)
    # under fsdp only rank 0 holds the whole model: after fit it alone saves the reward model
    body, tokenizer, base_meta = load_base(config, language_model=False, whole_on_rank_0=True)
    config, fmt = settle_template(config, base_meta)  # saved with the run: a judge formats prompts the same way
    rm = RewardModel(body)  # the head, drawn on every rank, trains as rank 0 drew it (fit's sharding)
    device = training_device(rm, config)
    wrapped = apply_lora_from_config(rm.body, config)  # adapters on the body; the new head trains in full

    max_len = effective_max_len(config, body)
    pairs = []
    for ex in raw:
        prompt = fmt.prompt(ex)
        chosen = encode_pair_text(tokenizer, prompt, fmt.response(ex["chosen"]), max_len)
        rejected = encode_pair_text(tokenizer, prompt, fmt.response(ex["rejected"]), max_len)
        if chosen != rejected:  # cut to max_len, some pairs read the same: nothing to learn from them
            pairs.append((chosen, rejected))
    if not pairs:
        raise ValueError(f"no pair of {config.data!r} differs within max_len={max_len} tokens")
    warn_dropped(config.data, len(raw) - len(pairs), len(raw),
                 f"their chosen and rejected texts read the same within max_len={max_len} tokens")
    train, val = split_examples(pairs, config.val_fraction, config.seed)
    pad_id = tokenizer.eot_token

    def collate(examples):
        return collate_score_pairs(examples, pad_id)

    def evaluate_on(examples, prefix):
        return batched_evaluation(pair_loss_and_metrics, collate, examples, prefix, config, device)

    # the closing evaluation on the training pairs inside fit: under fsdp on the sharded model, on every rank
    summary = fit(rm, pair_loss_and_metrics, train, collate, config,
                  evaluate=evaluate_on(val, "val") if val else None, charts=("accuracy",),
                  settings={"base_sha256": base_meta["base_sha256"]},  # a resumed run must start from the same base
                  final_evaluate=evaluate_on(train, "train"),
                  weigh=lambda batch: batch["ids"].size(0) // 2)  # its pairs, what the loss is the mean of
    train_eval = summary.pop("final_eval")

    # The whole reward model, not its body alone: the head trained in full beside the adapters, and the file
    # must hold it to rebuild the trained model from the base.
    lora_path = save_and_merge_lora(rm, config, [f"body.{name}" for name in wrapped])
    path = save_reward_model(config.out_dir, summary["steps"], rm, tokenizer,
                             {"finetune": {"method": "reward", **config.to_dict()}})
    drop_train_state(config)
    return {"method": "reward", "out_dir": config.out_dir, "checkpoint": path, "template": fmt.template, "lora": lora_path,
            "train_examples": len(train), "val_examples": len(val),
            "skipped_examples": len(raw) - len(pairs), **summary, "train_eval": train_eval}
