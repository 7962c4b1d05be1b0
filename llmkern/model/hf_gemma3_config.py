"""The config.json of a Hugging Face Gemma 3 text model or Gemma 2 model, read into a GPTConfig and written from one.

Gemma 3's text model is a GPT with RMSNorm (every one of them scaling by 1 + w: see hf_gemma3), RoPE, GeGLU
(gelu_pytorch_tanh), QK-norm, sandwich norms (GPTConfig.post_norms), embeddings scaled by sqrt(hidden_size),
attention scaled by query_pre_attn_scalar ** -0.5, and sliding layers (window sliding_window, RoPE base
rope_local_base_freq, unscaled) beside full ones (base rope_theta, and rope_scaling's linear factor, the 4B-27B
models' 8). Which layers slide: layer_types in newer config.json files; in older ones sliding_window_pattern (layer i
slides unless (i + 1) % pattern == 0). A key a config.json leaves out takes Gemma3TextConfig's default.

model_type "gemma3_text" is Gemma3ForCausalLM's (Gemma 3 270M and 1B); "gemma3" is Gemma3ForConditionalGeneration's
(4B, 12B, 27B), whose "text_config" is read: the vision tower and the projector are left out, with no error.

Gemma 2 ("gemma2", Gemma2ForCausalLM: 2B, 9B, 27B) is Gemma 3 without QK-norm, with one RoPE base (rope_theta, no
scaling) for every layer, and with soft-capping (GPTConfig.attn_softcap, logit_softcap): attention's scaled scores
capped at attn_logit_softcapping (50) before the mask, the logits at final_logit_softcapping (30) before the loss.
Its layers alternate: layer i slides when i is even (window sliding_window, 4096: a query sees itself and the
sliding_window - 1 keys before it, as Gemma 3's and GPTConfig's window do). layer_types, in the files of
transformers versions that have it, says so per layer; older versions always alternate. A Gemma 3 config's
soft-capping (null in Google's) is read too: transformers' Gemma 3 applies it as Gemma 2 does.
Gemma 1 ("gemma") is another model, not read here.
"""

from __future__ import annotations

import math

import torch

from .config import LAYER_TYPES, GPTConfig
from .hf_common import hf_int, hf_layer_types, hf_number

GEMMA3_TEXT_TYPE = "gemma3_text"
GEMMA3_TYPE = "gemma3"
GEMMA3_TYPES = (GEMMA3_TEXT_TYPE, GEMMA3_TYPE)
GEMMA2_TYPE = "gemma2"
GEMMA3_ACTIVATION = "gelu_pytorch_tanh"  # Gemma 2's too
# Gemma3TextConfig's defaults, for the keys a config.json leaves out
_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": GEMMA3_ACTIVATION,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "attention_bias": False,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": None,
    "attn_logit_softcapping": None, "rope_scaling": None, "rope_local_base_freq": 10000.0,
    "use_bidirectional_attention": False,
}
# Gemma2Config's
_GEMMA2_DEFAULTS = {
    "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": GEMMA3_ACTIVATION,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": False,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0, "rope_scaling": None, "use_bidirectional_attention": None,
}
SLIDING_WINDOW_PATTERN = 6  # Gemma3TextConfig's, for a file with neither layer_types nor sliding_window_pattern
# What a RoPE entry (rope_scaling, or one of transformers 5's rope_parameters) may hold
_ROPE_KEYS = ("type", "rope_type", "factor", "rope_theta")


