"""The supervised fine-tuning loop shared by the recipes (SFT, classification, DPO, reward model).

A recipe supplies what differs: the examples, a collate function that turns a list of them into a
batch of tensors, a loss function, and an optional evaluation. The loop supplies what is the same:
seeded shuffled epochs, gradient accumulation (fit's weigh: micro-batches weighed by what their loss is the mean
of, so that uneven ones step as one batch of them all), llmkern's AdamW over the trainable parameters (so
LoRA's frozen base is left alone) with the global-norm clip fused into the update, warmup + cosine
learning rate, autocast (bf16, or fp16 with dynamic loss scaling: an overflow halves the scale and skips
the step), skipping non-finite steps, JSONL metrics, charts and a progress bar, and
the training state saved every config.ckpt_interval steps so that config.resume continues a run that
stopped (a crash, a pre-empted job) with the same losses it would have had (bitwise on a CPU). A state kept
past the end (config.keep_train_state) is the end's: resuming a finished run trains nothing.

Under torchrun each process takes its own micro-batches (rank r the r-th of every world_size), the
gradients are averaged over the processes before each step, and rank 0 logs and writes files: a
step sees grad_accum * world_size micro-batches, as one process with world_size times the
accumulation would. config.parallel says how: "ddp" (every rank holds the whole model and optimizer
state; the gradients are all-reduced) or "fsdp" (a copy of the model sharded with FSDP2 as
`llmkern train --parallel=fsdp` shards it, so each rank holds 1/world_size of the weights, gradients
and optimizer state; torch's AdamW after a clip whose norm is reduced over the ranks, since llmkern's
AdamW kernels take plain tensors; the trained weights are gathered back into `model` at the end, so the
recipes save and use a whole model as they do after one process). The sharded copy is filled from rank 0's
`model` (shard_copy), so the other ranks' may be shapes without weights (on the meta device, as
load_base(whole_on_rank_0=True) gives them): those stay so, and rank 0 alone gets the trained weights.

    summary = fit(model, loss_fn, train_examples, collate, config, evaluate=evaluate)

loss_fn(model, batch) -> (loss, {name: float or 0-d tensor}) is called on each micro-batch (the
batch's tensors already on the model's device); the loss is what trains, and what is logged as "loss" unless
the metrics carry a "loss" of their own: for a mixture-of-experts model the recipes add its load-balancing
loss to the loss trained on, and log the recipe's loss alone as "loss", the load-balancing loss as "aux_loss"
(charted in aux_loss.png; see finetune.aux_loss);
evaluate(model) -> {name: float} runs before training, every config.eval_interval steps and at the end, in
eval mode under no_grad and autocast; name its validation loss "val_loss", which loss.png draws beside the
training loss.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .._modes import eval_mode
from ..train import checkpoint as ckpt
from ..train import distributed
from ..train.interrupt import StopOnSignal, TrainingInterrupted
from ..train.loss_scale import DynamicLossScale, unscale_
from ..train.metrics import CollectiveMetricsLog, MetricsLog, plot_metrics, read_metrics
from ..train.schedules import cosine_lr, warn_if_schedule_changed
from .config import canonical_lora_targets

MAX_BAD_STEPS = 5  # non-finite steps in a row before the run stops
# The methods besides forward by which the recipes run a model they train (GPT's, LastTokenHead's,
# RewardModel's): an FSDP2 root gathers its weights for these too (shard_copy).
FORWARD_METHODS = ("hidden_states", "hidden_states_with_aux_loss", "head_outputs_with_aux_loss",
                   "scores_with_aux_loss")
TRAIN_STATE = "train_state"  # out_dir/train_state/checkpoints/step_N: what resume continues from


def train_state_dir(config) -> str:
    """Where a run's training state (for resume) lives: out_dir/train_state."""
    return os.path.join(config.out_dir, TRAIN_STATE)


def drop_train_state(config) -> None:
    """After a run's final model is saved: delete its training state, unless config.keep_train_state.
    Under torchrun every rank calls it; rank 0 deletes."""
    info = distributed.detect()
    # rank 0's alone: when it fails, the other ranks must not wait for it at the next collective
    with distributed.fail_together(info, None, "deleting the training state"):
        if info.is_main and not config.keep_train_state:
            shutil.rmtree(train_state_dir(config), ignore_errors=True)


class FinetuneDiverged(RuntimeError):
    """The loss or gradient norm was NaN/inf for MAX_BAD_STEPS steps in a row."""


def total_steps(num_examples: int, config, world_size: int = 1) -> int:
    """Optimizer steps of a run: config.max_steps, or enough for config.epochs passes.

    The micro-batches run on from one epoch into the next (micro_batches), so a step's accumulation group
    may span two epochs: the steps are counted over all the epochs' micro-batches together, rounded up once.
    Rounding up each epoch would take up to a step per epoch more than the passes hold (training on into
    further epochs, with the schedule stretched over them)."""
    if config.max_steps > 0:
        return config.max_steps
    micro_batches = config.epochs * math.ceil(num_examples / config.batch_size)
    return max(1, math.ceil(micro_batches / (config.grad_accum * world_size)))


