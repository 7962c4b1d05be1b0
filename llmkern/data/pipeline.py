"""`prepare(inputs, out_dir, config)`: raw text files to cleaned, filtered, deduplicated documents
(and token shards), with a report of what each stage let through and why it dropped the rest.

Output directory:
  documents/part-00000.jsonl  the kept documents of input file 0: {"text", "source", "line", "meta"}
  progress.json               inputs done so far, with their statistics (written after each input)
  stage_state/part-00000.json what the dedup stages learned of input 0's documents that are in no part
  tokens/                     train/val token shards + manifest.json (when tokenize is enabled)
  report.json                 the final report (also printed as a table)

Re-running on the same output directory with the same inputs and config continues after the
last finished input: each part file is written under a temporary name and renamed when its input
is done, and the dedup stages re-learn the documents already kept by reading those parts back.
A run with other inputs or another config starts over (and says so); resume=False forces that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from typing import Iterable, Iterator, Optional

from .._atomic import write_json_atomic
from .config import PrepareConfig, to_dict
from .readers import Document, ReadReport, check_readers_available, expand_inputs, file_format, read_file
from .stage import Stage, StageStats

DOCUMENTS_DIR = "documents"
TOKENS_DIR = "tokens"
STATE_DIR = "stage_state"
PROGRESS_FILE = "progress.json"
REPORT_FILE = "report.json"
_TMP = ".tmp"


def build_stages(config: PrepareConfig) -> list[Stage]:
    """The enabled stages, in pipeline order (each checks its settings here, before any work)."""
    stages: list[Stage] = []
    if config.clean.enabled:
        from .clean import CleanStage

        stages.append(CleanStage(config.clean))
    if config.langid.enabled:
        from .langid import LangIdStage

        stages.append(LangIdStage(config.langid))
    if config.quality.enabled:
        from .quality import QualityStage

        stages.append(QualityStage(config.quality))
    if config.decontam.enabled:  # before dedup, so that contaminated documents never enter its index
        from .decontam import DecontamStage

        stages.append(DecontamStage(config.decontam, config.reader))
    if config.exact_dedup.enabled:
        from .dedup import ExactDedupStage

        stages.append(ExactDedupStage(config.exact_dedup))
    if config.near_dedup.enabled:
        from .dedup import NearDedupStage

        stages.append(NearDedupStage(config.near_dedup))
    return stages


def _fingerprint(files: list[str], config: PrepareConfig) -> str:
    """Changes when an input file, the list of inputs or a setting that shapes the output changes."""
    settings = to_dict(config)
    settings.pop("progress")
    # How the work is split leaves the output as it is (test_worker_processes_give_the_same_output):
    # a rerun with more workers continues where the last one stopped.
    for key in ("num_workers", "batch_size"):
        settings.pop(key)
    settings["near_dedup"].pop("batch_size")
    settings["near_dedup"].pop("num_threads")  # each document's signature is its own, however many threads
    settings["tokenize"] = None  # tokenization runs after the documents; changing it re-tokenizes only
    # The eval sets decide what decontam drops, as the inputs decide what is read: an edited eval file,
    # or one added to an eval-set directory, must not leave the inputs done under the old ones done.
    eval_files = expand_inputs(config.decontam.eval_sets) if config.decontam.enabled else []
    blob = json.dumps({"files": _file_stamps(files), "eval_files": _file_stamps(eval_files), "config": settings},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _file_stamps(files: list[str]) -> list[list]:
    """[path, size, mtime] of each file: what tells that a file changed without reading it."""
    stamps = []
    for path in files:
        try:
            st = os.stat(path)
            stamps.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
        except OSError:
            stamps.append([os.path.abspath(path), None, None])
    return stamps


def part_name(index: int) -> str:
    return f"part-{index:05d}.jsonl"


def _part_index(name: str) -> int | None:
    """The input index of the part file called `name` (see part_name); None when it is no part file."""
    digits = name.removeprefix("part-").removesuffix(".jsonl")
    if not (name.startswith("part-") and name.endswith(".jsonl") and digits.isascii() and digits.isdigit()):
        return None
    return int(digits)


def _part_names_in_input_order(doc_dir: str) -> list[str]:
    """The part files in `doc_dir`, in the order of their inputs: by index, not as text, since past
    99,999 inputs the names grow a digit and part-100000 would sort before part-99999."""
    names = [name for name in os.listdir(doc_dir) if _part_index(name) is not None]
    return sorted(names, key=_part_index)


def read_parts(out_dir: str, indices: Optional[Iterable[int]] = None) -> Iterator[Document]:
    """The documents kept so far in `out_dir` (all parts in input order, or those of the given input
    indices, in the order given)."""
    doc_dir = os.path.join(out_dir, DOCUMENTS_DIR)
    if indices is None:
        names = _part_names_in_input_order(doc_dir)
    else:
        names = [part_name(i) for i in indices]
    for name in names:
        with open(os.path.join(doc_dir, name), encoding="utf-8") as f:
            for row in f:
                record = json.loads(row)
                yield Document(record["text"], record["source"], record["line"], record["meta"])


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _split_stages(stages: list[Stage]) -> tuple[list[Stage], list[Stage]]:
    """(the leading stateless stages, which may run in worker processes; the rest)."""
    n = 0
    while n < len(stages) and not stages[n].stateful:
        n += 1
    return stages[:n], stages[n:]


def _run_stages(stages: list[Stage], batch: list[Document]) -> tuple[list[Document], list[StageStats]]:
    stats = [StageStats(stage.name) for stage in stages]
    for stage, stage_stats in zip(stages, stats):
        batch = stage.run(batch, stage_stats)
    return batch, stats


_worker_stages: list[Stage] = []


def _init_worker(config: PrepareConfig) -> None:
    global _worker_stages
    _worker_stages = _split_stages(build_stages(config))[0]


def _run_in_worker(batch: list[Document]) -> tuple[list[Document], list[StageStats]]:
    return _run_stages(_worker_stages, batch)


class _StatelessRunner:
    """Runs the stateless stages over batches, in order, in `workers` processes (here when 1).

    At most 2 x workers batches are in flight, so memory stays bounded however long the input;
    reading stays in this process, so bad-input counting and strict errors happen here.
    """

    def __init__(self, stages: list[Stage], config: PrepareConfig, workers: int):
        self.stages = stages
        self.window = 2 * workers
        self.pool = None
        if workers > 1 and stages:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self.pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (config,))

    def run(self, batches: Iterable[list[Document]]) -> Iterator[tuple[int, list[Document], list[StageStats]]]:
        """(documents in, documents kept, stats per stage) for each batch."""
        if self.pool is None:
            for batch in batches:
                yield (len(batch), *_run_stages(self.stages, batch))
            return
        pending: deque = deque()
        for batch in batches:
            pending.append((len(batch), self.pool.apply_async(_run_in_worker, (batch,))))
            if len(pending) >= self.window:
                n, result = pending.popleft()
                yield (n, *result.get())
        while pending:
            n, result = pending.popleft()
            yield (n, *result.get())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


class _Progress:
    """progress.json: which inputs are done, with their statistics, for one fingerprint."""

    def __init__(self, out_dir: str, fingerprint: str, files: list[str]):
        self.path = os.path.join(out_dir, PROGRESS_FILE)
        self.data = {"fingerprint": fingerprint, "inputs": files, "done": {}, "tokenized": None}

    def load_matching(self) -> bool:
        """Load the file when it belongs to this run (same fingerprint); False otherwise."""
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            return False
        if data.get("fingerprint") != self.data["fingerprint"]:
            return False
        self.data = data
        return True

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def done_inputs(self) -> dict[int, dict]:
        """The entries of the inputs already done, by input index."""
        return {int(k): v for k, v in self.data["done"].items()}

    def mark_done(self, index: int, path: str, read_report: ReadReport, stats: list[StageStats]) -> None:
        """Record input `index` as done, on disk at once: a crash after this never redoes it."""
        self.data["done"][str(index)] = {
            "file": path, "part": part_name(index), "read": read_report.to_dict(),
            "stages": {s.name: s.to_dict() for s in stats}}
        self.save()


def _start_over(out_dir: str) -> None:
    # progress.json goes first: cut short later, this must leave no record of parts partly deleted
    for name in (PROGRESS_FILE, REPORT_FILE):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)
    for name in (DOCUMENTS_DIR, TOKENS_DIR, STATE_DIR):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def _counted(batches: Iterable[list[Document]], report: ReadReport) -> Iterator[list[Document]]:
    for batch in batches:
        report.documents += len(batch)
        report.chars += sum(len(doc.text) for doc in batch)
        yield batch


def _process_file(index: int, path: str, runner: _StatelessRunner, stateful: list[Stage],
                  config: PrepareConfig, out_dir: str, bar) -> tuple[ReadReport, list[StageStats]]:
    """Run one input through every stage into its part file; its statistics."""
    read_report = ReadReport(strict=config.reader.strict, max_examples=config.reader.max_examples)
    stats = [StageStats(stage.name) for stage in runner.stages + stateful]
    final = os.path.join(out_dir, DOCUMENTS_DIR, part_name(index))
    dropped: dict[str, list] = {stage.name: [] for stage in stateful}
    try:
        with open(final + _TMP, "w", encoding="utf-8") as out:
            batches = _counted(_batches(read_file(path, config.reader, read_report), config.batch_size), read_report)
            for read_count, batch, stateless_stats in runner.run(batches):
                for total, part in zip(stats, stateless_stats):
                    total.merge(part)
                passed = []
                for stage, stage_stats in zip(stateful, stats[len(runner.stages):]):
                    batch = stage.run(batch, stage_stats)
                    passed.append(batch)
                kept_ids = {id(doc) for doc in batch}
                for stage, docs in zip(stateful, passed):
                    dropped[stage.name] += stage.dropped_later([d for d in docs if id(d) not in kept_ids])
                for doc in batch:
                    record = {"text": doc.text, "source": doc.source, "line": doc.line, "meta": doc.meta}
                    out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                bar.update(read_count)
            out.flush()
            os.fsync(out.fileno())
        # Before the part's rename: a part file that exists always has its state beside it.
        write_json_atomic(os.path.join(out_dir, STATE_DIR, part_name(index).replace(".jsonl", ".json")), dropped)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # absent when creating it failed: keep that error
            os.remove(final + _TMP)  # the input is not done: a re-run does it again from its start
        raise
    os.replace(final + _TMP, final)
    return read_report, stats


def _tokenize(out_dir: str, config: PrepareConfig) -> dict:
    from .shards import tokenize_documents

    cfg = config.tokenize
    tokens_dir = os.path.join(out_dir, TOKENS_DIR)
    shutil.rmtree(tokens_dir, ignore_errors=True)
    workers = cfg.num_workers or (os.cpu_count() or 1)
    manifest = tokenize_documents((doc.text for doc in read_parts(out_dir)), cfg.tokenizer, tokens_dir,
                                  val_fraction=cfg.val_fraction, num_workers=workers,
                                  tokens_per_shard=cfg.shard_tokens, progress=config.progress)
    return {"dir": tokens_dir, "tokenizer": manifest["tokenizer"], "dtype": manifest["dtype"],
            "tokens": {split: sum(e["tokens"] for e in entries) for split, entries in manifest["splits"].items()}}


class NoDocumentsKeptError(ValueError):
    """A run that kept no documents (so wrote no tokens); `.report` is its report (also in report.json)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _nothing_kept_message(report: dict, files: list[str], config: PrepareConfig) -> str:
    """Why a run kept no documents, as far as its statistics tell, and what to change."""
    read = report["read"]
    parts = [f"no documents kept from {len(files)} input file(s)"]
    if read["documents"] == 0:
        bad = ", ".join(f"{k} {v}" for k, v in sorted(read["bad_input"].items()))
        parts.append(f"none could be read ({bad or 'the inputs are empty'}; for .jsonl/.parquet "
                     f"the text field is reader.text_field={config.reader.text_field!r})")
    else:
        parts.append(f"{read['documents']} read")
        for s in report["stages"]:
            if s["rejected"]:
                reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["rejected"].items(), key=lambda kv: -kv[1]))
                parts.append(f"{s['name']} rejected {s['docs_in'] - s['docs_out']} ({reasons})")
    message = "; ".join(parts) + "."
    text_inputs = [f for f in files if file_format(f) == "text"]
    if read["documents"] and text_inputs and not config.reader.separator:
        message += (" A text input (.txt) is read as ONE document while reader.separator is unset, "
                    "so a whole book fails the quality filters "
                    "(too_many_words, duplicate lines, ...): split it into paragraphs with "
                    "--reader.separator='\"\\n\\n\"' (or lines with '\"\\n\"'; "
                    "in a config file: [reader] separator = \"\\n\\n\").")
    if any(s["name"] == "quality" and s["rejected"] for s in report["stages"]):
        message += (" To keep more, relax the quality rules (e.g. --quality.max_words=N, "
                    "--quality.min_words=N) or turn them off with --quality.enabled=false.")
    return message


