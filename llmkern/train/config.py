"""TrainConfig: every setting of a pretraining run, from a TOML/JSON file plus `--key=value` overrides.

    cfg = load_config("run.toml", ["--lr=3e-4", "--model.n_layer=4"])

Values are checked against the dataclass field types; an unknown key or a value of the wrong type
is a ValueError naming the key. Files are parsed as data (tomllib / json), never executed.
`model.<field>` keys go to `TrainConfig.model`, the overrides of the model preset's GPTConfig.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SCHEDULES = ("cosine", "wsd")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("llmkern", "torch", "muon")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Every setting of a run. The defaults train a small model on the built-in corpus in about a minute
    on a CPU; `llmkern train` adds its main-job settings (llmkern/train/main_job.py) when no file is given."""

    # where and what
    out_dir: str = "runs/main"  # the run folder: checkpoints, metrics.jsonl, charts
    overwrite: bool = False  # a fresh start in a folder that holds a run replaces it (else: an error)
    preset: str = "tiny"  # a GPTConfig preset name
    model: dict[str, Any] = field(default_factory=dict)  # GPTConfig overrides, e.g. {"n_layer": 4}
    init_from: str = ""  # start from these weights instead of a fresh preset: a run or checkpoint folder, or a
    #                      Hugging Face GPT-2 or Llama-family model.safetensors (continued pretraining; data in its
    #                      tokenizer)
    data_dir: str = ""  # a folder with manifest.json; "" = the built-in stdlib corpus (llmkern.train.corpus)
    tokenizer: str = "bytes"  # for the built-in corpus: "bytes", "bpe:<N>" (trained on it), a tiktoken name or file
    corpus_max_bytes: int = 4_000_000  # cap on the built-in corpus

    # batch: batch_tokens = micro_batch * seq_len * grad_accum * world_size
    batch_tokens: int = 2048
    micro_batch: int = 16
    seq_len: int = 128

    # optimization
    max_steps: int = 200
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 20
    schedule: str = "cosine"  # "cosine" (warmup, cosine decay to min_lr) | "wsd" (warmup, stable, decay)
    decay_fraction: float = 0.2  # wsd: the last fraction of steps that decays linearly to min_lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    optimizer: str = "llmkern"  # "llmkern" (llmkern.optim.AdamW) | "torch" (torch.optim.AdamW, fused on GPU) |
    #                             "muon" (llmkern.optim.Muon for the blocks' matrices, each projection and expert
    #                             apart; llmkern's AdamW for the rest)
    muon_lr: float = 0.0  # optimizer=muon: Muon's peak lr, scheduled as lr is; 0 = lr (Muon's update is scaled to
    #                       AdamW's RMS, adjust_lr_fn="match_rms_adamw", so AdamW's lr suits it)
    muon_momentum: float = 0.95  # optimizer=muon: Muon's momentum (Nesterov)

    # evaluation, stopping, checkpoints
    eval_interval: int = 40  # evaluate at step 0, every N steps and at the end; 0 = only at the end
    eval_steps: int = 8  # held-out data per evaluation, in batches of batch_tokens tokens
    patience: int = 0  # stop after this many evaluations without a better val loss (eval_interval > 0); 0 = never
    ckpt_interval: int = 100  # checkpoint every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2  # the newest N step folders are kept
    max_bad_steps: int = 5  # stop after this many NaN/inf losses in a row
    # Packed rows hold several documents: with this on, a token attends only within its own
    # document (doc ids from the eot tokens, document-masked attention) and positions restart.
    document_masking: bool = False

    # execution
    device: str = "auto"  # "auto" (cuda when present) | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" = bf16 autocast on GPU, fp32 on CPU; "float16": fp16 autocast with dynamic
    #                      loss scaling (GPUs without bf16: V100, T4); "bfloat16", "float32"
    compile: bool = False
    # llmkern op backend: "auto" (llmkern's default: set_backend or LLMKERN_BACKEND, else the fastest here) | "cuda" |
    #   "triton" | "torch"
    backend: str = "auto"
    parallel: str = "ddp"  # under torchrun: "ddp" | "fsdp" (FSDP2 fully_shard)
    seed: int = 1337
    log_interval: int = 10
    progress: bool = True  # a tqdm progress bar and a line per evaluation (metrics.jsonl has every record either way)

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each rank, so that a step sees batch_tokens tokens."""
        per_micro = self.micro_batch * self.seq_len * world_size
        if self.batch_tokens % per_micro != 0:
            raise ValueError(
                f"batch_tokens must be a multiple of micro_batch * seq_len * world_size = "
                f"{self.micro_batch} * {self.seq_len} * {world_size} = {per_micro}; got {self.batch_tokens}"
            )
        return self.batch_tokens // per_micro

    @property
    def op_backend(self) -> str:
        """The backend the model and optimizer are given: for "auto", llmkern's default (set_backend, else
        LLMKERN_BACKEND, checked; else "auto"), so that the variable reaches a training run as it reaches every op
        called without a backend."""
        from .._backend import get_backend

        return get_backend() if self.backend == "auto" else self.backend

    def validate(self) -> "TrainConfig":
        """Check the settings that no type can; returns self. Values that passed already are not checked again:
        load_config validates, then the Trainer does, and each warning would be said twice."""
        if getattr(self, "_validated", None) == dataclasses.asdict(self):
            return self
        _check_field_types(self)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("parallel", self.parallel, PARALLEL)
        _one_of("backend", self.backend, ("auto", "cuda", "triton", "torch"))
        for name in ("batch_tokens", "micro_batch", "seq_len", "max_steps", "eval_steps", "keep_checkpoints",
                     "max_bad_steps", "log_interval", "corpus_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "patience", "ckpt_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range; else an error once the data is ready
            raise ValueError(f"seed must be in [0, 2**32 - 1], got {self.seed}")
        if not self.out_dir:  # "" would write the run's checkpoints and log into the current folder
            raise ValueError("out_dir must name the run folder, got ''")
        if not (0 < self.lr < math.inf and 0 <= self.min_lr <= self.lr):  # inf: every step NaN
            raise ValueError(f"need a finite lr > 0 and 0 <= min_lr <= lr; got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        self._check_schedule()
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not (self.grad_clip >= 0 and 0 <= self.weight_decay < math.inf):  # `not >=` also refuses NaN
            raise ValueError(f"grad_clip and weight_decay must be >= 0 (weight_decay finite); got {self.grad_clip}, "
                             f"{self.weight_decay}")
        self._check_muon()
        if self.patience and not self.eval_interval:
            raise ValueError(f"patience={self.patience} stops after evaluations without a better val loss, but "
                             f"eval_interval=0 evaluates only at the end: set eval_interval > 0, or patience=0")
        self._check_model()
        self._warn_unused()
        self.grad_accum_steps(1)
        self._validated = dataclasses.asdict(self)  # not a field: to_dict, ==, replace() leave it out
        return self

    def _check_muon(self) -> None:
        if not 0 <= self.muon_lr < math.inf:  # `not <=` also refuses NaN
            raise ValueError(f"muon_lr must be >= 0 and finite (0: the same as lr), got {self.muon_lr}")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        # parallel="fsdp" runs: Muon gathers each matrix's update from the ranks' shards to orthogonalize it whole
        # (llmkern.optim.muon), and refuses a DTensor sharded otherwise than FSDP2 shards it

    def effective_muon_lr(self) -> float:
        """Muon's peak learning rate: muon_lr, or lr when muon_lr is 0."""
        return self.muon_lr or self.lr

    def _check_schedule(self) -> None:
        """Schedule settings that contradict each other are refused. A run that ends within its warmup is not
        one of them: its steps are the first ones of a longer run (--resume with a higher max_steps continues
        that warmup exactly), and short trial runs keep the default warmup; it is said, not refused."""
        from .schedules import wsd_decay_steps

        if self.warmup_steps >= self.max_steps:
            if self.warmup_steps > self.max_steps:
                warnings.warn(f"warmup_steps={self.warmup_steps} is longer than max_steps={self.max_steps}: the run "
                              f"ends within its warmup, so the learning rate never reaches lr={self.lr:g} nor "
                              f"decays to min_lr (resume with a higher max_steps to go on)", stacklevel=3)
            return
        if self.schedule == "wsd":
            decay_steps = wsd_decay_steps(self.max_steps, self.decay_fraction)
            if self.warmup_steps + decay_steps > self.max_steps:  # wsd_lr would shorten the decay without a word
                raise ValueError(
                    f"schedule='wsd' decays over the last {decay_steps} steps (decay_fraction={self.decay_fraction} "
                    f"of max_steps={self.max_steps}), which begin before warmup_steps={self.warmup_steps} end: "
                    f"need warmup_steps + decay steps <= max_steps; lower decay_fraction to at most "
                    f"{(self.max_steps - self.warmup_steps) / self.max_steps:.4g} or warmup_steps to at most "
                    f"{self.max_steps - decay_steps}")

    def _check_model(self) -> None:
        """The model settings, now rather than once the data is ready: init_from takes the whole model from
        its weights; else the preset with the model overrides must make a GPTConfig that fits seq_len."""
        if self.init_from:
            if self.model:
                raise ValueError(f"init_from takes the model's shape from {self.init_from!r}; drop the model.* "
                                 f"settings {sorted(self.model)}")
            return
        from ..model import GPTConfig

        model = GPTConfig.from_preset(self.preset, **{"block_size": self.seq_len, "backend": self.op_backend,
                                                      **self.model})
        if model.block_size < self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} is longer than model.block_size={model.block_size}")
        if model.pos != "rope" and "rope_theta" in self.model:
            warnings.warn(f"model.rope_theta={self.model['rope_theta']} has no effect: the model of preset "
                          f"{self.preset!r} has pos={model.pos!r} (learned positions, no RoPE)", stacklevel=3)

    def _warn_unused(self) -> None:
        """Settings that the rest of the config leaves unread, when they differ from their default (a file
        shared between runs may hold them): said once, not refused."""
        default = TrainConfig()
        if self.schedule != "wsd" and self.decay_fraction != default.decay_fraction:
            warnings.warn(f"decay_fraction={self.decay_fraction} has no effect: only schedule='wsd' reads it "
                          f"(schedule={self.schedule!r})", stacklevel=3)
        if self.optimizer != "muon":
            for name in ("muon_lr", "muon_momentum"):
                if getattr(self, name) != getattr(default, name):
                    warnings.warn(f"{name}={getattr(self, name)} has no effect: only optimizer='muon' reads it "
                                  f"(optimizer={self.optimizer!r})", stacklevel=3)
        if self.init_from and self.preset != default.preset:
            warnings.warn(f"preset={self.preset!r} has no effect: init_from={self.init_from!r} gives the model",
                          stacklevel=3)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return apply_settings(cls(), values, source="config").validate()


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                defaults: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig's defaults updated by `defaults`, then by the file at `path` (.toml or .json), then by
    `--key=value` overrides."""
    config = apply_settings(TrainConfig(), defaults or {}, source="defaults")
    given: set[str] = set()  # the keys the file and the command line set (not the defaults)
    if path:
        values = read_config_file(path)
        config = apply_settings(config, values, source=path)
        given |= set(values)
    values = parse_overrides(overrides)
    config = apply_settings(config, values, source="command line", from_text=True)
    given |= set(values)
    config.validate()
    unread = sorted(given & {"tokenizer", "corpus_max_bytes"})
    if config.data_dir and unread:  # a file shared with built-in corpus runs may hold them
        warnings.warn(f"{' and '.join(unread)} set but not used: they are for the built-in corpus, and data_dir="
                      f"{config.data_dir!r} holds tokens already (in the tokenizer of its manifest)", stacklevel=2)
    return config


def read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        if path.endswith(".toml"):
            values = tomllib.loads(data.decode("utf-8"))
        elif path.endswith(".json"):
            values = json.loads(data)
        else:
            raise ValueError(f"config file must end in .toml or .json, got {path!r}")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse config file {path!r}: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a table/object of settings, got {type(values).__name__}")
    return values


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """["--lr=3e-4", "--model.n_layer=4"] -> {"lr": "3e-4", "model": {"n_layer": "4"}} (strings; typed later).
    A bare "--key" is "--key=true" (for a boolean setting such as --resume)."""
    values: dict[str, Any] = {}
    previous = None
    for item in overrides:
        if not item.startswith("--") or len(item) == 2:
            hint = (f"; write {previous}={item} (with '=', not a space)" if previous is not None and "=" not in previous
                    and item != "--" else "")
            raise ValueError(f"overrides must look like --key=value, got {item!r}{hint}")
        previous = item
        key, value = item[2:].split("=", 1) if "=" in item else (item[2:], _Bare("true"))
        key = key.replace("-", "_")
        if key.startswith("model."):
            values.setdefault("model", {})[key[len("model."):]] = value
        elif "." in key:
            raise ValueError(f"only model.<field> keys may be dotted, got {key!r}")
        else:
            values[key] = value
    return values


class _Bare(str):
    """The value of a bare "--key": "true" for a boolean setting, an error for any other (--out_dir alone
    would otherwise name a run folder "true")."""


def apply_settings(config: Any, values: dict[str, Any], source: str, from_text: bool = False) -> Any:
    """A copy of the dataclass `config` updated by `values`, each checked against the field's type;
    from_text: the values are command-line strings, to be parsed. Works for any settings dataclass
    (TrainConfig, the fine-tuning configs); a `model` field takes GPTConfig overrides."""
    hints = typing.get_type_hints(type(config))
    known = {f.name for f in dataclasses.fields(config)}
    updates: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown setting {key!r} in {source}; {hint}known settings: {', '.join(sorted(known))}")
        if key == "model":
            if not isinstance(value, dict):
                raise ValueError(f"setting 'model' in {source} must be a table of GPTConfig fields, got {value!r}")
            updates["model"] = {**config.model, **_typed_model_overrides(value, source, from_text)}
        else:
            updates[key] = _coerce(key, value, hints[key], source, from_text)
    return dataclasses.replace(config, **updates)


def _coerce(key: str, value: Any, hint: Any, source: str, from_text: bool) -> Any:
    """`value` as type `hint`: command-line strings are parsed; file values must have the type already."""
    def wrong(expected: str) -> ValueError:
        bare = f" (a bare --{key}, which only a true/false setting takes: give --{key}=VALUE)" if isinstance(
            value, _Bare) else ""
        return ValueError(f"setting {key!r} in {source} must be {expected}, got {value!r}{bare}")

    if isinstance(value, _Bare) and hint is str:  # "true" would pass as a string: --out_dir alone made ./true
        raise wrong("given a value")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise wrong("a boolean (true/false)")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise wrong("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise wrong("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise wrong("a string")
    if typing.get_origin(hint) is tuple:  # betas: tuple[float, float]
        # "0.9,0.95", or "[0.9, 0.95]" as --settings lists it
        items = value.strip().removeprefix("[").removesuffix("]").split(",") if from_text and isinstance(
            value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) != len(typing.get_args(hint)):
            raise wrong(f"{len(typing.get_args(hint))} numbers (a list, or comma-separated)")
        return tuple(_coerce(key, v, t, source, from_text) for v, t in zip(items, typing.get_args(hint)))
    raise TypeError(f"config field {key!r} has an unsupported type {hint!r}")


def _typed_model_overrides(values: dict[str, Any], source: str, from_text: bool) -> dict[str, Any]:
    """Check model.<field> keys against GPTConfig's fields and give them its types."""
    from ..model import GPTConfig

    hints = typing.get_type_hints(GPTConfig)
    typed = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            hint = f"did you mean 'model.{close[0]}'? " if close else ""
            raise ValueError(
                f"unknown model setting 'model.{key}' in {source}; {hint}GPTConfig fields: {', '.join(sorted(hints))}"
            )
        hint = hints[key]
        if typing.get_origin(hint) is typing.Union or type(hint).__name__ == "UnionType":
            options = [t for t in typing.get_args(hint) if t is not type(None)]
            if value is None or (from_text and isinstance(value, str) and value.lower() == "none"):
                typed[key] = None
                continue
            hint = options[0] if len(options) == 1 else hint
        if from_text and isinstance(value, str) and (hint is dict or typing.get_origin(hint) in (list, dict)):
            value = _parsed_container(f"model.{key}", value, hint, source)
        typed[key] = _coerce(f"model.{key}", value, hint, source, from_text) if hint in (bool, int, float, str) else value
    return typed


