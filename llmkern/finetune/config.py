"""FinetuneConfig: the settings every fine-tuning recipe shares (SFT, classification, DPO, reward model,
PPO add their own fields in subclasses), from a TOML/JSON file plus `--key=value` overrides.

    cfg = load_finetune_config(SFTConfig, "sft.toml", ["--base=runs/main", "--lora_rank=8"])

Checked like TrainConfig (llmkern/train/config.py): an unknown key or a value of the wrong type is a
ValueError naming the key; files are parsed as data, never executed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from ..train.config import apply_settings, parse_overrides, read_config_file
from .templates import check_template_settings

DTYPES = ("auto", "float32", "bfloat16", "float16")
PARALLEL = ("ddp", "fsdp")
BACKENDS = ("", "auto", "cuda", "triton", "torch")

C = TypeVar("C", bound="FinetuneConfig")


@dataclass
class FinetuneConfig:
    """What to start from, what to learn from, where to write, and how to optimize."""

    base: str = ""  # the model to start from: a run or checkpoint folder, or a Hugging Face GPT-2 .safetensors file
    base_tokenizer: str = "gpt2"  # the tokenizer of a .safetensors base: a tiktoken name or .tiktoken file
    data: str = ""  # the examples: a .json list or .jsonl file (each recipe says which keys)
    out_dir: str = "runs/finetune"  # the run folder: checkpoints/, metrics.jsonl, charts
    overwrite: bool = False  # a fresh start in a folder that holds a run replaces it (else: an error)

    # how long: epochs over the training examples, or exactly max_steps optimizer steps when > 0
    epochs: int = 2
    max_steps: int = 0
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_len: int = 512  # tokens per example (prompt + response); longer ones are cut; <= the model's block_size

    # the prompt template of instruction examples (llmkern/finetune/templates.py): alpaca, chatml or plain;
    # "" = the base run's own (alpaca when it has none). The resolved template is saved with the run.
    template: str = ""
    system_prompt: str = ""  # chatml's system turn; "" = the base run's when its template is kept, else none

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
    # fit one GPU with its AdamW state). PPO takes "ddp" only.
    parallel: str = "ddp"

    seed: int = 0
    device: str = "auto"  # "auto": the GPU when there is one
    dtype: str = "auto"  # autocast: "auto" = bf16 on a GPU, fp32 on a CPU; "float16" = fp16 with dynamic loss
    #                      scaling (GPUs without bf16), not for PPO
    backend: str = ""  # kernel backend for the model; "" keeps the base model's
    progress: bool = True  # the tqdm bar

    def validate(self: C) -> C:
        """Check the values that no type can; returns self."""
        for name in ("epochs", "batch_size", "grad_accum", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_interval", "ckpt_interval", "lora_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):  # written so that NaN fails too
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not (self.weight_decay >= 0 and self.grad_clip >= 0):
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, {self.grad_clip}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lora_rank and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.template:  # "" is settled against the base run when the recipe starts
            check_template_settings(self.template, self.system_prompt)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_finetune_config(cls: type[C], path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                         defaults: dict[str, Any] | None = None) -> C:
    """cls's defaults updated by `defaults`, then by the file at `path` (.toml or .json), then by the
    `--key=value` overrides; validated."""
    if not (isinstance(cls, type) and issubclass(cls, FinetuneConfig)):
        raise TypeError(f"cls must be a FinetuneConfig subclass, got {cls!r}")
    config = apply_settings(cls(), defaults or {}, source="defaults")
    if path:
        config = apply_settings(config, read_config_file(path), source=path)
    config = apply_settings(config, parse_overrides(overrides), source="command line", from_text=True)
    return config.validate()
