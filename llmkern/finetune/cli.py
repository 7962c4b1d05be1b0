"""`llmkern finetune METHOD [--config FILE] [--key=value ...]`: run a fine-tuning recipe."""

from __future__ import annotations

import argparse
import json
import sys

from . import METHODS


def _cmd_finetune(args: argparse.Namespace) -> int:
    from . import get_method, load_finetune_config
    from .loop import FinetuneDiverged

    from ..train import distributed
    from ..train.interrupt import TrainingInterrupted

    if args.settings:
        from ..train.config import describe_settings

        config_cls, _ = get_method(args.method)
        print(f"llmkern finetune {args.method} settings (--key=value, or a --config file), with their defaults:")
        print(describe_settings(config_cls))
        return 0
    try:
        config_cls, run = get_method(args.method)
        config = load_finetune_config(config_cls, args.config, args.overrides)
        summary = run(config)
    except FinetuneDiverged as err:
        distributed.shutdown(wait_for_others=False)
        print(f"llmkern finetune {args.method}: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        distributed.shutdown(wait_for_others=False)
        print(f"llmkern finetune {args.method}: stopped by {err}", file=sys.stderr)
        return err.exit_status
    except (ValueError, TypeError, OSError) as err:
        distributed.shutdown(wait_for_others=False)
        print(f"llmkern finetune {args.method}: error: {err}", file=sys.stderr)
        return 2
    except BaseException:  # any other error (as the RuntimeError of a rank whose peer failed): leave the group too
        distributed.shutdown(wait_for_others=False)
        raise
    distributed.shutdown()  # under torchrun: leave the process group once every rank is done
    if distributed.detect().is_main:
        print(json.dumps(summary, indent=1, default=str))
    return 0


def add_finetune_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a trained model: " + ", ".join(METHODS),
        epilog="settings: --config FILE (TOML/JSON) and --key=value overrides; the common ones are in "
               "llmkern/finetune/config.py (base, data, out_dir, epochs, lr, lora_rank, template, ...), "
               "each method's own "
               "in llmkern/finetune/<method>.py. Example: llmkern finetune sft --base=runs/main "
               "--data=instruction-data.json --lora_rank=8. Prompt templates (--template=): alpaca (default), "
               "chatml, llama3, phi3, phi4-mini and gemma (with --system_prompt=...), plain; a run started from a "
               "fine-tuned one keeps "
               "its template. "
               "`llmkern finetune METHOD --settings` lists every setting.",
    )
    p.add_argument("method", choices=list(METHODS), help="the recipe")
    p.add_argument("--config", default=None, help="a .toml or .json settings file")
    p.add_argument("--settings", action="store_true", help="list every setting of the recipe with its default and "
                                                           "meaning, and exit")
    p.set_defaults(func=_cmd_finetune, accepts_overrides=True)
