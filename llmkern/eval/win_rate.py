"""Win rate: how often a judge prefers one model's responses to another's, on the same instructions.

The judge is any object with `score(prompts, responses) -> list[float]` (higher is better), for
example a reward model trained with `llmkern finetune reward` (see reward_model_judge). For each
instruction the two responses are scored; the one scoring more than `tie_margin` higher wins,
otherwise it is a tie. The win rate counts a tie as half a win, and comes with a 95% interval
(Wilson's score interval, or a bootstrap over the instructions): with a few hundred instructions
a win rate of 0.55 may well be chance, and the interval says so.

Prompts follow each model's own template (llmkern.finetune.templates): compare_runs prompts each run
in the template its fine-tuning saved (alpaca when none) unless told one, and a reward-model judge
reads the prompts and responses in the template it was trained with.
"""

from __future__ import annotations

import math
import os
import random
import statistics
from typing import Any, Protocol, Sequence

import torch


class Judge(Protocol):
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


class RewardModelJudge:
    """A Judge over a reward model from llmkern.finetune.reward. Prompts are formatted prompts (in
    prompt_format, the template the reward model learned, Alpaca by default); responses are bare
    texts, which get the template's end marker before they are scored."""

    def __init__(self, reward_model, tokenizer, prompt_format=None) -> None:
        from ..finetune.templates import PromptFormat

        self.reward_model = reward_model
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format or PromptFormat()

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        from ..finetune.reward import score

        ended = [self.prompt_format.response(r) for r in responses]
        return [float(s) for s in score(self.reward_model, self.tokenizer, list(prompts), ended)]


def reward_model_judge(run_dir: str, device: str | torch.device = "auto") -> RewardModelJudge:
    """The reward model saved in run_dir (a `llmkern finetune reward` run) as a Judge, reading prompts in
    the template it was trained with."""
    from ..finetune.reward import load_reward_run
    from ..finetune.templates import saved_prompt_format

    reward_model, tokenizer, meta = load_reward_run(run_dir, device)
    return RewardModelJudge(reward_model, tokenizer, saved_prompt_format(meta))


# --- intervals ---------------------------------------------------------------------------------

