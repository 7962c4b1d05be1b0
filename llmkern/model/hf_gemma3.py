"""Hugging Face Gemma 3 text weights and Gemma 2 weights in and out, by name mapping (no download, no transformers
import). The config.json is read and written by hf_gemma3_config.

Gemma3ForCausalLM's names are Llama's (q/k/v stacked by rows into our qkv, gate/up into our gate_up, nothing
transposed) with Qwen3's q_norm and k_norm and four norms per layer: input_layernorm (our norm1),
post_attention_layernorm (post_attn_norm: on attention's output, where Llama's of that name is the MLP's input
norm), pre_feedforward_layernorm (norm2) and post_feedforward_layernorm (post_mlp_norm). Every Gemma RMSNorm scales
by (1 + w): the model here holds 1 + w (worked out in float32, then cast to the model's dtype), and w = held - 1 is
exported, which gives a bf16 or fp16 checkpoint's norms back bit for bit from a float32 model.

The multimodal checkpoint (Gemma3ForConditionalGeneration: Gemma 3 4B, 12B, 27B) holds the text model under
"language_model.model." and its head under "language_model.lm_head." in the files written before transformers
4.52, under "model.language_model." and "lm_head." in later ones; both are read, and the vision tower and the
multimodal projector are left out.

Gemma2ForCausalLM's names are Gemma3ForCausalLM's without q_norm and k_norm (Gemma 2 has no QK-norm); its norms
scale by (1 + w) too.
"""

from __future__ import annotations

import torch

from .gpt import GPT
from .hf_common import load_model_file
from .hf_gemma3_config import (
    check_gemma2_shaped,
    check_gemma3_shaped,
    config_from_hf_gemma2,
    config_from_hf_gemma3,
    hf_gemma2_config,
    hf_gemma3_config,
)
from .hf_llama import layer_mapping, load_mapped_weights, mapped_weights_out

# our name (per block: "blocks.{i}.") -> HF's names (under "model.layers.{i}."), stacked by rows in this order
_GEMMA3_BLOCK_NAMES = {
    "norm1.weight": ("input_layernorm.weight",),
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.q_norm.weight": ("self_attn.q_norm.weight",),
    "attn.k_norm.weight": ("self_attn.k_norm.weight",),
    "attn.proj.weight": ("self_attn.o_proj.weight",),
    "post_attn_norm.weight": ("post_attention_layernorm.weight",),
    "norm2.weight": ("pre_feedforward_layernorm.weight",),
    "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.proj.weight": ("mlp.down_proj.weight",),
    "post_mlp_norm.weight": ("post_feedforward_layernorm.weight",),
}
# Gemma 2's: Gemma 3's without QK-norm
_GEMMA2_BLOCK_NAMES = {ours: theirs for ours, theirs in _GEMMA3_BLOCK_NAMES.items()
                       if ours not in ("attn.q_norm.weight", "attn.k_norm.weight")}
# The multimodal checkpoint's text model and head, older and newer names -> Gemma3ForCausalLM's
_TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                  "language_model.lm_head.": "lm_head."}
# Its other parts, left out
_OTHER_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def from_hf_gemma3(state_dict: dict[str, torch.Tensor], hf_config: dict, **overrides) -> GPT:
    """A GPT holding the weights of a HF Gemma 3 text model's state dict (Gemma3ForCausalLM's, or the text part of
    a Gemma3ForConditionalGeneration's), shaped by hf_config (its config.json, as a dict)."""
    model = GPT(config_from_hf_gemma3(hf_config, **overrides))
    load_hf_gemma3(model, state_dict)
    return model


def load_hf_gemma3_file(path: str, **overrides) -> GPT:
    """from_hf_gemma3 of a Hugging Face model.safetensors file (or any shard of a sharded checkpoint) and the
    config.json beside it."""
    return load_model_file(path, "Gemma 3", config_from_hf_gemma3, load_hf_gemma3, **overrides)


