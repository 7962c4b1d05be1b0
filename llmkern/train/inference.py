"""Using a trained run: load its model and tokenizer from the newest checkpoint, sample text, score data."""

from __future__ import annotations

import math
import os

import torch

from . import checkpoint as ckpt
from .distributed import parse_device


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto": the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(device)


def hf_source(model_type: str) -> str:
    """The "source" label of a model imported from a Hugging Face file of this model_type: "hf-" and its family,
    "hf-gpt2", "hf-llama" (Llama, Mistral, Qwen2, Qwen3, and the mixture-of-experts Mixtral and Qwen3-MoE: Llama's
    model), "hf-phi3", "hf-gemma3" (Gemma 3, text or multimodal) or "hf-gemma2" (Gemma 2, whose model_type is its
    family's name, as GPT-2's is). Whatever the family, it starts with "hf-" (is_hf_source), as every label did."""
    from ..model.hf_gemma3_config import GEMMA3_TYPES
    from ..model.hf_llama_config import LLAMA_TYPES, MOE_TYPES, PHI3_TYPE

    if model_type in LLAMA_TYPES + MOE_TYPES:
        return "hf-llama"
    if model_type == PHI3_TYPE:
        return "hf-phi3"
    if model_type in GEMMA3_TYPES:
        return "hf-gemma3"
    return f"hf-{model_type}"  # gpt2, gemma2


def is_hf_source(meta: dict) -> bool:
    """Whether load_gpt's meta is a Hugging Face file's (which records no tokenizer), by any label it has given:
    "hf-gpt2" and "hf-llama" from older llmkern, "hf-phi3", "hf-gemma3" and "hf-gemma2" too since."""
    return str(meta.get("source", "")).startswith("hf-")


def load_gpt(path: str, backend: str | None = None, hf_tokenizer: str = "gpt2"):
    """(GPT on the CPU, its tokenizer spec, meta) from the weights at `path`: a run folder (its newest
    checkpoint) or a checkpoint folder that llmkern wrote (pretraining or fine-tuning; a classifier's or
    reward model's "head.*" weights are left out), or a Hugging Face model.safetensors (or shard) of GPT-2,
    a Llama-family model, Phi-3, Gemma 2 or Gemma 3 (by the model_type of the config.json beside it), whose tokenizer is
    hf_tokenizer (a tokenizer spec: a tiktoken name, a .tiktoken file or a tokenizer.json). backend, when given,
    replaces the model's kernel backend. meta is the checkpoint's ({"source": hf_source(model_type), "path": ...}
    for a HF file)."""
    import dataclasses

    from ..model import GPT, GPTConfig

    if not isinstance(path, str) or not path:
        raise ValueError(f"path must name a run folder, a checkpoint folder or a Hugging Face .safetensors file; "
                         f"got {path!r}")
    from ..model.hf_common import HF_WEIGHTS_SUFFIXES

    overrides = {"backend": backend} if backend else {}
    if path.endswith(HF_WEIGHTS_SUFFIXES):
        from ..model.hf import load_hf_file

        model, model_type = load_hf_file(path, **overrides)
        return model, hf_tokenizer, {"source": hf_source(model_type), "path": os.path.abspath(path)}
    state = ckpt.load_model_checkpoint(path)
    for key in ("model_config", "tokenizer"):
        if key not in state.meta:
            raise ValueError(f"checkpoint {state.path!r} lacks {key!r}: it was not written by llmkern")
    model = GPT(dataclasses.replace(GPTConfig.from_dict(state.meta["model_config"]), **overrides))
    model.load_state_dict({k: v for k, v in state.model.items() if not k.startswith("head.")})
    return model, state.meta["tokenizer"], state.meta


