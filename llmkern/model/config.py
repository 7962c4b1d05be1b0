"""GPTConfig: every choice that shapes a GPT, as a typed dataclass with named presets.

Checked on construction: a field of the wrong type or an impossible combination (heads that
do not divide the width, an odd RoPE head dim, ...) is a TypeError/ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

VOCAB_MULTIPLE = 64  # the embedding and output rows are padded to this (tensor-core friendly)
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu", "geglu")
LAYER_TYPES = ("sliding_attention", "full_attention")  # Hugging Face's names (Gemma 3's config.json)


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # the longest context
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # < n_head: grouped-query attention; None: n_head
    n_embd: int = 768
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    pos: str = "learned"  # "learned" | "rope"
    rope_theta: float = 10000.0
    # None, or a RoPE scaling as HF's config.json has it: Llama 3.1's "llama3", Phi-3's "longrope" or "linear"
    # (llmkern.nn.rotary.check_rope_scaling; longrope takes its short or long factors per forward pass, by the
    # sequence's length, as Hugging Face does)
    rope_scaling: dict | None = None
    mlp: str = "gelu"  # "gelu" | "swiglu" | "geglu" (Gemma's: gelu_tanh(gate(x)) * up(x))
    mlp_hidden: int | None = None  # None: 4 * n_embd (gelu), or Llama's 8/3 * n_embd rounded up to 64 (gated)
    tie_embeddings: bool = True
    bias: bool = True  # biases in the linear layers and LayerNorms
    # Biases on attention's q/k/v projection alone (Qwen2's: biased q/k/v, every other layer without);
    # None: as `bias`. Set to a bool on construction, as n_kv_head is, so to_dict saves what the model has.
    qkv_bias: bool | None = None
    # Each attention head's width; None (or 0): n_embd // n_head, which must then divide evenly. Qwen3's heads are
    # wider than that (n_embd 1024, 16 heads of 128): q is n_head * head_dim wide, and the output projection reads
    # that back to n_embd. Set to an int on construction, as n_kv_head is.
    head_dim: int | None = None
    # Qwen3's QK-norm: an RMSNorm over head_dim (eps norm_eps, one learned scale for q's heads and one for k's)
    # on each head's q and k, after the projection and before RoPE. Always an RMSNorm, whatever `norm` says:
    # the models that have it (Qwen3, OLMo 2, Gemma 3) norm q and k that way beside RMSNorm blocks.
    qk_norm: bool = False
    # RoPE on each head's first rope_dim dims only, the others left unrotated (Phi-4-mini's partial_rotary_factor
    # 0.75: 96 of its 128); None: on all of head_dim. Even, 2 to head_dim, with pos="rope". One equal to head_dim
    # is set to None on construction: the same model, saved and identified as a config without the field.
    rope_dim: int | None = None
    # Sliding-window attention (Mistral 7B v0.1's 4096, Phi-3-mini-4k's 2047): each token attends to the last
    # sliding_window tokens, itself included (llmkern.ops.attention's window); None: to all of them. Kept as given
    # when it is block_size or longer (it masks nothing then): the window belongs to the trained weights, and a
    # context made longer later must not drop it.
    sliding_window: int | None = None
    # Which layers slide, per layer Hugging Face's "sliding_attention" (the window sliding_window) or
    # "full_attention" (Gemma 3's five sliding layers to one full); None: every layer slides when sliding_window is
    # set, else none does. A list that says what None says is set to None on construction (as rope_dim is).
    layer_types: list[str] | None = None
    # The RoPE base of the sliding layers, which then take no rope_scaling (Gemma 3's rope_local_base_freq: 10000
    # beside its full layers' 1e6); None: the sliding layers turn by the same tables as the others.
    rope_local_theta: float | None = None
    # Gemma's sandwich norms: a norm (of the `norm` kind) on each branch's output, attention's and the MLP's,
    # before it joins the residual stream.
    post_norms: bool = False
    # The token embeddings multiplied by it (Gemma's sqrt(n_embd)), the scale first rounded to the embeddings'
    # dtype as transformers does; None: not multiplied.
    embed_scale: float | None = None
    # Attention's softmax scale (Gemma 3's query_pre_attn_scalar ** -0.5); None: 1 / sqrt(head_dim).
    attn_scale: float | None = None
    # Gemma 2's soft caps, each x -> cap * tanh(x / cap): attn_softcap on attention's scaled scores before the mask
    # (its attn_logit_softcapping, 50), logit_softcap on the LM head's logits, the loss's too (its
    # final_logit_softcapping, 30); None: no cap. Training's attention caps its scores in the Triton kernels (the CUDA
    # ones have no cap; on a CPU, and in generation, the plain-PyTorch reference), and the fused loss caps its logits
    # in its row kernels (fused_linear_cross_entropy's softcap).
    attn_softcap: float | None = None
    logit_softcap: float | None = None
    dropout: float = 0.0  # on the embeddings and on each residual branch
    backend: str | None = None  # passed to every llmkern.ops call; None: llmkern's default
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    # With targets, compute the loss with llmkern.ops.fused_linear_cross_entropy: the LM head and
    # the cross-entropy in chunks, so the logits never exist in full (forward returns None for them).
    # Off, or with the torch backend, the plain full-logits path runs.
    fused_loss: bool = True
    # Sparse mixture-of-experts MLPs (Mixtral's, Qwen3-MoE's; llmkern.nn.MoEMLP): n_experts SwiGLU experts in each
    # MoE layer, of which a router picks experts_per_token for each token; None (or 0): the dense MLP. mlp must be
    # "swiglu". The experts have no biases, as neither model's do.
    n_experts: int | None = None
    experts_per_token: int = 2  # top-k
    expert_hidden: int | None = None  # each expert's inner width; None: hidden_size
    # Renormalize the top-k routing weights to sum to 1 (Mixtral always does, Qwen3-MoE by its norm_topk_prob,
    # OLMoE does not).
    norm_topk_prob: bool = True
    # The weight of the load-balancing loss (Switch Transformer's, as transformers' load_balancing_loss_func computes
    # it) added to forward's loss in training mode; see GPT.forward. Pretraining and SFT add it through forward; the
    # recipes that score through the hidden states (DPO, PPO, GRPO, the reward model, classifiers) take it from
    # GPT.hidden_states_with_aux_loss and add it themselves (llmkern.finetune.aux_loss). Every position counts in its
    # statistics unless a token_mask leaves the padding out, as transformers' attention_mask does (the recipes give
    # one).
    router_aux_loss_coef: float = 0.0
    # Which layers are MoE (sorted, unique indices); None: all. A list of every layer is set to None on construction.
    moe_layers: list[int] | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.qkv_bias is None:  # a config saved before the field existed has none: the model it had
            self.qkv_bias = self.bias
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.head_dim = self._checked_head_dim()
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        _check_choice("norm", self.norm, NORMS)
        _check_choice("pos", self.pos, POSITIONS)
        _check_choice("mlp", self.mlp, MLPS)
        if self.pos == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"pos='rope' needs an even head dim (head_dim, or n_embd / n_head); got {self.head_dim}")
        self.rope_dim = self._checked_rope_dim()
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 (None for attention to the whole context), "
                             f"got {self.sliding_window}")
        self.layer_types = self._checked_layer_types()
        self._check_rope_local_theta()
        for name in ("embed_scale", "attn_scale", "attn_softcap", "logit_softcap"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0 or None, got {getattr(self, name)}")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be >= 1 or None, got {self.mlp_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "rope_theta"):  # inf: a norm's output of zeros, RoPE tables of NaN
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.rope_scaling is not None:
            from ..nn.rotary import check_rope_scaling

            if self.pos != "rope":
                raise ValueError(f"rope_scaling is for pos='rope'; this config has pos={self.pos!r}")
            check_rope_scaling(self.rope_scaling, self.head_dim, self.rope_dim)
        self._check_moe()
        if self.backend is not None:
            from .._backend import BACKENDS

            _check_choice("backend", self.backend, BACKENDS)

    def _checked_head_dim(self) -> int:
        """head_dim as given, or n_embd // n_head for None or 0 (then n_head must divide n_embd)."""
        if self.head_dim is None or self.head_dim == 0:
            if self.n_embd % self.n_head != 0:
                raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}), "
                                 f"or head_dim given")
            return self.n_embd // self.n_head
        if self.head_dim < 0:
            raise ValueError(f"head_dim must be >= 1, or None (or 0) for n_embd // n_head; got {self.head_dim}")
        return self.head_dim

    def _checked_rope_dim(self) -> int | None:
        """rope_dim as given (checked), or None for RoPE on all of head_dim (rope_dim None or head_dim)."""
        if self.rope_dim is None:
            return None
        if self.pos != "rope":
            raise ValueError(f"rope_dim is for pos='rope'; this config has pos={self.pos!r}")
        from ..nn.rotary import check_rope_dim

        check_rope_dim(self.rope_dim, self.head_dim)
        return None if self.rope_dim == self.head_dim else self.rope_dim

    def _checked_layer_types(self) -> list[str] | None:
        """layer_types as given (checked), or None where it says what None says: every layer sliding with a
        sliding_window, none without."""
        if self.layer_types is None:
            return None
        if len(self.layer_types) != self.n_layer:
            raise ValueError(f"layer_types must have one entry per layer (n_layer={self.n_layer}), "
                             f"got {len(self.layer_types)}")
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                raise ValueError(f"layer_types[{i}] must be one of {LAYER_TYPES}, got {kind!r}")
        sliding = "sliding_attention" in self.layer_types
        if sliding and self.sliding_window is None:
            raise ValueError("layer_types has 'sliding_attention' layers, which need sliding_window set")
        implied = "sliding_attention" if self.sliding_window is not None else "full_attention"
        if all(kind == implied for kind in self.layer_types):
            return None
        return list(self.layer_types)  # a copy: the caller's list changed later must not change the model

    def _check_rope_local_theta(self) -> None:
        if self.rope_local_theta is None:
            return
        if self.pos != "rope":
            raise ValueError(f"rope_local_theta is for pos='rope'; this config has pos={self.pos!r}")
        if not 0 < self.rope_local_theta < math.inf:
            raise ValueError(f"rope_local_theta must be a finite number > 0 or None, got {self.rope_local_theta}")
        if self.sliding_window is None:  # no layer would take it
            raise ValueError("rope_local_theta is the RoPE base of the sliding layers; this config has none "
                             "(sliding_window is None)")

    def _check_moe(self) -> None:
        """The mixture-of-experts fields checked; n_experts 0 set to None and a moe_layers of every layer to None
        (the same model, saved as one without the field)."""
        if self.n_experts == 0:
            self.n_experts = None
        if self.n_experts is None:
            self._refuse_moe_fields_without_experts()
            return
        if self.n_experts < 2:
            raise ValueError(f"n_experts must be >= 2, or None (or 0) for a dense MLP; got {self.n_experts}")
        if self.mlp != "swiglu":
            raise ValueError(f"n_experts needs mlp='swiglu' (the experts are SwiGLU MLPs); this config has "
                             f"mlp={self.mlp!r}")
        if not 1 <= self.experts_per_token <= self.n_experts:
            raise ValueError(f"experts_per_token must be in [1, n_experts={self.n_experts}], "
                             f"got {self.experts_per_token}")
        if self.expert_hidden is not None and self.expert_hidden < 1:
            raise ValueError(f"expert_hidden must be >= 1 or None, got {self.expert_hidden}")
        if not 0.0 <= self.router_aux_loss_coef < math.inf:
            raise ValueError(f"router_aux_loss_coef must be a finite number >= 0, got {self.router_aux_loss_coef}")
        self.moe_layers = self._checked_moe_layers()

    def _refuse_moe_fields_without_experts(self) -> None:
        # A dense model with an expert setting was most likely meant to have experts: say so rather than drop it.
        defaults = {"experts_per_token": 2, "expert_hidden": None, "norm_topk_prob": True,
                    "router_aux_loss_coef": 0.0, "moe_layers": None}
        for name, default in defaults.items():
            if getattr(self, name) != default:
                raise ValueError(f"{name} is for mixture-of-experts models; this config has n_experts=None "
                                 f"(set n_experts, or leave {name} at {default!r})")

    def _checked_moe_layers(self) -> list[int] | None:
        if self.moe_layers is None:
            return None
        for i in self.moe_layers:
            if not 0 <= i < self.n_layer:
                raise ValueError(f"moe_layers holds {i}; layer indices are in [0, n_layer={self.n_layer})")
        if self.moe_layers != sorted(set(self.moe_layers)):
            raise ValueError(f"moe_layers must be sorted and without repeats, got {self.moe_layers}")
        if not self.moe_layers:  # a dense model that would still say it has experts
            raise ValueError(f"moe_layers is empty: no layer would have the n_experts={self.n_experts} experts "
                             f"(n_experts=None for a dense model)")
        if len(self.moe_layers) == self.n_layer:
            return None
        return list(self.moe_layers)  # a copy, as layer_types is

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i's MLP is a mixture of experts (see n_experts, moe_layers)."""
        if self.n_experts is None:
            return False
        return self.moe_layers is None or i in self.moe_layers

    def layer_kinds(self) -> list[str]:
        """Each layer's kind, "sliding_attention" or "full_attention" (as Hugging Face's layer_types names them),
        whatever form layer_types is kept in."""
        return ["full_attention" if self.layer_window(i) is None else "sliding_attention" for i in range(self.n_layer)]

    def layer_window(self, i: int) -> int | None:
        """Layer i's sliding window: sliding_window for a sliding layer (see layer_types), None for a full one."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layer:
            raise ValueError(f"layer_window takes a layer index in [0, {self.n_layer}), got {i!r}")
        if self.layer_types is not None and self.layer_types[i] == "full_attention":
            return None
        return self.sliding_window

    # --- derived sizes ---------------------------------------------------------------------

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def hidden_size(self) -> int:
        """The MLP's inner width: mlp_hidden, else 4 * n_embd (gelu) or 8/3 * n_embd rounded up to 64 (swiglu,
        geglu)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        # A gated MLP (SwiGLU, GeGLU) has three matrices instead of two: 8/3 * n_embd keeps the parameter count of a
        # 4x GELU MLP.
        return math.ceil(8 * self.n_embd / 3 / 64) * 64

    @property
    def expert_hidden_size(self) -> int:
        """Each expert's inner width: expert_hidden, else hidden_size."""
        return self.expert_hidden if self.expert_hidden is not None else self.hidden_size

    # --- presets and (de)serialisation -------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; the presets are {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GPTConfig":
        if not isinstance(values, dict):
            raise TypeError(f"a GPTConfig is made from a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; the keys are {sorted(known)}")
        return cls(**values)


PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small: 124M parameters (124,475,904 with the vocabulary padded to 50304).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    # A Llama-style model of GPT-2 small's shape: RMSNorm, RoPE, SwiGLU, 4 kv heads, untied, no bias.
    "llama-small": dict(
        n_layer=12, n_head=12, n_kv_head=4, n_embd=768, norm="rmsnorm", norm_eps=1e-6,
        pos="rope", mlp="swiglu", tie_embeddings=False, bias=False,
    ),
    # Small enough to train on a CPU in minutes. Heads of 64, a size every attention backend runs.
    "tiny": dict(block_size=256, n_layer=2, n_head=2, n_embd=128),
    "tiny-llama": dict(
        block_size=256, n_layer=2, n_head=2, n_kv_head=1, n_embd=128, norm="rmsnorm", norm_eps=1e-6,
        pos="rope", mlp="swiglu", tie_embeddings=False, bias=False,
    ),
    # tiny-llama with a mixture of 4 SwiGLU experts (top-2) in each layer and a load-balancing loss.
    "tiny-moe": dict(
        block_size=256, n_layer=2, n_head=2, n_kv_head=1, n_embd=128, norm="rmsnorm", norm_eps=1e-6,
        pos="rope", mlp="swiglu", tie_embeddings=False, bias=False,
        n_experts=4, experts_per_token=2, router_aux_loss_coef=0.01,
    ),
}


