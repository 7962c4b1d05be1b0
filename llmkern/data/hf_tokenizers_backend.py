"""A Hugging Face tokenizer.json as a llmkern tokenizer, through Hugging Face's `tokenizers` library.

get_tokenizer("path/to/tokenizer.json") comes here. It takes every model `tokenizers` reads: SentencePiece-style
BPE with byte fallback (Llama 2, TinyLlama, Mistral, Phi-3, Gemma), Unigram, WordPiece, byte-level BPE. `tokenizers` is
an optional dependency (pip install tokenizers, or llmkern's "hf" extra). A byte-level BPE tokenizer.json (GPT-2,
SmolLM, Llama 3, Qwen2) can instead be converted once by `llmkern tokenizer import` into a .tiktoken file: the
faster route, with no extra dependency.

As every llmkern tokenizer, encode takes text as ordinary text: special tokens spelled inside it ("</s>") are not
matched (`tokenizers`' encode_special_tokens), and encode adds no BOS or EOS of its own (add_special_tokens=False);
the file's truncation and padding are turned off. Non-special added tokens are still matched in the text, as
Hugging Face matches them. special_token(name) gives the id of a special added token by its name.

decode(encode(t)) == t where the tokenizer is lossless, which depends on the file:
- SentencePiece-style BPE with byte fallback and Llama 2's normalizer (Prepend "▁", Replace " " -> "▁"; the
  decoder's Strip takes the prepended "▁" off again): lossless, leading spaces included. The Strip works on the
  first token decoded only: decode([bos, *encode("hi")]) is "<s> hi", and the ids of a text decoded from its
  middle lose the leading space of their first token, as in Hugging Face.
- Gemma's (Replace " " -> "▁" alone: no "▁" prepended, none stripped): lossless, from any token on.
- A Metaspace pre-tokenizer with prepend_scheme "first" or "always" (Mistral's newer files, most Unigram ones): one
  leading space of the text is lost (" hello" decodes to "hello"), as the "▁" it gives and the one prepended are
  one and the same.
- Text outside the vocab without byte fallback becomes the unknown token; normalizers such as NFKC or lowercasing
  (T5, BERT) change the text: lossy.
Encoding is per text: where a normalizer or Metaspace puts "▁" in front of each text, encode(a) + encode(b) is not
encode(a + b) (a response encoded apart from its prompt gets a "▁" of its own). So a text that continues another (a
response, a multiple-choice continuation) is encoded with it, its tokens the ones after the prompt's:
llmkern.data.sequences.encode_continuation. Text that follows a special token in a template's text is encoded by
encode_after_special, which gives no "▁" in front of it where the file's Metaspace has prepend_scheme "first", as
Hugging Face encodes the whole text with its special tokens (llmkern.data.sequences.encode_text).

The end-of-text token (eot_token) is the tokenizer_config.json's "eos_token" beside the tokenizer.json, else the
first of END_OF_TEXT_NAMES among the special added tokens. The begin-of-sequence token (bos_token) is the
tokenizer_config.json's "bos_token" where it says "add_bos_token" (true: that token; false: none), else the one
the post-processor puts in front of the text (see hf_tokenizer.post_processor_bos), else None.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .hf_tokenizer import config_token_name, post_processor_bos, read_tokenizer_config
from .tokenizer import (
    _check_text,
    _check_texts,
    _check_token_name,
    _token_ids,
    hf_config_path,
)

# The names end-of-text tokens go by, tried in this order where tokenizer_config.json names none.
END_OF_TEXT_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>", "[SEP]")


class HFTokenizersTokenizer:
    """A `tokenizers.Tokenizer` behind llmkern's Tokenizer interface."""

    def __init__(self, backend, spec: str, eot_token: int, bos_token: int | None, after_special_backend=None) -> None:
        """after_special_backend: the same tokenizer.json with no Metaspace prepend_scheme "first" (see
        encode_after_special); None where the file has none, when it would encode as `backend` does."""
        self.backend = _as_plain_encoder(backend)
        self._after_special_backend = self.backend if after_special_backend is None else _as_plain_encoder(
            after_special_backend)
        self.spec = spec
        self.eot_token = eot_token
        self.bos_token = bos_token
        vocab_ids = set(backend.get_vocab(with_added_tokens=True).values())
        # the highest id + 1, not the count: a vocab may leave ids out
        self.n_vocab: int = max(vocab_ids) + 1
        # the ids in range that no token has: `tokenizers` drops them from a decode silently
        self._holes = _missing_ids(vocab_ids, self.n_vocab)
        # the added tokens marked special: the ones encode never matches in text, and special_token names
        special = {token_id: token for token_id, token in backend.get_added_tokens_decoder().items() if token.special}
        self._special_ids = {token.content: token_id for token_id, token in special.items()}
        self._strips = {token.content: (token.lstrip, token.rstrip) for token in special.values()}

    def encode(self, text: str) -> list[int]:
        _check_text(text)
        return self._encode_one(text)

    def encode_after_special(self, text: str) -> list[int]:
        """The ids of `text` where it follows a special token in a longer text (a template's turn after
        "<|im_start|>"), as Hugging Face encodes that longer text with its special tokens: a Metaspace
        pre-tokenizer with prepend_scheme "first" puts "▁" only at the very start of a text, never after a special
        token, so here `text` gets none. Everywhere else it is encode(text) (Llama 2's normalizer prepends "▁"
        to each run between special tokens, in Hugging Face too)."""
        _check_text(text)
        return self._encode_one(text, self._after_special_backend)

    def _encode_one(self, text: str, backend=None) -> list[int]:
        backend = self.backend if backend is None else backend
        try:
            return backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates, which Rust strings cannot hold: U+FFFD, as tiktoken gives
            return backend.encode(_without_surrogates(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """The texts' ids. With num_threads > 1 `tokenizers` encodes on its own thread pool (its size is the
        cores, or RAYON_NUM_THREADS; not num_threads)."""
        _check_texts(texts)
        texts = list(texts)
        for text in texts:
            _check_text(text)
        if num_threads <= 1 or len(texts) <= 1:
            return [self._encode_one(t) for t in texts]
        try:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        except TypeError:  # lone surrogates in some text
            return [self._encode_one(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        ids = _token_ids(ids)
        # `tokenizers` skips an id it does not know, silently
        if ids and (min(ids) < 0 or max(ids) >= self.n_vocab):
            bad = next(i for i in ids if not 0 <= i < self.n_vocab)
            raise ValueError(f"ids: expected token ids in [0, {self.n_vocab}), got {bad}")
        if self._holes and not self._holes.isdisjoint(ids):
            bad = next(i for i in ids if i in self._holes)
            raise ValueError(f"ids: {bad} is the id of no token of {self.spec!r}")
        return self.backend.decode(ids, skip_special_tokens=False)

    def has_token(self, token_id: int) -> bool:
        """Whether some token has token_id: a vocabulary may leave ids out."""
        return 0 <= token_id < self.n_vocab and token_id not in self._holes

    def special_token(self, name: str) -> int | None:
        """The id of the special added token called `name` exactly, else None (a non-special added token too)."""
        _check_token_name(name)
        return self._special_ids.get(name)

    def special_token_strips(self, name: str) -> tuple[bool, bool]:
        """(lstrip, rstrip) of the special token called `name`: whether Hugging Face, matching it in a text, takes
        the whitespace on its left or right into it (Phi-3's <|user|>, <|assistant|>, <|end|> take the line break
        after them). (False, False) for a name that is no special token here."""
        return self._strips.get(name, (False, False))

    def __repr__(self) -> str:
        return f"HFTokenizersTokenizer(spec={self.spec!r}, n_vocab={self.n_vocab})"


def _missing_ids(ids: set[int], n_vocab: int) -> frozenset[int]:
    """The ids in [0, n_vocab) not in `ids`; the count first, as most vocabs leave none out (a 256k range is ~30 ms)."""
    if len(ids) == n_vocab:
        return frozenset()
    return frozenset(range(n_vocab)).difference(ids)


def _as_plain_encoder(backend):
    """`backend` set to encode text as llmkern encodes it: special tokens spelled in it are text, and it is never cut
    or padded."""
    backend.encode_special_tokens = True  # "</s>" in the text is text (tokenizers >= 0.15.1)
    backend.no_truncation()  # a BERT file's max_length would cut documents silently
    backend.no_padding()
    return backend


def _without_surrogates(text: str) -> str:
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _import_tokenizers(path: str):
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            f"spec: {path!r} is a Hugging Face tokenizer.json, which llmkern reads with Hugging Face's `tokenizers` "
            f"library: pip install tokenizers (or llmkern's extra: pip install 'llmkern[hf]'). A byte-level BPE one "
            f"(GPT-2, SmolLM, Llama 3, Qwen2) can instead be converted, with no extra dependency: "
            f"`llmkern tokenizer import {path} --out PATH.tiktoken`") from err
    return tokenizers


def _special_added_tokens(data: dict) -> list[str]:
    return [t["content"] for t in data.get("added_tokens") or []
            if isinstance(t, dict) and t.get("special") and isinstance(t.get("content"), str)]


def _eot_name(data: dict, config: dict, path: str) -> str:
    config_path = hf_config_path(path)
    name = config_token_name(config, "eos_token", path, "spec")
    if name is not None:
        return name
    special = _special_added_tokens(data)
    found = next((n for n in END_OF_TEXT_NAMES if n in special), None)
    if found is None:
        raise ValueError(
            f"spec: {path!r} has no end-of-text token that llmkern can tell: {config_path!r} names no \"eos_token\", "
            f"and none of its special tokens {sorted(special)} is one of {list(END_OF_TEXT_NAMES)}. Write a "
            f"tokenizer_config.json beside it naming the token that ends documents: {{\"eos_token\": \"...\"}}")
    return found


def _bos_name(data: dict, config: dict, path: str) -> str | None:
    if "add_bos_token" in config:  # Llama 2's: it decides, as transformers' LlamaTokenizer(Fast) lets it
        if not config["add_bos_token"]:
            return None
        name = config_token_name(config, "bos_token", path, "spec")
        if name is None:
            raise ValueError(f"spec: {hf_config_path(path)!r} says add_bos_token but names no \"bos_token\"")
        return name
    return post_processor_bos(data.get("post_processor"), path)


def _token_id(backend, name: str, role: str, path: str) -> int:
    token_id = backend.token_to_id(name)
    if token_id is None:
        raise ValueError(f"spec: the {role} token {name!r} (from {hf_config_path(path)!r} or the post-processor of "
                         f"{path!r}) is no token of {path!r}")
    return token_id


def load_tokenizer_json(path: str) -> HFTokenizersTokenizer:
    """The tokenizer of the Hugging Face tokenizer.json at `path` (an absolute path: the spec)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ValueError(f"spec: {path!r} is not a JSON file ({err}); expected a Hugging Face tokenizer.json") from err
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"spec: {path!r} is not a Hugging Face tokenizer.json (no \"model\"); a .json spec names one")
    config = read_tokenizer_config(path, "spec")
    tokenizers = _import_tokenizers(path)
    try:
        backend = tokenizers.Tokenizer.from_str(text)
    except Exception as err:  # `tokenizers` raises a bare Exception for a file it cannot read
        raise ValueError(f"spec: `tokenizers` {tokenizers.__version__} cannot read {path!r} ({err})") from err
    eot_token = _token_id(backend, _eot_name(data, config, path), "end-of-text", path)
    bos_name = _bos_name(data, config, path)
    bos_token = None if bos_name is None else _token_id(backend, bos_name, "begin-of-sequence", path)
    return HFTokenizersTokenizer(backend, spec=path, eot_token=eot_token, bos_token=bos_token,
                                 after_special_backend=_after_special_backend(tokenizers, data))


def _after_special_backend(tokenizers, data: dict):
    """The tokenizer.json `data` as a `tokenizers.Tokenizer` that prepends no "▁" where the file's Metaspace
    prepends one to the first text only (prepend_scheme "first"); None where it has no such Metaspace."""
    pre_tokenizer = data.get("pre_tokenizer")
    never_prepending = _never_prepending(pre_tokenizer)
    if never_prepending == pre_tokenizer:
        return None
    return tokenizers.Tokenizer.from_str(json.dumps({**data, "pre_tokenizer": never_prepending}))


def _never_prepending(pre_tokenizer: object) -> object:
    """A pre-tokenizer's JSON with each Metaspace of prepend_scheme "first", a Sequence's members too, made "never"."""
    if not isinstance(pre_tokenizer, dict):
        return pre_tokenizer
    if pre_tokenizer.get("type") == "Metaspace" and pre_tokenizer.get("prepend_scheme") == "first":
        return {**pre_tokenizer, "prepend_scheme": "never"}
    if pre_tokenizer.get("type") == "Sequence" and isinstance(pre_tokenizer.get("pretokenizers"), list):
        return {**pre_tokenizer, "pretokenizers": [_never_prepending(p) for p in pre_tokenizer["pretokenizers"]]}
    return pre_tokenizer
