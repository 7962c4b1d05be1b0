"""Fine-tuning examples: Alpaca-format instructions and preference pairs, their prompts, and
turning (prompt, response) pairs into padded token batches whose loss covers only the response.

An instruction example is {"instruction", "input" (may be empty or absent), "output"}; a preference
example has "chosen" and "rejected" responses instead of (or beside) "output".
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..data.sequences import encode_continuation
from .templates import ALPACA_HEADER, DEFAULT_TEMPLATE, PromptFormat

IGNORE = -1  # the label of a token that is not scored (GPT.forward skips targets equal to -1)

PROMPT_HEADER = ALPACA_HEADER  # the Alpaca template's first paragraph


def format_prompt(example: dict[str, Any], template: str = DEFAULT_TEMPLATE, system_prompt: str = "") -> str:
    """The prompt of an example in a template (llmkern.finetune.templates; Alpaca by default: header,
    instruction, the input when there is one, and the response header); the response text follows it
    directly."""
    return PromptFormat(template, system_prompt).prompt(example)


def read_examples(path: str) -> list[dict[str, Any]]:
    """The objects of a .json file holding a list, or of a .jsonl file (one object per line)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = []
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON: {e}") from e
                if not isinstance(rows[-1], dict):
                    raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(rows[-1]).__name__}")
            return rows
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of objects (or a .jsonl file)")
    return rows


