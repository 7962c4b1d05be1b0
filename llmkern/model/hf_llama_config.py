"""The config.json of a Hugging Face Llama-family model, read into a GPTConfig and written from one.

Llama (and Mistral: the same model) is our rmsnorm/rope/swiglu model with no biases. Its config.json is needed
(head counts, eps, RoPE theta and Llama 3.1's RoPE scaling), and whatever in it would make our model compute other
logits (another RoPE scaling, biases, another activation) is refused, not ignored. Mistral's sliding window (7B
v0.1's 4096 of 32768 positions) is GPTConfig.sliding_window, and the model loads with its whole context. Qwen's
window (on with use_sliding_window) slides on the layers layer_types names, or else on those from max_window_layers
on, as transformers' Qwen2Config and Qwen3Config work them out: GPTConfig.layer_types, and the model loads with its
whole context too. A Mistral or Qwen config.json without a sliding_window key has its config class's 4096 (null is
no window), as it has the class's num_key_value_heads without that key. A sliding_window in a Llama config.json,
which transformers' Llama does not read, makes the context that long, with a warning, unless block_size is given:
within it the window masks nothing, so the model computes Hugging Face's logits whichever way it is read. A
partial_rotary_factor other than 1 is refused for these types (RoPE on part of each head is Phi-3's, below).

Qwen2 (and Qwen2.5: the same model_type "qwen2") is that model with biases on q_proj, k_proj and v_proj and on
no other layer (GPTConfig.qkv_bias). Qwen3 ("qwen3") has no biases but Qwen3's QK-norm (GPTConfig.qk_norm), and
heads of config.json's head_dim, which need not be hidden_size / num_attention_heads (GPTConfig.head_dim; 128
where a Qwen3 config.json leaves it out, as transformers' Qwen3Config has it). Any of these types may name a
head_dim, as transformers reads it for each (Mistral NeMo's 128 beside 5120 / 32).

Phi-3 ("phi3": Phi-3-mini, Phi-3.5-mini, Phi-4-mini) is Llama's model too, its q/k/v and gate/up weights fused
(hf_phi3), with plain RoPE or the "longrope" scaling of Phi-3-mini-128k, Phi-3.5-mini and Phi-4-mini (see
config_from_hf_phi3 for how its short and long factors are chosen), on all of each head or on the part
partial_rotary_factor says (GPTConfig.rope_dim). So Phi-4-mini imports: RoPE on 96 of each head's 128 dims
(partial_rotary_factor 0.75) with longrope factors of 48 frequencies, tied embeddings, a vocabulary of 200064,
24 query heads and 8 key/value heads. Phi-3-mini-4k's sliding window of 2047 is its GPTConfig.sliding_window, as
Mistral's is, beside its whole context of 4096.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings

import torch

from ..nn.rotary import (
    LLAMA3_SCALING_KEYS,
    LONGROPE_SCALING_KEYS,
    check_rope_scaling,
    longrope_attention_factor,
)
from .config import GPTConfig
from .hf_common import hf_int, hf_layer_types, hf_number

# config.json model_types that are Llama's model (Mistral: Llama with an optional sliding window; Qwen2: with
# biased q/k/v projections and an optional sliding window; Qwen3: with QK-norm and an optional sliding window)
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Llama's model with sparse mixture-of-experts MLPs (GPTConfig.n_experts): Mixtral (Mistral's attention, experts in
# every layer, top-k renormalized) and Qwen3-MoE (Qwen3's attention; norm_topk_prob, dense layers by
# decoder_sparse_step and mlp_only_layers)
MOE_TYPES = ("mixtral", "qwen3_moe")
# Mixture-of-experts models whose config.json names a model the one here does not compute: what it has
UNSUPPORTED_MOE_TYPES = {
    "qwen2_moe": "Qwen2-MoE's shared expert (a dense MLP that every token runs, gated by a sigmoid, beside the "
                 "routed experts)",
}
# Keys by which a config.json of another model_type says it has experts
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
# The types whose sliding_window is on only with use_sliding_window=true
_QWEN_TYPES = ("qwen2", "qwen3")
QWEN3_HEAD_DIM = 128  # transformers' Qwen3Config default, for a config.json without head_dim
QWEN_MAX_WINDOW_LAYERS = 28  # Qwen2Config's and Qwen3Config's default, for a config.json without max_window_layers
# Phi-3: Llama's model with fused q/k/v and gate/up weights (hf_phi3)
PHI3_TYPE = "phi3"
# The types whose sliding_window transformers slides on every layer: read into GPTConfig.sliding_window as it is.
# Their window of W is ours of W, the query's own key included: transformers' masking_utils
# (sliding_window_overlay, beside causal_mask_function) keeps key kv for query q when q - W < kv <= q, W keys, as
# llmkern.ops.attention's window does; its flash-attention path passes window_size=(W - 1, ...), and says so: "we
# usually define our window sizes by their total window size (when causal)". (Older transformers passed (W, W) to
# flash attention, a key more: the versions differ by one there, and these current masks are the ones matched.)
_SLIDING_TYPES = ("mistral", "mixtral", PHI3_TYPE)
# transformers' rms_norm_eps defaults, for a config.json without one (LlamaConfig's and the others' 1e-6)
_DEFAULT_EPS = {PHI3_TYPE: 1e-5, "mixtral": 1e-5}
# The RoPE base a config.json without rope_theta has (transformers' config classes' defaults); 10000.0 for the others
_DEFAULT_THETA = {"mixtral": 1e6}
# The sliding_window a config.json without the key has (MistralConfig's, Qwen2Config's, Qwen3Config's and
# Qwen3MoeConfig's 4096; Qwen's only on with use_sliding_window); none for the others. A null is no window.
_DEFAULT_WINDOW = {"mistral": 4096, "qwen2": 4096, "qwen3": 4096, "qwen3_moe": 4096}
# The num_key_value_heads a config.json without the key has (the config classes' defaults); LlamaConfig's, and a
# null's in every class, is num_attention_heads
_DEFAULT_KV_HEADS = {"mistral": 8, "mixtral": 8, "qwen2": 32, "qwen3": 32, "qwen3_moe": 4}
# transformers' router_aux_loss_coef default (MixtralConfig's and Qwen3MoeConfig's), written when the model here has
# none in use: off, by output_router_logits false, and ready for a fine-tuning that turns it on
_HF_AUX_LOSS_COEF = 0.001
# Phi-3's RoPE scaling: "longrope", or the older names Phi3Config reads as it
_LONGROPE_NAMES = ("longrope", "su", "yarn")
_ORIGINAL_CONTEXT = "original_max_position_embeddings"
PHI3_ORIGINAL_CONTEXT = 4096  # Phi3Config's original_max_position_embeddings, for a config.json without one
# What a longrope scaling in config.json may hold besides LONGROPE_SCALING_KEYS: its name, transformers 5's
# rope_theta and partial_rotary_factor (read on their own), and a factor (checked against the context's stretch)
_LONGROPE_OTHER_KEYS = ("type", "rope_type", "rope_theta", "partial_rotary_factor", "factor")
_LLMKERN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rope(hf_config: dict, model_type: str, head_dim: int, rope_dim: int | None) -> tuple[float, dict | None]:
    """config.json's RoPE base and scaling (GPTConfig.rope_scaling) of heads head_dim wide, rope_dim of them turned
    (None: all): None; Llama 3.1's "llama3" and "linear" (the positions divided by its factor) for the Llama types;
    "longrope" for Phi-3; an error for any other scaling (dynamic, yarn, ...), which changes the frequencies in other
    ways."""
    # transformers 5 writes one "rope_parameters" dict ({"rope_type", "rope_theta", ...}); before it,
    # "rope_theta" and "rope_scaling" (None, or a dict with "rope_type", or "type" in older files)
    params = hf_config.get("rope_parameters")
    default_theta = _DEFAULT_THETA.get(model_type, 10000.0)
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"config.json's rope_parameters must be a JSON object, got {params!r}")
        scaling, theta = params, hf_number(params, "rope_theta", hf_config.get("rope_theta", default_theta))
    else:
        scaling, theta = hf_config.get("rope_scaling"), hf_number(hf_config, "rope_theta", default_theta)
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
    if kind == "default":
        return theta, None
    if kind == "llama3" and model_type in LLAMA_TYPES + MOE_TYPES:
        llama3 = {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3_SCALING_KEYS if k in scaling}}
        return theta, _checked_scaling(llama3, head_dim, rope_dim)
    if kind == "linear" and model_type in LLAMA_TYPES + MOE_TYPES:  # positions divided by the factor
        return theta, _checked_scaling({"rope_type": "linear", "factor": scaling.get("factor")}, head_dim, rope_dim)
    if kind in _LONGROPE_NAMES and model_type == PHI3_TYPE:
        return theta, _checked_scaling(_longrope(hf_config, scaling), head_dim, rope_dim)
    family, computed = (("Phi-3", "Phi-3's 'longrope'") if model_type == PHI3_TYPE
                        else ("Llama", "Llama 3.1's 'llama3' or 'linear'"))
    raise ValueError(f"config.json has RoPE scaling {scaling!r}; a {family} model here computes plain RoPE or "
                     f"{computed} scaling only, so its positions would be rotated by other angles")


def _checked_scaling(scaling: dict, head_dim: int, rope_dim: int | None) -> dict:
    try:
        check_rope_scaling(scaling, head_dim, rope_dim)
    except ValueError as err:
        kind = scaling["rope_type"]
        raise ValueError(f"config.json's {kind} RoPE scaling is not one the model takes: {err}") from None
    return scaling


def _longrope(hf_config: dict, scaling: dict) -> dict:
    """Phi-3's longrope scaling as GPTConfig.rope_scaling holds it: its short and long factors, its original
    context, and its attention factor: config.json's, else sqrt(1 + ln(s) / ln(original context)) for the
    context's stretch s = max_position_embeddings / original context, as transformers works it out."""
    unknown = sorted(set(scaling) - {*LONGROPE_SCALING_KEYS, *_LONGROPE_OTHER_KEYS}, key=str)
    if unknown:
        raise ValueError(f"config.json's longrope RoPE scaling has {unknown}, which the model does not compute")
    original = _original_context(hf_config, scaling)
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = longrope_attention_factor(_stretch(hf_config, scaling, original), original)
    factors = {k: scaling[k] for k in ("short_factor", "long_factor") if k in scaling}
    return {"rope_type": "longrope", **factors, _ORIGINAL_CONTEXT: original, "attention_factor": attention}


