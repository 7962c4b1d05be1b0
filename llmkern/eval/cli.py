"""`llmkern eval`: score a trained run.

    llmkern eval --run R --data SHARDS [--split val] [--max-batches 100]    loss and perplexity on token shards
    llmkern eval --run R --text FILE [--context N] [--stride N]             perplexity of a text file (sliding window)
    llmkern eval --run R --task choice --data TASK.jsonl [--limit N] [--fewshot K [--fewshot-data TRAIN_OR_DEV]]
                 [--predictions --json OUT]
                                                                            multiple-choice accuracy, and acc_norm
                                                                            where the harness reports it
                                                                            (TruthfulQA MC2: mc2; its export,
                                                                            MC1 and MC2: accuracy and mc2)
    llmkern eval --run R --task lambada --data lambada_test.jsonl [--limit N]
                                                                            LAMBADA: last-word accuracy, perplexity
                                                                            (its stderr the harness's bootstrap,
                                                                            10,000 resamples)
    llmkern eval --run R --task gsm8k --data test.jsonl --fewshot-data train.jsonl [--fewshot 5] [--limit N]
                 [--max-new-tokens 256] [--predictions --json OUT]
                                                                            GSM8K, generated greedily: exact_match
                                                                            (strict-match and flexible-extract), as
                                                                            lm-evaluation-harness's gsm8k (5-shot)
    llmkern eval --task win-rate --run A --baseline B --judge RM_RUN --data instructions.json [--limit N]
                 [--template chatml]   (default: each run's own prompt template)
                 [--judge-kind lm]     (--judge is a language model asked "A or B?"; default: a reward model)
                 [--max-new-tokens N] [--tie-margin X] [--interval wilson|bootstrap]

Each prints one line per metric, with its standard error after "±" where lm-evaluation-harness reports one
(computed as it does; "N/A" for one example; MMLU's subjects pooled as its mmlu group pools them, with a line for
each of its categories); --json OUT also writes the result as JSON, the standard errors as "<metric>_stderr"
(MMLU's categories under "categories"). An option given to a task that does not read it is an error, not silently
ignored. --fewshot-data must be of the task scored (its train or dev split): another task's file is refused.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from .._atomic import write_json_atomic

TASKS = ("perplexity", "choice", "win-rate", "lambada", "gsm8k")
JUDGE_KINDS = ("reward", "lm")  # llmkern.eval.win_rate.JUDGE_KINDS, without importing torch for --help
GSM8K_FEWSHOT = 5  # llmkern.eval.gsm8k.FEWSHOT, likewise

# What each mode is called in an error message.
MODES = {"shards": "--task perplexity --data SHARDS", "text": "--task perplexity --text FILE",
         "choice": "--task choice", "win-rate": "--task win-rate", "lambada": "--task lambada",
         "gsm8k": "--task gsm8k"}
# The options that only some modes read: given to another, they would have no effect. Their argparse
# default is None, so that one the user gave (even at its default value) can be told from one left out;
# DEFAULTS fills in the real defaults once the check is done.
ONLY_FOR = {
    "split": ("shards",), "max_batches": ("shards",),
    "context": ("text",), "stride": ("text",),
    "limit": ("choice", "win-rate", "lambada", "gsm8k"),
    "fewshot": ("choice", "gsm8k"), "fewshot_data": ("choice", "gsm8k"), "predictions": ("choice", "gsm8k"),
    "max_new_tokens": ("win-rate", "gsm8k"),
    **{name: ("win-rate",) for name in ("baseline", "judge", "judge_kind", "tie_margin", "interval", "template",
                                        "system_prompt")},
}
DEFAULTS = {"split": "val", "max_batches": 100, "fewshot": 0, "predictions": False, "max_new_tokens": 256,
            "tie_margin": 0.0, "interval": "wilson", "judge_kind": "reward"}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _mode(args: argparse.Namespace) -> str:
    """The key of MODES that args ask for; an error when the task lacks its data or gets the wrong kind."""
    if args.task == "perplexity":
        if (args.data is None) == (args.text is None):
            raise ValueError("--task perplexity needs exactly one of --data SHARDS (token shards) or --text FILE")
        return "shards" if args.text is None else "text"
    if args.text is not None:
        raise ValueError(f"--text is for --task perplexity, not {args.task}")
    if args.data is None:
        raise ValueError(f"--task {args.task} needs --data FILE")
    return args.task


def _check_args(args: argparse.Namespace) -> None:
    """Which options each task needs and reads (argparse alone cannot say it); then the defaults filled in."""
    mode = _mode(args)
    for name, modes in ONLY_FOR.items():
        if getattr(args, name) is not None and mode not in modes:
            raise ValueError(f"{_option(name)} is for {' and '.join(MODES[m] for m in modes)}; it has no effect "
                             f"on {MODES[mode]}")
    if mode == "win-rate" and (args.baseline is None or args.judge is None):
        raise ValueError("--task win-rate needs --baseline RUN and --judge RUN (a reward model, or a language "
                         "model with --judge-kind lm)")
    if args.json == "":  # the write would fail with a puzzling "'.tmp' -> ''"
        raise ValueError("--json needs a file name, got an empty one")
    if args.predictions and args.json is None:  # they are written to the JSON file only
        raise ValueError("--predictions are written to --json OUT; give --json too")
    # Checked here, before any model is loaded, and named as options: some would be misread further down
    # (--max-batches 0 scored one batch; --max-new-tokens 0 made every response empty, so all ties), and
    # --tie-margin was checked only after both runs had generated their responses.
    for name in ("batch_size", "max_batches", "context", "stride", "limit", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"{_option(name)} must be at least 1, got {value}")
    if mode == "gsm8k":
        _check_gsm8k_shots(args)
    if args.fewshot is not None and args.fewshot < 0:
        raise ValueError(f"--fewshot must be at least 0, got {args.fewshot}")
    if args.fewshot_data is not None and not args.fewshot:
        raise ValueError("--fewshot-data needs --fewshot K (the shots taken from it)")
    if args.fewshot_data is not None and not os.path.isfile(args.fewshot_data):
        raise ValueError(f"--fewshot-data {args.fewshot_data!r} is not a file")
    if args.tie_margin is not None and not 0 <= args.tie_margin < math.inf:
        raise ValueError(f"--tie-margin must be a finite number >= 0, got {args.tie_margin}")
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    # Before any model is loaded: a missing --text was found only once the model had loaded, and a --json
    # that cannot be written only after the whole evaluation had run, its result lost.
    if args.text is not None and not os.path.isfile(args.text):
        raise ValueError(f"--text {args.text!r} is not a file")
    if args.json is not None:
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(folder):
            raise ValueError(f"--json {args.json!r} cannot be written: " +
                             ("it is a folder" if os.path.isdir(args.json) else f"no folder {folder!r}"))


def _check_gsm8k_shots(args: argparse.Namespace) -> None:
    """GSM8K's shots: 5 unless told (the harness's num_fewshot, the published setting), drawn from the train
    split, which must then be given (the harness never takes them from the questions scored)."""
    if args.fewshot is None:
        args.fewshot = GSM8K_FEWSHOT
    if args.fewshot > 0 and args.fewshot_data is None:
        raise ValueError(f"--task gsm8k --fewshot {args.fewshot} takes its shots from GSM8K's train split, as "
                         f"lm-evaluation-harness does: give --fewshot-data train.jsonl (or --fewshot 0)")


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
                              args.template, args.system_prompt, args.judge_kind)
        result["ci"] = (f"[{result['ci_low']:.4f}, {result['ci_high']:.4f}] "
                        f"({result['confidence']:.0%} {result['interval']})")
        mean = "mean_preference" if result["judge_type"] == "pair" else "mean_score_diff"
        shown = ["win_rate", "ci", "wins", "ties", "losses", "n", mean, "judge_kind"]
        return result, shown + (["cut_prompts"] if "cut_prompts" in result else [])

    from ..train.inference import load_trained_model

    # The checkpoint is dropped at once: it holds a host copy of the weights, which a `_` kept alive for the whole
    # evaluation.
    model, tokenizer = load_trained_model(args.run, args.device)[:2]
    if args.task == "perplexity":
        from .perplexity import perplexity_of_text

        # newline="": the file's own line ends ("\r\n" too) are scored and counted in bits_per_byte
        try:
            with open(args.text, encoding="utf-8", newline="") as f:
                text = f.read()
        except UnicodeDecodeError as err:  # its message names neither the file nor the option
            raise ValueError(f"--text {args.text}: not UTF-8 text ({err})") from err
        result = perplexity_of_text(model, tokenizer, text, stride=args.stride, context=args.context,
                                    batch_size=args.batch_size, progress=progress)
        result["text"] = os.path.abspath(args.text)
        return result, ["loss", "perplexity", "bits_per_byte", "tokens", "context", "stride"]

    if args.task == "lambada":
        from .lambada import evaluate_lambada

        result = evaluate_lambada(model, tokenizer, args.data, args.batch_size, args.limit, progress)
        result["data"] = os.path.abspath(args.data)
        return result, ["accuracy", "perplexity", "examples"]

    if args.task == "gsm8k":
        from .gsm8k import evaluate_gsm8k

        result = evaluate_gsm8k(model, tokenizer, args.data, fewshot=args.fewshot, fewshot_data=args.fewshot_data,
                                limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                return_predictions=args.predictions, progress=progress)
        result["data"] = os.path.abspath(args.data)
        return result, ["exact_match_strict", "exact_match_flexible", "examples", "cut_prompts"]

    from .multiple_choice import evaluate_choices

    result = evaluate_choices(model, tokenizer, args.data, batch_size=args.batch_size, limit=args.limit,
                              return_predictions=args.predictions, progress=progress, fewshot=args.fewshot,
                              fewshot_data=args.fewshot_data)
    result["data"] = os.path.abspath(args.data)
    # acc_norm where the task's harness yaml lists it; TruthfulQA MC2: mc2; its export (MC1 and MC2): both
    return result, [name for name in ("accuracy", "acc_norm", "mc2", "examples") if name in result]


def _format(value: object) -> str:
    if value is None:  # a standard error of one example: the harness writes "N/A"
        return "N/A"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}"


def _shown(result: dict, name: str) -> str:
    """A metric's value, with its standard error after it where there is one (as the harness's table writes it)."""
    stderr = f"{name}_stderr"
    return _format(result[name]) + (f" ± {_format(result[stderr])}" if stderr in result else "")


def _category_lines(result: dict) -> list[tuple[str, str]]:
    """(name, value) of each of MMLU's categories, where the result has them, as the harness's group table lists
    them under mmlu."""
    return [(f"accuracy ({category.replace('_', ' ')})", _shown(figures, "accuracy"))
            for category, figures in result.get("categories", {}).items()]


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        _check_args(args)
        result, shown = _run(args)
        if args.json is not None:
            write_json_atomic(args.json, {"task": args.task, "run": os.path.abspath(args.run), **result})
    except (ValueError, TypeError, OSError, ImportError) as err:
        print(f"llmkern eval: error: {err}", file=sys.stderr)
        return 2
    lines = [(name, _shown(result, name)) for name in shown] + _category_lines(result)
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name:<{width}}  {value}")
    return 0


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="score a trained run: perplexity (shards or text), multiple choice, LAMBADA, "
                                    "GSM8K, win rate",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--run", required=True, help="a run folder (its newest checkpoint) or a checkpoint folder")
    e.add_argument("--task", choices=TASKS, default="perplexity")
    e.add_argument("--data", default=None, help="perplexity: a folder of token shards (manifest.json); choice: "
                                                "a .jsonl task; win-rate: a .json/.jsonl of instructions; "
                                                "lambada: lambada_openai's .jsonl; gsm8k: openai/gsm8k's "
                                                "test .jsonl")
    e.add_argument("--text", default=None, help="perplexity of this UTF-8 text file (sliding window)")
    # default=None: not given (see ONLY_FOR); the defaults the help texts name are DEFAULTS
    e.add_argument("--split", default=None, help="perplexity on --data: the shard split (default: val)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-batches", type=int, default=None, help="perplexity on --data: batches scored at most "
                                                                  "(default: 100)")
    e.add_argument("--context", type=int, default=None, help="--text: window length (default: block_size)")
    e.add_argument("--stride", type=int, default=None, help="--text: window step (default: context // 2)")
    e.add_argument("--limit", type=int, default=None, help="choice, win-rate, lambada, gsm8k: the first N "
                                                           "examples only")
    e.add_argument("--fewshot", type=int, default=None, help="choice, gsm8k: solved examples of the task before "
                                                             "each one (default: 0; gsm8k: 5)")
    e.add_argument("--fewshot-data", default=None, help="choice, with --fewshot: take the shots from this file, "
                                                        "not from the task, as lm-evaluation-harness does (MMLU's "
                                                        "dev split: its first K of each subject; the other tasks' "
                                                        "train split: sampled, seed 1234); gsm8k: the train split, "
                                                        "sampled as the harness does")
    e.add_argument("--predictions", action="store_true", default=None, help="choice, gsm8k: per-example "
                                                                            "predictions in --json")
    e.add_argument("--baseline", default=None, help="win-rate: the run compared against")
    e.add_argument("--judge", default=None, help="win-rate: the judge's run: a reward model (llmkern finetune "
                                                 "reward), or a language model with --judge-kind lm")
    e.add_argument("--judge-kind", choices=JUDGE_KINDS, default=None,
                   help="win-rate: reward (the default: scores each response alone) or lm (asked which of the "
                        "two responses is better, in both orders)")
    e.add_argument("--max-new-tokens", type=int, default=None, help="win-rate, gsm8k: response length at "
                                                                    "most (default: 256)")
    e.add_argument("--tie-margin", type=float, default=None, help="win-rate: score gaps this small are ties "
                                                                  "(--judge-kind lm: |P(A better) - 0.5|; default: 0)")
    e.add_argument("--interval", choices=("wilson", "bootstrap"), default=None,
                   help="win-rate: the 95%% interval (default: wilson)")
    e.add_argument("--template", default=None, help="win-rate: prompt both runs in this template (alpaca, chatml, "
                                                    "plain, llama3, phi3, phi4-mini, gemma); default: each run's own "
                                                    "(the judge always reads its own)")
    e.add_argument("--system-prompt", default=None, help="win-rate, a template with a system turn (chatml, llama3, "
                                                         "phi3, phi4-mini, gemma): the system turn (default: the "
                                                         "run's)")
    e.add_argument("--json", default=None, metavar="OUT", help="also write the result to this JSON file")
    e.add_argument("--device", default="auto", help="auto: the GPU when there is one")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_eval)
