"""The `llmkern` command. Each subcommand lives in its own function; heavy imports stay inside
them so that `llmkern info` answers fast."""
# (The module docstring is for developers; DESCRIPTION is what `llmkern --help` shows.)

from __future__ import annotations

import argparse
import os
import select
import sys

from .eval.cli import add_eval_parser
from .finetune.cli import add_finetune_parser

DESCRIPTION = ("Pretrain, fine-tune, evaluate, sample and export GPT-style language models on fused CUDA and Triton "
               "kernels. `llmkern train` with no arguments runs the main job; `llmkern COMMAND --help` tells "
               "more of each command.")


def true_or_false(text: str) -> bool:
    """An argparse type: true|false|1|0|yes|no (--resume=true; the benchmarks' --causal true false)."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import print_info

    try:
        print_info()
    except ValueError as err:  # LLMKERN_BACKEND set to no backend: the one setting info reads that can be wrong
        print(f"llmkern info: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import pathlib
    import time

    from .data.bpe import train_bpe

    start = time.perf_counter()
    special = tuple(args.special_token) if args.special_token else ("<|endoftext|>",)
    try:
        tok = train_bpe(
            [pathlib.Path(c) for c in args.corpus],
            args.vocab_size,
            args.out,
            special_tokens=special,
            pattern=args.pattern,
            min_frequency=args.min_frequency,
            num_workers=args.workers,
            progress=True,
        )
    except (ValueError, TypeError, ImportError, OSError) as err:  # ImportError: zstandard/pyarrow for such files
        print(f"llmkern tokenizer train: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({tok.n_vocab} tokens, <|endoftext|> = {tok.eot_token}) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_tokenizer_import(args: argparse.Namespace) -> int:
    import warnings

    from .data.hf_tokenizer import FROM_POST_PROCESSOR, import_hf_tokenizer

    bos_token = FROM_POST_PROCESSOR if args.bos_token is None else args.bos_token
    if args.no_bos_token:
        bos_token = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tok = import_hf_tokenizer(args.tokenizer_json, args.out, eot_token=args.eot_token, bos_token=bos_token)
    except (ValueError, TypeError, OSError) as err:
        print(f"llmkern tokenizer import: error: {err}", file=sys.stderr)
        return 2
    for w in caught:  # NFC normalization: imported, but said
        print(f"llmkern tokenizer import: warning: {w.message}", file=sys.stderr)
    bos = "none" if tok.bos_token is None else tok.bos_token
    print(f"wrote {args.out} ({tok.n_vocab} tokens, end of text = {tok.eot_token}, begin of sequence = {bos})")
    return 0


def _add_tokenizer_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="train or import a byte-level BPE tokenizer (a .tiktoken file; any "
                                         "Hugging Face tokenizer.json is also a tokenizer spec by its path)")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="learn BPE merges from files or directories, read as `data prepare` reads them")
    t.add_argument("corpus", nargs="+", help="files (.txt, .md, .jsonl, .parquet; text and JSONL also .gz/.zst) "
                                               "or directories of them")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in all: 256 bytes + merges + special tokens")
    t.add_argument("--out", required=True, help="the .tiktoken file to write (a .json sidecar goes beside it)")
    t.add_argument("--pattern", default="gpt2", help="pre-tokenization: gpt2, cl100k, or a regular expression")
    t.add_argument("--special-token", action="append", help="a special token (repeatable; default <|endoftext|>)")
    t.add_argument("--min-frequency", type=int, default=1, help="stop when no pair occurs this often")
    t.add_argument("--workers", type=int, default=None, help="pre-tokenization processes (default: the cores)")
    t.set_defaults(func=_cmd_tokenizer_train)
    t = tsub.add_parser("import", help="convert a Hugging Face tokenizer.json of byte-level BPE (GPT-2, SmolLM, "
                                       "Llama 3, Qwen2) to a .tiktoken file with the same token ids")
    t.add_argument("tokenizer_json", help="the model's tokenizer.json")
    t.add_argument("--out", required=True, help="the .tiktoken file to write (a .json sidecar goes beside it)")
    t.add_argument("--eot-token", default=None,
                   help="the special token that ends documents (default: the eos_token of the tokenizer_config.json "
                        "beside the file, else <|endoftext|>)")
    bos = t.add_mutually_exclusive_group()
    bos.add_argument("--bos-token", default=None,
                     help="the special token that begins every sequence (default: the one the file's post-processor "
                          "puts in front of the text, as Llama 3's <|begin_of_text|>; none where it puts none)")
    bos.add_argument("--no-bos-token", action="store_true",
                     help="no begin-of-sequence token, whatever the post-processor puts in front of the text")
    t.set_defaults(func=_cmd_tokenizer_import)


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from .data.config import load_config
    from .data.pipeline import prepare

    try:
        config = load_config(args.config, args.overrides)
        if args.strict:
            config.reader.strict = True
        if args.quiet:
            config.progress = False
        prepare(args.inputs, args.out, config, resume=not args.restart)
    except (ValueError, TypeError, ImportError, OSError) as err:
        print(f"llmkern data prepare: error: {err}", file=sys.stderr)
        return 2
    return 0


def _add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare training data: clean, filter, dedup, decontaminate, tokenize")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = dsub.add_parser("prepare", help="raw .txt/.jsonl/.parquet(.gz/.zst) files to documents and token shards",
                        epilog="settings: --config FILE (TOML/JSON, see llmkern/data/config.py) and "
                               "--section.key=value overrides, the value read as JSON when it parses: "
                               "--quality.min_words=20 --langid.enabled=true --reader.separator='\"\\n\\n\"'")
    d.add_argument("inputs", nargs="+", help="files, directories or globs")
    d.add_argument("--out", required=True, help="output directory (documents/, tokens/, report.json)")
    d.add_argument("--config", default=None, help="a .toml or .json config file")
    d.add_argument("--strict", action="store_true", help="stop at the first bad input instead of counting it")
    d.add_argument("--restart", action="store_true", help="start over instead of continuing an earlier run")
    d.add_argument("--quiet", action="store_true", help="no progress bar and no printed table")
    d.set_defaults(func=_cmd_data_prepare, accepts_overrides=True)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainingDiverged, TrainingInterrupted
    from .train.main_job import SAMPLE_PROMPTS, run_train

    if args.settings:
        from .train.config import TrainConfig, describe_settings
        from .train.main_job import CPU_DEFAULTS, GPU_DEFAULTS

        print("llmkern train settings (--key=value, or a --config file), with TrainConfig's defaults:")
        print(describe_settings(TrainConfig))
        print(f"Without --config, the main job's defaults replace some: on a CPU {CPU_DEFAULTS}; on a GPU {GPU_DEFAULTS}.")
        return 0
    if not 0 <= args.samples <= len(SAMPLE_PROMPTS):  # checked now: the samples come after the training
        print(f"llmkern train: error: --samples must be 0 to {len(SAMPLE_PROMPTS)} (one per prompt: "
              f"{', '.join(map(repr, SAMPLE_PROMPTS))}), got {args.samples}", file=sys.stderr)
        return 2
    try:
        run_train(args.config, args.overrides, resume=args.resume, samples=args.samples)
    except TrainingDiverged as err:
        print(f"llmkern train: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        print(f"llmkern train: stopped by {err}", file=sys.stderr)
        return err.exit_status
    except (ValueError, TypeError, OSError) as err:
        print(f"llmkern train: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .train.inference import load_trained_model, sample_text

    if (args.prompt is None) == (args.instruction is None):
        print("llmkern generate: error: give --prompt (text to continue) or --instruction (a task for an "
              f"instruction-tuned model){', not both' if args.prompt is not None else ''}", file=sys.stderr)
        return 2
    if args.num_samples < 1:
        print(f"llmkern generate: error: --num-samples must be at least 1, got {args.num_samples}", file=sys.stderr)
        return 2
    if args.temperature == 0:  # greedy: these only shape sampling, and would be ignored, silently
        given = [name for name, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed))
                 if value is not None]
        if given:
            print(f"llmkern generate: error: {', '.join(given)} shape sampling; --temperature 0 is greedy and "
                  f"would ignore {'them' if len(given) > 1 else 'it'}", file=sys.stderr)
            return 2
    if args.top_k is None:
        args.top_k = 50  # None: not given (see above); 50 when sampling
    elif args.top_k == 0:
        args.top_k = None  # no top-k filter
    if args.instruction is None and (args.template is not None or args.system_prompt is not None):
        print("llmkern generate: error: --template and --system-prompt go with --instruction", file=sys.stderr)
        return 2
    if args.instruction is None and args.input:  # it belongs in an instruction's template; --prompt would drop it
        print("llmkern generate: error: --input goes with --instruction (a task's input); put it in --prompt",
              file=sys.stderr)
        return 2
    from .model.generate import NonFiniteLogitsError, check_sampling_args

    try:  # before the model loads (minutes for a large one), not after
        check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p, seed=args.seed)
    except (ValueError, TypeError) as err:
        print(f"llmkern generate: error: {err}", file=sys.stderr)
        return 2
    try:
        model, tokenizer, state = load_trained_model(args.run, args.device)
        if args.instruction is None:
            texts = sample_text(model, tokenizer, [args.prompt] * args.num_samples, args.max_new_tokens,
                                args.temperature, args.top_k, args.top_p, args.seed)
        else:  # the response alone, in the template the run was fine-tuned with unless --template says
            from .eval.win_rate import generate_responses
            from .finetune.templates import resolve_prompt_format

            fmt = resolve_prompt_format(state.meta, args.template, args.system_prompt)
            example = {"instruction": args.instruction, "input": args.input}
            texts = generate_responses(model, tokenizer, [example] * args.num_samples, args.max_new_tokens,
                                       args.temperature, args.top_k, args.top_p, args.seed,
                                       batch_size=max(args.num_samples, 1), prompt_format=fmt)
    except (ValueError, TypeError, OSError) as err:
        print(f"llmkern generate: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLogitsError as err:  # the run's weights, not the command line: exit status 1, as a diverged train
        print(f"llmkern generate: error: {err}", file=sys.stderr)
        return 1
    print("\n\n".join(texts))
    return 0


def _add_train_parsers(sub) -> None:
    p = sub.add_parser("train", help="pretrain a GPT (no arguments: the main job on the Python standard library)",
                       epilog="settings: --config FILE (TOML/JSON, see llmkern/train/config.py) and --key=value "
                              "overrides, e.g. --max_steps=100 --model.n_layer=4; --settings lists them all")
    p.add_argument("--config", default=None, help="a .toml or .json TrainConfig file")
    p.add_argument("--settings", action="store_true", help="list every setting with its default and meaning, and exit")
    p.add_argument("--resume", nargs="?", const=True, default=False, type=true_or_false,
                   help="continue from the newest checkpoint in out_dir (--resume or --resume=true)")
    p.add_argument("--samples", type=int, default=3, help="text samples printed at the end, 0 to 4 (0: none)")
    p.set_defaults(func=_cmd_train, accepts_overrides=True)

    g = sub.add_parser("generate", help="continue a prompt with a trained run's model")
    g.add_argument("--run", required=True, help="a run folder (its newest checkpoint) or a checkpoint folder")
    g.add_argument("--prompt", help="text to continue")
    g.add_argument("--instruction", help="a task, put in the prompt template the run was fine-tuned with (alpaca "
                                         "for a run that saved none); prints the response alone")
    g.add_argument("--input", default="", help="with --instruction: the task's input, if it has one")
    g.add_argument("--template", default=None, help="with --instruction: use this template instead (alpaca, "
                                                    "chatml, plain, llama3, phi3, phi4-mini, gemma)")
    g.add_argument("--system-prompt", default=None, help="with --instruction and a template with a system turn "
                                                         "(chatml, llama3, phi3, phi4-mini, gemma): the system turn "
                                                         "(default: the run's)")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0: all of them; "
                                                          "default: 50)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=None,
                   help="make sampling reproducible: each sample has its own stream of the seed, so sample k is "
                        "the same whatever --num-samples is (default: a random sample each time)")
    g.add_argument("--device", default="auto", help="auto: the GPU when there is one")
    g.set_defaults(func=_cmd_generate)


def _cmd_export(args: argparse.Namespace) -> int:
    from .model.hf_save import save_hf_folder

    if args.peft:
        return _export_peft(args)
    if args.base_model is not None:
        print("llmkern export: error: --base-model names the base of a --peft adapter; give --peft too",
              file=sys.stderr)
        return 2
    try:
        model, tokenizer, family, prompt_format = _export_model(args)
        paths = save_hf_folder(model, args.out, family, args.dtype, args.max_shard_size, tokenizer.spec,
                               force=args.force, prompt_format=prompt_format)
    except (ValueError, TypeError, OSError) as err:  # OSError: a folder that is there, or a file that is not
        print(f"llmkern export: error: {err}", file=sys.stderr)
        return 2
    _print_export(paths, tokenizer.spec, prompt_format)
    return 0


def _check_out_not_run(args: argparse.Namespace) -> None:
    import os

    run, out = os.path.abspath(args.run), os.path.abspath(args.out)
    if os.path.commonpath([run, out]) == out:  # --force would delete the run it exports
        raise ValueError(f"--out {args.out!r} holds the run {args.run!r}; write the folder elsewhere")


def _export_peft(args: argparse.Namespace) -> int:
    """--peft: the run's LoRA adapters as a PEFT adapter folder for the Hugging Face base model."""
    import os

    from .finetune.peft_export import save_peft_adapter_from_run

    family = None if args.format == "auto" else args.format
    try:
        if args.max_shard_size != DEFAULT_MAX_SHARD_SIZE:
            raise ValueError("--max-shard-size splits a model's weights; a --peft adapter is one file")
        _check_out_not_run(args)
        paths = save_peft_adapter_from_run(args.run, args.out, family, args.base_model, args.dtype, force=args.force)
    except (ValueError, TypeError, OSError) as err:
        print(f"llmkern export: error: {err}", file=sys.stderr)
        return 2
    size = sum(os.path.getsize(path) for path in paths)
    print(f"wrote {os.path.dirname(paths[0])}: a PEFT LoRA adapter, {len(paths)} files, {size / 1e6:.1f} MB")
    return 0


