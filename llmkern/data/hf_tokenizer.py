"""Import a Hugging Face `tokenizer.json` of byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2, ...) as a
.tiktoken file + sidecar that get_tokenizer reads, giving the Hugging Face token ids for ordinary text.

What is imported:
- model: "BPE" without byte_fallback, dropout, subword prefix or word suffix. Its vocab strings are bytes
  written in GPT-2's bytes_to_unicode alphabet; they are mapped back to bytes, and a token's id is its
  tiktoken rank.
- pre_tokenizer: ByteLevel with use_regex (GPT-2's split pattern), or a Split with a regex (behavior
  "Isolated") followed by ByteLevel without use_regex, as Llama 3 and Qwen2 have (the regex is the pattern).
- added_tokens marked special become the sidecar's special tokens; the end-of-text token is `eot_token`, else the
  "eos_token" of the tokenizer_config.json beside the file (Llama 3's <|end_of_text|>), else <|endoftext|>.

tiktoken merges the adjacent pair whose concatenation has the lowest rank; Hugging Face the pair earliest in
the merges list. For them to agree the merges must give ids in their own order (ties only where several
merges give one token, as in Llama 3's file), every longer token must be some merge's result, and a token's
own bytes must merge into that token (with ignore_merges, tiktoken's way of taking a whole token as it is,
that or else every split of a token into two tokens being a merge, as in files converted from tiktoken): all
checked. A BPE trained as usual (by `tokenizers`, or converted from tiktoken) meets them. Refused, saying
what was found: Unigram, WordPiece, SentencePiece-style BPE (a Metaspace pre-tokenizer, byte_fallback:
Llama 2, TinyLlama), normalizers that change text (NFKC, lowercase; NFC is kept with a warning, as it
changes only text that is not NFC already), non-special added tokens. Such a tokenizer.json is a spec of its own
(get_tokenizer("path/to/tokenizer.json"), read by Hugging Face's `tokenizers` library where it is installed:
llmkern.data.hf_tokenizers_backend).

The post-processor: where it puts a special token in front of every text (a TemplateProcessing whose "single"
template starts with one, alone or in a "Sequence" of processors, as Llama 3's <|begin_of_text|>; BERT's and
RoBERTa's [CLS] / <s>), that token is the sidecar's "bos_token", which llmkern puts first where it starts a
sequence of its own, as Hugging Face does with add_special_tokens=True; `bos_token` overrides it. Tokens it puts
after the text (an EOS) are not carried over. encode itself adds nothing: llmkern encodes text as ordinary text,
and special tokens inside the text are spelled out, never matched.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

from .._atomic import write_json_atomic, write_text_atomic
from .bpe import _check_out_path, gpt2_byte_order
from .tokenizer import (
    ENDOFTEXT,
    GPT2_PATTERN,
    get_tokenizer,
    hf_config_path,
    sidecar_path,
)


def byte_of_char() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the character that stands for each byte in a byte-level vocab.

    Bytes that print as themselves (in gpt2_byte_order's first part) stand for themselves; the others, in
    byte order, for U+0100, U+0101, ..."""
    order = gpt2_byte_order()
    printable = order[: len(order) - 68]  # 188 printable bytes, then the 68 others
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(order[len(printable):])})
    return table


def _refuse(path: str, what: str) -> ValueError:
    return ValueError(f"tokenizer_json: {path!r} {what}; only byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2 style) "
                      f"can be imported as a .tiktoken file. With Hugging Face's `tokenizers` installed (pip install "
                      f"tokenizers), the tokenizer.json itself is a tokenizer spec: pass its path where a tokenizer "
                      f"is asked for (--tokenize.tokenizer=PATH/tokenizer.json, say)")


