"""Token sequences of their own (a prompt, a fine-tuning example, an evaluation context): they start with
the tokenizer's begin-of-sequence token where it has one (Llama 3's <|begin_of_text|>), as the model was
trained, and as Hugging Face's tokenizer does with add_special_tokens=True. A tokenizer without one
(GPT-2's, "bytes", ones trained by llmkern: bos_token None) gives the text's tokens alone.
"""

from __future__ import annotations

from collections.abc import Sequence


def sequence_start(tokenizer) -> list[int]:
    """The tokens every sequence of its own starts with: [tokenizer.bos_token], or [] without one."""
    bos = tokenizer.bos_token
    return [] if bos is None else [bos]


def encode_sequence(tokenizer, text: str) -> list[int]:
    """The tokens of `text` as a sequence of its own: sequence_start, then the text's tokens."""
    return sequence_start(tokenizer) + tokenizer.encode(text)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """encode_sequence of a text the model reads before generating or scoring, never empty: an empty text
    without a begin-of-sequence token is <|endoftext|> (what every pretraining document follows)."""
    return encode_sequence(tokenizer, text) or [tokenizer.eot_token]


def cut_left(tokenizer, ids: Sequence[int], max_len: int) -> list[int]:
    """The sequence `ids` (one that starts with sequence_start) cut to its last max_len tokens, its start
    kept in front and counted in max_len: a long prompt loses the beginning of its text, never its BOS."""
    return keep_last(ids, max_len, keep_first=len(sequence_start(tokenizer)))


def keep_last(ids: Sequence[int], max_len: int, keep_first: int = 0) -> list[int]:
    """The first keep_first tokens of ids, then as many of its last tokens as make max_len in all (all of
    ids when they fit)."""
    if max_len < max(keep_first, 1):
        raise ValueError(f"max_len must be at least {max(keep_first, 1)}, got {max_len}")
    if len(ids) <= max_len:
        return list(ids)
    return list(ids[:keep_first]) + list(ids[len(ids) - (max_len - keep_first):])