def _check_settings(config: PrepareConfig) -> None:
    """Reject bad settings before any input is read: a mistake must not cost the long run first."""
    if not isinstance(config, PrepareConfig):
        raise TypeError(f"config must be a PrepareConfig (see llmkern.data.config), got {type(config).__name__}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    if config.num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0: one per core), got {config.num_workers}")
    if config.reader.max_document_bytes < 1:  # else every input would read as empty
        raise ValueError(f"reader.max_document_bytes must be >= 1, got {config.reader.max_document_bytes}")
    if config.reader.separator == "":  # read as no separator: each .txt file one document
        raise ValueError("reader.separator must not be empty: give the text between documents (\"\\n\\n\"), "
                         "or null for one document per .txt file")
    if config.reader.max_examples < 0:
        raise ValueError(f"reader.max_examples must be >= 0, got {config.reader.max_examples}")
    if config.tokenize.enabled:  # checked now: tokenizing starts only after all the documents are done
        cfg = config.tokenize
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise ValueError(f"tokenize.val_fraction must be in [0, 1), got {cfg.val_fraction}")
        if cfg.shard_tokens < 1:
            raise ValueError(f"tokenize.shard_tokens must be >= 1, got {cfg.shard_tokens}")
        if cfg.num_workers < 0:
            raise ValueError(f"tokenize.num_workers must be >= 0 (0: one per core), got {cfg.num_workers}")


