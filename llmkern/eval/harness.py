"""Rules lm-evaluation-harness applies to every task: how it draws few-shot examples, and its standard errors.

Both follow lm-evaluation-harness v0.4 (lm_eval/api/samplers.py, lm_eval/api/task.py, lm_eval/api/metrics.py,
lm_eval/evaluator_utils.py); the tasks' own rules (which split the shots come from, which metrics are reported)
are in choice_formats' HarnessRules and gsm8k.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TypeVar

FEWSHOT_SEED = 1234  # the harness's fewshot_random_seed (simple_evaluate's default; one Random per task)

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
