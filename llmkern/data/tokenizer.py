"""Tokenizers named by one string (a "spec") that manifests and checkpoints record.

Specs:
- "bytes": byte-level, ids 0..255 are the UTF-8 bytes, 256 is <|endoftext|> (n_vocab 257).
- a tiktoken encoding name ("gpt2", "cl100k_base", ...), when tiktoken has its file (cached
  or downloadable); otherwise TokenizerUnavailableError (an OSError) saying to pass a path.
- a path to a .tiktoken file (base64 token + rank per line). It is split with GPT-2's pattern and
  <|endoftext|> = the id after the highest rank (len(ranks): GPT-2's 50256), unless a sidecar "<file>.json" written by
  llmkern.data.bpe.train_bpe gives the pattern and special tokens it was trained with (one written by
  llmkern.data.hf_tokenizer also names the special token that ends documents, "eot_token", and the one
  that begins every sequence, "bos_token", where the model was trained with one: Llama 3's).
- a path to a Hugging Face tokenizer.json (a path ending in ".json", other than a "<file>.tiktoken.json"
  sidecar), read by Hugging Face's `tokenizers` library (an optional dependency: pip install tokenizers, or
  the "hf" extra) through llmkern.data.hf_tokenizers_backend, with the tokenizer_config.json beside it: any
  model `tokenizers` reads (SentencePiece-style BPE with byte fallback: Llama 2, TinyLlama, Mistral, Phi-3;
  Unigram; WordPiece; byte-level BPE too). A byte-level BPE one (GPT-2, SmolLM, Llama 3, Qwen2) can instead be
  converted once by `llmkern tokenizer import` into a .tiktoken file: faster, and no extra dependency.

`bos_token` is None for a tokenizer without one (GPT-2's, "bytes", ones trained by llmkern). Where it is set,
code that starts a sequence of its own (a prompt, a fine-tuning example, an evaluation context) puts it first,
as Hugging Face's tokenizer does with add_special_tokens=True.

Every tokenizer encodes text as ordinary text: "<|endoftext|>" inside a document is spelled
out in ordinary tokens, never turned into the special token, so decode(encode(t)) == t (for a tokenizer.json,
where its normalizer and decoder are lossless: see llmkern.data.hf_tokenizers_backend). A special token's id is
asked for by its name instead: special_token("<|im_end|>") (None where the tokenizer has no such special token);
that is how a prompt template puts its markers in (llmkern.finetune.templates).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import numbers
import os
from typing import Protocol, Sequence

ENDOFTEXT = "<|endoftext|>"

# GPT-2's pre-tokenization pattern (tiktoken's r50k_base / gpt2).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def sidecar_path(tiktoken_file: str) -> str:
    """Where train_bpe records the split pattern and special tokens of a .tiktoken file."""
    return tiktoken_file + ".json"


def is_hf_tokenizer_json(spec: str) -> bool:
    """Whether a spec names a Hugging Face tokenizer.json: a path ending in ".json" that is no .tiktoken
    file's sidecar (decided by the name alone: a long file is not read to route its spec)."""
    return spec.endswith(".json") and not spec.endswith(".tiktoken.json")


def hf_config_path(tokenizer_json: str) -> str:
    """The tokenizer_config.json beside a tokenizer.json: it names the end-of-text and begin-of-sequence tokens."""
    return os.path.join(os.path.dirname(tokenizer_json), "tokenizer_config.json")


def deciding_files(path: str) -> tuple[str, str]:
    """The file a spec names and the one beside it that decides its tokens too: a .tiktoken file's sidecar,
    a tokenizer.json's tokenizer_config.json."""
    return (path, hf_config_path(path)) if is_hf_tokenizer_json(path) else (path, sidecar_path(path))


def tokenizer_file_sha256(path: str) -> str | None:
    """sha256 of a tokenizer file with the file beside it that decides its tokens too (a .tiktoken file's
    sidecar, a tokenizer.json's tokenizer_config.json); None when the file is absent."""
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    for part in deciding_files(path):
        if os.path.isfile(part):
            with open(part, "rb") as f:
                # an empty file counts as a lone NUL, which no text file holds: an empty sidecar differs from
                # none, while an absent or non-empty one hashes as it always did (runs recorded those hashes)
                digest.update(f.read() or b"\0")
        digest.update(b"\0")  # the file's end
    return digest.hexdigest()