def _original_context(hf_config: dict, scaling: dict) -> int:
    """The context a longrope model was pretrained with: Phi-3's config.json has it at its top level, transformers
    5 in the scaling too (taken from the top level when absent there); Phi3Config's 4096 when neither has it."""
    top, own = hf_config.get(_ORIGINAL_CONTEXT), scaling.get(_ORIGINAL_CONTEXT)
    if top is not None and own is not None and top != own:
        raise ValueError(f"config.json has {_ORIGINAL_CONTEXT}={top!r}, and {own!r} in its RoPE scaling; "
                         f"transformers reads one or the other, by version")
    return hf_int({_ORIGINAL_CONTEXT: top if own is None else own}, _ORIGINAL_CONTEXT, PHI3_ORIGINAL_CONTEXT)


def _stretch(hf_config: dict, scaling: dict, original: int) -> float:
    """max_position_embeddings / original context, which sets longrope's attention factor. A "factor" in the
    scaling must be that ratio: transformers 5 takes it in the ratio's place, transformers 4 ignores it."""
    stretch = hf_int(hf_config, "max_position_embeddings") / original
    factor = scaling.get("factor")
    if factor is not None and factor != stretch:
        raise ValueError(f"config.json's longrope RoPE scaling has factor={factor!r}, not max_position_embeddings / "
                         f"{_ORIGINAL_CONTEXT} = {stretch}: transformers 4 and 5 would compute other logits")
    return stretch



