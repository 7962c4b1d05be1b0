"""Rules lm-evaluation-harness applies to every task: how it draws few-shot examples, and its standard errors
(of a mean, of a group of subtasks such as MMLU's subjects, and its bootstrap for a perplexity).

They follow lm-evaluation-harness v0.4 (lm_eval/api/samplers.py, lm_eval/api/task.py, lm_eval/api/metrics.py,
lm_eval/evaluator_utils.py); the tasks' own rules (which split the shots come from, which metrics are reported)
are in choice_formats' HarnessRules and gsm8k.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

FEWSHOT_SEED = 1234  # the harness's fewshot_random_seed (simple_evaluate's default; one Random per task)
BOOTSTRAP_CHUNK = 1000  # metrics.py bootstrap_stderr: resamples per chunk, each chunk its own random.Random(index)

Doc = TypeVar("Doc")


def harness_shots(examples: Sequence[Doc], pool: Sequence[Doc], k: int, seed: int = FEWSHOT_SEED,
                  one_more: bool = False) -> list[list[Doc]]:
    """The few-shot examples before each of `examples`, drawn as the harness's default sampler draws them: one
    random.Random(seed) for the whole task, and for each example in turn `pool` sampled (k + 1 rows with
    one_more, else k), the rows equal to the example dropped, the first k kept. An example of the pool so gets
    k shots with one_more and k - 1 without.

    one_more is the harness's `config.fewshot_split == config.test_split` (samplers.py ContextSampler.get_context):
    true where the shots come from the split scored, and also, since both are then None, wherever the task's
    yaml names neither (HellaSwag, PIQA, BoolQ, COPA, WinoGrande, TruthfulQA). The harness compares rows as
    dicts (`x != doc`); here they are compared with ==.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"fewshot must be an int >= 0, got {k!r}")
    if k == 0:
        return [[] for _ in examples]  # the harness draws nothing then: no random number is used
    drawn = k + 1 if one_more else k
    if len(pool) < drawn:
        raise ValueError(f"fewshot={k} needs {drawn} solved examples to draw from; the few-shot data has "
                         f"{len(pool)}")
    rng = random.Random(seed)
    pool = list(pool)  # random.sample wants a sequence; the harness samples a list of its docs too
    return [[shot for shot in rng.sample(pool, drawn) if shot != ex][:k] for ex in examples]


def mean_stderr(scores: Sequence[float]) -> float | None:
    """The harness's standard error of a mean (metrics.py mean_stderr: the sample standard deviation, n - 1 in
    the denominator, over sqrt(n)); None for a single score, which the harness reports as "N/A"
    (evaluator_utils.py: `stderr_fn(items) if (stderr_fn and len(items) > 1) else "N/A"`)."""
    n = len(scores)
    if n == 0:
        raise ValueError("scores is empty: a mean of nothing has no standard error")
    if n == 1:
        return None
    mu = sum(scores) / n
    return math.sqrt(sum((x - mu) ** 2 for x in scores) / (n - 1)) / math.sqrt(n)


def pooled_stderr(groups: Sequence[Sequence[float]]) -> float | None:
    """The standard error the harness reports for a group of subtasks weighted by size (MMLU, its categories):
    each subtask's mean_stderr pooled as metrics.py pooled_sample_stderr pools them,
        sqrt(sum_i (n_i - 1) * n_i * stderr_i**2 / (N - g) / N)   over the g subtasks, N = sum_i n_i,
    that is the within-subtask variance over N (evaluator_utils.py consolidate_group_results pools the leaf
    subtasks, also for a group of groups). None, the harness's "N/A", where a subtask has a single score."""
    if not groups or any(len(scores) == 0 for scores in groups):
        raise ValueError("groups must be non-empty lists of scores: an empty subtask has no standard error")
    stderrs = [mean_stderr(scores) for scores in groups]
    if any(stderr is None for stderr in stderrs):
        return None
    sizes = [len(scores) for scores in groups]
    total = sum(sizes)
    pooled_variance = sum((n - 1) * n * stderr**2 for n, stderr in zip(sizes, stderrs)) / (total - len(sizes))
    return math.sqrt(pooled_variance / total)


def bootstrap_stderr(statistic: Callable[[np.ndarray], np.ndarray], scores: Sequence[float],
                     iters: int) -> float | None:
    """The harness's bootstrap standard error of statistic(scores) (metrics.py bootstrap_stderr), resample for
    resample: iters // 1000 chunks of min(1000, iters) resamples, chunk i drawn by random.Random(i).choices (the
    pool's workers and the single-process loop draw the same), then the sample standard deviation of the
    statistic over the resamples. numpy's RandomState seeded with [i] is the same Mersenne Twister stream as
    random.Random(i), and its random_sample the same doubles as random(), so the indices floor(u * n) are
    random.choices' own; `statistic` maps a (resamples, n) array to one value per row. None, the harness's "N/A",
    for a single score."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 2:
        raise ValueError(f"iters must be an int >= 2 (resamples), got {iters!r}")
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("scores must be a non-empty list of numbers")
    if len(values) == 1:
        return None
    chunk = min(BOOTSTRAP_CHUNK, iters)
    replicates = [statistic(values[_resample_indices(i, chunk, len(values))]) for i in range(iters // chunk)]
    return float(np.concatenate(replicates).std(ddof=1))


def _resample_indices(seed: int, rows: int, n: int) -> np.ndarray:
    """random.Random(seed).choices(range(n), k=n), `rows` times in turn: a (rows, n) array of indices."""
    uniform = np.random.RandomState([seed]).random_sample((rows, n))
    return (uniform * float(n)).astype(np.int64)  # random.choices: floor(random() * n)
