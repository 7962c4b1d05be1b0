"""Multiple-choice scoring: which continuation of a context does the model find most likely?

A task is a JSON Lines file (or a JSON list) of examples
    {"context": "The capital of France is", "choices": ["Paris", "Rome"], "answer": 0}
("question" may stand for "context"), or a public benchmark's file as it is published (HellaSwag, ARC, MMLU, PIQA,
WinoGrande, OpenBookQA, BoolQ, SciQ, COPA, TruthfulQA MC1 and MC2: choice_formats), phrased as lm-evaluation-harness
phrases it. Each choice is scored by the summed log-probability of its tokens after the context and a separator
(" " by default, as lm-evaluation-harness does), its tokens those the harness scores (encode_pair: the joint
text's past the context's). An example with a shared `continuation` (WinoGrande) is scored the
other way round: each choice completes the context, and the continuation's tokens, after the separator, are scored;
its few-shot shots are written as its context, right choice, separator and continuation, and acc_norm, which would
divide every choice's score by the same length, is left out where every example is so.
The metrics are those the task's harness yaml lists (its HarnessRules, choice_formats):
- accuracy (the harness's acc): the choice with the highest summed log-prob. Long choices lose probability with
  every token, so this favours short ones;
- acc_norm, for HellaSwag, ARC, PIQA, OpenBookQA, SciQ and llmkern's own format: the highest log-prob per UTF-8
  byte of the choice, which removes that length bias (bytes, not tokens, so that it does not depend on the
  tokenizer; the harness divides by characters, the same for ASCII choices).
A task whose examples have several right choices (`true_choices`: TruthfulQA MC2) reports neither, but the
harness's mc2: the probability of the true choices over that of all choices, exp(log-prob) of each summed,
averaged over the examples. TruthfulQA's export, whose rows carry both MC1 and MC2, reports both: the MC1
examples' accuracy and their attached MC2 examples' mc2.
Each metric comes with its standard error "<metric>_stderr", as the harness computes it for a mean (harness.py
mean_stderr; None, the harness's "N/A", for a single example). MMLU's examples of several subjects are the
harness's mmlu group: each subject a subtask, the accuracy their size-weighted mean (the plain mean) and its
standard error their stderrs pooled (harness.pooled_stderr: None where a subject has one example, as with a
--limit that cuts one short); "categories" then holds the same for each of the group's categories (stem,
humanities, social_sciences, other) that the subjects fall in, where all of them are MMLU's 57.
With fewshot = k, each context is preceded by k solved examples, each written as its context, the separator and
its right answer, then a blank line; an example's description (MMLU's "The following are ... about {subject}.")
comes once, before them, but TruthfulQA's six-question preamble, which the harness's doc_to_text holds, comes
after each of them as well (HarnessRules.description_per_shot). Without fewshot_data they are other examples of
the task, drawn as the harness draws from the split it scores (k + 1 sampled by one random.Random(1234), the
example dropped: harness.harness_shots; the harness's own rule for TruthfulQA, which has no other split). With
fewshot_data (the split the harness takes the shots from, which llmkern reads from a file where the harness
downloads it) they are drawn as the task's yaml says:
- HellaSwag, PIQA, BoolQ, COPA, WinoGrande: k + 1 sampled from the training split, the first k kept (their yaml
  names no test split, and the harness draws one more whenever fewshot_split == test_split, None == None here);
- ARC, OpenBookQA, SciQ: k sampled from the training split (a test split is named);
- MMLU (and llmkern's own format): the first k with the example's own description, as the harness takes MMLU's
  (its "first_n" sampler on the dev split).
The few-shot data must be of the task scored (its train or dev split): a file of another format's task is refused
(ARC's two exports are one task).
So phrased and drawn, a one-process harness run's prompts are repeated exactly (with a limit, of the first
examples); a run on several processes draws each process's examples from its own stream, and gets other shots.
One difference remains: the harness drops a drawn row equal to the example as a dict of the dataset's fields,
llmkern as a ChoiceExample (two rows that differ only in an id count as equal here).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from itertools import islice
from typing import Any, Sequence

import torch

from .._modes import eval_mode
from ..data.model_vocab import check_vocab_fits
from ..data.sequences import cut_left, encode_scored_pair
from .choice_formats import (
    MMLU_CATEGORY_OF,
    ChoiceExample,
    HarnessRules,
    examples_from_rows,
    mmlu_csv_examples,
)
from .harness import FEWSHOT_SEED, harness_shots, mean_stderr, pooled_stderr
from .logprobs import sequence_logprobs


def load_choice_tasks(path: str) -> list[ChoiceExample]:
    """The examples of a .jsonl file (one object per line, blank lines skipped), a .json list, or an MMLU .csv;
    the rows are in any format of choice_formats, told by the first row's keys."""
    text = read_task_text(path)
    if path.lower().endswith(".csv"):
        examples = mmlu_csv_examples(text, path)
    else:
        examples = examples_from_rows(json_rows(text, path))
    if not examples:
        raise ValueError(f"task file {path!r} holds no examples")
    return examples