def _export_model(args: argparse.Namespace):
    """(model on the CPU, tokenizer, family: --format's, the recorded Hugging Face source's, or None for the
    model config's, the prompt format it was fine-tuned in: None for a run not fine-tuned) of `llmkern export`'s
    run, after the checks that need no weights."""
    from .finetune.base import SCORING_METHODS
    from .finetune.templates import trained_prompt_format
    from .model.hf_save import (
        check_out_dir,
        checkpoint_meta,
        family_of_source,
        recorded_hf_source,
    )
    from .train.inference import load_trained_model

    check_out_dir(args.out, args.force)  # before the (slow) loading
    _check_out_not_run(args)
    meta = checkpoint_meta(args.run) or {}
    method = meta.get("finetune", {}).get("method") if isinstance(meta.get("finetune"), dict) else None
    if method in SCORING_METHODS:
        raise ValueError(f"{args.run!r} is a {method!r} run: a GPT body under a scoring head, which no Hugging Face "
                         f"causal-LM folder holds; export a pretraining or SFT/DPO/PPO/GRPO run (a language model)")
    model, tokenizer, state = load_trained_model(args.run, "cpu")
    family = None if args.format == "auto" else args.format
    return (model, tokenizer, family or family_of_source(recorded_hf_source(state.meta)),
            trained_prompt_format(state.meta))


