"""Win rate: how often a judge prefers one model's responses to another's, on the same instructions.

A judge is one of two kinds:
  - a Judge, `score(prompts, responses) -> list[float]` (higher is better), which scores each response
    alone, for example a reward model trained with `llmkern finetune reward` (reward_model_judge). The
    response scoring more than `tie_margin` higher wins, otherwise it is a tie.
  - a PairJudge, `prefer(instructions, responses_a, responses_b) -> list[float]`, the probability that
    response A is the better one, for example a language model asked which of the two is better
    (LMJudge, AlpacaEval-style; lm_judge). A wins when that probability is more than 0.5 + tie_margin,
    loses below 0.5 - tie_margin, and ties in between.
The win rate counts a tie as half a win, and comes with a 95% interval (Wilson's score interval,
or a bootstrap over the instructions): with a few hundred instructions a win rate of 0.55 may well
be chance, and the interval says so.

Prompts follow each model's own template (llmkern.finetune.templates): compare_runs prompts each run
in the template its fine-tuning saved (alpaca when none) unless told one, and a reward-model judge
reads the prompts and responses in the template it was trained with; a language-model judge asks
its question in its own saved template.
"""

from __future__ import annotations

import math
import numbers
import os
import random
import statistics
from collections.abc import Sequence
from typing import Any, Protocol

import torch


class Judge(Protocol):
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


class PairJudge(Protocol):
    def prefer(self, instructions: Sequence[str], responses_a: Sequence[str],
               responses_b: Sequence[str]) -> list[float]: ...


def is_pair_judge(judge: object) -> bool:
    """Whether judge compares two responses at once (a PairJudge) rather than scoring each alone."""
    return callable(getattr(judge, "prefer", None))


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


JUDGE_QUESTION = ("Which of the two responses below better completes the instruction? "
                  "Answer with a single letter: A or B.")
CUT_MARK = " [...]"  # ends a response cut to fit the judge's block_size