def config_from_hf_gemma3(hf_config: dict, **overrides) -> GPTConfig:
    """The GPTConfig of a HF Gemma 3 text model from its config.json (a dict): model_type "gemma3_text", or
    "gemma3" (the multimodal checkpoint, whose text_config is read; its vision tower and projector are left out).
    An error for a setting the model would compute otherwise (bidirectional attention, biases, another activation
    or RoPE scaling). overrides replace GPTConfig fields (block_size, backend, ...)."""
    if not isinstance(hf_config, dict):
        raise TypeError(f"hf_config must be a dict (a config.json), got {type(hf_config).__name__}")
    model_type = hf_config.get("model_type")
    if model_type not in GEMMA3_TYPES:
        raise ValueError(f"config.json has model_type={model_type!r}; Gemma 3 weights are of {GEMMA3_TYPES}")
    text = _text_config(hf_config, model_type)
    values = _gemma_values(text, "Gemma 3")
    layer_types = _layer_types(text, values["n_layer"])
    sliding = "sliding_attention" in layer_types
    theta, scaling, local_theta = _rope(text)
    values.update(
        rope_theta=theta, rope_scaling=scaling, tie_embeddings=_tie(hf_config, text), qk_norm=True,
        # no layer slides: no window, nor a local base, so the config is the one a model without them has
        sliding_window=hf_int(text, "sliding_window") if sliding else None,
        layer_types=layer_types if sliding else None, rope_local_theta=local_theta if sliding else None,
    )
    return GPTConfig.from_dict({**values, **overrides})


def config_from_hf_gemma2(hf_config: dict, **overrides) -> GPTConfig:
    """The GPTConfig of a HF Gemma 2 model from its config.json (a dict, model_type "gemma2"): Gemma 3's shape
    without QK-norm, one RoPE base, its soft-capping, and its layers alternating (layer_types, else even layers
    sliding). An error for a setting the model would compute otherwise (bidirectional attention, biases, another
    activation, RoPE scaling). overrides replace GPTConfig fields (block_size, backend, ...)."""
    if not isinstance(hf_config, dict):
        raise TypeError(f"hf_config must be a dict (a config.json), got {type(hf_config).__name__}")
    if hf_config.get("model_type") != GEMMA2_TYPE:
        raise ValueError(f"config.json has model_type={hf_config.get('model_type')!r}; Gemma 2 weights are of "
                         f"{GEMMA2_TYPE!r}")
    text = {**_GEMMA2_DEFAULTS, **hf_config}
    values = _gemma_values(text, "Gemma 2")
    n_layer = values["n_layer"]
    layer_types = hf_layer_types(text, n_layer) or alternating_layer_types(n_layer)
    sliding = "sliding_attention" in layer_types
    values.update(
        rope_theta=_gemma2_rope_theta(text), tie_embeddings=_tie(hf_config, text), qk_norm=False,
        sliding_window=hf_int(text, "sliding_window") if sliding else None,
        layer_types=layer_types if sliding else None,
    )
    return GPTConfig.from_dict({**values, **overrides})


def _gemma_values(text: dict, family: str) -> dict:
    """The GPTConfig fields Gemma 2 and Gemma 3 read alike from their config.json keys (defaults filled in): sizes,
    (1 + w) RMSNorms, sandwich norms, GeGLU, the embeddings' and attention's scales, the soft caps. Refuses what
    neither model computes."""
    _refuse_other_models(text, family)
    head_dim = hf_int(text, "head_dim")
    return dict(
        vocab_size=hf_int(text, "vocab_size"), block_size=hf_int(text, "max_position_embeddings"),
        n_layer=hf_int(text, "num_hidden_layers"), n_head=hf_int(text, "num_attention_heads"),
        n_kv_head=hf_int(text, "num_key_value_heads"), n_embd=hf_int(text, "hidden_size"), head_dim=head_dim,
        norm="rmsnorm", norm_eps=hf_number(text, "rms_norm_eps", 1e-6), pos="rope", mlp="geglu",
        mlp_hidden=hf_int(text, "intermediate_size"), bias=False, qkv_bias=False, post_norms=True,
        embed_scale=hf_int(text, "hidden_size") ** 0.5, attn_scale=_attn_scale(text, head_dim),
        attn_softcap=_softcap(text, "attn_logit_softcapping"), logit_softcap=_softcap(text, "final_logit_softcapping"),
    )