def same_tokenizer(spec_a: str, spec_b: str, sha256_b: str | None = None) -> bool:
    """Whether two specs name one tokenizer: the same spec, or tokenizer files with the same contents
    (copies of one file in two run folders, say). sha256_b: spec_b's hash recorded when it was used (a
    shard manifest's "tokenizer_sha256"), which counts when its file has moved or gone since."""
    if spec_a == spec_b:
        return True
    if not (is_file_spec(spec_a) and is_file_spec(spec_b)):
        return False
    hash_a = tokenizer_file_sha256(spec_a)
    return hash_a is not None and hash_a in (tokenizer_file_sha256(spec_b), sha256_b)


def _token_ids(ids) -> list[int]:
    """`ids` as a list of Python ints; TypeError naming the argument for anything else.

    bool is an int subclass and bytearray.append / tiktoken take a float tensor's or a bool's value,
    so without this decode([1.7, True]) or a float array could give text instead of an error."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"ids: expected a sequence of int token ids, got {type(ids).__name__}")
    if hasattr(ids, "tolist"):  # a torch tensor or numpy array: its elements as Python ints, floats or bools
        ids = ids.tolist()
    try:
        ids = list(ids)
    except TypeError:
        raise TypeError(f"ids: expected a sequence of int token ids, got {type(ids).__name__}") from None
    # the distinct types, not a Python loop over the ids, keep a long decode fast
    types = set(map(type, ids))
    bad = next((t for t in types if not issubclass(t, numbers.Integral) or issubclass(t, bool)), None)
    if bad is not None:
        example = next(i for i in ids if type(i) is bad)
        raise TypeError(f"ids: expected int token ids, got {example!r} of type {bad.__name__}")
    if types - {int}:  # numpy integers
        ids = list(map(int, ids))
    return ids


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")


def _check_texts(texts) -> None:
    # a str is a sequence of str too: encode_batch("hello") gave one token list per character
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of str, got one str (encode() takes a single text)")


class Tokenizer(Protocol):
    """What every llmkern tokenizer has. A tokenizer.json's (hf_tokenizers_backend) has two methods more, which
    llmkern.data.sequences.encode_text uses where they are there: encode_after_special(text) and
    special_token_strips(name), for the text beside a template's special tokens."""

    spec: str
    eot_token: int
    bos_token: int | None
    n_vocab: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def special_token(self, name: str) -> int | None: ...


def _check_token_name(name) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")