def _input_files(inputs: Iterable[str] | str, out_dir: str) -> list[str]:
    """The input files, in order, less any inside `out_dir`."""
    # An output directory inside an input directory must not feed its own parts back in.
    inside_out = os.path.abspath(out_dir) + os.sep
    return [f for f in expand_inputs(inputs) if not os.path.abspath(f).startswith(inside_out)]


def _check_tokenizer_loads(config: PrepareConfig) -> None:
    """A tokenizer that cannot load fails now, not after the long work on the documents."""
    if config.tokenize.enabled:
        from .tokenizer import get_tokenizer

        get_tokenizer(config.tokenize.tokenizer)


def _resume_or_start_over(out_dir: str, files: list[str], config: PrepareConfig, resume: bool) -> _Progress:
    """The progress of this run: the one in `out_dir` when it is of the same inputs and settings (and
    `resume`), else a fresh one, after deleting everything an earlier run left there."""
    progress = _Progress(out_dir, _fingerprint(files, config), files)
    resumed = resume and progress.load_matching()
    if not resumed:
        if resume and os.path.exists(os.path.join(out_dir, PROGRESS_FILE)):
            print(f"llmkern data prepare: {out_dir} holds a run with other inputs or settings; starting over",
                  file=sys.stderr)
        _start_over(out_dir)
        progress.save()
    os.makedirs(os.path.join(out_dir, DOCUMENTS_DIR), exist_ok=True)
    os.makedirs(os.path.join(out_dir, STATE_DIR), exist_ok=True)
    return progress