def warn_if_warmup_outlasts(config, steps: int) -> None:
    """Say when config.warmup_steps is longer than the run's `steps`: the learning rate never reaches config.lr
    nor decays. Not refused: short trial runs keep the default warmup. (A fine-tuning run cannot be extended by
    a resume, which refuses another step count, so it never will.)"""
    if config.warmup_steps <= steps:
        return
    how = f"max_steps={config.max_steps}" if config.max_steps > 0 else f"epochs={config.epochs} over the examples"
    warnings.warn(f"warmup_steps={config.warmup_steps} is longer than the run's {steps} steps ({how}): the learning "
                  f"rate ends at {cosine_lr(steps - 1, config.lr, config.min_lr, config.warmup_steps, steps):.4g}, "
                  f"never reaching lr={config.lr:g}; lower warmup_steps", stacklevel=3)


def micro_batches(examples: Sequence[Any], batch_size: int, seed: int):
    """Endless lists of batch_size examples: each epoch a new seeded shuffle, the last batch may be short."""
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]
        epoch += 1


def rank_share(batches, info: distributed.DistInfo):
    """This process's micro-batches: of every world_size consecutive ones, the rank-th."""
    while True:
        group = [next(batches) for _ in range(info.world_size)]
        yield group[info.rank]


def average_gradients(params: Sequence[nn.Parameter], info: distributed.DistInfo) -> None:
    """Every parameter's gradient averaged over the processes (all-reduces in flight together)."""
    if not info.is_distributed:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    for work in [dist.all_reduce(g, async_op=True) for g in grads]:
        work.wait()
    for g in grads:
        g.div_(info.world_size)


def check_parallel(config, info: distributed.DistInfo | None = None) -> None:
    """ValueError unless config.parallel can run here: "fsdp" shards over the processes of a torchrun job."""
    info = info or distributed.detect()
    if config.parallel == "fsdp" and not info.is_distributed:
        raise ValueError("parallel='fsdp' shards the model over the processes of a torchrun job; start it with "
                         "`torchrun --nproc_per_node=N -m llmkern finetune ...` (N >= 2) or use parallel='ddp'")


def shard_copy(model: nn.Module, info: distributed.DistInfo, device: torch.device) -> nn.Module:
    """A copy of `model` sharded with FSDP2 (every transformer block, then the whole model, as pretraining
    does) on `device`, to train in its place, holding rank 0's weights; `model` waits on the CPU meanwhile
    (gather_into brings the trained weights back).

    No rank makes a whole copy: the copy is built on the meta device (modules and shapes), sharded, given
    empty shards on `device`, and filled from rank 0's `model`, one tensor at a time. So the other ranks' `model`
    may hold no weights at all (on the meta device, as load_base(whole_on_rank_0=True) gives it under fsdp).

    A copy, since FSDP2 turns a module's parameters into shards for good, and the recipes go on with a whole
    model after training (merging LoRA, saving, answering on rank 0 alone). Frozen parameters (LoRA's base)
    are sharded too, beside the trainable adapters in the same units: FSDP2 reduces only the gradients there
    are. The recipes' other entry points (FORWARD_METHODS: GPT.hidden_states for the log-probs of DPO and of
    evaluations, the *_with_aux_loss training passes) run like forward: they gather the root's weights
    (embeddings, final norm, LM head, a head), which stay gathered through GPT.head and until the backward."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )
    from torch.distributed.fsdp import register_fsdp_forward_method

    if not is_on_meta(model):
        model.to("cpu")  # frees the device for the shards: only the copy trains
    twin = distributed.wrap(meta_copy(model), info, device, "fsdp")
    twin.to_empty(device=device)  # RoPE's tables, held by no state dict, rebuild themselves here (RotaryCache._apply)
    # rank 0's weights, also where every rank holds them (the same, from the same base and seed); persistent
    # buffers too. Its trainable parameters that were made after loading (LoRA's A, a head) are rank 0's draws.
    set_model_state_dict(twin, model.state_dict() if info.is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name in FORWARD_METHODS:
        if callable(getattr(twin, name, None)):
            register_fsdp_forward_method(twin, name)
    return twin


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` (its modules, settings and which parameters train) whose parameters and buffers are on
    the meta device: shapes without weights, whatever device `model` is on. Tied parameters stay tied."""
    memo: dict[int, Any] = {}
    for tensor in model.parameters():
        memo[id(tensor)] = nn.Parameter(torch.empty_like(tensor, device="meta"), requires_grad=tensor.requires_grad)
    for tensor in model.buffers():
        memo[id(tensor)] = torch.empty_like(tensor, device="meta")
    return copy.deepcopy(model, memo)  # the memo stands in for every tensor: none is copied


def is_on_meta(model: nn.Module) -> bool:
    """Whether the model's parameters are on the meta device (shapes without weights: load_base's model on a
    rank other than 0 with whole_on_rank_0 under parallel="fsdp")."""
    return any(p.is_meta for p in model.parameters())


