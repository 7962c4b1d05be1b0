"""A GPT as a Hugging Face model folder that transformers' AutoModelForCausalLM.from_pretrained and vLLM load:
config.json, generation_config.json, the weights as save_pretrained names them (model.safetensors, or
model-00001-of-0000N.safetensors shards and model.safetensors.index.json past max_shard_bytes), and the
tokenizer's files: a Hugging Face tokenizer.json's copied, a tiktoken or byte tokenizer's written as one
(llmkern.data.hf_tokenizer_export). A fine-tuned run's folder prompts as the run was trained: tokenizer_config.json
has its prompt format's chat template (or the tokenizer's own, where that one prompts alike), and
generation_config.json's eos_token_id lists the format's end marker beside end-of-text.

The weights and config.json come from the exporters (to_hf_gpt2, to_hf_llama, to_hf_phi3, to_hf_gemma3,
to_hf_gemma2), each of which refuses a model its format cannot express, saying why. The folder is written under a
temporary name beside the target and renamed at the end, so a failure never leaves a half-written folder under
the target's name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import torch

from .._atomic import write_folder_atomic
from .config import GPTConfig
from .gpt import GPT

FAMILIES = ("gpt2", "llama", "phi3", "gemma3", "gemma2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # save_pretrained's "5GB"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# How far recorded_hf_source follows a run back to the run it started from, and that one to its own start
_MAX_ORIGINS = 16


def parse_size(size: int | str) -> int:
    """Bytes of a size as save_pretrained's max_shard_size takes it: an int, or a string such as "5GB" (10**9
    bytes), "500MB", "2GiB" (2**30) or "1000"."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"max_shard_size must be an int of bytes or a string such as '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        if match is None or match.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"max_shard_size must be a number of bytes with a unit of {list(_SIZE_UNITS)[1:]} "
                             f"(e.g. '5GB'), got {size!r}")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if value < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, got {size!r}")
    return value


def family_of_config(config: GPTConfig) -> str:
    """The Hugging Face family a GPTConfig reads as: GPT-2's (learned positions, LayerNorm); among RoPE and RMSNorm
    models, Gemma's (sandwich norms, GeGLU, a scaled embedding: Gemma 3's with QK-norm, else Gemma 2's), Phi-3's
    (RoPE on part of each head, or longrope), else Llama's (which to_hf_llama writes as Llama, Mistral, Qwen2, Qwen3,
    Mixtral or Qwen3-MoE by the config)."""
    if config.pos == "learned" and config.norm == "layernorm":
        return "gpt2"
    if config.pos == "rope" and config.norm == "rmsnorm":
        if config.post_norms or config.mlp == "geglu" or config.embed_scale is not None:
            return "gemma3" if config.qk_norm else "gemma2"
        longrope = config.rope_scaling is not None and config.rope_scaling.get("rope_type") == "longrope"
        return "phi3" if config.rope_dim is not None or longrope else "llama"
    raise ValueError(f"no Hugging Face format here holds a model with pos={config.pos!r} and norm={config.norm!r}: "
                     f"GPT-2's has learned positions and LayerNorm, the others RoPE and RMSNorm")


def family_of_source(source: str | None) -> str | None:
    """The family of a run's recorded source ("hf-gpt2", "hf-llama", "hf-phi3", "hf-gemma3", "hf-gemma2"); None for
    no source or another one."""
    family = source.removeprefix("hf-") if isinstance(source, str) and source.startswith("hf-") else None
    return family if family in FAMILIES else None


def recorded_hf_source(meta: dict) -> str | None:
    """The "hf-..." source label of the Hugging Face model a run started from (see
    llmkern.train.inference.hf_source), by its checkpoint meta: the meta's own "source", else the start it records
    (a fine-tuning run's finetune.base, a pretraining run's config.init_from), followed back through llmkern runs to
    a .safetensors file whose config.json is still beside it. None where the run started from no Hugging Face model,
    or its start can no longer be read."""
    from ..train.inference import hf_source, is_hf_source
    from .hf_common import HF_WEIGHTS_SUFFIXES, read_hf_config

    for _ in range(_MAX_ORIGINS):
        if is_hf_source(meta):
            return meta["source"]
        if family_of_source(meta.get("hf_source")) is not None:  # recorded at save (with_hf_source)
            return meta["hf_source"]
        origin = _origin(meta)
        if origin is None:
            return None
        if origin.endswith(HF_WEIGHTS_SUFFIXES):
            if not os.path.isfile(origin):
                return None
            try:
                hf_config = read_hf_config(origin)
            except ValueError:
                return None
            return hf_source("gpt2" if hf_config is None else str(hf_config.get("model_type", "gpt2")))
        meta = checkpoint_meta(origin)
        if meta is None:
            return None
    return None