# Fields added after runs were saved, each with the value a config saved without it means: left out of what
# identifies a model (a resume's comparison, a fine-tuning base's fingerprint) when they hold that value, so that
# a run saved before they existed still resumes.
_LATER_FIELDS = {
    "rope_scaling": lambda values: None,
    "qkv_bias": lambda values: values.get("bias", True),
    "head_dim": lambda values: _default_head_dim(values),  # defined below
    "qk_norm": lambda values: False,
    "rope_dim": lambda values: None,
    "sliding_window": lambda values: None,
    "layer_types": lambda values: None,
    "rope_local_theta": lambda values: None,
    "post_norms": lambda values: False,
    "embed_scale": lambda values: None,
    "attn_scale": lambda values: None,
    "attn_softcap": lambda values: None,
    "logit_softcap": lambda values: None,
    "n_experts": lambda values: None,
    "experts_per_token": lambda values: 2,
    "expert_hidden": lambda values: None,
    "norm_topk_prob": lambda values: True,
    "router_aux_loss_coef": lambda values: 0.0,
    "moe_layers": lambda values: None,
}


def _default_head_dim(values: dict[str, Any]) -> int | None:
    """The head_dim a config without the field has: n_embd // n_head (as GPTConfig's defaults fill them in)."""
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    n_embd, n_head = (values.get(name, defaults[name]) for name in ("n_embd", "n_head"))
    if isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0 and n_embd % n_head == 0:
        return n_embd // n_head
    return None


