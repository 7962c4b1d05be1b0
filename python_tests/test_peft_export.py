"""LoRA adapters as a PEFT adapter folder: applied to the exported base by PEFT's rule (W += lora_alpha / r * B @ A
on each adapted module, transposed under fan_in_fan_out), in float64, the adapter folder must give the export of the
merged llmkern model; target_modules must pick exactly the adapted modules; what PEFT cannot express is refused."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from llmkern.finetune.base import save_finetuned
from llmkern.finetune.lora import (
    apply_lora,
    lora_layers,
    merge_lora,
    save_lora_adapters,
)
from llmkern.finetune.peft_export import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_PREFIX,
    save_peft_adapter,
    save_peft_adapter_from_run,
)
from llmkern.model import GPT, GPTConfig, hf
from llmkern.model.hf_save import hf_state_and_config

RANK, ALPHA = 3, 5.0
# head_dim 8 (n_embd / n_head), GQA: 4 query heads on 2 kv heads; the MLP's width no multiple of n_embd
SIZES = {"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32,
         "mlp_hidden": 48}
GEMMA = {"mlp": "geglu", "post_norms": True, "embed_scale": 32 ** 0.5}
# (family, GPTConfig, LoRA targets)
MODELS = {
    "llama-gqa": ("llama", GPTConfig.from_preset("tiny-llama", **SIZES), None),
    "qwen2": ("llama", GPTConfig.from_preset("tiny-llama", **SIZES, qkv_bias=True), None),
    "qwen3": ("llama", GPTConfig.from_preset("tiny-llama", **SIZES, qk_norm=True, head_dim=12), None),
    "phi3": ("phi3", GPTConfig.from_preset("tiny-llama", **SIZES, rope_dim=4), None),
    "gemma3": ("gemma3", GPTConfig.from_preset("tiny-llama", **SIZES, **GEMMA, qk_norm=True, head_dim=12), None),
    "gemma2": ("gemma2", GPTConfig.from_preset("tiny-llama", **SIZES, **GEMMA), None),
    # Qwen3-MoE with layer 1 dense: attention everywhere, the dense layer's MLP (the experts are no linear layers)
    "qwen3-moe": ("llama", GPTConfig.from_preset("tiny-moe", **SIZES, qk_norm=True, moe_layers=[0]), None),
    # Mixtral: its routers too
    "mixtral": ("llama", GPTConfig.from_preset("tiny-moe", **SIZES), ["qkv", "attn.proj", "router"]),
    # some layers only: target_modules must then name modules in full
    "llama-some": ("llama", GPTConfig.from_preset("tiny-llama", **SIZES), ["blocks.1.attn.qkv", "mlp.gate_up"]),
    "gpt2": ("gpt2", GPTConfig.from_preset("tiny", vocab_size=64, block_size=16, n_embd=32, n_head=4), None),
}


def lora_model(config: GPTConfig, targets=None, seed: int = 0) -> GPT:
    """A float64 GPT of config with random weights under random LoRA adapters (B non-zero)."""
    torch.manual_seed(seed)
    model = GPT(config).double()
    with torch.no_grad():
        for p in model.parameters():  # the init leaves some weights constant (norms): random everywhere
            p.add_(torch.randn_like(p) * 0.1)
    apply_lora(model, RANK, ALPHA, targets=targets)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn_like(layer.lora_A))
            layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    return model


def hf_export(model: GPT, family: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in hf_state_and_config(model, family)[0].items()}


def base_and_merged(model: GPT, family: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the HF export of the base weights, that of the merged model); `model` is merged in place."""
    with torch.no_grad():  # the base: every adapter's update taken out for a moment
        saved = {name: layer.lora_B.clone() for name, layer in lora_layers(model).items()}
        for layer in lora_layers(model).values():
            layer.lora_B.zero_()
        plain = merge_lora(copy.deepcopy(model))
        base = hf_export(plain, family)
        for name, layer in lora_layers(model).items():
            layer.lora_B.copy_(saved[name])
    return base, hf_export(merge_lora(model), family)


def apply_peft_by_its_rule(base: dict[str, torch.Tensor], folder: str) -> dict[str, torch.Tensor]:
    """PEFT's merge, written from its definition: W += lora_alpha / r * B @ A (transposed for fan_in_fan_out) on each
    module adapter_model.safetensors names."""
    with open(os.path.join(folder, ADAPTER_CONFIG_NAME), encoding="utf-8") as f:
        config = json.load(f)
    tensors = load_file(os.path.join(folder, ADAPTER_WEIGHTS_NAME))
    scaling = config["lora_alpha"] / config["r"]
    out = {k: v.clone() for k, v in base.items()}
    for module in adapted_modules(tensors):
        lora_a = tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"].double()
        lora_b = tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"].double()
        assert lora_a.shape[0] == lora_b.shape[1] == config["r"]
        delta = scaling * lora_b @ lora_a
        out[f"{module}.weight"] += delta.T if config["fan_in_fan_out"] else delta
    return out