def check_scoring_vocab(tokenizer, model) -> None:
    """A ValueError unless the model has an embedding for every id the tokenizer encodes text to (ids past its
    vocabulary may only be special tokens, as Gemma 3's <image_soft_token>: llmkern.data.model_vocab)."""
    check_vocab_fits(tokenizer, model.config.vocab_size, getattr(tokenizer, "spec", type(tokenizer).__name__),
                     "the model", hint=": score with the model's own tokenizer")


def read_task_text(path: str) -> str:
    """The text of a task file; a ValueError naming it when it is missing or not UTF-8."""
    if not os.path.isfile(path):
        raise ValueError(f"task file {path!r} does not exist")
    # utf-8-sig: a byte-order mark (Notepad writes one) is skipped, not read as text that hid a JSON list
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err


def json_rows(text: str, path: str):
    """(where, row) of each row of a task file's text: a JSON list's items, or JSON Lines' non-blank lines."""
    return json_list_rows(text, path) if text.lstrip().startswith("[") else json_lines_rows(text, path)


def json_list_rows(text: str, path: str) -> list[tuple[str, object]]:
    """(where, row) of each item of a JSON list."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return [(f"{path} item {i}", row) for i, row in enumerate(rows)]


def json_lines_rows(text: str, path: str):
    """(where, row) of each non-blank line, decoded one at a time (a broken line is named before the rows after
    it are read)."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number}: not valid JSON ({err.msg})") from err
        yield f"{path} line {number}", row


def encode_pair(tokenizer, context: str, continuation: str, block_size: int, where: str) -> tuple[list[int], int]:
    """(context + continuation token ids, length of the continuation), split as lm-evaluation-harness's
    _encode_pair splits them (encode_scored_pair: the context's trailing whitespace moved into the continuation,
    whose tokens are the joint text's past the context's, so that a SentencePiece tokenizer scores " Paris" as the
    "▁Paris" the joint text has, not as "▁", "▁Paris"), then left-cut so that the inputs (all but the last token)
    fit in block_size, as the harness cuts them: (context + continuation)[-(block_size + 1):]. The context starts
    with the tokenizer's begin-of-sequence token where it has one, which the cut keeps (the harness's drops it)."""
    ctx, cont = encode_scored_pair(tokenizer, context, continuation)
    if not cont:  # scoring ids[-0:] would score the whole row, and acc_norm divides by the choice's length
        raise ValueError(f"{where}: the scored text {continuation!r} (with its separator) has no tokens of its own "
                         f"after the context: the tokenizer drops it or merges it into the context, so it has "
                         f"nothing to score")
    if len(cont) > block_size:
        raise ValueError(f"{where}: a scored text (a choice or continuation) has {len(cont)} tokens, more than "
                         f"block_size={block_size}")
    full = cut_left(tokenizer, ctx + cont, block_size + 1)
    return full, len(cont)