def _print_export(paths: list[str], tokenizer_spec: str, prompt_format=None) -> None:
    import json
    import os

    from .model.hf_save import chat_template_choice

    folder = os.path.dirname(paths[0])
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    sizes = {path: os.path.getsize(path) for path in paths}
    print(f"wrote {folder}: {config['architectures'][0]} (model_type {config['model_type']!r}), "
          f"{config['torch_dtype']}, {len(paths)} files, {sum(sizes.values()) / 1e6:.1f} MB")
    for path, size in sizes.items():
        print(f"  {os.path.basename(path)}  {size / 1e6:.3f} MB")
    if "tokenizer.json" not in map(os.path.basename, paths):  # save_hf_folder warned why
        print(f"no tokenizer files: the run's tokenizer {tokenizer_spec!r} has no tokenizer.json that gives its ids; "
              f"give transformers the tokenizer it came from")
    elif prompt_format is not None:  # which chat template tokenizer_config.json has, and why
        print(chat_template_choice(tokenizer_spec, prompt_format)[1])


# llmkern.model.hf_save's DTYPES and FAMILIES, spelled here so that building the parser imports no torch
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
EXPORT_FAMILIES = ("gpt2", "llama", "phi3", "gemma3", "gemma2")
DEFAULT_MAX_SHARD_SIZE = "5GB"


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a trained run's model as a Hugging Face model folder (transformers, "
                                      "vLLM), or with --peft its LoRA adapters as a PEFT adapter folder")
    p.add_argument("--run", required=True, help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, help="the folder to write (refused when it holds files, unless --force)")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default=None, help="the weights' dtype (default: the run's; "
                                                                         "with --peft, the adapters')")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="split the weights into shards with an index past this size, as save_pretrained does "
                        "(5GB = 5*10^9 bytes; KB, MB, GB, KiB, MiB, GiB; default 5GB)")
    p.add_argument("--format", choices=("auto",) + EXPORT_FAMILIES, default="auto",
                   help="the Hugging Face family (auto: the one the run started from, else the model's shape tells)")
    p.add_argument("--force", action="store_true", help="replace --out when it holds files")
    p.add_argument("--peft", action="store_true", help="write a LoRA run's adapters as a PEFT adapter folder "
                                                      "(adapter_config.json, adapter_model.safetensors, and the "
                                                      "run's tokenizer files with its chat template) for the "
                                                      "Hugging Face base model, not the merged model")
    p.add_argument("--base-model", default=None, help="with --peft: the adapter's base_model_name_or_path (a hub "
                                                      "name or a folder)")
    p.set_defaults(func=_cmd_export)


