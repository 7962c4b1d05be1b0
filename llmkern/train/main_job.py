"""`llmkern train`: load the config, train, report the validation loss, print samples.

With no config file the defaults are the README's main job: the standard-library corpus,
byte-level tokens, and a model sized for the machine: a 4-layer "tiny" for a few minutes on a
CPU (CPU_DEFAULTS), or on a GPU a GPT-2-small-shaped model for a few minutes in bf16 (GPU_DEFAULTS).

Why a BPE trained on the corpus (on the CPU): llmkern's C++ BPE trainer learns 2048 tokens from
the 4 MB corpus in under a second and a token then covers about 2.9 bytes, so a step sees about
three times the text. Measured on the 2-core machine, otherwise idle: 700 BPE steps took 2m21s to a
validation loss of 1.28 nats per byte, the loss that 1000 byte-level steps reached in 2m47s, and the
samples are made of whole identifiers (self.assertEqual, asyncio.loop) instead of letter soup. The
GPU run keeps byte-level tokens: no tokenizer file to carry around, and a GPU has compute to spare.
--tokenizer=<spec> picks another one ("bytes", "bpe:<N>", a tiktoken name or .tiktoken file).
"""

from __future__ import annotations

import os

import torch

# The main job's settings over TrainConfig's defaults, when no config file is given. The CPU run:
# a BPE of 2048 tokens trained on the corpus, 1.4M tokens through a 2.2M-parameter model.
CPU_DEFAULTS = {
    "tokenizer": "bpe:2048", "model": {"n_layer": 4, "n_embd": 192}, "max_steps": 700, "warmup_steps": 40,
    "eval_interval": 100, "ckpt_interval": 250,
}
GPU_DEFAULTS = {
    "preset": "gpt2", "out_dir": "runs/main-gpu", "seq_len": 512, "micro_batch": 32, "batch_tokens": 65536,
    "max_steps": 600, "lr": 6e-4, "min_lr": 6e-5, "warmup_steps": 60, "eval_interval": 100, "eval_steps": 2,
    "ckpt_interval": 200, "corpus_max_bytes": 64_000_000,
}
SAMPLE_PROMPTS = ("def ", "import os\n", "class ", "# ")


def run_train(config_path: str | None, overrides: list[str], resume: bool = False, samples: int = 3) -> dict:
    """Train as configured; returns the Trainer's summary. Prints the evaluations and, on rank 0, samples."""
    from . import distributed
    from .config import load_config, parse_overrides
    from .metrics import read_metrics
    from .trainer import Trainer, check_run_folder

    given = parse_overrides(overrides)  # the keys as load_config reads them: --init-from is init_from
    on_gpu = torch.cuda.is_available() and not str(given.get("device", "")).startswith("cpu")
    defaults = None if config_path is not None else GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    if defaults and given.get("init_from"):  # the model comes from init_from
        defaults = {k: v for k, v in defaults.items() if k not in ("model", "preset")}
    elif defaults and "preset" in given:  # the model is the preset asked for, not the defaults' reshaped tiny
        defaults = {k: v for k, v in defaults.items() if k != "model"}
    config = load_config(config_path, overrides, defaults=defaults)
    check_run_folder(config.out_dir, resume, config.overwrite, config.max_steps)  # now, not after the data and model
    try:  # from the Trainer on: it joins the process group, and its setup may fail after that
        trainer = Trainer(config)
        if trainer.dist.is_main:
            model = trainer.raw_model
            source = f"the model of {config.init_from}" if config.init_from else f"{config.preset} model"
            print(f"llmkern train: {source}, {model.num_parameters() / 1e6:.2f}M parameters, "
                  f"{config.max_steps} steps of {config.batch_tokens} tokens on {trainer.device} "
                  f"({trainer.dist.world_size} process{'es' if trainer.dist.world_size > 1 else ''}, "
                  f"{precision(trainer)}), data {trainer.data_dir} ({trainer.train_loader.num_tokens:,} training "
                  f"tokens), run folder {config.out_dir}")
        summary = trainer.fit(resume=resume)
    except BaseException:
        distributed.shutdown(wait_for_others=False)
        raise
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


def precision(trainer) -> str:
    """How the run computes: the autocast dtype (and loss scaling), or plain float32."""
    if trainer.autocast_dtype is None:
        return "float32"
    name = str(trainer.autocast_dtype).replace("torch.", "")
    return f"{name} autocast" + (" with loss scaling" if trainer.loss_scale else "")


def print_samples(model, tokenizer_spec: str, prompts, seed: int, max_new_tokens: int = 200) -> None:
    from ..data.tokenizer import get_tokenizer
    from .inference import sample_text

    tokenizer = get_tokenizer(tokenizer_spec)
    for i, text in enumerate(sample_text(model, tokenizer, list(prompts), max_new_tokens, seed=seed)):
        print(f"\n--- sample {i + 1} (prompt {prompts[i]!r}) ---\n{text}")
