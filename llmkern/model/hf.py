"""Hugging Face GPT-2 and Llama-family weights in and out, by name mapping (no download, no transformers import).

HF's GPT-2 stores its linear layers as Conv1D, weight (in, out), where ours are nn.Linear,
weight (out, in): those are transposed. Its fused c_attn makes [q | k | v] with the heads
contiguous in each, which is the row order of our qkv layer, so it maps as is. The token
table gets zero rows up to our padded vocabulary (they are cut from the logits anyway).

The tensors tell every size but the head count: that comes from the model's config.json (n_head), which
a model.safetensors file is read with, or from the caller, and is never guessed.

Llama (and Mistral without a sliding window: the same model) is our rmsnorm/rope/swiglu model with no
biases. HF's q_proj, k_proj, v_proj stacked by rows are our qkv ([q heads | k heads | v heads], each head's
rows contiguous), gate_proj and up_proj are our gate_up ([gate | up]); nn.Linear on both sides, so nothing is
transposed. HF's Llama checkpoints are already in the rotate-half RoPE layout that ours computes (its
conversion script permuted Meta's interleaved q/k rows), so q and k map as they are. Its config.json is
needed (head counts, eps, RoPE theta and Llama 3.1's RoPE scaling), and whatever in it would make our model
compute other logits (another RoPE scaling, biases, another activation or head size) is refused, not ignored.

Qwen2 (and Qwen2.5: the same model_type "qwen2") is that model with biases on q_proj, k_proj and v_proj and on
no other layer: GPTConfig.qkv_bias, its three biases stacked as the weights are into our qkv.bias.
"""

from __future__ import annotations

import json
import os
import re

import torch

from ..nn.rotary import LLAMA3_SCALING_KEYS, check_rope_scaling
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
    _check_model_file(path)
    state_dict = _read_safetensors(path)
    hf_config = read_hf_config(path)
    if hf_config is None and n_head is None:
        _sizes(state_dict)  # not GPT-2 weights at all: that is the error to report
        raise ValueError(f"n_head is unknown: {path!r} has no config.json beside it, and the weights of GPT-2 do "
                         f"not tell the head count; put the model's config.json there")
    return from_hf_gpt2(state_dict, n_head, hf_config, **overrides)


def _check_model_file(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder; give the model.safetensors file in it (or one of its shards)")
    if not os.path.isfile(path):
        index_path = os.path.join(os.path.dirname(os.path.abspath(path)), "model.safetensors.index.json")
        sharded = "; the checkpoint there is sharded: give one of the files its index lists" if os.path.isfile(
            index_path) else ""
        raise FileNotFoundError(f"{path!r} does not exist{sharded}")


def read_hf_config(path: str) -> dict | None:
    """The config.json beside the weights file `path`, as a dict; None when there is none."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path!r} is not a readable JSON file: {err}") from err
    if not isinstance(hf_config, dict):
        raise ValueError(f"{config_path!r} must hold a JSON object, got {type(hf_config).__name__}")
    return hf_config


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of every shard when it is one of a sharded checkpoint's files
    (save_pretrained shards past max_shard_size: gpt2-xl in float32, say). One shard alone lacked some
    layers, and the error blamed the config.json ("another model's") or said it was not GPT-2's."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = os.path.dirname(os.path.abspath(path))
    index_path = os.path.join(folder, "model.safetensors.index.json")
    files, weight_map = [path], None
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_path!r} is not a readable index of shards (a JSON object with a "
                             f"'weight_map'): {err!r}") from err
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index_path!r}: 'weight_map' must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        if os.path.basename(path) in shards:
            files = [os.path.join(folder, shard) for shard in shards]
        else:  # a model.safetensors of its own beside the shards: read as it is
            weight_map = None
    state_dict = {}
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file!r}, a shard that {index_path!r} lists, does not exist")
        try:
            state_dict.update(load_file(file))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file!r} is not a readable safetensors file: {err}") from err
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(state_dict))
        if absent:
            raise ValueError(f"{index_path!r} lists tensors that its shards lack: {_some(absent)}")
    return state_dict


@torch.no_grad()
def load_hf_gpt2(model: GPT, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a HF GPT-2 state dict into `model` (a GPT-2-shaped GPT); every weight must be there."""
    _check_gpt2_shaped(model.config)
    sd = _strip_prefix(state_dict)
    expected = set(_hf_names(model.config.n_layer))
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"not a GPT-2 state dict of {model.config.n_layer} layers: missing {_some(missing)}, "
                         f"unexpected {_some(unexpected)}")
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