def adapted_modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for key in tensors}


def peft_wraps(config: dict, base: dict[str, torch.Tensor]) -> set[str]:
    """The modules PEFT wraps by target_modules: a linear module whose name is a target or ends with "." + one."""
    modules = {k.removesuffix(".weight") for k, v in base.items() if k.endswith(".weight") and v.dim() == 2}
    return {m for m in modules if any(m == t or m.endswith("." + t) for t in config["target_modules"])}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_adapter_on_the_exported_base_is_the_merged_models_export(name, tmp_path):
    family, config, targets = MODELS[name]
    model = lora_model(config, targets)
    paths = save_peft_adapter(model, str(tmp_path / "adapter"), family, "some/base-model")
    assert sorted(os.path.basename(p) for p in paths) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])
    base, merged = base_and_merged(model, family)

    got = apply_peft_by_its_rule(base, str(tmp_path / "adapter"))
    assert set(got) == set(merged)
    changed = 0
    for key in merged:
        torch.testing.assert_close(got[key], merged[key], rtol=1e-12, atol=1e-12, msg=key)
        changed += not torch.equal(base[key], merged[key])
    assert changed > 0  # the updates are there: a folder without them would not pass

    with open(tmp_path / "adapter" / ADAPTER_CONFIG_NAME, encoding="utf-8") as f:
        adapter_config = json.load(f)
    tensors = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME))
    assert peft_wraps(adapter_config, base) == adapted_modules(tensors)
    assert adapter_config["peft_type"] == "LORA" and adapter_config["task_type"] == "CAUSAL_LM"
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (RANK, ALPHA)
    assert adapter_config["fan_in_fan_out"] == (family == "gpt2")  # GPT-2's Conv1D holds (in, out)
    assert adapter_config["base_model_name_or_path"] == "some/base-model"
    assert not adapter_config["use_rslora"] and adapter_config["bias"] == "none"


def test_names_and_targets_are_peft_llama_names(tmp_path):
    _, config, _ = MODELS["llama-some"]
    model = lora_model(config, ["blocks.1.attn.qkv", "mlp.gate_up"])
    save_peft_adapter(model, str(tmp_path / "a"), "llama")
    with open(tmp_path / "a" / ADAPTER_CONFIG_NAME, encoding="utf-8") as f:
        targets = json.load(f)["target_modules"]
    # every layer's gate and up, layer 1's attention alone
    assert targets == ["gate_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj",
                       "model.layers.1.self_attn.v_proj", "up_proj"]
    tensors = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS_NAME))
    q = "base_model.model.model.layers.1.self_attn.q_proj"
    assert tensors[f"{q}.lora_A.weight"].shape == (RANK, 32)
    assert tensors[f"{q}.lora_B.weight"].shape == (32, RANK)
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (16, RANK)


