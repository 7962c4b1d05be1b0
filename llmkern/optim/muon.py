"""Muon for a transformer's hidden matrices, llmkern's AdamW for everything else, as one optimizer.

Muon (Keller Jordan's) steps a weight matrix with the momentum of its gradient made nearly orthogonal by a
Newton-Schulz iteration. It suits the matrices inside the transformer blocks; the embeddings, the LM head, norm
scales and biases step with AdamW, as the Muon authors advise. With adjust_lr_fn="match_rms_adamw" (Moonshot's
"Muon is Scalable for LLM Training") each matrix's update is scaled by 0.2 * sqrt(max(rows, cols)) to the RMS of
an AdamW update, so the AdamW learning rate and weight decay carry over unchanged.

Muon here is llmkern's own: torch.optim.Muon's step (momentum, Nesterov, decoupled weight decay, lr adjustment and
Newton-Schulz iteration, the same numbers for a plain matrix) on the row blocks of each parameter, the projections
a fused matrix holds, rather than on the parameter whole:
- attention's fused qkv (n_head * head_dim rows of q, then n_kv_head * head_dim of k and of v) steps as q, k and v
  apart, as a model with separate projections (transformers' Llama, Moonshot's Moonlight) does;
- a gated MLP's fused gate_up (SwiGLU's, GeGLU's) as gate and up apart;
- an MoE layer's stacked expert weights (E, rows, cols) as E matrices, each expert's gate_up again as gate and up;
and each block's update has the RMS scale of the block's own shape. Blocks of one shape, across parameters and
experts, run through one batched Newton-Schulz chain (bmm/baddbmm over their stack).

What steps with Muon (muon_parameters, which says each parameter's blocks): every 2-D trainable parameter of the
model's transformer blocks (model.blocks) and the expert stacks of their MoE layers (llmkern.nn.MoEMLP). The blocks
come from the modules that own the matrices (llmkern.nn's CausalSelfAttention, GatedMLP and MoEMLP), not from
their shapes; any other matrix is one block.

MuonWithAdamW holds a Muon and an llmkern.optim.AdamW and shows them as one optimizer: param_groups (Muon's first),
step, zero_grad, state_dict and load_state_dict, so a trainer, gradient clipping, loss scaling and checkpoints see
one optimizer. Its state_dict is the one a single torch optimizer over those groups would have (parameters
numbered across both), so checkpoints store it as any other.

Under FSDP2 (fully_shard) each parameter is a DTensor sharded on dim 0, and a process holds a slice of the rows of
each matrix (of the experts of an expert stack), torch.chunk's split, the last processes' slices shorter or empty.
Muon then keeps the momentum of the local slice (elementwise, as the weight decay), and splits the Newton-Schulz
work: each parameter has an owner process (the largest parameters first, each to the least loaded), which gathers
its whole bfloat16 update from the slices, orthogonalizes its blocks whole (batched by shape with its other
parameters') and sends each process the rows it holds, to add to its slice: the same numbers as one process's step
on the same gradients. Two all_to_all exchanges a step; each process orthogonalizes 1 / world of the matrices and
holds the whole updates of those alone (an all-gather of every update to every process would move world / 2 times
the bytes, and hold and orthogonalize all of them on each).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from ..nn import CausalSelfAttention, GatedMLP, MoEMLP
from .adamw import AdamW

# Keys a group of each part has: a state_dict whose groups lack them was saved by another optimizer
_MUON_GROUP_KEYS = ("momentum", "nesterov", "ns_steps", "adjust_lr_fn")
_ADAMW_GROUP_KEYS = ("betas", "eps")
# The key of a Muon group that a torch.optim.Muon's (the Muon part of llmkern's versions before this one) lacks
_ROW_BLOCKS = "row_blocks"

# torch.optim.Muon's defaults (Keller Jordan's quintic Newton-Schulz coefficients and steps)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7
_ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
# The most elements one batched Newton-Schulz chain takes (each of its few temporaries is as large): a stack of the
# blocks of one shape over a big model's layers would otherwise hold gigabytes at once
_MAX_STACK_ELEMENTS = 1 << 28


class MuonParameter(NamedTuple):
    """A parameter Muon steps, and how: each block of row_blocks is orthogonalized apart.

    row_blocks: the rows of each projection the matrix holds, top to bottom (their sum: its rows); for a stack of
    expert matrices (E, rows, cols), those of each expert's matrix. (rows,): the matrix is one block.
    """

    name: str
    param: nn.Parameter
    row_blocks: tuple[int, ...]


def muon_parameters(model: nn.Module) -> list[MuonParameter]:
    """The parameters Muon steps, in the model's order, each with its row blocks: the 2-D trainable parameters of
    the model's transformer blocks (model.blocks), and the stacked expert weights of their MoE layers.

    The blocks come from the modules that own the matrices: CausalSelfAttention's qkv.weight is (q, k, v), of
    n_head, n_kv_head and n_kv_head heads of head_dim rows; GatedMLP's gate_up.weight (gate, up), of hidden rows
    each; MoEMLP's gate_up (E, 2 * hidden, n_embd) the same in each expert, its proj (E, n_embd, hidden) one block
    per expert. Every other matrix is one block."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"model must have its transformer blocks in a ModuleList `blocks` (as llmkern's GPT), got "
                        f"{type(model).__name__} without one")
    known = _known_row_blocks(blocks)
    chosen = []
    for name, p in blocks.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in known:
            chosen.append(MuonParameter(f"blocks.{name}", p, known[id(p)]))
        elif p.dim() == 2:
            chosen.append(MuonParameter(f"blocks.{name}", p, (p.size(0),)))
    return chosen


