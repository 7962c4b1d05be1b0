"""Configuration of `llmkern data prepare`: one dataclass per stage, loaded from TOML or JSON.

A config file holds one table per stage, e.g. (TOML)

    [reader]
    text_field = "content"
    [quality]
    min_words = 20
    [near_dedup]
    threshold = 0.8
    [tokenize]
    enabled = true
    tokenizer = "gpt2"

Every key is checked: an unknown key or a value of the wrong type is a ValueError naming the
key, what was expected and what came. `--section.key=value` overrides use the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass
class ReaderConfig:
    text_field: str = "text"  # the JSONL / Parquet field holding the document text
    separator: Optional[str] = None  # .txt: None = a file is a document; else split on this string ("\n" as "\r\n" in a CRLF file)
    max_document_bytes: int = 16 * 2**20  # longer documents/lines are skipped (and reported), not read whole
    strict: bool = False  # raise at the first bad input instead of counting it
    max_examples: int = 20  # bad-input examples (file, line, reason) kept in the report per kind


@dataclass
class CleanConfig:
    enabled: bool = True
    normalize_nfc: bool = True
    remove_control: bool = True  # C0/C1 controls except \n and \t, BOM, zero-width characters
    normalize_whitespace: bool = True  # unicode spaces -> " ", collapse runs, strip line ends, <= 1 blank line
    lowercase: bool = False
    max_replacement_fraction: Optional[float] = 0.01  # U+FFFD share of characters above which a document is dropped


@dataclass
class LangIdConfig:
    enabled: bool = False
    keep: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes
    threshold: float = 0.65  # minimum probability of the predicted language
    max_chars: int = 4000  # classify the first characters only (the model saturates well before)


@dataclass
class QualityConfig:
    """Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020) document heuristics; None disables a rule."""

    enabled: bool = True
    min_words: Optional[int] = 50
    max_words: Optional[int] = 100_000
    min_mean_word_length: Optional[float] = 3.0
    max_mean_word_length: Optional[float] = 10.0
    max_symbol_word_ratio: Optional[float] = 0.1  # ("#" + "..." + "…") per word
    max_bullet_line_fraction: Optional[float] = 0.9
    max_ellipsis_line_fraction: Optional[float] = 0.3
    min_alpha_word_fraction: Optional[float] = 0.8  # words with at least one letter
    min_stop_words: Optional[int] = 2
    stop_words: list[str] = field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])
    max_duplicate_line_fraction: Optional[float] = 0.3
    max_duplicate_line_char_fraction: Optional[float] = 0.2
    # Characters inside the most frequent 2-, 3-, 4-gram over all characters of words.
    max_top_ngram_char_fraction: dict[str, float] = field(
        default_factory=lambda: {"2": 0.20, "3": 0.18, "4": 0.16})
    # Characters inside repeated 5..10-grams over all characters of words.
    max_duplicate_ngram_char_fraction: dict[str, float] = field(
        default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10})
    reject_lorem_ipsum: bool = True  # C4
    reject_curly_brace: bool = False  # C4 drops pages with "{" (code); off: code can be wanted
    min_terminal_punctuation_line_fraction: Optional[float] = None  # C4-like; None = off


@dataclass
class ExactDedupConfig:
    enabled: bool = True


@dataclass
class NearDedupConfig:
    enabled: bool = True
    num_perm: int = 128
    bands: int = 16  # LSH bands; rows per band = num_perm // bands
    ngram: int = 5  # words per shingle
    threshold: float = 0.75  # a candidate is a duplicate when its estimated Jaccard is at least this
    seed: int = 1
    num_threads: int = 0  # C++ threads; 0 = one per core
    batch_size: int = 2048  # documents hashed per C++ call


@dataclass
class DecontamConfig:
    enabled: bool = False
    eval_sets: list[str] = field(default_factory=list)  # files, directories or globs, read like the inputs
    text_field: Optional[str] = None  # the eval JSONL/Parquet text field; None = reader.text_field
    ngram: int = 13
    action: str = "drop"  # "drop" or "flag" (meta["contaminated"] = the eval files matched)


@dataclass
class TokenizeConfig:
    enabled: bool = False
    tokenizer: str = "gpt2"  # spec for llmkern.data.tokenizer.get_tokenizer: a name or a .tiktoken path
    val_fraction: float = 0.0005
    shard_tokens: int = 100_000_000
    num_workers: int = 0  # 0 = one per core


@dataclass
class PrepareConfig:
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    batch_size: int = 1024  # documents per pipeline step
    num_workers: int = 0  # processes for the per-document stages (clean ... decontam); 0 = one per core
    progress: bool = True  # tqdm progress bar


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against the annotation `tp` (and converted where safe: int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ValueError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config {where}: expected a table of settings, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {where}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"config {where}: expected a table, got {type(value).__name__} {value!r}")
        return {str(k): _convert(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config {where}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config {where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config {where}: expected a number, got {type(value).__name__} {value!r}")
        if math.isnan(value):  # JSON's NaN, TOML's nan: every comparison with it is false, so a rule would be off
            raise ValueError(f"config {where}: expected a number, got nan")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config {where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ValueError(f"config {where}: unsupported setting type {_type_name(tp)}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """An instance of the dataclass `cls` from `data`; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"config: unknown key {path!r}; {hint}{where or 'the top level'} accepts {sorted(names)}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> PrepareConfig:
    """The config from a .toml or .json file (or the defaults), then `section.key=value` overrides.

    An override's value is read as JSON when it parses (numbers, true/false, null, lists), else as
    a string: `quality.min_words=20`, `langid.keep=["en","de"]`, `tokenize.tokenizer=gpt2`. A string
    with a backslash escape must be JSON (`reader.separator='"\\n\\n"'`): unquoted, it is a backslash and
    a letter. A key into a table setting (`quality.max_top_ngram_char_fraction.2=0.3`) keeps its other keys.
    """
    data: dict = {}
    if path is not None:
        path = os.fspath(path)
        if not path.endswith((".toml", ".json")):
            raise ValueError(f"config file must end in .toml or .json, got {path!r}")
        with open(path, "rb") as f:
            raw = f.read()
        try:  # the parsers' messages name a line and column, not the file
            data = tomllib.loads(raw.decode("utf-8")) if path.endswith(".toml") else json.loads(raw)
        except ValueError as err:  # TOMLDecodeError, JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"cannot parse config file {path!r}: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a table of sections, got {type(data).__name__}")
    for item in overrides or []:
        item = item[2:] if item.startswith("--") else item
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override must look like section.key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            if re.search(r"\\[nrt]", raw):  # '\n\n' unquoted is a backslash and an n, never a line end
                raise ValueError(f"override {item!r}: {raw!r} holds a backslash escape, read as plain text (a "
                                 f"backslash, then a letter); for a line end or tab write the value as a JSON "
                                 f"string: {key}='\"{raw}\"'") from None
            value = raw
        *sections, leaf = key.split(".")
        table = data
        for depth, section in enumerate(sections):
            if section not in table:  # a table setting (quality.max_top_ngram_char_fraction) keeps its other keys
                default = _default_at(sections[:depth + 1])
                table[section] = dict(default) if isinstance(default, dict) else {}
            table = table[section]
            if not isinstance(table, dict):
                raise ValueError(f"override {item!r}: {section!r} is a setting, not a section")
        table[leaf] = value
    config = from_dict(PrepareConfig, data)
    _warn_settings_of_stages_left_off(data)
    return config