def load_trained_model(run_dir: str, device: str | torch.device = "auto"):
    """(model in eval mode, tokenizer, Checkpoint) from a run folder or a checkpoint folder. The tokenizer is checked
    against the model's vocabulary (llmkern.data.model_vocab.tokenizer_for_model)."""
    from ..data.model_vocab import tokenizer_for_model
    from ..data.tokenizer import get_tokenizer
    from ..model import GPT, GPTConfig

    if isinstance(run_dir, str) and os.path.isfile(run_dir):  # else load_checkpoint says it "does not exist"
        folder = os.path.dirname(os.path.abspath(run_dir))
        hint = (f"its checkpoint folder {folder!r}" if os.path.isfile(os.path.join(folder, "meta.json")) else
                "a run folder or a checkpoint folder (a Hugging Face GPT-2 or Llama-family model.safetensors is a "
                "start for `llmkern train --init_from=FILE` or `llmkern finetune ... --base=FILE`)")
        raise ValueError(f"{run_dir!r} is a file; give {hint}")
    state = ckpt.load_model_checkpoint(run_dir)
    for key in ("model_config", "tokenizer"):
        if key not in state.meta:
            raise ValueError(f"checkpoint {state.path!r} lacks {key!r}: it was not written by llmkern's Trainer")
    model = GPT(GPTConfig.from_dict(state.meta["model_config"]))
    if any(k.startswith("head.") for k in state.model):  # a GPT body under a scoring head of its own
        method = state.meta.get("finetune", {}).get("method", "classify or reward")
        raise ValueError(f"{state.path!r} is not a language model: it holds a {method!r} run's weights (a GPT body "
                         f"under a scoring head); generate and score text with a pretraining or SFT/DPO/PPO/GRPO run "
                         f"(a reward model judges win rates with --judge-kind reward)")
    model.load_state_dict(state.model)
    model.to(resolve_device(device)).eval()
    spec = state.meta["tokenizer"]
    tokenizer = tokenizer_for_model(get_tokenizer(spec), model.config.vocab_size, spec, f"the model {state.path!r}")
    return model, tokenizer, state


def sample_text(model, tokenizer, prompts: list[str], max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int | None = 50, top_p: float | None = None, seed: int | None = 0) -> list[str]:
    """Each prompt followed by its generated continuation, decoded (generation stops at end-of-text). The
    model reads each prompt after the tokenizer's begin-of-sequence token where it has one, which the text
    leaves out, and keeps reading it where a sequence outgrows block_size."""
    from ..data.sequences import encode_prompt, sequence_start
    from ..model import generate

    # A str is a sequence of texts too: each of its characters would be sampled as a prompt, silently.
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of texts, got {prompts!r:.60}")
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    start = len(sequence_start(tokenizer))
    out = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_token=tokenizer.eot_token, seed=seed, keep_first=start)
    texts = []
    for row in out:
        row = row[start:]  # decoded, the begin-of-sequence token is the text "<|begin_of_text|>"
        if row and row[-1] == tokenizer.eot_token:
            row = row[:-1]
        texts.append(tokenizer.decode([t for t in row if t != tokenizer.eot_token]))
    return texts


def evaluate_run(run_dir: str, data_dir: str, split: str = "val", batch_size: int = 8, max_batches: int = 100,
                 device: str | torch.device = "auto", seq_len: int | None = None) -> dict[str, float]:
    """Loss and perplexity of a run's model on a split of token shards (sequential windows from the start), with
    document masking where the run was trained with it (TrainConfig.document_masking), as its trainer validated."""
    from ..data.loader import TokenLoader
    from ..data.shards import load_manifest
    from .trainer import evaluate_loss

    # 0 or fewer batches scored one batch anyway, and seq_len=0 ran at the model's block_size
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be an int >= 1, got {max_batches!r}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len must be an int >= 1 or None, got {seq_len!r}")
    device = resolve_device(device)
    model, tokenizer, state = load_trained_model(run_dir, device)
    # Scored without it, a document-masked run's tokens would see the documents before them, at positions that do
    # not restart: another loss than its trainer's validation of the same windows. (A fine-tuning run's config
    # has no such setting.)
    document_ids = bool(state.meta.get("config", {}).get("document_masking", False))
    from ..data.tokenizer import same_tokenizer

    manifest = load_manifest(data_dir)
    data_tokenizer = manifest["tokenizer"]
    if not same_tokenizer(tokenizer.spec, data_tokenizer, manifest.get("tokenizer_sha256")):
        raise ValueError(f"the data in {data_dir!r} was tokenized with {data_tokenizer!r}, the model with "
                         f"{tokenizer.spec!r}")
    seq_len = seq_len or model.config.block_size
    loader = TokenLoader(data_dir, split, batch_size, seq_len, mode="sequential", device=device,
                         document_ids=document_ids)
    if 0 < loader.windows_per_epoch < batch_size:  # one batch would wrap around and score windows twice
        batch_size = loader.windows_per_epoch
        loader = TokenLoader(data_dir, split, batch_size, seq_len, mode="sequential", device=device,
                             document_ids=document_ids)
    batches = max(1, min(max_batches, loader.batches_per_epoch))
    loss = evaluate_loss(model, loader, batches)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "tokens": batches * batch_size * seq_len, "split": split, "data": os.path.abspath(data_dir)}