def _check_keys(rows: list[dict[str, Any]], path: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    if not rows:
        raise ValueError(f"{path}: no examples")
    for i, row in enumerate(rows):
        for key in required:
            if not isinstance(row.get(key), str):
                raise ValueError(f"{path}: example {i} needs a string {key!r}; it has keys {sorted(row)}")
        if not isinstance(row.get("input", ""), str):
            raise ValueError(f"{path}: example {i}: 'input' must be a string, got {type(row['input']).__name__}")
    return rows


def load_instruction_data(path: str) -> list[dict[str, Any]]:
    """Alpaca examples: each has a string instruction and output (input optional)."""
    return _check_keys(read_examples(path), os.fspath(path), ("instruction", "output"))


# Where a prompt file's row has no "instruction", the key that holds it: GSM8K's and most QA sets' "question", TRL's
# prompt-only datasets' "prompt" (a string; a conversational list is not read)
PROMPT_KEYS = ("question", "prompt")


def load_prompt_data(path: str) -> list[dict[str, Any]]:
    """Instructions alone (input optional; any response is ignored): the prompts of PPO, GRPO and win rates. A row
    without "instruction" takes its "question" (GSM8K's rows, with their "answer", as GRPO's reward="answer" reads
    them) or its "prompt" as the instruction."""
    rows = [_with_instruction(row) for row in read_examples(path)]
    return _check_keys(rows, os.fspath(path), ("instruction",))


def _with_instruction(row: Any) -> Any:
    """The row, with "instruction" taken from the first of PROMPT_KEYS it has where it has none (or a null one, as
    a concatenation of exports with other columns writes it)."""
    if not isinstance(row, dict) or row.get("instruction") is not None:
        return row
    key = next((k for k in PROMPT_KEYS if isinstance(row.get(k), str)), None)
    return row if key is None else {**row, "instruction": row[key]}


def load_preference_data(path: str) -> list[dict[str, Any]]:
    """Preference examples: each has a string instruction, chosen and rejected (input optional)."""
    return _check_keys(read_examples(path), os.fspath(path), ("instruction", "chosen", "rejected"))


def split_examples(examples: Sequence[Any], val_fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """(train, val) after a seeded shuffle; val gets round(len * val_fraction) examples, at least one
    when val_fraction > 0 and there are two or more examples, and never all of them (a lone example trains)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(round(len(examples) * val_fraction), max(len(examples) - 1, 0))
    if val_fraction > 0 and len(examples) >= 2:
        n_val = max(n_val, 1)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val


def encode_prompt_response(tokenizer, prompt: str, response: str, max_len: int,
                           mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """(tokens, labels) of prompt + response + end-of-text, cut to max_len tokens. response is the text
    after the prompt, with the template's end marker when it has one (PromptFormat.response). The prompt
    starts with the tokenizer's begin-of-sequence token where it has one (llmkern.data.sequences). The
    template's markers become the tokenizer's special tokens where it has them (encode_text). The prompt's tokens
    are the prompt encoded alone, as the model reads it when it generates; the response's are the ones that follow
    them in the joint text (encode_continuation: no "▁" of its own from a SentencePiece tokenizer). End-of-text is
    not appended twice after an end marker that is the end-of-text token itself (<|im_end|> where a Qwen
    Instruct tokenizer ends documents with it).

    labels[i] is the label of tokens[i] itself: IGNORE on the prompt (when mask_prompt) so that only
    the response and its end-of-text are learned. make_lm_batch shifts them into next-token targets.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    prompt_ids, response_ids = encode_continuation(tokenizer, prompt, response)
    if response_ids[-1:] != [tokenizer.eot_token]:
        response_ids.append(tokenizer.eot_token)
    tokens = (prompt_ids + response_ids)[:max_len]
    labels = ([IGNORE] * len(prompt_ids) if mask_prompt else list(prompt_ids)) + response_ids
    return tokens, labels[:max_len]


def warn_dropped(data: str, dropped: int, total: int, why: str) -> None:
    """A warning, at the caller of the recipe that calls this, that `dropped` of the `total` examples of `data`
    will not be trained on, and why: the run's summary counts them too, but its end is late to learn it."""
    if dropped:
        warnings.warn(f"{data}: {dropped} of {total} examples dropped: {why}", stacklevel=3)


def pad_batch(rows: Sequence[Sequence[int]], pad_value: int, length: int | None = None) -> torch.Tensor:
    """(B, T) int64 tensor of the rows, right-padded with pad_value to `length` (default: the longest)."""
    if not rows:
        raise ValueError("rows must not be empty")
    longest = max(len(r) for r in rows)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest row ({longest})")
    out = torch.full((len(rows), length), pad_value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def make_lm_batch(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """A next-token batch of (tokens, labels) pairs: {"idx": (B, T-1) inputs, "targets": (B, T-1),
    "token_mask": (B, T-1) bool}, where targets[t] is the label of token t+1 (IGNORE on the prompt and on the
    padding) and token_mask is True where idx holds a real token, not padding (for a mixture-of-experts model's
    load-balancing loss, which the targets cannot tell: the prompt's are IGNORE too)."""
    tokens = pad_batch([t for t, _ in examples], pad_id)
    labels = pad_batch([lab for _, lab in examples], IGNORE, tokens.size(1))
    if tokens.size(1) < 2:
        raise ValueError("every batch needs a row of at least 2 tokens")
    lengths = torch.tensor([len(t) for t, _ in examples])
    token_mask = torch.arange(tokens.size(1) - 1) < lengths.unsqueeze(-1)
    return {"idx": tokens[:, :-1], "targets": labels[:, 1:], "token_mask": token_mask}


def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int
                  ) -> list[tuple[list[int], list[int], list[int]]]:
    """(tokens, labels, doc_ids) rows of up to max_len tokens, each holding consecutive examples whole.

    Packing fills the rows that padding would leave empty; with doc_ids the model attends only within
    each example and restarts positions at its first token, so a packed example is computed as if it
    were alone. The first token of each example gets the label IGNORE: it has no token of its own
    example before it to be predicted from.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []
    tokens: list[int] = []
    labels: list[int] = []
    docs: list[int] = []
    for example_tokens, example_labels in examples:
        if len(example_tokens) > max_len:
            raise ValueError(f"an example has {len(example_tokens)} tokens, more than max_len={max_len}")
        if tokens and len(tokens) + len(example_tokens) > max_len:
            rows.append((tokens, labels, docs))
            tokens, labels, docs = [], [], []
        doc = docs[-1] + 1 if docs else 0
        tokens += example_tokens
        labels += [IGNORE, *example_labels[1:]]
        docs += [doc] * len(example_tokens)
    if tokens:
        rows.append((tokens, labels, docs))
    return rows


def make_packed_batch(rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                      pad_id: int) -> dict[str, torch.Tensor]:
    """make_lm_batch of packed rows, plus "doc_ids" (B, T-1); the padding is a document of its own (and False in
    token_mask)."""
    batch = make_lm_batch([(t, lab) for t, lab, _ in rows], pad_id)
    length = batch["idx"].size(1)
    doc_ids = torch.stack([
        torch.tensor([*docs, *[docs[-1] + 1] * (length + 1 - len(docs))][:length], dtype=torch.long)
        for _, _, docs in rows])
    return {**batch, "doc_ids": doc_ids}