@torch.no_grad()
def load_hf_gemma3(model: GPT, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a HF Gemma 3 text state dict into `model` (a Gemma-3-shaped GPT of its sizes); every weight of the text
    model must be there, and nothing else but the multimodal checkpoint's vision tower and projector."""
    check_gemma3_shaped(model.config)
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    mapping = layer_mapping(model.config, _GEMMA3_BLOCK_NAMES)
    load_mapped_weights(model, _text_part(state_dict), mapping, "Gemma 3", _norm_in)


@torch.no_grad()
def to_hf_gemma3(model: GPT) -> tuple[dict[str, torch.Tensor], dict]:
    """(the HF Gemma3ForCausalLM state dict, its config.json as a dict: see hf_gemma3_config) of a Gemma-3-shaped
    GPT: the vocabulary padding dropped; a tied lm_head.weight is the embed_tokens tensor itself (as HF's
    state_dict() has it; safetensors' save_file wants it left out)."""
    hf_config = hf_gemma3_config(model.config, model.wte.weight.dtype)  # first: checks the model's shape
    return mapped_weights_out(model, layer_mapping(model.config, _GEMMA3_BLOCK_NAMES), _norm_out), hf_config


def from_hf_gemma2(state_dict: dict[str, torch.Tensor], hf_config: dict, **overrides) -> GPT:
    """A GPT holding the weights of a HF Gemma 2 model's state dict (Gemma2ForCausalLM's), shaped by hf_config (its
    config.json, as a dict)."""
    model = GPT(config_from_hf_gemma2(hf_config, **overrides))
    load_hf_gemma2(model, state_dict)
    return model


def load_hf_gemma2_file(path: str, **overrides) -> GPT:
    """from_hf_gemma2 of a Hugging Face model.safetensors file (or any shard of a sharded checkpoint) and the
    config.json beside it."""
    return load_model_file(path, "Gemma 2", config_from_hf_gemma2, load_hf_gemma2, **overrides)


@torch.no_grad()
def load_hf_gemma2(model: GPT, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a HF Gemma 2 state dict into `model` (a Gemma-2-shaped GPT of its sizes); every weight must be there,
    and nothing else."""
    check_gemma2_shaped(model.config)
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    load_mapped_weights(model, state_dict, layer_mapping(model.config, _GEMMA2_BLOCK_NAMES), "Gemma 2", _norm_in)


@torch.no_grad()
def to_hf_gemma2(model: GPT) -> tuple[dict[str, torch.Tensor], dict]:
    """(the HF Gemma2ForCausalLM state dict, its config.json as a dict: see hf_gemma2_config) of a Gemma-2-shaped
    GPT: the vocabulary padding dropped; a tied lm_head.weight is the embed_tokens tensor itself."""
    hf_config = hf_gemma2_config(model.config, model.wte.weight.dtype)  # first: checks the model's shape
    return mapped_weights_out(model, layer_mapping(model.config, _GEMMA2_BLOCK_NAMES), _norm_out), hf_config


def _text_part(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict under Gemma3ForCausalLM's names: a multimodal checkpoint's text model renamed, its other
    parts left out; a text checkpoint's names as they are."""
    out = {}
    for name, tensor in state_dict.items():
        if name.startswith(_OTHER_PREFIXES):
            continue
        prefix = next((p for p in _TEXT_PREFIXES if name.startswith(p)), None)
        out[name if prefix is None else _TEXT_PREFIXES[prefix] + name.removeprefix(prefix)] = tensor
    return out


def _is_norm(ours: str) -> bool:
    """Whether our parameter `ours` is one of Gemma's RMSNorm scales (the blocks' four, QK-norm's two, the final)."""
    return ours.rsplit(".", 2)[-2] in ("norm1", "norm2", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm",
                                       "norm_f")


def _norm_in(ours: str, tensor: torch.Tensor) -> torch.Tensor:
    """HF's w -> the 1 + w our RMSNorm multiplies by, in float32 (load_mapped_weights casts it to the model's)."""
    return tensor.float() + 1 if _is_norm(ours) else tensor


def _norm_out(ours: str, tensor: torch.Tensor) -> torch.Tensor:
    """Our 1 + w -> HF's w, in float32 and then in the parameter's dtype."""
    return (tensor.float() - 1).to(tensor.dtype) if _is_norm(ours) else tensor
