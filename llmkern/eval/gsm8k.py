"""GSM8K, generated and scored as lm-evaluation-harness's `gsm8k` task (version 3) does it.

The task file is the Hugging Face export of openai/gsm8k's "main" config: JSON Lines (or a JSON list) of
{"question": ..., "answer": "...worked solution...\\n#### 72"}. Each question is asked as

    Question: {question}
    Answer:

after k solved examples ("Question: {question}\\nAnswer: {answer}" each, then a blank line), and the model
continues greedily for up to 256 tokens, stopping at end-of-text or at "Question:", "</s>" or "<|im_end|>"; the
response is the new text cut at the first of those. Two answers are read from it, as the harness's two filters:
- strict-match: the first "#### <number>" (the format the shots show); "[invalid]" when there is none;
- flexible-extract: the last number-like run in the response (digits, with ",", ".", "$" and a leading "-").
Each is compared with the solution's final number by exact match after the harness's normalization: commas,
dollar signs, everything up to the last "#### " and one trailing period removed, then lower-cased (applied
alike to the extracted answer and to the whole reference solution).

Shots: the harness draws them from the train split (its default sampler): one random.Random(1234), and for
each test question in file order k rows sampled from the train split (minus the question itself should it be
among them: harness.harness_shots). fewshot_data is that split's file, in its order; the draw repeats it, so the
prompts are the harness's own for a one-process run (with --limit N, of the first N questions). A harness run on
several processes draws each process's questions from its own stream, and so gets other shots. fewshot_data must
be the train split (gsm8k.yaml's fewshot_split): the harness downloads it, llmkern reads the file given, and
cannot tell another split from it.

Each exact_match comes with its standard error as the harness computes it (harness.mean_stderr).

One difference: a prompt longer than block_size - max_new_tokens loses its beginning, as in the harness, but
keeps its begin-of-sequence token where the tokenizer has one (the harness cuts that too).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from .harness import harness_shots, mean_stderr
from .multiple_choice import check_scoring_vocab, json_rows, read_task_text

# The harness's gsm8k.yaml, field by field.
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"  # doc_to_text
TARGET_DELIMITER = " "  # between a shot's question and its answer (doc_to_target: the whole solution)
FEWSHOT_DELIMITER = "\n\n"  # after each shot
STOP_TEXTS = ("Question:", "</s>", "<|im_end|>")  # generation_kwargs.until, in its order
MAX_NEW_TOKENS = 256  # the harness's max_gen_toks
FEWSHOT = 5  # num_fewshot
STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")  # then take the first match
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # group_select -1: the last match
IGNORED_PATTERNS = (",", r"\$", r"(?s).*#### ", r"\.$")  # regexes_to_ignore, applied in this order
INVALID = "[invalid]"  # the regex filter's fallback when nothing matches


# --- the rows ------------------------------------------------------------------------------------------

def load_gsm8k(path: str) -> list[dict[str, str]]:
    """The {"question", "answer"} rows of a GSM8K .jsonl file (or JSON list); other keys are dropped."""
    rows = [_gsm8k_row(row, where) for where, row in json_rows(read_task_text(path), path)]
    if not rows:
        raise ValueError(f"task file {path!r} holds no examples")
    return rows


def _gsm8k_row(row: object, where: str) -> dict[str, str]:
    fields = row if isinstance(row, dict) else {}
    if not all(isinstance(fields.get(name), str) for name in ("question", "answer")):  # a file's row: a bad value
        raise ValueError(f"{where}: expected a JSON object with string 'question' and 'answer' (a GSM8K row)")
    if not row["question"].strip():
        raise ValueError(f"{where}: 'question' is empty")
    # Without its final "#### <number>" the reference would be the whole solution, matched by no answer.
    if not normalize_answer(row["answer"]) or "#### " not in row["answer"]:
        raise ValueError(f"{where}: 'answer' must end with '#### <number>' (GSM8K's final answer), got "
                         f"{row['answer'][-60:]!r}")
    return {"question": row["question"], "answer": row["answer"]}


# --- the prompts ---------------------------------------------------------------------------------------

def gsm8k_prompt(question: str, shots: Sequence[dict[str, str]] = ()) -> str:
    """The harness's prompt: each shot's question and solution, then the question, to be answered."""
    solved = "".join(QUESTION_TEMPLATE.format(question=s["question"]) + TARGET_DELIMITER + s["answer"]
                     + FEWSHOT_DELIMITER for s in shots)
    return solved + QUESTION_TEMPLATE.format(question=question)


# --- the answers ---------------------------------------------------------------------------------------

def strict_match(response: str) -> str:
    """The number after the response's first "#### ", as written; INVALID when there is none."""
    found = STRICT_PATTERN.findall(response)
    return found[0].strip() if found else INVALID


def flexible_extract(response: str) -> str:
    """The response's last number-like run (its second group when the first is empty); INVALID when none."""
    found = FLEXIBLE_PATTERN.findall(response)
    if not found:
        return INVALID
    groups = [g for g in found[-1] if g]  # one of the two alternatives matched
    return groups[0].strip() if groups else INVALID


def normalize_answer(text: str) -> str:
    """The harness's exact_match normalization: each ignored pattern removed in turn, then lower case."""
    for pattern in IGNORED_PATTERNS:
        text = re.sub(pattern, "", text)
    return text.lower()


def is_exact_match(prediction: str, answer: str) -> bool:
    """Whether an extracted answer matches a reference solution (its final number) once both are normalized."""
    return normalize_answer(prediction) == normalize_answer(answer)


# --- generation ----------------------------------------------------------------------------------------

