"""A sparse mixture-of-experts MLP (Mixtral's, Qwen3-MoE's): a router sends each token to k of E SwiGLU experts and
sums their outputs, weighted by its routing probabilities.

Routing, as transformers computes it: a softmax over the experts in float32, the top k, optionally renormalized to
sum to 1, the weights cast to the activations' dtype. The module also returns the routing statistics of its tokens
(RouterStats), from which the model computes the load-balancing loss over all its MoE layers (load_balancing_loss).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.swiglu import swiglu
from ._dispatch import module_backend, op_backend


class RouterStats(NamedTuple):
    """One MoE layer's routing of N tokens: what the load-balancing loss needs of it."""

    slot_share: torch.Tensor  # (E,) of the N tokens, how many sent a top-k slot to each expert / N (sums to k)
    mean_prob: torch.Tensor  # (E,) float32 router probability of each expert, averaged over the N tokens


class MoEMLP(nn.Module):
    """sum over the top-k experts e of x's router: weight_e * proj_e(silu(gate_e(x)) * up_e(x)).

    The experts' weights are stacked: gate_up (E, 2 * hidden, n_embd), each expert's [gate | up] rows as GatedMLP's
    gate_up.weight, and proj (E, n_embd, hidden), as GatedMLP's proj.weight. Stacked rather than a ModuleList of
    GatedMLPs so that every expert is in the autograd graph each step (an expert that gets no token gets a zero
    gradient, not None, which DDP would take for an unused parameter), and so that a grouped-GEMM kernel can take
    them as they are. No biases: neither Mixtral's nor Qwen3-MoE's experts have any.

    forward(x) returns (output of x's shape, RouterStats of x's tokens).
    """

    def __init__(
        self, n_embd: int, hidden: int, n_experts: int, experts_per_token: int, norm_topk_prob: bool = True,
        dropout: float = 0.0, backend: str | None = None,
    ):
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if not 1 <= experts_per_token <= n_experts:
            raise ValueError(f"experts_per_token must be in [1, n_experts={n_experts}], got {experts_per_token}")
        self.hidden = hidden
        self.n_experts = n_experts
        self.experts_per_token = experts_per_token
        self.norm_topk_prob = norm_topk_prob
        self.backend = module_backend(backend)
        self.router = nn.Linear(n_embd, n_experts, bias=False)
        # Initialised by GPT.init_weights (N(0, 0.02), proj with the residual std); empty until then.
        self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * hidden, n_embd))
        self.proj = nn.Parameter(torch.empty(n_experts, n_embd, hidden))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        tokens = x.reshape(-1, x.size(-1))  # (N, C)
        probs = F.softmax(self.router(tokens), dim=-1, dtype=torch.float32)  # (N, E)
        weights, experts = probs.topk(self.experts_per_token, dim=-1)  # (N, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(experts.reshape(-1), minlength=self.n_experts)  # (E,) slots per expert
        out = self._run_experts(tokens, weights, experts, counts)
        stats = RouterStats(counts.float() / tokens.size(0), probs.mean(dim=0))
        return self.dropout(out).view_as(x), stats

    def _run_experts(
        self, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """Each (token, slot) assignment run through its expert, weighted, and summed per token: (N, C).

        The assignments are sorted by expert so that each expert runs once on its tokens, one matmul pair per
        expert in a Python loop. That is where speed would come from: a grouped-GEMM kernel over the sorted
        assignments (and no host sync for the counts)."""
        k = self.experts_per_token
        order = experts.reshape(-1).argsort(stable=True)  # assignments (token * k + slot) grouped by expert
        outputs = []
        for e, rows in enumerate(order.split(counts.tolist())):
            if rows.numel():  # an idle expert still gets its zero gradient: its weights are slices of the stack
                outputs.append(self._expert(e, tokens[rows // k]))
        expert_out = torch.cat(outputs)  # (N * k, C), in `order`
        # The weights in the activations' dtype, as transformers casts them.
        weighted = expert_out * weights.reshape(-1)[order].to(expert_out.dtype).unsqueeze(-1)
        return expert_out.new_zeros(tokens.shape).index_add(0, order // k, weighted)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU MLP on x (n, C), through llmkern.ops.swiglu as GatedMLP's."""
        gate, up = F.linear(x, self.gate_up[e]).split(self.hidden, dim=-1)
        y = swiglu(gate, up, backend=op_backend("swiglu", self.backend, x.device))
        return F.linear(y, self.proj[e])

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, experts_per_token={self.experts_per_token}, hidden={self.hidden}, "
                f"norm_topk_prob={self.norm_topk_prob}")


def load_balancing_loss(stats: list[RouterStats]) -> torch.Tensor:
    """Switch Transformer's load-balancing loss over the MoE layers of a forward pass, as transformers'
    load_balancing_loss_func computes it from all layers' router logits concatenated (no attention mask):
    E * sum_e (top-k slots sent to e per token) * (mean router probability of e), both averaged over the
    concatenation. Every layer routes the same tokens, so those averages are the averages of the layers' own:
    one product of layer averages, not an average of per-layer losses. It is k (not 1) when the routing is even."""
    if not stats:
        raise ValueError("load_balancing_loss needs the RouterStats of at least one MoE layer")
    slot_share = torch.stack([s.slot_share for s in stats]).mean(dim=0)
    mean_prob = torch.stack([s.mean_prob for s in stats]).mean(dim=0)
    n_experts = mean_prob.numel()
    return n_experts * (slot_share * mean_prob).sum()
