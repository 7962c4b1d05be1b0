"""LAMBADA, as lm-evaluation-harness's lambada_openai scores it: can the model finish a passage's last word?

The task file is lambada_openai's jsonl, one {"text": PASSAGE} a line (or a JSON list of such rows). Each
passage is split at its last space: the context is the text before it, the target " " + the last word. Two
metrics, as the harness reports them:
- accuracy: the share of passages whose every target token is the model's greedy (argmax) choice;
- perplexity: exp of minus the mean, over passages, of the target's summed log-probability (per passage, not
  per token, so it depends on the tokenizer).
accuracy comes with its standard error as the harness computes it (harness.mean_stderr); perplexity with the
harness's bootstrap standard error (harness.bootstrap_stderr), resample for resample as the harness draws them,
but 10,000 resamples by default where simple_evaluate's bootstrap_iters is 100,000: drawing the 100,000 x 5,153
indices takes about 6 s of one CPU core (the Mersenne Twister stream alone about 3 s), 10,000 about 0.6 s. The
figure is then the one the harness reports with --bootstrap_iters 10000; it differs from its default one only by
the bootstrap's own Monte Carlo error, about 1/sqrt(2 * 10,000) = 0.7% of the standard error (0.2% at 100,000).
evaluate_lambada(bootstrap_iters=100_000) repeats the default figure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._modes import eval_mode
from .harness import bootstrap_stderr, mean_stderr
from .logprobs import IGNORE, logprobs_from_hidden
from .multiple_choice import check_scoring_vocab, encode_pair, json_rows, read_task_text

BOOTSTRAP_ITERS = 10_000  # the perplexity's bootstrap resamples (the module's docstring says why not 100,000)


def split_last_word(text: str) -> tuple[str, str]:
    """(context, target) of a passage as the harness cuts it: text.split(' ')[:-1] joined by ' ', and
    ' ' + text.split(' ')[-1]."""
    context, _, last = text.rpartition(" ")
    return context, " " + last


def load_lambada(path: str) -> list[tuple[str, str]]:
    """(context, target) of each {"text"} row of a .jsonl file (or a JSON list)."""
    passages = [_passage(row, where) for where, row in json_rows(read_task_text(path), path)]
    if not passages:
        raise ValueError(f"task file {path!r} holds no examples")
    return passages


def _passage(row: object, where: str) -> tuple[str, str]:
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise ValueError(f"{where}: expected a JSON object with a string 'text' (a LAMBADA passage)")
    context, target = split_last_word(row["text"])
    if target == " ":  # the passage ends with a space: no last word to predict
        raise ValueError(f"{where}: 'text' ends with a space, so it has no last word to predict")
    return context, target


@torch.no_grad()
def evaluate_lambada(model, tokenizer, examples: Sequence[tuple[str, str]] | str, batch_size: int = 16,
                     limit: int | None = None, progress: bool = False,
                     bootstrap_iters: int = BOOTSTRAP_ITERS) -> dict[str, Any]:
    """{"accuracy", "accuracy_stderr", "perplexity", "perplexity_stderr", "examples"} of `model` on LAMBADA: a
    path, or (context, target) pairs. perplexity_stderr is the harness's bootstrap with bootstrap_iters resamples
    (None, the harness's "N/A", for a single passage)."""
    if isinstance(examples, (str, os.PathLike)):
        examples = load_lambada(os.fspath(examples))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if isinstance(bootstrap_iters, bool) or not isinstance(bootstrap_iters, int) or bootstrap_iters < 2:
        raise ValueError(f"bootstrap_iters must be an int >= 2, got {bootstrap_iters!r}")  # before the scoring
    examples = list(examples)[:limit]
    if not examples:
        raise ValueError("examples is empty")
    check_scoring_vocab(tokenizer, model)  # the contexts' ids are read, not scored
    rows = [encode_pair(tokenizer, context, target, model.config.block_size, f"examples[{i}]")
            for i, (context, target) in enumerate(examples)]
    starts = range(0, len(rows), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, unit="batch", desc="lambada", dynamic_ncols=True)
    logprobs, greedy = [], []
    with eval_mode(model):
        for b in starts:
            sums, hits = _score_batch(model, rows[b : b + batch_size])
            logprobs += sums
            greedy += hits
    hits = [float(hit) for hit in greedy]
    return {"accuracy": sum(hits) / len(rows), "accuracy_stderr": mean_stderr(hits),
            "perplexity": math.exp(-sum(logprobs) / len(rows)),
            "perplexity_stderr": bootstrap_stderr(_perplexities, logprobs, bootstrap_iters), "examples": len(rows)}


def _perplexities(logprobs):
    """The harness's perplexity aggregation, exp(-mean(loglikelihoods)), of each row of a (resamples, n) array."""
    return np.exp(-logprobs.mean(axis=1))


def _score_batch(model, chunk: list[tuple[list[int], int]]) -> tuple[list[float], list[bool]]:
    """(summed log-prob of each row's target tokens, whether each of them is the argmax) of right-padded rows."""
    width = max(len(ids) - 1 for ids, _ in chunk)
    inputs = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T)
    targets = torch.full((len(chunk), width), IGNORE, dtype=torch.long)  # (B, T): the target's tokens only
    for r, (ids, n_target) in enumerate(chunk):
        n = len(ids) - 1
        inputs[r, :n] = torch.tensor(ids[:-1])
        targets[r, n - n_target : n] = torch.tensor(ids[-n_target:])
    inputs, targets = inputs.to(model.device), targets.to(model.device)
    hidden = model.hidden_states(inputs)  # (B, T, C)
    sums = logprobs_from_hidden(model, hidden, targets).sum(dim=1)  # (B,)
    is_argmax = (model.head(hidden).argmax(dim=-1) == targets) | (targets == IGNORE)  # (B, T)
    return sums.double().tolist(), is_argmax.all(dim=1).tolist()