def with_hf_source(meta: dict) -> dict:
    """meta, plus "hf_source": recorded_hf_source(meta) where the run descends from a Hugging Face model. A run
    records it when it saves, while the file it started from is still where its meta says, so that an export
    later finds the family even after that file has moved. The key is not "source": that one marks a model
    read from a Hugging Face file itself (llmkern.train.inference.load_gpt), whose tokenizer no meta names."""
    source = recorded_hf_source(meta)
    return meta if source is None else {**meta, "hf_source": source}


def _origin(meta: dict) -> str | None:
    """The model a run's checkpoint meta says it started from: a fine-tuning run's base, a pretraining run's
    init_from; None for a run from scratch."""
    for section, key in (("finetune", "base"), ("config", "init_from")):
        part = meta.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str) and part[key]:
            return part[key]
    return None


def checkpoint_meta(path: str) -> dict | None:
    """The meta.json of a checkpoint folder, or of a run folder's newest checkpoint, without its tensors; None
    where there is none or it is no JSON object."""
    from ..train.checkpoint import latest_checkpoint

    if not os.path.isdir(path):
        return None
    if not os.path.isfile(os.path.join(path, "meta.json")):
        path = latest_checkpoint(path)
        if path is None:
            return None
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def resolve_dtype(dtype: str | torch.dtype | None, model: GPT) -> torch.dtype:
    """The dtype to write: `dtype` (a name of DTYPES or a torch.dtype among them), or the model's own for None."""
    if dtype is None:
        dtype = model.wte.weight.dtype
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return dtype


def hf_state_and_config(model: GPT, family: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(the HF ForCausalLM state dict, its config.json as a dict) of `model` in `family`'s format, by that family's
    exporter; a ValueError saying why when the format cannot express the model."""
    from . import hf

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    try:
        if family == "gpt2":
            return hf.to_hf_gpt2(model), hf.hf_gpt2_config(model.config)
        exporter = {"llama": hf.to_hf_llama, "phi3": hf.to_hf_phi3, "gemma3": hf.to_hf_gemma3,
                    "gemma2": hf.to_hf_gemma2}[family]
        return exporter(model)
    except ValueError as err:
        raise ValueError(f"the model cannot be written in the {family} format: {err}") from err


def hf_weights(state: dict[str, torch.Tensor], hf_config: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors to write, as save_pretrained writes them: of `dtype`, contiguous, on the CPU, and without a tied
    lm_head.weight (transformers ties it to the embeddings on loading; safetensors refuses a tensor stored twice)."""
    tied = hf_config.get("tie_word_embeddings", True)  # transformers' default where a config has no key
    return {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in state.items()
            if not (tied and name == "lm_head.weight")}


def plan_shards(weights: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """The tensor names of each shard, as save_pretrained splits a state dict: in order, a shard closed when the
    next tensor would take it past max_shard_bytes, and a tensor larger than that alone in a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, tensor in weights.items():
        size = tensor.numel() * tensor.element_size()
        if size > max_shard_bytes:
            shards.append([name])
            continue
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current or not shards:
        shards.append(current)
    return shards


def shard_file_names(count: int) -> list[str]:
    """save_pretrained's weight file names: model.safetensors alone, or model-00001-of-0000N.safetensors."""
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_weights(folder: str, weights: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """The weights in folder as save_pretrained writes them (shards and index past max_shard_bytes); the names of
    the files written."""
    from safetensors.torch import save_file

    shards = plan_shards(weights, max_shard_bytes)
    names = shard_file_names(len(shards))
    for file_name, shard in zip(names, shards):
        save_file({name: weights[name] for name in shard}, os.path.join(folder, file_name), metadata={"format": "pt"})
    if len(shards) == 1:
        return names
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values()),
                          "total_parameters": sum(t.numel() for t in weights.values())},
             "weight_map": {name: file_name for file_name, shard in zip(names, shards) for name in shard}}
    _write_json(os.path.join(folder, INDEX_NAME), index)
    return names + [INDEX_NAME]


