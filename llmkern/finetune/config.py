"""FinetuneConfig: the settings every fine-tuning recipe shares (SFT, classification, DPO, reward model,
PPO and GRPO add their own fields in subclasses), from a TOML/JSON file plus `--key=value` overrides.

    cfg = load_finetune_config(SFTConfig, "sft.toml", ["--base=runs/main", "--lora_rank=8"])

Checked like TrainConfig (llmkern/train/config.py): an unknown key or a value of the wrong type is a
ValueError naming the key; files are parsed as data, never executed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ..train.config import _coerce, apply_settings, parse_overrides, read_config_file
from .templates import check_template_settings

DTYPES = ("auto", "float32", "bfloat16", "float16")
PARALLEL = ("ddp", "fsdp")
BACKENDS = ("", "auto", "cuda", "triton", "torch")

SEED_LIMIT = 2**32  # seeds are in [0, 2**32): PPO's sampling seeds (seed * 1_000_003 + iteration) stay in range

C = TypeVar("C", bound="FinetuneConfig")


@dataclass
class FinetuneConfig:
    """What to start from, what to learn from, where to write, and how to optimize."""

    base: str = ""  # the model to start from: a run or checkpoint folder, or a Hugging Face GPT-2, Llama-family
    #                 (Llama, Mistral, Qwen2, Qwen3), Phi-3/Phi-4-mini, Gemma 2/3, Mixtral or Qwen3-MoE
    #                 model.safetensors (its config.json beside it)
    base_tokenizer: str = "gpt2"  # the tokenizer of a .safetensors base: a tiktoken name, a .tiktoken file, or
    #                               the model's tokenizer.json (its tokenizer_config.json beside it)
    data: str = ""  # the examples: a .json list or .jsonl file (each recipe says which keys)
    out_dir: str = "runs/finetune"  # the run folder: checkpoints/, metrics.jsonl, charts
    overwrite: bool = False  # a fresh start in a folder that holds a run replaces it (else: an error)

    # how long: epochs over the training examples, or exactly max_steps optimizer steps when > 0
    epochs: int = 2
    max_steps: int = 0
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_len: int = 512  # tokens per example (prompt + response); longer ones are cut; <= the model's block_size

    # the prompt template of instruction examples (llmkern/finetune/templates.py): alpaca, chatml, plain, llama3,
    # phi3, phi4-mini or gemma;
    # "" = the base run's own (alpaca when it has none). The resolved template is saved with the run.
    template: str = ""
    system_prompt: str = ""  # the template's system turn (not alpaca's nor plain's); "" = the base run's when its
    #                          template is kept, else none

    # optimization: AdamW on the trainable parameters, linear warmup then cosine decay to min_lr
    lr: float = 5e-5
    min_lr: float = 5e-6
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping

    # evaluation: val_fraction of the examples held out (by a seeded shuffle), evaluated every eval_interval steps
    val_fraction: float = 0.1
    eval_interval: int = 50  # 0 = only before and after training

    # never lost work: the training state (weights, optimizer, RNG, position) goes to out_dir/train_state
    # every ckpt_interval steps (0 = never), and resume=true continues from it as if never stopped
    ckpt_interval: int = 200
    resume: bool = False
    # a finished run's training state goes once its final model is saved (its optimizer moments alone are
    # twice the model, and a finished run has nothing left to resume); true keeps it
    keep_train_state: bool = False

    # LoRA: lora_rank > 0 trains low-rank adapters on the lora_targets linear layers, the rest frozen
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""  # comma-separated module-name endings; "" = every attention and MLP projection

    # under torchrun: "ddp" = every rank holds the whole model and optimizer state, gradients averaged;
    # "fsdp" = FSDP2 shards the weights, gradients and optimizer state over the ranks (a model that does not
    # fit one GPU with its AdamW state). PPO and GRPO take "ddp" only.
    parallel: str = "ddp"

    seed: int = 0
    device: str = "auto"  # "auto": the GPU when there is one
    dtype: str = "auto"  # autocast: "auto" = bf16 on a GPU, fp32 on a CPU; "float16" = fp16 with dynamic loss
    #                      scaling (GPUs without bf16), not for PPO or GRPO
    backend: str = ""  # kernel backend for the model; "" keeps the base model's
    # A mixture-of-experts model's load-balancing loss weight (GPTConfig.router_aux_loss_coef, added to every
    # recipe's loss; see finetune.aux_loss); -1 keeps the base model's (a Hugging Face import's: its config.json's
    # when output_router_logits is true, else 0)
    router_aux_loss_coef: float = -1.0
    progress: bool = True  # the tqdm bar

    # Settings of the common ones above that a recipe never reads, {name: why} (classification has no prompt
    # template): given on the command line, an error; in a config file (which recipes may share) or made in
    # Python, a warning when not the default.
    UNREAD: ClassVar[dict[str, str]] = {}
    # The shortest max_len the recipe can use: a prompt + response row needs a token and one to predict.
    MIN_MAX_LEN: ClassVar[int] = 2
    # The recipe evaluates on held-out examples only (DPO, reward, PPO, GRPO): val_fraction=0 leaves eval_interval
    # unread.
    EVALUATES_HELD_OUT_ONLY: ClassVar[bool] = False

    def validate(self: C) -> C:
        """Check the values that no type can; returns self. Settings that the rest of the config leaves
        unread get a warning."""
        _check_field_types(self)
        for name in ("epochs", "batch_size", "grad_accum", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_len < self.MIN_MAX_LEN:  # else an error once the base is loaded and the data encoded
            raise ValueError(f"max_len must be at least {self.MIN_MAX_LEN} (a prompt token and one to predict), "
                             f"got {self.max_len}")
        for name in ("max_steps", "warmup_steps", "eval_interval", "ckpt_interval", "lora_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.out_dir:  # "" would write the run's checkpoints, log and charts into the current folder
            raise ValueError("out_dir must name the run folder, got ''")
        if not 0 <= self.seed < SEED_LIMIT:  # torch takes no seed past 2**64, PPO's sampling seeds grow
            raise ValueError(f"seed must be in [0, 2**32 - 1], got {self.seed}")
        if not (0 < self.lr < math.inf and 0 <= self.min_lr <= self.lr):  # NaN fails too; inf: NaN weights
            raise ValueError(f"need a finite lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not (0 <= self.weight_decay < math.inf and self.grad_clip >= 0):  # grad_clip=inf: no clipping
            raise ValueError(f"weight_decay (finite) and grad_clip must be >= 0, got {self.weight_decay}, "
                             f"{self.grad_clip}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lora_rank and not 0 < self.lora_alpha < math.inf:  # inf: an infinite scale, NaN adapters
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_targets.strip() and not any(t.strip() for t in self.lora_targets.split(",")):
            raise ValueError(f"lora_targets must name module endings (comma-separated, e.g. 'qkv,fc') or be '' "
                             f"for every attention and MLP projection; got {self.lora_targets!r}, which names none")
        # one spelling of the same targets: "qkv, fc" and "qkv,fc" are one run's setting, which a resume compares
        self.lora_targets = canonical_lora_targets(self.lora_targets)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.router_aux_loss_coef != -1.0 and not 0.0 <= self.router_aux_loss_coef < math.inf:
            raise ValueError(f"router_aux_loss_coef must be a finite number >= 0 (or -1: the base model's), got "
                             f"{self.router_aux_loss_coef}")
        if self.template:  # "" is settled against the base run when the recipe starts
            check_template_settings(self.template, self.system_prompt)
        self._check_device_and_backend()
        self._warn_unread()
        return self

    def _check_device_and_backend(self) -> None:
        """The device, and a backend that llmkern's AdamW can run there, now rather than after the base is
        loaded and the data encoded (the model's layers fall back to torch; the optimizer refuses)."""
        from .. import _backend
        from ..train import distributed

        device = distributed.pick_device(self.device, distributed.detect())  # a ValueError naming the device
        if self.backend and self.parallel != "fsdp":  # FSDP2 steps with torch's AdamW
            _backend.resolve("adamw", self.backend, device)

    def unread_settings(self) -> dict[str, str]:
        """{name: why} of the settings that differ from their default and that this run will not read."""
        default = type(self)()
        changed = {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(default, f.name)}
        unread = dict(self.UNREAD)
        if self.lora_rank == 0:
            unread.update({name: "LoRA is off (lora_rank=0)" for name in ("lora_alpha", "lora_dropout", "lora_targets")})
        if self.max_steps > 0:
            unread["epochs"] = f"max_steps={self.max_steps} sets the length of the run"
        if self.resume:
            unread["overwrite"] = "resume=true continues the run in out_dir"
        if self.EVALUATES_HELD_OUT_ONLY and self.val_fraction == 0:
            unread["eval_interval"] = "val_fraction=0 holds out no example to evaluate on"
        from ..model.hf_common import HF_WEIGHTS_SUFFIXES

        models = [getattr(self, name, "") for name in ("base", "reference")]
        if not any(path.endswith(HF_WEIGHTS_SUFFIXES) for path in models if isinstance(path, str)):
            unread["base_tokenizer"] = "only a Hugging Face .safetensors base takes its tokenizer from it"
        return {name: why for name, why in unread.items() if name in changed}

    def _warn_unread(self) -> None:
        for name, why in self.unread_settings().items():
            warnings.warn(f"{name}={getattr(self, name)!r} has no effect: {why}", stacklevel=3)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def canonical_lora_targets(targets: str) -> str:
    """lora_targets in the one spelling FinetuneConfig.validate gives it ("qkv, fc," is "qkv,fc"), which a resume
    compares: a run saved before that recorded them as typed."""
    return ",".join(t.strip() for t in targets.split(",") if t.strip())


def _check_field_types(config: FinetuneConfig) -> None:
    """Each field of `config` has its annotated type, as apply_settings makes it (ints become floats). A
    config made in Python skips apply_settings, and the checks would then take overwrite="false" for true or
    compare a string with a number."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        setattr(config, f.name, _coerce(f.name, getattr(config, f.name), hints[f.name], type(config).__name__,
                                        from_text=False))


def _recipe_classes() -> dict[str, type]:
    """{method: settings class} of the recipes (llmkern finetune METHOD)."""
    from . import METHODS, get_method

    return {name: get_method(name)[0] for name in METHODS}


def _check_keys(cls: type[FinetuneConfig], values: dict[str, Any], source: str) -> None:
    """A ValueError for a setting of another recipe (naming the recipes that read it) or a dotted one; other
    unknown keys are apply_settings's to report."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key in known:
            continue
        if key == "model" or "." in key:
            raise ValueError(f"setting {key!r} in {source}: fine-tuning settings are plain names (no model.* "
                             f"or other dotted keys: the model's shape comes from base)")
        recipes = _recipe_classes()
        readers = [name for name, c in recipes.items() if key in {f.name for f in dataclasses.fields(c)}]
        if readers:
            this = next((name for name, c in recipes.items() if c is cls), cls.__name__)
            raise ValueError(f"setting {key!r} in {source} is read only by `llmkern finetune "
                             f"{'|'.join(readers)}`, not by {this}")


def load_finetune_config(cls: type[C], path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                         defaults: dict[str, Any] | None = None) -> C:
    """cls's defaults updated by `defaults`, then by the file at `path` (.toml or .json), then by the
    `--key=value` overrides; validated. A setting of another recipe is an error naming the recipes that
    read it; a common setting that cls's recipe never reads (cls.UNREAD) is an error on the command line
    and a warning in the file (a file of common settings may serve several recipes)."""
    if not (isinstance(cls, type) and issubclass(cls, FinetuneConfig)):
        raise TypeError(f"cls must be a FinetuneConfig subclass, got {cls!r}")
    config = apply_settings(cls(), defaults or {}, source="defaults")
    if path:
        values = read_config_file(path)
        _check_keys(cls, values, path)
        config = apply_settings(config, values, source=path)
    # before parse_overrides, which takes model.<field> keys (a table of TrainConfig's) apart
    dotted = [item[2:].split("=", 1)[0] for item in overrides
              if isinstance(item, str) and item.startswith("--") and "." in item.split("=", 1)[0]]
    if dotted:
        _check_keys(cls, {dotted[0]: None}, "command line")
    values = parse_overrides(overrides)
    _check_keys(cls, values, "command line")
    unread = [key for key in values if key in cls.UNREAD]
    if unread:
        key = unread[0]
        raise ValueError(f"setting {key!r} on the command line has no effect: {cls.UNREAD[key]}; drop it")
    config = apply_settings(config, values, source="command line", from_text=True)
    return config.validate()