def _parsed_container(key: str, text: str, hint: Any, source: str) -> Any:
    """A list or table model setting given on the command line, which a file gives as a TOML array or table:
    a list as "1,3" or JSON "[1, 3]" (its items typed as the hint says), a table as a JSON object."""
    try:
        value = json.loads(text) if text.strip().startswith(("[", "{")) else None
    except json.JSONDecodeError:
        value = None
    if typing.get_origin(hint) is not list:
        if not isinstance(value, dict):
            raise ValueError(f"setting {key!r} in {source} must be a JSON object, such as "
                             f"'{{\"rope_type\": \"linear\", \"factor\": 2.0}}', got {text!r}")
        return value
    if value is None:
        value = [item.strip() for item in text.split(",") if item.strip()]
    if isinstance(value, list):
        (item_hint,) = typing.get_args(hint)
        return [_coerce(key, item, item_hint, source, from_text=True) for item in value]
    raise ValueError(f"setting {key!r} in {source} must be a list (comma-separated, or JSON), got {text!r}")


def _check_field_types(config: TrainConfig) -> None:
    """Each field of `config` has its annotated type, as apply_settings would have made it (ints become
    floats, a list of betas a tuple). A TrainConfig made in Python skips apply_settings, and its checks
    below would then compare a str with a number, or take overwrite="false" for true."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "model":
            if not isinstance(value, dict):
                raise ValueError(f"setting 'model' in TrainConfig must be a table of GPTConfig fields, got {value!r}")
            _typed_model_overrides(value, "TrainConfig", from_text=False)  # unknown keys and wrong types
        else:
            setattr(config, f.name, _coerce(f.name, value, hints[f.name], "TrainConfig", from_text=False))


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def describe_settings(config_cls: type, overrides: dict[str, Any] | None = None) -> str:
    """One line per field of a settings dataclass (TrainConfig, a fine-tuning recipe's config): the name, its
    default (overrides' value where given) and the comment its source gives it (its trailing comment, else
    the comment block over it), a base class's fields first. The comments are the documentation, so they are
    read from the source rather than repeated here."""
    import inspect
    import re

    field_line = re.compile(r"\s+(\w+)\s*:[^=#]+(?:=[^#]*)?(?:#\s?(.*))?$")
    continued = re.compile(r"\s+#\s{3,}(.*)$")  # "#" then an indent: the comment of the line above goes on
    comments: dict[str, str] = {}
    for cls in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):  # no source (a frozen install): names and defaults only
            continue
        above: list[str] = []
        last = None
        for line in lines:
            stripped = line.strip()
            more, match = continued.match(line), field_line.match(line)
            if more and last is not None:
                comments[last] += " " + more.group(1).strip()
            elif stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                last = None
            elif match and not stripped.startswith(("def ", "return ", "@")):
                last = match.group(1)
                block = " ".join(above)
                # a one- or two-word block is a section's title ("# optimization"), not the field's documentation
                text = (match.group(2) or (block if len(block.split()) > 2 else "")).strip()
                if text or last not in comments:  # a subclass's new default keeps its base's documentation
                    comments[last] = text
                above = []
            else:
                above, last = [], None
    out = []
    for f in dataclasses.fields(config_cls):
        if overrides and f.name in overrides:
            default = overrides[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()  # type: ignore[misc]
        comment = f"    # {comments[f.name]}" if comments.get(f.name) else ""
        # TOML, so that the listing (or a part of it) is a config file again; None has no TOML spelling
        setting = f"# {f.name} = none" if default is None else f"{f.name} = {toml_value(default)}"
        out.append(f"  {setting}{comment}")
    return "\n".join(out)


def toml_value(value: Any) -> str:
    """`value` (a bool, number, string, or a list, tuple or dict of them) spelled as TOML reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string (\uXXXX escapes included)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML spelling for {type(value).__name__} {value!r}")