def _check_example(ex: object, i: int, answer: bool = False) -> None:
    """What parse_choice_example checks of a file's row, for examples[i] made in code: an empty choice had no
    tokens to score (or only the separator's) and divided by zero in acc_norm; no choices, no argmax; an
    answer that no choice has was never right, a silently lower accuracy."""
    if not isinstance(ex, ChoiceExample):
        raise TypeError(f"examples[{i}] must be a ChoiceExample, got {type(ex).__name__}")
    if not isinstance(ex.context, str):  # else the tokenizer failed on it, naming no example
        raise TypeError(f"examples[{i}]: context must be a str, got {type(ex.context).__name__}")
    if not isinstance(ex.description, str):
        raise TypeError(f"examples[{i}]: description must be a str, got {type(ex.description).__name__}")
    if not ex.choices or not all(isinstance(c, str) and c for c in ex.choices):
        raise ValueError(f"examples[{i}]: choices must be a non-empty list of non-empty strings, got {ex.choices!r}")
    if ex.continuation is not None and not (isinstance(ex.continuation, str) and ex.continuation):
        raise ValueError(f"examples[{i}]: continuation must be None or a non-empty string, got {ex.continuation!r}")
    if ex.true_choices is not None and not _indices_of(ex.true_choices, len(ex.choices)):
        raise ValueError(f"examples[{i}]: true_choices must be None or a non-empty tuple of distinct indices of its "
                         f"{len(ex.choices)} choices, got {ex.true_choices!r}")
    if answer and (isinstance(ex.answer, bool) or not isinstance(ex.answer, int)
                   or not 0 <= ex.answer < len(ex.choices)):
        raise ValueError(f"examples[{i}]: answer must be the index of one of its {len(ex.choices)} choices, "
                         f"got {ex.answer!r}")


def _indices_of(values: object, n: int) -> bool:
    """Whether `values` is a non-empty tuple of distinct indices into n items."""
    return (isinstance(values, tuple) and len(values) > 0 and len(set(values)) == len(values)
            and all(type(v) is int and 0 <= v < n for v in values))