def config_from_hf_llama(hf_config: dict, **overrides) -> GPTConfig:
    """The GPTConfig of a HF Llama-family model from its config.json (a dict); an error for a setting the model
    cannot compute (it would load and give other logits). overrides replace GPTConfig fields (backend, ...)."""
    if not isinstance(hf_config, dict):
        raise TypeError(f"hf_config must be a dict (a config.json), got {type(hf_config).__name__}")
    model_type = hf_config.get("model_type", "llama")
    check_no_unsupported_moe(hf_config, model_type)
    if model_type not in LLAMA_TYPES + MOE_TYPES:
        raise ValueError(f"config.json has model_type={model_type!r}; Llama-family weights are of {LLAMA_TYPES}, "
                         f"or with experts of {MOE_TYPES}")
    return _gpt_config(hf_config, model_type, overrides)


def check_no_unsupported_moe(hf_config: dict, model_type: str) -> None:
    """An error naming what the model here does not compute, for a mixture-of-experts config.json that is neither
    Mixtral's nor Qwen3-MoE's (read as another type's, it would load and give other logits, or fail obscurely)."""
    if model_type in UNSUPPORTED_MOE_TYPES:
        raise ValueError(f"config.json has model_type={model_type!r}, which is not supported: the model here does "
                         f"not compute {UNSUPPORTED_MOE_TYPES[model_type]}; of the mixture-of-experts models, "
                         f"{MOE_TYPES} import")
    named = [key for key in _EXPERT_KEYS if hf_config.get(key)]
    if model_type not in MOE_TYPES and named:
        raise ValueError(f"config.json of model_type={model_type!r} has experts ({named}): that mixture-of-experts "
                         f"model is not supported; of the mixture-of-experts models, {MOE_TYPES} import")


