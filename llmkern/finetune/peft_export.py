"""LoRA adapters as a PEFT adapter folder, for the Hugging Face model a run's base was exported as (or imported from).

    save_peft_adapter(model, "adapter", family="llama", base_model_name_or_path="Qwen/Qwen3-0.6B")
    save_peft_adapter_from_run("runs/sft", "adapter")   # a LoRA run's lora.safetensors and its model config

The folder holds adapter_config.json (peft_type "LORA", r, lora_alpha, target_modules, ...) and
adapter_model.safetensors, whose keys are "base_model.model.<HF module>.lora_A.weight" (r, in) and
".lora_B.weight" (out, r): what `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)` and
vLLM's LoRA loading read. Written from a run (save_peft_adapter_from_run, `llmkern export --peft`), it holds the
run's tokenizer files too, with its chat template, as the merged model's folder does. PEFT adds lora_alpha / r * B @ A
to each target module's weight, as llmkern's LoRALinear does.

llmkern's linear layers are not HF's modules: our attn.qkv is HF's q_proj, k_proj and v_proj stacked by rows, our
mlp.gate_up is gate_proj and up_proj, GPT-2's Conv1D layers hold their weight transposed, and Phi-3 keeps both
fused. The exporters (llmkern.model.hf_*) know that mapping; so rather than restate it per family, each adapted
linear's place in HF's model is read off the exporter: a model whose weight holds a distinct label per element is
exported, and the label found at each HF element says which of our rows and columns went there. Where an HF module
takes rows R and columns C of our weight W, its share of the update, (scale * B @ A)[R][:, C], is exactly
scale * B[R] @ A[:, C]: the same A with columns C, B's rows R, the same rank and alpha. An exporter that changes the
values (a scale, a cast) or places elements in a way no such (R, C) describes is refused, naming the layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn

from ..model.config import GPTConfig
from ..model.gpt import GPT
from .lora import (
    LORA_KEYS,
    check_lora_args,
    lora_layers,
    read_lora_adapters,
    trained_state_dict,
)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's name for the wrapped ForCausalLM model
LORA_FILE = "lora.safetensors"  # where save_and_merge_lora writes a run's adapters


@dataclass
class Destination:
    """Where one of our linear weights went in HF's model: module `module` (its weight's name less ".weight")
    holds our rows `rows` and columns `cols` (HF's (out, in) weight is W[rows][:, cols]); transposed: HF stores
    that weight as (in, out), GPT-2's Conv1D, which PEFT adapts with fan_in_fan_out."""

    module: str
    rows: torch.Tensor  # (out_hf,) int64
    cols: torch.Tensor  # (in_hf,) int64
    transposed: bool


@dataclass
class Adapters:
    """LoRA adapters of a GPT: {our module name: (A (r, in), B (out, r))}, one rank, alpha and dropout for all."""

    config: GPTConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float
    dropout: float


# --- the two ways in: a model with LoRA layers, a LoRA run's folder ------------------------------------------------

def save_peft_adapter(model: GPT, out_dir: str, family: str | None = None,
                      base_model_name_or_path: str | None = None, dtype: str | torch.dtype | None = None,
                      force: bool = False) -> list[str]:
    """Write the LoRA adapters of `model` (a GPT wrapped by apply_lora; merged layers too) to out_dir as a PEFT
    adapter folder for the Hugging Face model that `family`'s exporter writes of its base; the paths written.

    family: one of llmkern.model.hf_save.FAMILIES, or None for the one the model's config reads as (family_of_config).
    base_model_name_or_path: the HF model the adapter goes on (a hub name or a folder), written into
    adapter_config.json for AutoPeftModelForCausalLM; None writes null (PeftModel.from_pretrained(base, folder)
    needs none). dtype: the adapters' ("float32", "bfloat16", "float16"; None: their own). An out_dir with files in
    it is refused unless force, and then replaced whole; the folder is written under a temporary name and renamed.
    A model whose other parameters train too (a head, a block trained in full) is refused: PEFT's adapter would
    leave them out."""
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a llmkern GPT with LoRA layers, got {type(model).__name__}")
    return write_peft_folder(adapters_of_model(model), out_dir, family, base_model_name_or_path, dtype, force)


def save_peft_adapter_from_run(run: str, out_dir: str, family: str | None = None,
                               base_model_name_or_path: str | None = None, dtype: str | torch.dtype | None = None,
                               force: bool = False) -> list[str]:
    """save_peft_adapter of a LoRA fine-tuning run (its folder, or a checkpoint folder in it): the adapters of its
    lora.safetensors on the model its checkpoint's model_config describes. family None: the Hugging Face family
    the run started from (its recorded source), else the one its config reads as. The run's tokenizer files go
    beside the adapter, with the chat template of the prompt format it was fine-tuned in (as `llmkern export`
    writes them into a model folder): a server that loads an adapter with its own tokenizer (vLLM's LoRA
    requests) then prompts as the run was trained."""
    from ..model.hf_save import checkpoint_meta, family_of_source, recorded_hf_source
    from .templates import trained_prompt_format

    meta = checkpoint_meta(run)
    if meta is None or not isinstance(meta.get("model_config"), dict):
        raise ValueError(f"run {run!r} holds no llmkern checkpoint with a model_config (give a fine-tuning run's "
                         f"folder or one of its checkpoint folders)")
    _refuse_scoring_run(run, meta)
    adapters = read_run_adapters(_run_lora_file(run), GPTConfig.from_dict(meta["model_config"]))
    family = family or family_of_source(recorded_hf_source(meta))
    tokenizer = RunTokenizer(_run_tokenizer_spec(run), trained_prompt_format(meta), adapters.config.block_size)
    return write_peft_folder(adapters, out_dir, family, base_model_name_or_path, dtype, force, tokenizer)


def _run_tokenizer_spec(run: str) -> str | None:
    """The tokenizer spec the run loads with, as `llmkern export` reads it for the merged folder: meta.json's
    names a file that may have been retrained or moved since, in which case the run folder's copy stands in
    (llmkern.train.checkpoint), so that both folders carry the tokenizer the run was trained with."""
    from ..train import checkpoint as ckpt

    return ckpt.load_checkpoint_without_weights(run, rank=0).meta.get("tokenizer")


def adapters_of_model(model: GPT) -> Adapters:
    """The Adapters of a GPT's LoRA layers; a ValueError when it has none, when they differ in rank, alpha or dropout
    (one adapter_config.json holds one of each), or when other parameters train beside them."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers; apply_lora(model, ...) and train it first")
    _refuse_other_trained(set(trained_state_dict(model)) - {f"{name}.{key}" for name in layers for key in LORA_KEYS})
    settings = {(layer.rank, layer.alpha, _dropout_p(layer.dropout)) for layer in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"the model's LoRA layers differ in (rank, alpha, dropout): {sorted(settings)}; a PEFT "
                         f"adapter here holds one of each")
    (rank, alpha, dropout), = settings
    weights = {name: (layer.lora_A.detach(), layer.lora_B.detach()) for name, layer in layers.items()}
    return Adapters(model.config, weights, rank, alpha, dropout)


def read_run_adapters(path: str, config: GPTConfig) -> Adapters:
    """The Adapters of a lora.safetensors file (save_lora_adapters') on a GPT of `config`: rank from the tensors,
    alpha and dropout from the file's info."""
    tensors, info = read_lora_adapters(path)
    _refuse_other_trained({key for key in tensors if key.rsplit(".", 1)[-1] not in LORA_KEYS})
    names = {key.rsplit(".", 1)[0] for key in tensors}
    if not names:
        raise ValueError(f"{path!r} holds no LoRA adapters")
    missing = sorted(f"{name}.{key}" for name in names for key in LORA_KEYS if f"{name}.{key}" not in tensors)
    if missing:
        raise ValueError(f"{path!r} lacks {missing}: each adapted layer needs both lora_A and lora_B")
    weights = {name: (tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]) for name in sorted(names)}
    ranks = {a.shape[0] for a, _ in weights.values()}
    if len(ranks) > 1:
        raise ValueError(f"{path!r} holds adapters of ranks {sorted(ranks)}; a PEFT adapter here holds one rank")
    alpha, dropout = info.get("alpha"), info.get("dropout", 0.0)
    if alpha is None:
        raise ValueError(f"{path!r} does not record the LoRA alpha (its metadata's info has no 'alpha'); the "
                         f"update's scale alpha / rank cannot be told")
    rank = ranks.pop()
    check_lora_args(rank, alpha, dropout)
    return Adapters(config, weights, rank, float(alpha), float(dropout))


def _run_lora_file(run: str) -> str:
    """The lora.safetensors of a run folder, or of the run folder a checkpoint folder is in."""
    from ..train.checkpoint import checkpoints_dir

    folders = [run]
    # a checkpoint folder is run/checkpoints/step_N (checkpoint.step_dir): its run is two levels up
    parent = os.path.dirname(os.path.abspath(run))
    if checkpoints_dir(os.path.dirname(parent)) == parent:
        folders.append(os.path.dirname(parent))
    for folder in folders:
        path = os.path.join(folder, LORA_FILE)
        if os.path.isfile(path):
            return path
    raise ValueError(f"run {run!r} has no {LORA_FILE}: it was not fine-tuned with LoRA (--lora_rank > 0), or the "
                     f"file was moved")


def _refuse_scoring_run(run: str, meta: dict) -> None:
    from .base import SCORING_METHODS

    finetune = meta.get("finetune")
    method = finetune.get("method") if isinstance(finetune, dict) else None
    if method in SCORING_METHODS:
        raise ValueError(f"{run!r} is a {method!r} run: a GPT body under a scoring head, which no Hugging Face "
                         f"causal-LM adapter holds; export an SFT/DPO/PPO/GRPO run's adapters")


def _refuse_other_trained(names: set[str]) -> None:
    if names:
        raise ValueError(f"parameters beside the LoRA adapters trained too ({sorted(names)[:5]}, {len(names)} in "
                         f"all); a PEFT adapter would leave them out: export the merged model instead "
                         f"(llmkern export)")


def _dropout_p(dropout: nn.Module) -> float:
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


# --- the mapping, read off the exporter --------------------------------------------------------------------------

def peft_weights(adapters: Adapters, family: str) -> tuple[dict[str, torch.Tensor], list[str], bool]:
    """(adapter_model.safetensors' tensors, target_modules, fan_in_fan_out) of `adapters` on the HF model of
    `family`'s exporter."""
    model = _meta_model(adapters.config)
    _check_adapter_shapes(model, adapters)
    places = _destinations(model, family, list(adapters.weights))
    tensors, adapted = {}, {}
    for name, (lora_a, lora_b) in adapters.weights.items():
        for dest in places[name]:
            if dest.module in adapted:
                raise ValueError(f"HF module {dest.module!r} takes weights of both {adapted[dest.module]!r} and "
                                 f"{name!r}; PEFT adapts a module with one A and one B")
            adapted[dest.module] = name
            tensors[f"{PEFT_PREFIX}{dest.module}.lora_A.weight"] = lora_a[:, dest.cols].contiguous()
            tensors[f"{PEFT_PREFIX}{dest.module}.lora_B.weight"] = lora_b[dest.rows].contiguous()
    layouts = {dest.transposed for dests in places.values() for dest in dests}
    if len(layouts) > 1:  # no family mixes them; PEFT's one flag could not say which is which
        raise ValueError(f"the {family} exporter stores some adapted weights transposed (Conv1D) and others not; "
                         f"adapter_config.json's fan_in_fan_out holds one layout")
    return tensors, target_modules(set(adapted), _hf_modules(model, family)), layouts.pop()


def _check_adapter_shapes(model: GPT, adapters: Adapters) -> None:
    """A ValueError naming the layer whose A is not (rank, in) or B not (out, rank) for the model's linear."""
    for name, (lora_a, lora_b) in adapters.weights.items():
        linear = _linear(model, name)
        wanted = ((adapters.rank, linear.in_features), (linear.out_features, adapters.rank))
        if (tuple(lora_a.shape), tuple(lora_b.shape)) != wanted:
            raise ValueError(f"{name!r}'s adapters have shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}; "
                             f"the model's layer takes A {wanted[0]}, B {wanted[1]} (adapters of another model?)")


def _destinations(model: GPT, family: str, modules: list[str]) -> dict[str, list[Destination]]:
    """{our linear module: its Destinations in the HF model of `family`'s exporter}, by exporting `model` (a
    meta-device GPT, but for the one probed weight) whose probed weight holds the labels 1..numel: one linear at a
    time, so that a large model's probe costs a few copies of its largest linear weight in float64, no more (the
    probed weight is put back after each probe)."""
    out = {}
    for name in modules:
        linear = _linear(model, name)
        placeholder = linear.weight
        labels = torch.arange(1, placeholder.numel() + 1, dtype=torch.float64).reshape(placeholder.shape)
        linear.weight = nn.Parameter(labels, requires_grad=False)
        try:
            state = _export(model, family)
        finally:
            linear.weight = placeholder
        out[name] = _read_labels(name, labels.shape, state, family)
    return out


def _meta_model(config: GPTConfig) -> GPT:
    """A GPT of config with no storage: the exporter reads every weight, and only the probed one needs values."""
    with torch.device("meta"):
        return GPT(config)


def _linear(model: GPT, name: str) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear) or name.split(".")[-1] == "lm_head":
        raise ValueError(f"adapted layer {name!r} is no linear layer of this model (a model config other than the "
                         f"one the adapters were trained on?)")
    return module