def _check_model(model, path: str) -> None:
    if not isinstance(model, dict) or model.get("type") != "BPE":
        found = model.get("type") if isinstance(model, dict) else type(model).__name__
        raise _refuse(path, f"has a {found!r} model, not BPE (Unigram and WordPiece are SentencePiece/BERT tokenizers)")
    if model.get("byte_fallback"):
        raise _refuse(path, "is a SentencePiece-style BPE (byte_fallback: true, as Llama 2 and TinyLlama have)")
    if model.get("dropout") not in (None, 0, 0.0):
        raise _refuse(path, f"has BPE dropout {model['dropout']!r} (random merges while encoding)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise _refuse(path, f"has a BPE {key} {model[key]!r}")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise _refuse(path, "has no BPE vocab (a dict) and merges (a list)")


def _check_normalizer(normalizer, path: str) -> None:
    if normalizer is None:
        return
    parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    kinds = [p.get("type") for p in parts]
    if any(kind != "NFC" for kind in kinds):
        raise _refuse(path, f"has a normalizer that changes the text ({', '.join(map(str, kinds))})")
    if kinds:
        # Hugging Face composes the text first: only text not in NFC already (rare) gets other ids here.
        warnings.warn(f"tokenizer_json: {path!r} normalizes text to NFC, which the imported tokenizer does not: "
                      f"text that is not NFC already gets other ids than Hugging Face gives", stacklevel=3)


def _split_pattern(pre_tokenizer, path: str) -> str:
    """The tiktoken pattern of the pre-tokenizer (see the module docstring for those imported)."""
    if pre_tokenizer is None:
        raise _refuse(path, "has no pre-tokenizer (byte-level BPE has a ByteLevel one)")
    parts = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    kinds = [p.get("type") for p in parts]
    if kinds not in (["ByteLevel"], ["Split", "ByteLevel"]):
        raise _refuse(path, f"has the pre-tokenizers {kinds} (expected ByteLevel, or Split then ByteLevel)")
    byte_level = parts[-1]
    if byte_level.get("add_prefix_space"):
        raise _refuse(path, "has a ByteLevel pre-tokenizer with add_prefix_space: true (a space added in front)")
    if len(parts) == 1:
        if not byte_level.get("use_regex", True):
            raise _refuse(path, "has a ByteLevel pre-tokenizer without use_regex and no Split: the text is never split")
        return GPT2_PATTERN  # ByteLevel's own regex: the same pieces as this pattern
    split = parts[0]
    if byte_level.get("use_regex", True):
        raise _refuse(path, "splits with both a Split regex and ByteLevel's own (use_regex: true); tiktoken has one")
    if split.get("behavior") != "Isolated" or split.get("invert"):
        raise _refuse(path, f"has a Split pre-tokenizer with behavior {split.get('behavior')!r}, invert "
                            f"{split.get('invert')!r} (expected Isolated, false)")
    pattern = split.get("pattern") or {}
    if "Regex" in pattern:
        regex = str(pattern["Regex"])
    elif "String" in pattern:
        import regex as regex_module

        regex = regex_module.escape(str(pattern["String"]))
    else:
        raise _refuse(path, f"has a Split pre-tokenizer with the pattern {pattern!r}")
    # "Isolated" keeps the text between two matches as a piece of its own; tiktoken drops text its pattern does
    # not match. The second alternative matches exactly such a gap (the characters where the regex matches
    # nowhere); for a regex that matches everywhere (Llama 3's, Qwen2's) it never comes into play.
    return f"(?:{regex})|(?:(?!(?:{regex}))[\\s\\S])+"


def read_tokenizer_config(tokenizer_json: str, argument: str) -> dict:
    """The tokenizer_config.json beside a tokenizer.json, as a dict ({} where there is none); `argument` names
    what a ValueError is about."""
    path = hf_config_path(tokenizer_json)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{argument}: {path!r} is not a JSON file ({err}); expected a tokenizer_config.json") from err
    if not isinstance(config, dict):
        raise ValueError(f"{argument}: {path!r} is not a tokenizer_config.json (not a JSON object)")
    return config


def config_token_name(config: dict, key: str, tokenizer_json: str, argument: str) -> str | None:
    """The token tokenizer_config.json gives under `key` ("eos_token", "bos_token"): written as a string or as
    {"content": ...} (an AddedToken); None where it gives none."""
    value = config.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{argument}: {hf_config_path(tokenizer_json)!r} has a malformed {key!r}: {value!r}")


class _FromPostProcessor:
    """The default of import_hf_tokenizer's bos_token: the token the file's post-processor puts first."""

    def __repr__(self) -> str:
        return "FROM_POST_PROCESSOR"


FROM_POST_PROCESSOR = _FromPostProcessor()


def _first_special_of_template(processor: dict, path: str) -> str | None:
    """The special token a TemplateProcessing puts before the text of a single sequence, or None."""
    single = processor.get("single")
    if not isinstance(single, list) or not single:
        raise ValueError(f"tokenizer_json: {path!r} has a TemplateProcessing post-processor without a \"single\" "
                         f"template: {single!r}")
    first = single[0]
    if not (isinstance(first, dict) and isinstance(first.get("SpecialToken"), dict)):
        return None  # the text ($A) comes first
    name = first["SpecialToken"].get("id")
    if not isinstance(name, str):
        raise ValueError(f"tokenizer_json: {path!r} has a malformed post-processor template piece {first!r}")
    # the template names an entry of its "special_tokens", which spells out its token(s)
    entry = (processor.get("special_tokens") or {}).get(name, {})
    tokens = entry.get("tokens", [name]) if isinstance(entry, dict) else [name]
    if not (isinstance(tokens, list) and len(tokens) == 1 and isinstance(tokens[0], str)):
        raise ValueError(f"tokenizer_json: {path!r} has a post-processor that puts {tokens!r} in front of the text "
                         f"(one token expected)")
    return tokens[0]


def post_processor_bos(post_processor, path: str) -> str | None:
    """The token that a tokenizer.json's post-processor puts in front of every text, as Hugging Face encodes with
    add_special_tokens=True (Llama 3's <|begin_of_text|>); None when it puts none there."""
    if post_processor is None:
        return None
    if not isinstance(post_processor, dict):
        raise ValueError(f"tokenizer_json: {path!r} has a malformed post_processor {post_processor!r}")
    kind = post_processor.get("type")
    if kind == "Sequence":  # Llama 3's: ByteLevel (offsets only), then TemplateProcessing
        found = [post_processor_bos(p, path) for p in post_processor.get("processors") or []]
        return next((name for name in found if name is not None), None)
    if kind == "TemplateProcessing":
        return _first_special_of_template(post_processor, path)
    if kind in ("BertProcessing", "RobertaProcessing"):  # [CLS] / <s> in front: "cls": [token, id]
        cls = post_processor.get("cls")
        if not (isinstance(cls, list) and cls and isinstance(cls[0], str)):
            raise ValueError(f"tokenizer_json: {path!r} has a {kind} post-processor with a malformed cls {cls!r}")
        return cls[0]
    return None  # ByteLevel: offsets only


def _bos_name(bos_token, post_processor, special: dict[str, int], path: str) -> str | None:
    """The sidecar's begin-of-sequence token: `bos_token` as given, or the post-processor's; a special token."""
    if bos_token is FROM_POST_PROCESSOR:
        name = post_processor_bos(post_processor, path)
        if name is not None and name not in special:
            raise ValueError(f"tokenizer_json: {path!r} has a post-processor that puts {name!r} in front of every "
                             f"text, which is not one of its special added tokens {sorted(special)}")
        return name
    if bos_token is not None and bos_token not in special:
        raise ValueError(f"bos_token: {bos_token!r} is not a special token of {path!r}; pass one of "
                         f"{sorted(special)} (`--bos-token` on the command line), or None (`--no-bos-token`)")
    return bos_token


def _merge_pairs(merges: list, path: str) -> list[tuple[str, str]]:
    pairs = []
    for i, merge in enumerate(merges):
        # "a b" in older files, ["a", "b"] in newer ones; byte-level tokens hold no space (it is "Ġ")
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) and s for s in pair)):
            raise ValueError(f"tokenizer_json: {path!r} has a malformed merge #{i}: {merge!r}")
        pairs.append((pair[0], pair[1]))
    return pairs


