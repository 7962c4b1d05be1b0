"""The pretraining loop: Trainer(config).fit().

One optimizer step = grad_accum micro-batches on each rank (batch_tokens tokens in all), the
loss averaged over them (and over the ranks by DDP/FSDP), the gradients clipped to grad_clip,
then AdamW at the schedule's learning rate (optimizer="muon": Muon for the blocks' matrices beside it,
llmkern/optim/muon.py). Every eval_interval steps the validation loss and
perplexity are measured on the same eval_steps held-out batches; every ckpt_interval steps and
at the end a checkpoint is written (one due at a skipped step, below, at the next step that trains, as is an
evaluation: an interval's checkpoint is never one of a skipped step, though a signal's may be).
fit(resume=True) continues from the newest checkpoint with
the model, optimizer, RNG states (each rank its own), data position and counters restored, so on a
CPU the losses after resuming equal, bit for bit, those of a run that never stopped.

Under torchrun, rank 0 alone writes the run's files (log, checkpoints, charts); when that fails (disk
full), every rank stops with an error that names it, instead of waiting for rank 0 at the next collective.

A model with mixture-of-experts layers trains on the cross-entropy plus router_aux_loss_coef times their
load-balancing loss; its log's "loss" is the cross-entropy alone (comparable with the validation loss and with a
dense model's), and "aux_loss" beside it the load-balancing loss, both averaged over the step's micro-batches and
the ranks. A dense model's log has no "aux_loss".

A step whose loss (the whole objective, with MoE layers) or gradient norm is NaN or inf is not applied;
it is logged, and after max_bad_steps of them in a row training stops with a TrainingDiverged error, the
newest checkpoint left as it was. With dtype="float16" the loss is scaled (llmkern/train/loss_scale.py):
a gradient overflow then halves the scale and skips the step without counting as a bad step.

The host does not wait for a step: llmkern's AdamW clips and skips a non-finite step on the
device, and a step's loss and norm are read once the next step is queued (readback.py). Only
steps that log, evaluate or save are read at once. (torch's AdamW and float16 loss scaling need
the host's decision before the update: one sync a step there, as has Muon, which cannot skip on the device.)
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._modes import eval_mode
from ..data.loader import TokenLoader
from ..data.shards import load_manifest
from ..model.config import identity_dict
from ..model.hf_save import with_hf_source
from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig
from .interrupt import StopOnSignal, TrainingInterrupted
from .loss_scale import DynamicLossScale, unscale_
from .metrics import CollectiveMetricsLog, mfu, peak_flops, peak_memory_gib
from .readback import Readback
from .schedules import learning_rate, warn_if_schedule_changed


# GPTConfig fields that say how the model runs, not what it computes: a resume may change them
_RUN_SETTINGS = ("backend", "activation_checkpointing", "fused_loss")


class TrainingDiverged(RuntimeError):
    """The loss was NaN/inf for max_bad_steps steps in a row."""


@dataclass
class _StepRecord:
    """A queued optimizer step, its loss and gradient norm on their way to the host."""

    step: int  # counted from 1
    lr: float
    values: Readback  # (mean loss, gradient norm), + the mean load-balancing loss with MoE layers
    overflow: str | None = None  # float16: skipped for a gradient overflow, the loss scale backed off


@dataclass
class _StepValues:
    """A read step's values as logged: loss is the mean cross-entropy, aux_loss the mean load-balancing loss (None
    without MoE layers)."""

    loss: float
    grad_norm: float
    aux_loss: float | None = None

    def losses(self) -> dict[str, float]:
        """The loss records' "loss", and "aux_loss" beside it for a model with MoE layers."""
        return {"loss": self.loss} if self.aux_loss is None else {"loss": self.loss, "aux_loss": self.aux_loss}


def build_model(config: TrainConfig, n_vocab: int, tokenizer_spec: str | None = None,
                tokenizer_sha256: str | None = None):
    """The GPT of a TrainConfig: its preset with the data's vocabulary, the run's context length
    and backend, then the config's model overrides; or, with config.init_from, the model stored there
    (continued pretraining), which must know the data's tokens (tokenizer_spec and tokenizer_sha256:
    the data manifest's). The config is a validated one (TrainConfig.validate checked its model settings)."""
    from ..model import GPT, GPTConfig

    if config.init_from:
        return _load_init_model(config, n_vocab, tokenizer_spec, tokenizer_sha256)

    settings: dict[str, Any] = {"vocab_size": n_vocab, "block_size": config.seq_len, "backend": config.op_backend}
    settings.update(config.model)
    model_config = GPTConfig.from_preset(config.preset, **settings)
    check_data_vocab(model_config.vocab_size, n_vocab, tokenizer_spec, "the model (model.vocab_size)")
    if model_config.block_size < config.seq_len:
        raise ValueError(f"seq_len={config.seq_len} is longer than model.block_size={model_config.block_size}")
    return GPT(model_config)