def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a proportion successes / n (successes may count ties as halves).

    Unlike the normal approximation p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and does not
    collapse to a point at p = 0 or 1.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap_interval(outcomes: Sequence[float], confidence: float = 0.95, samples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of outcomes (1 win, 0.5 tie, 0 loss)."""
    if len(outcomes) == 0:
        raise ValueError("outcomes is empty")
    _z(confidence)  # checks confidence
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    rng = random.Random(seed)
    n = len(outcomes)
    means = sorted(sum(rng.choices(outcomes, k=n)) / n for _ in range(samples))
    tail = (1 - confidence) / 2
    lo = means[min(samples - 1, int(math.floor(tail * samples)))]
    hi = means[min(samples - 1, int(math.ceil((1 - tail) * samples)) - 1)]
    return lo, hi


# --- comparing -----------------------------------------------------------------------------------

def win_rate(judge: Judge, prompts: Sequence[str], responses: Sequence[str], baseline_responses: Sequence[str],
             tie_margin: float = 0.0, interval: str = "wilson", confidence: float = 0.95,
             bootstrap_samples: int = 2000, seed: int = 0, return_scores: bool = False) -> dict[str, Any]:
    """Wins, ties and losses of `responses` against `baseline_responses` under `judge`.

    Returns {"wins", "ties", "losses", "n", "win_rate" (ties count half), "ci_low", "ci_high",
    "interval", "confidence", "mean_score_diff"} and, with return_scores, "scores" and
    "baseline_scores" (one per prompt).
    """
    if not callable(getattr(judge, "score", None)):
        raise TypeError(f"judge must have a score(prompts, responses) method, got {type(judge).__name__}")
    n = len(prompts)
    if n == 0:
        raise ValueError("prompts is empty")
    if len(responses) != n or len(baseline_responses) != n:
        raise ValueError(f"prompts, responses and baseline_responses must have the same length; got {n}, "
                         f"{len(responses)} and {len(baseline_responses)}")
    if not tie_margin >= 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    if interval not in ("wilson", "bootstrap"):
        raise ValueError(f"interval must be 'wilson' or 'bootstrap', got {interval!r}")

    scores = [float(s) for s in judge.score(list(prompts), list(responses))]
    base = [float(s) for s in judge.score(list(prompts), list(baseline_responses))]
    if len(scores) != n or len(base) != n:
        raise ValueError(f"the judge returned {len(scores)} and {len(base)} scores for {n} prompts")
    outcomes = []  # 1 win, 0.5 tie, 0 loss
    for a, b in zip(scores, base):
        diff = a - b
        outcomes.append(0.5 if abs(diff) <= tie_margin else float(diff > 0))
    wins, ties = outcomes.count(1.0), outcomes.count(0.5)
    points = wins + 0.5 * ties
    if interval == "wilson":
        lo, hi = wilson_interval(points, n, confidence)
    else:
        lo, hi = bootstrap_interval(outcomes, confidence, bootstrap_samples, seed)
    result: dict[str, Any] = {
        "wins": wins, "ties": ties, "losses": n - wins - ties, "n": n, "win_rate": points / n,
        "ci_low": lo, "ci_high": hi, "interval": interval, "confidence": confidence,
        "mean_score_diff": sum(a - b for a, b in zip(scores, base)) / n,
    }
    if return_scores:
        result["scores"], result["baseline_scores"] = scores, base
    return result


# --- responses -------------------------------------------------------------------------------------

def _as_example(item: object, i: int) -> dict[str, Any]:
    if isinstance(item, str):
        return {"instruction": item, "input": ""}
    if isinstance(item, dict) and isinstance(item.get("instruction"), str):
        return item
    raise ValueError(f"instructions[{i}] must be a string or a dict with a string 'instruction'")


def instruction_prompts(instructions: Sequence[str | dict[str, Any]], prompt_format=None) -> list[str]:
    """The prompts of instructions (strings or dicts) in prompt_format (a
    llmkern.finetune.templates.PromptFormat; default: the Alpaca template)."""
    from ..finetune.templates import PromptFormat

    fmt = prompt_format or PromptFormat()
    return [fmt.prompt(_as_example(item, i)) for i, item in enumerate(instructions)]


def generate_responses(model, tokenizer, instructions: Sequence[str | dict[str, Any]], max_new_tokens: int = 256,
                       temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                       seed: int | None = 0, batch_size: int = 8, progress: bool = False,
                       prompt_format=None) -> list[str]:
    """The model's response to each instruction: greedy by default, stopping at <|endoftext|> or the
    template's end marker (ChatML's <|im_end|>).

    instructions are strings or Alpaca dicts ({"instruction", "input"}); each is put in prompt_format
    (default: the Alpaca template), and the response is the decoded new text, stripped of surrounding
    whitespace.
    """
    from ..finetune.templates import PromptFormat, respond

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    fmt = prompt_format or PromptFormat()
    prompts = instruction_prompts(instructions, fmt)
    responses = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, unit="batch", desc="generate", dynamic_ncols=True)
    for b in starts:
        batch = respond(model, tokenizer, prompts[b : b + batch_size], fmt, max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed)
        responses += [r.strip() for r in batch]
    return responses


def load_instructions(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Instruction examples (a .json list or .jsonl of {"instruction", "input"?, ...}), the first `limit`."""
    from ..finetune.data import load_prompt_data

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    return load_prompt_data(path)[:limit]


def compare_runs(run_dir: str, baseline_dir: str, judge: Judge | str, data: str | Sequence[Any],
                 limit: int | None = None, max_new_tokens: int = 256, device: str | torch.device = "auto",
                 tie_margin: float = 0.0, interval: str = "wilson", batch_size: int = 8,
                 progress: bool = False, template: str | None = None, system_prompt: str | None = None
                 ) -> dict[str, Any]:
    """Win rate of run_dir's model over baseline_dir's, each answering the instructions in `data`
    greedily, as judged by `judge` (a Judge, or the folder of a reward-model run).

    Each run is prompted in the template its fine-tuning saved (alpaca when none), or in `template` /
    `system_prompt` when given (llmkern.finetune.templates.resolve_prompt_format). The judge reads the
    prompts in its own template: a reward-model judge's saved one, a Judge object's `prompt_format`
    attribute, else Alpaca. The result names the templates used ("templates")."""
    from ..finetune.templates import PromptFormat, resolve_prompt_format
    from ..train.inference import load_trained_model

    examples = load_instructions(os.fspath(data), limit) if isinstance(data, (str, os.PathLike)) else list(data)
    answers, templates = [], []
    for run in (run_dir, baseline_dir):
        model, tokenizer, state = load_trained_model(run, device)
        fmt = resolve_prompt_format(state.meta, template, system_prompt)
        answers.append(generate_responses(model, tokenizer, examples, max_new_tokens, batch_size=batch_size,
                                          progress=progress, prompt_format=fmt))
        templates.append(fmt.template)
        del model  # one model in memory at a time
    if isinstance(judge, (str, os.PathLike)):
        judge = reward_model_judge(os.fspath(judge), device)
    judge_format = getattr(judge, "prompt_format", None) or PromptFormat()
    result = win_rate(judge, instruction_prompts(examples, judge_format), answers[0], answers[1], tie_margin,
                      interval)
    result.update(run=os.path.abspath(run_dir), baseline=os.path.abspath(baseline_dir),
                  templates={"run": templates[0], "baseline": templates[1], "judge": judge_format.template})
    return result