def _text_config(hf_config: dict, model_type: str) -> dict:
    """The text model's config.json keys, Gemma3TextConfig's defaults filled in: the file's own, or a
    Gemma3ForConditionalGeneration's text_config."""
    text = hf_config
    if model_type == GEMMA3_TYPE:
        text = hf_config.get("text_config") or {}
        if not isinstance(text, dict):
            raise ValueError(f"config.json's text_config must be a JSON object, got {text!r}")
    return {**_DEFAULTS, **text}


def _refuse_other_models(text: dict, family: str) -> None:
    """EmbeddingGemma's bidirectional attention, biases and another activation: the model here computes none of
    them."""
    if text["use_bidirectional_attention"] not in (False, None):
        raise ValueError(f"config.json has use_bidirectional_attention={text['use_bidirectional_attention']!r}; "
                         f"the model here is causal (EmbeddingGemma's bidirectional attention is not computed)")
    if text["attention_bias"] is not False:
        raise ValueError(f"config.json has attention_bias={text['attention_bias']!r}; the {family} model here has "
                         f"no biases")
    if text["hidden_activation"] != GEMMA3_ACTIVATION:
        raise ValueError(f"config.json has hidden_activation={text['hidden_activation']!r}; the model's MLP is "
                         f"GeGLU with {GEMMA3_ACTIVATION!r}")


def _softcap(text: dict, name: str) -> float | None:
    """config.json's soft cap `name` (a number > 0, or null for none)."""
    value = text[name]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"config.json's {name} must be a finite number > 0 or null, got {value!r}")
    return float(value)


def _layer_types(text: dict, n_layer: int) -> list[str]:
    """Each layer's kind: layer_types when given (newer files), else sliding_window_pattern's; both given, they
    must agree (transformers reads one or the other, by version)."""
    from_pattern = pattern_layer_types(hf_int(text, "sliding_window_pattern", SLIDING_WINDOW_PATTERN), n_layer)
    given = hf_layer_types(text, n_layer)
    if given is None:
        return from_pattern
    if text.get("sliding_window_pattern") is not None and given != from_pattern:
        raise ValueError(f"config.json's layer_types {given} and sliding_window_pattern="
                         f"{text['sliding_window_pattern']} name other sliding layers; transformers reads one or the "
                         f"other, by version")
    return given


def pattern_layer_types(pattern: int, n_layer: int) -> list[str]:
    """The layer kinds of sliding_window_pattern `pattern`: every pattern-th layer full, the others sliding."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layer)]


def alternating_layer_types(n_layer: int) -> list[str]:
    """Gemma 2's layer kinds: layer i slides when i is even (Gemma2Config's default layer_types, and every layer's
    kind in the transformers versions before it had them)."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]


def _rope(text: dict) -> tuple[float, dict | None, float]:
    """(the full layers' RoPE base, their scaling (None or linear), the sliding layers' base): from transformers 5's
    rope_parameters (one entry per layer type) when given, else rope_theta, rope_scaling and rope_local_base_freq."""
    full, local = _rope_entries(text)
    theta = hf_number({**text, **full}, "rope_theta", _DEFAULTS["rope_theta"])
    local_theta = hf_number({"rope_theta": text["rope_local_base_freq"], **local}, "rope_theta", 10000.0)
    if _scaling(local, "the sliding layers' RoPE") is not None:
        raise ValueError(f"config.json's sliding layers have RoPE scaling {local!r}; Gemma 3's turn by plain RoPE")
    return theta, _scaling(full, "rope_scaling"), local_theta


def _gemma2_rope_theta(text: dict) -> float:
    """Gemma 2's one RoPE base (rope_theta, or transformers 5's rope_parameters); an error for a scaling, or for
    sliding layers with a base of their own (Gemma 3's), which Gemma 2's model has not."""
    full, local = _rope_entries(text)
    theta = hf_number({**text, **full}, "rope_theta", _GEMMA2_DEFAULTS["rope_theta"])
    for entry, name in ((full, "rope_scaling"), (local, "the sliding layers' RoPE")):
        if _scaling(entry, name) is not None:
            raise ValueError(f"config.json's {name} is {entry!r}; Gemma 2 is read with plain RoPE only")
    if local and hf_number({"rope_theta": theta, **local}, "rope_theta", theta) != theta:
        raise ValueError(f"config.json's sliding layers turn by a RoPE base of their own ({local!r}, the others by "
                         f"{theta}); Gemma 2's layers share one")
    return theta