def _known_row_blocks(blocks: nn.Module) -> dict[int, tuple[int, ...]]:
    """The row blocks of the fused matrices and expert stacks of llmkern.nn's modules in `blocks`, by id of the
    parameter (an expert stack in it steps with Muon; any other 3-D parameter with AdamW)."""
    known = {}
    for module in blocks.modules():
        if isinstance(module, CausalSelfAttention):
            q_rows, kv_rows = module.n_head * module.head_dim, module.n_kv_head * module.head_dim
            known[id(module.qkv.weight)] = (q_rows, kv_rows, kv_rows)
        elif isinstance(module, GatedMLP):
            known[id(module.gate_up.weight)] = (module.hidden, module.hidden)
        elif isinstance(module, MoEMLP):
            known[id(module.gate_up)] = (module.hidden, module.hidden)
            known[id(module.proj)] = (module.proj.size(-2),)
    return known


def split_groups(groups: list[dict], muon_params: Iterable[MuonParameter | nn.Parameter]) -> list[dict]:
    """AdamW parameter groups (a model's optimizer_groups) less the parameters in muon_params; a group left
    empty goes."""
    taken = {id(_unwrapped(p)) for p in muon_params}
    rest = [{**group, "params": [p for p in group["params"] if id(p) not in taken]} for group in groups]
    return [group for group in rest if group["params"]]