def identity_dict(values: dict[str, Any]) -> dict[str, Any]:
    """A model config dict (GPTConfig.to_dict(), or one an older llmkern saved) for comparing or hashing: the
    later fields dropped where they hold the value their absence means."""
    return {k: v for k, v in values.items() if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k](values))}


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_types(config: GPTConfig) -> None:
    """Each field's value has its annotated type (ints are accepted for floats and turned into floats)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        expected = hints[field.name]
        allowed = typing.get_args(expected) or (expected,)  # `int | None` -> (int, NoneType)
        if typing.get_origin(expected) is list:  # a bare `list[str]`: its args are the items' type
            allowed = (expected,)
        if float in allowed and _is_number(value):
            setattr(config, field.name, float(value))
            continue
        if not any(_is_instance(value, t) for t in allowed):
            names = " or ".join(_type_name(t) for t in allowed)
            raise TypeError(f"GPTConfig.{field.name} must be {names}, got {value!r} ({type(value).__name__})")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(t: object) -> str:
    if t is type(None):
        return "None"
    return str(t) if typing.get_origin(t) is not None else t.__name__  # list[str], not "list"


def _is_instance(value: object, t: type) -> bool:
    if typing.get_origin(t) is list:  # isinstance refuses `list[str]`: the list, then each item
        (item_type,) = typing.get_args(t)
        return isinstance(value, list) and all(_is_instance(item, item_type) for item in value)
    if t is int:  # a bool is an int to Python, never to a config
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)
