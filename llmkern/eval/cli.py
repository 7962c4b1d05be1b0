"""`llmkern eval`: score a trained run.

    llmkern eval --run R --data SHARDS                     loss and perplexity on token shards
    llmkern eval --run R --text FILE [--stride N]          perplexity of a text file (sliding window)
    llmkern eval --run R --task choice --data TASK.jsonl   multiple-choice accuracy and acc_norm
    llmkern eval --task win-rate --run A --baseline B --judge RM_RUN --data instructions.json [--limit N]
                 [--template chatml]   (default: each run's own prompt template)
                 [--judge-kind lm]     (--judge is a language model asked "A or B?"; default: a reward model)

Each prints one line per metric; --json OUT also writes the result as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

from .._atomic import write_json_atomic

TASKS = ("perplexity", "choice", "win-rate")
JUDGE_KINDS = ("reward", "lm")  # llmkern.eval.win_rate.JUDGE_KINDS, without importing torch for --help


def _check_args(args: argparse.Namespace) -> None:
    """Which options each task needs (argparse alone cannot say it)."""
    if args.task == "perplexity":
        if (args.data is None) == (args.text is None):
            raise ValueError("--task perplexity needs exactly one of --data SHARDS (token shards) or --text FILE")
    elif args.text is not None:
        raise ValueError(f"--text is for --task perplexity, not {args.task}")
    elif args.data is None:
        raise ValueError(f"--task {args.task} needs --data FILE")
    if args.task == "win-rate" and (args.baseline is None or args.judge is None):
        raise ValueError("--task win-rate needs --baseline RUN and --judge RUN (a reward model, or a language "
                         "model with --judge-kind lm)")
    if args.task != "win-rate" and (args.baseline is not None or args.judge is not None
                                    or args.judge_kind is not None):
        raise ValueError("--baseline, --judge and --judge-kind are for --task win-rate")
    if args.task != "win-rate" and (args.template is not None or args.system_prompt is not None):
        raise ValueError("--template and --system-prompt are for --task win-rate")
    if args.task != "choice" and args.fewshot:
        raise ValueError("--fewshot is for --task choice")
    if args.text is None:  # shards are scored in windows of block_size: these would be ignored, silently
        for option, value in (("--context", args.context), ("--stride", args.stride)):
            if value is not None:
                raise ValueError(f"{option} is for --text (the windows of a text file's perplexity)")


def _run(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """(the result, the names of the metrics to print, in order)."""
    progress = not args.quiet
    if args.task == "perplexity" and args.data is not None:
        from ..train.inference import evaluate_run

        result = evaluate_run(args.run, args.data, args.split, args.batch_size, args.max_batches, args.device)
        split = result["split"]
        result = {f"{split} loss": result["loss"], f"{split} perplexity": result["perplexity"],
                  "tokens": result["tokens"], "data": result["data"]}
        return result, list(result)

    if args.task == "win-rate":
        from .win_rate import compare_runs

        result = compare_runs(args.run, args.baseline, args.judge, args.data, args.limit, args.max_new_tokens,
                              args.device, args.tie_margin, args.interval, args.batch_size, progress,
                              args.template, args.system_prompt, args.judge_kind or "reward")
        result["ci"] = (f"[{result['ci_low']:.4f}, {result['ci_high']:.4f}] "
                        f"({result['confidence']:.0%} {result['interval']})")
        mean = "mean_preference" if result["judge_type"] == "pair" else "mean_score_diff"
        shown = ["win_rate", "ci", "wins", "ties", "losses", "n", mean, "judge_kind"]
        return result, shown + (["cut_prompts"] if "cut_prompts" in result else [])

    from ..train.inference import load_trained_model

    model, tokenizer, _ = load_trained_model(args.run, args.device)
    if args.task == "perplexity":
        from .perplexity import perplexity_of_text

        # newline="": the file's own line ends ("\r\n" too) are scored and counted in bits_per_byte
        with open(args.text, encoding="utf-8", newline="") as f:
            text = f.read()
        result = perplexity_of_text(model, tokenizer, text, stride=args.stride, context=args.context,
                                    batch_size=args.batch_size, progress=progress)
        result["text"] = os.path.abspath(args.text)
        return result, ["loss", "perplexity", "bits_per_byte", "tokens", "context", "stride"]

    from .multiple_choice import evaluate_choices

    result = evaluate_choices(model, tokenizer, args.data, batch_size=args.batch_size, limit=args.limit,
                              return_predictions=args.predictions, progress=progress, fewshot=args.fewshot)
    result["data"] = os.path.abspath(args.data)
    return result, ["accuracy", "acc_norm", "examples"]


def _format(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}"


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        _check_args(args)
        result, shown = _run(args)
        if args.json:
            write_json_atomic(args.json, {"task": args.task, "run": os.path.abspath(args.run), **result})
    except (ValueError, TypeError, OSError, ImportError) as err:
        print(f"llmkern eval: error: {err}", file=sys.stderr)
        return 2
    width = max(len(name) for name in shown)
    for name in shown:
        print(f"{name:<{width}}  {_format(result[name])}")
    return 0


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="score a trained run: perplexity (shards or text), multiple choice, win rate",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--run", required=True, help="a run folder (its newest checkpoint) or a checkpoint folder")
    e.add_argument("--task", choices=TASKS, default="perplexity")
    e.add_argument("--data", default=None, help="perplexity: a folder of token shards (manifest.json); choice: "
                                                "a .jsonl task; win-rate: a .json/.jsonl of instructions")
    e.add_argument("--text", default=None, help="perplexity of this UTF-8 text file (sliding window)")
    e.add_argument("--split", default="val", help="the shard split (perplexity on --data)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-batches", type=int, default=100, help="perplexity on --data: batches scored at most")
    e.add_argument("--context", type=int, default=None, help="--text: window length (default: block_size)")
    e.add_argument("--stride", type=int, default=None, help="--text: window step (default: context // 2)")
    e.add_argument("--limit", type=int, default=None, help="choice, win-rate: the first N examples only")
    e.add_argument("--fewshot", type=int, default=0, help="choice: solved examples of the task before each one")
    e.add_argument("--predictions", action="store_true", help="choice: per-example predictions in --json")
    e.add_argument("--baseline", default=None, help="win-rate: the run compared against")
    e.add_argument("--judge", default=None, help="win-rate: the judge's run: a reward model (llmkern finetune "
                                                 "reward), or a language model with --judge-kind lm")
    e.add_argument("--judge-kind", choices=JUDGE_KINDS, default=None,
                   help="win-rate: reward (the default: scores each response alone) or lm (asked which of the "
                        "two responses is better, in both orders)")
    e.add_argument("--max-new-tokens", type=int, default=256, help="win-rate: response length at most")
    e.add_argument("--tie-margin", type=float, default=0.0, help="win-rate: score gaps this small are ties "
                                                                           "(--judge-kind lm: |P(A better) - 0.5|)")
    e.add_argument("--interval", choices=("wilson", "bootstrap"), default="wilson", help="win-rate: 95%% interval")
    e.add_argument("--template", default=None, help="win-rate: prompt both runs in this template (alpaca, chatml, "
                                                    "plain); default: each run's own (the judge always reads its own)")
    e.add_argument("--system-prompt", default=None, help="win-rate, chatml: the system turn (default: the run's)")
    e.add_argument("--json", default=None, metavar="OUT", help="also write the result to this JSON file")
    e.add_argument("--device", default="auto", help="auto: the GPU when there is one")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_eval)
