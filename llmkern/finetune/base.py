"""Where fine-tuning starts and ends: loading the base model of a run, and saving the result as a
checkpoint that `llmkern generate` / `llmkern eval` / the next recipe can start from."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from ..train import checkpoint as ckpt
from ..train.inference import resolve_device


def load_base(config) -> tuple[Any, Any, dict[str, Any]]:
    """(GPT on config.device in train mode, its tokenizer, the base checkpoint's meta) from config.base:
    a run folder (its newest checkpoint) or a checkpoint folder written by llmkern (pretraining or a
    fine-tuning recipe), or the model.safetensors of a Hugging Face GPT-2 (with config.base_tokenizer).
    config.backend, when set, replaces the model's kernel backend."""
    from ..data.tokenizer import get_tokenizer
    from ..model import GPT, GPTConfig

    if not config.base:
        raise ValueError("base must name the model to start from: a run folder, a checkpoint folder "
                         "(e.g. --base=runs/main, which `llmkern train` writes) or a GPT-2 .safetensors file")
    if config.base.endswith(".safetensors"):
        return _load_hf_gpt2(config)
    state = ckpt.load_checkpoint(config.base)
    for key in ("model_config", "tokenizer"):
        if key not in state.meta:
            raise ValueError(f"checkpoint {state.path!r} lacks {key!r}: it was not written by llmkern")
    model_config = GPTConfig.from_dict(state.meta["model_config"])
    if config.backend:
        model_config = dataclasses.replace(model_config, backend=config.backend)
    model = GPT(model_config)
    body = {k: v for k, v in state.model.items() if not k.startswith("head.")}  # a classifier's or RM's head
    model.load_state_dict(body)
    model.to(resolve_device(config.device)).train()
    return model, get_tokenizer(state.meta["tokenizer"]), state.meta


def _load_hf_gpt2(config) -> tuple[Any, Any, dict[str, Any]]:
    """A GPT-2 from Hugging Face's model.safetensors (GPT2Model or GPT2LMHeadModel names)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..data.tokenizer import get_tokenizer
    from ..model.hf import from_hf_gpt2

    if not os.path.isfile(config.base):
        raise FileNotFoundError(f"base {config.base!r} does not exist")
    try:
        state_dict = load_file(config.base)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"base {config.base!r} is not a readable safetensors file: {err}") from err
    model = from_hf_gpt2(state_dict, **({"backend": config.backend} if config.backend else {}))
    tokenizer = get_tokenizer(config.base_tokenizer)
    if tokenizer.n_vocab > model.config.vocab_size:
        raise ValueError(f"base_tokenizer {config.base_tokenizer!r} has {tokenizer.n_vocab} tokens; the model "
                         f"{config.base!r} only {model.config.vocab_size}")
    model.to(resolve_device(config.device)).train()
    return model, tokenizer, {"source": "hf-gpt2", "path": os.path.abspath(config.base)}


def effective_max_len(config, model) -> int:
    """Tokens per example: config.max_len, or the model's context when that is shorter."""
    return min(config.max_len, model.config.block_size)


def save_finetuned(out_dir: str, step: int, model_state: dict[str, torch.Tensor], meta: dict[str, Any],
                   keep: int = 1) -> str:
    """Write a fine-tuned model atomically as checkpoint `step` of out_dir; its path.

    meta must hold "model_config" (the GPT's, as GPTConfig.to_dict) and "tokenizer" (its spec), so that
    llmkern.train.inference.load_trained_model and load_base read it; recipes add "finetune"
    (method and settings) and their own keys. Weights beyond the GPT's (a head) use names that start
    with "head.". No optimizer state is kept: a fine-tuned model is a new starting point, not a run to
    resume.
    """
    for key in ("model_config", "tokenizer"):
        if key not in meta:
            raise ValueError(f"meta must hold {key!r}")
    return ckpt.save_checkpoint(out_dir, step, model_state, {"state": {}, "param_groups": []}, meta, keep=keep)