@torch.no_grad()
def score_choices(model, tokenizer, examples: Sequence[ChoiceExample], separator: str = " ",
                  batch_size: int = 16, progress: bool = False) -> list[list[float]]:
    """Summed log-probability of each choice's tokens given its description and context (or, for an example
    with a shared continuation, of the continuation's tokens given the context completed by the choice): one list
    per example.

    Every (example, choice) pair is a row; rows are batched right-padded, the context and padding
    positions carry target -1 so only the choice's tokens count.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    block = model.config.block_size
    # The contexts' ids are read, not scored, so token_logprobs' check of the targets does not see them:
    # another model's tokenizer would crash deep in the embedding (or read its padding rows).
    check_scoring_vocab(tokenizer, model)
    rows = []  # (example index, token ids, continuation length)
    for i, ex in enumerate(examples):
        _check_example(ex, i)
        for choice in ex.choices:
            context, scored = _scored_pair(ex, choice, separator)
            ids, n_cont = encode_pair(tokenizer, ex.description + context, scored, block, f"examples[{i}]")
            rows.append((i, ids, n_cont))

    scores: list[list[float]] = [[] for _ in examples]
    device = model.device
    starts = range(0, len(rows), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, unit="batch", desc="choices", dynamic_ncols=True)
    with eval_mode(model):
        for b in starts:
            chunk = rows[b : b + batch_size]
            width = max(len(ids) - 1 for _, ids, _ in chunk)
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T), right-padded
            targets = torch.full((len(chunk), width), -1, dtype=torch.long)  # (B, T)
            for r, (_, ids, n_cont) in enumerate(chunk):
                n = len(ids) - 1
                inputs[r, :n] = torch.tensor(ids[:-1])
                targets[r, n - n_cont : n] = torch.tensor(ids[-n_cont:])  # the choice's tokens only
            sums = sequence_logprobs(model, inputs.to(device), targets.to(device))  # (B,)
            for (i, _, _), s in zip(chunk, sums.double().tolist()):
                scores[i].append(s)
    return scores


def _scored_pair(ex: ChoiceExample, choice: str, separator: str) -> tuple[str, str]:
    """(the text conditioned on, the text scored) for one choice, the description left out: the choice after the
    context, or the shared continuation after the context completed by the choice."""
    if ex.continuation is None:
        return ex.context, separator + choice
    return ex.context + choice, separator + ex.continuation


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda k: values[k])  # the first of equal maxima


def _per_byte_argmax(ex: ChoiceExample, logps: Sequence[float]) -> int:
    """acc_norm's pick: the highest log-prob per UTF-8 byte of the choice. A shared continuation has the same
    length under every choice, so dividing by it would change nothing."""
    if ex.continuation is not None:
        return _argmax(logps)
    return _argmax([lp / len(c.encode("utf-8")) for lp, c in zip(logps, ex.choices)])


def mc2(logps: Sequence[float], true_choices: Sequence[int]) -> float:
    """The share of the choices' probability (exp of each summed log-prob) that the true ones have. The largest
    log-prob is taken out of all before exp, which leaves the ratio as it is: long choices' exp(-800) would be 0.0
    and the ratio 0/0."""
    top = max(logps)
    probs = [math.exp(lp - top) for lp in logps]
    return sum(probs[k] for k in true_choices) / sum(probs)


def with_fewshot(examples: Sequence[ChoiceExample], pool: Sequence[ChoiceExample], k: int, separator: str = " ",
                 seed: int = FEWSHOT_SEED, first: bool = False, one_more: bool = True) -> list[ChoiceExample]:
    """Each example with k solved examples of `pool` (never one equal to it) written before its context (after
    its description, which the shots' are not: the harness writes a task's description once, then the shots; but
    where it is part of the harness's doc_to_text, HarnessRules.description_per_shot, it follows each shot too),
    each as its context, the separator, its right answer and a blank line (the harness's target_delimiter and
    fewshot_delimiter, samplers.py get_context).
    The shots are drawn as the harness's default sampler draws them (harness.harness_shots: one
    random.Random(seed); k + 1 drawn for each example in turn with one_more, as where the pool is the split
    scored, else k); with `first`, they are the first k of the pool that have the example's description (a dev
    split's, in its order: the harness's first_n sampler)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"fewshot must be an int >= 0, got {k!r}")
    if k == 0:
        return list(examples)
    if not first and one_more and len(pool) <= k:  # k others than the example itself
        raise ValueError(f"fewshot={k} needs more than {k} examples in the task, it has {len(pool)}")
    # The shots write out their right answers, so the whole pool is checked, not only the examples scored
    # (a limit leaves the rest unchecked): answer -1 wrote the last choice as the answer, silently.
    for i, s in enumerate(pool):
        _check_example(s, i, answer=True)
    if first:
        drawn = [_first_shots(ex, pool, k) for ex in examples]
    else:
        drawn = harness_shots(examples, pool, k, seed, one_more)
    out = []
    for ex, shots in zip(examples, drawn):
        # The example's description comes first; where the harness's doc_to_text holds it, it comes again after
        # each shot, before the next one (or the example).
        again = ex.description if ex.harness.description_per_shot else ""
        prefix = "".join("".join(_scored_pair(s, s.choices[s.answer], separator)) + "\n\n" + again for s in shots)
        out.append(replace(ex, context=prefix + ex.context))
    return out


def _first_shots(ex: ChoiceExample, pool: Sequence[ChoiceExample], k: int) -> list[ChoiceExample]:
    # != as the harness's `x != doc`, not `is not`: a few-shot file is read apart from the task, so the copy it
    # holds of the example is another object, and it wrote the example's own answer before it. The scan stops at
    # the k-th shot, not comparing whole examples across all the pool for each example scored.
    shots = list(islice((s for s in pool if s.description == ex.description and s != ex), k))
    if len(shots) < k:
        about = f" with the description {ex.description.strip()!r}" if ex.description else ""
        raise ValueError(f"fewshot={k} needs {k} solved examples{about}; the few-shot data has {len(shots)} "
                         f"(fewshot_data, --fewshot-data)")
    return shots


