"""Hugging Face Phi-3 weights (Phi3ForCausalLM: Llama's model with q/k/v fused in qkv_proj and gate/up in
gate_up_proj): a synthetic state dict goes in, gives the logits of test_hf_llama's plain float64 forward of the
weights split here as transformers' Phi-3 code splits them, and comes back out bit for bit. What Phi-3 models
compute and the model here does not (longrope, RoPE on part of each head, a short sliding window) is refused."""

import json

import pytest
import torch
from test_hf_llama import (
    CTX,
    EMBD,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    VOCAB,
    _save,
    assert_same_weights,
    llama_logits,
    llama_state_dict,
)

from llmkern.model import GPT, GPTConfig
from llmkern.model.hf import (
    config_from_hf_phi3,
    from_hf_llama,
    from_hf_phi3,
    load_hf_file,
    load_hf_phi3,
    to_hf_phi3,
)

D = EMBD // HEADS  # Phi3Config has no head_dim: hidden_size / num_attention_heads


def phi3_config_json(**changes) -> dict:
    """The config.json of a Phi3ForCausalLM of phi3_state_dict's sizes, written as Phi-3-mini-4k's is (its
    dropouts, original_max_position_embeddings, a sliding window: here no shorter than the context)."""
    config = {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "vocab_size": VOCAB, "hidden_size": EMBD,
              "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "hidden_act": "silu", "max_position_embeddings": CTX,
              "original_max_position_embeddings": CTX, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "rope_scaling": None, "sliding_window": CTX, "attention_dropout": 0.0, "embd_pdrop": 0.0,
              "resid_pdrop": 0.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
              "eos_token_id": 32000, "pad_token_id": 32000, "use_cache": True}
    return {**config, **changes}


def phi3_state_dict(tied: bool = False, kv_heads: int = KV_HEADS) -> dict[str, torch.Tensor]:
    """Random float32 weights under Phi3ForCausalLM's names; qkv_proj and gate_up_proj are fused."""
    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, EMBD) * 0.2, "model.norm.weight": 1 + 0.1 * torch.randn(EMBD)}
    for i in range(LAYERS):
        shapes = {"self_attn.qkv_proj.weight": ((HEADS + 2 * kv_heads) * D, EMBD),
                  "self_attn.o_proj.weight": (EMBD, HEADS * D), "mlp.gate_up_proj.weight": (2 * HIDDEN, EMBD),
                  "mlp.down_proj.weight": (EMBD, HIDDEN)}
        for name, shape in shapes.items():
            sd[f"model.layers.{i}.{name}"] = torch.randn(shape) * 0.2
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            sd[f"model.layers.{i}.{name}"] = 1 + 0.1 * torch.randn(EMBD)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if tied else torch.randn(VOCAB, EMBD) * 0.2
    return sd