def _rope_entries(text: dict) -> tuple[dict, dict]:
    """(the full layers' RoPE entry, the sliding layers' own or {}): transformers 5's rope_parameters (one entry,
    or one per layer type), else rope_scaling (null: {})."""
    params = text.get("rope_parameters")
    if params is None:
        full, local = text["rope_scaling"] or {}, {}
    elif not isinstance(params, dict):
        raise ValueError(f"config.json's rope_parameters must be a JSON object, got {params!r}")
    elif "rope_type" in params:  # one entry for every layer: the full layers'; the sliding ones' base is apart
        full, local = params, {}
    else:
        unknown = sorted(set(params) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"config.json's rope_parameters has {unknown}; it takes one entry per layer type "
                             f"{LAYER_TYPES}")
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    return full, local


def _scaling(entry: dict, name: str) -> dict | None:
    """GPTConfig.rope_scaling of a RoPE entry: None for plain RoPE, {"rope_type": "linear", "factor"}; an error
    naming `name` for any other."""
    if not isinstance(entry, dict):
        raise ValueError(f"config.json's {name} must be a JSON object or null, got {entry!r}")
    kind = entry.get("rope_type", entry.get("type", "default"))
    unknown = sorted(set(entry) - set(_ROPE_KEYS), key=str)
    if kind not in ("default", "linear") or unknown:
        raise ValueError(f"config.json's {name} is {entry!r}; the Gemma model here computes plain RoPE or the "
                         f"'linear' scaling (a factor) only")
    if kind == "default":
        return None
    factor = entry.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(f"config.json's {name}: a linear scaling's factor must be a number > 0, got {factor!r}")
    return {"rope_type": "linear", "factor": float(factor)}


def _attn_scale(text: dict, head_dim: int) -> float | None:
    """query_pre_attn_scalar ** -0.5; None when it is head_dim ** -0.5 (attention's own scale)."""
    scale = hf_number(text, "query_pre_attn_scalar", _DEFAULTS["query_pre_attn_scalar"]) ** -0.5
    return None if scale == head_dim ** -0.5 else scale


def _tie(hf_config: dict, text: dict) -> bool:
    """tie_word_embeddings (true by default); a multimodal file may have it at its top level and in its
    text_config, which must then agree."""
    found = {hf_config.get("tie_word_embeddings"), text.get("tie_word_embeddings")} - {None}
    if len(found) > 1:
        raise ValueError("config.json has tie_word_embeddings true in one place and false in another")
    tie = found.pop() if found else True
    if not isinstance(tie, bool):
        raise ValueError(f"config.json's tie_word_embeddings must be true or false, got {tie!r}")
    return tie


def check_gemma3_shaped(config: GPTConfig) -> None:
    """An error naming what a GPTConfig has that Gemma 3's model does not compute alike."""
    _check_gemma_shaped(config, "Gemma 3", qk_norm=True)
    if config.rope_scaling is not None and config.rope_scaling["rope_type"] != "linear":
        raise ValueError(f"Gemma 3's model has plain RoPE or the linear scaling; this one has {config.rope_scaling}")
    sliding = any(config.layer_window(i) is not None for i in range(config.n_layer))
    if sliding and config.rope_scaling is not None and config.rope_local_theta is None:
        raise ValueError("this model's sliding layers take its rope_scaling (rope_local_theta is None); Gemma 3's "
                         "sliding layers turn by plain RoPE")


def check_gemma2_shaped(config: GPTConfig) -> None:
    """An error naming what a GPTConfig has that Gemma 2's model does not compute alike: Gemma 3's shape without
    QK-norm, with one plain RoPE base for every layer."""
    _check_gemma_shaped(config, "Gemma 2", qk_norm=False, rope_scaling=None, rope_local_theta=None)