def evaluate_choices(model, tokenizer, examples: Sequence[ChoiceExample] | str, separator: str = " ",
                     batch_size: int = 16, limit: int | None = None, return_predictions: bool = False,
                     progress: bool = False, fewshot: int = 0, seed: int = FEWSHOT_SEED,
                     fewshot_data: Sequence[ChoiceExample] | str | None = None) -> dict[str, Any]:
    """accuracy (and acc_norm where the harness reports it) of `model` on a multiple-choice task (a path or a
    list of ChoiceExample), zero-shot or with `fewshot` solved examples before each context: of the task itself,
    or of fewshot_data (a path or a list: the training split, MMLU's dev split), drawn as the harness draws them
    with its fewshot seed `seed` (the module's docstring says how, task by task).

    Returns {"accuracy", "accuracy_stderr", "acc_norm", "acc_norm_stderr", "examples", "fewshot"} (no acc_norm
    where no example's task reports it: MMLU, WinoGrande, BoolQ, COPA, TruthfulQA) and, with return_predictions,
    "predictions": one {"answer", "pred", "pred_norm", "logprobs"} per example. Examples with true_choices
    (TruthfulQA MC2; all of them or none) get {"mc2", "mc2_stderr", "examples", "fewshot"} instead, and
    predictions {"true_choices", "mc2", "logprobs"}. Examples with an mc2_example (TruthfulQA's export, MC1 and
    MC2 in one row; all of them or none) get both: their accuracy, and the mc2 of their mc2_examples, scored the
    same way (its predictions are "mc2_predictions"). MMLU's examples of several subjects: accuracy_stderr is the
    harness's mmlu group's (the subjects' pooled), and "categories" holds {category: {"accuracy",
    "accuracy_stderr", "examples"}} (the module's docstring says when). fewshot_data of another task than the
    examples' is refused.
    """
    if isinstance(examples, (str, os.PathLike)):
        examples = load_choice_tasks(os.fspath(examples))
    pool = list(examples)  # read once: an iterator given here was read empty a second time ("examples is empty")
    if fewshot_data is not None and not fewshot:
        raise ValueError("fewshot_data has no effect with fewshot=0: give the number of shots too")
    if isinstance(fewshot_data, (str, os.PathLike)):
        fewshot_data = _load_fewshot_data(os.fspath(fewshot_data))
    if fewshot_data is not None:
        fewshot_data = list(fewshot_data)  # read twice: checked here, drawn from later
        _check_same_task(pool, fewshot_data)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    examples = pool[:limit]
    if len(examples) == 0:
        raise ValueError("examples is empty")
    for i, ex in enumerate(examples):
        _check_example(ex, i, answer=True)
    paired = _has_mc2_examples(pool, "examples")
    if paired and fewshot_data is not None and not _has_mc2_examples(fewshot_data, "fewshot_data"):
        raise ValueError("fewshot_data's examples have no mc2_example: the examples' mc2_examples would have no "
                         "shots")
    result = _evaluate_shot(model, tokenizer, _shot(examples, pool, fewshot, separator, seed, fewshot_data),
                            fewshot, separator, batch_size, return_predictions, progress)
    if paired:
        shots_from = None if fewshot_data is None else _mc2_examples(fewshot_data)
        shot = _shot(_mc2_examples(examples), _mc2_examples(pool), fewshot, separator, seed, shots_from)
        scored = _evaluate_shot(model, tokenizer, shot, fewshot, separator, batch_size, return_predictions, progress)
        result.update(mc2=scored["mc2"], mc2_stderr=scored["mc2_stderr"])
        if return_predictions:
            result["mc2_predictions"] = scored["predictions"]
    return result


def _load_fewshot_data(path: str) -> list[ChoiceExample]:
    """The few-shot file's examples; an error that cannot be read names the option too."""
    try:
        return load_choice_tasks(path)
    except ValueError as err:
        raise ValueError(f"fewshot_data (--fewshot-data): {err}") from err


