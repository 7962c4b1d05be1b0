"""Write a tiktoken tokenizer (GPT-2's, a .tiktoken file that `llmkern tokenizer train` or `import` wrote) or the
"bytes" tokenizer as a Hugging Face tokenizer.json, which gives the same ids as tiktoken: the reverse of
llmkern.data.hf_tokenizer.

What is written:
- model: "BPE" whose vocab is each rank's bytes spelled in GPT-2's bytes_to_unicode alphabet (id = rank), and whose
  merges are recovered from the ranks: for each token of more than one byte, the two tokens that tiktoken's BPE
  of its bytes, with the lower ranks only, ends in (their merge makes it at its rank), in rank order. For GPT-2's
  ranks those are GPT-2's published 50000 merges. ignore_merges is on: a piece that is a whole token is that token,
  as tiktoken takes it.
- pre_tokenizer: a Split on the tokenizer's own pattern (behavior "Isolated"), then ByteLevel without its own regex,
  as Llama 3's file has. The pattern is rewritten where `tokenizers`' regex engine (Oniguruma, Ruby syntax) reads
  it otherwise than tiktoken's (Rust's fancy-regex): a possessive interval "X{1,3}+" (a repetition of the interval
  for Ruby) becomes the atomic group "(?>X{1,3})", and "^" and "$" (a line's ends for Ruby) become "\\A" and "\\z".
  Inline flags other than "i" mean other things in the two engines and are refused.
- decoder ByteLevel; post_processor ByteLevel as GPT-2's file, and a TemplateProcessing that puts the BOS in
  front of every text where the tokenizer has one (as llmkern.data.sequences.sequence_start does).
- added_tokens: the special tokens (<|endoftext|>, ...) with their ids, special. Hugging Face matches them inside
  the text, as tiktoken's encode does with allowed_special="all".

Where Hugging Face's `tokenizers` is installed, the result is checked before it is returned: the pattern must
compile in Oniguruma, and a probe text (many scripts, digits, runs of spaces and newlines) must split into the
pieces of the tokenizer's pattern (read by the `regex` package, as tiktoken reads it) and encode to tiktoken's ids;
a ValueError says what differs otherwise. A pattern that leaves some text unmatched is refused so: tiktoken drops
that text, Hugging Face keeps it as a piece of its own.
"""

from __future__ import annotations

import re

from .tokenizer import ENDOFTEXT, ByteTokenizer, TiktokenTokenizer

# Text the written tokenizer.json must encode as tiktoken does: contractions, many scripts, digits, emoji,
# combining marks, runs of spaces, tabs and newlines (and at the very end), Windows line ends.
PROBE_TEXT = (
    "Hello, world! It's 12345 o'clock; they'll've DONE it.\n\n  Indented   text\twith\ttabs \t\n"
    "Ünïcödé café naïve — “quotes” «guillemets» 1.5e-3 ½ ٣٤٥ ⅷ\r\nWindows\r\n\r\nlines\n"
    "中文字符，日本語のテキスト、한국어 텍스트. Привет, мир! Γειά σου. مرحبا بالعالم שלום\n"
    "emoji 👋🏽👨‍👩‍👧 🚀🚀 e\u0301 a\u00a0b c\u3000d \u2028 x\x0by\x1cz \u200bzero-width\n"
    "    def f(x):\n        return x**2  # comment\n\n\n   trailing spaces   \n \n  "
)

_FLAG_GROUP = re.compile(r"\(\?([a-zA-Z-]+)[:)]")


def _byte_to_char() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: the character that spells each byte in a byte-level vocab."""
    from .hf_tokenizer import byte_of_char

    return {b: c for c, b in byte_of_char().items()}


def _spell(token: bytes, table: dict[int, str]) -> str:
    return "".join(table[b] for b in token)


def _bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's BPE of `token`'s bytes with the ranks lower than `below` only: merge the adjacent pair whose
    concatenation has the lowest rank (the leftmost on a tie) until no pair's concatenation is such a rank."""
    parts = [token[i: i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, below
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best: best + 2] = [parts[best] + parts[best + 1]]
    return parts


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges of BPE ranks, in rank order: for each token of more than one byte, the pair of tokens that its
    bytes merge into with the lower ranks, whose merge makes it at its rank.

    A token whose bytes end in three parts or more (no BPE training makes one; a hand-made vocab might) gets no
    merge: tiktoken takes it only as a whole piece, as Hugging Face does with ignore_merges."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _class_end(pattern: str, start: int) -> int:
    """The index just past the character class that opens at pattern[start] ("["), nested classes included."""
    i, depth = start + 1, 1
    if pattern[i: i + 1] == "^":
        i += 1
    if pattern[i: i + 1] == "]":  # a "]" first in a class is a literal
        i += 1
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"pattern: an unclosed character class at index {start}: {pattern!r}")