def _check_gemma_shaped(config: GPTConfig, family: str, **more) -> None:
    """An error naming the fields of config that `family`'s model (Gemma 2 or 3) has otherwise: the fields both
    share, and `more`."""
    wanted = dict(norm="rmsnorm", pos="rope", mlp="geglu", bias=False, qkv_bias=False, post_norms=True,
                  embed_scale=config.n_embd ** 0.5, rope_dim=None, n_experts=None, **more)
    wrong = {k: getattr(config, k) for k, v in wanted.items() if getattr(config, k) != v}
    if wrong:
        shape = family.replace(" ", "-")
        raise ValueError(f"{family} weights need a {shape}-shaped model ({wanted}); this one has {wrong}")


def hf_gemma3_config(config: GPTConfig, dtype: torch.dtype) -> dict:
    """The HF config.json (a dict, Gemma3ForCausalLM's: model_type "gemma3_text") of a Gemma-3-shaped GPTConfig
    whose weights are of `dtype`. It names the sliding layers twice: layer_types, which transformers 4.53 and later
    read, and sliding_window_pattern, which the earlier ones read, when the layers follow such a pattern (Gemma 3's
    do); when they follow none, only the later versions read the file as this model."""
    check_gemma3_shaped(config)
    hf_config = {
        "model_type": GEMMA3_TEXT_TYPE, "architectures": ["Gemma3ForCausalLM"], **_hf_gemma_values(config, dtype),
        "rope_local_base_freq": config.rope_local_theta or config.rope_theta, "rope_scaling": config.rope_scaling,
    }
    types = config.layer_kinds()
    pattern = next((p for p in range(1, config.n_layer + 2) if pattern_layer_types(p, config.n_layer) == types), None)
    if pattern is not None:
        hf_config["sliding_window_pattern"] = pattern
    return hf_config


def hf_gemma2_config(config: GPTConfig, dtype: torch.dtype) -> dict:
    """The HF config.json (a dict, Gemma2ForCausalLM's: model_type "gemma2") of a Gemma-2-shaped GPTConfig whose
    weights are of `dtype`. Its layer_types say which layers slide; transformers versions without them slide the
    even layers whatever the file says, so only layers that alternate so (Gemma 2's) read alike in every version."""
    check_gemma2_shaped(config)
    return {"model_type": GEMMA2_TYPE, "architectures": ["Gemma2ForCausalLM"], **_hf_gemma_values(config, dtype)}


def _hf_gemma_values(config: GPTConfig, dtype: torch.dtype) -> dict:
    """The config.json keys Gemma 2 and Gemma 3 write alike, of a GPTConfig (of either's shape, checked) whose
    weights are of `dtype`."""
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "intermediate_size": config.hidden_size,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim, "hidden_activation": GEMMA3_ACTIVATION,
        "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "query_pre_attn_scalar": _query_pre_attn_scalar(config),
        # no sliding layer: a window that masks nothing (transformers' caches size themselves by it)
        "sliding_window": config.sliding_window or config.block_size, "layer_types": config.layer_kinds(),
        "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": config.attn_softcap,
        "final_logit_softcapping": config.logit_softcap, "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _query_pre_attn_scalar(config: GPTConfig) -> float | int:
    """A query_pre_attn_scalar whose ** -0.5 is config's attention scale exactly: head_dim for none, else the
    whole number or float nearest to attn_scale ** -2 that gives it back."""
    if config.attn_scale is None:
        return config.head_dim
    guess = config.attn_scale ** -2
    for candidate in (round(guess), guess, *_neighbours(guess)):
        if candidate > 0 and candidate ** -0.5 == config.attn_scale:
            return candidate
    raise ValueError(f"no query_pre_attn_scalar gives attn_scale={config.attn_scale!r} exactly")


def _neighbours(x: float, steps: int = 4) -> list[float]:
    """The `steps` floats above x and below it."""
    out, up, down = [], x, x
    for _ in range(steps):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, 0.0)
        out += [up, down]
    return out
