"""Hugging Face Phi-3 weights (Phi3ForCausalLM: Phi-3-mini, Phi-3.5-mini, Phi-4-mini) in and out, by name mapping
(no download, no transformers import). Its config.json is read and written by hf_llama_config.

Phi-3 computes Llama's model, with two of its weights fused as ours are: qkv_proj is q's rows, then k's, then v's
(transformers splits it at num_attention_heads * head_dim and at num_key_value_heads * head_dim past that), the
[q heads | k heads | v heads] of our attn.qkv; gate_up_proj is the gate's rows, then up's (`gate, up =
gate_up.chunk(2)`, then `up * silu(gate)`), the [gate | up] of our mlp.gate_up. So each maps as it is, and the
rest has Llama's names. No layer has a bias.

The "longrope" RoPE scaling of Phi-3-mini-128k, Phi-3.5-mini and Phi-4-mini is read (and written back) with the
config.json; as in transformers, each forward pass takes its long_factor on a sequence longer than
original_max_position_embeddings (4096), its short_factor otherwise (see config_from_hf_phi3). Phi-4-mini's
partial_rotary_factor (0.75: RoPE on 96 of each head's 128 dims) is read and written back as GPTConfig.rope_dim;
its weights are laid out as any Phi-3's.
"""

from __future__ import annotations

import torch

from .config import GPTConfig
from .gpt import GPT
from .hf_common import load_model_file
from .hf_llama import (
    check_llama_shaped,
    layer_mapping,
    load_mapped_weights,
    mapped_weights_out,
)
from .hf_llama_config import config_from_hf_phi3, hf_phi3_config

# our name (per block: "blocks.{i}.") -> HF's (under "model.layers.{i}."); the fused ones in our row order
_PHI3_BLOCK_NAMES = {
    "norm1.weight": ("input_layernorm.weight",),
    "attn.qkv.weight": ("self_attn.qkv_proj.weight",),
    "attn.proj.weight": ("self_attn.o_proj.weight",),
    "norm2.weight": ("post_attention_layernorm.weight",),
    "mlp.gate_up.weight": ("mlp.gate_up_proj.weight",),
    "mlp.proj.weight": ("mlp.down_proj.weight",),
}


def from_hf_phi3(state_dict: dict[str, torch.Tensor], hf_config: dict, **overrides) -> GPT:
    """A GPT holding the weights of a HF Phi3ForCausalLM (or Phi3Model) state dict, shaped by hf_config (the
    model's config.json, as a dict); overrides replace GPTConfig fields (backend, block_size, ...). A longrope
    model computes transformers' logits whatever its block_size (see config_from_hf_phi3)."""
    config = config_from_hf_phi3(hf_config, **overrides)
    model = GPT(config)
    load_hf_phi3(model, state_dict)
    return model


def load_hf_phi3_file(path: str, **overrides) -> GPT:
    """from_hf_phi3 of a Hugging Face model.safetensors file (or any shard of a sharded checkpoint) and the
    config.json beside it."""
    return load_model_file(path, "Phi-3", config_from_hf_phi3, load_hf_phi3, **overrides)


def _check_phi3_shaped(config: GPTConfig) -> None:
    check_llama_shaped(config)
    # Phi-3's weights have neither: the model's q/k/v biases or q_norm and k_norm would be left as they are
    if config.qkv_bias or config.qk_norm:
        raise ValueError(f"Phi-3 weights need a model without qkv_bias and qk_norm; this one has "
                         f"qkv_bias={config.qkv_bias}, qk_norm={config.qk_norm}")


@torch.no_grad()
def load_hf_phi3(model: GPT, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a HF Phi-3 state dict into `model` (a Llama-shaped GPT of its sizes, without q/k/v biases or
    QK-norm); every weight must be there, and nothing else."""
    _check_phi3_shaped(model.config)
    load_mapped_weights(model, state_dict, layer_mapping(model.config, _PHI3_BLOCK_NAMES), "Phi-3")


@torch.no_grad()
def to_hf_phi3(model: GPT) -> tuple[dict[str, torch.Tensor], dict]:
    """(the HF Phi3ForCausalLM state dict, its config.json as a dict, model_type "phi3") of a Llama-shaped GPT
    without q/k/v biases, QK-norm or Llama 3.1's RoPE scaling (longrope is written as hf_phi3_config says): the
    vocabulary padding dropped; a tied lm_head.weight is the embed_tokens tensor itself, as to_hf_llama's."""
    _check_phi3_shaped(model.config)
    hf_config = hf_phi3_config(model.config, model.wte.weight.dtype)  # first: Llama 3.1's RoPE scaling is refused
    return mapped_weights_out(model, layer_mapping(model.config, _PHI3_BLOCK_NAMES)), hf_config