def _check_same_task(examples: Sequence[ChoiceExample], fewshot_data: Sequence[ChoiceExample]) -> None:
    """A ValueError where the few-shot examples are of another task than the examples: another file's rows load
    in their own format, and their shots, phrased as their task's, silently change the accuracy. Examples made in
    code (no task) are not checked."""
    tasks = {ex.task for ex in examples} - {""}
    shot_tasks = {ex.task for ex in fewshot_data} - {""}
    if tasks and shot_tasks and tasks != shot_tasks:
        raise ValueError(f"fewshot_data (--fewshot-data) holds {' and '.join(sorted(shot_tasks))} rows, the task "
                         f"{' and '.join(sorted(tasks))} rows: shots of another task would change what is measured; "
                         f"give the task's own train (MMLU: dev) split, in the same export")


def _shot(examples: list[ChoiceExample], pool: list[ChoiceExample], fewshot: int, separator: str, seed: int,
          fewshot_data: Sequence[ChoiceExample] | None) -> list[ChoiceExample]:
    """The examples with their few-shot shots: drawn from the pool (the task itself: k + 1 drawn, the example
    dropped), or taken from fewshot_data as the task's harness rules say."""
    if fewshot_data is None:
        return with_fewshot(examples, pool, fewshot, separator, seed)
    rules = _rules_of(examples)
    return with_fewshot(examples, list(fewshot_data), fewshot, separator, seed, first=rules.first_n,
                        one_more=rules.one_more)


def _rules_of(examples: Sequence[ChoiceExample]) -> HarnessRules:
    """The HarnessRules the examples share (one task's); a ValueError where they mix tasks drawn otherwise."""
    rules = {ex.harness for ex in examples}
    if len(rules) > 1:
        raise ValueError("examples mix tasks whose shots lm-evaluation-harness draws otherwise (their HarnessRules "
                         f"differ: {sorted(map(repr, rules))}): evaluate them apart")
    return rules.pop()


def _evaluate_shot(model, tokenizer, examples: list[ChoiceExample], fewshot: int, separator: str, batch_size: int,
                   return_predictions: bool, progress: bool) -> dict[str, Any]:
    """evaluate_choices' result for examples already checked and shot."""
    several_right = _several_right(examples)
    scores = score_choices(model, tokenizer, examples, separator, batch_size, progress)
    if several_right:
        return _mc2_result(examples, scores, fewshot, return_predictions)
    correct, correct_norm = [], []  # 1.0 or 0.0 per example, as the harness's acc and acc_norm
    predictions = []
    for ex, logps in zip(examples, scores):
        pred, pred_norm = _argmax(logps), _per_byte_argmax(ex, logps)
        correct.append(float(pred == ex.answer))
        correct_norm.append(float(pred_norm == ex.answer))
        predictions.append({"answer": ex.answer, "pred": pred, "pred_norm": pred_norm, "logprobs": logps})
    result: dict[str, Any] = {"accuracy": sum(correct) / len(examples),
                              "accuracy_stderr": _stderr(examples, correct)}
    if any(_reports_acc_norm(ex) for ex in examples):  # the task's harness metric_list (HarnessRules)
        result.update(acc_norm=sum(correct_norm) / len(examples), acc_norm_stderr=_stderr(examples, correct_norm))
    result.update(examples=len(examples), fewshot=fewshot)
    categories = _mmlu_categories(examples, correct)
    if categories is not None:
        result["categories"] = categories
    if return_predictions:
        result["predictions"] = predictions
    return result


def _stderr(examples: Sequence[ChoiceExample], scores: list[float]) -> float | None:
    """The standard error the harness reports for the mean of the scores: of one task, its mean_stderr; of MMLU's
    examples of several subjects, its mmlu group's, the subjects' stderrs pooled."""
    subjects = _by_subject(examples, scores)
    if subjects is None or len(subjects) < 2:
        return mean_stderr(scores)
    return pooled_stderr(list(subjects.values()))