def _unwrapped(entry: MuonParameter | nn.Parameter) -> torch.Tensor:
    return entry.param if isinstance(entry, MuonParameter) else entry


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's step on each row block of each parameter, the blocks of one shape batched.

    params: MuonParameters (muon_parameters(model)), whose row blocks step apart, or tensors, each one block (a
    3-D one: one per matrix of the stack), or param groups (dicts) of either. For a plain matrix the step is
    torch.optim.Muon's, the same numbers: the momentum buffer lerps to the gradient by 1 - momentum, the update
    is the gradient lerped to it by momentum (nesterov) or the buffer, the weight decays by lr * weight_decay,
    and each block moves by its Newton-Schulz orthogonalized update times lr adjusted to the block's shape
    (adjust_lr_fn "original" or None: sqrt(max(1, rows / cols)); "match_rms_adamw": 0.2 * sqrt(max(rows, cols))).

    Each group holds "row_blocks", a tuple of each of its parameters' blocks, so that a state_dict says how it
    stepped. A parameter may be a DTensor sharded on dim 0 over a 1-D mesh (FSDP2's): its owner process gathers
    its whole update for the iteration (_step_sharded), and its momentum buffer is a DTensor sharded as it is (see
    the module's docstring). Every process of the mesh must call step() with the same parameters holding gradients.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = NS_EPS, ns_steps: int = NS_STEPS, adjust_lr_fn: str | None = None) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn}
        _check_settings(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, with each parameter's row blocks taken from its MuonParameter (a tensor: one block) into the
        group's "row_blocks"."""
        entries = param_group["params"]
        entries = [entries] if isinstance(entries, (torch.Tensor, MuonParameter)) else list(entries)
        params = [_unwrapped(entry) for entry in entries]
        row_blocks = tuple(_row_blocks_of(entry) for entry in entries)
        for p, blocks in zip(params, row_blocks):
            _check_parameter(p, blocks)
        _check_settings(param_group)
        super().add_param_group({**param_group, "params": params, _ROW_BLOCKS: row_blocks})

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every parameter that has a gradient; returns closure()'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        """Momentum and weight decay per parameter (on the rows this process holds), then the orthogonalized
        update per block, the blocks of one shape batched for the Newton-Schulz iteration: here for plain
        tensors, by their owners for DTensors (_step_sharded)."""
        plain, sharded = [], []
        for p, row_blocks in zip(group["params"], group[_ROW_BLOCKS]):
            if p.grad is None:
                continue
            update = self._momentum_update(p, group).bfloat16()  # the iteration's dtype (torch's: bfloat16)
            _local(p).mul_(1 - group["lr"] * group["weight_decay"])
            (sharded if _is_dtensor(p) else plain).append(_Update(p, update, row_blocks))
        pairs = [pair for u in plain
                 for pair in zip(_row_split(u.update, u.row_blocks), _row_split(u.param, u.row_blocks))]
        for index, matrices, ortho in _orthogonalized([block_update for block_update, _ in pairs], group):
            pairs[index][1][matrices].add_(ortho, alpha=-_block_lr(group, ortho))
        if sharded:
            _step_sharded(sharded, group)

    def _momentum_update(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """The update before orthogonalization, of the rows this process holds (a DTensor's local shard):
        torch.optim.Muon's momentum, Nesterov's or plain. The buffer is p's kind (a DTensor sharded as p is, so a
        state_dict gathers it)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        buf, grad = _local(state["momentum_buffer"]), _local(p.grad)
        if buf.shape != grad.shape:  # a whole buffer loaded into a sharded parameter, not through a DTensor
            raise ValueError(f"the momentum buffer of a Muon parameter holds {tuple(buf.shape)} elements here, its "
                             f"gradient {tuple(grad.shape)}: load a sharded model's state_dict through torch."
                             f"distributed.checkpoint.state_dict (llmkern.train.distributed.load_full_state_dicts)")
        buf.lerp_(grad, 1 - group["momentum"])
        return grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, after checking that the state_dict's groups hold this optimizer's parameters (their count, and
        each momentum buffer's shape) split into the same blocks. A torch.optim.Muon's state_dict (its groups have
        no row_blocks) loads: its momentum buffers are per parameter, whatever the blocks."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state_dict has {len(saved_groups)} Muon param groups, this Muon "
                             f"{len(self.param_groups)}")
        for i, (saved, ours) in enumerate(zip(saved_groups, self.param_groups)):
            _check_saved_group(i, saved, ours, state_dict["state"])
        super().load_state_dict({**state_dict, "param_groups": [
            {**saved, _ROW_BLOCKS: ours[_ROW_BLOCKS]} for saved, ours in zip(saved_groups, self.param_groups)]})


def _row_blocks_of(entry: MuonParameter | torch.Tensor) -> tuple[int, ...]:
    if isinstance(entry, MuonParameter):
        return tuple(entry.row_blocks)
    if not isinstance(entry, torch.Tensor):
        raise TypeError(f"Muon's params must be MuonParameters or tensors, got {type(entry).__name__}")
    return (entry.size(-2),) if entry.dim() >= 2 else ()


def _check_parameter(p: torch.Tensor, row_blocks: tuple[int, ...]) -> None:
    """A 2-D matrix or a 3-D stack of them, a plain tensor, whose rows row_blocks splits."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"Muon's params must be tensors, got {type(p).__name__}")
    if p.dim() not in (2, 3):
        raise ValueError(f"Muon steps matrices (2-D) and stacks of them (3-D), got a parameter of shape "
                         f"{tuple(p.shape)}")
    if torch.is_complex(p):
        raise ValueError("Muon does not support complex parameters")
    if _is_dtensor(p):
        _check_sharding(p)
    if (not row_blocks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in row_blocks)
            or sum(row_blocks) != p.size(-2)):
        raise ValueError(f"row_blocks must be positive ints summing to the parameter's {p.size(-2)} rows, got "
                         f"{row_blocks} for a parameter of shape {tuple(p.shape)}")


def _check_settings(group: dict[str, Any]) -> None:
    """torch.optim.Muon's checks of a group's settings (those it sets)."""
    for name in ("lr", "weight_decay", "momentum"):
        if name in group and not 0.0 <= group[name]:
            raise ValueError(f"{name} must be >= 0, got {group[name]}")
    if group.get("adjust_lr_fn") not in _ADJUST_LR_FNS:
        raise ValueError(f"adjust_lr_fn must be one of {_ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}")
    if "ns_steps" in group and not 0 <= group["ns_steps"] < 100:
        raise ValueError(f"ns_steps must be in [0, 100), got {group['ns_steps']}")
    if "ns_coefficients" in group and len(group["ns_coefficients"]) != 3:
        raise ValueError(f"ns_coefficients must be 3 floats (a, b, c), got {group['ns_coefficients']!r}")


def _check_saved_group(index: int, saved: dict[str, Any], ours: dict[str, Any], state: dict) -> None:
    """That saved group `index` of a state_dict holds our group's parameters: as many, each momentum buffer of its
    parameter's shape, in the same row blocks (where it says)."""
    if len(saved["params"]) != len(ours["params"]):
        raise ValueError(f"Muon param group {index} of the state_dict has {len(saved['params'])} parameters, this "
                         f"optimizer's {len(ours['params'])}: saved for another model")
    for position, (key, p) in enumerate(zip(saved["params"], ours["params"])):
        buf = state.get(key, {}).get("momentum_buffer")
        if buf is not None and tuple(buf.shape) != tuple(p.shape):
            raise ValueError(f"the state_dict's momentum buffer of Muon parameter {position} is "
                             f"{tuple(buf.shape)}, the parameter {tuple(p.shape)}: saved for another model")
    if _ROW_BLOCKS in saved:
        blocks = tuple(tuple(b) for b in saved[_ROW_BLOCKS])  # lists when read back from JSON
        if blocks != ours[_ROW_BLOCKS]:
            raise ValueError(f"Muon param group {index} of the state_dict splits its matrices into the row blocks "
                             f"{blocks}, this optimizer into {ours[_ROW_BLOCKS]}: saved for another model")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "full_tensor")  # without importing torch.distributed, which a build may lack


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: writing it writes the DTensor), or the tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _check_sharding(p: torch.Tensor) -> None:
    """A DTensor parameter must be sharded as FSDP2's fully_shard shards it: on dim 0, over a 1-D mesh. Other
    layouts (tensor parallel, HSDP's 2-D mesh) would need another gather, and are refused rather than stepped
    wrongly."""
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise ValueError(f"Muon steps a DTensor parameter sharded on dim 0 over a 1-D device mesh (FSDP2's "
                         f"fully_shard), got placements {tuple(p.placements)} over a {p.device_mesh.ndim}-D mesh")


def _held_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The part of p this process holds (and steps), and the index of its first row along p's dim 0: p itself and
    0 for a plain tensor; for a DTensor sharded on dim 0, its local shard, this process's chunk of torch.chunk's
    split (ceil(rows / processes) rows each, the last processes' fewer or none)."""
    if not _is_dtensor(p):
        return p, 0
    held = p.to_local()
    chunk = -(-p.size(0) // p.device_mesh.size())
    start = min(p.device_mesh.get_local_rank() * chunk, p.size(0))
    if held.size(0) != min(chunk, p.size(0) - start):
        raise RuntimeError(f"a DTensor of {p.size(0)} rows over {p.device_mesh.size()} processes holds "
                           f"{held.size(0)} here, not torch.chunk's share from row {start}: an unknown sharding")
    return held, start


class _Update(NamedTuple):
    """A parameter's update before orthogonalization: of the rows this process holds (a DTensor's local ones)."""

    param: torch.Tensor
    update: torch.Tensor
    row_blocks: tuple[int, ...]


def _block_lr(group: dict[str, Any], ortho: torch.Tensor) -> float:
    """The learning rate of a block's orthogonalized update ortho (E, rows, cols), adjusted to its shape."""
    return adjusted_lr(group["lr"], group["adjust_lr_fn"], ortho.size(-2), ortho.size(-1))


def _orthogonalized(updates: list[torch.Tensor],
                    group: dict[str, Any]) -> Iterator[tuple[int, slice, torch.Tensor]]:
    """(index, matrices, their orthogonalized update) for the matrices of each block update (E, rows, cols) of
    `updates`, in bfloat16: the blocks of one shape in batched stacks of at most _MAX_STACK_ELEMENTS elements (one
    Newton-Schulz chain each; a matrix larger alone is a stack of one), a block of many experts cut across stacks
    where it alone is larger."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index, update in enumerate(updates):
        by_shape.setdefault(tuple(update.shape[1:]), []).append(index)
    for (rows, cols), indices in by_shape.items():
        max_matrices = max(1, _MAX_STACK_ELEMENTS // (rows * cols))
        pieces = [(i, matrices) for i in indices for matrices in _runs(updates[i].size(0), max_matrices)]
        for chunk in _chunks(pieces, [_length(matrices) for _, matrices in pieces], max_matrices):
            stack = torch.cat([updates[i][matrices] for i, matrices in chunk])
            ortho = newton_schulz(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
            parts = ortho.split([_length(matrices) for _, matrices in chunk])
            yield from ((i, matrices, part) for (i, matrices), part in zip(chunk, parts))


def _runs(count: int, most: int) -> list[slice]:
    """range(count) in consecutive slices of at most `most`."""
    return [slice(start, min(start + most, count)) for start in range(0, count, most)]


def _length(run: slice) -> int:
    return run.stop - run.start


class _ShardLayout(NamedTuple):
    """How dim 0 of a DTensor parameter is split over the processes: chunks of `rows` rows (torch.chunk's), each
    `numel` elements when padded to that size (the last processes' hold fewer rows, or none)."""

    rows: int
    numel: int


def _shard_layout(p: torch.Tensor, world: int) -> _ShardLayout:
    rows = -(-p.size(0) // world)
    return _ShardLayout(rows, rows * (p.numel() // p.size(0)))


def _owners(sizes: list[int], world: int) -> list[int]:
    """The process that orthogonalizes each parameter, of sizes[i] elements: the largest first, each to the
    process with the fewest elements so far (the lowest rank on a tie); the same on every process."""
    loads, owners = [0] * world, [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner = min(range(world), key=lambda rank: loads[rank])
        owners[index] = owner
        loads[owner] += sizes[index]
    return owners


def _padded(rows: torch.Tensor, count: int) -> torch.Tensor:
    """rows (n, ...) with zero rows below to count rows."""
    if rows.size(0) == count:
        return rows
    return torch.cat([rows, rows.new_zeros(count - rows.size(0), *rows.shape[1:])])


def _step_sharded(updates: list[_Update], group: dict[str, Any]) -> None:
    """The orthogonalized step of DTensor parameters sharded on dim 0 (FSDP2's), the work split: each parameter has
    an owner (_owners, balanced by size), which gathers its whole update, orthogonalizes its blocks (with those of
    its other parameters, batched by shape) and sends each process back the rows it holds, which it adds to its
    shard. Two all_to_all exchanges a step, of the bfloat16 updates (padded to torch.chunk's chunks): each process
    sends, and receives, about 2 * 2 * (world - 1) / world**2 bytes a parameter, where an all-gather of every
    update to every process would have it receive 2 * (world - 1) / world; and it orthogonalizes 1 / world of the
    matrices.
    """
    import torch.distributed as dist

    mesh = updates[0].param.device_mesh
    if any(u.param.device_mesh != mesh for u in updates):
        raise ValueError("Muon's DTensor parameters of one param group must share one device mesh")
    world, rank = mesh.size(), mesh.get_local_rank()
    layouts = [_shard_layout(u.param, world) for u in updates]
    owners = _owners([u.param.numel() for u in updates], world)
    order = sorted(range(len(updates)), key=lambda i: owners[i])  # by owner, in the group's order for each
    send = torch.cat([_padded(updates[i].update, layouts[i].rows).flatten() for i in order])
    sent_to = [sum(layouts[i].numel for i in order if owners[i] == owner) for owner in range(world)]
    mine = [i for i in order if owners[i] == rank]
    # from each process, its chunk of each of my parameters in turn: a (world, my chunks) table
    received = send.new_empty(world * sent_to[rank])
    dist.all_to_all_single(received, send, [sent_to[rank]] * world, sent_to, group=mesh.get_group())
    _orthogonalize_owned([updates[i] for i in mine], [layouts[i] for i in mine], received.view(world, sent_to[rank]),
                         group)
    returned = torch.empty_like(send)
    dist.all_to_all_single(returned, received, sent_to, [sent_to[rank]] * world, group=mesh.get_group())
    for i, ortho_rows in zip(order, returned.split([layouts[i].numel for i in order])):
        held, start = _held_rows(updates[i].param)
        ortho_rows = ortho_rows.view(layouts[i].rows, *held.shape[1:])[:held.size(0)]
        for index, (rows, cols) in _held_blocks(updates[i].param, start, held.size(0), updates[i].row_blocks):
            held[index].add_(ortho_rows[index], alpha=-adjusted_lr(group["lr"], group["adjust_lr_fn"], rows, cols))


def _orthogonalize_owned(updates: list[_Update], layouts: list[_ShardLayout], table: torch.Tensor,
                         group: dict[str, Any]) -> None:
    """Replace each whole update in table (world, the chunks of updates' parameters in turn: each process's
    rows of them) by its orthogonalized update, block by block."""
    world, wholes, offset = table.size(0), [], 0
    for u, layout in zip(updates, layouts):
        chunks = table[:, offset:offset + layout.numel]
        # the rows in order (a copy, but a view of table when it holds one parameter: then written in place)
        wholes.append((chunks, chunks.reshape(world * layout.rows, *u.param.shape[1:])))
        offset += layout.numel
    blocks = [block for u, (_, whole) in zip(updates, wholes)
              for block in _row_split(whole[:u.param.size(0)], u.row_blocks)]
    for index, matrices, ortho in _orthogonalized(blocks, group):
        blocks[index][matrices].copy_(ortho)  # its input was copied into the iteration's stack: the others' stay
    for chunks, whole in wholes:
        chunks.copy_(whole.view(world, -1))


def _held_blocks(p: torch.Tensor, start: int, held_rows: int,
                 row_blocks: tuple[int, ...]) -> list[tuple[tuple[slice, ...], tuple[int, int]]]:
    """Where each row block of p lies in the held_rows of p's dim 0 from `start` that a process holds: (the index
    of its part in them, the block's (rows, cols)). A stack's held matrices hold every block whole; a matrix's
    rows may cut a block, or miss it (an empty index)."""
    cols, tops = p.size(-1), [sum(row_blocks[:i]) for i in range(len(row_blocks))]
    if p.dim() == 3:
        return [((slice(None), slice(top, top + rows)), (rows, cols)) for top, rows in zip(tops, row_blocks)]
    held = []
    for top, rows in zip(tops, row_blocks):
        first = max(top, start)
        last = max(first, min(top + rows, start + held_rows))
        held.append(((slice(first - start, last - start),), (rows, cols)))
    return held


def _row_split(tensor: torch.Tensor, row_blocks: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Views (E, rows_i, cols) of each row block of a matrix (E = 1) or of each matrix of a stack (E, rows, cols)."""
    stack = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor
    return stack.split(row_blocks, dim=1)


def _chunks(pieces: list[Any], matrices: list[int], max_matrices: int) -> Iterable[list[Any]]:
    """pieces in consecutive runs of at most max_matrices matrices (matrices[k]: those of pieces[k]), at least one
    piece a run."""
    chunk, count = [], 0
    for piece, size in zip(pieces, matrices):
        if chunk and count + size > max_matrices:
            yield chunk
            chunk, count = [], 0
        chunk.append(piece)
        count += size
    if chunk:
        yield chunk


def adjusted_lr(lr: float, adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """The learning rate of a (rows, cols) block's orthogonalized update: torch.optim.Muon's adjustment."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    raise ValueError(f"adjust_lr_fn must be one of {_ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


def newton_schulz(stack: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """Each matrix of stack (n, rows, cols) made nearly orthogonal (U S' V^T, S' near 1), in bfloat16: torch.optim.
    Muon's quintic iteration over the whole stack at once, one bmm and two baddbmm a step.

    As torch's: a tall matrix is iterated transposed (the Gram matrix is the smaller side's), and each is first
    divided by its Frobenius norm (at least eps), which bounds its spectral norm by 1."""
    a, b, c = coefficients
    x = stack.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.mT if tall else x


class MuonWithAdamW:
    """llmkern's Muon over muon_params, llmkern's AdamW over adamw_groups, stepped together.

    Args:
        muon_params: the parameters for Muon, each with its row blocks (muon_parameters(model)); a plain tensor
            is one block.
        adamw_groups: parameter groups for AdamW (split_groups(model.optimizer_groups(wd), muon_params)).
        lr: AdamW's learning rate (each group's, unless it sets its own).
        muon_lr: Muon's learning rate; with adjust_lr_fn="match_rms_adamw" AdamW's lr suits it.
        weight_decay: Muon's decoupled weight decay (AdamW's groups carry their own).
        momentum: Muon's momentum (Nesterov).
        betas, eps, backend: AdamW's.
        adjust_lr_fn: Muon's (torch.optim.Muon's): "match_rms_adamw", "original" or None.

    Under FSDP2 (DTensor parameters) the AdamW part is torch.optim.AdamW (fused on GPUs), as the trainer's AdamW
    is there: llmkern's AdamW kernels take plain tensors. Its state_dict is llmkern's AdamW's (the same keys).
    Iterating a MuonWithAdamW yields its two torch optimizers: torch.distributed.checkpoint.state_dict's
    get_state_dict and set_optimizer_state_dict take an iterable of optimizers, so an FSDP2 checkpoint gathers
    and scatters both (its state_dict keyed by parameter name, Muon's groups first, as load_state_dict reads it).

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
            raise ValueError("muon_params is empty: the model has no block matrices for Muon")
        taken = {id(_unwrapped(p)) for p in muon_params}
        if any(id(p) in taken for group in adamw_groups for p in group["params"]):
            raise ValueError("a parameter is in both muon_params and adamw_groups: each must step once")
        self.muon = Muon([{"params": muon_params, "lr_scale": muon_lr / lr}], lr=muon_lr, weight_decay=weight_decay,
                         momentum=momentum, adjust_lr_fn=adjust_lr_fn)
        self.adamw = _adamw(adamw_groups, lr=lr, betas=betas, eps=eps, backend=backend)
        self.max_grad_norm = None  # the trainer clips and decides on the host (see the class docstring)

    def __iter__(self):
        """Muon, then the AdamW: the optimizers torch.distributed.checkpoint.state_dict gathers and loads."""
        return iter((self.muon, self.adamw))

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
        """Load a state_dict of state_dict()'s layout (also one read back from a checkpoint, keys as saved), after
        check_state_dict."""
        self.check_state_dict(state_dict)
        groups, state = state_dict["param_groups"], state_dict["state"]
        n_muon = len(self.muon.param_groups)
        muon_groups, adamw_groups = groups[:n_muon], groups[n_muon:]
        muon_keys = {key for group in muon_groups for key in group["params"]}
        self.muon.load_state_dict({"state": {k: v for k, v in state.items() if k in muon_keys},
                                   "param_groups": muon_groups})
        offset = self._muon_param_count()
        self.adamw.load_state_dict({
            "state": {_shifted(k, offset): v for k, v in state.items() if k not in muon_keys},
            "param_groups": [{**group, "params": [_shifted(k, offset) for k in group["params"]]}
                             for group in adamw_groups],
        })

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """ValueError unless state_dict is a MuonWithAdamW's for this optimizer's groups: as many, Muon's first,
        each with its kind's keys. One saved by llmkern's versions before this one (torch.optim.Muon: its Muon
        group has no row_blocks) passes where it holds the same parameters, a model without MoE layers: the
        momentum of a matrix is the same whatever its blocks. With MoE layers it is refused: those versions
        stepped the experts with AdamW. (FSDP2's checkpoint loading, which loads the two optimizers itself,
        calls this first: llmkern.train.distributed.load_full_state_dicts.)"""
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
        self._refuse_experts_stepped_with_adamw(groups[:n_muon])

    def _refuse_experts_stepped_with_adamw(self, muon_groups: list[dict]) -> None:
        """A state_dict of torch.optim.Muon's groups (no row_blocks), where this Muon steps expert stacks: the
        versions that saved it stepped the experts with AdamW, and their moments are no Muon momentum."""
        if all(_ROW_BLOCKS in group for group in muon_groups):
            return
        if any(p.dim() == 3 for group in self.muon.param_groups for p in group["params"]):
            raise ValueError("the state_dict was saved by an earlier llmkern MuonWithAdamW (torch.optim.Muon), which "
                             "stepped the MoE experts with AdamW; this one steps them with Muon, and their AdamW "
                             "moments are no Muon momentum. Start a fresh optimizer from the checkpoint's weights "
                             "(llmkern train --init_from=CHECKPOINT) instead of resuming")

    def _muon_param_count(self) -> int:
        return sum(len(group["params"]) for group in self.muon.param_groups)


def _adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
           backend: str | None) -> torch.optim.Optimizer:
    """llmkern's AdamW over plain tensors; torch's over DTensors (FSDP2's shards), fused on a GPU."""
    params = [p for group in groups for p in group["params"]]
    if any(_is_dtensor(p) for p in params):
        fused = all(p.device.type == "cuda" for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    return AdamW(groups, lr=lr, betas=betas, eps=eps, backend=backend)


def _shifted(key: Any, offset: int) -> Any:
    """An AdamW parameter's key in AdamW's own state_dict: its index less the Muon parameters before it
    (state_dict() numbers them after Muon's); a name (a sharded model's state_dict is keyed by parameter name,
    torch.distributed.checkpoint.state_dict's layout) as it is."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"the state_dict's parameters must be numbered (ints) or named (strs), got key {key!r}")
    return key - offset