def gather_into(model: nn.Module, twin: nn.Module, device: torch.device) -> None:
    """Load the whole weights of a shard_copy twin into `model` and move it back to `device`, on the ranks
    whose `model` holds weights; a `model` on the meta device (a rank other than 0 under
    load_base(whole_on_rank_0=True)) stays there. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    # one choice on every rank: when a rank holds no whole model, rank 0 alone gathers (into its host memory)
    everywhere = _held_on_every_rank(model, device)
    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    whole = get_model_state_dict(twin, options=options)  # {} on the ranks other than 0 with cpu_offload
    if is_on_meta(model):
        model.train(twin.training)
        return
    model.load_state_dict(whole)
    model.to(device).train(twin.training)


def _held_on_every_rank(model: nn.Module, device: torch.device) -> bool:
    """Whether every rank's `model` holds weights (none on the meta device)."""
    import torch.distributed as dist

    held = torch.tensor([0 if is_on_meta(model) else 1], device=device)
    dist.all_reduce(held, op=dist.ReduceOp.MIN)
    return bool(held.item())


def training_device(model: nn.Module, config) -> torch.device:
    """Where fit trains: the model's device; under parallel="fsdp", where the shards go, config.device (this
    rank's GPU under torchrun with "auto"), since load_base(whole_on_rank_0=True) leaves the model on rank 0's CPU
    and on the meta device elsewhere."""
    if config.parallel == "fsdp":
        return distributed.pick_device(config.device, distributed.detect())
    return next(model.parameters()).device