def _by_subject(examples: Sequence[ChoiceExample], scores: list[float]) -> dict[str, list[float]] | None:
    """The scores of each MMLU subject, in the order they come; None unless every example has a subject."""
    subjects: dict[str, list[float]] = {}
    for ex, score in zip(examples, scores):
        if ex.subject is None:
            return None
        subjects.setdefault(ex.subject, []).append(score)
    return subjects


def _mmlu_categories(examples: Sequence[ChoiceExample], correct: list[float]) -> dict[str, dict] | None:
    """{category: {"accuracy", "accuracy_stderr", "examples"}} of the harness's mmlu group (its groups mmlu_stem,
    ...: size-weighted accuracy, pooled stderr), in its table's order; None unless the examples are of several of
    MMLU's 57 subjects."""
    subjects = _by_subject(examples, correct)
    if subjects is None or len(subjects) < 2 or not set(subjects) <= set(MMLU_CATEGORY_OF):
        return None
    groups: dict[str, list[list[float]]] = {}
    for subject, scores in subjects.items():
        groups.setdefault(MMLU_CATEGORY_OF[subject], []).append(scores)
    return {category: {"accuracy": sum(map(sum, groups[category])) / sum(map(len, groups[category])),
                       "accuracy_stderr": pooled_stderr(groups[category]),
                       "examples": sum(map(len, groups[category]))} for category in sorted(groups)}


def _reports_acc_norm(ex: ChoiceExample) -> bool:
    """Whether the example's task reports acc_norm: its harness yaml lists it, and the choices are not all scored
    through the same continuation (dividing by its length would change nothing)."""
    return ex.harness.acc_norm and ex.continuation is None


def _has_mc2_examples(examples: Sequence[ChoiceExample], name: str) -> bool:
    """Whether the examples carry an mc2_example each (TruthfulQA's export); an error where only some do (their
    accuracy and mc2 would be of different questions) or where one is not an example scored by mc2."""
    marked = [getattr(ex, "mc2_example", None) is not None for ex in examples]
    if any(marked) and not all(marked):
        raise ValueError(f"{name} mix {sum(marked)} with an mc2_example (TruthfulQA MC1 and MC2) and "
                         f"{marked.count(False)} without: evaluate them apart")
    for i, ex in enumerate(examples):
        attached = getattr(ex, "mc2_example", None)
        if attached is not None and not (isinstance(attached, ChoiceExample) and attached.true_choices is not None):
            raise ValueError(f"{name}[{i}]: mc2_example must be a ChoiceExample with true_choices, got {attached!r}")
    return all(marked)


def _mc2_examples(examples: Sequence[ChoiceExample]) -> list[ChoiceExample]:
    return [ex.mc2_example for ex in examples]


def _several_right(examples: Sequence[ChoiceExample]) -> bool:
    """Whether the examples are scored by mc2 (each has true_choices); a ValueError where only some are, whose
    accuracy and mc2 would be of different examples."""
    marked = [ex.true_choices is not None for ex in examples]
    if any(marked) and not all(marked):
        raise ValueError(f"examples mix {sum(marked)} with true_choices (scored by mc2) and {marked.count(False)} "
                         f"with one answer (scored by accuracy): evaluate them apart")
    return all(marked)


def _mc2_result(examples: Sequence[ChoiceExample], scores: list[list[float]], fewshot: int,
                return_predictions: bool) -> dict[str, Any]:
    per_example = [mc2(logps, ex.true_choices) for ex, logps in zip(examples, scores)]
    result: dict[str, Any] = {"mc2": sum(per_example) / len(examples), "mc2_stderr": mean_stderr(per_example),
                              "examples": len(examples), "fewshot": fewshot}
    if return_predictions:
        result["predictions"] = [{"true_choices": list(ex.true_choices), "mc2": value, "logprobs": logps}
                                 for ex, value, logps in zip(examples, per_example, scores)]
    return result