def check_data_vocab(vocab_size: int, n_vocab: int, tokenizer_spec: str | None, model: str, hint: str = "") -> None:
    """A ValueError unless a model of vocab_size embeddings reads every token of data tokenized with tokenizer_spec
    (n_vocab tokens): llmkern.data.model_vocab.check_vocab_fits, where the model has fewer embeddings than the
    tokenizer has ids (then the tokenizer is loaded, to tell its special tokens)."""
    from ..data.model_vocab import check_vocab_fits
    from ..data.tokenizer import get_tokenizer

    if n_vocab <= vocab_size:
        return
    if tokenizer_spec is None:  # no tokenizer to tell special ids from ordinary ones
        raise ValueError(f"the data has {n_vocab} tokens; {model} only {vocab_size}{hint}")
    check_vocab_fits(get_tokenizer(tokenizer_spec), vocab_size, tokenizer_spec, model, hint)


def _load_init_model(config: TrainConfig, n_vocab: int, tokenizer_spec: str | None, tokenizer_sha256: str | None):
    from ..data.tokenizer import same_tokenizer
    from .inference import is_hf_source, load_gpt

    model, spec, meta = load_gpt(config.init_from, config.op_backend)
    # a Hugging Face file ("hf-gpt2", "hf-llama", "hf-gemma3", ...) records no tokenizer: the data's is trusted
    # to be its own
    from_llmkern = not is_hf_source(meta)
    if from_llmkern and tokenizer_spec is not None and not same_tokenizer(spec, tokenizer_spec, tokenizer_sha256):
        raise ValueError(f"init_from {config.init_from!r} was trained with tokenizer {spec!r}, the data with "
                         f"{tokenizer_spec!r}: tokenize the data with the model's tokenizer")
    check_data_vocab(model.config.vocab_size, n_vocab, tokenizer_spec, f"init_from {config.init_from!r}",
                     ": tokenize the data with the model's tokenizer")
    if model.config.block_size < config.seq_len:
        raise ValueError(f"seq_len={config.seq_len} is longer than the block_size={model.config.block_size} of "
                         f"init_from {config.init_from!r}")
    return model


def check_run_folder(run_dir: str, resume: bool, overwrite: bool, max_steps: int | None = None) -> None:
    """A resumed run needs a checkpoint in its folder, and (given max_steps) one not past max_steps; a fresh
    one must not wipe out an older run there by accident (its checkpoints and log go). Trainer.fit checks; a
    caller may check before the data and model. Under torchrun every rank reads the same folder, so every
    rank raises alike."""
    latest = ckpt.latest_checkpoint(run_dir)
    if resume and latest is None:
        raise FileNotFoundError(f"cannot resume: no checkpoint in {ckpt.checkpoints_dir(run_dir)}")
    if resume and max_steps is not None:
        step = ckpt.step_dirs(run_dir)[-1][0]  # latest's
        if step > max_steps:  # it has nothing to train, and its final save would rewrite the checkpoint
            raise ValueError(f"cannot resume from {latest}: its step {step} is past max_steps={max_steps}; to "
                             f"train on from it, give a max_steps above {step} (the run folder is left as it was)")
    if not resume and latest is not None and not overwrite:
        raise ValueError(f"{run_dir!r} already holds a run (newest checkpoint {latest}); continue it with "
                         f"--resume, start it again with --overwrite=true, or give another --out_dir")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also every GPU's generator