def _hf_bpe(chars: list[str], merge_rank: dict[tuple[str, str], int]) -> list[str]:
    """Hugging Face's BPE of one piece: merge the adjacent pair earliest in the merges list (the leftmost on a
    tie) until no pair is a merge."""
    while len(chars) > 1:
        best = min(range(len(chars) - 1), key=lambda i: merge_rank.get((chars[i], chars[i + 1]), len(merge_rank)))
        if (chars[best], chars[best + 1]) not in merge_rank:
            break
        chars[best: best + 2] = [chars[best] + chars[best + 1]]
    return chars


def _token_not_rebuilt(merged: set[str], merge_rank: dict[tuple[str, str], int]) -> str | None:
    """What is wrong where some token's characters do not merge into that token (Hugging Face's BPE without
    ignore_merges), else None."""
    for token in merged:
        got = _hf_bpe(list(token), merge_rank)
        if got != [token]:
            return (f"merges the characters of its token {token!r} into {got}, not that token (and has no "
                    f"ignore_merges): tiktoken would give the token")
    return None


def _split_not_merged(merged: set[str], vocab_ids: dict[str, int], merge_rank: dict[tuple[str, str], int]) -> str | None:
    """What is wrong where some split of a token into two tokens is no merge, else None. A file converted from
    tiktoken (Llama 3's) lists every such split: then merging a pair and ranking its concatenation are one thing.
    Without that they part (a pair that is no merge still makes a token for tiktoken)."""
    for token in merged:
        for k in range(1, len(token)):
            if token[:k] in vocab_ids and token[k:] in vocab_ids and (token[:k], token[k:]) not in merge_rank:
                return (f"has ignore_merges but no merge {token[:k]!r} + {token[k:]!r} for its token {token!r}, and "
                        f"its merges do not rebuild every token either: tiktoken would merge those two, Hugging Face "
                        f"not")
    return None


