"""A tokenizer with a model whose vocabulary is smaller than the tokenizer's.

Gemma 3 1B's tokenizer.json has 262145 tokens, its model 262144 embeddings: the last id is the multimodal
"<image_soft_token>", a special token that text never encodes to. Such a pair works: every id that text encodes
to has an embedding. So a tokenizer may have more ids than the model has embeddings when every id past the model's
vocabulary is a special token (check_vocab_fits), and its end-of-text and begin-of-sequence tokens, which every
example holds, are not among them. A special token past the vocabulary that a prompt template asks for by name (a
Marker) is refused when it is asked for (ModelVocabTokenizer.special_token), with a ValueError naming it rather
than an IndexError or a device assert in the embedding.

Every place that pairs a tokenizer with a model (fine-tuning's base, a trained run, pretraining's data) checks it
here: tokenizer_for_model, or check_vocab_fits where no tokenizer is handed on.
"""

from __future__ import annotations

MAX_RANGES_SHOWN = 5  # a message lists the first few runs of ordinary ids, not 200k of them


def is_ordinary_id(tokenizer, token_id: int) -> bool:
    """Whether text may encode to token_id: a token of `tokenizer` that is no special token (special_token does
    not give it back for its text). An id that no token has (a hole in the ids, as cl100k_base's 100256) is none."""
    if isinstance(tokenizer, ModelVocabTokenizer):  # checked again (by eval, say): ask the tokenizer it wraps
        tokenizer = tokenizer.tokenizer
    if not _has_token(tokenizer, token_id):
        return False
    try:
        text = _token_name(tokenizer, token_id)
    except (KeyError, ValueError):  # a hole that the tokenizer could not be asked about directly
        return False
    return tokenizer.special_token(text) != token_id


def _token_name(tokenizer, token_id: int) -> str:
    """The text of token_id as special_token names it. A tokenizer.json's decoder runs over a special token's text
    too (ByteLevel reads "ü" as the byte it stands for, Metaspace makes "▁" a space), so `tokenizers` is asked for
    the token itself where it is there; tiktoken decodes a special token to its name."""
    backend = getattr(tokenizer, "backend", None)  # Hugging Face tokenizers'
    if backend is not None and hasattr(backend, "id_to_token"):
        return backend.id_to_token(token_id)
    return tokenizer.decode([token_id])


def _has_token(tokenizer, token_id: int) -> bool:
    """Whether some token of `tokenizer` has token_id, as the tokenizer says where it can (its has_token: tiktoken's
    and tokenizer.json's leave ids out): a token may decode to "" (SentencePiece's lone "▁" does), so decoding
    cannot tell a hole from a token."""
    has_token = getattr(tokenizer, "has_token", None)
    return True if has_token is None else has_token(token_id)


def ordinary_ids_past(tokenizer, vocab_size: int) -> list[int]:
    """The ids at or past vocab_size that text may encode to (is_ordinary_id)."""
    return [i for i in range(vocab_size, tokenizer.n_vocab) if is_ordinary_id(tokenizer, i)]


def describe_ids(ids: list[int]) -> str:
    """ids (ascending) as runs, "5, 7-9", the first MAX_RANGES_SHOWN of them."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:MAX_RANGES_SHOWN])
    return shown + (f", ... ({len(ids)} ids in all)" if len(runs) > MAX_RANGES_SHOWN else "")


def check_vocab_fits(tokenizer, vocab_size: int, tokenizer_name: str, model: str, hint: str = "") -> None:
    """A ValueError unless a model of vocab_size embeddings can read every token `tokenizer` gives: the ids past
    vocab_size must all be special tokens, and its end-of-text and begin-of-sequence tokens must lie before it.
    tokenizer_name and model (a phrase: "the model 'runs/x'") name them in the message; hint ends it."""
    if tokenizer.n_vocab > vocab_size:
        ordinary = ordinary_ids_past(tokenizer, vocab_size)
        if ordinary:
            raise ValueError(f"the tokenizer {tokenizer_name!r} has {tokenizer.n_vocab} tokens; {model} only "
                             f"{vocab_size}, and ids {describe_ids(ordinary)} past it are ordinary tokens, which "
                             f"text encodes to (only special tokens may lie past a model's vocabulary){hint}")
    for role, token_id in (("end-of-text", tokenizer.eot_token), ("begin-of-sequence", tokenizer.bos_token)):
        if token_id is not None and token_id >= vocab_size:
            raise ValueError(f"the {role} token {tokenizer.decode([token_id])!r} of the tokenizer {tokenizer_name!r} "
                             f"is id {token_id}, past the {vocab_size} tokens of {model}: the model has no embedding "
                             f"for it{hint}")


def tokenizer_for_model(tokenizer, vocab_size: int, tokenizer_name: str, model: str):
    """`tokenizer` checked against a model of vocab_size embeddings (check_vocab_fits); where it has more ids than
    that, wrapped in a ModelVocabTokenizer, so that a template marker past the model's vocabulary is refused."""
    check_vocab_fits(tokenizer, vocab_size, tokenizer_name, model)
    if tokenizer.n_vocab <= vocab_size:
        return tokenizer
    return ModelVocabTokenizer(tokenizer, vocab_size)


class ModelVocabTokenizer:
    """A tokenizer as a model of vocab_size embeddings uses it: the tokenizer's own in every way (its spec, n_vocab,
    encode, decode, ...), except that special_token refuses a special token past the model's vocabulary."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    def __getattr__(self, name: str):
        # called only for attributes not found here; "tokenizer" itself is not delegated, so that an instance
        # being unpickled or copied (no attributes yet) does not recurse
        if name == "tokenizer":
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def special_token(self, name: str) -> int | None:
        """The tokenizer's id of the special token `name` (None where it has none); a ValueError naming the token
        when the model has no embedding for that id."""
        token_id = self.tokenizer.special_token(name)
        if token_id is not None and token_id >= self.vocab_size:
            raise ValueError(f"the special token {name!r} is id {token_id} of the tokenizer {self.tokenizer.spec!r}, "
                             f"past the model's {self.vocab_size} tokens: the model has no embedding for it (a "
                             f"template's marker must be a token the model knows: use another template)")
        return token_id

    def __repr__(self) -> str:
        return f"ModelVocabTokenizer({self.tokenizer!r}, vocab_size={self.vocab_size})"