class LMJudge:
    """A PairJudge over a language model (AlpacaEval-style): the model reads the instruction and the two
    responses, labelled A and B, in a judging prompt in its own template (prompt_format, Alpaca by
    default), and its next-token log-probabilities of "A" and "B" (no sampling), softmaxed over the two,
    give the probability that A is better.

    A language model prefers some positions whatever the answers say, so each pair is judged twice, in
    the order A, B and in the order B, A, and the two probabilities are averaged: a judge that always
    answers "A" gives exactly 0.5, a tie.

    A judging prompt longer than the judge's block_size has its responses cut to equal shares of the
    room the template and the instruction leave (a response shorter than its share keeps all of it and
    leaves the rest to the other), each cut one ending in CUT_MARK; `cut_prompts` counts them. An
    instruction that leaves no room is an error."""

    def __init__(self, model, tokenizer, prompt_format=None, batch_size: int = 8) -> None:
        from ..finetune.templates import PromptFormat

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format or PromptFormat()
        self.batch_size = batch_size
        self.label_ids = [self._answer_token(label) for label in ("A", "B")]
        self.cut_prompts = 0

    def _answer_token(self, label: str) -> int:
        """The id of `label` as the judge would answer it: the one token that follows a judging prompt in the
        joint text (encode_continuation). Encoded alone, a SentencePiece tokenizer gives "▁A", a token that the
        answer right after the prompt's line break never is."""
        from ..data.sequences import encode_continuation

        _, ids = encode_continuation(self.tokenizer, self.judging_prompt("", "", ""), label)
        if len(ids) != 1:  # never with a byte-level tokenizer: every byte is a token
            raise ValueError(f"the judge's tokenizer encodes the answer {label!r} after a judging prompt as "
                             f"{len(ids)} tokens; LMJudge reads the next-token probability of a one-token answer")
        return ids[0]

    def judging_prompt(self, instruction: str, response_a: str, response_b: str) -> str:
        """The prompt that asks which response is better, in the judge's template; the answer follows it."""
        question = (f"{JUDGE_QUESTION}\n\nInstruction:\n{instruction}\n\nResponse A:\n{response_a}\n\n"
                    f"Response B:\n{response_b}")
        return self.prompt_format.prompt({"instruction": question, "input": ""})

    @torch.no_grad()
    def first_is_better(self, instructions: Sequence[str], responses_a: Sequence[str],
                        responses_b: Sequence[str]) -> list[float]:
        """P(answer "A") / (P("A") + P("B")) after each judging prompt, in one order only (position bias
        included)."""
        from .._modes import eval_mode

        if not len(instructions) == len(responses_a) == len(responses_b):
            raise ValueError(f"instructions, responses_a and responses_b must have the same length; got "
                             f"{len(instructions)}, {len(responses_a)} and {len(responses_b)}")
        rows = [self._judging_ids(n, *texts) for n, texts in enumerate(zip(instructions, responses_a, responses_b))]
        probs: list[float] = []
        with eval_mode(self.model):
            for start in range(0, len(rows), self.batch_size):
                probs += self._label_probabilities(rows[start : start + self.batch_size])
        return probs

    def _judging_ids(self, n: int, instruction: str, response_a: str, response_b: str) -> list[int]:
        """The tokens of pair n's judging prompt, its responses cut to fit the block_size when it is longer."""
        block = self.model.config.block_size
        ids = self._prompt_ids(instruction, response_a, response_b)
        if len(ids) <= block:
            return ids
        a, b = self.tokenizer.encode(response_a), self.tokenizer.encode(response_b)
        # the room left for the responses' kept tokens: what the prompt holds besides them (both marks, the BOS too)
        room = block - len(self._prompt_ids(instruction, CUT_MARK, CUT_MARK))
        for _ in range(8):  # a re-encoded cut may take a few tokens more than its parts did (BPE merges)
            if room < 2:
                break
            # equal shares, the same whichever response is shown first; a short one leaves its rest to the other
            keep_a = min(len(a), max(room // 2, room - len(b)))
            keep_b = min(len(b), max(room // 2, room - len(a)))
            ids = self._prompt_ids(instruction, _cut(self.tokenizer, a, keep_a), _cut(self.tokenizer, b, keep_b))
            if len(ids) <= block:
                self.cut_prompts += 1
                return ids
            room -= len(ids) - block
        raise ValueError(f"the judging prompt of pair {n} does not fit the judge's block_size={block} even with its "
                         f"responses cut: the template and the instruction alone take nearly all of it; judge with "
                         f"a model of a longer context")

    def _prompt_ids(self, instruction: str, response_a: str, response_b: str) -> list[int]:
        """The tokens of a judging prompt, after the tokenizer's begin-of-sequence token where it has one."""
        from ..data.sequences import encode_sequence

        return encode_sequence(self.tokenizer, self.judging_prompt(instruction, response_a, response_b))

    def _label_probabilities(self, rows: list[list[int]]) -> list[float]:
        width = max(len(ids) for ids in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T), right-padded: causal, so no mask
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
        hidden = self.model.hidden_states(ids.to(self.model.device))  # (B, T, C)
        last = torch.tensor([len(row) - 1 for row in rows], device=hidden.device)
        logits = self.model.head(hidden[torch.arange(len(rows), device=hidden.device), last])  # (B, V)
        pair = logits.double().log_softmax(-1)[:, self.label_ids]  # (B, 2): log p("A"), log p("B")
        return pair.softmax(-1)[:, 0].tolist()

    def prefer(self, instructions: Sequence[str], responses_a: Sequence[str],
               responses_b: Sequence[str]) -> list[float]:
        """P(A is better) for each instruction: the mean of the judgement in both orders."""
        a_first = self.first_is_better(instructions, responses_a, responses_b)
        b_first = self.first_is_better(instructions, responses_b, responses_a)
        return [(p + (1.0 - q)) / 2 for p, q in zip(a_first, b_first)]


def _cut(tokenizer, ids: list[int], keep: int) -> str:
    """The text of the first `keep` of a response's tokens, marked as cut when tokens were dropped."""
    return tokenizer.decode(ids) if keep >= len(ids) else tokenizer.decode(ids[:keep]) + CUT_MARK


def lm_judge(run_dir: str, device: str | torch.device = "auto", batch_size: int = 8) -> LMJudge:
    """The language model saved in run_dir (a pretraining or fine-tuning run) as a PairJudge, asking in
    the template it was fine-tuned with (alpaca when none)."""
    from ..finetune.templates import saved_prompt_format
    from ..train.inference import load_trained_model

    model, tokenizer, state = load_trained_model(run_dir, device)  # refuses a reward model or classifier
    return LMJudge(model, tokenizer, saved_prompt_format(state.meta), batch_size)


JUDGE_KINDS = ("reward", "lm")


def load_judge(run_dir: str, kind: str = "reward", device: str | torch.device = "auto", batch_size: int = 8):
    """The judge saved in run_dir: kind "reward" (a reward-model run, scores each response) or "lm" (a
    language-model run, asked which of two responses is better)."""
    if kind == "reward":
        return reward_model_judge(run_dir, device)
    if kind == "lm":
        return lm_judge(run_dir, device, batch_size)
    raise ValueError(f"judge_kind must be one of {', '.join(JUDGE_KINDS)}; got {kind!r}")


# --- intervals ---------------------------------------------------------------------------------

def _z(confidence: float) -> float:
    # a number checked first: a string failed the comparison with a TypeError that named no argument
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
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
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:  # 2.5 failed in range()
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    rng = random.Random(seed)
    n = len(outcomes)
    means = sorted(sum(rng.choices(outcomes, k=n)) / n for _ in range(samples))
    tail = (1 - confidence) / 2
    lo = means[min(samples - 1, math.floor(tail * samples))]
    hi = means[min(samples - 1, math.ceil((1 - tail) * samples) - 1)]
    return lo, hi


# --- comparing -----------------------------------------------------------------------------------

def win_rate(judge: Judge | PairJudge, prompts: Sequence[str], responses: Sequence[str],
             baseline_responses: Sequence[str], tie_margin: float = 0.0, interval: str = "wilson",
             confidence: float = 0.95, bootstrap_samples: int = 2000, seed: int = 0,
             return_scores: bool = False) -> dict[str, Any]:
    """Wins, ties and losses of `responses` against `baseline_responses` under `judge`.

    A Judge scores prompts and responses; a PairJudge reads prompts as instructions and is asked, for
    each, how likely `responses` (as A) beats `baseline_responses` (as B). A response identical to its
    baseline response is a tie, whatever the judge's rounding says.

    Returns {"wins", "ties", "losses", "n", "win_rate" (ties count half), "ci_low", "ci_high",
    "interval", "confidence", "judge_type" ("score" or "pair")} and "mean_score_diff" (a Judge) or
    "mean_preference" (a PairJudge: the mean P(A better)); with return_scores, also "scores" and
    "baseline_scores" (a Judge) or "preferences" (a PairJudge), one per prompt.
    """
    pairwise = is_pair_judge(judge)
    if not pairwise and not callable(getattr(judge, "score", None)):
        raise TypeError("judge must have a score(prompts, responses) or a prefer(instructions, responses_a, "
                        f"responses_b) method, got {type(judge).__name__}")
    n = len(prompts)
    if n == 0:
        raise ValueError("prompts is empty")
    if len(responses) != n or len(baseline_responses) != n:
        raise ValueError(f"prompts, responses and baseline_responses must have the same length; got {n}, "
                         f"{len(responses)} and {len(baseline_responses)}")
    _check_scoring(tie_margin, interval)

    if pairwise:
        extra, diffs = _pair_judgements(judge, prompts, responses, baseline_responses, return_scores)
    else:
        extra, diffs = _score_judgements(judge, prompts, responses, baseline_responses, return_scores)
    # diffs: how far A is ahead (a score difference, or P(A better) - 0.5); a tie within tie_margin
    # The same response as the baseline's is a tie whatever the judge says: scored in other batches (other
    # padding), a reward model gave the two copies scores a rounding error apart, a win or a loss at margin 0.
    diffs = [0.0 if a == b else d for d, a, b in zip(diffs, responses, baseline_responses)]
    outcomes = [0.5 if abs(d) <= tie_margin else float(d > 0) for d in diffs]  # 1 win, 0.5 tie, 0 loss
    wins, ties = outcomes.count(1.0), outcomes.count(0.5)
    points = wins + 0.5 * ties
    if interval == "wilson":
        lo, hi = wilson_interval(points, n, confidence)
    else:
        lo, hi = bootstrap_interval(outcomes, confidence, bootstrap_samples, seed)
    return {"wins": wins, "ties": ties, "losses": n - wins - ties, "n": n, "win_rate": points / n,
            "ci_low": lo, "ci_high": hi, "interval": interval, "confidence": confidence,
            "judge_type": "pair" if pairwise else "score", **extra}


def _score_judgements(judge, prompts, responses, baseline_responses, return_scores):
    """(result entries, score differences) of a Judge."""
    n = len(prompts)
    scores = [float(s) for s in judge.score(list(prompts), list(responses))]
    base = [float(s) for s in judge.score(list(prompts), list(baseline_responses))]
    if len(scores) != n or len(base) != n:
        raise ValueError(f"the judge returned {len(scores)} and {len(base)} scores for {n} prompts")
    bad = next((i for i, (a, b) in enumerate(zip(scores, base)) if not (math.isfinite(a) and math.isfinite(b))), None)
    if bad is not None:  # a NaN compared as neither ahead nor tied: it counted as a loss, silently
        raise ValueError(f"the judge's scores must be finite numbers; prompt {bad} got {scores[bad]} (response) "
                         f"and {base[bad]} (baseline)")
    diffs = [a - b for a, b in zip(scores, base)]
    extra: dict[str, Any] = {"mean_score_diff": sum(diffs) / n}
    if return_scores:
        extra["scores"], extra["baseline_scores"] = scores, base
    return extra, diffs


def _pair_judgements(judge, prompts, responses, baseline_responses, return_scores):
    """(result entries, P(A better) - 0.5 of each pair) of a PairJudge."""
    n = len(prompts)
    prefs = [float(p) for p in judge.prefer(list(prompts), list(responses), list(baseline_responses))]
    if len(prefs) != n:
        raise ValueError(f"the judge returned {len(prefs)} preferences for {n} prompts")
    if not all(0.0 <= p <= 1.0 for p in prefs):
        raise ValueError("the judge's preferences must be probabilities in [0, 1]")
    extra: dict[str, Any] = {"mean_preference": sum(prefs) / n}
    if return_scores:
        extra["preferences"] = prefs
    return extra, [p - 0.5 for p in prefs]


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


def instruction_texts(instructions: Sequence[str | dict[str, Any]]) -> list[str]:
    """Each instruction (a string or a dict) as one text, its input after a blank line: what a pairwise
    judge reads."""
    texts = []
    for i, item in enumerate(instructions):
        example = _as_example(item, i)
        extra = example.get("input") or ""
        texts.append(f"{example['instruction']}\n\n{extra}" if extra else example["instruction"])
    return texts


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
                        top_k=top_k, top_p=top_p, seed=seed, first_row=b)  # each row its own stream, any batch_size
        responses += [r.strip() for r in batch]
    return responses


def load_instructions(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Instruction examples (a .json list or .jsonl of {"instruction", "input"?, ...}), the first `limit`."""
    from ..finetune.data import load_prompt_data

    _check_limit(limit)
    return load_prompt_data(path)[:limit]


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


def _check_scoring(tie_margin: object, interval: object) -> None:
    # a number checked first: a string failed the comparison with a TypeError that named no argument
    if isinstance(tie_margin, bool) or not isinstance(tie_margin, numbers.Real) or not tie_margin >= 0:
        raise ValueError(f"tie_margin must be a number >= 0, got {tie_margin!r}")
    if interval not in ("wilson", "bootstrap"):
        raise ValueError(f"interval must be 'wilson' or 'bootstrap', got {interval!r}")


def compare_runs(run_dir: str, baseline_dir: str, judge: Judge | PairJudge | str, data: str | Sequence[Any],
                 limit: int | None = None, max_new_tokens: int = 256, device: str | torch.device = "auto",
                 tie_margin: float = 0.0, interval: str = "wilson", batch_size: int = 8,
                 progress: bool = False, template: str | None = None, system_prompt: str | None = None,
                 judge_kind: str = "reward") -> dict[str, Any]:
    """Win rate of run_dir's model over baseline_dir's, each answering the instructions in `data`
    greedily, as judged by `judge`: a Judge or PairJudge, or the folder of a run, read as judge_kind
    "reward" (a reward model, the default) or "lm" (a language model asked which response is better).

    Each run is prompted in the template its fine-tuning saved (alpaca when none), or in `template` /
    `system_prompt` when given (llmkern.finetune.templates.resolve_prompt_format). The judge reads the
    prompts in its own template: a judge run's saved one, a judge object's `prompt_format` attribute,
    else Alpaca. The result names the templates used ("templates"), the judge run ("judge", None for a
    judge object) and the judge's kind ("judge_kind": "reward" or "lm" for a judge run, "score" or
    "pair" for a judge object)."""
    from ..finetune.templates import PromptFormat, resolve_prompt_format
    from ..train.inference import load_trained_model

    judge_is_run = isinstance(judge, (str, os.PathLike))
    if judge_is_run and judge_kind not in JUDGE_KINDS:  # before generating anything
        raise ValueError(f"judge_kind must be one of {', '.join(JUDGE_KINDS)}; got {judge_kind!r}")
    # The baseline and the judge are loaded only after the run (and the baseline) generated every response:
    # a mistyped folder lost all that work. Each is a run or checkpoint folder, which load_checkpoint needs.
    for what, path in (("run", run_dir), ("baseline", baseline_dir)) + ((("judge", judge),) if judge_is_run else ()):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"the {what} {os.fspath(path)!r} is not a folder: give a run or checkpoint folder")
    _check_limit(limit)  # a list of instructions is cut to the limit too (it was compared whole)
    _check_scoring(tie_margin, interval)  # win_rate checks them too, but only after both runs generated
    examples = load_instructions(os.fspath(data), limit) if isinstance(data, (str, os.PathLike)) else list(data)[:limit]
    answers, templates = [], []
    for run in (run_dir, baseline_dir):
        model, tokenizer, state = load_trained_model(run, device)
        fmt = resolve_prompt_format(state.meta, template, system_prompt)
        answers.append(generate_responses(model, tokenizer, examples, max_new_tokens, batch_size=batch_size,
                                          progress=progress, prompt_format=fmt))
        templates.append(fmt.template)
        # One run in memory at a time: the checkpoint too holds a host copy of the weights, which was kept alive
        # while the next run (and then the judge) loaded.
        del model, state
    judge_run = os.path.abspath(judge) if judge_is_run else None
    if judge_is_run:
        judge = load_judge(os.fspath(judge), judge_kind, device, batch_size)
    judge_format = getattr(judge, "prompt_format", None) or PromptFormat()
    # a pairwise judge puts the bare instructions in a judging prompt of its own
    prompts = (instruction_texts(examples) if is_pair_judge(judge) else instruction_prompts(examples, judge_format))
    result = win_rate(judge, prompts, answers[0], answers[1], tie_margin, interval)
    result.update(run=os.path.abspath(run_dir), baseline=os.path.abspath(baseline_dir),
                  judge=judge_run, judge_kind=judge_kind if judge_is_run else result["judge_type"],
                  templates={"run": templates[0], "baseline": templates[1], "judge": judge_format.template})
    if isinstance(judge, LMJudge):
        result["cut_prompts"] = judge.cut_prompts  # judging prompts (two a pair) whose responses were cut to fit
    return result