def test_a_run_folders_adapters_give_the_models_folder(tmp_path):
    _, config, _ = MODELS["qwen3"]
    model = lora_model(config)
    save_peft_adapter(model, str(tmp_path / "from_model"), "llama", dtype="bfloat16")
    run = tmp_path / "run"
    run.mkdir()
    save_lora_adapters(str(run / "lora.safetensors"), model,
                       {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "modules": list(lora_layers(model))})
    merge_lora(model)
    save_finetuned(str(run), 3, model.state_dict(), {"model_config": config.to_dict(), "tokenizer": "bytes",
                                                      "finetune": {"method": "sft", "base": None}})
    save_peft_adapter_from_run(str(run), str(tmp_path / "from_run"), dtype="bfloat16")  # family: the config's
    ours, theirs = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS_NAME)) for d in ("from_model", "from_run"))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(t.dtype == torch.bfloat16 for t in theirs.values())
    for d in ("from_model", "from_run"):
        with open(tmp_path / d / ADAPTER_CONFIG_NAME, encoding="utf-8") as f:
            assert json.load(f)["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                      "up_proj", "v_proj"]

    full = tmp_path / "full"
    save_finetuned(str(full), 1, model.state_dict(), {"model_config": config.to_dict(), "tokenizer": "bytes"})
    with pytest.raises(ValueError, match="no lora.safetensors"):
        save_peft_adapter_from_run(str(full), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no llmkern checkpoint"):
        save_peft_adapter_from_run(str(tmp_path / "nothing"), str(tmp_path / "x"))


def test_a_checkpoint_folder_of_a_run_gives_the_run_s_adapters(tmp_path):
    """A run's checkpoint folder (run/checkpoints/step_N) finds the lora.safetensors of its run, two levels up."""
    _, config, _ = MODELS["llama-gqa"]
    model = lora_model(config)
    save_peft_adapter(model, str(tmp_path / "from_model"), "llama")
    run = tmp_path / "run"
    run.mkdir()
    save_lora_adapters(str(run / "lora.safetensors"), model, {"rank": RANK, "alpha": ALPHA, "dropout": 0.0})
    checkpoint = save_finetuned(str(run), 2, merge_lora(model).state_dict(),
                                {"model_config": config.to_dict(), "tokenizer": "bytes"})
    assert os.path.dirname(os.path.dirname(checkpoint)) == str(run)  # the layout the test is about
    save_peft_adapter_from_run(checkpoint, str(tmp_path / "from_checkpoint"))
    ours, theirs = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS_NAME)) for d in ("from_model", "from_checkpoint"))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_run_goes_on_the_family_it_started_from(tmp_path):
    """A Phi-3 import (a config that reads as Llama's) gets its adapters on Phi-3's fused qkv_proj and gate_up_proj."""
    _, config, _ = MODELS["llama-gqa"]
    run = tmp_path / "run"
    run.mkdir()
    save_lora_adapters(str(run / "lora.safetensors"), lora_model(config), {"alpha": ALPHA})
    save_finetuned(str(run), 1, GPT(config).state_dict(), {"model_config": config.to_dict(), "tokenizer": "bytes",
                                                           "source": "hf-phi3"})
    save_peft_adapter_from_run(str(run), str(tmp_path / "a"))
    with open(tmp_path / "a" / ADAPTER_CONFIG_NAME, encoding="utf-8") as f:
        assert json.load(f)["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


@pytest.mark.parametrize("info, extra, message", [
    ({"rank": RANK, "dropout": 0.0}, False, "does not record the LoRA alpha"),
    ({"rank": RANK, "alpha": ALPHA}, True, "trained too"),
])
def test_a_run_file_that_cannot_make_an_adapter_is_refused(info, extra, message, tmp_path):
    _, config, _ = MODELS["llama-gqa"]
    model = lora_model(config)
    model.norm_f.weight.requires_grad_(extra)  # save_lora_adapters keeps what trained beside the adapters
    run = tmp_path / "run"
    run.mkdir()
    save_lora_adapters(str(run / "lora.safetensors"), model, info)
    save_finetuned(str(run), 1, merge_lora(model).state_dict(), {"model_config": config.to_dict(),
                                                                 "tokenizer": "bytes"})
    with pytest.raises(ValueError, match=message):
        save_peft_adapter_from_run(str(run), str(tmp_path / "a"))


def test_adapters_of_another_model_are_refused(tmp_path):
    _, config, _ = MODELS["llama-gqa"]
    run = tmp_path / "run"
    run.mkdir()
    save_lora_adapters(str(run / "lora.safetensors"), lora_model(config), {"alpha": ALPHA})
    wider = GPTConfig.from_dict({**config.to_dict(), "mlp_hidden": 64})
    save_finetuned(str(run), 1, GPT(wider).state_dict(), {"model_config": wider.to_dict(), "tokenizer": "bytes"})
    with pytest.raises(ValueError, match="adapters of another model"):
        save_peft_adapter_from_run(str(run), str(tmp_path / "a"))


def test_bad_inputs_are_refused(tmp_path):
    _, config, _ = MODELS["llama-gqa"]
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_peft_adapter(GPT(config), str(tmp_path / "a"), "llama")
    with pytest.raises(TypeError, match="model must be a llmkern GPT"):
        save_peft_adapter(torch.nn.Linear(2, 2), str(tmp_path / "a"), "llama")
    model = lora_model(config)
    with pytest.raises(ValueError, match="family must be one of"):
        save_peft_adapter(model, str(tmp_path / "a"), "mistral")
    with pytest.raises(ValueError, match="cannot be written in the gpt2 format"):
        save_peft_adapter(model, str(tmp_path / "a"), "gpt2")
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_peft_adapter(model, str(tmp_path / "a"), "llama", dtype="int8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(FileExistsError):
        save_peft_adapter(model, str(tmp_path / "full"), "llama")
    save_peft_adapter(model, str(tmp_path / "full"), "llama", force=True)
    assert sorted(os.listdir(tmp_path / "full")) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])
    model.norm_f.weight.requires_grad_(True)  # trained beside the adapters: the adapter would lose it
    with pytest.raises(ValueError, match="trained too"):
        save_peft_adapter(model, str(tmp_path / "b"), "llama")
    assert not (tmp_path / "b").exists()