def _escape_end(pattern: str, start: int) -> int:
    """The index just past the escape that opens at pattern[start] ("\\"): "\\p{L}" and "\\x{20}" whole."""
    end = start + 2
    if pattern[start + 1: start + 2] in ("p", "P", "x", "u") and pattern[end: end + 1] == "{":
        close = pattern.find("}", end)
        if close < 0:
            raise ValueError(f"pattern: an unclosed escape at index {start}: {pattern!r}")
        end = close + 1
    return end


def onig_pattern(pattern: str) -> str:
    """`pattern` (tiktoken's regex syntax) rewritten for Oniguruma's Ruby syntax, which `tokenizers` uses, to
    give the same pieces (see the module docstring); ValueError for an inline flag the two engines read apart."""
    for flags in _FLAG_GROUP.findall(pattern):
        if set(flags) - set("i-"):
            raise ValueError(f"pattern: the inline flags {flags!r} mean other things to tiktoken's regex engine and "
                             f"to `tokenizers`' (Oniguruma: \"m\" is dot-all there); only \"i\" is written: {pattern!r}")
    out: list[str] = []
    atom_starts: list[int] = []  # where each open group begins in `out`
    last_atom = -1  # where the atom before a quantifier begins in `out`
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            end = _escape_end(pattern, i)
            last_atom = len(out)
            out.append(pattern[i:end])
            i = end
        elif char == "[":
            end = _class_end(pattern, i)
            last_atom = len(out)
            out.append(pattern[i:end])
            i = end
        elif char == "(":
            atom_starts.append(len(out))
            named = pattern.startswith("(?P<", i)  # Rust's spelling of a named group; Ruby knows (?<name>...)
            out.append("(?<" if named else "(")
            i += 4 if named else 1
        elif char == ")":
            if not atom_starts:
                raise ValueError(f"pattern: an unopened ')' at index {i}: {pattern!r}")
            last_atom = atom_starts.pop()
            out.append(")")
            i += 1
        elif char == "{" and re.match(r"\{\d*,?\d*\}", pattern[i:]) and last_atom >= 0:
            interval = re.match(r"\{\d*,?\d*\}", pattern[i:]).group(0)
            i += len(interval)
            if pattern[i: i + 1] == "+":  # possessive for fancy-regex; "repeat the interval" for Ruby
                out[last_atom:] = ["(?>" + "".join(out[last_atom:]) + interval + ")"]
                i += 1
            else:
                out.append(interval)
        elif char in "^$":
            out.append(r"\A" if char == "^" else r"\z")  # Ruby's are a line's start and end, Rust's the text's
            last_atom = -1
            i += 1
        else:
            last_atom = -1 if char in "|*+?" else len(out)
            out.append(char)
            i += 1
    return "".join(out)


def _encoding_parts(tokenizer) -> tuple[dict[bytes, int], str | None, dict[str, int]]:
    """(ranks, split pattern or None for none, special tokens) of a tiktoken or byte tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return {bytes([b]): b for b in range(256)}, None, {ENDOFTEXT: tokenizer.eot_token}
    if isinstance(tokenizer, TiktokenTokenizer):
        encoding = tokenizer.encoding
        # tiktoken has no public accessor for these; transformers' converter reads the same attributes
        return dict(encoding._mergeable_ranks), encoding._pat_str, dict(encoding._special_tokens)
    raise TypeError(f"tokenizer: expected a tiktoken or byte tokenizer (llmkern.data.tokenizer.get_tokenizer of "
                    f"'bytes', a tiktoken name or a .tiktoken file), got {type(tokenizer).__name__}")


def _added_token(content: str, token_id: int) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _byte_level(**changes) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False, **changes}


def _pre_tokenizer(pattern: str | None) -> dict:
    if pattern is None:  # the byte tokenizer splits nothing: every byte is a token
        return _byte_level()
    split = {"type": "Split", "pattern": {"Regex": onig_pattern(pattern)}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, _byte_level()]}


def _post_processor(bos_name: str | None, bos_id: int | None) -> dict:
    """GPT-2's (ByteLevel: offsets only), with a template putting the BOS first where the tokenizer has one."""
    byte_level = _byte_level(add_prefix_space=True, trim_offsets=False, use_regex=True)
    if bos_name is None:
        return byte_level

    def bos(type_id: int) -> dict:
        return {"SpecialToken": {"id": bos_name, "type_id": type_id}}

    def text(name: str, type_id: int) -> dict:
        return {"Sequence": {"id": name, "type_id": type_id}}

    template = {"type": "TemplateProcessing", "single": [bos(0), text("A", 0)],
                "pair": [bos(0), text("A", 0), bos(1), text("B", 1)],
                "special_tokens": {bos_name: {"id": bos_name, "ids": [bos_id], "tokens": [bos_name]}}}
    return {"type": "Sequence", "processors": [byte_level, template]}


