"""Muon for a transformer's hidden matrices, llmkern's AdamW for everything else, as one optimizer.

Muon (Keller Jordan's; torch.optim.Muon) steps a 2-D weight with the momentum of its gradient made nearly
orthogonal by a Newton-Schulz iteration. It suits the matrices inside the transformer blocks; the embeddings,
the LM head, norm scales and biases step with AdamW, as the Muon authors advise. With adjust_lr_fn=
"match_rms_adamw" (Moonshot's "Muon is Scalable for LLM Training") each matrix's update is scaled by
0.2 * sqrt(max(rows, cols)) to the RMS of an AdamW update, so the AdamW learning rate and weight decay carry
over unchanged.

MuonWithAdamW holds a torch.optim.Muon and an llmkern.optim.AdamW and shows them as one optimizer:
param_groups (Muon's first), step, zero_grad, state_dict and load_state_dict, so a trainer, gradient
clipping, loss scaling and checkpoints see one optimizer. Its state_dict is the one a single torch optimizer
over those groups would have (parameters numbered across both), so checkpoints store it as any other.

What steps with Muon (muon_parameters): every 2-D parameter of the model's transformer blocks (model.blocks):
attention's fused qkv and output projections, the MLP's matrices (SwiGLU's fused gate_up is one matrix), and
an MoE layer's router. An MoE layer's stacked 3-D expert weights step with AdamW: torch's Muon takes 2-D
parameters only. A fused matrix is orthogonalized whole: q, k and v (and gate and up) together, where a model
with separate projections (transformers' Llama, Moonlight's recipe) orthogonalizes each; the update differs, and
its RMS scale follows the fused shape.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from .adamw import AdamW

# Keys a group of each part has: a state_dict whose groups lack them was saved by another optimizer
_MUON_GROUP_KEYS = ("momentum", "nesterov", "ns_steps", "adjust_lr_fn")
_ADAMW_GROUP_KEYS = ("betas", "eps")


def muon_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon steps: the 2-D trainable parameters of the model's transformer blocks (model.blocks),
    in the model's order."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"model must have its transformer blocks in a ModuleList `blocks` (as llmkern's GPT), got "
                        f"{type(model).__name__} without one")
    return [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2]


def split_groups(groups: list[dict], muon_params: list[nn.Parameter]) -> list[dict]:
    """AdamW parameter groups (a model's optimizer_groups) less the parameters in muon_params; a group left
    empty goes."""
    taken = {id(p) for p in muon_params}
    rest = [{**group, "params": [p for p in group["params"] if id(p) not in taken]} for group in groups]
    return [group for group in rest if group["params"]]


class MuonWithAdamW:
    """torch.optim.Muon over muon_params, llmkern's AdamW over adamw_groups, stepped together.

    Args:
        muon_params: the 2-D parameters for Muon (muon_parameters(model)).
        adamw_groups: parameter groups for AdamW (split_groups(model.optimizer_groups(wd), muon_params)).
        lr: AdamW's learning rate (each group's, unless it sets its own).
        muon_lr: Muon's learning rate; with adjust_lr_fn="match_rms_adamw" AdamW's lr suits it.
        weight_decay: Muon's decoupled weight decay (AdamW's groups carry their own).
        momentum: Muon's momentum.
        betas, eps, backend: AdamW's.
        adjust_lr_fn: torch.optim.Muon's: "match_rms_adamw", "original" or None.

    Muon's group holds "lr_scale" = muon_lr / lr: a schedule that sets every group's lr to its lr of the step
    times the group's lr_scale (1 where there is none) moves both parts alike.

    There is no fused clip: a trainer clips the gradients of all parameters before step(), and skips the
    step itself when they are not finite (Muon would write NaN into the weights).
    """

    def __init__(self, muon_params, adamw_groups: list[dict], lr: float, muon_lr: float, weight_decay: float,
                 momentum: float = 0.95, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 backend: str | None = None, adjust_lr_fn: str | None = "match_rms_adamw") -> None:
        for name, value in (("lr", lr), ("muon_lr", muon_lr)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be > 0 and finite, got {value}")
        muon_params = list(muon_params)
        if not muon_params:
            raise ValueError("muon_params is empty: the model has no 2-D block matrices for Muon")
        taken = {id(p) for p in muon_params}
        if any(id(p) in taken for group in adamw_groups for p in group["params"]):
            raise ValueError("a parameter is in both muon_params and adamw_groups: each must step once")
        self.muon = torch.optim.Muon([{"params": muon_params, "lr_scale": muon_lr / lr}], lr=muon_lr,
                                     weight_decay=weight_decay, momentum=momentum, adjust_lr_fn=adjust_lr_fn)
        self.adamw = AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, backend=backend)
        self.max_grad_norm = None  # the trainer clips and decides on the host (see the class docstring)

    @property
    def param_groups(self) -> list[dict]:
        """Muon's groups, then AdamW's: the same dicts, so setting a group's lr sets the optimizer's."""
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        """One step of both; returns closure()'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    # --- state_dict ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """One torch-style state_dict: Muon's groups then AdamW's, the parameters numbered across both."""
        muon, adamw = self.muon.state_dict(), self.adamw.state_dict()
        offset = self._muon_param_count()
        state = {**muon["state"], **{index + offset: value for index, value in adamw["state"].items()}}
        groups = muon["param_groups"] + [{**group, "params": [i + offset for i in group["params"]]}
                                         for group in adamw["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of state_dict()'s layout (also one read back from a checkpoint, keys as saved)."""
        groups = state_dict["param_groups"]
        n_muon = len(self.muon.param_groups)
        if len(groups) != n_muon + len(self.adamw.param_groups):
            raise ValueError(f"the state_dict has {len(groups)} param groups, this optimizer {len(self.param_groups)} "
                             f"({n_muon} Muon, {len(self.adamw.param_groups)} AdamW): saved by another optimizer or "
                             f"for another model")
        for i, group in enumerate(groups):
            wanted = _MUON_GROUP_KEYS if i < n_muon else _ADAMW_GROUP_KEYS
            missing = [key for key in wanted if key not in group]
            if missing:
                kind = "Muon" if i < n_muon else "AdamW"
                raise ValueError(f"param group {i} of the state_dict lacks {', '.join(missing)}: not a {kind} group "
                                 f"(the state_dict was saved by another optimizer)")
        muon_groups, adamw_groups = groups[:n_muon], groups[n_muon:]
        muon_keys = {key for group in muon_groups for key in group["params"]}
        state = state_dict["state"]
        self.muon.load_state_dict({"state": {k: v for k, v in state.items() if k in muon_keys},
                                   "param_groups": muon_groups})
        offset = self._muon_param_count()
        self.adamw.load_state_dict({
            "state": {_shifted(k, offset): v for k, v in state.items() if k not in muon_keys},
            "param_groups": [{**group, "params": [_shifted(k, offset) for k in group["params"]]}
                             for group in adamw_groups],
        })

    def _muon_param_count(self) -> int:
        return sum(len(group["params"]) for group in self.muon.param_groups)


def _shifted(key: Any, offset: int) -> Any:
    """An AdamW parameter's key in AdamW's own state_dict: its index less the Muon parameters before it
    (state_dict() numbers them after Muon's)."""
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"the state_dict's parameters must be numbered (ints), got key {key!r}")
    return key - offset
