"""Hugging Face GPT-2 weights in and out, by name mapping (no download, no transformers import).

HF's GPT-2 stores its linear layers as Conv1D, weight (in, out), where ours are nn.Linear,
weight (out, in): those are transposed. Its fused c_attn makes [q | k | v] with the heads
contiguous in each, which is the row order of our qkv layer, so it maps as is. The token
table gets zero rows up to our padded vocabulary (they are cut from the logits anyway).

The tensors tell every size but the head count: that comes from the model's config.json (n_head), which
a model.safetensors file is read with, or from the caller, and is never guessed.
"""

from __future__ import annotations

import re

import torch

from .config import GPTConfig
from .gpt import GPT
from .hf_common import (
    check_model_file,
    copy_into,
    first_names,
    read_hf_config,
    read_safetensors,
)

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


def config_from_hf_gpt2(state_dict: dict[str, torch.Tensor], n_head: int | None = None,
                        hf_config: dict | None = None, **overrides) -> GPTConfig:
    """The GPTConfig of a HF GPT-2 state dict: sizes read from the tensors. The head count, which the
    shapes do not tell, is n_head or hf_config's (hf_config: the model's config.json, as a dict), never a
    guess; hf_config's other settings are checked against the tensors and against what the model can do."""
    values = _sizes(state_dict)
    if hf_config is not None:
        values["norm_eps"] = _check_hf_config(hf_config, values)
    values["n_head"] = _head_count(n_head, hf_config, values["n_embd"])
    return GPTConfig.from_dict({**values, **overrides})


def _sizes(state_dict: dict[str, torch.Tensor]) -> dict:
    """The GPTConfig values a HF GPT-2 state dict tells (all but n_head); an error when it is not one."""
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
    # The MLP's width (config.json's n_inner; None there means 4 * n_embd) is c_fc's output size.
    fc = sd.get("h.0.mlp.c_fc.weight")
    hidden = int(fc.shape[1]) if fc is not None and fc.dim() == 2 else 4 * n_embd
    return dict(
        vocab_size=vocab_size, block_size=sd["wpe.weight"].shape[0], n_layer=n_layer, n_embd=n_embd,
        norm="layernorm", pos="learned", mlp="gelu", tie_embeddings=True, bias=True, norm_eps=1e-5,
        mlp_hidden=None if hidden == 4 * n_embd else hidden,
    )


# HF's names (transformers' ACT2FN) of the tanh-approximated GELU: GPT-2's, and the one our MLP computes
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# config.json's size fields (with the aliases GPT2Config accepts) -> our names, which the tensors fix
_HF_SIZES = {("n_embd", "hidden_size"): "n_embd", ("n_layer", "num_hidden_layers"): "n_layer",
             ("vocab_size",): "vocab_size", ("n_positions", "max_position_embeddings"): "block_size"}


def _hf_value(hf_config: dict, names: tuple[str, ...], default=None):
    """config.json's value under the first of names it has (GPT2Config's own name first, then its alias)."""
    return next((hf_config[n] for n in names if n in hf_config), default)


def _check_hf_config(hf_config: dict, values: dict) -> float:
    """Refuse a config.json the weights contradict or the model would misread; return its layer_norm_epsilon."""
    if not isinstance(hf_config, dict):
        raise TypeError(f"hf_config must be a dict (a config.json), got {type(hf_config).__name__}")
    model_type = hf_config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"config.json has model_type={model_type!r}: only GPT-2 ('gpt2') weights can be imported "
                         f"here (Llama-family ones: from_hf_llama, load_hf_llama_file)")
    for names, ours in _HF_SIZES.items():
        said = _hf_value(hf_config, names)
        if said is not None and said != values[ours]:
            raise ValueError(f"config.json has {names[0]}={said!r} but the weights have {values[ours]}: "
                             f"the config is another model's")
    n_inner = hf_config.get("n_inner")
    hidden = values["mlp_hidden"] or 4 * values["n_embd"]
    if n_inner is not None and n_inner != hidden:
        raise ValueError(f"config.json has n_inner={n_inner!r} but the weights have an MLP of {hidden}: "
                         f"the config is another model's")
    # GPT2Config's defaults where the config leaves a field out. Each of these changes the model's outputs;
    # ours computes only GPT-2's own choice, so another one would give other logits, silently.
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in _TANH_GELUS:
        raise ValueError(f"config.json has activation_function={activation!r}; the model computes GPT-2's "
                         f"tanh-approximated GELU ({', '.join(_TANH_GELUS)})")
    for name, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if hf_config.get(name, wanted) != wanted:
            raise ValueError(f"config.json has {name}={hf_config[name]!r}; the model computes only {name}={wanted}")
    eps = hf_config.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"config.json's layer_norm_epsilon must be a number > 0, got {eps!r}")
    return float(eps)