class Trainer:
    """Pretrains the GPT of `config` on the token shards in config.data_dir."""

    def __init__(self, config: TrainConfig):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config.validate()
        self.dist = distributed.detect()
        self.device = distributed.pick_device(config.device, self.dist)
        distributed.init(self.dist, self.device)
        self.grad_accum = config.grad_accum_steps(self.dist.world_size)
        self.run_dir = config.out_dir
        if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):  # before minutes of data and a step
            raise ValueError(f"out_dir {self.run_dir!r} is a file; the run folder must be a folder (or not exist)")
        if config.init_from and not os.path.exists(config.init_from):  # before the data, not after it
            raise FileNotFoundError(f"init_from {config.init_from!r} does not exist: give a run or checkpoint "
                                    f"folder, or a Hugging Face GPT-2 model.safetensors")
        if config.optimizer in ("llmkern", "muon") and not (config.parallel == "fsdp" and self.dist.is_distributed):
            from .. import _backend

            # llmkern's AdamW refuses a backend that cannot run here at its first step: say so before the data
            _backend.resolve("adamw", config.op_backend, self.device)
        self.data_dir = config.data_dir or self._prepare_builtin_corpus()
        self.autocast_dtype = self._autocast_dtype()
        self.loss_scale = DynamicLossScale() if self.autocast_dtype == torch.float16 else None

        self.manifest = load_manifest(self.data_dir)
        if not self.manifest["splits"].get("val"):
            raise ValueError(f"the data in {self.data_dir!r} has no 'val' split, which evaluation needs: it was "
                             f"tokenized with val_fraction=0, or from one document (or copies of one); prepare it "
                             f"again with --tokenize.val_fraction above 0, and split a .txt input into documents "
                             f"with --reader.separator")
        self.train_loader = TokenLoader(self.data_dir, "train", config.micro_batch, config.seq_len, mode="random",
                                        seed=config.seed, rank=self.dist.rank, world_size=self.dist.world_size,
                                        device=self.device, document_ids=config.document_masking)
        seed_everything(config.seed)
        self.raw_model = build_model(config, int(self.manifest["n_vocab"]), self.manifest["tokenizer"],
                                     self.manifest.get("tokenizer_sha256")).to(self.device)
        self.model = distributed.wrap(self.raw_model, self.dist, self.device, config.parallel)  # DDP, or FSDP2 in place
        self.wrapped_model = self.model
        self.optimizer = self._make_optimizer(self.raw_model)
        if config.compile:
            self.model = torch.compile(self.model)
        # rank 0 makes the run folder and writes the log; every rank calls the log's methods (collectives): a
        # failure on rank 0 stops them all, not rank 0 alone while the others wait for it at the next collective
        self.log = CollectiveMetricsLog.open(os.path.join(self.run_dir, "metrics.jsonl"), self.dist, self.device)
        self.step = 0
        self.best_val_loss = math.inf
        self.evals_since_best = 0
        self.bad_steps = 0
        self.last_val_loss: float | None = None
        self.last_eval_step: int | None = None  # the step of last_val_loss
        self._saved: tuple[int | None, str | None] = (None, None)  # (step, path) of this process's last save

    # --- setup --------------------------------------------------------------------------------

    def _prepare_builtin_corpus(self) -> str:
        from .corpus import prepare_corpus_shards

        tokenizer_name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(self.config.tokenizer))  # a spec may be a path
        # the seed too: it draws the validation documents (and the BPE's), so another seed is other data
        data_dir = os.path.join(os.path.dirname(os.path.normpath(self.run_dir)) or ".", "data",
                                f"stdlib-{tokenizer_name}-{self.config.corpus_max_bytes}-seed{self.config.seed}")
        with distributed.fail_together(self.dist, self.device, "preparing the corpus shards"):
            if self.dist.is_main:
                prepare_corpus_shards(data_dir, self.config.tokenizer, self.config.corpus_max_bytes,
                                      seed=self.config.seed)
        return data_dir

    def _autocast_dtype(self) -> torch.dtype | None:
        if self.config.dtype == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.config.dtype]

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        groups = model.optimizer_groups(cfg.weight_decay)
        if cfg.optimizer == "muon":  # also under FSDP2: Muon gathers each matrix's update (llmkern.optim.muon)
            return self._make_muon(model, groups)
        # llmkern's AdamW kernels take plain tensors; FSDP2's parameters are DTensor shards
        sharded = cfg.parallel == "fsdp" and self.dist.is_distributed
        if cfg.optimizer == "llmkern" and not sharded:
            from ..optim import AdamW

            # The clip fused into the step, which also skips a non-finite step on the device. Float16 loss
            # scaling must see an overflow on the host to back off, so there the host clips and decides.
            max_norm = None if self.loss_scale else (cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            return AdamW(groups, lr=cfg.lr, betas=cfg.betas, max_grad_norm=max_norm, backend=cfg.op_backend)
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)

    def _make_muon(self, model: nn.Module, groups: list[dict]):
        """Muon for the blocks' matrices (each projection of a fused one, each expert, apart: muon_parameters),
        llmkern's AdamW for the rest (its groups' weight decay as an AdamW run's; torch's over FSDP2's DTensors, as
        _make_optimizer's); both at the schedule's lr, Muon's scaled by muon_lr / lr. No fused clip: the host clips
        all the gradients and skips a non-finite step (_step_on_host), since Muon cannot skip on the device."""
        from ..optim import MuonWithAdamW, muon_parameters
        from ..optim.muon import split_groups

        cfg = self.config
        matrices = muon_parameters(model)
        return MuonWithAdamW(matrices, split_groups(groups, matrices), lr=cfg.lr, muon_lr=cfg.effective_muon_lr(),
                             weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, betas=cfg.betas,
                             backend=cfg.op_backend)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # --- the loop -----------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to max_steps (or early stop); returns a summary. resume=True continues from the newest
        checkpoint of the run folder (an error when there is none). A fresh start in a folder that holds
        a run is an error unless config.overwrite. Ctrl-C or SIGTERM (one process) stops after the step,
        saves, and raises TrainingInterrupted; after the last step it lets the final evaluation and save end,
        and the run ends as finished."""
        cfg = self.config
        check_run_folder(self.run_dir, resume, cfg.overwrite, cfg.max_steps)
        if resume:
            self._resume()
            if self._already_complete():
                # its final save may have been killed after its rename, before its rotation: finish that
                with distributed.fail_together(self.dist, self.device, "pruning the checkpoints"):
                    if self.dist.is_main:
                        ckpt.prune_checkpoints(self.run_dir, self.step, self.config.keep_checkpoints)
                return self._summary("max_steps")
        else:
            distributed.barrier(self.dist)  # every rank has looked for a run before rank 0 clears it away
            # (the other ranks would wait for rank 0 failing here at the first step's all-reduce)
            with distributed.fail_together(self.dist, self.device, "clearing the old run"):
                if self.dist.is_main:
                    self._clear_old_run()
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.dist.is_main))
        stop = StopOnSignal(enabled=not self.dist.is_distributed)
        try:
            # the untrained model's loss: where the curve starts (once: a run stopped before its first step
            # has it, and evaluating again would log it twice and count it against patience)
            if cfg.eval_interval and self.step == 0 and self.last_eval_step != 0:
                self._evaluate_and_check_patience()
            with stop:
                # A resumed run that had stopped early stays stopped (unless its patience was raised): it
                # must not train past where it ended, as an uninterrupted run would not have.
                stop_reason = "early_stopping" if resume and self._patience_ran_out() else self._train_steps(bar, stop)
                trained_to_the_end = not stop.requested
                if trained_to_the_end:  # under the handlers: a signal now lets the final evaluation and save end
                    self._evaluate_and_save_the_end(stop_reason)
            if not trained_to_the_end:
                # a signal during the checkpoint of this very step: that one holds this state already (a second
                # save would double the time a scheduler's grace period must cover, and swap the folder out)
                path = self._saved[1] if self._saved[0] == self.step else self.save()
                self.log.plot(self.run_dir)
                raise TrainingInterrupted(f"{stop.requested} at step {self.step}: the run is saved ({path}); "
                                          f"continue it with the same command and --resume", stop.requested)
        finally:
            bar.close()
        self.log.plot(self.run_dir)
        return self._summary(stop_reason)

    def _evaluate_and_save_the_end(self, stop_reason: str) -> None:
        """The final evaluation (at max_steps, once) and the final checkpoint of a run that trained to its end."""
        if stop_reason == "max_steps" and self.last_eval_step != self.step:  # not twice (a resumed finished run)
            self._evaluate_and_check_patience()
        self.save()

    def _clear_old_run(self) -> None:
        """Rank 0 deletes the checkpoints and log of the run a fresh start replaces (overwrite). The checkpoints
        go first: a crash before this run's own first save would otherwise have --resume continue the old run's
        weights, under this run's log or without any. Killed at any point, the folder holds the old run whole,
        or its log alone, which nothing resumes and the next fresh start deletes."""
        ckpt.discard_checkpoints(self.run_dir)
        if os.path.exists(self.log.path):
            os.remove(self.log.path)  # a fresh run starts a fresh log

    def _summary(self, stop_reason: str) -> dict[str, Any]:
        return {"steps": self.step, "stop_reason": stop_reason, "val_loss": self.last_val_loss,
                "best_val_loss": self.best_val_loss, "run_dir": self.run_dir}

    def _already_complete(self) -> bool:
        """Whether the resumed checkpoint is the end of a finished run: at max_steps, its final evaluation done
        (a run stopped by a signal after its last step saved before that evaluation, which resuming then runs).
        Said once (rank 0); fit leaves the run folder as it was, but for pruning what the final save would have
        pruned. Every rank decides alike: the same checkpoint."""
        if not (self.step == self.config.max_steps and self.last_eval_step == self.step):
            return False
        if self.dist.is_main:
            warnings.warn(f"the run in {self.run_dir!r} is already complete: its checkpoint is at max_steps="
                          f"{self.config.max_steps}, evaluated; nothing to train (to train on, resume with a higher "
                          f"max_steps)", stacklevel=3)
        return True

    def _train_steps(self, bar, stop: StopOnSignal) -> str:
        """Steps until max_steps, early stopping or a stop signal; "max_steps" or "early_stopping".

        A step's loss and gradient norm are read after the next step is queued (Readback), so the GPU
        never waits for Python; steps that log, evaluate or save are read at once, since what they do
        depends on whether the step was skipped."""
        cfg = self.config
        window_seconds, window_steps = 0.0, 0  # training time since the last log line (no evals, no saves)
        unread: _StepRecord | None = None  # the previous step, when it was not read yet
        # due at a skipped step: done at the next step that trains (an eval owed by a run that a signal stopped there)
        overdue_eval, overdue_save = self._eval_overdue(), False
        while self.step < cfg.max_steps and not stop.requested:
            start = time.perf_counter()
            record = self._train_step()
            self.step += 1
            if unread is not None:
                self._read(unread, bar)  # waits for that step only: this one is queued behind it
            unread, result = record, None
            logs, evaluates, saves = self._due(self.step, overdue_eval, overdue_save)
            if logs or evaluates or saves:
                unread, result = None, self._read(record, bar)
            window_seconds += time.perf_counter() - start
            bar.update(self.step - bar.n)
            window_steps += 1  # a skipped step read its tokens too, and its time is in window_seconds
            # not read yet (nothing to do at this step), or skipped: its eval and checkpoint wait for a step that
            # trains. Not saved at the skipped step itself: in a run of them that ends in TrainingDiverged, those
            # checkpoints would rotate out the ones from before it
            overdue_eval, overdue_save = (evaluates, saves) if result is None else (False, False)
            if result is None:
                continue
            if logs:
                tokens_per_s = window_steps * cfg.batch_tokens / max(window_seconds, 1e-9)
                self._log_train(result, record.lr, tokens_per_s)
                window_seconds, window_steps = 0.0, 0
            if evaluates and self._evaluate_and_check_patience():
                return "early_stopping"
            if saves:
                self.save()
        if unread is not None:  # stopped by a signal
            self._read(unread, bar)
        return "max_steps"

    def _eval_overdue(self) -> bool:
        """Whether an evaluation came due at a skipped step and was not done: a signal stopped the run there, and
        it saved that step. The run that went on evaluated at the next step that trained; the resumed one must."""
        interval = self.config.eval_interval
        if not interval or self.last_eval_step is None:  # None: a checkpoint from before it was recorded
            return False
        return self.step // interval * interval > self.last_eval_step

    def _due(self, step: int, overdue_eval: bool = False, overdue_save: bool = False) -> tuple[bool, bool, bool]:
        """Whether the loop logs, evaluates and saves after this step: at their intervals, and an evaluation or save
        that is overdue (due at a skipped step). The last step logs; fit evaluates and saves after the loop."""
        cfg = self.config
        last = step == cfg.max_steps
        return (step % cfg.log_interval == 0 or last,
                (overdue_eval or bool(cfg.eval_interval) and step % cfg.eval_interval == 0) and not last,
                (overdue_save or bool(cfg.ckpt_interval) and step % cfg.ckpt_interval == 0) and not last)

    def _train_step(self) -> _StepRecord:
        """Queue one optimizer step; its record, to read later."""
        lr = learning_rate(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group: muon_lr / lr (MuonWithAdamW)
        self.model.train()
        scale = self.step_loss_scale = self.loss_scale.scale if self.loss_scale else 1.0
        # (loss, load-balancing loss) summed over the micro-batches: one all-reduce for both
        sums = torch.zeros(2, device=self.device)
        for micro in range(self.grad_accum):
            x, y, *doc_ids = self.train_loader.next_batch()
            with self._gradient_sync(micro == self.grad_accum - 1):
                with self._autocast():
                    _, loss = self.model(x, y, *doc_ids)
                (loss * (scale / self.grad_accum)).backward()
            sums[0] += loss.detach().float()
            if self.raw_model.aux_loss is not None:  # this micro-batch's, set by the forward of a model with MoE
                sums[1] += self.raw_model.aux_loss.float()
        mean_loss, mean_aux = distributed.all_reduce_mean(sums / self.grad_accum, self.dist).unbind()
        if self.raw_model.aux_loss is None:  # a dense model
            mean_aux = None
        if self.skips_on_device:
            return self._step_on_device(mean_loss, mean_aux, lr)
        return self._step_on_host(mean_loss, mean_aux, lr, scale)

    @property
    def skips_on_device(self) -> bool:
        """Whether the optimizer clips and skips a non-finite step itself, so the host need not look (llmkern's
        AdamW with max_grad_norm, as _make_optimizer builds it when there is no float16 loss scaling)."""
        return getattr(self.optimizer, "max_grad_norm", None) is not None

    def _step_on_device(self, mean_loss: torch.Tensor, mean_aux: torch.Tensor | None, lr: float) -> _StepRecord:
        _poison_gradients_unless_finite(self.model.parameters(), mean_loss)
        self.optimizer.step()  # clips to grad_clip; a non-finite norm leaves everything as it was
        self.optimizer.zero_grad(set_to_none=True)
        return _StepRecord(self.step + 1, lr, _readback(mean_loss, self.optimizer.grad_norm, mean_aux))

    def _step_on_host(self, mean_loss: torch.Tensor, mean_aux: torch.Tensor | None, lr: float,
                      scale: float) -> _StepRecord:
        """The step of torch's AdamW or of Muon, or under loss scaling: the host reads the loss and the norm (a sync)
        and decides whether to step."""
        params = list(self.model.parameters())
        unscale_(params, scale)  # an overflow stays inf, for the checks below
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm_t = distributed.clip_grad_norm(params, max_norm)
        record = _StepRecord(self.step + 1, lr, _readback(mean_loss, grad_norm_t, mean_aux))
        loss, grad_norm, *_ = record.values.read()
        if not math.isfinite(grad_norm) and math.isfinite(loss) and self.loss_scale \
                and self.loss_scale.can_back_off():  # float16 overflow: the scale's doing, not divergence
            before = self.loss_scale.scale
            self.loss_scale.update(overflowed=True)
            record.overflow = f"float16 gradient overflow: loss scale {before:g} -> {self.loss_scale.scale:g}"
        elif math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            if self.loss_scale:
                self.loss_scale.update(overflowed=False)
        self.optimizer.zero_grad(set_to_none=True)
        return record

    def _read(self, record: _StepRecord, bar) -> _StepValues | None:
        """A step's values; None when it was skipped, which is logged and, unless a float16 overflow, counted:
        after max_bad_steps in a row, TrainingDiverged."""
        objective, grad_norm, *aux = record.values.read()
        values = self._step_values(objective, grad_norm, aux[0] if aux else None)
        if record.overflow:
            self.log.write("skip", step=record.step, **values.losses(), grad_norm=grad_norm, reason=record.overflow)
            return None
        if not (math.isfinite(objective) and math.isfinite(grad_norm)):  # the whole objective, as the step saw it
            self._count_bad_step(record.step, values, loss_is_finite=math.isfinite(objective))
            return None
        self.bad_steps = 0
        bar.set_postfix({name: f"{value:.4f}" for name, value in values.losses().items()}, lr=f"{record.lr:.2e}")
        return values

    def _step_values(self, objective: float, grad_norm: float, aux_loss: float | None) -> _StepValues:
        """The values to log of a step whose objective (mean loss trained on) and mean load-balancing loss (None
        for a dense model) were read: the cross-entropy is the objective less the coefficient times the aux loss."""
        coef = self.raw_model.config.router_aux_loss_coef
        # GPT.forward adds coef * aux only for coef > 0: 0 * a NaN aux loss would make the cross-entropy NaN
        cross_entropy = objective - coef * aux_loss if aux_loss is not None and coef > 0 else objective
        return _StepValues(cross_entropy, grad_norm, aux_loss)

    def _gradient_sync(self, enabled: bool):
        """Reduce the gradients over the ranks only after the last micro-batch of a step."""
        if not self.dist.is_distributed:
            return contextlib.nullcontext()
        if self.config.parallel == "fsdp":
            self.raw_model.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if enabled else self.wrapped_model.no_sync()

    def _count_bad_step(self, step: int, values: _StepValues, loss_is_finite: bool) -> None:
        self.bad_steps += 1
        self.log.write("skip", step=step, **values.losses(), grad_norm=values.grad_norm,
                       reason="non-finite gradient norm" if loss_is_finite else "non-finite loss")
        if self.bad_steps >= self.config.max_bad_steps:
            latest = ckpt.latest_checkpoint(self.run_dir)
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written before it"
            raise TrainingDiverged(
                f"training stopped at step {step}: the loss or gradient norm was NaN/inf for "
                f"{self.bad_steps} steps in a row (max_bad_steps={self.config.max_bad_steps}); {kept}. "
                f"Try a lower lr, a longer warmup or dtype=float32."
            )

    def _log_train(self, values: _StepValues, lr: float, tokens_per_s: float) -> None:
        flops = self.raw_model.flops_per_token(self.config.seq_len)
        scaling = {"loss_scale": self.step_loss_scale} if self.loss_scale else {}  # the scale this step used
        self.log.write("train", step=self.step, **values.losses(), lr=lr, grad_norm=values.grad_norm,
                       tokens_per_s=tokens_per_s,
                       mfu=mfu(tokens_per_s, flops, peak_flops(self.device), self.dist.world_size),
                       peak_mem_gib=peak_memory_gib(self.device), **scaling)

    # --- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first eval_steps * batch_tokens tokens of the val split (the same windows
        every time, whatever the number of ranks: each takes its share in micro-batches), or over as many
        whole steps of windows as the split holds when it is smaller: past its end the loader would wrap
        around and count windows twice."""
        val = TokenLoader(self.data_dir, "val", self.config.micro_batch, self.config.seq_len, mode="sequential",
                          rank=self.dist.rank, world_size=self.dist.world_size, device=self.device,
                          document_ids=self.config.document_masking)
        if val.batches_per_epoch == 0:
            # fewer windows than one micro-batch of every rank: that batch would wrap around and score some
            # windows twice, so each rank takes its whole share of the split in one smaller batch
            per_rank = val.windows_per_epoch // self.dist.world_size
            if per_rank == 0:
                raise ValueError(f"the val split of {self.data_dir!r} holds {val.windows_per_epoch} windows of "
                                 f"seq_len={self.config.seq_len} tokens, fewer than the {self.dist.world_size} "
                                 f"ranks: give it more data or a shorter seq_len")
            val = TokenLoader(self.data_dir, "val", per_rank, self.config.seq_len, mode="sequential",
                              rank=self.dist.rank, world_size=self.dist.world_size, device=self.device,
                              document_ids=self.config.document_masking)
        steps = max(1, min(self.config.eval_steps * self.grad_accum, val.batches_per_epoch))
        return evaluate_loss(self.model, val, steps, self._autocast, self.dist)

    def _evaluate_and_check_patience(self) -> bool:
        """Evaluate, log; True when patience ran out."""
        val_loss = self.evaluate()
        self.last_val_loss, self.last_eval_step = val_loss, self.step
        self.log.write("eval", step=self.step, val_loss=val_loss, val_ppl=_perplexity(val_loss))
        if self.dist.is_main:
            from tqdm import tqdm

            if self.config.progress:
                tqdm.write(f"step {self.step}: val loss {val_loss:.4f}, perplexity {_perplexity(val_loss):.2f}")
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.evals_since_best = val_loss, 0
            return False
        self.evals_since_best += 1
        return self._patience_ran_out()

    def _patience_ran_out(self) -> bool:
        return bool(self.config.patience) and self.evals_since_best >= self.config.patience

    # --- checkpoints --------------------------------------------------------------------------

    def _state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return distributed.full_state_dicts(self.raw_model, self.optimizer)  # whole, also under FSDP2

    def save(self) -> str | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank takes part)."""
        model_state, optim_state = self._state_dicts()
        rng = ckpt.gather_rng_states()  # each rank's own, for its resume: a collective, so on every rank
        path = None
        # rank 0 writes: when it cannot (disk full, no permission), the other ranks must not wait for it
        with distributed.fail_together(self.dist, self.device, f"saving the checkpoint of step {self.step}"):
            if self.dist.is_main:
                path = self._write_checkpoint(model_state, optim_state, rng)
        self._saved = (self.step, path)
        return path

    def _write_checkpoint(self, model_state, optim_state, rng) -> str:
        """Rank 0's part of save(): the checkpoint's files; its path."""
        meta = {
            "config": self.config.to_dict(),
            "model_config": self.raw_model.config.to_dict(),
            "tokenizer": self.manifest["tokenizer"],
            "data_dir": os.path.abspath(self.data_dir),
            "loader": self.train_loader.state_dict(),
            "schedule": {"name": self.config.schedule, "next_lr": learning_rate(self.step, self.config)},
            "trainer": {"best_val_loss": _finite_or_none(self.best_val_loss),
                        "evals_since_best": self.evals_since_best, "bad_steps": self.bad_steps,
                        "last_val_loss": self.last_val_loss, "last_eval_step": self.last_eval_step,
                        "loss_scale": self.loss_scale.state_dict() if self.loss_scale else None},
        }
        return ckpt.save_checkpoint(self.run_dir, self.step, model_state, optim_state, with_hf_source(meta),
                                    keep=self.config.keep_checkpoints, rng=rng)

    def _resume(self) -> None:
        latest = ckpt.latest_checkpoint(self.run_dir)  # there is one: check_run_folder
        # under FSDP2 the weights and the optimizer's state are read by rank 0 alone, and broadcast
        state = distributed.load_checkpoint_for(latest, self.raw_model, self.dist, self.device)
        # identity_dict: a checkpoint saved before a config field existed lacks it, which is no difference
        saved_model, model = identity_dict(state.meta["model_config"]), identity_dict(self.raw_model.config.to_dict())
        # How the model runs is not what it computes: a run moved to another GPU may resume on another
        # backend, or with activation checkpointing to fit; any other difference is another model.
        differ = sorted(k for k in set(saved_model) | set(model)
                        if k not in _RUN_SETTINGS and saved_model.get(k) != model.get(k))
        if differ:
            changes = ", ".join(f"{k}: {saved_model.get(k)!r} -> {model.get(k)!r}" for k in differ)
            raise ValueError(f"cannot resume from {latest}: this run's model differs from the checkpoint's ({changes})")
        # this run's settings of each param group (weight_decay, betas, ...): loading the optimizer's state puts
        # back the stopped run's, and a changed --weight_decay or --betas was silently ignored (lr is set each step)
        configured = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        distributed.load_full_state_dicts(self.raw_model, self.optimizer, state.model, state.optimizer)
        for group, settings in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(settings)
        self.train_loader.load_state_dict(state.meta["loader"])
        ckpt.restore_rng_states(state.rng, self.dist.rank, self.dist.world_size)  # this rank's own states
        counters = state.meta["trainer"]
        self.step = state.step
        if self.dist.is_main:
            warn_if_schedule_changed(state.meta.get("schedule", {}).get("next_lr"),
                                     learning_rate(self.step, self.config), self.step)
        self.best_val_loss = counters["best_val_loss"] if counters["best_val_loss"] is not None else math.inf
        self.evals_since_best = counters["evals_since_best"]
        self.bad_steps = counters["bad_steps"]
        self.last_val_loss = counters["last_val_loss"]
        self.last_eval_step = counters.get("last_eval_step")  # None in older checkpoints: evaluate again at the end
        if self.loss_scale and counters.get("loss_scale"):  # saved by a float16 run
            self.loss_scale.load_state_dict(counters["loss_scale"])
        self.log.truncate_after(self.step)


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader, steps: int, autocast=contextlib.nullcontext,
                  dist_info: distributed.DistInfo | None = None) -> float:
    """Mean next-token loss of `model` over `steps` batches of `loader` (averaged over the ranks)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:  # 0: an empty stack, no name
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    losses = []
    with eval_mode(model):
        for _ in range(steps):
            x, y, *doc_ids = loader.next_batch()  # doc_ids: [] or [(B, T) ids] (document masking)
            with autocast():
                _, loss = model(x, y, *doc_ids)
            losses.append(loss.detach().float())  # kept on the device: one sync at the end, not one a batch
    mean = torch.stack(losses).cpu().double().sum() / steps
    if dist_info is not None:
        mean = distributed.all_reduce_mean(mean.to(loader.device), dist_info).cpu()
    return float(mean)


def _readback(mean_loss: torch.Tensor, grad_norm: torch.Tensor, mean_aux: torch.Tensor | None) -> Readback:
    """A step's values on their way to the host: (loss, grad norm), + the load-balancing loss with MoE layers."""
    return Readback(mean_loss, grad_norm) if mean_aux is None else Readback(mean_loss, grad_norm, mean_aux)


def _perplexity(loss: float) -> float:
    """exp(loss); inf past exp's range (an OverflowError), and NaN for a NaN loss (`nan < 700` is False)."""
    return math.inf if loss >= 700 else math.exp(loss)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@torch.no_grad()
def _poison_gradients_unless_finite(params, loss: torch.Tensor) -> None:
    """Make the gradient norm NaN when the loss is not finite, without asking the host: the optimizer
    then skips the step, as it skips a non-finite norm. 0 * loss is 0 for a finite loss, so one small
    gradient gets 0 added; an inf or NaN loss makes it NaN."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        min(grads, key=torch.Tensor.numel).add_(loss * 0)