def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS,
                     batch_size: int = 8, progress: bool = False) -> tuple[list[str], int]:
    """(the greedy response to each prompt, cut at the first stop text, end-of-text left out; how many
    prompts were cut to fit). Prompts of similar length are batched together (left-padded by generate)."""
    from ..data.sequences import cut_left, encode_prompt, sequence_start
    from ..finetune.templates import cut_at_texts, cut_at_tokens, stop_at_texts
    from ..model import generate

    room = model.config.block_size - max_new_tokens  # the harness's max_length - max_gen_toks
    if room < len(sequence_start(tokenizer)) + 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"block_size={model.config.block_size}: give fewer")
    full = [encode_prompt(tokenizer, p) for p in prompts]
    ids = [cut_left(tokenizer, row, room) for row in full]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    stop = stop_at_texts(tokenizer, STOP_TEXTS)
    responses = [""] * len(ids)
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, unit="batch", desc="gsm8k", dynamic_ncols=True)
    for b in starts:
        chunk = order[b : b + batch_size]
        out = generate(model, [ids[i] for i in chunk], max_new_tokens, temperature=0.0,
                       eos_token=tokenizer.eot_token, stop=stop)
        for i, row in zip(chunk, out):
            new = cut_at_tokens(row[len(ids[i]):], [tokenizer.eot_token])
            responses[i] = cut_at_texts(tokenizer.decode(new), STOP_TEXTS)
    return responses, sum(len(c) < len(f) for c, f in zip(ids, full))


# --- the evaluation ------------------------------------------------------------------------------------

def evaluate_gsm8k(model, tokenizer, examples: Sequence[dict[str, str]] | str, fewshot: int = FEWSHOT,
                   fewshot_data: Sequence[dict[str, str]] | str | None = None, limit: int | None = None,
                   max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 8, return_predictions: bool = False,
                   progress: bool = False) -> dict[str, Any]:
    """exact_match of `model` on GSM8K (a path, or {"question", "answer"} rows) under the harness's two
    filters, with `fewshot` shots drawn from fewshot_data (the train split: a path or rows) as the harness
    draws them.

    Returns {"exact_match_strict", "exact_match_flexible", their "..._stderr" (the harness's standard error of
    a mean; None for one example, the harness's "N/A"), "examples", "fewshot", "cut_prompts"} and, with
    return_predictions, "predictions": one {"question", "response", "strict", "flexible", "strict_correct",
    "flexible_correct", "target"} per example (target: the reference's final number, normalized).
    """
    if isinstance(examples, (str, os.PathLike)):
        examples = load_gsm8k(os.fspath(examples))
    if isinstance(fewshot_data, (str, os.PathLike)):
        fewshot_data = _load_fewshot_data(os.fspath(fewshot_data))
    _check_options(fewshot, fewshot_data, limit, max_new_tokens, batch_size)
    examples = list(examples)[:limit]
    if not examples:
        raise ValueError("examples is empty")
    examples = [_gsm8k_row(row, f"examples[{i}]") for i, row in enumerate(examples)]
    pool = [_gsm8k_row(row, f"fewshot_data[{i}]") for i, row in enumerate(fewshot_data or [])]
    check_scoring_vocab(tokenizer, model)  # the prompts' ids are read by the model
    prompts = [gsm8k_prompt(ex["question"], shots) for ex, shots in zip(examples, harness_shots(examples, pool,
                                                                                                   fewshot))]
    responses, cut = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    predictions = [_prediction(ex, response) for ex, response in zip(examples, responses)]
    strict = [float(p["strict_correct"]) for p in predictions]
    flexible = [float(p["flexible_correct"]) for p in predictions]
    result: dict[str, Any] = {
        "exact_match_strict": sum(strict) / len(examples), "exact_match_strict_stderr": mean_stderr(strict),
        "exact_match_flexible": sum(flexible) / len(examples), "exact_match_flexible_stderr": mean_stderr(flexible),
        "examples": len(examples), "fewshot": fewshot, "cut_prompts": cut}
    if return_predictions:
        result["predictions"] = predictions
    return result


def _load_fewshot_data(path: str) -> list[dict[str, str]]:
    """The shots' file: GSM8K rows, each with its "#### <number>" solution; another task's file (its rows lack
    them) is an error naming the option."""
    try:
        return load_gsm8k(path)
    except ValueError as err:
        raise ValueError(f"fewshot_data (--fewshot-data) must be GSM8K's train split: {err}") from err


def _check_options(fewshot, fewshot_data, limit, max_new_tokens, batch_size) -> None:
    if isinstance(fewshot, bool) or not isinstance(fewshot, int) or fewshot < 0:
        raise ValueError(f"fewshot must be an int >= 0, got {fewshot!r}")
    if fewshot and fewshot_data is None:  # the harness's shots come from the train split, not the questions
        raise ValueError(f"fewshot={fewshot} needs fewshot_data: GSM8K's train split, where the harness draws "
                         f"its shots from (or fewshot=0)")
    if fewshot_data is not None and not fewshot:
        raise ValueError("fewshot_data has no effect with fewshot=0: give the number of shots too")
    if limit is not None and not _is_positive_int(limit):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not _is_positive_int(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _prediction(example: dict[str, str], response: str) -> dict[str, Any]:
    strict, flexible = strict_match(response), flexible_extract(response)
    return {"question": example["question"], "response": response, "strict": strict, "flexible": flexible,
            "strict_correct": is_exact_match(strict, example["answer"]),
            "flexible_correct": is_exact_match(flexible, example["answer"]),
            "target": normalize_answer(example["answer"])}