class ByteTokenizer:
    """Byte-level: a token per UTF-8 byte, plus <|endoftext|> = 256."""

    spec = "bytes"
    eot_token = 256
    bos_token = None
    n_vocab = 257

    def encode(self, text: str) -> list[int]:
        _check_text(text)
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError:
            # Lone surrogates become U+FFFD, as tiktoken does.
            return list(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8"))

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        # Encoding bytes is a C-level copy: threads would not help.
        _check_texts(texts)
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in _token_ids(ids):
            if i == self.eot_token:
                out += ENDOFTEXT.encode("utf-8")
            elif 0 <= i < 256:
                out.append(i)
            else:
                raise ValueError(f"ids: expected token ids in [0, {self.n_vocab}), got {i}")
        return out.decode("utf-8", errors="replace")

    def special_token(self, name: str) -> int | None:
        """The id of the special token called `name` (only <|endoftext|>), else None."""
        _check_token_name(name)
        return self.eot_token if name == ENDOFTEXT else None

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class TiktokenTokenizer:
    """A tiktoken.Encoding behind the Tokenizer interface."""

    def __init__(self, encoding, spec: str, eot_token: int | None = None, bos_token: int | None = None) -> None:
        self.encoding = encoding
        self.spec = spec
        self.n_vocab: int = encoding.n_vocab
        self.bos_token: int | None = bos_token
        if eot_token is not None:  # a sidecar names another end-of-text token (an imported Llama 3's, say)
            self.eot_token: int = eot_token
            return
        try:
            self.eot_token = encoding.eot_token
        except (KeyError, AttributeError) as err:
            raise ValueError(f"tokenizer {spec!r} has no {ENDOFTEXT} special token") from err

    def encode(self, text: str) -> list[int]:
        _check_text(text)
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        _check_texts(texts)
        if num_threads <= 1:  # tiktoken would still start a thread pool
            return [self.encoding.encode_ordinary(t) for t in texts]
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        ids = _token_ids(ids)
        # tiktoken's KeyError or OverflowError for such an id names no argument; min and max, not a
        # Python loop, keep a long decode fast
        if ids and (min(ids) < 0 or max(ids) >= self.n_vocab):
            bad = next(i for i in ids if not 0 <= i < self.n_vocab)
            raise ValueError(f"ids: expected token ids in [0, {self.n_vocab}), got {bad}")
        try:
            return self.encoding.decode(ids)
        except KeyError:  # an id in range that no token has (cl100k_base's 100256)
            bad = next(i for i in ids if not self.has_token(i))
            raise ValueError(f"ids: {bad} is the id of no token of {self.spec!r}") from None

    def has_token(self, token_id: int) -> bool:
        """Whether some token has token_id (cl100k_base leaves 100256 out)."""
        try:
            self.encoding.decode_single_token_bytes(token_id)
        except KeyError:
            return False
        return True

    def special_token(self, name: str) -> int | None:
        """The id of the special token called `name` exactly (a .tiktoken file's come from its sidecar), else None."""
        _check_token_name(name)
        if name not in self.encoding.special_tokens_set:
            return None
        return self.encoding.encode_single_token(name)

    def __repr__(self) -> str:
        return f"TiktokenTokenizer(spec={self.spec!r}, n_vocab={self.n_vocab})"


def _read_ranks(path: str) -> tuple[dict[bytes, int], bytes]:
    """The ranks of a .tiktoken file (a base64 token and its rank a line), and the file's bytes.

    Read here, not by tiktoken's load_tiktoken_bpe: that keeps a copy of every file it reads in a cache
    in the temp folder, keyed by the path alone, so a tokenizer retrained in place would load its old
    ranks, in every later process too."""
    with open(path, "rb") as f:
        data = f.read()
    ranks = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as err:
            raise ValueError(f"spec: {path!r} is not a readable .tiktoken file (line {number}: {err})") from err
    return ranks, data


def _load_tiktoken_file(path: str) -> TiktokenTokenizer:
    import tiktoken

    ranks, data = _read_ranks(path)
    if not ranks:
        raise ValueError(f"spec: {path!r} is an empty .tiktoken file")
    pattern = GPT2_PATTERN
    # the id after the highest rank: len(ranks) where the ranks leave no id out (GPT-2's 50256), which with a hole
    # would be an ordinary token's
    special = {ENDOFTEXT: max(ranks.values()) + 1}
    eot_name = ENDOFTEXT
    bos_name = None
    side = sidecar_path(path)
    if os.path.exists(side):
        try:
            with open(side, encoding="utf-8") as f:
                meta = json.load(f)
            pattern = str(meta["pattern"])
            special = {str(k): int(v) for k, v in meta["special_tokens"].items()}
            recorded = meta.get("tiktoken_sha256")
            # the token that ends documents, when not <|endoftext|> (an imported tokenizer.json's)
            eot_name = str(meta.get("eot_token", ENDOFTEXT))
            bos_name = meta.get("bos_token")  # the token that begins every sequence, where there is one
            bos_name = None if bos_name is None else str(bos_name)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            why = f"{type(err).__name__}: {err}"
            raise ValueError(f"spec: the sidecar {side!r} of {path!r} is corrupt ({why})") from err
        # train_bpe renames the two files one after the other: a run stopped between the renames
        # leaves a sidecar of another training beside these ranks (its special ids then mean other tokens).
        if recorded is not None:
            if hashlib.sha256(data).hexdigest() != recorded:
                raise ValueError(
                    f"spec: the sidecar {side!r} was written for another {os.path.basename(path)} than the one "
                    f"at {path!r} (a training stopped between writing the two?); train the tokenizer again")
        ordinary = set(ranks.values())
        for token, token_id in special.items():
            if token_id in ordinary:
                raise ValueError(
                    f"spec: the sidecar {side!r} gives the special token {token!r} the id {token_id}, which is "
                    f"an ordinary token's in {path!r} ({len(ranks)} ranks): the two files do not belong together")
        if eot_name != ENDOFTEXT and eot_name not in special:
            raise ValueError(f"spec: the sidecar {side!r} names the end-of-text token {eot_name!r}, which is not "
                             f"one of its special tokens {sorted(special)}")
        if bos_name is not None and bos_name not in special:
            raise ValueError(f"spec: the sidecar {side!r} names the begin-of-sequence token {bos_name!r}, which is "
                             f"not one of its special tokens {sorted(special)}")
    encoding = tiktoken.Encoding(
        name=os.path.basename(path), pat_str=pattern, mergeable_ranks=ranks, special_tokens=special
    )
    return TiktokenTokenizer(encoding, spec=path, eot_token=special[eot_name] if eot_name != ENDOFTEXT else None,
                             bos_token=None if bos_name is None else special[bos_name])


class TokenizerUnavailableError(OSError, RuntimeError):
    """A tiktoken encoding name whose file is neither cached nor downloadable (no network).

    An OSError, so that the command line reports it in one line like a missing file; also a
    RuntimeError, which it was before."""


def _load_named_encoding(name: str) -> TiktokenTokenizer:
    import tiktoken

    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as err:  # no network, no cache: requests/OS errors of every kind
        why = f"{type(err).__name__}: {err}"
        if len(why) > 300:
            why = why[:300] + "..."
        # from None: the chained requests/urllib3 tracebacks say nothing more than `why`.
        raise TokenizerUnavailableError(
            f"spec: tiktoken encoding {name!r} is not available offline: its file is neither cached "
            f"(TIKTOKEN_CACHE_DIR) nor downloadable ({why}). Pass the path of a local .tiktoken file "
            f"instead: --tokenize.tokenizer=PATH.tiktoken for `llmkern data prepare`, "
            f"--tokenizer=PATH.tiktoken for `llmkern train` (or train one with "
            f"`llmkern tokenizer train CORPUS --vocab-size N --out PATH.tiktoken`)."
        ) from None
    return TiktokenTokenizer(encoding, spec=name)


def is_file_spec(spec: str) -> bool:
    """Whether a spec names a tokenizer file, .tiktoken or tokenizer.json (rather than "bytes" or a tiktoken
    encoding name)."""
    # isfile, not exists: a folder named like an encoding ("gpt2", a model's checkpoint folder, say) in the
    # working directory is no .tiktoken file, and must not hide the encoding of that name.
    return spec != "bytes" and (spec.endswith((".tiktoken", ".json")) or os.sep in spec or os.path.isfile(spec))


def _file_stamp(path: str) -> tuple[int, ...]:
    """(mtime, size) of a file and of the one beside it that decides its tokens ((0, 0) when that is absent)."""
    stamp: tuple[int, ...] = ()
    for part in deciding_files(path):
        st = os.stat(part) if os.path.exists(part) else None
        stamp += (st.st_mtime_ns, st.st_size) if st is not None else (0, 0)
    return stamp


@functools.lru_cache(maxsize=16)
def _get_cached(spec: str, file_stamp: tuple[int, ...] | None) -> Tokenizer:
    # file_stamp (see _file_stamp) is part of the key so that a retrained or edited file is reloaded.
    if spec == "bytes":
        return ByteTokenizer()
    if spec.endswith(".tiktoken.json"):
        raise ValueError(f"spec: {spec!r} is the sidecar of a .tiktoken file; pass the .tiktoken file itself "
                         f"({spec[:-len('.json')]!r})")
    if is_hf_tokenizer_json(spec):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"spec: no tokenizer.json file at {spec!r}")
        from .hf_tokenizers_backend import load_tokenizer_json

        return load_tokenizer_json(spec)
    if is_file_spec(spec):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"spec: no .tiktoken file at {spec!r}")
        return _load_tiktoken_file(spec)
    import tiktoken

    names = tiktoken.list_encoding_names()
    if spec not in names:
        raise ValueError(
            f"spec: expected 'bytes', a tiktoken encoding name ({', '.join(names)}), "
            f"the path of a .tiktoken file or of a Hugging Face tokenizer.json, got {spec!r}"
        )
    return _load_named_encoding(spec)


def get_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by `spec`: "bytes", a tiktoken encoding name, a .tiktoken path or a Hugging Face
    tokenizer.json path (see the module docstring).

    The returned object's `.spec` reloads the same tokenizer (paths are made absolute).
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec: expected a str, got {type(spec).__name__}")
    if not spec:
        raise ValueError("spec: expected 'bytes', a tiktoken encoding name, a .tiktoken path or a tokenizer.json "
                         "path, got ''")
    if is_file_spec(spec):
        spec = os.path.abspath(spec)
        if os.path.isfile(spec):
            return _get_cached(spec, _file_stamp(spec))
    return _get_cached(spec, None)
