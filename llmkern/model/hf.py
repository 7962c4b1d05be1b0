"""Hugging Face GPT-2 weights in and out, by name mapping (no download, no transformers import).

HF's GPT-2 stores its linear layers as Conv1D, weight (in, out), where ours are nn.Linear,
weight (out, in): those are transposed. Its fused c_attn makes [q | k | v] with the heads
contiguous in each, which is the row order of our qkv layer, so it maps as is. The token
table gets zero rows up to our padded vocabulary (they are cut from the logits anyway).
"""

from __future__ import annotations

import os
import re

import torch

from .config import GPTConfig
from .gpt import GPT

# our name (per block: "blocks.{i}.") -> (HF name, transposed?)
_BLOCK_NAMES = {
    "norm1.weight": ("ln_1.weight", False),
    "norm1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False),
    "norm2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True),
    "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True),
    "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
_TOP_NAMES = {"wpe.weight": "wpe.weight", "norm_f.weight": "ln_f.weight", "norm_f.bias": "ln_f.bias"}
# Buffers some HF checkpoints carry (the causal mask); not weights.
_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


def config_from_hf_gpt2(state_dict: dict[str, torch.Tensor], n_head: int | None = None, **overrides) -> GPTConfig:
    """The GPTConfig of a HF GPT-2 state dict: sizes read from the tensors; n_head (which the
    shapes do not tell) defaults to n_embd / 64, as in every released GPT-2."""
    sd = _strip_prefix(state_dict)
    for name in ("wte.weight", "wpe.weight"):
        if sd[name].dim() != 2:
            raise ValueError(f"not a GPT-2 state dict: {name} must be 2-D, got shape {tuple(sd[name].shape)}")
    vocab_size, n_embd = sd["wte.weight"].shape
    n_layer = len({int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k))})
    if n_layer == 0:
        # llmkern's own model.safetensors has wte/wpe too, so it gets this far; its blocks are "blocks.<i>."
        ours = any(k.startswith("blocks.") for k in sd)
        raise ValueError("not a GPT-2 state dict: no h.<i>.* blocks" + (
            "; these are llmkern's weights: give their run or checkpoint folder instead of the file" if ours else ""))
    values = dict(
        vocab_size=vocab_size, block_size=sd["wpe.weight"].shape[0], n_layer=n_layer, n_embd=n_embd,
        n_head=n_head if n_head is not None else n_embd // 64,
        norm="layernorm", pos="learned", mlp="gelu", tie_embeddings=True, bias=True, norm_eps=1e-5,
    )
    return GPTConfig.from_dict({**values, **overrides})


def from_hf_gpt2(state_dict: dict[str, torch.Tensor], n_head: int | None = None, **overrides) -> GPT:
    """A GPT holding the weights of a HF GPT-2 (GPT2Model or GPT2LMHeadModel) state dict."""
    config = config_from_hf_gpt2(state_dict, n_head, **overrides)
    model = GPT(config)
    load_hf_gpt2(model, state_dict)
    return model


def load_hf_gpt2_file(path: str, n_head: int | None = None, **overrides) -> GPT:
    """from_hf_gpt2 of a Hugging Face model.safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    try:
        state_dict = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path!r} is not a readable safetensors file: {err}") from err
    return from_hf_gpt2(state_dict, n_head, **overrides)


@torch.no_grad()
def load_hf_gpt2(model: GPT, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a HF GPT-2 state dict into `model` (a GPT-2-shaped GPT); every weight must be there."""
    _check_gpt2_shaped(model.config)
    sd = _strip_prefix(state_dict)
    expected = set(_hf_names(model.config.n_layer))
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"not a GPT-2 state dict of {model.config.n_layer} layers: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    # GPT-2 ties its output layer to wte, and so does the model made here: an lm_head of its own (a model
    # saved with tie_word_embeddings=False) would be dropped and the logits silently wrong.
    head = state_dict.get("lm_head.weight")
    if head is not None and not (head.shape == sd["wte.weight"].shape and torch.equal(head, sd["wte.weight"])):
        raise ValueError("lm_head.weight differs from wte.weight: an untied output layer, which GPT-2 (tied "
                         "embeddings) cannot hold")
    for ours, (theirs, transposed) in _mapping(model.config.n_layer).items():
        src = sd[theirs].t() if transposed else sd[theirs]
        _copy(model.get_parameter(ours), src, ours, theirs)
    table = model.wte.weight
    vocab = model.config.vocab_size
    _copy(table[:vocab], sd["wte.weight"], "wte.weight", "wte.weight")
    table[vocab:].zero_()


@torch.no_grad()
def to_hf_gpt2(model: GPT) -> dict[str, torch.Tensor]:
    """The HF GPT2LMHeadModel state dict of a GPT-2-shaped GPT ("transformer."-prefixed names;
    the vocabulary padding dropped; lm_head.weight tied to the token table)."""
    _check_gpt2_shaped(model.config)
    out = {}
    for ours, (theirs, transposed) in _mapping(model.config.n_layer).items():
        p = model.get_parameter(ours).detach()
        out["transformer." + theirs] = (p.t() if transposed else p).contiguous().clone()
    out["transformer.wte.weight"] = model.wte.weight.detach()[: model.config.vocab_size].clone()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _mapping(n_layer: int) -> dict[str, tuple[str, bool]]:
    mapping = {ours: (theirs, False) for ours, theirs in _TOP_NAMES.items()}
    for i in range(n_layer):
        for ours, (theirs, transposed) in _BLOCK_NAMES.items():
            mapping[f"blocks.{i}.{ours}"] = (f"h.{i}.{theirs}", transposed)
    return mapping


def _hf_names(n_layer: int) -> list[str]:
    return [theirs for theirs, _ in _mapping(n_layer).values()] + ["wte.weight"]


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names without "transformer." (GPT2LMHeadModel), without lm_head (tied) and the mask buffers."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    out = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" or _IGNORED.search(name):
            continue
        out[name.removeprefix("transformer.")] = tensor
    if "wte.weight" not in out or "wpe.weight" not in out:
        raise ValueError("not a GPT-2 state dict: no wte.weight / wpe.weight (with or without 'transformer.')")
    return out


def _check_gpt2_shaped(config: GPTConfig) -> None:
    wanted = dict(norm="layernorm", pos="learned", mlp="gelu", tie_embeddings=True, bias=True)
    wrong = {k: getattr(config, k) for k, v in wanted.items() if getattr(config, k) != v}
    if wrong or config.n_kv_head != config.n_head:
        raise ValueError(f"GPT-2 weights need a GPT-2-shaped model ({wanted}, n_kv_head == n_head); this one has {wrong}")


def _copy(dst: torch.Tensor, src: torch.Tensor, ours: str, theirs: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{theirs} has shape {tuple(src.shape)}; {ours} needs {tuple(dst.shape)}")
    dst.copy_(src)