def config_from_hf_phi3(hf_config: dict, **overrides) -> GPTConfig:
    """The GPTConfig of a HF Phi-3 model (model_type "phi3": Llama's model, its weights fused) from its
    config.json, as config_from_hf_llama. Its sliding window (Phi-3-mini-4k's 2047) is GPTConfig.sliding_window,
    beside the whole context. Its dropouts are training-time, and left out as the other importers leave them.

    RoPE on part of each head (Phi-4-mini's partial_rotary_factor 0.75) is read as transformers reads it: on the
    first int(head_dim * partial_rotary_factor) dims of each head (GPTConfig.rope_dim; 96 of 128), which must be
    an even number; a longrope scaling's factors are then one per frequency of those dims (48).

    The "longrope" RoPE scaling of Phi-3-mini-128k and Phi-3.5-mini (or its older names "su" and "yarn", as
    Phi3Config reads them) is read as transformers computes it: each forward pass rescales the frequencies by
    long_factor on a sequence longer than original_max_position_embeddings (4096), by short_factor otherwise
    (llmkern.nn.rotary.RotaryCache.forward), whatever block_size is. The
    attention factor is config.json's, or worked out from max_position_embeddings, whatever block_size is."""
    if not isinstance(hf_config, dict):
        raise TypeError(f"hf_config must be a dict (a config.json), got {type(hf_config).__name__}")
    model_type = hf_config.get("model_type")
    if model_type != PHI3_TYPE:
        raise ValueError(f"config.json has model_type={model_type!r}; Phi-3 weights are of model_type 'phi3'")
    return _gpt_config(hf_config, model_type, overrides)


def _phi3_rope_dim(hf_config: dict, head_dim: int) -> int | None:
    """The dims of each head RoPE turns, as transformers works them out: int(head_dim * partial_rotary_factor),
    which must be even (Phi-4-mini's 0.75 of 128: 96); None for all of them (factor 1, or none given)."""
    factor = _partial_rotary_factor(hf_config)
    rope_dim = int(head_dim * factor)
    if rope_dim < 2 or rope_dim % 2 != 0:
        raise ValueError(f"config.json has partial_rotary_factor={factor!r}: RoPE on int({head_dim} * {factor!r}) "
                         f"= {rope_dim} of each head's dims, where the model turns an even number of them, >= 2")
    return None if rope_dim == head_dim else rope_dim


def _check_whole_head_rope(hf_config: dict, model_type: str) -> None:
    """An error for a partial_rotary_factor other than 1 in a Llama-family config.json: transformers builds its RoPE
    tables int(head_dim * factor) wide for any config that names one, while the model here turns all of each head
    for these types (a partial turn is Phi-3's); ignored, it would compute other logits."""
    factor = _partial_rotary_factor(hf_config)
    if factor != 1:
        raise ValueError(f"config.json has partial_rotary_factor={factor!r}: RoPE on part of each head, which a "
                         f"{model_type} model here does not compute (it turns all of each head; Phi-3's turns part)")


def _partial_rotary_factor(hf_config: dict) -> float:
    """config.json's partial_rotary_factor, a number in (0, 1]; 1 (Phi3Config's) when it has none. transformers 5
    moves it into rope_parameters (and reads rope_scaling as those): it may be in any of the three."""
    found = []
    for place in (hf_config, hf_config.get("rope_parameters"), hf_config.get("rope_scaling")):
        factor = place.get("partial_rotary_factor") if isinstance(place, dict) else None
        if factor is not None and factor not in found:
            found.append(factor)
    if len(found) > 1:
        raise ValueError(f"config.json has partial_rotary_factor {found} in different places; transformers reads "
                         f"one or the other, by version")
    factor = found[0] if found else 1.0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise ValueError(f"config.json's partial_rotary_factor must be a number in (0, 1], got {factor!r}")
    return factor


