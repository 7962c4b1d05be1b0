"""Token sequences of their own (a prompt, a fine-tuning example, an evaluation context): they start with
the tokenizer's begin-of-sequence token where it has one (Llama 3's <|begin_of_text|>), as the model was
trained, and as Hugging Face's tokenizer does with add_special_tokens=True. A tokenizer without one
(GPT-2's, "bytes", ones trained by llmkern: bos_token None) gives the text's tokens alone.

A text is encoded by encode_text: a plain str as ordinary text (tokenizer.encode), a TemplateText (what a prompt
template builds: llmkern.finetune.templates) piece by piece, each Marker piece as the tokenizer's special token of
that name where it has one, the text after each special token encoded as Hugging Face encodes it there.

A text that continues another in one sequence (a response after its prompt, a choice after its context) is
encoded by encode_continuation: its tokens are the ones that follow the prompt's in the joint text's tokens.
A text scored after a context (a choice, LAMBADA's last word) is encoded by encode_scored_pair, as
lm-evaluation-harness encodes it: the context's trailing whitespace moved into the scored text first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Marker:
    """A template's marker ("<|im_start|>"): the tokenizer's special token of that exact name where it has one,
    else ordinary text."""

    text: str


class TemplateText(str):
    """A str built from pieces, each a str (ordinary text: the template's words, the user's instruction) or a
    Marker; its value is the pieces' texts joined, for display and for code that reads text. encode_text encodes
    it piece by piece, so that only the template's markers, never text that merely spells one, become special
    tokens. A string made from it (by +, strip, an f-string) is a plain str again: all ordinary text."""

    pieces: tuple[str | Marker, ...]

    def __new__(cls, pieces: Iterable[str | Marker]):
        pieces = tuple(pieces)
        for piece in pieces:
            if not isinstance(piece, (str, Marker)):
                raise TypeError(f"pieces: expected str or Marker pieces, got {type(piece).__name__}")
        text = super().__new__(cls, "".join(_piece_text(p) for p in pieces))
        text.pieces = pieces
        return text

    def __getnewargs__(self) -> tuple[tuple[str | Marker, ...]]:  # copy and pickle rebuild it from its pieces
        return (self.pieces,)


def _piece_text(piece: str | Marker) -> str:
    return piece.text if isinstance(piece, Marker) else str(piece)


def join_texts(*texts: str) -> str:
    """The texts one after another. Where one is a TemplateText the join is a TemplateText of all their pieces (a
    plain str is one ordinary piece), so that encode_text makes the same markers special tokens in the join as in
    its parts: `+` would give a plain str, all ordinary text. Plain strs alone join to a plain str."""
    if not any(isinstance(text, TemplateText) for text in texts):
        return "".join(texts)
    return TemplateText(piece for text in texts for piece in _pieces(text))


def _pieces(text: str) -> tuple[str | Marker, ...]:
    return text.pieces if isinstance(text, TemplateText) else (str(text),)


def encode_text(tokenizer, text: str) -> list[int]:
    """The tokens of `text`: a plain str's are tokenizer.encode(text); a TemplateText's are its Marker pieces as
    the tokenizer's special tokens of those names (tokenizer.special_token) and the text between them encoded as
    ordinary text, as Hugging Face encodes the whole text with its special tokens. A marker the tokenizer has no
    special token for is ordinary text joined to its neighbours, so such a tokenizer (GPT-2's, "bytes", one trained
    by llmkern) gives exactly tokenizer.encode(str(text)).

    The text after a special token is encoded by the tokenizer's encode_after_special where it has one (a
    tokenizer.json whose Metaspace puts "▁" at the very start of a text only: none there), else by its encode.
    Where a special token takes the whitespace beside it (tokenizer.special_token_strips: Hugging Face's lstrip
    and rstrip of an added token, as Phi-3's <|user|> and <|end|> take the line break after them), that whitespace
    is left out here too."""
    if not isinstance(text, TemplateText):
        return tokenizer.encode(text)
    ids: list[int] = []
    ordinary = ""  # text since the last special token, encoded as one: BPE merges across a piece's edges
    after_special = False  # whether `ordinary` follows a special token, not the start of the text
    strip_left = False  # whether that special token takes the whitespace after it
    for piece in text.pieces:
        special = tokenizer.special_token(piece.text) if isinstance(piece, Marker) else None
        if special is None:
            ordinary += _piece_text(piece)
        else:
            lstrip, rstrip = _strips(tokenizer, piece.text)
            ordinary = _trimmed(ordinary, strip_left, lstrip)
            ids += _encode_ordinary(tokenizer, ordinary, after_special) + [special]
            ordinary, after_special, strip_left = "", True, rstrip
    return ids + _encode_ordinary(tokenizer, _trimmed(ordinary, strip_left, False), after_special)


def _strips(tokenizer, name: str) -> tuple[bool, bool]:
    """(lstrip, rstrip) of a special token: whether it takes the whitespace on its left, on its right."""
    strips = getattr(tokenizer, "special_token_strips", None)
    return (False, False) if strips is None else strips(name)


# Unicode's White_Space characters, which Hugging Face's tokenizers (Rust's char::is_whitespace) strip beside a
# special token; Python's str.strip() would take U+001C..U+001F too
WHITE_SPACE = "\t\n\v\f\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"


def _trimmed(text: str, left: bool, right: bool) -> str:
    text = text.lstrip(WHITE_SPACE) if left else text
    return text.rstrip(WHITE_SPACE) if right else text


def _encode_ordinary(tokenizer, text: str, after_special: bool) -> list[int]:
    # "" between two markers is no tokens (a tokenizer.json whose normalizer prepends "▁" could give one)
    if not text:
        return []
    encode = getattr(tokenizer, "encode_after_special", tokenizer.encode) if after_special else tokenizer.encode
    return encode(text)


def sequence_start(tokenizer) -> list[int]:
    """The tokens every sequence of its own starts with: [tokenizer.bos_token], or [] without one."""
    bos = tokenizer.bos_token
    return [] if bos is None else [bos]


def encode_sequence(tokenizer, text: str) -> list[int]:
    """The tokens of `text` as a sequence of its own: sequence_start, then the text's tokens (encode_text)."""
    return sequence_start(tokenizer) + encode_text(tokenizer, text)


def encode_continuation(tokenizer, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids) of `continuation` following `prompt` in one sequence, as TRL splits them (a
    scored text follows lm-evaluation-harness's rule instead: encode_scored_pair). The prompt's ids are
    encode_sequence(prompt): what the model reads at inference before it generates or scores. The continuation's
    ids are the ones after them in encode_sequence of the joined text (join_texts), not the continuation encoded
    apart: a SentencePiece-style tokenizer.json (Llama 2, Mistral) puts "▁" in front of every text it encodes, so
    apart, a response "Paris" would be learned as "▁Paris" and a choice " Paris" scored as "▁", "▁Paris", a token
    that the joint text never has.

    Where the joint ids do not start with the prompt's (the tokenizer merged across the boundary: GPT-2's
    "Answer: " + "Paris" gives "Answer", ":", " Paris"), the continuation is encoded apart (encode_text), so that
    the prompt's ids are still the ones inference gives."""
    prompt_ids = encode_sequence(tokenizer, prompt)
    joint_ids = encode_sequence(tokenizer, join_texts(prompt, continuation))
    if joint_ids[:len(prompt_ids)] == prompt_ids:
        return prompt_ids, joint_ids[len(prompt_ids):]
    return prompt_ids, encode_text(tokenizer, continuation)


def encode_scored_pair(tokenizer, context: str, scored: str) -> tuple[list[int], list[int]]:
    """(context ids, scored ids) of the plain text `scored` read after `context`, as lm-evaluation-harness's
    _encode_pair splits them for a causal model: the context's trailing whitespace moves to the front of the
    scored text (so "Answer: " + "Paris" is scored as " Paris", the one token the joint text has), the context and
    the joint text are each encoded as a sequence of their own (encode_sequence), and the scored ids are the joint
    ids past as many as the context has. Where a merge across the boundary makes the context's ids no prefix of
    the joint ones (GPT-2's "is 1" + "234": " 12", "34" joint), those are still the ids scored, as the harness
    scores them: the context's ids, then the joint's tail ("34"), which may be empty.

    The context's ids are never empty: a context with no tokens is encode_prompt's, the BOS, or <|endoftext|>
    without one, as the harness conditions an empty context on its prefix token (then the scored text alone); on
    a context of only whitespace, which the harness fails on (no context ids), the same. A tokenizer with a BOS
    starts both sequences with it, as the harness does with add_bos_token=True (its default for Gemma only,
    otherwise none)."""
    kept = context.rstrip()  # str.rstrip's whitespace, the harness's
    scored = context[len(kept):] + scored
    context_ids = encode_sequence(tokenizer, kept)
    scored_ids = encode_sequence(tokenizer, kept + scored)[len(context_ids):]
    return context_ids or encode_prompt(tokenizer, kept), scored_ids


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