class _Totals:
    """The statistics of every input so far: what was read, and what each stage let through."""

    def __init__(self, stages: list[Stage], config: PrepareConfig):
        self.read = ReadReport(strict=config.reader.strict, max_examples=config.reader.max_examples)
        self.stages = [StageStats(stage.name) for stage in stages]

    def add(self, read_report: ReadReport, stats: list[StageStats]) -> None:
        self.read.merge(read_report)
        for total, s in zip(self.stages, stats):
            total.merge(s)

    def add_done(self, entry: dict) -> None:
        """Add an input done by an earlier run, from its entry in progress.json."""
        self.add(ReadReport.from_dict(entry["read"]),
                 [StageStats.from_dict(total.name, entry["stages"][total.name]) for total in self.stages])


def _relearn_done_inputs(out_dir: str, done: dict[int, dict], stages: list[Stage]) -> None:
    """Give the stages the state the inputs already done imply, so that a resumed run drops what a clean
    run would: the documents kept (read back from their parts) and those in no part (stage_state)."""
    for batch in _batches(read_parts(out_dir, sorted(done)), 4096):
        for stage in stages:
            stage.remember(batch)
    for index in sorted(done):
        path = os.path.join(out_dir, STATE_DIR, part_name(index).replace(".jsonl", ".json"))
        if os.path.exists(path):  # absent when an older llmkern did this input
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            for stage in stages:
                stage.remember_dropped(saved.get(stage.name, []))


