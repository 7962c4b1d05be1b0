"""A sparse mixture-of-experts MLP (Mixtral's, Qwen3-MoE's): a router sends each token to k of E SwiGLU experts and
sums their outputs, weighted by its routing probabilities.

Routing, as transformers computes it: a softmax over the experts in float32, the top k, optionally renormalized to
sum to 1, the weights cast to the activations' dtype. The module also returns the routing of each of its tokens
(RouterStats), from which the model computes the load-balancing loss over all its MoE layers (load_balancing_loss),
over every token or only the real ones of a padded batch (its token_mask).

The experts run on their sorted assignments in one grouped GEMM per matmul (torch's grouped_mm: offsets on the
device, no host sync, no graph break) where it runs well, else one matmul pair per expert in a loop; EXPERTS_ENV
forces either (see _experts_path).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.swiglu import swiglu
from ._dispatch import module_backend, op_backend

# "auto" (the default): grouped_mm where _grouped_mm_runs_well says so, else the loop; "loop" or "grouped" forces
# that path (for tests and benchmarks; "grouped" where grouped_mm cannot take the inputs raises torch's error).
EXPERTS_ENV = "LLMKERN_MOE_EXPERTS"
_EXPERT_PATHS = ("auto", "loop", "grouped")

# torch.nn.functional.grouped_mm is the public name (pytorch#168298, Nov 2025: torch 2.10 or 2.11); torch._grouped_mm,
# what it calls, is older (2.8; a CPU kernel from 2.9). Neither: the loop only.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class RouterStats(NamedTuple):
    """One MoE layer's routing of its N tokens (the layer input's (B, T) flattened row by row): what the
    load-balancing loss needs of it. Per token rather than averaged, so that the loss can leave padding out
    (load_balancing_loss's token_mask) without the mask passing through every block. Both tensors exist for
    the forward pass anyway (the probabilities are kept for the softmax's backward)."""

    experts: torch.Tensor  # (N, k) int64: the experts each token sent its top-k slots to
    probs: torch.Tensor  # (N, E) float32: each token's router probabilities (differentiable)


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
        self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * hidden, n_embd))
        self.proj = nn.Parameter(torch.empty(n_experts, n_embd, hidden))
        self.reset_parameters()  # a module used on its own must not compute with torch.empty's memory
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self, proj_std: float = 0.02) -> None:
        """The experts' weights N(0, 0.02) (GPT-2's init), proj's N(0, proj_std): GPT.init_weights passes its
        residual projections' std."""
        nn.init.normal_(self.gate_up, mean=0.0, std=0.02)
        nn.init.normal_(self.proj, mean=0.0, std=proj_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        tokens = x.reshape(-1, x.size(-1))  # (N, C)
        probs = F.softmax(self.router(tokens), dim=-1, dtype=torch.float32)  # (N, E)
        weights, experts = probs.topk(self.experts_per_token, dim=-1)  # (N, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(experts.reshape(-1), minlength=self.n_experts)  # (E,) slots per expert
        out = self._run_experts(tokens, weights, experts, counts)
        return self.dropout(out).view_as(x), RouterStats(experts, probs)

    def _run_experts(
        self, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """Each (token, slot) assignment run through its expert, weighted, and summed per token: (N, C).

        The assignments are sorted by expert so that each expert's rows are one block: one grouped GEMM per matmul
        over the blocks, or one matmul pair per expert in a loop (_experts_path chooses)."""
        k = self.experts_per_token
        order = experts.reshape(-1).argsort(stable=True)  # assignments (token * k + slot) grouped by expert
        if _experts_path(tokens, self.hidden) == "grouped":
            expert_out = self._grouped_experts(tokens[order // k], counts)
        else:
            expert_out = self._looped_experts(tokens, order, counts)  # (N * k, C), in `order`
        # The weights in the activations' dtype, as transformers casts them.
        weighted = expert_out * weights.reshape(-1)[order].to(expert_out.dtype).unsqueeze(-1)
        return expert_out.new_zeros(tokens.shape).index_add(0, order // k, weighted)

    def _looped_experts(self, tokens: torch.Tensor, order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts one after another on their rows of `order`: (N * k, C). counts.tolist() syncs with the
        device, and torch.compile breaks the graph there."""
        k = self.experts_per_token
        outputs = []
        for e, rows in enumerate(order.split(counts.tolist())):
            if rows.numel():  # an idle expert still gets its zero gradient: its weights are slices of the stack
                outputs.append(self._expert(e, tokens[rows // k]))
        return torch.cat(outputs)

    def _grouped_experts(self, sorted_tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert on its block of sorted_tokens (N * k, C), the rows of expert e after those of the experts
        before it, by one grouped_mm per matmul: (N * k, C). An idle expert has an empty block, and its weights
        get a zero gradient from the stacked parameters' backward."""
        ends = counts.cumsum(0).to(torch.int32)  # each block's end row, as grouped_mm's offs: no host sync
        x, gate_up, proj = _in_matmul_dtype(sorted_tokens, self.gate_up, self.proj)
        # mat_b (E, K, N): the stacks transposed, column-major views of the (E, N, K) weights, as grouped_mm wants
        gate, up = _GROUPED_MM(x, gate_up.transpose(1, 2), offs=ends).split(self.hidden, dim=-1)
        y = swiglu(gate, up, backend=op_backend("swiglu", self.backend, x.device))
        return _GROUPED_MM(y, proj.transpose(1, 2), offs=ends)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU MLP on x (n, C), through llmkern.ops.swiglu as GatedMLP's."""
        gate, up = F.linear(x, self.gate_up[e]).split(self.hidden, dim=-1)
        y = swiglu(gate, up, backend=op_backend("swiglu", self.backend, x.device))
        return F.linear(y, self.proj[e])

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, experts_per_token={self.experts_per_token}, hidden={self.hidden}, "
                f"norm_topk_prob={self.norm_topk_prob}")


def _experts_path(tokens: torch.Tensor, hidden: int) -> str:
    """"grouped" or "loop": how MoEMLP runs its experts on tokens (N, C) with width `hidden`. EXPERTS_ENV's
    choice, or for "auto" the grouped GEMM where _grouped_mm_runs_well says so for the matmuls' dtype."""
    mode = os.environ.get(EXPERTS_ENV, "auto")
    if mode not in _EXPERT_PATHS:
        raise ValueError(f"{EXPERTS_ENV} must be one of {', '.join(_EXPERT_PATHS)}; got {mode!r}")
    if mode == "grouped" and _GROUPED_MM is None:
        raise RuntimeError(f"{EXPERTS_ENV}=grouped, but this torch ({torch.__version__}) has no grouped_mm")
    if mode != "auto":
        return mode
    dtype = _matmul_dtype(tokens)
    runs_well = _grouped_mm_runs_well(tokens.device, dtype, tokens.size(-1), hidden)
    return "grouped" if runs_well else "loop"


def _grouped_mm_runs_well(device: torch.device, dtype: torch.dtype, n_embd: int, hidden: int) -> bool:
    """Whether grouped_mm is there and, for matmuls of this dtype on this device with widths n_embd and hidden,
    computes what the loop does, without a host sync, at least as fast. Conservative where it could not be tested.

    Every operand's rows (n_embd or hidden elements, both matmuls and their backward) must be a multiple of 16
    bytes: grouped_mm refuses other strides, on the CPU too.
    - CPU (torch 2.9+): a kernel for float32, float16 and bfloat16, as fast as the loop or faster (a tiny MoE:
      0.7x the loop's time per forward and backward). torch.compile traces it through a meta function that
      accepts bfloat16 only (torch 2.13), so under compilation bfloat16 only.
    - CUDA: bfloat16 on compute capability 9.x (Hopper) only, the CUTLASS kernel: elsewhere it is a loop of mm
      with a host sync (sm80-89, other dtypes), or on sm100 has given nonzero gradients to experts without tokens
      (pytorch/pytorch#172439). ROCm: not tried, so not taken. Not tested on a GPU here.
    - Anything else: the loop.
    """
    if _GROUPED_MM is None or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    row_align = 16 // dtype.itemsize
    if n_embd % row_align or hidden % row_align:
        return False
    if device.type == "cpu":
        return dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    if device.type == "cuda" and torch.version.hip is None:
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] == 9
    return False


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear layer's matmul on x runs in: autocast's where it is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _in_matmul_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """tensors cast to the first one's _matmul_dtype: what autocast does to F.linear's operands, which it does not
    do for grouped_mm (no autocast kernel), so that both paths multiply in the same dtype."""
    dtype = _matmul_dtype(tensors[0])
    return tuple(t.to(dtype) for t in tensors)


def load_balancing_loss(stats: list[RouterStats], token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's load-balancing loss over the MoE layers of a forward pass, as transformers'
    load_balancing_loss_func computes it from all layers' router logits concatenated:
    E * sum_e (top-k slots sent to e per token) * (mean router probability of e), both averaged over the
    concatenation. Every layer routes the same tokens, so those averages are the averages of the layers' own:
    one product of layer averages, not an average of per-layer losses. It is k (not 1) when the routing is even.

    token_mask (B, T) bool, True at the real tokens of the (B, T) batch the layers routed (None: all of them):
    both averages are taken over the real tokens only, as transformers' are with its attention_mask, so that
    padding neither dilutes nor skews the balance. A mask with no real token gives 0 (nothing was routed).
    """
    if not stats:
        raise ValueError("load_balancing_loss needs the RouterStats of at least one MoE layer")
    if token_mask is None:
        slot_share, mean_prob = zip(*(_unmasked_averages(s) for s in stats))
    else:
        real = _real_tokens(token_mask, stats[0].probs.size(0))
        slot_share, mean_prob = zip(*(_masked_averages(s, real) for s in stats))
    slot_share = torch.stack(slot_share).mean(dim=0)
    mean_prob = torch.stack(mean_prob).mean(dim=0)
    n_experts = mean_prob.numel()
    return n_experts * (slot_share * mean_prob).sum()


def _unmasked_averages(stats: RouterStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(E,) top-k slots per token sent to each expert (sums to k), and (E,) mean router probability, over all
    of the layer's tokens."""
    n_tokens, n_experts = stats.probs.shape
    counts = torch.bincount(stats.experts.reshape(-1), minlength=n_experts)
    return counts.float() / n_tokens, stats.probs.mean(dim=0)


def _masked_averages(stats: RouterStats, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """_unmasked_averages over the real tokens (real (N,) bool)."""
    n_experts = stats.probs.size(1)
    # The padding's slots are counted in an extra bin E, then dropped: whole counts from a bincount without
    # weights, which a GPU runs deterministically (torch.use_deterministic_algorithms refuses a weighted one there:
    # its float atomic adds).
    slots = stats.experts.masked_fill(~real.unsqueeze(-1), n_experts)
    counts = torch.bincount(slots.reshape(-1), minlength=n_experts + 1)[:n_experts]
    # No real token: 0 / 1, not NaN (the sums are 0 then).
    n_real = real.sum().clamp_min(1).float()
    # A weighted sum, not a matmul: autocast would run that in bf16.
    mean_prob = (stats.probs * real.unsqueeze(-1).float()).sum(dim=0) / n_real
    return counts.float() / n_real, mean_prob


def _real_tokens(token_mask: object, n_tokens: int) -> torch.Tensor:
    """token_mask (B, T) bool flattened to the (N,) flags of the layers' N routed tokens, checked against them."""
    if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
        raise TypeError(f"token_mask must be a bool tensor (True at real tokens), got "
                        f"{getattr(token_mask, 'dtype', type(token_mask).__name__)}")
    if token_mask.dim() != 2 or token_mask.numel() != n_tokens:
        raise ValueError(f"token_mask must be (B, T), one flag per routed token ({n_tokens}); "
                         f"got shape {tuple(token_mask.shape)}")
    return token_mask.reshape(-1)
