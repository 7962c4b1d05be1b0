"""Hugging Face Llama-family weights (Llama, Mistral, Qwen2, Qwen3) in and out, by name mapping (no download, no
transformers import). Their config.json is read and written by hf_llama_config.

HF's q_proj, k_proj, v_proj stacked by rows are our qkv ([q heads | k heads | v heads], each head's rows
contiguous), gate_proj and up_proj are our gate_up ([gate | up]); nn.Linear on both sides, so nothing is
transposed. HF's Llama checkpoints are already in the rotate-half RoPE layout that ours computes (its
conversion script permuted Meta's interleaved q/k rows), so q and k map as they are. Qwen2's three q/k/v biases
stack as the weights do into our qkv.bias; Qwen3's q_norm and k_norm (one (head_dim,) scale each) are our
attention's q_norm and k_norm.

Mixtral and Qwen3-MoE are that model with a mixture of experts in (some) layers' MLP (llmkern.nn.MoEMLP): the
router is HF's gate (E, C); each expert's gate and up weights (Mixtral's w1 and w3, Qwen3-MoE's gate_proj and
up_proj, (H, C) each) stack, expert after expert, into our gate_up (E, 2H, C), and their down weights (w2,
down_proj: (C, H)) into our proj (E, C, H). Newer transformers keep them stacked so, as mlp.experts.gate_up_proj and
mlp.experts.down_proj beside the router's mlp.gate: a state dict of those names loads as well. Export writes the
per-expert names, which every transformers version reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from .config import GPTConfig
from .gpt import GPT
from .hf_common import check_shape, copy_into, first_names, load_model_file
from .hf_llama_config import config_from_hf_llama, gemma_features, hf_llama_config

# our name (per block: "blocks.{i}.") -> HF's names (under "model.layers.{i}."), stacked by rows in this order
_LLAMA_BLOCK_NAMES = {
    "norm1.weight": ("input_layernorm.weight",),
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.proj.weight": ("self_attn.o_proj.weight",),
    "norm2.weight": ("post_attention_layernorm.weight",),
    "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.proj.weight": ("mlp.down_proj.weight",),
}
# Qwen2's q/k/v biases (GPTConfig.qkv_bias), stacked as the weights are
_QKV_BIAS_NAMES = {"attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")}
# Qwen3's QK-norm scales (GPTConfig.qk_norm)
_QK_NORM_NAMES = {
    "attn.q_norm.weight": ("self_attn.q_norm.weight",),
    "attn.k_norm.weight": ("self_attn.k_norm.weight",),
}
# A MoE layer's MLP, by the state dict's layout: Mixtral's per-expert names, Qwen3-MoE's, or newer transformers'
# stacked ones (both models'). Our gate_up and proj are (E, ...) stacks, filled from HF's parts by rows.
_MOE_PER_EXPERT = {  # layout -> (prefix, gate, up, down)
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}
_MOE_STACKED_NAMES = {
    "mlp.router.weight": ("mlp.gate.weight",),
    "mlp.gate_up": ("mlp.experts.gate_up_proj",),
    "mlp.proj": ("mlp.experts.down_proj",),
}
# The RoPE frequencies some (older) checkpoints store: a buffer, recomputed from rope_theta
_LLAMA_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# A per-tensor change of values between HF's checkpoint and our model: (our name, tensor) -> tensor
Convert = Callable[[str, torch.Tensor], torch.Tensor]


def from_hf_llama(state_dict: dict[str, torch.Tensor], hf_config: dict, **overrides) -> GPT:
    """A GPT holding the weights of a HF Llama-family (LlamaForCausalLM or LlamaModel, MistralForCausalLM,
    Qwen2ForCausalLM, Qwen3ForCausalLM) state dict, shaped by hf_config (the model's config.json, as a dict)."""
    config = config_from_hf_llama(hf_config, **overrides)
    model = GPT(config)
    load_hf_llama(model, state_dict)
    return model


def load_hf_llama_file(path: str, **overrides) -> GPT:
    """from_hf_llama of a Hugging Face model.safetensors file (or any shard of a sharded checkpoint, as
    load_hf_gpt2_file) and the config.json beside it."""
    return load_model_file(path, "Llama", config_from_hf_llama, load_hf_llama, **overrides)


def _llama_mapping(config: GPTConfig, moe_layout: str | None = None) -> dict[str, tuple[str, ...]]:
    """layer_mapping of a Llama-family model; its MoE layers' MLP under moe_layout's names (None: the per-expert
    names of the model's type, Qwen3-MoE's with qk_norm, else Mixtral's)."""
    block_names = {**_LLAMA_BLOCK_NAMES, **(_QKV_BIAS_NAMES if config.qkv_bias else {}),
                   **(_QK_NORM_NAMES if config.qk_norm else {})}
    if config.n_experts is None:
        return layer_mapping(config, block_names)
    moe_layout = moe_layout or ("qwen3_moe" if config.qk_norm else "mixtral")
    return layer_mapping(config, block_names, _moe_block_names(config.n_experts, moe_layout))


def _moe_block_names(n_experts: int, layout: str) -> dict[str, tuple[str, ...]]:
    """A MoE layer's MLP names: ours -> HF's in `layout` ("stacked", or a key of _MOE_PER_EXPERT), each expert's
    [gate, up] rows in turn for our gate_up, its down rows for our proj."""
    if layout == "stacked":
        return dict(_MOE_STACKED_NAMES)
    prefix, gate, up, down = _MOE_PER_EXPERT[layout]
    experts = range(n_experts)
    return {
        "mlp.router.weight": (f"{prefix}.gate.weight",),
        "mlp.gate_up": tuple(f"{prefix}.experts.{j}.{name}.weight" for j in experts for name in (gate, up)),
        "mlp.proj": tuple(f"{prefix}.experts.{j}.{down}.weight" for j in experts),
    }


def _moe_layout(config: GPTConfig, state_dict: dict[str, torch.Tensor]) -> str | None:
    """The layout of a MoE model's state dict: "stacked" when it has newer transformers' stacked experts, else
    None (the per-expert names of the model's type)."""
    if config.n_experts is not None and any(name.endswith("mlp.experts.gate_up_proj") for name in state_dict):
        return "stacked"
    return None


def layer_mapping(config: GPTConfig, block_names: dict[str, tuple[str, ...]],
                  moe_names: dict[str, tuple[str, ...]] | None = None) -> dict[str, tuple[str, ...]]:
    """Our names -> HF's (without "model."), for every layer of `config`: block_names per block, and the final
    norm. The embedding and the LM head are not in it (they are copied with the vocabulary padding). moe_names,
    when given, replace block_names' MLP ("mlp." ones) in the MoE layers (config.is_moe_layer)."""
    mapping = {"norm_f.weight": ("norm.weight",)}
    for i in range(config.n_layer):
        names = block_names
        if moe_names is not None and config.is_moe_layer(i):
            names = {**{k: v for k, v in block_names.items() if not k.startswith("mlp.")}, **moe_names}
        for ours, theirs in names.items():
            mapping[f"blocks.{i}.{ours}"] = tuple(f"layers.{i}.{name}" for name in theirs)
    return mapping


def check_llama_shaped(config: GPTConfig, experts: bool = False) -> None:
    # qkv_bias and qk_norm either way: without, Llama's (and Mistral's) model; with qkv_bias, Qwen2's; with
    # qk_norm, Qwen3's (head_dim any). experts: MoE MLPs allowed (Mixtral's, Qwen3-MoE's), else a dense MLP only.
    wanted = {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False}
    if not experts:
        wanted["n_experts"] = None
    wrong = {k: getattr(config, k) for k, v in wanted.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError(f"Llama weights need a Llama-shaped model ({wanted}); this one has {wrong}")
    # Gemma 2's and 3's parts (sandwich norms, scales, soft caps, a local RoPE base) are no Llama weight: loaded, they would stay as
    # they are. layer_types is not among them: which layers slide is Qwen's too, and holds no weight.
    gemma = gemma_features(config, layer_types=False)
    if gemma:
        raise ValueError(f"Llama weights need a Llama-shaped model; this one has Gemma's {gemma}")


@torch.no_grad()
def load_hf_llama(model: GPT, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a HF Llama-family state dict into `model` (a Llama-shaped GPT of its sizes); every weight must
    be there, and nothing else (a bias, say, which the model would drop; Qwen2's q/k/v biases go into a model
    with config.qkv_bias, and must be there, as Qwen3's q_norm and k_norm into one with config.qk_norm). A MoE
    model's experts are read under Qwen3-MoE's names with config.qk_norm, else Mixtral's, or newer transformers'
    stacked ones whichever the model."""
    check_llama_shaped(model.config, experts=True)
    if model.config.n_experts is not None and model.config.qkv_bias:
        raise ValueError("a mixture-of-experts model with qkv_bias has no Hugging Face weights here (Mixtral and "
                         "Qwen3-MoE have no q/k/v biases)")
    mapping = _llama_mapping(model.config, _moe_layout(model.config, state_dict))
    load_mapped_weights(model, state_dict, mapping, "Llama")


@torch.no_grad()
def load_mapped_weights(model: GPT, state_dict: dict[str, torch.Tensor], mapping: dict[str, tuple[str, ...]],
                        family: str, convert: Convert | None = None) -> None:
    """Copy a HF state dict of Llama's model (`family`'s names: `mapping`, of layer_mapping) into `model`; every
    weight must be there, and nothing else. Several HF names for one of ours are stacked by rows. convert(ours,
    tensor), when given, turns each mapped tensor (stacked, if it is) into our parameter's values (Gemma's norms:
    1 + w); the embedding and the LM head are copied as they are."""
    convert = convert or _unchanged
    config = model.config
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    # LlamaForCausalLM's names are "model."-prefixed, LlamaModel's (no lm_head) are not
    sd = {name.removeprefix("model."): t for name, t in state_dict.items()
          if name != "lm_head.weight" and not _LLAMA_IGNORED.search(name)}
    expected = {name for names in mapping.values() for name in names} | {"embed_tokens.weight"}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"not a {family} state dict of {config.n_layer} layers: missing {first_names(missing)}, "
                         f"unexpected {first_names(unexpected)}")
    embed = sd["embed_tokens.weight"]
    if tuple(embed.shape) != (config.vocab_size, config.n_embd):
        raise ValueError(f"embed_tokens.weight has shape {tuple(embed.shape)}; config.json's vocab_size and "
                         f"hidden_size make ({config.vocab_size}, {config.n_embd}): the config is another model's")
    head = state_dict.get("lm_head.weight")
    if config.tie_embeddings:
        # tied: save_pretrained stores the table once; a head of its own would be dropped, the logits wrong
        if head is not None and not (head.shape == embed.shape and torch.equal(head, embed)):
            raise ValueError("lm_head.weight differs from embed_tokens.weight, but config.json has "
                             "tie_word_embeddings=true: the model would drop it")
    elif head is None:
        raise ValueError("no lm_head.weight, and config.json has tie_word_embeddings=false: the output layer "
                         "is missing (a LlamaModel's weights, without the LM head?)")
    for ours, theirs in mapping.items():
        if len(theirs) == 1:
            copy_into(model.get_parameter(ours), convert(ours, sd[theirs[0]]), ours, theirs[0])
            continue
        # Stacked parts are checked one by one: k_proj and v_proj of n_head rows stack to a qkv of the right
        # size when num_key_value_heads is n_head / 2, and would load, split at the wrong rows. The experts'
        # rows, stacked, are shaped into our (E, ...) parameter.
        param = model.get_parameter(ours)
        parts = [check_shape(sd[name], shape, name) for name, shape in zip(theirs, _part_shapes(config, ours))]
        copy_into(param, convert(ours, torch.cat(parts).reshape(param.shape)), ours, "+".join(theirs))
    vocab = config.vocab_size
    model.wte.weight[:vocab] = embed
    model.lm_head.weight[:vocab] = embed if head is None else check_shape(head, embed.shape, "lm_head.weight")
    model.wte.weight[vocab:] = 0
    model.lm_head.weight[vocab:] = 0


def _unchanged(ours: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _part_shapes(config: GPTConfig, ours: str) -> list[tuple[int, ...]]:
    """The shapes of HF's tensors that make our stacked qkv ([q | k | v], weight or bias) or gate_up
    ([gate | up]); a MoE layer's gate_up ([gate | up] of each expert in turn) or proj (each expert's down)."""
    d, c = config.head_dim, config.n_embd
    if ours.endswith("mlp.gate_up"):
        return [(config.expert_hidden_size, c)] * (2 * config.n_experts)
    if ours.endswith("mlp.proj"):
        return [(c, config.expert_hidden_size)] * config.n_experts
    rows = [config.n_head * d, config.n_kv_head * d, config.n_kv_head * d]
    if ours.endswith("qkv.weight"):
        return [(r, c) for r in rows]
    if ours.endswith("qkv.bias"):
        return [(r,) for r in rows]
    return [(config.hidden_size, c)] * 2


@torch.no_grad()
def to_hf_llama(model: GPT) -> tuple[dict[str, torch.Tensor], dict]:
    """(the HF LlamaForCausalLM state dict, its config.json as a dict) of a Llama-shaped GPT: the
    vocabulary padding dropped; a tied lm_head.weight is the embed_tokens tensor itself (as HF's
    state_dict() has it; safetensors' save_file wants it left out). A model with config.qkv_bias is
    Qwen2's: a Qwen2ForCausalLM state dict (with the q/k/v biases) and config.json (model_type "qwen2"); one
    with config.qk_norm Qwen3's (with q_norm and k_norm; model_type "qwen3"); one with config.sliding_window
    Mistral's (Llama's weights, model_type "mistral" with the window). A model with experts (config.n_experts) is
    Qwen3-MoE's with config.qk_norm (Qwen3MoeForCausalLM), else Mixtral's (MixtralForCausalLM), its experts under
    their per-expert names."""
    check_llama_shaped(model.config, experts=True)
    hf_config = hf_llama_config(model.config, model.wte.weight.dtype)  # first: a model no HF type has is refused
    return mapped_weights_out(model, _llama_mapping(model.config)), hf_config


@torch.no_grad()
def mapped_weights_out(model: GPT, mapping: dict[str, tuple[str, ...]],
                       convert: Convert | None = None) -> dict[str, torch.Tensor]:
    """The HF state dict (a ForCausalLM's names) of `model` under `mapping` (of layer_mapping): a stacked
    parameter split by rows into its HF parts; the vocabulary padding dropped, a tied lm_head.weight the
    embed_tokens tensor itself. convert(ours, tensor), when given, turns each mapped parameter into HF's values
    (load_mapped_weights' convert undone)."""
    config = model.config
    convert = convert or _unchanged
    out = {"model.embed_tokens.weight": model.wte.weight.detach()[: config.vocab_size].clone()}
    for ours, theirs in mapping.items():
        p = convert(ours, model.get_parameter(ours).detach())
        if len(theirs) == 1:
            parts = [p]
        else:  # an (E, ...) stack of experts split as the rows it was stacked from
            rows = p.reshape(-1, p.shape[-1]) if p.dim() > 2 else p
            parts = rows.split([shape[0] for shape in _part_shapes(config, ours)])
        for name, part in zip(theirs, parts):
            out["model." + name] = part.contiguous().clone()
    out["lm_head.weight"] = (out["model.embed_tokens.weight"] if config.tie_embeddings
                             else model.lm_head.weight.detach()[: config.vocab_size].clone())
    return out