def _process_inputs(files: list[str], done: dict[int, dict], stages: list[Stage], totals: _Totals,
                    progress: _Progress, config: PrepareConfig, out_dir: str) -> None:
    """Run every input not done yet through the stages into its part, one input after another."""
    from tqdm import tqdm

    stateless, stateful = _split_stages(stages)
    runner = _StatelessRunner(stateless, config, config.num_workers or (os.cpu_count() or 1))
    bar = tqdm(unit="doc", desc="prepare", disable=not config.progress, file=sys.stderr)
    with contextlib.closing(runner), bar:
        for index, path in enumerate(files):
            if index in done:
                continue
            bar.set_postfix_str(os.path.basename(path))
            read_report, stats = _process_file(index, path, runner, stateful, config, out_dir, bar)
            totals.add(read_report, stats)
            progress.mark_done(index, path, read_report, stats)


def _documents_report(files: list[str], done: dict[int, dict], totals: _Totals, out_dir: str) -> dict:
    """The report of the documents' stages (its "tokens" filled in later, when tokenizing)."""
    return {
        "inputs": len(files),
        "resumed_inputs": len(done),
        "read": totals.read.to_dict(),
        "stages": [{"name": s.name, **s.to_dict()} for s in totals.stages],
        "output": {"dir": os.path.join(out_dir, DOCUMENTS_DIR),
                   "documents": totals.stages[-1].docs_out if totals.stages else totals.read.documents,
                   "chars": totals.stages[-1].chars_out if totals.stages else totals.read.chars},
        "tokens": None,
    }


def _token_shards(out_dir: str, config: PrepareConfig, progress: _Progress) -> dict:
    """The summary of the token shards, tokenizing only when the shards of these tokenize settings are
    not there yet (the documents are the same whenever the run resumed: see _fingerprint)."""
    wanted = json.dumps(_tokenize_settings(config), sort_keys=True)
    previous = progress.data.get("tokenized")
    if previous and previous.get("settings") == wanted and _same_shards(out_dir, previous, config):
        return previous["summary"]
    summary = _tokenize(out_dir, config)
    progress.data["tokenized"] = {"settings": wanted, "summary": summary,
                                  "manifest_sha256": _manifest_sha256(out_dir)}
    progress.save()
    return summary


def _tokenize_settings(config: PrepareConfig) -> dict:
    """The tokenize settings that shape the shards: not num_workers (tokenize_documents gives the same
    shards for any), so a rerun with other workers keeps the shards it has."""
    settings = to_dict(config.tokenize)
    settings.pop("num_workers")
    return settings