def import_hf_tokenizer(tokenizer_json, out_path, eot_token: str | None = None, bos_token=FROM_POST_PROCESSOR):
    """Write the byte-level BPE of a Hugging Face tokenizer.json as `out_path` (.tiktoken) and its sidecar.

    eot_token: the special token that ends documents (default: the "eos_token" of the tokenizer_config.json
    beside the file, as a tokenizer.json used directly as a spec takes it, else <|endoftext|>; it must be one of
    the file's special added tokens). bos_token: the special token that begins every sequence; by default the one the
    file's post-processor puts in front of the text (none where it puts none), None for none. Returns the
    tokenizer (get_tokenizer(out_path)). ValueError, saying what was found, for a tokenizer.json that tiktoken
    cannot reproduce (see the module docstring).
    """
    if not isinstance(tokenizer_json, (str, os.PathLike)):
        raise TypeError(f"tokenizer_json: expected a path (str or PathLike), got {type(tokenizer_json).__name__}")
    if eot_token is not None and not isinstance(eot_token, str):
        raise TypeError(f"eot_token: expected a str or None, got {type(eot_token).__name__}")
    if not (bos_token is FROM_POST_PROCESSOR or bos_token is None or isinstance(bos_token, str)):
        raise TypeError(f"bos_token: expected a str, None or FROM_POST_PROCESSOR, got {type(bos_token).__name__}")
    path = os.fspath(tokenizer_json)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer_json: no file at {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"tokenizer_json: {path!r} is not a JSON file ({err})") from err
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"tokenizer_json: {path!r} is not a Hugging Face tokenizer.json (no \"model\")")
    for key in ("normalizer", "pre_tokenizer"):
        if not isinstance(data.get(key), (dict, type(None))):
            raise ValueError(f"tokenizer_json: {path!r} has a malformed {key} {data[key]!r}")
    model = data["model"]
    _check_model(model, path)
    _check_normalizer(data.get("normalizer"), path)
    pattern = _split_pattern(data.get("pre_tokenizer"), path)

    special: dict[str, int] = {}
    for added in data.get("added_tokens") or []:
        content, token_id = (added.get("content"), added.get("id")) if isinstance(added, dict) else (None, None)
        if not isinstance(content, str) or not isinstance(token_id, int) or isinstance(token_id, bool):
            raise ValueError(f"tokenizer_json: {path!r} has a malformed added token {added!r}")
        if not added.get("special"):
            # Hugging Face matches these inside ordinary text, before splitting it; tiktoken cannot
            raise _refuse(path, f"has a non-special added token {content!r} (id {token_id})")
        special[content] = token_id
    special_ids = {i: s for s, i in special.items()}

    to_byte = byte_of_char()
    ranks: dict[bytes, int] = {}
    vocab_ids: dict[str, int] = {}  # the mergeable tokens, as the vocab spells them
    for token, token_id in model["vocab"].items():
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise ValueError(f"tokenizer_json: {path!r} gives the token {token!r} the id {token_id!r}")
        if token_id in special_ids:
            # a trainer puts its special tokens in the vocab too (SmolLM's <|endoftext|> = 0): special here
            if special_ids[token_id] != token:
                raise ValueError(f"tokenizer_json: {path!r} has the id {token_id} for both the token {token!r} "
                                 f"and the added token {special_ids[token_id]!r}")
            continue
        try:
            ranks[bytes(to_byte[c] for c in token)] = token_id
        except KeyError:
            bad = next(c for c in token if c not in to_byte)
            raise _refuse(path, f"has the vocab token {token!r} with {bad!r}, which is no byte in byte-level "
                                f"BPE's alphabet") from None
        vocab_ids[token] = token_id
    if len(set(ranks.values())) != len(ranks) or len(ranks) != len(vocab_ids):
        raise ValueError(f"tokenizer_json: {path!r} gives two vocab tokens one id")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise _refuse(path, f"lacks {len(missing)} of the 256 single bytes in its vocab (byte {missing[0]}, ...)")

    # tiktoken ranks a pair by its concatenation's id: the merges must give ids in their own order.
    pairs = _merge_pairs(model["merges"], path)
    merged: set[str] = set()
    last_id, last = -1, None
    for i, (a, b) in enumerate(pairs):
        for part in (a, b, a + b):
            if part not in vocab_ids:
                raise ValueError(f"tokenizer_json: {path!r} has the merge #{i} {a!r} + {b!r}, but {part!r} is "
                                 f"no (non-special) token of its vocab")
        token_id = vocab_ids[a + b]
        if token_id < last_id:
            raise ValueError(
                f"tokenizer_json: {path!r} has its ids out of merge order: merge #{i} {a!r} + {b!r} gives the id "
                f"{token_id}, lower than the id {last_id} of the merge before ({last!r}); tiktoken ranks a token "
                f"by its id, so it would merge in another order than Hugging Face")
        last_id, last = token_id, a + b
        merged.add(a + b)
    unreachable = [t for t in vocab_ids if len(t) > 1 and t not in merged]  # a character a byte
    if unreachable:
        raise ValueError(f"tokenizer_json: {path!r} has {len(unreachable)} tokens that no merge gives "
                         f"({unreachable[0]!r}, ...): tiktoken would reach them from their parts, Hugging Face not")
    merge_rank: dict[tuple[str, str], int] = {}
    for i, pair in enumerate(pairs):
        merge_rank.setdefault(pair, i)
    if model.get("ignore_merges"):
        # Either check will do: a file whose merges rebuild every token (llmkern's export, which lists one merge a
        # token) gives the same ids with or without ignore_merges. The cheaper one first (Llama 3's 128k tokens).
        problem = _split_not_merged(merged, vocab_ids, merge_rank)
        if problem is not None and _token_not_rebuilt(merged, merge_rank) is None:
            problem = None
    else:
        # tiktoken takes a piece that is a whole token as that token; Hugging Face merges it unless ignore_merges
        problem = _token_not_rebuilt(merged, merge_rank)
    if problem is not None:
        raise ValueError(f"tokenizer_json: {path!r} {problem}")

    ids = set(ranks.values()) | set(special.values())
    n_vocab = max(ids) + 1
    if len(ids) != n_vocab:
        hole = next(i for i in range(n_vocab) if i not in ids)
        raise ValueError(f"tokenizer_json: {path!r} has no token of id {hole} (its ids run to {n_vocab - 1}); "
                         f"a .tiktoken file has no holes")
    # by default the token that ends documents as Hugging Face's tokenizer_config.json says (Llama 3's
    # <|end_of_text|>, an Instruct model's <|im_end|>), as a tokenizer.json used directly as a spec reads it
    default = config_token_name(read_tokenizer_config(path, "tokenizer_json"), "eos_token", path, "tokenizer_json")
    eot_name = eot_token or default or ENDOFTEXT
    if eot_name not in special:
        raise ValueError(f"eot_token: {eot_name!r} is not a special token of {path!r}; pass the one that ends "
                         f"documents (`--eot-token` on the command line), one of {sorted(special)}")
    bos_name = _bos_name(bos_token, data.get("post_processor"), special, path)
    try:
        import tiktoken

        tiktoken.Encoding(name="check", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    except ValueError as err:  # a Split regex in a syntax that tiktoken's regex engine does not read
        raise ValueError(f"tokenizer_json: tiktoken cannot compile the split pattern of {path!r} ({err}): "
                         f"{pattern!r}") from err

    import base64

    out_path = _check_out_path(out_path)
    text = "".join(f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
                   for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    meta = {"pattern": pattern, "special_tokens": dict(sorted(special.items(), key=lambda kv: kv[1])),
            "eot_token": eot_name, "bos_token": bos_name, "imported_from": os.path.abspath(path),
            "imported_by": "llmkern.data.hf_tokenizer.import_hf_tokenizer",
            "tiktoken_sha256": hashlib.sha256(text.encode("ascii")).hexdigest()}
    # As train_bpe: the sidecar first, naming the ranks it belongs to (a crash between the renames is caught)
    write_json_atomic(sidecar_path(out_path), meta)
    write_text_atomic(out_path, text)
    return get_tokenizer(out_path)