def generation_ids(tokenizer_spec: str | None, prompt_format=None) -> dict[str, int | list[int] | None]:
    """{"bos_token_id", "eos_token_id"} of a tokenizer spec for generation_config.json; {} for no spec. bos_token_id
    is None (null) for a tokenizer without one: left out, transformers would take its config class's default
    (Llama's 1, GPT-2's 50256), an id the model never saw as a start, or past a small vocabulary. eos_token_id is
    end-of-text's id, or [end-of-text's, the end marker's] where the run's prompt format (a
    llmkern.finetune.templates.PromptFormat; None for a run not fine-tuned) ends a response with a marker that is
    another special token of the tokenizer (<|im_end|>, <|eot_id|>, ...): generate() and vLLM stop at any id of
    the list, as Llama 3's generation_config.json lists <|eot_id|>. config.json keeps end-of-text's id alone
    (model_ids)."""
    if tokenizer_spec is None:
        return {}
    from ..data.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(tokenizer_spec)
    markers = () if prompt_format is None else prompt_format.stop_token_ids(tokenizer)
    eos = [tokenizer.eot_token, *(i for i in markers if i != tokenizer.eot_token)]
    return {"eos_token_id": eos if len(eos) > 1 else eos[0], "bos_token_id": tokenizer.bos_token}


def model_ids(ids: dict[str, int | list[int] | None]) -> dict[str, int | None]:
    """generation_ids as config.json takes them: the first end-of-sequence id alone (end-of-text's). transformers
    takes a list there too (Llama 3.1's config.json has one), but generation reads generation_config.json's, which
    has the list, and code that reads config.eos_token_id as one id keeps working."""
    eos = ids.get("eos_token_id")
    return {**ids, "eos_token_id": eos[0]} if isinstance(eos, list) else dict(ids)


# A user turn to tell what prompts a tokenizer's own chat template writes (words no template has)
_PROBE_INSTRUCTION = "Name three primes."


def own_chat_template(tokenizer_spec: str) -> str | None:
    """The chat template of a Hugging Face tokenizer.json spec's tokenizer_config.json (its "default" one where it
    names several); None where it has none, or the spec is no tokenizer.json."""
    from ..data.tokenizer import hf_config_path, is_hf_tokenizer_json

    config = _read_json_object(hf_config_path(tokenizer_spec)) if is_hf_tokenizer_json(tokenizer_spec) else None
    template = None if config is None else config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: apply_chat_template's default is "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def prompts_as_trained(chat_template: str, prompt_format, special_tokens: dict[str, str],
                       starts_with_bos: bool) -> bool:
    """Whether a chat template prompts a model as it was fine-tuned in prompt_format: rendered for one user turn
    with the generation prompt (special_tokens: its variables, bos_token, eos_token, ...), it is the format's prompt
    exactly, after special_tokens["bos_token"] where every sequence starts with it (starts_with_bos) and with none
    where none does. Exactly: a family template that adds a default system turn (Qwen2.5's "You are Qwen...", Llama
    3.1's date) would prompt a run fine-tuned without one otherwise than it learned. A template that fails to render
    does not."""
    import jinja2

    from ..finetune.templates import render_chat_template

    probe = {"instruction": _PROBE_INSTRUCTION}
    try:
        rendered = render_chat_template(chat_template, [{"role": "user", "content": _PROBE_INSTRUCTION}], True,
                                        **special_tokens)
    except (jinja2.TemplateError, TypeError, ValueError):
        return False
    bos = special_tokens.get("bos_token")
    if starts_with_bos:
        if not (bos and rendered.startswith(bos)):
            return False
        rendered = rendered[len(bos):]
    return rendered == str(prompt_format.prompt(probe))