def _export(model: GPT, family: str) -> dict[str, torch.Tensor]:
    from ..model.hf_save import hf_state_and_config

    return hf_state_and_config(model, family)[0]


def _read_labels(name: str, shape: torch.Size, state: dict[str, torch.Tensor], family: str) -> list[Destination]:
    """The Destinations of our weight `name` (out, in) = shape, labelled 1..numel, in the exported `state`: every
    tensor that holds any of them (the others stay on the meta device)."""
    n_out, n_in = shape
    seen = torch.zeros(n_out * n_in, dtype=torch.bool)
    found = []
    for hf_name, tensor in state.items():
        if tensor.device.type == "meta":
            continue
        index = _label_index(name, hf_name, tensor, n_out * n_in)
        seen[index.flatten()] = True
        found.append(_destination(name, hf_name, index // n_in, index % n_in))
    if not found:
        raise ValueError(f"the {family} exporter writes no weight of {name!r}; its LoRA update has nowhere to go")
    if not bool(seen.all()):
        raise ValueError(f"the {family} exporter leaves out {int((~seen).sum())} of {name!r}'s weights; PEFT's "
                         f"adapter would not carry that part of the update")
    return found


def _label_index(name: str, hf_name: str, tensor: torch.Tensor, numel: int) -> torch.Tensor:
    """The 0-based element of our weight that each element of `tensor` holds; a ValueError when it holds anything
    but labels (a scaled, cast or summed weight: not a placement, so no adapter of the same A and B carries it)."""
    if not hf_name.endswith(".weight") or tensor.dim() != 2:
        raise ValueError(f"our {name!r} is exported into {hf_name!r} of shape {tuple(tensor.shape)}, not an HF "
                         f"linear module's 2-D weight; PEFT's LoRA cannot adapt it")
    values = tensor.to(torch.float64)
    if tensor.dtype != torch.float64 or not bool(((values == values.round()) & (values >= 1) & (values <= numel)).all()):
        raise ValueError(f"the exporter changes the values of {name!r} on the way to {hf_name!r} (a scale, a cast, "
                         f"a sum), not only their places; PEFT's adapter cannot express that")
    return values.long() - 1


def _destination(name: str, hf_name: str, rows: torch.Tensor, cols: torch.Tensor) -> Destination:
    """A Destination when HF's weight is W[R][:, C] (or its transpose); a ValueError naming both otherwise."""
    module = hf_name.removesuffix(".weight")
    if bool((rows == rows[:, :1]).all()) and bool((cols == cols[:1, :]).all()):
        return Destination(module, rows[:, 0].clone(), cols[0, :].clone(), transposed=False)
    if bool((rows == rows[:1, :]).all()) and bool((cols == cols[:, :1]).all()):
        return Destination(module, rows[0, :].clone(), cols[:, 0].clone(), transposed=True)
    raise ValueError(f"{hf_name!r} takes {name!r}'s weights in an order that is no choice of its rows and columns "
                     f"(rows cut and refolded?); an adapter of the same A and B cannot express its update")


def _hf_modules(model: GPT, family: str) -> set[str]:
    """Every linear-weight module name of the HF model (2-D ".weight" tensors) of a meta-device GPT, for
    target_modules' matching."""
    state = _export(model, family)
    return {name.removesuffix(".weight") for name, t in state.items() if name.endswith(".weight") and t.dim() == 2}


def target_modules(adapted: set[str], all_modules: set[str]) -> list[str]:
    """adapter_config.json's target_modules: PEFT adapts a module whose name is a target or ends with "." + one.
    A module's last name ("q_proj") where every module of that name is adapted (the usual: all layers), else the
    full names of those that are, so that PEFT wraps exactly the adapted modules."""
    targets = set()
    for module in adapted:
        short = module.rsplit(".", 1)[-1]
        same_name = {m for m in all_modules if m == short or m.endswith("." + short)}
        targets.add(short if same_name <= adapted else module)
    return sorted(targets)


# --- the folder --------------------------------------------------------------------------------------------------

def adapter_config(adapters: Adapters, targets: list[str], fan_in_fan_out: bool,
                   base_model_name_or_path: str | None) -> dict:
    """PEFT's LoraConfig as adapter_config.json holds it: plain LoRA (no rsLoRA, no DoRA), scale lora_alpha / r."""
    alpha = adapters.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": adapters.rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha, "lora_dropout": adapters.dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": fan_in_fan_out, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


@dataclass
class RunTokenizer:
    """What a run's tokenizer files need: its spec (llmkern.data.tokenizer's; None: no files), the prompt format it
    was fine-tuned in (None: none), and the model's context length."""

    spec: str | None
    prompt_format: object | None
    model_max_length: int | None


def write_peft_folder(adapters: Adapters, out_dir: str, family: str | None, base_model_name_or_path: str | None,
                      dtype: str | torch.dtype | None, force: bool, tokenizer: RunTokenizer | None = None) -> list[str]:
    """Write `adapters` to out_dir as a PEFT adapter folder for `family`'s HF model (None: the config's family),
    with `tokenizer`'s files where given (llmkern.model.hf_save.write_tokenizer), atomically; the paths written."""
    from ..model.hf_save import FAMILIES, check_out_dir, family_of_config

    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {base_model_name_or_path!r}")
    out_dtype = _resolve_dtype(dtype)
    check_out_dir(out_dir, force)
    tensors, targets, fan_in_fan_out = peft_weights(adapters, family or family_of_config(adapters.config))
    tensors = {k: v.detach().to("cpu", out_dtype or v.dtype).contiguous() for k, v in tensors.items()}
    config = adapter_config(adapters, targets, fan_in_fan_out, base_model_name_or_path)
    return _write_atomically(out_dir, tensors, config, tokenizer)


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    from ..model.hf_save import DTYPES

    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {list(DTYPES)} or None, got {dtype!r}")


def _write_atomically(out_dir: str, tensors: dict[str, torch.Tensor], config: dict,
                      tokenizer: RunTokenizer | None) -> list[str]:
    """The adapter's two files and the tokenizer's, written as a whole folder or not at all
    (llmkern._atomic.write_folder_atomic): a failure leaves out_dir as it was."""
    from .._atomic import write_folder_atomic
    from ..model.hf_save import write_tokenizer

    names = [ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME]
    with write_folder_atomic(out_dir) as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        if tokenizer is not None:
            names += write_tokenizer(tmp, tokenizer.spec, tokenizer.model_max_length, tokenizer.prompt_format)
    out_dir = os.path.abspath(out_dir)
    return [os.path.join(out_dir, name) for name in names]