def _default_at(path: list[str]) -> Any:
    """The default value of the setting at `path` (["quality", "max_top_ngram_char_fraction"]), or None."""
    value: Any = PrepareConfig()
    for key in path:
        if dataclasses.is_dataclass(value) and key in {f.name for f in dataclasses.fields(value)}:
            value = getattr(value, key)
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            return None
    return value


def _warn_settings_of_stages_left_off(data: dict) -> None:
    """A stage that is off unless enabled (langid, decontam, tokenize) given settings but no `enabled`: they
    do nothing (decontam.eval_sets alone leaves the eval sets in the data). An explicit enabled=false is a
    choice (a config file shared between runs), and says nothing."""
    defaults = PrepareConfig()
    for f in dataclasses.fields(PrepareConfig):
        section = data.get(f.name)
        stage_default = getattr(defaults, f.name)
        if not isinstance(section, dict) or getattr(stage_default, "enabled", True) or "enabled" in section:
            continue
        if section:
            keys = ", ".join(f"{f.name}.{k}" for k in section)
            warnings.warn(f"{keys} set, but the {f.name} stage is off ({f.name}.enabled defaults to false), so "
                          f"{'it does' if len(section) == 1 else 'they do'} nothing: add {f.name}.enabled=true to "
                          f"run it (or {f.name}.enabled=false to keep it off)", stacklevel=3)
