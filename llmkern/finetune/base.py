"""Where fine-tuning starts and ends: loading the base model of a run, and saving the result as a
checkpoint that `llmkern generate` / `llmkern eval` / the next recipe can start from."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from ..model.config import identity_dict
from ..model.hf_common import HF_INDEX_SUFFIX, weights_files
from ..model.hf_save import with_hf_source
from ..train import checkpoint as ckpt
from ..train import distributed
from ..train.inference import load_gpt


SCORING_METHODS = ("reward", "classify")  # recipes whose model scores text through a head: no language model


def load_base(config, language_model: bool = True, whole_on_rank_0: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """(GPT on config.device in train mode (but see whole_on_rank_0), its tokenizer, the base checkpoint's meta)
    from config.base: a run folder (its newest checkpoint) or a checkpoint folder written by llmkern (pretraining
    or a fine-tuning recipe), or the model.safetensors of a Hugging Face GPT-2 (with config.base_tokenizer).
    config.backend, when set, replaces the model's kernel backend. language_model: the recipe writes
    text (SFT, DPO, PPO, GRPO), so a reward model or classifier (a body trained to score) is refused; the
    scoring recipes pass False and put a fresh head on any body. The meta returned has one key more,
    "base_sha256": base_fingerprint of what was loaded, which a resumed run must share.

    whole_on_rank_0: the recipe lets fit shard the model (parallel="fsdp") and needs the whole model after
    training on rank 0 alone (saving, merging LoRA, sampling). Under parallel="fsdp" rank 0 alone then reads
    the weights and keeps the model on its CPU, and the other ranks get the model on the meta device (its
    modules and shapes, no weights): fit's sharding fills every rank's shard from rank 0's copy, so a job holds
    one whole model on rank 0's host instead of one per rank. Elsewhere (one process, ddp) it changes nothing."""
    from ..data.model_vocab import tokenizer_for_model
    from ..data.tokenizer import get_tokenizer

    require_base(config)
    from .loop import check_parallel

    check_parallel(config)  # before the (slow) loading: parallel='fsdp' without torchrun cannot run
    info = distributed.detect()
    device = distributed.pick_device(config.device, info)  # under torchrun: this rank's GPU
    on_rank_0 = whole_on_rank_0 and config.parallel == "fsdp"
    if on_rank_0:
        model, tokenizer_spec, meta = _load_on_rank_0(config, info, device)
    else:
        model, tokenizer_spec, meta = _load_whole(config)
    _set_aux_loss_coef(model, config.router_aux_loss_coef)  # after the fingerprint: a setting, not another base
    method = meta.get("finetune", {}).get("method")
    if language_model and method in SCORING_METHODS:
        raise ValueError(f"base {config.base!r} is a {method!r} run: its body learned to score text through a head, "
                         f"not to write it; start this recipe from a pretraining or SFT run")
    # a tokenizer may have more ids than the model has embeddings where those are special tokens (Gemma 3's)
    tokenizer = tokenizer_for_model(get_tokenizer(tokenizer_spec), model.config.vocab_size, tokenizer_spec,
                                    f"the model {config.base!r}")
    if not on_rank_0:  # rank 0's whole copy for fsdp waits on its CPU: only shards go to the GPUs
        model.to(device)
    return model.train(), tokenizer, meta


def _load_whole(config) -> tuple[Any, Any, dict[str, Any]]:
    """(GPT on the CPU, its tokenizer spec, meta with "base_sha256") read from config.base."""
    source = checkpoint_of(config.base)  # resolved once, so the weights hashed are the ones loaded
    model, tokenizer_spec, meta = load_gpt(source, config.backend or None, config.base_tokenizer)
    return model, tokenizer_spec, {**meta, "base_sha256": base_fingerprint(source, model.config.to_dict())}


def _load_on_rank_0(config, info: distributed.DistInfo, device: torch.device) -> tuple[Any, Any, dict[str, Any]]:
    """_load_whole on rank 0; on the other ranks the same GPT on the meta device, built from the model config,
    tokenizer spec and meta that rank 0 read and broadcasts (any base: a checkpoint, or a Hugging Face file
    whose config load_gpt derives). The fingerprint comes with the meta: the weights are hashed once."""
    import torch.distributed as dist

    from ..model import GPT, GPTConfig

    distributed.init(info, device)  # fit joins the job later; the broadcast below needs it now
    loaded = None
    # rank 0 reads alone: when it fails (a wrong path), the other ranks must not wait for its broadcast
    with distributed.fail_together(info, None, f"loading the base model {config.base!r}"):
        if info.is_main:
            loaded = _load_whole(config)
    described = [(loaded[0].config.to_dict(), loaded[1], loaded[2]) if info.is_main else None]
    dist.broadcast_object_list(described, src=0)
    if info.is_main:
        return loaded
    model_config, tokenizer_spec, meta = described[0]
    with torch.device("meta"):  # shapes only: no weights are made, nor random numbers drawn
        model = GPT(GPTConfig.from_dict(model_config))
    return model, tokenizer_spec, meta


def _set_aux_loss_coef(model, coef: float) -> None:
    """config.router_aux_loss_coef on the model (-1: the base's as it is); a dense model has no router to weigh."""
    if coef == -1.0:
        return
    if model.config.n_experts is None:
        raise ValueError(f"router_aux_loss_coef={coef} weighs a mixture-of-experts model's load-balancing loss; "
                         f"the base model has no experts (leave it at -1)")
    model.config.router_aux_loss_coef = float(coef)


def require_base(config) -> None:
    """A ValueError unless config.base names a model (load_base's first check; the recipes call it before
    reading their data)."""
    if not config.base:
        raise ValueError("base must name the model to start from: a run folder, a checkpoint folder "
                         "(e.g. --base=runs/main, which `llmkern train` writes) or a GPT-2 .safetensors file")


def check_exists(setting: str, path: str) -> None:
    """A FileNotFoundError naming the setting when `path` is not there: DPO's reference and PPO's and GRPO's
    reward model, loaded after the base, are checked so before the base is loaded."""
    if path and not os.path.exists(path):
        raise FileNotFoundError(f"{setting} {path!r} does not exist")


def checkpoint_of(path: str) -> str:
    """The checkpoint folder a run folder stands for (its newest, as load_checkpoint takes it); any other
    path as it is (a checkpoint folder, a .safetensors file, or a wrong path that the loader reports).
    Resolve a path once and both load and fingerprint what it gives, so that the weights hashed are the
    ones loaded even when the run writes a newer checkpoint in between."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "meta.json")):
        return ckpt.latest_checkpoint(path) or path
    return path


def base_fingerprint(source: str, model_config: dict[str, Any]) -> str:
    """A sha256 of a base model by content (source: a checkpoint folder, as checkpoint_of gives it, or a
    Hugging Face .safetensors file, a shard or model.safetensors.index.json): its weights file (every shard an
    index lists) and the config it was loaded with (the same
    weights under another config, e.g. a Hugging Face config.json's head count, are another model). A
    resume compares it rather than the path: a moved or renamed copy of the base is the same model, while
    the same path may hold another one (a base run that trained on since). The other models a run reads,
    DPO's reference and PPO's and GRPO's reward model, are identified the same way. It reads the weights once
    more, at about 1 GB/s, mostly from the page cache the load just filled."""
    # --backend picks kernels, not the model; identity_dict: a field added since an older run was fingerprinted
    # changes nothing where it holds what its absence meant, so that run still resumes
    config = {k: v for k, v in identity_dict(model_config).items() if k != "backend"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8"))
    for file in _fingerprinted_files(source):
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _fingerprinted_files(source: str) -> list[str]:
    """The files base_fingerprint hashes: a checkpoint folder's model.safetensors; a model.safetensors.index.json's
    shards, every one (the index holds their names alone, the same for another model of that layout); any other
    file itself (a shard alone, as before: each shard of another model differs, and older runs keep their
    fingerprints)."""
    if os.path.isdir(source):
        return [os.path.join(source, "model.safetensors")]
    if source.endswith(HF_INDEX_SUFFIX):
        return weights_files(source)
    return [source]


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
    info = distributed.detect()
    # rank 0 writes: when it cannot (disk full, no permission), the other ranks must not wait for it
    with distributed.fail_together(info, None, f"saving the model of step {step}"):
        if info.is_main:  # under torchrun every process holds the same model: rank 0 writes it
            ckpt.save_checkpoint(out_dir, step, model_state, {"state": {}, "param_groups": []},
                                 with_hf_source(meta), keep=keep)
    return ckpt.step_dir(out_dir, step)
