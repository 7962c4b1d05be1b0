"""Instruction fine-tuning (SFT) on Alpaca-format examples, fully or with LoRA adapters.

    llmkern finetune sft --base=runs/main --data=instruction-data.json --out_dir=runs/sft [--lora_rank=8]
        [--template=chatml --system_prompt="You are a helpful assistant."]

Each example becomes its prompt in config.template (Alpaca by default; llmkern/finetune/templates.py)
followed by its response, the template's end marker and end-of-text; the loss is the
model's own next-token cross-entropy, on the response tokens only (mask_prompt) or on all of them, its mean over
the scored tokens of a whole optimizer step however grad_accum (and torchrun) split it into micro-batches.
The result is a plain GPT checkpoint in out_dir (LoRA merged into the weights, the adapters also
kept in out_dir/lora.safetensors), so `llmkern generate --run OUT` and the other recipes start from
it; out_dir/responses.json holds greedy answers to a few held-out instructions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .._atomic import write_json_atomic
from ..eval.logprobs import token_logprobs
from ..train import distributed
from .base import effective_max_len, load_base, require_base, save_finetuned
from .config import FinetuneConfig
from .data import (
    IGNORE, encode_prompt_response, load_instruction_data, make_lm_batch, make_packed_batch, pack_examples,
    split_examples, warn_dropped,
)
from .lora import apply_lora_from_config, check_lora_targets, lora_info, save_and_merge_lora, trainable_parameters
from .loop import check_run_folder, drop_train_state, fit, to_device
from .templates import PromptFormat, respond, settle_template

EVAL_TRAIN_EXAMPLES = 128  # the training loss before/after is measured on this many training examples


@dataclass
class SFTConfig(FinetuneConfig):
    """FinetuneConfig plus what SFT adds."""

    out_dir: str = "runs/sft"
    mask_prompt: bool = True  # loss only on the response (and its end-of-text), not on the prompt
    pack: bool = False  # several examples per row (up to max_len tokens), kept apart by document masking
    num_samples: int = 3  # held-out instructions answered (greedily) at the end, into responses.json
    max_new_tokens: int = 128  # the longest of those answers

    def validate(self) -> "SFTConfig":
        super().validate()
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        return self

    def unread_settings(self) -> dict[str, str]:
        unread = super().unread_settings()
        if self.num_samples == 0 and self.max_new_tokens != SFTConfig.max_new_tokens:
            unread["max_new_tokens"] = "num_samples=0 answers no instruction"
        return unread


def encode_examples(examples: list[dict[str, Any]], tokenizer, max_len: int, mask_prompt: bool = True,
                    prompt_format: PromptFormat | None = None) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(tokens, labels) pairs of Alpaca examples in prompt_format (default: the Alpaca template), and how
    many were dropped because cutting them to max_len left no response token to learn."""
    fmt = prompt_format or PromptFormat()
    encoded, dropped = [], 0
    for ex in examples:
        tokens, labels = encode_prompt_response(tokenizer, fmt.prompt(ex), fmt.response(ex["output"]), max_len)
        # labels[0] is never a target (there is no token before it): a row needs a response label after it,
        # masked prompt or not (cut inside its prompt, an example would train on prompt text alone).
        if any(lab != IGNORE for lab in labels[1:]):
            encoded.append((tokens, labels if mask_prompt else list(tokens)))  # unmasked: every token a label
        else:
            dropped += 1
    return encoded, dropped


def lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's own masked next-token loss (mean over the targets that are not -1); packed batches
    carry doc_ids, which keep their examples apart. A mixture-of-experts model in training mode adds its
    load-balancing loss over the batch's real tokens (token_mask: the padding's routing is not counted) times
    its router_aux_loss_coef, and the metrics carry that loss as "aux_loss" and the cross-entropy alone as "loss",
    which finetune.loop logs (finetune.aux_loss)."""
    _, loss = model(batch["idx"], batch["targets"], batch.get("doc_ids"), token_mask=batch.get("token_mask"))
    if not model.training or model.aux_loss is None:  # eval mode leaves the last training pass's aux_loss there
        return loss, {}
    aux, coef = model.aux_loss, model.config.router_aux_loss_coef
    # forward adds coef * aux only for coef > 0 (0 times a NaN aux loss would make the cross-entropy NaN)
    cross_entropy = loss.detach() - coef * aux if coef > 0 else loss.detach()
    return loss, {"loss": cross_entropy, "aux_loss": aux}


def scored_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many targets of a make_lm_batch (or make_packed_batch) batch are scored: what lm_loss is the mean of,
    so what its micro-batch weighs in an accumulated step (fit's weigh), whatever its rows' lengths."""
    return (batch["targets"] != IGNORE).sum()