def data_parallel_setup(device: torch.device) -> distributed.DistInfo:
    """The torchrun environment (one process without it), its process group joined."""
    info = distributed.detect()
    distributed.init(info, device)
    return info


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor in it (in dicts, lists and tuples) moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def autocast_context(config, device: torch.device):
    """bf16 autocast on a GPU (dtype "auto" or "bfloat16"), fp16 with "float16"; none on a CPU with "auto"."""
    if config.dtype == "float16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(params: Sequence[nn.Parameter], config, sharded: bool = False):
    """llmkern's AdamW: weight decay on matrices only; clipping (or, with grad_clip=0, just the skip of a
    non-finite step) fused into the update. sharded (FSDP2's DTensor parameters, which llmkern's kernels do
    not take): torch's AdamW with the same settings, clipped by optimizer_step."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if sharded:
        fused = params[0].device.type == "cuda"
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay,
                                 fused=fused)
    from ..optim import AdamW

    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
    return AdamW(groups, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay,
                 max_grad_norm=max_norm, backend=config.backend or None)


def optimizer_step(optimizer, trainable: Sequence[nn.Parameter], config, sharded: bool) -> float:
    """Clip and step (no step, parameters and moments untouched, when the norm is not finite); the global
    gradient norm. llmkern's AdamW does both itself; with FSDP2 the norm of the sharded gradients is
    reduced over the ranks first (as `llmkern train --parallel=fsdp` does), every rank getting the same."""
    if not sharded:
        optimizer.step()  # skips itself on a non-finite norm
        return float(optimizer.grad_norm)
    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
    grad_norm = float(distributed.clip_grad_norm(list(trainable), max_norm))
    if math.isfinite(grad_norm):
        optimizer.step()
    return grad_norm


def _accumulate_gradients(model: nn.Module, loss_fn, batches, collate, config, device: torch.device,
                          loss_scale: float = 1.0, weigh: Callable[[Any], Any] | None = None
                          ) -> tuple[float, dict[str, float]]:
    """Backward over config.grad_accum micro-batches (of the loss times loss_scale and the micro-batch's share of
    the step: micro_batch_weights); the step's mean loss and metrics, weighed so over the micro-batches and (under
    torchrun) the processes."""
    info = distributed.detect()
    micro = (collate(next(batches)) for _ in range(config.grad_accum))
    per_rank, weighed = micro_batch_weights(micro, weigh, config.grad_accum, info, device)
    totals: dict[str, torch.Tensor] = {}  # float64 sums on the device: the step reads them once, at the end
    loss_sum = torch.zeros((), device=device)
    for batch, weight in weighed:
        batch = to_device(batch, device)  # one micro-batch at a time on the device
        with autocast_context(config, device):
            loss, metrics = loss_fn(model, batch)
        (loss * (loss_scale * weight / per_rank)).backward()
        # the recipe's own loss where the one trained on adds more (a MoE model's aux term, finetune.aux_loss)
        loss_sum += torch.as_tensor(metrics.pop("loss", loss)).detach().float() * weight
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float64, device=device).detach() * weight
    sums = torch.stack([loss_sum.double(), *totals.values()])
    means = (distributed.all_reduce_mean(sums, info) / per_rank).tolist()
    return means[0], dict(zip(totals, means[1:]))


def micro_batch_weights(micro: Iterable[Any], weigh: Callable[[Any], Any] | None, grad_accum: int,
                        info: distributed.DistInfo, device: torch.device) -> tuple[float, Iterable[tuple[Any, float]]]:
    """(per_rank, (batch, weight) of each of a step's micro-batches): a micro-batch's loss counts weight / per_rank
    in the step's gradient (before the average over the ranks) and logged means. Without weigh every micro-batch
    weighs 1 and per_rank is grad_accum: a mean of the micro-batches' mean losses, collated one at a time. With
    weigh (what a micro-batch's loss is the mean of: SFT's scored tokens, classification's rows) all are collated
    and weighed first, on the host (no wait on the device for each weight), and per_rank is the step's total weight
    over the ranks divided by their number: the step's loss is the mean over every token (or row) of it, as one
    batch of them all gives it, whatever the micro-batches hold (rows of other lengths, an epoch's short last
    batch)."""
    if weigh is None:
        return grad_accum, ((batch, 1.0) for batch in micro)
    batches = list(micro)
    weights = [float(weigh(batch)) for batch in batches]
    if not all(0 <= w < math.inf for w in weights):
        raise ValueError(f"weigh must give each micro-batch a finite weight >= 0, got {weights}")
    total = distributed.all_reduce_mean(torch.tensor(sum(weights), dtype=torch.float64, device=device), info)
    per_rank = float(total)
    if per_rank <= 0:
        raise ValueError(f"a step's micro-batches weigh nothing on every rank (weights {weights}): nothing to learn")
    return per_rank, list(zip(batches, weights))


def batched_evaluation(loss_fn, collate, examples: Sequence[Any], prefix: str, config, device: torch.device
                       ) -> Callable[[nn.Module], dict[str, float]]:
    """An `evaluate` for fit and run_evaluation: loss_fn's loss and metrics over `examples` in batches of
    config.batch_size (each weighted by its size), named "<prefix>_<name>"; with a progress bar, since a
    closing pass over the training set takes a while."""
    def evaluate(model: nn.Module) -> dict[str, float]:
        from tqdm import tqdm

        totals: dict[str, float] = {}
        starts = range(0, len(examples), config.batch_size)
        for start in tqdm(starts, desc=f"{prefix} evaluation", unit="batch", leave=False,
                          disable=not config.progress, dynamic_ncols=True):
            chunk = examples[start : start + config.batch_size]
            loss, metrics = loss_fn(model, to_device(collate(chunk), device))
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(chunk)
        return {f"{prefix}_{k}": v / len(examples) for k, v in totals.items()}

    return evaluate


@torch.no_grad()
def run_evaluation(model: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]], config,
                   device: torch.device) -> dict[str, float]:
    with eval_mode(model), autocast_context(config, device):
        return {k: float(v) for k, v in evaluate(model).items()}


def save_train_state(state_dir: str, model: nn.Module, optimizer, position: dict[str, Any],
                     counters: dict[str, int]) -> str | None:
    """Write what a resumed run needs (weights, optimizer, every rank's RNG states, counters) as the
    newest and only checkpoint of state_dir; `position` names the settings a resumed run must share.
    Every rank calls it (the RNG states, and FSDP2's shards, are gathered from all); rank 0 writes and gets
    the path."""
    info = distributed.detect()
    rng = ckpt.gather_rng_states()
    path = None
    # on every rank: FSDP2's shards are gathered into whole tensors on rank 0, as one process would save them
    model_state, optimizer_state = distributed.full_state_dicts(model, optimizer)
    # rank 0 writes: when it cannot (disk full, no permission), the other ranks must not wait for it
    with distributed.fail_together(info, None, f"saving the training state of step {counters['step']}"):
        if info.is_main:  # without FSDP every process holds the same weights and optimizer state
            path = ckpt.save_checkpoint(state_dir, counters["step"], model_state, optimizer_state,
                                        {"finetune_state": {"position": position, "counters": counters}}, keep=1,
                                        rng=rng)
    return path


def template_position(config) -> dict[str, str]:
    """The prompt template a run trains with, for its position: the examples' tokens depend on it, so a
    resumed run must keep it."""
    return {"template": config.template, "system_prompt": config.system_prompt}


def lora_position(config) -> dict[str, Any]:
    """The LoRA settings a run trains with, for its position: the adapters' shapes (rank, targets) must fit
    the saved ones, and alpha and dropout shape every step's update. Without LoRA only the rank (0) counts."""
    if config.lora_rank <= 0:
        return {"lora_rank": 0}
    return {"lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "lora_targets": config.lora_targets}


def _canonical(x: Any) -> Any:
    """x as plain JSON data for examples_fingerprint: dicts, lists, ints and strings; floats left out."""
    if isinstance(x, (list, tuple)):
        if all(type(v) is int for v in x):  # a row of token ids or labels: the common case, kept fast
            return list(x)
        return [_canonical(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _canonical(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, torch.Tensor):
        return _canonical(x.tolist())
    if isinstance(x, float):
        return None
    return x


def examples_fingerprint(examples: Sequence[Any]) -> str:
    """A sha256 of the training examples as encoded (token ids, labels, every int or string in them), for a
    run's position: another data file of as many examples, or another max_len, mask_prompt, pack or
    val_fraction, trains on other tokens, which the number of examples alone does not tell. Floats are left
    out: DPO's reference log-probs, recomputed on resume, need not come out bitwise the same on a GPU."""
    digest = hashlib.sha256()
    for example in examples:  # one at a time: a large dataset's text is never held whole
        digest.update(json.dumps(_canonical(example), separators=(",", ":"), default=repr).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


# What a changed entry of a run's position means, for the message that refuses the resume. The models are
# compared by content (base_fingerprint), so a moved or renamed copy of one resumes.
LENGTH_HINT = ("the run's length (epochs or max_steps, over the examples) sets its learning-rate schedule, which a "
               "resume cannot stretch: to train on from a finished run, start a new run with --base=its out_dir")
FINGERPRINT_HINTS = {
    "steps": LENGTH_HINT,
    "iterations": LENGTH_HINT,  # PPO's and GRPO's
    "examples_sha256": ("the training examples are not the same tokens (another data file or content, or another "
                        "max_len, mask_prompt, pack, val_fraction, ... encodes them otherwise)"),
    "base_sha256": ("--base is not the model the run started from (other weights or model config, compared by "
                    "content: a moved or renamed copy of that base resumes)"),
    "reference_sha256": ("--reference is not the reference model the run started with (other weights or model "
                         "config, compared by content: a moved or renamed copy of that reference resumes; an "
                         "empty --reference is the base itself)"),
    "reward_model_sha256": ("--reward_model is not the reward model the run started with (other weights or model "
                            "config, compared by content: a moved or renamed copy of that reward model resumes; "
                            "one passed to run_ppo as a module is compared by its class name and state dict)"),
}


def restore_train_state(state_dir: str, model: nn.Module, optimizer, position: dict[str, Any]) -> dict[str, int]:
    """Load the newest training state of a run into model and optimizer and restore this rank's RNG
    states; the saved counters. A run whose data or batch settings changed since cannot continue.
    Under FSDP2 rank 0 alone reads the weights and the optimizer's state, and broadcasts them."""
    latest = ckpt.latest_checkpoint(state_dir)
    if latest is None:
        raise FileNotFoundError(f"cannot resume: no training state in {ckpt.checkpoints_dir(state_dir)} "
                                f"(it is written every ckpt_interval steps)")
    state = distributed.load_checkpoint_for(latest, model, distributed.detect(), None)
    saved = state.meta.get("finetune_state", {})
    # states from before these settings were recorded: "parallel" was ddp, PPO's world_size was 1, DPO's
    # loss_type was sigmoid (the only loss there was); the others recorded since (the template, the examples'
    # fingerprint, LoRA's and the recipe's settings, the fingerprints of the base, DPO's reference and PPO's
    # reward model) are not known there, so not compared: such a run resumes on any --base, --reference or
    # --reward_model
    saved_position = {"parallel": "ddp", "world_size": 1, "loss_type": "sigmoid", **saved.get("position", {})}
    if isinstance(saved_position.get("lora_targets"), str):  # saved as typed, before validate gave one spelling
        saved_position["lora_targets"] = canonical_lora_targets(saved_position["lora_targets"])
    changed = {k: (saved_position[k], v) for k, v in position.items() if k in saved_position and saved_position[k] != v}
    if changed:
        hint = "".join(f"; {key}: {why}" for key, why in FINGERPRINT_HINTS.items() if key in changed)
        raise ValueError(f"cannot resume from {latest}: these differ from the saved run (saved, now): {changed}"
                         f"{hint}")
    distributed.load_full_state_dicts(model, optimizer, state.model, state.optimizer)  # FSDP2: rank 0's, sharded
    ckpt.restore_rng_states(state.rng)
    return saved["counters"]


def check_run_folder(config) -> None:
    """What config.out_dir must hold (open_run's checks; the recipes call it first, before loading a model or
    encoding data): a fresh start in a folder that holds a run needs overwrite=true, and resume=true needs a
    training state there."""
    if os.path.exists(config.out_dir) and not os.path.isdir(config.out_dir):
        raise ValueError(f"out_dir {config.out_dir!r} is a file; the run folder must be a folder (or not exist)")
    state_dir = train_state_dir(config)
    if not config.resume:
        held = ckpt.latest_checkpoint(state_dir) or ckpt.latest_checkpoint(config.out_dir)
        if held is not None and not config.overwrite:  # a fresh start would delete it: not by accident
            raise ValueError(f"{config.out_dir!r} already holds a run ({held}); continue a stopped one with "
                             f"--resume=true, start again with --overwrite=true, or give another --out_dir")
        return
    finished = ckpt.latest_checkpoint(config.out_dir)
    if ckpt.latest_checkpoint(state_dir) is None:
        if finished is not None:
            raise ValueError(f"cannot resume {config.out_dir!r}: the run finished (its model: {finished}), and a "
                             f"finished run's training state is deleted (keep_train_state=true keeps it); start a "
                             f"new run from it with --base={config.out_dir}")
        raise FileNotFoundError(f"cannot resume: no training state in {ckpt.checkpoints_dir(state_dir)} "
                                f"(it is written every ckpt_interval steps)")


def open_run(config, model: nn.Module, optimizer, position: dict[str, Any]
             ) -> tuple[MetricsLog, dict[str, int] | None, list[dict[str, float]]]:
    """(the metrics log of config.out_dir, the restored counters or None, the evaluations logged so far).

    With config.resume the newest training state is loaded (restore_train_state) and the log cut back to
    it; otherwise the run starts afresh: a new log, and no training state left from an older run. The log is
    a plain MetricsLog (rank 0's; its writes are no collectives): PPO writes its evaluation on rank 0 alone."""
    info = distributed.detect()
    state_dir = train_state_dir(config)
    check_run_folder(config)  # first: an out_dir that is a file is its ValueError on every rank
    # rank 0 alone makes the folder, clears or cuts back the log: when that fails, the other ranks must not
    # wait for it at the first step's all-reduce
    log = CollectiveMetricsLog.open(os.path.join(config.out_dir, "metrics.jsonl"), info, None)
    if not config.resume:
        # one collective for both: the log and the training state of the run this one replaces
        with distributed.fail_together(info, None, "clearing the old run's log and training state"):
            if info.is_main:
                if os.path.exists(log.path):
                    os.remove(log.path)
                shutil.rmtree(state_dir, ignore_errors=True)
        return log.plain, None, []
    counters = restore_train_state(state_dir, model, optimizer, position)
    distributed.barrier(info)  # every rank has read the state before rank 0 may write the log
    log.truncate_after(counters["step"])
    records = read_metrics(log.path) if os.path.exists(log.path) else []
    evals = [{k: v for k, v in r.items() if k not in ("kind", "step")} for r in records if r["kind"] == "eval"]
    return log.plain, counters, evals


def save_or_stop(stop: StopOnSignal, done_steps: int, done: bool, config, save: Callable[[int], str | None],
                 log: MetricsLog, charts: Sequence[str] = ()) -> None:
    """After a step: save the training state every config.ckpt_interval steps (0: never; not after the last,
    where the run saves its model instead, unless config.keep_train_state) or when a stop signal came, on every
    rank (save gathers their RNG states; rank 0 writes); after a signal, the charts so far, then
    TrainingInterrupted. The flag is read once: a signal between two reads stopped without the save it reported."""
    stopping = stop.requested
    interval_due = config.ckpt_interval and done_steps % config.ckpt_interval == 0 and not done
    # a kept state must be the end of the run: resuming an earlier one would train the last steps again and
    # replace the saved model (not bitwise the same on a GPU); at the end, a resume finds nothing left to train
    kept_at_end = done and config.keep_train_state
    if not (stopping or interval_due or kept_at_end):
        return
    path = save(done_steps)
    if stopping:  # a signal stops only a run of one process (StopOnSignal is off under torchrun)
        if distributed.detect().is_main:
            plot_metrics(log.path, config.out_dir, extra=charts)
        raise TrainingInterrupted(f"{stopping} at step {done_steps}: the training state is saved ({path}); "
                                  f"continue with the same command and --resume=true", stopping)


def already_complete(config, done: int, total: int, unit: str = "steps") -> bool:
    """Whether a resumed run's restored state is its end (`done` of its `total` steps or iterations); if so, a
    warning (rank 0) says that nothing trains again, as a finished pretraining run says when resumed. A resume
    cannot raise the length instead: it is part of the run's position."""
    if done < total:
        return False
    if distributed.detect().is_main:
        warnings.warn(f"the run in {config.out_dir!r} is already complete: its training state is at its end "
                      f"({total} {unit}), so nothing is trained again; to train on, start a new run from it with "
                      f"--base={config.out_dir}", stacklevel=3)
    return True


def evaluated_at(log_path: str, step: int) -> bool:
    """Whether the metrics log holds an evaluation after `step` steps: a resumed finished run whose log was
    lost or cut evaluates its model again, where one that has it must not log it twice."""
    if not os.path.isfile(log_path):
        return False
    return any(r["kind"] == "eval" and r.get("step") == step for r in read_metrics(log_path))


def evaluation_due(done_steps: int, done: bool, config) -> bool:
    """Whether a run evaluates after `done_steps` steps: every config.eval_interval steps (0: never) and at the
    end."""
    return done or bool(config.eval_interval and done_steps % config.eval_interval == 0)


def _fit_position(train_examples: Sequence[Any], config, steps: int, world_size: int,
                  settings: dict[str, Any] | None) -> dict[str, Any]:
    """What a resumed fit must share with the run it continues: the schedule's length, the examples, the batch,
    seed and parallel settings, the template, LoRA's and the recipe's settings."""
    return {"steps": steps, "examples": len(train_examples), "batch_size": config.batch_size,
            "grad_accum": config.grad_accum, "seed": config.seed, "world_size": world_size,
            "parallel": config.parallel, **template_position(config), **lora_position(config),
            **(settings or {}), "examples_sha256": examples_fingerprint(train_examples)}


class _FitRun:
    """One run of fit: the model that trains (under parallel="fsdp" a sharded copy of the caller's), its
    optimizer, schedule and metrics log, and the counters each step hands to the next, which the training state
    saves and a resumed run restores. fit calls its methods in the algorithm's order."""

    def __init__(self, model: nn.Module, train_examples: Sequence[Any], config,
                 settings: dict[str, Any] | None):
        """Join the torchrun job, shard the model (fsdp), make the optimizer and open the run folder: a fresh
        log, or on resume the training state restored (weights, optimizer, RNG states) and the counters."""
        self.config = config
        self.sharded = config.parallel == "fsdp"
        self.device = training_device(model, config)
        self.info = data_parallel_setup(self.device)
        check_parallel(config, self.info)
        self.whole_model = model  # the caller's: under fsdp it waits on the CPU and gets the weights in finish()
        self.model = shard_copy(model, self.info, self.device) if self.sharded else model  # the one that trains
        self.steps = total_steps(len(train_examples), config, self.info.world_size)
        if self.info.is_main:
            warn_if_warmup_outlasts(config, self.steps)
        self.optimizer = make_optimizer(list(self.model.parameters()), config, self.sharded)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.position = _fit_position(train_examples, config, self.steps, self.info.world_size, settings)
        self.state_dir = train_state_dir(config)
        log, self.counters, evals = open_run(config, self.model, self.optimizer, self.position)
        self.log = CollectiveMetricsLog(log, self.info, self.device)  # every rank calls its methods alike
        self.first_eval, self.last_eval = (evals[0], evals[-1]) if evals else (None, None)
        self.last_train: dict[str, float] = {}  # the means of the last step that trained
        self.start_step = self.bad_steps = self.skipped = 0  # bad_steps: non-finite steps in a row
        self.loss_scale = DynamicLossScale() if config.dtype == "float16" else None

    def lr_at(self, step: int) -> float:
        return cosine_lr(step, self.config.lr, self.config.min_lr, self.config.warmup_steps, self.steps)

    def start(self, evaluate: Callable[[nn.Module], dict[str, float]] | None) -> None:
        """A resumed run takes up its saved counters and loss scale (and warns when the schedule no longer
        gives the step it continues with the learning rate it would have had); a resumed finished one trains
        nothing (a warning says so) and evaluates only when its log lost the final evaluation; a fresh one
        evaluates the untrained model, where the eval curves start."""
        counters = self.counters
        if counters is not None:
            self.start_step, self.bad_steps, self.skipped = counters["step"], counters["bad_steps"], counters["skipped"]
            if already_complete(self.config, self.start_step, self.steps):
                if evaluate is not None and not evaluated_at(self.log.path, self.steps):
                    self.evaluate(evaluate, self.steps)
            elif self.info.is_main:
                warn_if_schedule_changed(counters.get("next_lr"), self.lr_at(self.start_step), self.start_step)
            if self.loss_scale and counters.get("loss_scale"):
                self.loss_scale.load_state_dict(counters["loss_scale"])
        elif evaluate is not None:
            self.first_eval = self.evaluate(evaluate, 0)

    def batches(self, train_examples: Sequence[Any]):
        """This rank's micro-batches from start_step on: the seeded epochs are the same on every rank and in a
        resumed run, so skipping what the steps before start_step took continues where the stopped run was."""
        batches = micro_batches(train_examples, self.config.batch_size, self.config.seed)
        for _ in range(self.start_step * self.config.grad_accum * self.info.world_size):
            next(batches)
        return rank_share(batches, self.info)

    def train_step(self, step: int, loss_fn, batches, collate, bar, weigh: Callable[[Any], Any] | None = None) -> None:
        """Optimizer step `step` (0-based) over grad_accum micro-batches per rank (weighed as fit's weigh says),
        logged and counted."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scale = self.loss_scale.scale if self.loss_scale else 1.0
        mean_loss, metrics = _accumulate_gradients(self.model, loss_fn, batches, collate, self.config, self.device,
                                                   scale, weigh)
        grad_norm = self._apply_gradients(mean_loss, scale)
        self._record(step, lr, scale, mean_loss, metrics, grad_norm, bar)
        bar.update(1)

    def _apply_gradients(self, mean_loss: float, scale: float) -> float:
        """Average the gradients over the ranks, unscale, clip and step (none of it after a non-finite loss:
        NaN); the gradient norm, not finite when the optimizer skipped the step."""
        if not self.sharded:  # FSDP2 reduced (averaged) them in the backward
            average_gradients(self.trainable, self.info)
        grad_norm = math.nan
        if math.isfinite(mean_loss):  # the same on every rank (averaged): all or none take the collectives
            unscale_(self.trainable, scale)  # an overflow stays inf: the step below skips itself
            grad_norm = optimizer_step(self.optimizer, self.trainable, self.config, self.sharded)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _record(self, step: int, lr: float, scale: float, mean_loss: float, metrics: dict[str, float],
                grad_norm: float, bar) -> None:
        """Log the step and count it: a float16 overflow backs the loss scale off (a skip, but no sign of
        divergence); another non-finite loss or norm is a bad step, and MAX_BAD_STEPS of them in a row stop
        the run (FinetuneDiverged); a step that trained logs its means."""
        loss_scale = self.loss_scale
        if loss_scale and math.isfinite(mean_loss) and not math.isfinite(grad_norm) \
                and loss_scale.can_back_off():  # a float16 overflow: the scale's doing, not divergence
            self.skipped += 1
            loss_scale.update(overflowed=True)
            self.log.write("skip", step=step + 1, loss=mean_loss, grad_norm=grad_norm,
                           reason=f"float16 gradient overflow: loss scale {scale:g} -> {loss_scale.scale:g}")
        elif not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
            self.bad_steps += 1
            self.skipped += 1
            self.log.write("skip", step=step + 1, loss=mean_loss, grad_norm=grad_norm)
            if self.bad_steps >= MAX_BAD_STEPS:
                raise FinetuneDiverged(f"fine-tuning stopped at step {step + 1}: the loss or gradient norm "
                                       f"was NaN/inf {self.bad_steps} steps in a row; try a lower lr")
        else:
            self.bad_steps = 0
            self.last_train = {"loss": mean_loss, **metrics}
            scaling = {}
            if loss_scale:
                loss_scale.update(overflowed=False)
                scaling = {"loss_scale": scale}
            self.log.write("train", step=step + 1, lr=lr, grad_norm=grad_norm, **self.last_train, **scaling)
            bar.set_postfix(loss=f"{mean_loss:.4f}")

    def evaluate(self, evaluate: Callable[[nn.Module], dict[str, float]], done_steps: int) -> dict[str, float]:
        """Run `evaluate` (eval mode, no_grad, autocast) after done_steps steps and log it; its result, now
        last_eval."""
        self.last_eval = run_evaluation(self.model, evaluate, self.config, self.device)
        self.log.write("eval", step=done_steps, **self.last_eval)
        return self.last_eval

    def save(self, done_steps: int) -> str | None:
        """Write the training state after done_steps steps (every rank: it gathers their RNG states); rank 0 gets
        the path."""
        counters = {"step": done_steps, "next_lr": self.lr_at(done_steps), "bad_steps": self.bad_steps,
                    "skipped": self.skipped, "loss_scale": self.loss_scale.state_dict() if self.loss_scale else None}
        return save_train_state(self.state_dir, self.model, self.optimizer, self.position, counters)

    def finish(self, charts: Sequence[str]) -> None:
        """After the last step: the trained weights back in the caller's model (fsdp), and the charts."""
        if self.sharded:
            self.optimizer = None  # its moments (twice the shards) leave the device before the whole model comes
            gather_into(self.whole_model, self.model, self.device)
        self.log.plot(self.config.out_dir, charts)


def fit(model: nn.Module, loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]],
        train_examples: Sequence[Any], collate: Callable[[list[Any]], Any], config,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None, charts: Sequence[str] = (),
        settings: dict[str, Any] | None = None,
        final_evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        weigh: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Train `model` in place; returns {"steps", "skipped_steps", "train": last logged means,
    "first_eval", "last_eval", "final_eval", "seconds", "metrics": path}. Writes config.out_dir/metrics.jsonl and
    charts: loss.png, lr.png and <name>.png for each metric name in `charts` (train "<name>", eval "val_<name>").
    settings: the recipe's own settings that shape its loss beyond the examples (DPO's beta, ...), plain
    JSON values; a resumed run must share them, as it must the examples and the batch settings.
    final_evaluate: run once on the trained model as `evaluate` is (not logged), its result "final_eval" (None
    without it): under parallel="fsdp" on the sharded model, before rank 0 alone gets the whole one.
    weigh(batch) -> how many terms loss_fn's loss of that collated micro-batch (still on the host) is the mean of
    (SFT: its scored tokens; classification: its rows): a step's micro-batches then count by it, on every rank, so
    that its gradient and logged means are those of one batch of them all (micro_batch_weights). None: each
    micro-batch counts alike, a mean of the micro-batches' means."""
    if not train_examples:
        raise ValueError("there are no training examples")
    from tqdm import tqdm

    run = _FitRun(model, train_examples, config, settings)
    run.start(evaluate)
    batches = run.batches(train_examples)
    start = time.perf_counter()
    run.model.train()
    show = config.progress and run.info.is_main
    stop = StopOnSignal(enabled=not run.info.is_distributed)
    with tqdm(total=run.steps, initial=run.start_step, unit="step", dynamic_ncols=True, disable=not show) as bar, stop:
        for step in range(run.start_step, run.steps):
            run.train_step(step, loss_fn, batches, collate, bar, weigh)
            done = step + 1 == run.steps
            if evaluate is not None and evaluation_due(step + 1, done, config):
                last_eval = run.evaluate(evaluate, step + 1)
                if show:
                    tqdm.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            save_or_stop(stop, step + 1, done, config, run.save, run.log.plain, charts)
    final_eval = None if final_evaluate is None else run_evaluation(run.model, final_evaluate, config, run.device)
    run.finish(charts)
    return {"steps": run.steps, "skipped_steps": run.skipped, "train": run.last_train, "first_eval": run.first_eval,
            "last_eval": run.last_eval, "final_eval": final_eval, "seconds": time.perf_counter() - start,
            "metrics": run.log.path}