def hf_gpt2_config(config: GPTConfig) -> dict:
    """The HF config.json (a dict) of a GPT-2-shaped GPT: what to_hf_gpt2's weights need beside them, the
    head count above all, which the weights do not tell."""
    _check_gpt2_shaped(config)
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_inner": config.hidden_size, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": True}


def _some(names: list[str]) -> str:
    """The first few names, and how many more: a list cut short without a count read as the whole list."""
    return f"{names[:5]}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")


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
    wanted = dict(norm="layernorm", pos="learned", mlp="gelu", tie_embeddings=True, bias=True)
    wrong = {k: getattr(config, k) for k, v in wanted.items() if getattr(config, k) != v}
    if wrong or config.n_kv_head != config.n_head:
        raise ValueError(f"GPT-2 weights need a GPT-2-shaped model ({wanted}, n_kv_head == n_head); this one has {wrong}")


def _copy(dst: torch.Tensor, src: torch.Tensor, ours: str, theirs: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{theirs} has shape {tuple(src.shape)}; {ours} needs {tuple(dst.shape)}")
    dst.copy_(src)


# --- Llama family ---------------------------------------------------------------------------------

# config.json model_types that are Llama's model (Mistral: Llama with an optional sliding window; Qwen2: with
# biased q/k/v projections and an optional sliding window)
LLAMA_TYPES = ("llama", "mistral", "qwen2")
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
# The RoPE frequencies some (older) checkpoints store: a buffer, recomputed from rope_theta
_LLAMA_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _hf_int(hf_config: dict, name: str, default: int | None = None) -> int:
    """config.json's int `name`, >= 1; default when it is absent or null (None: it must be there)."""
    value = hf_config.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"config.json has no {name!r}")
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.json's {name} must be an int >= 1, got {value!r}")
    return value


def _hf_number(hf_config: dict, name: str, default: float) -> float:
    value = hf_config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"config.json's {name} must be a number > 0, got {value!r}")
    return float(value)


def _rope(hf_config: dict) -> tuple[float, dict | None]:
    """config.json's RoPE base and scaling: None, or Llama 3.1's "llama3" (GPTConfig.rope_scaling); an error
    for any other scaling (linear, dynamic, yarn, ...), which changes the frequencies in other ways."""
    # transformers 5 writes one "rope_parameters" dict ({"rope_type", "rope_theta", ...}); before it,
    # "rope_theta" and "rope_scaling" (None, or a dict with "rope_type", or "type" in older files)
    params = hf_config.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"config.json's rope_parameters must be a JSON object, got {params!r}")
        scaling, theta = params, _hf_number(params, "rope_theta", hf_config.get("rope_theta", 10000.0))
    else:
        scaling, theta = hf_config.get("rope_scaling"), _hf_number(hf_config, "rope_theta", 10000.0)
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
    if kind == "default":
        return theta, None
    if kind == "llama3":
        llama3 = {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3_SCALING_KEYS if k in scaling}}
        try:
            check_rope_scaling(llama3)
        except ValueError as err:
            raise ValueError(f"config.json's llama3 RoPE scaling {scaling!r}: {err}") from None
        return theta, llama3
    raise ValueError(f"config.json has RoPE scaling {scaling!r}; the model computes plain RoPE or Llama 3.1's "
                     f"'llama3' scaling only, so its positions would be rotated by other angles")