@torch.no_grad()
def mean_token_loss(model, encoded: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> float:
    """Cross-entropy per scored token over all of `encoded` (a token-weighted mean, not a mean of batch means)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = to_device(make_lm_batch(encoded[start : start + batch_size], pad_id), device)
        logp = token_logprobs(model, batch["idx"], batch["targets"])  # (B, T), 0 on unscored targets
        nll -= float(logp.sum())
        count += int((batch["targets"] != IGNORE).sum())
    return nll / max(count, 1)


@torch.no_grad()
def answer_instructions(model, tokenizer, examples: list[dict[str, Any]], max_new_tokens: int,
                        prompt_format: PromptFormat | None = None) -> list[str]:
    """Greedy responses to the examples' prompts, each stopped at end-of-text or the template's end
    marker (which are left out)."""
    if not examples:
        return []
    fmt = prompt_format or PromptFormat()
    return respond(model, tokenizer, [fmt.prompt(ex) for ex in examples], fmt, max_new_tokens, temperature=0.0)


def run_sft(config: SFTConfig) -> dict[str, Any]:
    """Fine-tune config.base on config.data; write the model, metrics and responses to config.out_dir.

    Returns {"out_dir", "checkpoint", "steps", "train_loss_before/after", "val_loss_before/after",
    "trainable_params", "total_params", "examples", "lora", "responses", ...}. The train losses are
    measured on the first EVAL_TRAIN_EXAMPLES training examples.
    """
    if not isinstance(config, SFTConfig):
        raise TypeError(f"config must be an SFTConfig, got {type(config).__name__}")
    config.validate()
    require_base(config)  # these first: a wrong data file or out_dir is told before the base is loaded
    examples = load_instruction_data(config.data)
    check_run_folder(config)
    torch.manual_seed(config.seed)
    # under fsdp only rank 0 holds the whole model: after fit it alone saves it and answers the instructions
    model, tokenizer, base_meta = load_base(config, whole_on_rank_0=True)
    check_lora_targets(model, config)  # before the data is encoded; the adapters come after
    config, fmt = settle_template(config, base_meta)  # saved below with the settings
    max_len = effective_max_len(config, model)
    pad_id = tokenizer.eot_token  # any id: padding is on the right and never a target

    train_examples, val_examples = split_examples(examples, config.val_fraction, config.seed)
    train, dropped_train = encode_examples(train_examples, tokenizer, max_len, config.mask_prompt, fmt)
    val, dropped_val = encode_examples(val_examples, tokenizer, max_len, config.mask_prompt, fmt)
    if not train:
        raise ValueError(f"{config.data}: no training example keeps a response token within max_len={max_len} "
                         f"tokens; raise max_len (up to the model's block_size)")
    warn_dropped(config.data, dropped_train + dropped_val, len(examples),
                 f"their prompt fills max_len={max_len} tokens, leaving no response token to learn")
    train_probe = train[:EVAL_TRAIN_EXAMPLES]

    def evaluate(m) -> dict[str, float]:
        metrics = {"train_loss": mean_token_loss(m, train_probe, pad_id, config.batch_size)}
        if val:
            metrics["val_loss"] = mean_token_loss(m, val, pad_id, config.batch_size)
        return metrics

    wrapped = apply_lora_from_config(model, config)
    trainable = trainable_parameters(model)
    packed_rows = pack_examples(train, max_len) if config.pack else None
    settings = {"base_sha256": base_meta["base_sha256"]}  # a resumed run must start from the same base
    if packed_rows is not None:
        result = fit(model, lm_loss, packed_rows, lambda rows: make_packed_batch(rows, pad_id), config,
                     evaluate=evaluate, settings=settings, weigh=scored_targets)
    else:
        result = fit(model, lm_loss, train, lambda rows: make_lm_batch(rows, pad_id), config, evaluate=evaluate,
                     settings=settings, weigh=scored_targets)

    # Save: the adapters on their own, then the merged plain GPT that every other command reads.
    lora_path = save_and_merge_lora(model, config, wrapped)
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.spec,
            "finetune": {"method": "sft", "settings": config.to_dict(), "base": config.base,
                         "base_step": base_meta.get("step"), "lora": lora_info(config, wrapped) if wrapped else None}}
    checkpoint = save_finetuned(config.out_dir, result["steps"], model.state_dict(), meta)
    drop_train_state(config)

    model.eval()
    responses_path = os.path.join(config.out_dir, "responses.json")
    info = distributed.detect()
    # rank 0's alone: when it fails, the other ranks must not wait for it at the CLI's shutdown barrier
    with distributed.fail_together(info, None, "writing the sample responses"):
        if info.is_main:  # under torchrun, rank 0 answers
            shown = (val_examples or train_examples)[: config.num_samples]
            answers = answer_instructions(model, tokenizer, shown, config.max_new_tokens, fmt)
            write_json_atomic(responses_path, [
                {"instruction": ex["instruction"], "input": ex.get("input", ""), "reference": ex["output"],
                 "response": r}
                for ex, r in zip(shown, answers)])

    first, last = result["first_eval"] or {}, result["last_eval"]  # first: lost with the log of a resumed run
    return {
        "method": "sft", "out_dir": config.out_dir, "checkpoint": checkpoint, "template": fmt.template,
        "steps": result["steps"],
        "skipped_steps": result["skipped_steps"], "seconds": round(result["seconds"], 2),
        "train_loss_before": first.get("train_loss"), "train_loss_after": last["train_loss"],
        "val_loss_before": first.get("val_loss"), "val_loss_after": last.get("val_loss"),
        "last_batch_loss": result["train"].get("loss"),
        "examples": {"train": len(train), "val": len(val), "dropped_too_long": dropped_train + dropped_val,
                     "packed_rows": len(packed_rows) if packed_rows is not None else None},
        "trainable_params": trainable, "total_params": sum(p.numel() for p in model.parameters()),
        "lora": lora_path, "responses": responses_path, "metrics": result["metrics"],
    }