def chat_template_choice(tokenizer_spec: str | None, prompt_format) -> tuple[str | None, str]:
    """(the "chat_template" to write into tokenizer_config.json, or None to leave the tokenizer's files as they
    are; a line saying which chat template the folder has). A run fine-tuned in prompt_format (a PromptFormat)
    gets the format's own (PromptFormat.chat_template), unless its tokenizer's tokenizer_config.json has a chat
    template that prompts as the run was trained (prompts_as_trained): that one is kept (it may know more: tools,
    other roles). A run not fine-tuned (prompt_format None) gets none of its own."""
    from ..data.tokenizer import get_tokenizer

    if tokenizer_spec is None or prompt_format is None:
        return None, ""
    tokenizer = get_tokenizer(tokenizer_spec)
    ours = prompt_format.chat_template(tokenizer.bos_token is not None)
    label = f"llmkern's {prompt_format.template!r} template"
    own = own_chat_template(tokenizer_spec)
    if own is None:
        return ours, f"chat template: {label}, the run's prompt format"
    if prompts_as_trained(own, prompt_format, _config_special_tokens(tokenizer_spec), tokenizer.bos_token is not None):
        return None, f"chat template: the tokenizer's own, which prompts as the run was fine-tuned ({label})"
    return ours, (f"chat template: {label}, the run's prompt format, in place of the tokenizer's own, which prompts "
                  f"otherwise")


def _config_special_tokens(tokenizer_spec: str) -> dict[str, str]:
    """The special tokens a chat template reads (bos_token, eos_token, ...), as transformers passes them: the names
    tokenizer_config.json gives (a string, or an AddedToken's {"content": ...}); the ones it leaves out, out."""
    from ..data.tokenizer import hf_config_path

    config = _read_json_object(hf_config_path(tokenizer_spec)) or {}
    names = {}
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            names[key] = value
    return names