def _benchmarks_dir() -> str:
    import os

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _cmd_bench(args: argparse.Namespace) -> int:
    import os
    import runpy

    folder = _benchmarks_dir()
    if not os.path.isdir(folder):
        print(f"llmkern bench: error: the benchmarks come with the source tree ({folder} is not here); "
              f"install llmkern from a checkout with `pip install -e .`", file=sys.stderr)
        return 2
    names = sorted(f[len("bench_"):-3] for f in os.listdir(folder) if f.startswith("bench_") and f.endswith(".py"))
    if args.name is None:
        print("benchmarks: " + ", ".join(names) + "\nrun one: llmkern bench NAME [its options]; "
              "llmkern bench NAME --help lists them")
        return 0
    if args.name not in names:
        print(f"llmkern bench: error: no benchmark {args.name!r}; choose one of {', '.join(names)}", file=sys.stderr)
        return 2
    script = os.path.join(folder, f"bench_{args.name}.py")
    saved_argv = sys.argv
    sys.argv = [script, *args.overrides]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:  # the script's own exit status
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = saved_argv
    return 0


def _add_bench_parser(sub) -> None:
    # add_help=False: `llmkern bench NAME --help` reaches the script's own help
    p = sub.add_parser("bench", help="run a benchmark of benchmarks/ (no name: list them)", add_help=False,
                       epilog="the options after NAME go to the benchmark script, e.g. "
                              "llmkern bench rms_norm --rows 4096 --hidden 4096")
    p.add_argument("name", nargs="?", help="rms_norm, attention, adamw, train, ...")
    p.set_defaults(func=_cmd_bench, accepts_overrides=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmkern", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, the CUDA build, the GPUs seen, and the backends of each op")
    p.set_defaults(func=_cmd_info)
    _add_tokenizer_parser(sub)
    _add_data_parser(sub)
    _add_train_parsers(sub)
    add_eval_parser(sub)
    add_finetune_parser(sub)
    _add_export_parser(sub)
    _add_bench_parser(sub)
    return parser