def split_as_transformers(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Phi-3's fused weights under Llama's names, cut as Phi3Attention and Phi3MLP cut their outputs: q is the
    first num_attention_heads * head_dim rows, k the next num_key_value_heads * head_dim, v the rest; gate the
    first half of gate_up (`gate, up = gate_up.chunk(2)`, then `up * silu(gate)`), up the second."""
    q_rows, kv_rows = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    out = {}
    for name, tensor in sd.items():
        if name.endswith("qkv_proj.weight"):
            prefix = name.removesuffix("qkv_proj.weight")
            out[prefix + "q_proj.weight"] = tensor[:q_rows]
            out[prefix + "k_proj.weight"] = tensor[q_rows: q_rows + kv_rows]
            out[prefix + "v_proj.weight"] = tensor[q_rows + kv_rows:]
        elif name.endswith("gate_up_proj.weight"):
            prefix = name.removesuffix("gate_up_proj.weight")
            out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = tensor.chunk(2)
        else:
            out[name] = tensor
    return out


def phi3_logits(sd: dict[str, torch.Tensor], idx: torch.Tensor, cfg: dict) -> torch.Tensor:
    return llama_logits(split_as_transformers(sd, cfg), idx, cfg)


def logits_of(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    return model.eval()(idx)[0]


@pytest.mark.parametrize("tied", [False, True])  # Phi-3-mini's own head; Phi-4-mini's tied
def test_import_gives_phi3_logits(tied):
    sd, cfg = phi3_state_dict(tied), phi3_config_json(tie_word_embeddings=tied)
    model = from_hf_phi3(sd, cfg, backend="torch")
    c = model.config
    assert (c.n_head, c.n_kv_head, c.head_dim, c.hidden_size, c.norm_eps, c.rope_theta, c.tie_embeddings) == (
        HEADS, KV_HEADS, D, HIDDEN, 1e-5, 1e4, tied)
    assert (c.qkv_bias, c.qk_norm, c.bias, c.rope_scaling, c.dropout) == (False, False, False, None, 0.0)
    idx = torch.randint(0, VOCAB, (2, CTX))
    torch.testing.assert_close(logits_of(model, idx), phi3_logits(sd, idx, cfg), rtol=1e-5, atol=1e-5)
    # Phi3Model's names (no "model." prefix) read the same
    bare = {k.removeprefix("model."): v for k, v in sd.items()}
    torch.testing.assert_close(logits_of(from_hf_phi3(bare, cfg, backend="torch"), idx), phi3_logits(sd, idx, cfg),
                               rtol=1e-5, atol=1e-5)


def test_the_reference_sees_a_fused_weight_cut_wrong():
    """The comparison above would pass a wrong cut of the fused weights if the reference could not tell: gate's
    and up's halves swapped, or k's and v's blocks, the imported model's logits move far past the tolerance."""
    sd, cfg = phi3_state_dict(), phi3_config_json()
    idx = torch.randint(0, VOCAB, (1, 16))
    right = phi3_logits(sd, idx, cfg)
    gate_up = sd["model.layers.0.mlp.gate_up_proj.weight"]
    qkv = sd["model.layers.1.self_attn.qkv_proj.weight"]
    q, k, v = qkv.split([HEADS * D, KV_HEADS * D, KV_HEADS * D])
    wrong = [{**sd, "model.layers.0.mlp.gate_up_proj.weight": torch.cat(gate_up.chunk(2)[::-1])},
             {**sd, "model.layers.1.self_attn.qkv_proj.weight": torch.cat([q, v, k])}]
    for other in wrong:
        assert not torch.allclose(logits_of(from_hf_phi3(other, cfg, backend="torch"), idx), right, atol=1e-3)
    # and the eps: Phi3Config's default is 1e-5, not Llama's 1e-6
    assert config_from_hf_phi3({k: v for k, v in cfg.items() if k != "rms_norm_eps"}).norm_eps == 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_phi3_export_round_trips_bitwise(tied):
    sd, cfg = phi3_state_dict(tied), phi3_config_json(tie_word_embeddings=tied)
    model = from_hf_phi3(sd, cfg, backend="torch")
    out, out_cfg = to_hf_phi3(model)
    assert sorted(out) == sorted(sd)
    for name, tensor in sd.items():
        assert torch.equal(out[name], tensor), name
    if tied:
        assert out["lm_head.weight"] is out["model.embed_tokens.weight"]
    assert out_cfg["model_type"] == "phi3" and out_cfg["architectures"] == ["Phi3ForCausalLM"]
    assert (out_cfg["rope_scaling"], out_cfg["sliding_window"], out_cfg["partial_rotary_factor"]) == (None, None, 1.0)
    assert "attention_bias" not in out_cfg and "mlp_bias" not in out_cfg
    same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "tie_word_embeddings")
    assert {k: out_cfg[k] for k in same} == {k: cfg[k] for k in same}
    back = from_hf_phi3(out, json.loads(json.dumps(out_cfg)), backend="torch")
    assert back.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    # and a llmkern Llama-shaped model exports as Phi-3's and reads back as the same model
    ours = GPT(GPTConfig.from_preset("tiny-llama", vocab_size=VOCAB, tie_embeddings=tied, backend="torch"))
    sd2, cfg2 = to_hf_phi3(ours)
    again = from_hf_phi3(sd2, json.loads(json.dumps(cfg2)), backend="torch")
    assert_same_weights(again, ours)


def test_a_phi3_folder_is_read_by_its_model_type(tmp_path):
    from llmkern.train.inference import load_gpt

    sd, cfg = phi3_state_dict(), phi3_config_json()
    (path,) = _save(tmp_path, sd, cfg, dtype=torch.bfloat16)
    model, model_type = load_hf_file(str(path), backend="torch")
    assert model_type == "phi3"
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}  # bf16 weights, read exactly
    idx = torch.randint(0, VOCAB, (1, 9))
    torch.testing.assert_close(logits_of(model, idx), phi3_logits(bf16, idx, cfg), rtol=1e-5, atol=1e-5)
    model, _, meta = load_gpt(str(path), backend="torch", hf_tokenizer="bytes")
    assert meta["source"] == "hf-llama"  # Llama's model
    (tmp_path / "config.json").write_text(json.dumps(phi3_config_json(partial_rotary_factor=0.75)))
    with pytest.raises(ValueError, match="partial_rotary_factor=0.75"):
        load_hf_file(str(path))


def test_a_short_sliding_window_loads_with_block_size_cut_to_it():
    # Phi-3-mini-4k's: sliding_window 2047 beside max_position_embeddings 4096
    sd, cfg = phi3_state_dict(), phi3_config_json(sliding_window=CTX // 2 - 1)
    with pytest.raises(ValueError, match=f"sliding_window={CTX // 2 - 1}, shorter than block_size={CTX}"):
        from_hf_phi3(sd, cfg, block_size=CTX)
    with pytest.warns(UserWarning, match=f"loaded with block_size={CTX // 2 - 1}"):
        model = from_hf_phi3(sd, cfg, backend="torch")
    assert model.config.block_size == CTX // 2 - 1
    idx = torch.randint(0, VOCAB, (1, CTX // 2 - 1))
    torch.testing.assert_close(logits_of(model, idx), phi3_logits(sd, idx, cfg), rtol=1e-5, atol=1e-5)


def test_training_time_dropouts_are_accepted_and_left_out():
    sd, cfg = phi3_state_dict(), phi3_config_json(attention_dropout=0.1, embd_pdrop=0.1, resid_pdrop=0.1)
    model = from_hf_phi3(sd, cfg, backend="torch")
    assert model.config.dropout == 0.0
    idx = torch.randint(0, VOCAB, (1, 8))
    torch.testing.assert_close(logits_of(model, idx), phi3_logits(sd, idx, cfg), rtol=1e-5, atol=1e-5)


LONGROPE = {"type": "longrope", "short_factor": [1.0] * (D // 2), "long_factor": [2.0] * (D // 2)}


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": LONGROPE}, "RoPE scaling .*'longrope'"),  # Phi-3-mini-128k, Phi-3.5-mini
    ({"rope_scaling": {**LONGROPE, "type": "su"}}, "RoPE scaling .*'su'"),  # the older name
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "RoPE scaling .*'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}}, "a Phi-3 model here computes plain RoPE"),
    ({"partial_rotary_factor": 0.75}, "partial_rotary_factor=0.75"),  # Phi-4-mini
    ({"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "llama"}, "model_type='llama'; Phi-3 weights are of model_type 'phi3'"),
])
def test_a_phi3_config_the_model_would_misread_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        from_hf_phi3(phi3_state_dict(), phi3_config_json(**change))


def test_phi3_weights_that_do_not_fit_are_refused():
    # Llama's unfused names under a Phi-3 config, and Phi-3's under a Llama config: each says what is missing
    with pytest.raises(ValueError, match=r"not a Phi-3 state dict of 2 layers: missing \['layers.0.mlp.gate_up_proj"):
        from_hf_phi3(llama_state_dict(), phi3_config_json())
    with pytest.raises(ValueError, match=r"not a Llama state dict of 2 layers: missing \['layers.0.mlp.gate_proj"):
        from_hf_llama(phi3_state_dict(), phi3_config_json(model_type="llama", sliding_window=None))
    # multi-head k/v under a config of 2 kv heads: the fused qkv_proj is 2 heads too long
    with pytest.raises(ValueError, match=r"layers.0.self_attn.qkv_proj.weight has shape \(192, 64\); "
                                         r"blocks.0.attn.qkv.weight needs \(128, 64\)"):
        from_hf_phi3(phi3_state_dict(kv_heads=HEADS), phi3_config_json())
    # a model Phi-3's weights would leave part of (q/k/v biases, QK-norm), or a scaling no Phi-3 config has
    for change in ({"qkv_bias": True}, {"qk_norm": True}):
        other = GPT(GPTConfig.from_preset("tiny-llama", vocab_size=VOCAB, **change))
        with pytest.raises(ValueError, match="Phi-3 weights need a model without qkv_bias and qk_norm"):
            load_hf_phi3(other, phi3_state_dict())
        with pytest.raises(ValueError, match="Phi-3 weights need a model without qkv_bias and qk_norm"):
            to_hf_phi3(other)
    scaled = GPT(GPTConfig.from_preset("tiny-llama", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}))
    with pytest.raises(ValueError, match="Phi-3's model has no .* RoPE scaling"):
        to_hf_phi3(scaled)
    with pytest.raises(ValueError, match="Llama weights need a Llama-shaped model"):
        to_hf_phi3(GPT(GPTConfig.from_preset("tiny", vocab_size=VOCAB)))