def _gpt_config(hf_config: dict, model_type: str, overrides: dict) -> GPTConfig:
    n_embd, n_head = hf_int(hf_config, "hidden_size"), hf_int(hf_config, "num_attention_heads")
    # null (old configs): n_head; absent: the config class's default
    kv_default = _DEFAULT_KV_HEADS.get(model_type, n_head) if "num_key_value_heads" not in hf_config else n_head
    n_kv_head = hf_int(hf_config, "num_key_value_heads", kv_default)
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
    head_dim = _head_dim(hf_config, model_type, n_embd, n_head)
    if model_type == PHI3_TYPE:
        rope_dim = _phi3_rope_dim(hf_config, head_dim)
    else:
        _check_whole_head_rope(hf_config, model_type)
        rope_dim = None
    theta, scaling = _rope(hf_config, model_type, head_dim, rope_dim)
    eps = hf_number(hf_config, "rms_norm_eps", _DEFAULT_EPS.get(model_type, 1e-6))
    values = dict(
        vocab_size=hf_int(hf_config, "vocab_size"), block_size=hf_int(hf_config, "max_position_embeddings"),
        n_layer=hf_int(hf_config, "num_hidden_layers"), n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
        head_dim=head_dim, rope_dim=rope_dim,
        norm="rmsnorm", norm_eps=eps, pos="rope",
        rope_theta=theta, rope_scaling=scaling, mlp="swiglu", mlp_hidden=hf_int(hf_config, "intermediate_size"),
        tie_embeddings=tie, bias=False,
        qkv_bias=model_type == "qwen2",  # Qwen2's q/k/v biases are not optional
        qk_norm=model_type in ("qwen3", "qwen3_moe"),  # nor Qwen3's (and Qwen3-MoE's) QK-norm
    )
    if model_type in MOE_TYPES:
        values.update(_moe_values(hf_config, model_type, values["n_layer"]))
    window = _active_window(hf_config, model_type)
    if model_type == "qwen3_moe" and window is not None:
        _check_qwen3_moe_window_layers(hf_config, values["n_layer"])
        values["sliding_window"] = window  # on every layer, as Mistral's
        window = None
    if model_type in _SLIDING_TYPES:
        values["sliding_window"] = window  # the model slides it as transformers does: nothing to cut
        window = None
    elif model_type in _QWEN_TYPES and window is not None:
        layer_types = _qwen_layer_types(hf_config, values["n_layer"])
        sliding = "sliding_attention" in layer_types
        values.update(sliding_window=window if sliding else None, layer_types=layer_types if sliding else None)
        window = None
    if window is not None and window < values["block_size"] and "block_size" not in overrides:
        # exact within the window: no key is more than `window` tokens back in a context no longer than it
        warnings.warn(f"config.json has sliding_window={window}, shorter than max_position_embeddings="
                      f"{values['block_size']}: the model is loaded with block_size={window}, the longest context "
                      f"it computes exactly here (GPTConfig.sliding_window is Mistral's and Phi-3's window, on every "
                      f"layer; a {model_type} config.json's is not read as one)",
                      stacklevel=_stacklevel_of_caller())
        values["block_size"] = window
    config = GPTConfig.from_dict({**values, **overrides})
    if window is not None and window < config.block_size:
        raise ValueError(f"config.json has sliding_window={window}, shorter than block_size={config.block_size}: "
                         f"the model attends to the whole context (give block_size={window} or less to load it)")
    return config


def _stacklevel_of_caller() -> int:
    """The stacklevel that makes a warning of the function calling this name the user's call: the first frame
    outside llmkern (the load or import function called may be several llmkern calls above the warning)."""
    frame, level = sys._getframe(1), 1  # level 1: the function that warns
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LLMKERN_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _head_dim(hf_config: dict, model_type: str, n_embd: int, n_head: int) -> int:
    """config.json's head_dim; absent or null, Qwen3's 128 or else hidden_size / num_attention_heads (as
    transformers' configs fill it in)."""
    if hf_config.get("head_dim") is not None:
        return hf_int(hf_config, "head_dim")
    if model_type == "qwen3":
        return QWEN3_HEAD_DIM
    if n_embd % n_head != 0:
        raise ValueError(f"config.json has no head_dim, and hidden_size={n_embd} is not a multiple of "
                         f"num_attention_heads={n_head}")
    return n_embd // n_head


def _active_window(hf_config: dict, model_type: str) -> int | None:
    """The sliding window a model's attention has, or None: each query sees the last `window` keys, its own
    included (see _SLIDING_TYPES). A config.json without the key has its config class's (_DEFAULT_WINDOW)."""
    window = hf_config.get("sliding_window", _DEFAULT_WINDOW.get(model_type))
    if model_type in _QWEN_TYPES + ("qwen3_moe",):
        # Qwen's configs name a window (32768, 131072, ...) that only use_sliding_window=true turns on (false
        # in the released models); then layer_types or max_window_layers says which layers slide
        # (_qwen_layer_types).
        sliding = hf_config.get("use_sliding_window", False)
        if not isinstance(sliding, bool):
            raise ValueError(f"config.json's use_sliding_window must be true or false, got {sliding!r}")
        if not sliding:
            return None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"config.json's sliding_window must be a positive int or null, got {window!r}")
    return window


def _qwen_layer_types(hf_config: dict, n_layer: int) -> list[str]:
    """Which layers of a Qwen model with its window on slide: layer_types when given, else those from
    max_window_layers on (Qwen2Config's and Qwen3Config's rule, and the layers older transformers slid)."""
    given = hf_layer_types(hf_config, n_layer)
    if given is not None:
        return given
    first = hf_config.get("max_window_layers", QWEN_MAX_WINDOW_LAYERS)
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ValueError(f"config.json's max_window_layers must be an int >= 0, got {first!r}")
    return ["sliding_attention" if i >= first else "full_attention" for i in range(n_layer)]


def _qwen_window(config: GPTConfig) -> dict:
    """A Qwen config.json's window keys for a model's sliding layers: off when none slides; else on, with
    layer_types (transformers 4.53 and later read it) and max_window_layers (the earlier ones), which must then
    say the same: the layers from some index on slide, the others not."""
    types = config.layer_kinds()
    if "sliding_attention" not in types:
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer}
    first = types.index("sliding_attention")
    if "full_attention" in types[first:]:
        raise ValueError(f"a Qwen model slides its window on the layers from max_window_layers on; this one's "
                         f"sliding layers are {[i for i, k in enumerate(types) if k == 'sliding_attention']}, which "
                         f"transformers before 4.53 (max_window_layers, no layer_types) would read otherwise")
    return {"use_sliding_window": True, "sliding_window": config.sliding_window, "max_window_layers": first,
            "layer_types": types}


