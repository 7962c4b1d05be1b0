"""`llmkern train`: load the config, train, report the validation loss, print samples.

With no config file the defaults are the README's main job: the standard-library corpus,
byte-level tokens, and a model sized for the machine: the "tiny" preset for a few minutes on a
CPU, or on a GPU a GPT-2-small-shaped model for a few minutes in bf16 (GPU_DEFAULTS).

Why byte-level tokens: they need no training, every machine has them, and on a few MB of text a
small model learns bytes fast; a BPE would cost minutes of the CPU budget to train first. Pass
--tokenizer=<spec> (a tiktoken name or a .tiktoken file, e.g. one from `llmkern tokenizer train`)
for another one.
"""

from __future__ import annotations

import os

import torch

GPU_DEFAULTS = {
    "preset": "gpt2", "out_dir": "runs/main-gpu", "seq_len": 512, "micro_batch": 32, "batch_tokens": 65536,
    "max_steps": 600, "lr": 6e-4, "min_lr": 6e-5, "warmup_steps": 60, "eval_interval": 100, "eval_steps": 2,
    "ckpt_interval": 200, "corpus_max_bytes": 64_000_000,
}
SAMPLE_PROMPTS = ("def ", "import os\n", "class ", "# ")


def run_train(config_path: str | None, overrides: list[str], resume: bool = False, samples: int = 3) -> dict:
    """Train as configured; returns the Trainer's summary. Prints the evaluations and, on rank 0, samples."""
    from . import distributed
    from .config import load_config
    from .metrics import read_metrics
    from .trainer import Trainer

    on_gpu = torch.cuda.is_available() and not any(o.startswith("--device=cpu") for o in overrides)
    defaults = GPU_DEFAULTS if on_gpu and config_path is None else None
    config = load_config(config_path, overrides, defaults=defaults)
    trainer = Trainer(config)
    if trainer.dist.is_main:
        model = trainer.raw_model
        print(f"llmkern train: {config.preset} model, {model.num_parameters() / 1e6:.2f}M parameters, "
              f"{config.max_steps} steps of {config.batch_tokens} tokens on {trainer.device} "
              f"({trainer.dist.world_size} process{'es' if trainer.dist.world_size > 1 else ''}), "
              f"data {trainer.data_dir} ({trainer.train_loader.num_tokens:,} training tokens), run folder {config.out_dir}")
    try:
        summary = trainer.fit(resume=resume)
    finally:
        distributed.shutdown()
    if not trainer.dist.is_main:
        return summary
    evals = [r for r in read_metrics(os.path.join(config.out_dir, "metrics.jsonl")) if r["kind"] == "eval"]
    print("\nvalidation loss: " + " -> ".join(f"{r['val_loss']:.3f} (step {r['step']})" for r in evals))
    print(f"stopped: {summary['stop_reason']} after {summary['steps']} steps; run folder {config.out_dir}: "
          f"checkpoints/, metrics.jsonl, loss.png, lr.png, throughput.png")
    if samples > 0 and not (trainer.dist.is_distributed and config.parallel == "fsdp"):  # FSDP: weights are sharded
        print_samples(trainer.raw_model, trainer.manifest["tokenizer"], SAMPLE_PROMPTS[:samples], config.seed)
    return summary


def print_samples(model, tokenizer_spec: str, prompts, seed: int, max_new_tokens: int = 200) -> None:
    from ..data.tokenizer import get_tokenizer
    from .inference import sample_text

    tokenizer = get_tokenizer(tokenizer_spec)
    for i, text in enumerate(sample_text(model, tokenizer, list(prompts), max_new_tokens, seed=seed)):
        print(f"\n--- sample {i + 1} (prompt {prompts[i]!r}) ---\n{text}")