def special_token_names(tokenizer) -> tuple[str, str | None]:
    """(the end-of-text token's name, the begin-of-sequence token's name or None) of a tiktoken or byte tokenizer."""
    _, _, special = _encoding_parts(tokenizer)
    names = {token_id: name for name, token_id in special.items()}
    bos = None if tokenizer.bos_token is None else names[tokenizer.bos_token]
    return names[tokenizer.eot_token], bos


def tiktoken_to_hf_tokenizer_json(tokenizer) -> dict:
    """A Hugging Face tokenizer.json (as a dict, for json.dump) that encodes text as `tokenizer` does: a
    TiktokenTokenizer or the ByteTokenizer (get_tokenizer of a tiktoken name, a .tiktoken file or "bytes"). See the
    module docstring for what it holds and how it is checked; ValueError where it cannot give tiktoken's ids."""
    ranks, pattern, special = _encoding_parts(tokenizer)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"tokenizer: {tokenizer.spec!r} lacks {len(missing)} of the 256 single bytes in its ranks "
                         f"(byte {missing[0]}, ...); byte-level BPE needs all of them")
    table = _byte_to_char()
    vocab = {_spell(token, table): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    # "a b", the format every `tokenizers` version reads: a byte-level token spells a space as "Ġ", never " "
    merges = [f"{_spell(a, table)} {_spell(b, table)}" for a, b in recover_merges(ranks)]
    _, bos_name = special_token_names(tokenizer)
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(name, token_id) for name, token_id in sorted(special.items(),
                                                                                     key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(pattern),
        "post_processor": _post_processor(bos_name, tokenizer.bos_token),
        "decoder": _byte_level(add_prefix_space=True, use_regex=True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }
    check_against_tiktoken(data, tokenizer)
    return data


def check_against_tiktoken(data: dict, tokenizer, text: str = PROBE_TEXT) -> None:
    """Where Hugging Face's `tokenizers` is installed: a ValueError unless the tokenizer.json `data` compiles, splits
    `text` into the pieces that `tokenizer`'s pattern gives, and encodes it to `tokenizer`'s ids. Nothing is checked
    without `tokenizers`."""
    import json

    try:
        import tokenizers
    except ImportError:
        return
    try:
        built = tokenizers.Tokenizer.from_str(json.dumps(data))
    except Exception as err:  # tokenizers raises a bare Exception for a regex that Oniguruma cannot compile
        raise ValueError(f"tokenizer: {tokenizer.spec!r} cannot be written as a tokenizer.json: Hugging Face's "
                         f"`tokenizers` cannot read it ({err}); its split pattern there: {_split_regex(data)!r}") from err
    if isinstance(tokenizer, TiktokenTokenizer):
        _check_pieces(tokenizer, _split_regex(data), text)
    ours = tokenizer.encode(text)
    theirs = built.encode(text, add_special_tokens=False).ids
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise ValueError(
            f"tokenizer: the tokenizer.json written for {tokenizer.spec!r} encodes text otherwise than tiktoken: from "
            f"token {at}, tiktoken gives {tokenizer.decode(ours[at: at + 5])!r}, Hugging Face "
            f"{built.decode(theirs[at: at + 5])!r}")


def _split_regex(data: dict) -> str | None:
    parts = data["pre_tokenizer"].get("pretokenizers") or []
    return parts[0]["pattern"]["Regex"] if parts else None


def _check_pieces(tokenizer: TiktokenTokenizer, onig_regex: str, text: str) -> None:
    """A ValueError unless Oniguruma splits `text` with onig_regex into the pieces that the tokenizer's own pattern
    gives (read by the `regex` package, as tiktoken's engine reads it; llmkern.data.bpe trains with it too). The ids
    alone would miss a difference that the vocab hides (digits split otherwise, where no digits were merged)."""
    import regex
    import tokenizers

    ours = [m.group(0) for m in regex.finditer(tokenizer.encoding._pat_str, text)]
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(onig_regex), "isolated")
    theirs = [piece for piece, _ in split.pre_tokenize_str(text)]
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise ValueError(
            f"tokenizer: the split pattern of {tokenizer.spec!r} gives other pieces in `tokenizers`' regex engine "
            f"(Oniguruma) than in tiktoken's: from piece {at}, tiktoken's are {ours[at: at + 3]}, Oniguruma's "
            f"{theirs[at: at + 3]} (the pattern there: {onig_regex!r}); a pattern that leaves text unmatched (which "
            f"tiktoken drops) differs so too")