def _read_json_object(path: str) -> dict | None:
    """The JSON object in a file; None where there is no such file, or it holds no JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def write_tokenizer(folder: str, tokenizer_spec: str | None, model_max_length: int | None = None,
                    prompt_format=None) -> list[str]:
    """The tokenizer's files in folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json); the names
    written. A Hugging Face tokenizer.json spec's are copied (a tokenizer_config.json naming its end-of-text and
    begin-of-sequence tokens where there is none); a tiktoken or "bytes" spec's are written from its ranks
    (llmkern.data.hf_tokenizer_export), with model_max_length (the model's block_size) in tokenizer_config.json, or
    none, with a warning saying why, where no tokenizer.json can give tiktoken's ids. prompt_format: the prompt
    format (a llmkern.finetune.templates.PromptFormat) the run was fine-tuned in, None for none: tokenizer_config.json
    gets its chat template where chat_template_choice says so."""
    from ..data.tokenizer import get_tokenizer, hf_config_path, is_hf_tokenizer_json

    if tokenizer_spec is None:
        return []
    chat_template, _ = chat_template_choice(tokenizer_spec, prompt_format)
    if not is_hf_tokenizer_json(tokenizer_spec):
        try:
            return _write_tiktoken_as_hf(folder, get_tokenizer(tokenizer_spec), model_max_length, chat_template)
        except ValueError as err:  # a split pattern that `tokenizers` reads otherwise: the model is still of use
            warnings.warn(f"no tokenizer files written: {err}", stacklevel=3)
            return []
    written = ["tokenizer.json"]
    shutil.copyfile(tokenizer_spec, os.path.join(folder, "tokenizer.json"))
    config_path = hf_config_path(tokenizer_spec)
    tokenizer = get_tokenizer(tokenizer_spec)
    if os.path.isfile(config_path) and chat_template is None:
        shutil.copyfile(config_path, os.path.join(folder, "tokenizer_config.json"))
    else:
        config = _read_json_object(config_path) if os.path.isfile(config_path) else None
        if config is None:  # AutoTokenizer reads the tokens that end and begin a text from here
            config = {"tokenizer_class": "PreTrainedTokenizerFast",
                      "eos_token": tokenizer.backend.id_to_token(tokenizer.eot_token)}
        if tokenizer.bos_token is not None and config.get("bos_token") is None:
            # the chat template starts with {{ bos_token }}: the token llmkern starts every sequence with
            config["bos_token"] = tokenizer.backend.id_to_token(tokenizer.bos_token)
        if chat_template is not None:
            config["chat_template"] = chat_template
        _write_json(os.path.join(folder, "tokenizer_config.json"), config)
    written.append("tokenizer_config.json")
    special_map = os.path.join(os.path.dirname(tokenizer_spec), "special_tokens_map.json")
    if os.path.isfile(special_map):
        shutil.copyfile(special_map, os.path.join(folder, "special_tokens_map.json"))
        written.append("special_tokens_map.json")
    return written


def _write_tiktoken_as_hf(folder: str, tokenizer, model_max_length: int | None,
                          chat_template: str | None = None) -> list[str]:
    """A tiktoken or byte tokenizer as tokenizer.json, tokenizer_config.json (with chat_template where given) and
    special_tokens_map.json."""
    from ..data.hf_tokenizer_export import (
        special_token_names,
        tiktoken_to_hf_tokenizer_json,
    )

    data = tiktoken_to_hf_tokenizer_json(tokenizer)
    eos, bos = special_token_names(tokenizer)
    special = {"eos_token": eos, **({"bos_token": bos} if bos is not None else {})}
    # clean_up_tokenization_spaces would take spaces out before punctuation on decoding: tiktoken keeps them
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
    # compact: a vocab of 200k tokens indented one a line is a file of many MB more
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    _write_json(os.path.join(folder, "tokenizer_config.json"), config)
    _write_json(os.path.join(folder, "special_tokens_map.json"), special)
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def check_out_dir(out_dir: str, force: bool = False) -> None:
    """An error when out_dir cannot take the folder: a file, or a folder with files in it (unless force)."""
    if not isinstance(out_dir, str) or not out_dir:
        raise ValueError(f"out_dir must name a folder, got {out_dir!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir!r} is a file, not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise FileExistsError(f"{out_dir!r} already holds files; give another folder, or force=True (--force) to "
                              f"replace it")


def save_hf_folder(model: GPT, out_dir: str, family: str | None = None, dtype: str | torch.dtype | None = None,
                   max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES, tokenizer_spec: str | None = None,
                   force: bool = False, prompt_format=None) -> list[str]:
    """Write `model` to out_dir as a Hugging Face model folder; the paths of the files written, in out_dir.

    family: one of FAMILIES, or None for family_of_config's. dtype: the weights' ("float32", "bfloat16",
    "float16", or a torch.dtype of those; None: the model's own). max_shard_bytes: past it, the weights are split
    into shards with an index, as save_pretrained's max_shard_size (an int, or a string such as "5GB").
    tokenizer_spec: the model's tokenizer (llmkern.data.tokenizer's specs): its end-of-text and begin-of-sequence
    ids go into config.json and generation_config.json, and its files are written beside (write_tokenizer).
    prompt_format: the llmkern.finetune.templates.PromptFormat the model was fine-tuned in (None: not fine-tuned):
    its chat template goes into tokenizer_config.json (chat_template_choice), and its end marker, where it is a
    special token of the tokenizer, into generation_config.json's eos_token_id beside end-of-text.
    An out_dir with files in it is refused unless force, and then replaced whole. The folder is written under a
    temporary name beside out_dir and renamed: a failure leaves out_dir as it was."""
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a llmkern GPT, got {type(model).__name__}")
    max_shard_bytes = parse_size(max_shard_bytes)
    dtype = resolve_dtype(dtype, model)
    check_out_dir(out_dir, force)
    state, hf_config = hf_state_and_config(model, family or family_of_config(model.config))
    ids = generation_ids(tokenizer_spec, prompt_format)
    dtype_name = str(dtype).removeprefix("torch.")
    # transformers before 4.56 reads "torch_dtype", later ones "dtype" (and write it so)
    hf_config = {**hf_config, **model_ids(ids), "torch_dtype": dtype_name, "dtype": dtype_name}
    weights = hf_weights(state, hf_config, dtype)
    del state

    with write_folder_atomic(out_dir) as tmp:
        names = write_weights(tmp, weights, max_shard_bytes)
        _write_json(os.path.join(tmp, "config.json"), hf_config)
        _write_json(os.path.join(tmp, "generation_config.json"), ids)
        names += ["config.json", "generation_config.json"] + write_tokenizer(tmp, tokenizer_spec,
                                                                               model.config.block_size, prompt_format)
    out_dir = os.path.abspath(out_dir)
    return [os.path.join(out_dir, name) for name in names]


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