def _head_count(n_head: int | None, hf_config: dict | None, n_embd: int) -> int:
    """n_head, else config.json's. A guess (GPT-2's 64-wide heads) was 0 heads below n_embd=64, and below or
    off multiples of 64 a wrong count, which loads fine and gives wrong logits."""
    said = None if hf_config is None else _hf_value(hf_config, ("n_head", "num_attention_heads"))
    if n_head is None and said is None:
        if hf_config is None:
            raise ValueError("n_head is unknown: the weights of GPT-2 do not tell its head count; give n_head, or "
                             "hf_config (the model's config.json, which has it)")
        raise ValueError("config.json has no 'n_head' (nor 'num_attention_heads'), and the weights of GPT-2 do not "
                         "tell the head count; give n_head")
    if n_head is not None and said is not None and n_head != said:
        raise ValueError(f"n_head={n_head!r} but config.json has n_head={said!r}")
    heads, name = (n_head, "n_head") if n_head is not None else (said, "config.json's n_head")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or n_embd % heads != 0:
        raise ValueError(f"{name} must be a positive int that divides n_embd={n_embd}, got {heads!r}")
    return heads


def from_hf_gpt2(state_dict: dict[str, torch.Tensor], n_head: int | None = None, hf_config: dict | None = None,
                 **overrides) -> GPT:
    """A GPT holding the weights of a HF GPT-2 (GPT2Model or GPT2LMHeadModel) state dict; its head count is
    n_head or hf_config's (the model's config.json, as a dict)."""
    config = config_from_hf_gpt2(state_dict, n_head, hf_config, **overrides)
    model = GPT(config)
    load_hf_gpt2(model, state_dict)
    return model


def load_hf_gpt2_file(path: str, n_head: int | None = None, **overrides) -> GPT:
    """from_hf_gpt2 of a Hugging Face model.safetensors file, with the config.json beside it (as
    save_pretrained and the Hub lay them out), which tells the head count unless n_head does. path may
    also be any shard of a sharded checkpoint (model-00001-of-00002.safetensors, ...): all the shards that
    the model.safetensors.index.json beside it lists are read."""
    check_model_file(path)
    state_dict = read_safetensors(path)
    hf_config = read_hf_config(path)
    if hf_config is None and n_head is None:
        _sizes(state_dict)  # not GPT-2 weights at all: that is the error to report
        raise ValueError(f"n_head is unknown: {path!r} has no config.json beside it, and the weights of GPT-2 do "
                         f"not tell the head count; put the model's config.json there")
    return from_hf_gpt2(state_dict, n_head, hf_config, **overrides)



@torch.no_grad()
def load_hf_gpt2(model: GPT, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a HF GPT-2 state dict into `model` (a GPT-2-shaped GPT); every weight must be there."""
    _check_gpt2_shaped(model.config)
    sd = _strip_prefix(state_dict)
    expected = set(_hf_names(model.config.n_layer))
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"not a GPT-2 state dict of {model.config.n_layer} layers: missing {first_names(missing)}, "
                         f"unexpected {first_names(unexpected)}")
    # GPT-2 ties its output layer to wte, and so does the model made here: an lm_head of its own (a model
    # saved with tie_word_embeddings=False) would be dropped and the logits silently wrong.
    head = state_dict.get("lm_head.weight")
    if head is not None and not (head.shape == sd["wte.weight"].shape and torch.equal(head, sd["wte.weight"])):
        raise ValueError("lm_head.weight differs from wte.weight: an untied output layer, which GPT-2 (tied "
                         "embeddings) cannot hold")
    for ours, (theirs, transposed) in _mapping(model.config.n_layer).items():
        src = sd[theirs].t() if transposed else sd[theirs]
        copy_into(model.get_parameter(ours), src, ours, theirs)
    table = model.wte.weight
    vocab = model.config.vocab_size
    copy_into(table[:vocab], sd["wte.weight"], "wte.weight", "wte.weight")
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


def hf_gpt2_config(config: GPTConfig) -> dict:
    """The HF config.json (a dict) of a GPT-2-shaped GPT: what to_hf_gpt2's weights need beside them, the
    head count above all, which the weights do not tell."""
    _check_gpt2_shaped(config)
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_inner": config.hidden_size, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": True}



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
        llama = any(name.endswith("embed_tokens.weight") for name in out)
        raise ValueError("not a GPT-2 state dict: no wte.weight / wpe.weight (with or without 'transformer.')" + (
            "; these are a Llama-family model's weights: they load with its config.json beside them (from_hf_llama)"
            if llama else ""))
    return out


def _check_gpt2_shaped(config: GPTConfig) -> None:
    # GPT-2's config.json has no key for a sliding window, QK-norm, heads of another width nor Gemma's features
    # (post norms, an embedding or attention scale, soft caps) nor experts: dropped silently, they would give
    # another model
    wanted = dict(norm="layernorm", pos="learned", mlp="gelu", tie_embeddings=True, bias=True, qkv_bias=True,
                  qk_norm=False, sliding_window=None, head_dim=config.n_embd // config.n_head, layer_types=None,
                  post_norms=False, embed_scale=None, attn_scale=None, attn_softcap=None,
                  logit_softcap=None, n_experts=None)
    wrong = {k: getattr(config, k) for k, v in wanted.items() if getattr(config, k) != v}
    if wrong or config.n_kv_head != config.n_head:
        raise ValueError(f"GPT-2 weights need a GPT-2-shaped model ({wanted}, n_kv_head == n_head); this one has {wrong}")