def _manifest_sha256(out_dir: str) -> str | None:
    """sha256 of the token shards' manifest (which holds every shard's sha256); None when there is none."""
    path = os.path.join(out_dir, TOKENS_DIR, "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _same_shards(out_dir: str, recorded: dict, config: PrepareConfig) -> bool:
    """Whether the shards on disk are the ones progress.json recorded, still made by the tokenizer named.
    Not so after a crash between writing other settings' shards and recording them (another manifest),
    nor when a .tiktoken file was retrained in place (the manifest keeps the hash of the file it used)."""
    if recorded.get("manifest_sha256") is None or _manifest_sha256(out_dir) != recorded["manifest_sha256"]:
        return False  # also a progress.json from before the hash was recorded: tokenize once more
    from .shards import load_manifest
    from .tokenizer import is_file_spec, tokenizer_file_sha256

    spec = config.tokenize.tokenizer
    used = load_manifest(os.path.join(out_dir, TOKENS_DIR)).get("tokenizer_sha256")
    return not is_file_spec(spec) or used == tokenizer_file_sha256(spec)


def _warn_if_val_is_empty(report: dict, config: PrepareConfig) -> None:
    """Warn (in the report and on stderr) when val was asked for but got no document: training needs one."""
    if config.tokenize.val_fraction > 0 and not report["tokens"]["tokens"].get("val"):
        report["warnings"] = [
            f"the val split is empty: the {report['output']['documents']} document(s) kept are all one "
            f"text, which stays in train; `llmkern train` needs val documents (split a .txt input with "
            f"--reader.separator='\"\\n\\n\"')"]
        print(f"llmkern data prepare: warning: {report['warnings'][0]}", file=sys.stderr)


def _write_report(report: dict, out_dir: str, config: PrepareConfig, started: float) -> None:
    """Complete the report with the run's time and settings; write report.json and print it as a table."""
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["config"] = to_dict(config)
    write_json_atomic(os.path.join(out_dir, REPORT_FILE), report)
    if config.progress:
        print(format_report(report))


def prepare(inputs: Iterable[str] | str, out_dir: str, config: Optional[PrepareConfig] = None,
            resume: bool = True) -> dict:
    """Run the pipeline on `inputs` (files, directories, globs) into `out_dir`; the report.

    Bad input is counted in report["read"] (or raises BadInputError when config.reader.strict);
    the inputs finished before an error stay done, and a re-run continues from there. A run
    that keeps no documents raises NoDocumentsKeptError (a ValueError) saying which stage
    rejected them and why, after writing and printing its report.
    """
    config = config or PrepareConfig()
    _check_settings(config)
    started = time.perf_counter()
    out_dir = os.fspath(out_dir)
    files = _input_files(inputs, out_dir)
    check_readers_available(files)
    stages = build_stages(config)
    _check_tokenizer_loads(config)
    os.makedirs(out_dir, exist_ok=True)

    progress = _resume_or_start_over(out_dir, files, config, resume)
    # The inputs an interrupted run finished are not read again: their statistics come from
    # progress.json, and the dedup stages relearn what they saw, to drop what a clean run would.
    done = progress.done_inputs()
    totals = _Totals(stages, config)
    for entry in done.values():
        totals.add_done(entry)
    _relearn_done_inputs(out_dir, done, stages)
    _process_inputs(files, done, stages, totals, progress, config, out_dir)

    report = _documents_report(files, done, totals, out_dir)
    if report["output"]["documents"] == 0:
        report["error"] = _nothing_kept_message(report, files, config)
        _write_report(report, out_dir, config, started)
        raise NoDocumentsKeptError(report["error"], report)
    if config.tokenize.enabled:
        report["tokens"] = _token_shards(out_dir, config, progress)
        _warn_if_val_is_empty(report, config)
    _write_report(report, out_dir, config, started)
    return report


def format_report(report: dict) -> str:
    """The report as a table: documents and characters in and out of each stage, and why."""
    lines = [f"{'stage':<12} {'docs in':>10} {'docs out':>10} {'chars in':>14} {'chars out':>14} "
             f"{'seconds':>8}  rejected"]
    read = report["read"]
    lines.append(f"{'read':<12} {'':>10} {read['documents']:>10,} {'':>14} {read['chars']:>14,} {'':>8}  "
                 f"{read['files']} files, {read['bytes']:,} bytes")
    for s in report["stages"]:
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(s["rejected"].items(), key=lambda kv: -kv[1]))
        lines.append(f"{s['name']:<12} {s['docs_in']:>10,} {s['docs_out']:>10,} {s['chars_in']:>14,} "
                     f"{s['chars_out']:>14,} {s['seconds']:>8.1f}  {reasons or '-'}")
    if read["bad_input"]:
        lines.append("bad input:")
        for kind, count in sorted(read["bad_input"].items()):
            example = read["examples"].get(kind, [{}])[0]
            where = f"{example.get('file')}:{example.get('line')}" if example else ""
            lines.append(f"  {kind:<20} {count:>8,}  first at {where}: {example.get('reason', '')}")
    for warning in report.get("warnings", []):
        lines.append(f"warning: {warning}")
    if report.get("tokens"):
        tokens = ", ".join(f"{k} {v:,}" for k, v in report["tokens"]["tokens"].items())
        lines.append(f"tokens ({report['tokens']['tokenizer']}): {tokens}")
    lines.append(f"documents kept: {report['output']['documents']} in {report['output']['dir']}"
                 f" ({report['seconds']} s)")
    return "\n".join(lines)