def config_from_hf_llama(hf_config: dict, **overrides) -> GPTConfig:
    """The GPTConfig of a HF Llama-family model from its config.json (a dict); an error for a setting the model
    cannot compute (it would load and give other logits). overrides replace GPTConfig fields (backend, ...)."""
    if not isinstance(hf_config, dict):
        raise TypeError(f"hf_config must be a dict (a config.json), got {type(hf_config).__name__}")
    model_type = hf_config.get("model_type", "llama")
    if model_type not in LLAMA_TYPES:
        raise ValueError(f"config.json has model_type={model_type!r}; Llama-family weights are of {LLAMA_TYPES}")
    n_embd, n_head = _hf_int(hf_config, "hidden_size"), _hf_int(hf_config, "num_attention_heads")
    n_kv_head = _hf_int(hf_config, "num_key_value_heads", n_head)  # None there (old configs): n_head
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and (n_embd % n_head != 0 or head_dim != n_embd // n_head):
        raise ValueError(f"config.json has head_dim={head_dim!r}; the model's heads are hidden_size / "
                         f"num_attention_heads = {n_embd} / {n_head} wide")
    # HF's ACT2FN: "silu" and "swish" are both SiLU, the gate of our SwiGLU
    activation = hf_config.get("hidden_act", "silu")
    if activation not in ("silu", "swish"):
        raise ValueError(f"config.json has hidden_act={activation!r}; the model's MLP is SwiGLU (silu)")
    for name in ("attention_bias", "mlp_bias"):
        if hf_config.get(name, False) is not False:
            raise ValueError(f"config.json has {name}={hf_config[name]!r}; the Llama model here has no biases")
    tie = hf_config.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ValueError(f"config.json's tie_word_embeddings must be true or false, got {tie!r}")
    theta, scaling = _rope(hf_config)
    values = dict(
        vocab_size=_hf_int(hf_config, "vocab_size"), block_size=_hf_int(hf_config, "max_position_embeddings"),
        n_layer=_hf_int(hf_config, "num_hidden_layers"), n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
        norm="rmsnorm", norm_eps=_hf_number(hf_config, "rms_norm_eps", 1e-6), pos="rope",
        rope_theta=theta, rope_scaling=scaling, mlp="swiglu", mlp_hidden=_hf_int(hf_config, "intermediate_size"),
        tie_embeddings=tie, bias=False, qkv_bias=model_type == "qwen2",  # Qwen2's q/k/v biases are not optional
    )
    config = GPTConfig.from_dict({**values, **overrides})
    # Mistral's sliding window masks keys more than `window` tokens back: no key is, in contexts no longer
    # than the window, so only a window shorter than the model's block_size changes what it computes.
    window = hf_config.get("sliding_window")
    if model_type == "qwen2":
        # Qwen2's configs name a window (32768, 131072, ...) that only use_sliding_window=true turns on (false
        # in the released models); then max_window_layers says which layers slide, but any that does would
        # compute other logits, so a window on is checked as Mistral's, whichever layers it is for.
        sliding = hf_config.get("use_sliding_window", False)
        if not isinstance(sliding, bool):
            raise ValueError(f"config.json's use_sliding_window must be true or false, got {sliding!r}")
        if not sliding:
            window = None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < config.block_size):
        raise ValueError(f"config.json has sliding_window={window!r}, shorter than block_size={config.block_size}: "
                         f"the model attends to the whole context (give block_size={window!r} or less to load it)")
    return config


def from_hf_llama(state_dict: dict[str, torch.Tensor], hf_config: dict, **overrides) -> GPT:
    """A GPT holding the weights of a HF Llama-family (LlamaForCausalLM or LlamaModel, MistralForCausalLM)
    state dict, shaped by hf_config (the model's config.json, as a dict)."""
    config = config_from_hf_llama(hf_config, **overrides)
    model = GPT(config)
    load_hf_llama(model, state_dict)
    return model


def load_hf_llama_file(path: str, **overrides) -> GPT:
    """from_hf_llama of a Hugging Face model.safetensors file (or any shard of a sharded checkpoint, as
    load_hf_gpt2_file) and the config.json beside it."""
    _check_model_file(path)
    hf_config = read_hf_config(path)
    if hf_config is None:
        raise ValueError(f"{path!r} has no config.json beside it; a Llama model's weights do not tell its head "
                         f"counts, RMSNorm eps or RoPE theta: put the model's config.json there")
    config_from_hf_llama(hf_config, **overrides)  # a config it cannot load: said before the (slow) read
    return from_hf_llama(_read_safetensors(path), hf_config, **overrides)


def load_hf_file(path: str, **overrides) -> tuple[GPT, str]:
    """(GPT, model_type) of a Hugging Face model.safetensors file (or shard): by the model_type of the
    config.json beside it, GPT-2's (also when there is no config.json: see load_hf_gpt2_file) or Llama's."""
    _check_model_file(path)
    hf_config = read_hf_config(path)
    model_type = "gpt2" if hf_config is None else hf_config.get("model_type", "gpt2")
    if model_type == "gpt2":
        return load_hf_gpt2_file(path, **overrides), model_type
    if model_type in LLAMA_TYPES:
        return load_hf_llama_file(path, **overrides), model_type
    raise ValueError(f"{path!r}: its config.json has model_type={model_type!r}; the models that can be imported "
                     f"are {('gpt2',) + LLAMA_TYPES}")


def _llama_mapping(config: GPTConfig) -> dict[str, tuple[str, ...]]:
    mapping = {"norm_f.weight": ("norm.weight",)}
    block_names = {**_LLAMA_BLOCK_NAMES, **_QKV_BIAS_NAMES} if config.qkv_bias else _LLAMA_BLOCK_NAMES
    for i in range(config.n_layer):
        for ours, theirs in block_names.items():
            mapping[f"blocks.{i}.{ours}"] = tuple(f"layers.{i}.{name}" for name in theirs)
    return mapping


