"""LoRA: low-rank adapters on a model's linear layers (Hu et al., 2021).

A wrapped layer computes  y = x W^T + b + scale * dropout(x) A^T B^T,  with W and b frozen and only
A (rank, in) and B (out, rank) trained; scale = alpha / rank. B starts at zero, so a freshly wrapped
model computes exactly what the base model did. After training, B A * scale can be folded into W
(merge) so inference costs nothing extra, and merge_lora turns the model back into a plain GPT whose
state_dict loads into GPT(config).

The wrapper keeps the base layer's parameters under their own names (`weight`, `bias`), next to
`lora_A` and `lora_B`: a wrapped model's state_dict has the base model's keys plus the adapters', and a
layer merged in place (LoRALinear.merge) adds `merged`, so that its state loads back as merged.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

# The linear layers of llmkern's transformer blocks (llmkern/nn/attention.py, llmkern/nn/mlp.py):
# attention's fused q/k/v and output projections; GPT-2's MLP (fc, proj); Llama's MLP (gate_up, proj).
# A MoE layer's router (llmkern/nn/moe.py, "router") is left out: adapting the routing is not what LoRA on a MoE
# model usually means (PEFT's usual targets leave it out too); it is still a target by name.
BLOCK_LINEARS = ("qkv", "proj", "fc", "gate_up")
LORA_KEYS = ("lora_A", "lora_B")
MERGED_KEY = "merged"  # in a merged LoRALinear's state_dict only: its weight already holds B @ A * scale


def check_lora_args(rank: object, alpha: object, dropout: object) -> None:
    """ValueError/TypeError naming the argument when rank, alpha or dropout is out of range."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {rank!r}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {alpha!r}")
    if not 0 < alpha < math.inf:  # also rejects NaN; inf would make the scale, and every adapter, NaN
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a number, got {dropout!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def check_rank_fits(rank: int, linears: dict[str, nn.Linear]) -> None:
    """ValueError naming rank when it is above a layer's min(in_features, out_features): B @ A is then no
    low-rank update (a rank of that minimum already reaches every update of the layer), only more adapter
    parameters and a smaller scale alpha / rank; most likely a rank meant for a wider model."""
    for name, layer in linears.items():
        if rank > min(layer.in_features, layer.out_features):
            raise ValueError(f"rank {rank} is more than the layer {name!r} ({layer.in_features} -> "
                             f"{layer.out_features}) can use: at most min(in_features, out_features) = "
                             f"{min(layer.in_features, layer.out_features)}")


class LoRALinear(nn.Module):
    """An nn.Linear with its weight and bias frozen, plus a trainable low-rank update B @ A * alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        check_lora_args(rank, alpha, dropout)
        check_rank_fits(rank, {"base": base})
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        # The base layer's own Parameter objects, frozen: no copy of the (possibly large) weight.
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r)
        # A like nn.Linear's default init (kaiming-uniform); B = 0 keeps the layer equal to the base at start.
        # Drawn in fp32 on the CPU whatever the base's device and dtype, so that one seed gives the same adapters
        # on a GPU, on the CPU and under FSDP (whose rank 0 holds the base on its CPU); none on the meta device.
        if self.lora_A.device.type != "meta":
            with torch.no_grad():
                self.lora_A.copy_(nn.init.kaiming_uniform_(torch.empty(rank, self.in_features), a=math.sqrt(5)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update the adapters add to the weight: B @ A * scale, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:  # the update is already inside self.weight
            return y
        # Two thin matmuls through the rank-r bottleneck, never the (out, in) product.
        low = F.linear(self.dropout(x), self.lora_A)  # (..., r)
        return y + F.linear(low, self.lora_B) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (inference: one matmul). The adapters stop training:
        a merged layer's output does not depend on A and B through autograd."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (exact up to float rounding)."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:  # the weight saved holds the update: a loader must know, or it adds the update again
            destination[prefix + MERGED_KEY] = torch.tensor(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The flag describes the weight it came with: a state without it (every unmerged layer's) holds the
        # base weight alone. load_state_dict hands each module its own copy of the dict, so popping is safe.
        flag = state_dict.pop(prefix + MERGED_KEY, None)
        if prefix + "weight" in state_dict:
            self.merged = flag is not None and bool(flag)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}")


# --- whole models -----------------------------------------------------------------------------------

def _candidate_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear layers LoRA may wrap: every one but the LM head (tied to the embedding in GPT-2)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] != "lm_head"}


def _matches(name: str, target: str) -> bool:
    """A target names a module by its last name ("proj") or a dotted ending of it ("attn.proj")."""
    return name == target or name.endswith("." + target)


def _parse_targets(targets: str | Iterable[str] | None) -> list[str] | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        names = [t for t in (part.strip() for part in targets.split(",")) if t]
        if not names and targets.strip():  # "," names no module: not the default's "" by another spelling
            raise ValueError(f"targets {targets!r} names no module; give module-name endings, or '' for every "
                             f"attention and MLP projection")
        return names or None  # "" means the default, as FinetuneConfig.lora_targets documents
    if isinstance(targets, (bytes, dict)) or not isinstance(targets, Iterable):  # not a list of names
        raise TypeError(f"targets must be a comma-separated string or a list of module-name endings, got {targets!r}")
    targets = list(targets)
    if not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"targets must be module-name endings (non-empty strings), got {targets!r}")
    return targets or None


def apply_lora(model: nn.Module, rank: int, alpha: float = 16.0, dropout: float = 0.0,
               targets: str | Iterable[str] | None = None) -> list[str]:
    """Wrap the target linear layers of `model` in LoRALinear (in place) and freeze every other parameter.

    targets: module-name endings ("qkv", "proj", "fc", "gate_up", "attn.proj", "blocks.1.mlp.fc", ...),
        a list or a comma-separated string; None or "" wraps every attention and MLP projection of the
        transformer blocks, not a MoE layer's router ("router" names it). The LM head is never wrapped. A
        target that names no linear layer is a ValueError that lists the layers there are. A MoE layer's
        experts are stacked 3-D parameters, not linear layers: under LoRA they stay frozen.
    Returns the names of the wrapped modules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_lora_args(rank, alpha, dropout)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers; merge_lora(model) first to add new ones")
    linears, chosen = _chosen_linears(model, targets)
    check_rank_fits(rank, {name: linears[name] for name in chosen})  # before anything is frozen or wrapped
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        _set_submodule(model, name, LoRALinear(linears[name], rank, alpha, dropout))
    return chosen


def _chosen_linears(model: nn.Module, targets: str | Iterable[str] | None) -> tuple[dict[str, nn.Linear], list[str]]:
    """(the linear layers LoRA may wrap, the names of those `targets` picks); a ValueError when a target
    names no linear layer, or none is picked."""
    wanted = _parse_targets(targets)
    linears = _candidate_linears(model)
    if wanted is None:
        chosen = [n for n in linears if n.split(".")[-1] in BLOCK_LINEARS]
    else:
        unknown = [t for t in wanted if not any(_matches(n, t) for n in linears)]
        if unknown:
            raise ValueError(f"LoRA targets {unknown} match no linear layer of the model; its linear layers "
                             f"are {sorted(linears)} (the LM head is never a target)")
        chosen = [n for n in linears if any(_matches(n, t) for t in wanted)]
    if not chosen:
        raise ValueError(f"no linear layer to wrap with LoRA; the model's linear layers are {sorted(linears)}")
    return linears, chosen


def check_lora_targets(model: nn.Module, config) -> None:
    """The ValueError that apply_lora_from_config would raise for config.lora_targets on `model`, without
    wrapping anything: a recipe calls it as soon as the base is loaded, before the data is encoded (and DPO's
    reference log-probs computed), where the adapters are added later."""
    if config.lora_rank > 0:
        linears, chosen = _chosen_linears(model, config.lora_targets or None)
        check_rank_fits(config.lora_rank, {name: linears[name] for name in chosen})


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} of a model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding the merged weight (in place; returns model).

    The result has the base model's modules and state_dict keys again, so a GPT's state loads into
    GPT(config). The new layers' parameters are frozen, like the base weights they replace.
    """
    for name, layer in lora_layers(model).items():
        weight = layer.weight + layer.delta_weight().to(layer.weight.dtype) if not layer.merged else layer.weight
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=weight.device, dtype=weight.dtype)
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
        plain.requires_grad_(False)
        _set_submodule(model, name, plain)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: {"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)}, detached."""
    state = {}
    for name, layer in lora_layers(model).items():
        for key in LORA_KEYS:
            state[f"{name}.{key}"] = getattr(layer, key).detach()
    return state


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """lora_state_dict plus every other parameter that trains (requires_grad), under its name, detached:
    what a run changed beside the frozen base, e.g. a classifier's head or a block trained in full."""
    state = lora_state_dict(model)
    for name, p in model.named_parameters():
        if p.requires_grad and name not in state:
            state[name] = p.detach()
    return state


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (from lora_state_dict, or trained_state_dict with the other parameters that
    trained) into a model that has the same LoRA layers.

    Every adapter of the model must be in `state` and every key of `state` must be an adapter or another
    parameter of the model, with the same shape; otherwise a ValueError lists what is missing, unexpected
    or mis-shaped. A merged layer is unmerged, loaded and merged again, so its weight holds the new update.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensors, got {type(state).__name__}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers; call apply_lora(model, ...) with the same targets first")
    expected = {f"{name}.{key}": (name, key) for name in layers for key in LORA_KEYS}
    params = dict(model.named_parameters())
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"LoRA state does not fit the model: missing keys {missing}, unexpected keys {unexpected}")
    for key, value in state.items():
        param = params[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"LoRA state {key!r} must be a tensor, got {type(value).__name__}")
        if value.shape != param.shape:
            raise ValueError(f"LoRA state {key!r} has shape {tuple(value.shape)}; the model's is {tuple(param.shape)} "
                             f"(a different rank?)")
    # Every layer unmerged before anything is copied: a wrapped layer's own weight may be in `state` too.
    was_merged = [name for name, layer in layers.items() if layer.merged]
    for layer in layers.values():
        layer.unmerge()
    for key, value in state.items():
        params[key].copy_(value)
    for name in was_merged:
        layers[name].merge()


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters have requires_grad (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def save_lora_adapters(path: str, model: nn.Module, info: dict[str, object] | None = None) -> str:
    """Write the model's adapters and the other parameters that train (trained_state_dict) to a .safetensors
    file, atomically (temporary name, then rename): the base model, apply_lora with info["modules"] and
    load_lora_state_dict of this file give the trained model back. `info` (rank, alpha, targets, ...) goes
    into the file's metadata as JSON. Its path."""
    if not lora_layers(model):
        raise ValueError("model has no LoRA layers to save")
    state = {k: v.to("cpu").contiguous() for k, v in trained_state_dict(model).items()}
    tmp = f"{path}.tmp_{os.getpid()}"
    save_file(state, tmp, metadata={"llmkern_lora": json.dumps(info or {})})
    os.replace(tmp, path)
    return path


def read_lora_adapters(path: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(tensors: the adapters and the other parameters that trained, info) from a file written by
    save_lora_adapters."""
    with safe_open(path, framework="pt") as f:
        info = json.loads((f.metadata() or {}).get("llmkern_lora", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, info


def apply_lora_from_config(model: nn.Module, config) -> list[str]:
    """apply_lora with a FinetuneConfig's lora_rank/alpha/dropout/targets when lora_rank > 0; else
    nothing (every parameter keeps training). The wrapped module names ([] without LoRA)."""
    if config.lora_rank <= 0:
        return []
    return apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets or None)


def save_and_merge_lora(model: nn.Module, config, wrapped: list[str]) -> str | None:
    """After training with adapters: write them and every other parameter that trained to
    config.out_dir/lora.safetensors (to rebuild the trained model on the base later; wrapped: the module
    names in `model`), then fold them into the weights, leaving a plain model. The file's path; None, and
    nothing done, when nothing was wrapped."""
    from ..train import distributed

    if not wrapped:
        return None
    path = os.path.join(config.out_dir, "lora.safetensors")
    info = distributed.detect()
    # a barrier that fails together: when rank 0 cannot write (disk full), the other ranks stop too
    with distributed.fail_together(info, None, "saving the LoRA adapters"):
        if info.is_main:  # under torchrun every process holds the same adapters: rank 0 writes them
            os.makedirs(config.out_dir, exist_ok=True)
            save_lora_adapters(path, model, lora_info(config, wrapped))
    merge_lora(model)
    return path


def lora_info(config, wrapped: list[str]) -> dict[str, object]:
    """What it takes to rebuild the adapters on the base model: rank, alpha, dropout, wrapped modules."""
    return {"rank": config.lora_rank, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "targets": config.lora_targets, "modules": wrapped}
