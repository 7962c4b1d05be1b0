"""Direct preference optimization (Rafailov et al., 2023): fine-tune a policy on (prompt, chosen,
rejected) triples so that it prefers the chosen response more than a frozen reference model does,
with no reward model and no sampling.

The policy starts from config.base (usually an SFT run); the reference is config.reference, or the base
itself, frozen. Each response's log-probability is summed over its own tokens (and its end-of-text)
only, never the prompt's. The reference's log-probs are computed once, before training, since the
reference never changes. Logged per step and on the held-out pairs: the loss, the reward accuracy (how
often the chosen response's implicit reward beta * log(pi / pi_ref) beats the rejected one's) and the
mean reward margin.

config.loss_type picks the loss, as TRL's DPOTrainer names them: "sigmoid" (DPO, with label_smoothing
conservative DPO), "ipo" (Azar et al., 2023), "hinge" (SLiC) and "simpo" (Meng et al., 2024). IPO and SimPO
score a response by its mean log-prob per token instead of the sum (their rewards too); SimPO has no
reference at all (none is loaded or scored), its implicit reward being beta * that mean.

Under parallel="fsdp" no rank holds a whole model on its GPU: rank 0 alone reads the policy and the
reference (onto its CPU), the reference is sharded like the policy to score the examples (each rank its
share of them, which every rank then gathers), and the closing evaluation on the training pairs runs on
the sharded policy.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import FinetuneConfig

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")
REFERENCE_FREE_LOSSES = ("simpo",)  # no reference model is loaded or scored for these
# these score a response by its mean log-prob per token (the sum's scale grows with the length, and IPO's
# squared loss and SimPO's fixed margin gamma would then weigh long responses more), policy and reference alike
PER_TOKEN_LOSSES = ("ipo", "simpo")
DEFAULT_SIMPO_GAMMA = 0.5  # TRL's default (its CPOConfig's simpo_gamma)
# SimPO's paper tunes beta in 2-10; a beta below this one scales its rewards, and so the loss's gradient, down to where
# training barely moves (a warning says so; TRL's CPOConfig, like DPO here, defaults to 0.1)
SIMPO_SMALLEST_USUAL_BETA = 1.0


@dataclass
class DPOConfig(FinetuneConfig):
    """FinetuneConfig plus DPO's loss (its type, temperature, label smoothing, SimPO's margin) and the reference
    model."""

    beta: float = 0.1  # how far the policy may move from the reference: larger = closer (SimPO: its reward scale, 2-10)
    label_smoothing: float = 0.0  # the assumed fraction of flipped labels (conservative DPO); in [0, 0.5); sigmoid only
    reference: str = ""  # the reference model: a run or checkpoint folder; "" = the base itself, frozen
    loss_type: str = "sigmoid"  # one of LOSS_TYPES: "sigmoid" (DPO), "ipo", "hinge" (SLiC), "simpo" (no reference)
    simpo_gamma: float = DEFAULT_SIMPO_GAMMA  # SimPO's target reward margin, >= 0; loss_type="simpo" only

    EVALUATES_HELD_OUT_ONLY: ClassVar[bool] = True  # val_fraction=0: no evaluation

    def validate(self) -> DPOConfig:
        super().validate()
        check_beta(self.beta)
        check_loss_settings(self.loss_type, self.label_smoothing, self.simpo_gamma)
        if self.reference and self.loss_type in REFERENCE_FREE_LOSSES:
            raise ValueError(f"reference={self.reference!r}: loss_type={self.loss_type!r} uses no reference model "
                             f"(leave reference empty, or pick a loss_type that has one)")
        if not self.data:
            raise ValueError("data must name a preference file (.json or .jsonl with instruction, input, "
                             "chosen, rejected)")
        if self.loss_type == "simpo" and self.beta < SIMPO_SMALLEST_USUAL_BETA:
            # warned from this line, not the caller's: the command line validates twice (load_finetune_config, then
            # run_dpo), and Python shows a warning once per line it comes from
            warnings.warn(f"loss_type='simpo' with beta={self.beta}: SimPO's paper uses beta 2-10 (e.g. --beta=2 "
                          f"--simpo_gamma=1); a beta below {SIMPO_SMALLEST_USUAL_BETA:g} (DPO's default 0.1) makes "
                          f"its rewards and gradients small, and training weak")
        return self


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A DPO-family loss of the policy against the reference and the implicit rewards; each input is (B,).

    With the log-ratios r_c = policy_chosen - ref_chosen and r_r = policy_rejected - ref_rejected and
    h = r_c - r_r, the loss is the mean over the batch of, by loss_type (TRL's DPOTrainer's definitions):
        "sigmoid": -(1 - label_smoothing) * log sigmoid(beta h) - label_smoothing * log sigmoid(-beta h)
                   (Rafailov et al., 2023; label_smoothing > 0 is conservative DPO: it assumes that fraction
                   of the labels is flipped)
        "ipo":     (h - 1 / (2 beta))^2 (Azar et al., 2023, eq. 17, with beta as its tau)
        "hinge":   relu(1 - beta h) (SLiC-HF, Zhao et al., 2023)
    label_smoothing is defined for "sigmoid" alone. The log-probs are what the loss scores a response by: for
    "ipo" the mean per token of the response (PER_TOKEN_LOSSES; dpo_batch_loss divides), else the sum. SimPO
    has no reference: simpo_loss.
    Returns (loss, chosen_rewards, rejected_rewards) with rewards beta * r_c and beta * r_r, detached.
    """
    _check_logps({"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
                  "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps})
    check_beta(beta)
    check_loss_settings(loss_type, label_smoothing, DEFAULT_SIMPO_GAMMA)
    if loss_type in REFERENCE_FREE_LOSSES:
        raise ValueError(f"loss_type={loss_type!r} has no reference log-probs to compare with: use simpo_loss")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio  # (B,)
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, beta: float = 2.0,
               gamma: float = DEFAULT_SIMPO_GAMMA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO's loss (Meng et al., 2024), reference-free and length-normalized, and its implicit rewards; each
    input is (B,): a response's mean log-prob per token under the policy.

    The loss is the mean over the batch of -log sigmoid(beta * (chosen - rejected) - gamma): the chosen
    response's reward beta * chosen must beat the rejected one's by the margin gamma (>= 0). Returns (loss,
    chosen_rewards, rejected_rewards) with rewards beta * chosen and beta * rejected, detached.
    """
    _check_logps({"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps})
    check_beta(beta)
    check_simpo_gamma(gamma)
    chosen_rewards, rejected_rewards = beta * policy_chosen_logps, beta * policy_rejected_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses.mean(), chosen_rewards.detach(), rejected_rewards.detach()


def _check_logps(inputs: dict[str, Any]) -> None:
    """TypeError or ValueError unless every input is a 1-D tensor, all of one shape (the first's)."""
    first_name, first = next(iter(inputs.items()))
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"the log-probs must be 1-D (B,); {name} has shape {tuple(t.shape)}")
        if t.shape != first.shape:
            raise ValueError(f"the log-probs must all have one shape; {name} has {tuple(t.shape)}, "
                             f"{first_name} has {tuple(first.shape)}")


def check_beta(beta: object) -> None:
    # inf: z = inf * 0 = NaN at the first step, where the policy is still the reference
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < math.inf:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def check_label_smoothing(label_smoothing: object) -> None:
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
            or not 0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be a number in [0, 0.5), got {label_smoothing!r}")


def check_simpo_gamma(gamma: object) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < math.inf:
        raise ValueError(f"simpo_gamma must be a finite number >= 0, got {gamma!r}")


def check_loss_settings(loss_type: object, label_smoothing: object, simpo_gamma: object) -> None:
    """ValueError unless loss_type is one of LOSS_TYPES and the settings it reads are valid, and a setting it
    does not read is left at its default (set, it would be silently ignored)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    check_label_smoothing(label_smoothing)
    check_simpo_gamma(simpo_gamma)
    if label_smoothing != 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing={label_smoothing} is defined for loss_type='sigmoid' alone "
                         f"(conservative DPO), not {loss_type!r}; leave it at 0")
    if simpo_gamma != DEFAULT_SIMPO_GAMMA and loss_type != "simpo":
        raise ValueError(f"simpo_gamma={simpo_gamma} is SimPO's margin: it needs loss_type='simpo', not "
                         f"{loss_type!r}")


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Means over the batch: reward accuracy (chosen > rejected), margin, and the two rewards."""
    return {"reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "chosen_reward": chosen_rewards.mean(), "rejected_reward": rejected_rewards.mean()}


# --- data -----------------------------------------------------------------------------------------

def encode_preference(tokenizer, example: dict[str, Any], max_len: int, prompt_format=None) -> dict[str, Any] | None:
    """{"chosen": (tokens, labels), "rejected": (tokens, labels)} of a preference example (its prompt in
    prompt_format, default Alpaca; labels -1 on the prompt), or None when the prompt leaves no response
    token within max_len, or when the two rows read the same (identical responses, or cut to max_len
    before they differ)."""
    from .data import IGNORE, encode_prompt_response
    from .templates import PromptFormat

    fmt = prompt_format or PromptFormat()
    prompt = fmt.prompt(example)
    out = {}
    for side in ("chosen", "rejected"):
        tokens, labels = encode_prompt_response(tokenizer, prompt, fmt.response(example[side]), max_len)
        if all(label == IGNORE for label in labels[1:]):  # the next-token targets score nothing
            return None
        out[side] = (tokens, labels)
    # The same tokens twice: z = 0 whatever the policy, a constant log 2 in the loss and a false "chosen
    # beats rejected" in the reward accuracy; nothing to learn (the reward model skips such pairs too).
    if out["chosen"][0] == out["rejected"][0]:
        return None
    return out


def collate_pairs(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B rows (the chosen responses, then the rejected ones) plus the reference log-probs
    when the examples carry them."""
    from .data import make_lm_batch

    batch = make_lm_batch([ex["chosen"] for ex in examples] + [ex["rejected"] for ex in examples], pad_id)
    if "ref_chosen" in examples[0]:
        batch["ref_chosen"] = torch.tensor([ex["ref_chosen"] for ex in examples], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([ex["ref_rejected"] for ex in examples], dtype=torch.float32)
    return batch


def chosen_rejected_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed response log-probs of the chosen and of the rejected rows of a collate_pairs batch."""
    chosen, rejected, _ = chosen_rejected_logps_and_aux_loss(model, batch)
    return chosen, rejected


def chosen_rejected_logps_and_aux_loss(model, batch: dict[str, torch.Tensor]
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """chosen_rejected_logps, and the model's load-balancing loss over the real tokens of both halves (None for
    a dense model or in eval mode, as the frozen reference runs; see finetune.aux_loss)."""
    from ..eval.logprobs import logprobs_from_hidden

    hidden, aux = model.hidden_states_with_aux_loss(batch["idx"], batch.get("token_mask"))  # (2B, T, C)
    logps = logprobs_from_hidden(model, hidden, batch["targets"]).sum(dim=1).float()  # (2B,)
    half = logps.size(0) // 2
    return logps[:half], logps[half:], aux


def response_lengths(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) float counts of the scored tokens (the response's and its end-of-text) of the chosen and of the
    rejected rows of a collate_pairs batch: what a per-token mean divides the summed log-probs by."""
    from .data import IGNORE

    counts = (batch["targets"] != IGNORE).sum(dim=1).float()  # (2B,); encode_preference keeps no row without one
    half = counts.size(0) // 2
    return counts[:half], counts[half:]


def dpo_batch_loss(model, batch: dict[str, torch.Tensor], beta: float = 0.1, label_smoothing: float = 0.0,
                   loss_type: str = "sigmoid", simpo_gamma: float = DEFAULT_SIMPO_GAMMA
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy's loss of `loss_type` on a collate_pairs batch (carrying the reference's summed log-probs
    unless the loss is reference-free), and its pair_metrics; a mixture-of-experts policy in training mode adds
    its load-balancing loss (finetune.aux_loss). For PER_TOKEN_LOSSES the policy's and the reference's sums are
    divided by each response's length, as TRL's DPOTrainer does for IPO (and SimPO defines)."""
    from .aux_loss import with_aux_loss

    check_loss_settings(loss_type, label_smoothing, simpo_gamma)
    reference_free = loss_type in REFERENCE_FREE_LOSSES
    if not reference_free and "ref_chosen" not in batch:
        raise ValueError(f"loss_type={loss_type!r} compares with the reference: the batch must carry its log-probs "
                         f"(add_reference_logps)")
    chosen, rejected, aux = chosen_rejected_logps_and_aux_loss(model, batch)
    ref_chosen, ref_rejected = (None, None) if reference_free else (batch["ref_chosen"], batch["ref_rejected"])
    if loss_type in PER_TOKEN_LOSSES:
        chosen_len, rejected_len = response_lengths(batch)
        chosen, rejected = chosen / chosen_len, rejected / rejected_len
        if not reference_free:
            ref_chosen, ref_rejected = ref_chosen / chosen_len, ref_rejected / rejected_len
    if reference_free:
        loss, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, beta, simpo_gamma)
    else:
        loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta,
                                                          label_smoothing, loss_type)
    loss, aux_metrics = with_aux_loss(loss, aux, model.config)
    return loss, {**pair_metrics(chosen_rewards, rejected_rewards), **aux_metrics}


@torch.no_grad()
def add_reference_logps(reference, examples: list[dict[str, Any]], pad_id: int, config, device,
                        sharded: bool = False) -> None:
    """Store each example's reference log-probs ("ref_chosen", "ref_rejected"): computed once, since the
    reference is frozen, in batches of config.batch_size examples.

    reference: on `device`. sharded (parallel="fsdp", under torchrun): `reference` as
    load_base(whole_on_rank_0=True) gives a model there (whole on rank 0's CPU, on the meta device elsewhere);
    it is sharded as fit shards the policy, and each rank scores its share of the batches, which every rank
    then gathers: every rank ends with every example's log-probs, computed in the same batches as one process
    computes them, and none held the whole reference on its device."""
    if sharded:
        logps = _sharded_reference_logps(reference, examples, pad_id, config, device)
    else:
        logps = _reference_logps(reference.eval(), _batches(examples, config.batch_size), pad_id, config, device)
    for ex, (chosen, rejected) in zip(examples, logps):
        ex["ref_chosen"], ex["ref_rejected"] = chosen, rejected


def _batches(examples: list[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    return [examples[start : start + batch_size] for start in range(0, len(examples), batch_size)]


def _reference_logps(reference, batches: list[list[dict[str, Any]]], pad_id: int, config, device,
                     show: bool = True) -> list[tuple[float, float]]:
    """(chosen, rejected) log-probs of every example of `batches`, in order (the reference in eval mode)."""
    from tqdm import tqdm

    from .loop import autocast_context, to_device

    logps: list[tuple[float, float]] = []
    for chunk in tqdm(batches, desc="reference log-probs", unit="batch", disable=not (config.progress and show),
                      dynamic_ncols=True):
        batch = to_device(collate_pairs(chunk, pad_id), device)
        with autocast_context(config, device):
            chosen, rejected = chosen_rejected_logps(reference, batch)
        logps += zip(chosen.tolist(), rejected.tolist())
    return logps


def _sharded_reference_logps(reference, examples: list[dict[str, Any]], pad_id: int, config, device
                             ) -> list[tuple[float, float]]:
    """_reference_logps of every example under parallel="fsdp": the reference sharded (shard_copy: rank 0's
    weights), rank r scoring the r-th of world_size runs of consecutive batches, all gathered on every rank."""
    import torch.distributed as dist

    from .loop import data_parallel_setup, shard_copy

    info = data_parallel_setup(device)
    scorer = shard_copy(reference, info, device).requires_grad_(False).eval()
    batches = _batches(examples, config.batch_size)
    per_rank = math.ceil(len(batches) / info.world_size)
    mine = batches[info.rank * per_rank : (info.rank + 1) * per_rank]
    # every rank runs as many forward passes, since each gathers the shards of all ranks: one with fewer
    # batches scores the first batch again for nothing
    fillers = [batches[0]] * (per_rank - len(mine))
    scored = _reference_logps(scorer, mine + fillers, pad_id, config, device, show=info.is_main)
    # FSDP2's hooks hold the sharded copy in reference cycles: collected now, so that its shards (and its
    # root's gathered weights) leave the device before fit shards the policy
    del scorer
    gc.collect()
    shares: list[Any] = [None] * info.world_size
    dist.all_gather_object(shares, scored[: sum(len(chunk) for chunk in mine)])
    return [pair for share in shares for pair in share]


# --- the run --------------------------------------------------------------------------------------

def load_reference(config: DPOConfig, policy, tokenizer, base_sha256: str) -> tuple[Any, str]:
    """(the frozen reference in eval mode, its fingerprint): config.reference's model, loaded as the policy is
    (under parallel="fsdp" whole on rank 0's CPU alone), or the policy itself (before any LoRA), which is the
    base, of fingerprint base_sha256, seen through frozen_view: no second copy of its weights. The fingerprint
    is load_base's (by content: a moved copy of the reference is the same one), which a resumed run must share."""
    from ..data.tokenizer import same_tokenizer
    from .base import load_base

    if not config.reference:
        return frozen_view(policy), base_sha256
    reference, ref_tokenizer, ref_meta = load_base(dataclasses.replace(config, base=config.reference),
                                                   whole_on_rank_0=True)
    if not same_tokenizer(ref_tokenizer.spec, tokenizer.spec):
        raise ValueError(f"reference {config.reference!r} uses tokenizer {ref_tokenizer.spec!r}, the base "
                         f"{tokenizer.spec!r}: they must match")
    reference.requires_grad_(False)
    return reference.eval(), ref_meta["base_sha256"]


def frozen_view(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode whose parameters share its weights (no tensor is copied, on whatever
    device, the meta device too) and do not train; its buffers are the model's own. The reference of a run
    without config.reference: its log-probs are computed before the policy trains, so the shared weights
    are still the base's, and a whole second model (a deepcopy) is never made."""
    memo: dict[int, Any] = {}
    for tensor in model.parameters():
        memo[id(tensor)] = nn.Parameter(tensor.detach(), requires_grad=False)
    for tensor in model.buffers():
        memo[id(tensor)] = tensor
    return copy.deepcopy(model, memo).eval()  # the memo stands in for every tensor: none is copied


def run_dpo(config: DPOConfig) -> dict[str, Any]:
    """Fine-tune config.base with DPO on config.data; save the policy to config.out_dir; the summary."""
    from .base import (
        check_exists,
        effective_max_len,
        load_base,
        require_base,
        save_finetuned,
    )
    from .data import load_preference_data, split_examples, warn_dropped
    from .loop import (
        batched_evaluation,
        check_run_folder,
        drop_train_state,
        fit,
        training_device,
    )
    from .lora import apply_lora_from_config, check_lora_targets, save_and_merge_lora
    from .templates import settle_template

    if not isinstance(config, DPOConfig):
        raise TypeError(f"config must be a DPOConfig, got {type(config).__name__}")
    config.validate()
    # these first: a wrong out_dir, data file or reference is told before any model is loaded
    require_base(config)
    raw = load_preference_data(config.data)
    check_run_folder(config)
    check_exists("reference", config.reference)
    torch.manual_seed(config.seed)
    # under fsdp only rank 0 holds the whole policy (and reference): after fit it alone saves the policy
    policy, tokenizer, base_meta = load_base(config, whole_on_rank_0=True)
    check_lora_targets(policy, config)  # before the reference's log-probs; the adapters come after
    config, fmt = settle_template(config, base_meta)  # the SFT run's template, unless config names one
    device = training_device(policy, config)
    # SimPO has no reference: none is loaded (nor, below, scored)
    with_reference = config.loss_type not in REFERENCE_FREE_LOSSES
    reference, reference_sha256 = (load_reference(config, policy, tokenizer, base_meta["base_sha256"])
                                   if with_reference else (None, None))

    # The reference scores the same rows: a reference of a shorter context than the policy's bounds them too
    # (its log-probs of a longer row failed).
    max_len = effective_max_len(config, policy)
    if reference is not None:
        max_len = min(max_len, reference.config.block_size)
    encoded = [e for e in (encode_preference(tokenizer, ex, max_len, fmt) for ex in raw) if e is not None]
    if not encoded:
        raise ValueError(f"no example of {config.data!r} has a response token within max_len={max_len} "
                         f"and chosen and rejected responses that differ there")
    warn_dropped(config.data, len(raw) - len(encoded), len(raw), f"their prompt fills max_len={max_len} tokens, or "
                 f"their chosen and rejected responses read the same within it")
    train, val = split_examples(encoded, config.val_fraction, config.seed)
    pad_id = tokenizer.eot_token
    if reference is not None:
        add_reference_logps(reference, train + val, pad_id, config, device, sharded=config.parallel == "fsdp")
    del reference  # only its log-probs are needed from here on: freed before fit shards the policy

    wrapped = apply_lora_from_config(policy, config)

    beta, smoothing, loss_type, gamma = config.beta, config.label_smoothing, config.loss_type, config.simpo_gamma

    def loss_fn(model, batch):
        return dpo_batch_loss(model, batch, beta, smoothing, loss_type, gamma)

    def collate(examples):
        return collate_pairs(examples, pad_id)

    def evaluate_on(examples, prefix):
        return batched_evaluation(loss_fn, collate, examples, prefix, config, device)

    # the loss's settings, which a resumed run must share; the reference by content, not by path (the
    # reference's log-probs are not compared: recomputed on resume, they need not come out bitwise the same)
    # (states saved before loss_type was recorded resume as they did: their loss was the sigmoid one)
    settings = {"loss_type": loss_type, "beta": beta, "label_smoothing": smoothing,
                "base_sha256": base_meta["base_sha256"]}
    settings.update({"reference_sha256": reference_sha256} if with_reference else {"simpo_gamma": gamma})
    # the closing evaluation on the training pairs inside fit: under fsdp on the sharded policy, on every rank
    summary = fit(policy, loss_fn, train, collate, config, evaluate=evaluate_on(val, "val") if val else None,
                  charts=("reward_accuracy", "reward_margin"), settings=settings,
                  final_evaluate=evaluate_on(train, "train"),
                  weigh=lambda batch: batch["idx"].size(0) // 2)  # its pairs, what the loss is the mean of
    train_eval = summary.pop("final_eval")

    lora_path = save_and_merge_lora(policy, config, wrapped)
    meta = {"model_config": policy.config.to_dict(), "tokenizer": tokenizer.spec,
            "finetune": {"method": "dpo", **config.to_dict()}}
    path = save_finetuned(config.out_dir, summary["steps"], policy.state_dict(), meta)
    drop_train_state(config)
    return {"method": "dpo", "out_dir": config.out_dir, "checkpoint": path, "template": fmt.template, "lora": lora_path,
            "train_examples": len(train), "val_examples": len(val),
            "skipped_examples": len(raw) - len(encoded), **summary, "train_eval": train_eval}