def _moe_values(hf_config: dict, model_type: str, n_layer: int) -> dict:
    """The GPTConfig mixture-of-experts fields of a Mixtral or Qwen3-MoE config.json (defaults: MixtralConfig's and
    Qwen3MoeConfig's)."""
    coef = _aux_loss_coef(hf_config)
    if model_type == "mixtral":
        jitter = hf_config.get("router_jitter_noise", 0.0)
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter < math.inf:
            raise ValueError(f"config.json's router_jitter_noise must be a number >= 0, got {jitter!r}")
        if jitter > 0:  # training only: the logits are the same, so the model is not refused for it
            warnings.warn(f"config.json has router_jitter_noise={jitter}: in training only, transformers' Mixtral "
                          f"multiplies each MoE layer's input (the router's and the experts') by noise; the model "
                          f"here does not, so inference is Hugging Face's but training (fine-tuning) runs without "
                          f"the noise",
                          stacklevel=_stacklevel_of_caller())
        # Mixtral always renormalizes its top-k weights, and has experts in every layer
        return {"n_experts": hf_int(hf_config, "num_local_experts", 8),
                "experts_per_token": hf_int(hf_config, "num_experts_per_tok", 2), "router_aux_loss_coef": coef}
    norm_topk_prob = hf_config.get("norm_topk_prob", False)
    if not isinstance(norm_topk_prob, bool):
        raise ValueError(f"config.json's norm_topk_prob must be true or false, got {norm_topk_prob!r}")
    return {"n_experts": hf_int(hf_config, "num_experts", 128),
            "experts_per_token": hf_int(hf_config, "num_experts_per_tok", 8),
            "expert_hidden": hf_int(hf_config, "moe_intermediate_size", 768), "norm_topk_prob": norm_topk_prob,
            "router_aux_loss_coef": coef, "moe_layers": _qwen3_moe_layers(hf_config, n_layer)}


def _aux_loss_coef(hf_config: dict) -> float:
    """GPTConfig.router_aux_loss_coef of config.json: its router_aux_loss_coef when output_router_logits is true,
    else 0. transformers adds the load-balancing loss only then (and output_router_logits is false in the released
    Mixtral and Qwen3-MoE models), so a fine-tuning here computes the loss that one in transformers would from the
    same config.json; router_aux_loss_coef=... given to the import turns it on."""
    enabled = hf_config.get("output_router_logits", False)
    if not isinstance(enabled, bool):
        raise ValueError(f"config.json's output_router_logits must be true or false, got {enabled!r}")
    coef = hf_config.get("router_aux_loss_coef", _HF_AUX_LOSS_COEF)
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef < math.inf:
        raise ValueError(f"config.json's router_aux_loss_coef must be a number >= 0, got {coef!r}")
    return float(coef) if enabled else 0.0


def _qwen3_moe_layers(hf_config: dict, n_layer: int) -> list[int]:
    """The layers of a Qwen3-MoE model whose MLP is a mixture of experts, as Qwen3MoeDecoderLayer picks them: those
    not in mlp_only_layers whose index + 1 is a multiple of decoder_sparse_step."""
    step = hf_int(hf_config, "decoder_sparse_step", 1)
    dense = hf_config.get("mlp_only_layers") or []
    if not isinstance(dense, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layer
                                          for i in dense):
        raise ValueError(f"config.json's mlp_only_layers must list layer indices in [0, num_hidden_layers={n_layer}),"
                         f" got {dense!r}")
    return [i for i in range(n_layer) if i not in dense and (i + 1) % step == 0]


def _check_qwen3_moe_window_layers(hf_config: dict, n_layer: int) -> None:
    """Qwen3-MoE's attention slides its window (use_sliding_window=true) on every layer: Qwen3MoeConfig has no
    layer_types, and its max_window_layers is read by no layer. A config.json whose max_window_layers or
    layer_types says otherwise is refused, not guessed: a Qwen3 reading of it would slide fewer layers."""
    first = hf_config.get("max_window_layers", 0)
    types = hf_layer_types(hf_config, n_layer)
    if first != 0 or (types is not None and "full_attention" in types):
        raise ValueError(f"config.json has use_sliding_window=true with max_window_layers={first!r} and layer_types="
                         f"{types!r}: transformers' Qwen3-MoE slides the window on every layer, while these keys "
                         f"say some layers do not; give max_window_layers=0 (or use_sliding_window=false)")