def _check_llama_shaped(config: GPTConfig) -> None:
    # qkv_bias either way: without, Llama's (and Mistral's) model; with, Qwen2's
    wanted = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)
    wrong = {k: getattr(config, k) for k, v in wanted.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError(f"Llama weights need a Llama-shaped model ({wanted}); this one has {wrong}")


@torch.no_grad()
def load_hf_llama(model: GPT, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a HF Llama-family state dict into `model` (a Llama-shaped GPT of its sizes); every weight must
    be there, and nothing else (a bias, say, which the model would drop; Qwen2's q/k/v biases go into a model
    with config.qkv_bias, and must be there)."""
    config = model.config
    _check_llama_shaped(config)
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    # LlamaForCausalLM's names are "model."-prefixed, LlamaModel's (no lm_head) are not
    sd = {name.removeprefix("model."): t for name, t in state_dict.items()
          if name != "lm_head.weight" and not _LLAMA_IGNORED.search(name)}
    mapping = _llama_mapping(config)
    expected = {name for names in mapping.values() for name in names} | {"embed_tokens.weight"}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"not a Llama state dict of {config.n_layer} layers: missing {_some(missing)}, "
                         f"unexpected {_some(unexpected)}")
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
            _copy(model.get_parameter(ours), sd[theirs[0]], ours, theirs[0])
            continue
        # Stacked parts are checked one by one: k_proj and v_proj of n_head rows stack to a qkv of the right
        # size when num_key_value_heads is n_head / 2, and would load, split at the wrong rows.
        parts = [_checked(sd[name], shape, name) for name, shape in zip(theirs, _part_shapes(config, ours))]
        _copy(model.get_parameter(ours), torch.cat(parts), ours, "+".join(theirs))
    vocab = config.vocab_size
    model.wte.weight[:vocab] = embed
    model.lm_head.weight[:vocab] = embed if head is None else _checked(head, embed.shape, "lm_head.weight")
    model.wte.weight[vocab:] = 0
    model.lm_head.weight[vocab:] = 0


def _part_shapes(config: GPTConfig, ours: str) -> list[tuple[int, ...]]:
    """The shapes of HF's tensors that make our stacked qkv ([q | k | v], weight or bias) or gate_up
    ([gate | up])."""
    d, c = config.head_dim, config.n_embd
    rows = [config.n_head * d, config.n_kv_head * d, config.n_kv_head * d]
    if ours.endswith("qkv.weight"):
        return [(r, c) for r in rows]
    if ours.endswith("qkv.bias"):
        return [(r,) for r in rows]
    return [(config.hidden_size, c)] * 2


def _checked(src: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if src.shape != shape:
        raise ValueError(f"{name} has shape {tuple(src.shape)}; the model needs {tuple(shape)}")
    return src


@torch.no_grad()
def to_hf_llama(model: GPT) -> tuple[dict[str, torch.Tensor], dict]:
    """(the HF LlamaForCausalLM state dict, its config.json as a dict) of a Llama-shaped GPT: the
    vocabulary padding dropped; a tied lm_head.weight is the embed_tokens tensor itself (as HF's
    state_dict() has it; safetensors' save_file wants it left out). A model with config.qkv_bias is
    Qwen2's: a Qwen2ForCausalLM state dict (with the q/k/v biases) and config.json (model_type "qwen2")."""
    config = model.config
    _check_llama_shaped(config)
    out = {"model.embed_tokens.weight": model.wte.weight.detach()[: config.vocab_size].clone()}
    for ours, theirs in _llama_mapping(config).items():
        p = model.get_parameter(ours).detach()
        if len(theirs) == 1:
            parts = [p]
        else:
            parts = p.split([shape[0] for shape in _part_shapes(config, ours)])
        for name, part in zip(theirs, parts):
            out["model." + name] = part.contiguous().clone()
    out["lm_head.weight"] = (out["model.embed_tokens.weight"] if config.tie_embeddings
                             else model.lm_head.weight.detach()[: config.vocab_size].clone())
    hf_config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd, "intermediate_size": config.hidden_size,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": str(model.wte.weight.dtype).removeprefix("torch."),
    }
    if config.qkv_bias:
        # Qwen2's config has no attention_bias / mlp_bias (its q/k/v biases are always there, the others never)
        del hf_config["attention_bias"], hf_config["mlp_bias"]
        hf_config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
                         sliding_window=None, max_window_layers=config.n_layer)
    return out, hf_config
