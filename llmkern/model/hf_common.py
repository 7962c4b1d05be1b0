"""What the Hugging Face importers (hf_gpt2, hf_llama, hf_phi3, hf_gemma3) share: reading a model's files (its
config.json and its safetensors weights, sharded or not), reading config.json's values with checks, and copying
tensors with a check of their shapes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch

from .config import LAYER_TYPES, GPTConfig
from .gpt import GPT


# What a Hugging Face model's weights file is called: model.safetensors (or a shard), or a sharded model's index
HF_INDEX_SUFFIX = ".safetensors.index.json"
HF_WEIGHTS_SUFFIXES = (".safetensors", HF_INDEX_SUFFIX)


def check_model_file(path: str) -> None:
    """An error when path is not a weights file (a folder, or nothing: then say if the folder holds shards)."""
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder; give the model.safetensors file in it (or one of its shards, or "
                         f"its model.safetensors.index.json)")
    if not os.path.isfile(path):
        index_path = os.path.join(os.path.dirname(os.path.abspath(path)), "model.safetensors.index.json")
        sharded = ("; the checkpoint there is sharded: give its model.safetensors.index.json or one of the files "
                   "it lists") if os.path.isfile(index_path) else ""
        raise FileNotFoundError(f"{path!r} does not exist{sharded}")


def read_hf_config(path: str) -> dict | None:
    """The config.json beside the weights file `path`, as a dict; None when there is none."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path!r} is not a readable JSON file: {err}") from err
    if not isinstance(hf_config, dict):
        raise ValueError(f"{config_path!r} must hold a JSON object, got {type(hf_config).__name__}")
    return hf_config


def load_model_file(path: str, family: str, config_from_hf: Callable[..., GPTConfig],
                    load_weights: Callable[[GPT, dict[str, torch.Tensor]], None], **overrides) -> GPT:
    """The GPT of a Hugging Face model.safetensors file (or any shard of a sharded checkpoint, or its index) whose
    config.json beside it is read by config_from_hf(hf_config, **overrides) and whose weights
    load_weights(model, state_dict) copies in. The config is read once (its warnings said once) and before the (slow) weights, so that a config
    the model cannot compute is said first."""
    check_model_file(path)
    hf_config = read_hf_config(path)
    if hf_config is None:
        raise ValueError(f"{path!r} has no config.json beside it; a {family} model's weights do not tell its head "
                         f"counts, RMSNorm eps or RoPE theta: put the model's config.json there")
    model = GPT(config_from_hf(hf_config, **overrides))
    load_weights(model, read_safetensors(path))
    return model


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of every shard when it is one of a sharded checkpoint's files or its
    model.safetensors.index.json (save_pretrained shards past max_shard_size: gpt2-xl in float32, say). One shard
    alone lacked some layers, and the error blamed the config.json ("another model's") or said it was not GPT-2's."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files, weight_map, index_path = _weights_files_and_map(path)
    state_dict = {}
    for file in files:
        try:
            state_dict.update(load_file(file))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file!r} is not a readable safetensors file: {err}") from err
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(state_dict))
        if absent:
            raise ValueError(f"{index_path!r} lists tensors that its shards lack: {first_names(absent)}")
    return state_dict


def weights_files(path: str) -> list[str]:
    """The files read_safetensors(path) reads: path itself, or every shard its folder's index lists when it is a
    shard or that index (what a fingerprint of the loaded weights must hash: the index holds only names)."""
    return _weights_files_and_map(path)[0]


def _weights_files_and_map(path: str) -> tuple[list[str], dict[str, str] | None, str]:
    """(files read_safetensors reads, the index's weight_map where they are its shards, the index's path); an
    error naming the index when it is unreadable or lists a shard that is not there."""
    folder = os.path.dirname(os.path.abspath(path))
    index_path = os.path.join(folder, "model.safetensors.index.json")
    files, weight_map = [path], None
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_path!r} is not a readable index of shards (a JSON object with a "
                             f"'weight_map'): {err!r}") from err
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index_path!r}: 'weight_map' must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        # a shard, or the index itself, names the whole model
        if os.path.basename(path) in shards or os.path.abspath(path) == index_path:
            files = [os.path.join(folder, shard) for shard in shards]
        else:  # a model.safetensors of its own beside the shards: read as it is
            weight_map = None
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file!r}, a shard that {index_path!r} lists, does not exist")
    return files, weight_map, index_path


def first_names(names: list[str]) -> str:
    """The first few names, and how many more: a list cut short without a count read as the whole list."""
    return f"{names[:5]}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def copy_into(dst: torch.Tensor, src: torch.Tensor, ours: str, theirs: str) -> None:
    """Copy HF's tensor `theirs` (src) into our `ours` (dst); an error naming both when the shapes differ."""
    if dst.shape != src.shape:
        raise ValueError(f"{theirs} has shape {tuple(src.shape)}; {ours} needs {tuple(dst.shape)}")
    dst.copy_(src)


def check_shape(src: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """src, HF's tensor `name`, when it has `shape`; an error naming it otherwise."""
    if src.shape != shape:
        raise ValueError(f"{name} has shape {tuple(src.shape)}; the model needs {tuple(shape)}")
    return src


def hf_int(hf_config: dict, name: str, default: int | None = None) -> int:
    """config.json's int `name`, >= 1; default when it is absent or null (None: it must be there)."""
    value = hf_config.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"config.json has no {name!r}")
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.json's {name} must be an int >= 1, got {value!r}")
    return value


def hf_number(hf_config: dict, name: str, default: float) -> float:
    """config.json's number `name`, > 0; default when it is absent."""
    value = hf_config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"config.json's {name} must be a number > 0, got {value!r}")
    return float(value)


def hf_layer_types(hf_config: dict, n_layer: int) -> list[str] | None:
    """config.json's layer_types (transformers 4.53 and later: each layer's "sliding_attention" or
    "full_attention"), checked; None when the file has none."""
    given = hf_config.get("layer_types")
    if given is None:
        return None
    if not isinstance(given, list) or len(given) != n_layer or any(kind not in LAYER_TYPES for kind in given):
        raise ValueError(f"config.json's layer_types must list one of {LAYER_TYPES} per layer "
                         f"(num_hidden_layers={n_layer}), got {given!r}")
    return list(given)