def _hf_moe_config(config: GPTConfig, dtype: torch.dtype) -> dict:
    """The config.json of a mixture-of-experts GPTConfig: Qwen3-MoE's with qk_norm (the attention Qwen3-MoE has),
    else Mixtral's; its attention, norm and RoPE keys as hf_llama_config writes them for the dense model."""
    if config.qkv_bias:
        raise ValueError("a mixture-of-experts model with qkv_bias has no Hugging Face model_type here (Mixtral and "
                         "Qwen3-MoE have no q/k/v biases; Qwen2-MoE, which has, is not supported)")
    if config.layer_types is not None:
        raise ValueError(f"Mixtral and Qwen3-MoE slide their window on every layer or on none; this model has "
                         f"layer_types={config.layer_types}")
    dense = dataclasses.replace(config, n_experts=None, experts_per_token=2, expert_hidden=None, norm_topk_prob=True,
                                router_aux_loss_coef=0.0, moe_layers=None, sliding_window=None)
    hf_config = hf_llama_config(dense, dtype)
    for key in ("mlp_bias", "use_sliding_window", "max_window_layers", "layer_types", "sliding_window"):
        hf_config.pop(key, None)
    coef = config.router_aux_loss_coef
    experts = {"num_experts_per_tok": config.experts_per_token, "output_router_logits": coef > 0,
               "router_aux_loss_coef": coef if coef > 0 else _HF_AUX_LOSS_COEF}
    if config.qk_norm:
        dense_layers = [i for i in range(config.n_layer) if not config.is_moe_layer(i)]
        window = config.sliding_window
        hf_config.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=config.n_experts,
                         moe_intermediate_size=config.expert_hidden_size, norm_topk_prob=config.norm_topk_prob,
                         decoder_sparse_step=1, mlp_only_layers=dense_layers, use_sliding_window=window is not None,
                         sliding_window=window, max_window_layers=0 if window is not None else config.n_layer,
                         **experts)
        return hf_config
    if not config.norm_topk_prob or config.moe_layers is not None:
        raise ValueError(f"Mixtral's model renormalizes its top-k weights and has experts in every layer; this one has "
                         f"norm_topk_prob={config.norm_topk_prob}, moe_layers={config.moe_layers} (a model with "
                         f"qk_norm exports as Qwen3-MoE's, which has both settings)")
    del hf_config["attention_bias"]  # MixtralConfig has none (no layer has a bias)
    # every layer is MoE: intermediate_size is the experts' width (the dense width is no layer's)
    hf_config.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
                     intermediate_size=config.expert_hidden_size, num_local_experts=config.n_experts,
                     router_jitter_noise=0.0, sliding_window=config.sliding_window, **experts)
    return hf_config


def hf_llama_config(config: GPTConfig, dtype: torch.dtype) -> dict:
    """The HF config.json (a dict) of a Llama-shaped GPTConfig whose weights are of `dtype`: Llama's; Mistral's
    (model_type "mistral") with a sliding_window; Qwen2's (model_type "qwen2") with qkv_bias; Qwen3's (model_type
    "qwen3") with qk_norm. With experts (n_experts): Qwen3-MoE's with qk_norm, else Mixtral's (_hf_moe_config)."""
    if config.n_experts is not None:
        return _hf_moe_config(config, dtype)
    qwen = config.qkv_bias or config.qk_norm
    # Qwen's sliding layers are named by layer_types, which no other type here has
    _refuse_gemma_features(config if not qwen else dataclasses.replace(config, layer_types=None))
    if config.qkv_bias and config.qk_norm:
        raise ValueError("a model with both qkv_bias and qk_norm has no Hugging Face model_type (Qwen2 has q/k/v "
                         "biases and no QK-norm, Qwen3 QK-norm and no biases)")
    # Llama 3.1's scaling and the linear one are written as they are: transformers' Llama, Mistral and Qwen read both
    if config.rope_scaling is not None and config.rope_scaling["rope_type"] == "longrope":
        raise ValueError(f"the {config.rope_scaling['rope_type']} RoPE scaling is Phi-3's: a model with it exports "
                         f"as Phi-3's (hf_phi3_config, to_hf_phi3)")
    if config.rope_dim is not None:  # transformers' Llama and Qwen turn all of each head
        raise ValueError(f"RoPE on part of each head (rope_dim={config.rope_dim} of head_dim={config.head_dim}) is "
                         f"Phi-3's: a model with it exports as Phi-3's (hf_phi3_config, to_hf_phi3)")
    hf_config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd, "intermediate_size": config.hidden_size,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling, "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    qwen_window = _qwen_window(config) if qwen else {}
    if config.qkv_bias:
        # Qwen2's config has no attention_bias / mlp_bias (its q/k/v biases are always there, the others never)
        del hf_config["attention_bias"], hf_config["mlp_bias"]
        hf_config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], **qwen_window)
    elif config.qk_norm:
        # Qwen3's has attention_bias (false: no bias on q/k/v nor o_proj) and no mlp_bias
        del hf_config["mlp_bias"]
        hf_config.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], **qwen_window)
    elif config.sliding_window is not None:
        # Mistral's config has no attention_bias / mlp_bias (none of its layers has a bias)
        del hf_config["attention_bias"], hf_config["mlp_bias"]
        hf_config.update(model_type="mistral", architectures=["MistralForCausalLM"],
                         sliding_window=config.sliding_window)
    return hf_config


