"""torch.distributed setup for the trainer: torchrun detection, process groups, DDP / FSDP2 wrapping.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) each process joins a process group: nccl on
GPUs, gloo on CPUs. Without those variables everything runs in one process, unwrapped.
Checkpoints go through whole (unsharded) state dicts: gathered to be saved, and on resuming an FSDP2 model read
by rank 0 alone and broadcast into the shards (load_checkpoint_for, load_full_state_dicts).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, plots and writes files."""
        return self.rank == 0


def detect() -> DistInfo:
    """The torchrun environment, or a single process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {e}") from e
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world}), got {rank}")
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def pick_device(requested: str, info: DistInfo) -> torch.device:
    """"auto": this process's GPU (cuda:LOCAL_RANK) when there is one, else the CPU. Under torchrun "cuda" is
    cuda:LOCAL_RANK too, and "cuda:N" is refused where the process sees more than one GPU: it would put every
    rank on GPU N. (A rank shown its own GPU alone, by a CUDA_VISIBLE_DEVICES of its own, names it "cuda:0".)"""
    if requested == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    device = parse_device("cuda" if requested == "auto" else requested)
    if device.type == "cuda" and device.index is not None and info.is_distributed and torch.cuda.device_count() > 1:
        raise ValueError(f"device={requested!r} names one GPU, but under torchrun (WORLD_SIZE={info.world_size}) "
                         f"each process's LOCAL_RANK picks its own GPU: give device='cuda' or 'auto' (and "
                         f"CUDA_VISIBLE_DEVICES to choose which GPUs the run uses)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
        _check_gpu_index(device, f"LOCAL_RANK={info.local_rank} (device={requested!r}) is this process's GPU, but ")
    return device


def parse_device(requested: str | torch.device) -> torch.device:
    """The torch.device that `requested` names; a ValueError naming it when torch knows no such device
    (torch's own error is a RuntimeError, or an AssertionError at the first use of CUDA where there is none)."""
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {requested!r}") from err
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu, ...: torch knows them, llmkern runs on neither
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {str(requested)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(requested)!r} asked for, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None:
        _check_gpu_index(device, f"device {str(requested)!r} asked for, but ")
    return device


def _check_gpu_index(device: torch.device, what: str) -> None:
    count = torch.cuda.device_count()
    if device.index >= count:
        raise ValueError(f"{what}this machine has {count} GPU{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group (once) when running under torchrun."""
    if not info.is_distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                            device_id=device if device.type == "cuda" else None)


def shutdown(wait_for_others: bool = True) -> None:
    """Leave the process group; by default once every rank is done with it (no collective left in
    flight). After an error, wait_for_others=False: the other ranks may never get there."""
    if dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        wait_for_gloo_workers()
        dist.destroy_process_group()


GLOO_WORKER = "pt_gloo_runloop"  # the name torch gives gloo's worker threads


def wait_for_gloo_workers(timeout: float = 10.0, quiet: float = 0.01, poll: float = 0.001) -> None:
    """Sleep, the GIL released, until no gloo worker thread of this process has run or waited for a CPU
    for `quiet` seconds (at most `timeout`). Linux (reads /proc); elsewhere it returns at once.

    Why: a gloo worker wakes the thread waiting on a collective before it frees the collective, and a
    barrier keeps the collectives not yet freed when it was called (save()'s all_gather_object) until it
    is freed itself. Freeing a tensor that Python has dropped meanwhile takes the GIL. A worker that a busy
    CPU holds back past shutdown() does that too late: during interpreter shutdown, where Python ends the
    thread inside a C++ destructor ("terminate called without an active exception", SIGABRT after all work
    was done; FSDP2 keeps the group alive that long), or while the main thread, holding the GIL, joins it
    in the group's destructor (a hang; DDP frees the group with the model). `quiet` is twice Python's
    5 ms switch interval: a worker that waited for the GIL while we looked has it by then."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return

    def busy() -> bool:
        for tid in os.listdir(tasks):
            try:
                with open(f"{tasks}/{tid}/comm") as f:
                    if f.read().strip() != GLOO_WORKER:
                        continue
                with open(f"{tasks}/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]  # the field after "(comm)"
            except OSError:  # the thread ended meanwhile
                continue
            if state in ("R", "D"):  # running or runnable, or in the kernel: not idle
                return True
        return False

    start = quiet_since = time.monotonic()
    while (now := time.monotonic()) - quiet_since < quiet and now - start < timeout:
        time.sleep(poll)
        if busy():
            quiet_since = time.monotonic()


def wrap(model: nn.Module, info: DistInfo, device: torch.device, parallel: str) -> nn.Module:
    """DDP, or FSDP2 (fully_shard on every block of each ModuleList, then the whole model)."""
    if not info.is_distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")


def is_sharded(model: nn.Module) -> bool:
    """Whether fully_shard (FSDP2) was applied to the model: its parameters are DTensor shards."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients of `params` to a global L2 norm of max_norm (math.inf: only measure it); the
    norm before clipping, a 0-d tensor on the gradients' device. With FSDP2 the gradients are DTensor
    shards: torch reduces the norm over the ranks, so every rank gets the norm of the whole model's
    gradients."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return norm


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer):
    """(model state, optimizer state) of an FSDP2-sharded model, whole (unsharded) and on the CPU, as one
    process's would be (the optimizer's keyed by parameter name). A collective: every rank calls it; only
    rank 0 gets the tensors. Other models: their own state_dicts."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def load_checkpoint_for(path: str, model: nn.Module, info: DistInfo, device: torch.device | None):
    """The checkpoint at `path` (a checkpoint.Checkpoint) as this rank needs it to resume `model`, for
    load_full_state_dicts: whole, on every rank; but when `model` is FSDP2-sharded, whole on rank 0 alone and
    without weights or optimizer state elsewhere (their meta.json and own RNG states: one copy of the
    training state in the job's host memory, not one per rank). Then a collective: when rank 0 cannot read it
    (missing, damaged: rank 0 alone checks the files' hashes), every rank stops (fail_together), rather than
    the others waiting for its broadcast. device: fail_together's."""
    from . import checkpoint as ckpt

    if not is_sharded(model):
        return ckpt.load_checkpoint(path)
    state = None
    with fail_together(info, device, f"reading the checkpoint {path}"):
        state = ckpt.load_checkpoint(path) if info.is_main else ckpt.load_checkpoint_without_weights(path, info.rank)
    return state


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optimizer_state: dict) -> None:
    """Load whole state dicts (full_state_dicts') into a model and its optimizer. The checkpoint may come
    from another number of processes or another `parallel` (one process's, DDP's or FSDP2's state dicts).

    An FSDP2-sharded model: a collective. Rank 0 passes the whole state dicts and the other ranks empty ones
    ({}, as load_checkpoint_for gives them; theirs are not read): rank 0 broadcasts each tensor in turn and
    every rank keeps its shard of it. When rank 0's optimizer state does not fit the model, every rank stops."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())
    keyed = {}
    # rank 0's alone, before its first broadcast: the other ranks must not wait there for it
    with fail_together(info, None, "matching the checkpoint's optimizer state to the model's parameters"):
        if info.is_main:
            check = getattr(optimizer, "check_state_dict", None)  # MuonWithAdamW's: set_optimizer_state_dict
            if check is not None:  # loads its two optimizers itself, past its own checks
                check(optimizer_state)
            keyed = _keyed_by_name(model, optimizer, optimizer_state)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    # Two calls, not set_state_dict: it takes an empty model state (the other ranks') for "the optimizer
    # alone", so they would skip the model's broadcasts that rank 0 makes
    set_optimizer_state_dict(model, optimizer, keyed, options=options)
    set_model_state_dict(model, model_state, options=options)


def _keyed_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> dict:
    """An optimizer state_dict keyed by parameter name, as set_state_dict reads it (and get_state_dict
    writes it). A checkpoint of one process, or of DDP, keys its parameters by their index in the param
    groups: set_state_dict would fail on those (KeyError 'state.0.step'). The param groups of both come
    from the model's optimizer_groups, so the i-th saved parameter is this optimizer's i-th."""
    saved = [key for group in optimizer_state["param_groups"] for key in group["params"]]
    if all(isinstance(key, str) for key in saved):
        return optimizer_state
    names = {id(p): name for name, p in model.named_parameters()}
    ours = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(saved) != len(ours):
        raise ValueError(f"the checkpoint's optimizer state has {len(saved)} parameters, this model's optimizer "
                         f"{len(ours)}: it was saved for another model")
    name_of = dict(zip(saved, ours))
    return {"state": {name_of[key]: value for key, value in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [name_of[key] for key in group["params"]]}
                             for group in optimizer_state["param_groups"]]}


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over the ranks (itself in one process)."""
    if info.is_distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()


@contextlib.contextmanager
def fail_together(info: DistInfo, device: torch.device | None, what: str):
    """Run the block (work that some ranks do alone, as rank 0 writing a checkpoint), then wait for every
    rank like a barrier; when the block raised on any rank, every rank raises: a rank that failed its own
    error, the others a RuntimeError naming the failed ranks. Why: after a plain barrier, or none, the
    other ranks waited at the next collective for a rank that had given up: forever on nccl, or until it
    exited on gloo, with a "Connection closed by peer" that says nothing of the cause. device: where the
    flags are reduced; None: the process group's (this process's GPU for nccl, the CPU for gloo), for
    callers that hold no model."""
    error = None
    try:
        yield
    except Exception as err:
        error = err
    ranks = []
    if info.is_distributed:
        failed = torch.zeros(info.world_size, dtype=torch.int32, device=_group_device() if device is None else device)
        failed[info.rank] = error is not None
        dist.all_reduce(failed, op=dist.ReduceOp.SUM)
        ranks = [rank for rank, flag in enumerate(failed.tolist()) if flag]
    if error is not None:
        raise error
    if ranks:
        raise RuntimeError(f"{what} failed on rank{'s' if len(ranks) > 1 else ''} "
                           f"{', '.join(map(str, ranks))} (its log has the error): rank {info.rank} stops too")


def _group_device() -> torch.device:
    """The device the process group's collectives take tensors on: nccl only GPU tensors (this process's
    GPU, which init set), gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