def _hyphenated(argv: list[str]) -> list[str]:
    """argv with its options spelled with hyphens (--max_new_tokens=8 -> --max-new-tokens=8), values untouched."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(name.replace("_", "-") + eq + value if arg.startswith("--") else arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if rest and not getattr(args, "accepts_overrides", False) and any("_" in a for a in rest if a.startswith("--")):
        # train and finetune take --key=value settings spelled with underscores; the other commands' options are
        # hyphenated: --max_new_tokens, typed after a train command, is taken for --max-new-tokens
        hyphen_args, hyphen_rest = parser.parse_known_args(_hyphenated(argv))
        if not hyphen_rest:  # else the error below names the options as they were typed
            args, rest = hyphen_args, hyphen_rest
    if rest and not getattr(args, "accepts_overrides", False):
        print(f"llmkern {args.command}: error: unrecognized arguments: {' '.join(rest)} "
              f"(`llmkern {args.command} --help` lists the options)", file=sys.stderr)
        return 2
    args.overrides = rest
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and stops by itself): no traceback
        print(f"llmkern {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended
    except BrokenPipeError:  # `llmkern train --settings | head`: the reader has gone, which is no error of ours
        if not _stdout_reader_gone():
            raise  # another pipe (a worker process's, say): an error to show, not output cut short
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else Python's exit flush fails again
        return 141  # 128 + SIGPIPE


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone, as poll tells: POLLERR on Linux, POLLHUP
    elsewhere. Without poll (Windows) it is taken to be; a stdout that is no file (a StringIO) never is."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # None, closed, or no file (io.UnsupportedOperation)
        return False
    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


if __name__ == "__main__":
    sys.exit(main())