def hf_phi3_config(config: GPTConfig, dtype: torch.dtype) -> dict:
    """The HF config.json (a dict, model_type "phi3") of a GPTConfig that Phi-3's model computes: Llama's, with
    neither q/k/v biases, QK-norm nor Llama 3.1's RoPE scaling; plain RoPE or longrope (see _hf_longrope), on all
    of each head or on its first rope_dim dims (partial_rotary_factor, see _partial_rotary_factor_of)."""
    _refuse_gemma_features(config)
    scaling = config.rope_scaling
    not_longrope = scaling if scaling is not None and scaling["rope_type"] != "longrope" else None
    kept = {"qkv_bias": config.qkv_bias, "qk_norm": config.qk_norm, "rope_scaling": not_longrope,
            "n_experts": config.n_experts}
    if any(kept.values()):
        raise ValueError(f"Phi-3's model has no q/k/v biases, QK-norm, experts nor a RoPE scaling other than longrope; "
                         f"this one has { {k: v for k, v in kept.items() if v} }")
    hf_config = hf_llama_config(dataclasses.replace(config, rope_scaling=None, rope_dim=None, sliding_window=None),
                                dtype)
    # Phi3Config has no attention_bias nor mlp_bias (no layer has a bias)
    del hf_config["attention_bias"], hf_config["mlp_bias"]
    hf_config.update(model_type=PHI3_TYPE, architectures=["Phi3ForCausalLM"],
                     partial_rotary_factor=_partial_rotary_factor_of(config), sliding_window=config.sliding_window)
    if scaling is not None:
        hf_config.update(rope_scaling=_hf_longrope(scaling, config.block_size),
                         original_max_position_embeddings=scaling[_ORIGINAL_CONTEXT])
    return hf_config


def gemma_features(config: GPTConfig, layer_types: bool = True) -> dict:
    """The Gemma 2/3 model features a GPTConfig has, {field: value} (none: {}); layer_types among them unless told
    not to (Qwen's sliding layers are named by it too)."""
    defaults = {"rope_local_theta": None, "post_norms": False, "embed_scale": None, "attn_scale": None,
                "attn_softcap": None, "logit_softcap": None}
    if layer_types:
        defaults["layer_types"] = None
    features = {k: getattr(config, k) for k, v in defaults.items() if getattr(config, k) != v}
    if config.mlp == "geglu":
        features["mlp"] = config.mlp
    return features


def _refuse_gemma_features(config: GPTConfig) -> None:
    """Llama's and Phi-3's config.json have no key for Gemma 2's and 3's model features: dropped silently, they
    would give another model."""
    features = gemma_features(config)
    if features:
        raise ValueError(f"Llama's and Phi-3's config.json cannot express {features} (Gemma's model features): "
                         f"transformers would read another model")


def _partial_rotary_factor_of(config: GPTConfig) -> float:
    """The partial_rotary_factor from which transformers works out the model's rope_dim again:
    int(head_dim * factor) == rope_dim. rope_dim / head_dim can land one rounding below it (int(44 * (30 / 44))
    is 29), so it is then taken one float step up."""
    if config.rope_dim is None:
        return 1.0
    factor = config.rope_dim / config.head_dim
    if int(config.head_dim * factor) != config.rope_dim:
        factor = math.nextafter(factor, 1.0)
    return factor


def _hf_longrope(scaling: dict, block_size: int) -> dict:
    """config.json's rope_scaling of a longrope model whose max_position_embeddings is block_size. Phi-3's own
    {"type": "longrope", "short_factor", "long_factor"} when its attention factor is the one transformers works
    out from block_size / original context: every transformers version reads it (those before 5 take these three
    keys and no other). Else the attention factor is written too, which transformers 5 reads and the earlier
    versions refuse, rather than work out another one (the model was imported with a block_size other than its
    max_position_embeddings, say)."""
    original = scaling[_ORIGINAL_CONTEXT]
    factors = {"short_factor": scaling["short_factor"], "long_factor": scaling["long_factor"]}
    if scaling["attention_factor"] == longrope_attention_factor(block_size / original, original):
        return {"type": "longrope", **factors}
    return {"rope_type": "longrope", **factors, _ORIGINAL_CONTEXT: original,
            "attention_factor": scaling["attention_factor"]}
