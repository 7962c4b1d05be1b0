"""Fine-tuning recipes: instruction SFT, classification, DPO, a reward model, PPO and GRPO, each with or
without LoRA adapters. Every recipe is a settings dataclass (a FinetuneConfig) and a run function:

    from llmkern.finetune import load_finetune_config, get_method
    config_cls, run = get_method("sft")
    summary = run(load_finetune_config(config_cls, None, ["--base=runs/main", "--data=instructions.json"]))

`llmkern finetune METHOD --base=RUN --data=FILE [--key=value ...]` does the same from the shell.
"""

from __future__ import annotations

import importlib

from .config import FinetuneConfig, load_finetune_config

# method name -> (module, settings class, run function); imported when asked for
METHODS = {
    "sft": ("sft", "SFTConfig", "run_sft"),
    "classify": ("classify", "ClassifyConfig", "run_classify"),
    "dpo": ("dpo", "DPOConfig", "run_dpo"),
    "reward": ("reward", "RewardConfig", "run_reward"),
    "ppo": ("ppo", "PPOConfig", "run_ppo"),
    "grpo": ("grpo", "GRPOConfig", "run_grpo"),
}


def get_method(name: str):
    """(settings class, run function) of a recipe."""
    if name not in METHODS:
        raise ValueError(f"unknown fine-tuning method {name!r}; choose one of {', '.join(METHODS)}")
    module_name, config_name, run_name = METHODS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, config_name), getattr(module, run_name)


__all__ = ["FinetuneConfig", "METHODS", "get_method", "load_finetune_config"]