def _exporter_that(change):
    """to_hf_llama with `change(name, tensor)` applied to every tensor it returns."""
    original = hf.to_hf_llama

    def export(model):
        state, config = original(model)
        return {name: change(name, t) for name, t in state.items()}, config

    return export


@pytest.mark.parametrize("change, message", [
    # o_proj halved in width and doubled in height: a row of it holds parts of two of ours
    (lambda n, t: t.reshape(-1, t.shape[1] // 2) if n.endswith("o_proj.weight") else t, "no choice of its rows"),
    (lambda n, t: t * 2 if n.endswith("o_proj.weight") else t, "changes the values"),
    (lambda n, t: t.float() if n.endswith("o_proj.weight") else t, "changes the values"),
    (lambda n, t: t[:-1] if n.endswith("down_proj.weight") else t, "leaves out 48"),
    (lambda n, t: t.t() if n.endswith("o_proj.weight") else t, "one layout"),
])
def test_a_placement_peft_cannot_express_is_refused(change, message, tmp_path, monkeypatch):
    _, config, _ = MODELS["llama-gqa"]
    model = lora_model(config)
    monkeypatch.setattr(hf, "to_hf_llama", _exporter_that(change))
    with pytest.raises(ValueError, match=message):
        save_peft_adapter(model, str(tmp_path / "a"), "llama")
    assert not (tmp_path / "a").exists() and os.listdir(tmp_path) == []  # nothing written, no temporary left


def test_rows_and_columns_permuted_by_the_exporter_are_followed(tmp_path, monkeypatch):
    """An exporter that reorders rows and columns (as one permuting RoPE rows would): the adapters follow."""
    _, config, _ = MODELS["llama-gqa"]
    model = lora_model(config)
    perm_rows, perm_cols = torch.randperm(32), torch.randperm(32)

    def permute(name, t):
        return t[perm_rows][:, perm_cols] if name.endswith("q_proj.weight") else t

    monkeypatch.setattr(hf, "to_hf_llama", _exporter_that(permute))
    save_peft_adapter(model, str(tmp_path / "a"), "llama")
    base, merged = base_and_merged(model, "llama")
    got = apply_peft_by_its_rule(base, str(tmp_path / "a"))
    for key in merged:
        torch.testing.assert_close(got[key], merged[key], rtol=1e-12, atol=1e-12, msg=key)


def test_a_run_s_adapter_folder_carries_the_tokenizer_it_was_trained_with(tmp_path):
    """The tokenizer files beside the adapter are the run's own, as `llmkern export` loads it: after the tokenizer
    file the run names was retrained the run folder's copy is written (not the new file), and with it gone the
    export still succeeds with that copy."""
    import shutil

    from llmkern.data.bpe import train_bpe

    _, config, _ = MODELS["llama-gqa"]
    model = lora_model(config)
    bpe = tmp_path / "data" / "bpe.tiktoken"
    bpe.parent.mkdir()
    train_bpe(["the cat sees the moon and the sun. " * 20], 280, str(bpe), num_workers=1)
    run = tmp_path / "run"
    run.mkdir()
    save_lora_adapters(str(run / "lora.safetensors"), model, {"rank": RANK, "alpha": ALPHA, "dropout": 0.0})
    save_finetuned(str(run), 1, merge_lora(model).state_dict(), {"model_config": config.to_dict(),
                                                                 "tokenizer": str(bpe)})
    save_peft_adapter_from_run(str(run), str(tmp_path / "trained"))
    trained = (tmp_path / "trained" / "tokenizer.json").read_text(encoding="utf-8")

    train_bpe(["something else entirely, " * 50], 290, str(bpe), num_workers=1)  # the file retrained
    save_peft_adapter_from_run(str(run), str(tmp_path / "retrained"))
    assert (tmp_path / "retrained" / "tokenizer.json").read_text(encoding="utf-8") == trained
    shutil.rmtree(tmp_path / "data")  # the file gone
    save_peft_adapter_from_run(str(run), str(tmp_path / "gone"))
    assert (tmp_path / "gone" / "tokenizer.json").read_text(encoding="utf-8") == trained
