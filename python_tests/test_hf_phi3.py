"""Hugging Face Phi-3 weights (Phi3ForCausalLM: Llama's model with q/k/v fused in qkv_proj and gate/up in
gate_up_proj): a synthetic state dict goes in, gives the logits of test_hf_llama's plain float64 forward of the
weights split here as transformers' Phi-3 code splits them, and comes back out bit for bit. Longrope and
Phi-4-mini's RoPE on part of each head (checked against a float64 forward written here) are read and written back;
what Phi-3 configs hold that the model would compute otherwise is refused. Phi-3-mini-4k's sliding window is the
model's own (GPTConfig.sliding_window), beside the whole context."""

import json
import math
import warnings
from unittest import mock

import pytest
import test_hf_llama
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
    assert_exported_as,
    assert_same_weights,
    llama_logits,
    llama_state_dict,
)

from llmkern.model import GPT, GPTConfig
from llmkern.model.hf import (
    config_from_hf_llama,
    config_from_hf_phi3,
    from_hf_llama,
    from_hf_phi3,
    load_hf_file,
    load_hf_phi3,
    to_hf_llama,
    to_hf_phi3,
)
from llmkern.model.hf_llama_config import hf_phi3_config

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
    assert_exported_as(out, sd)
    if tied:
        assert out["lm_head.weight"] is out["model.embed_tokens.weight"]
    assert out_cfg["model_type"] == "phi3" and out_cfg["architectures"] == ["Phi3ForCausalLM"]
    assert (out_cfg["rope_scaling"], out_cfg["sliding_window"], out_cfg["partial_rotary_factor"]) == (None, CTX, 1.0)
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
    assert cfg2["sliding_window"] is None  # no window: null, as Phi3Config's default
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
    assert meta["source"] == "hf-phi3"  # its own label, though Llama's model
    (tmp_path / "config.json").write_text(json.dumps(phi3_config_json(partial_rotary_factor=0.5625)))
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5625"):  # 9 of 16 dims: odd
        load_hf_file(str(path))


def test_a_short_sliding_window_loads_whole_and_gives_the_windowed_logits():
    """Phi-3-mini-4k's sliding_window 2047 beside max_position_embeddings 4096 (here CTX // 2 - 1 of CTX): loaded
    with its whole context, the window as GPTConfig.sliding_window, no warning; transformers' logits on a sequence
    longer than the window; exported with the window again."""
    window = CTX // 2 - 1
    sd, cfg = phi3_state_dict(), phi3_config_json(sliding_window=window)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = from_hf_phi3(sd, cfg, backend="torch")
    assert (model.config.block_size, model.config.sliding_window) == (CTX, window)
    idx = torch.randint(0, VOCAB, (2, CTX))
    expected = phi3_logits(sd, idx, cfg)
    torch.testing.assert_close(logits_of(model, idx), expected, rtol=1e-4, atol=1e-4)  # fp32 against float64
    assert not torch.allclose(phi3_logits(sd, idx, {**cfg, "sliding_window": None}), expected, atol=1e-3)
    out, out_cfg = to_hf_phi3(model)
    assert (out_cfg["model_type"], out_cfg["sliding_window"]) == ("phi3", window)
    assert from_hf_phi3(out, json.loads(json.dumps(out_cfg)), backend="torch").config == model.config


def test_training_time_dropouts_are_accepted_and_left_out():
    sd, cfg = phi3_state_dict(), phi3_config_json(attention_dropout=0.1, embd_pdrop=0.1, resid_pdrop=0.1)
    model = from_hf_phi3(sd, cfg, backend="torch")
    assert model.config.dropout == 0.0
    idx = torch.randint(0, VOCAB, (1, 8))
    torch.testing.assert_close(logits_of(model, idx), phi3_logits(sd, idx, cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling .*'linear'"),
    # YaRN's own keys: Phi3Config reads "yarn" as longrope, which has none of them
    ({"rope_scaling": {"type": "yarn", "factor": 2.0, "beta_fast": 32.0}},
     r"longrope RoPE scaling has \['beta_fast'\]"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}}, "a Phi-3 model here computes plain RoPE"),
    # RoPE on an odd number of each head's dims (int(16 * 0.5625) = 9), here and where transformers 5 writes it
    ({"partial_rotary_factor": 0.5625}, "partial_rotary_factor=0.5625"),
    ({"rope_theta": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5625}},
     "partial_rotary_factor=0.5625"),
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


# LongRoPE (Phi-3-mini-128k, Phi-3.5-mini): a context of CTX positions stretched 4 times past an original one
ORIGINAL = CTX // 4


def phi3_longrope_json(**changes) -> dict:
    """The config.json of a longrope Phi-3, written as Phi-3.5-mini's is: rope_scaling {"type": "longrope",
    "short_factor", "long_factor"} (D / 2 random factors each: short ones near 1, long ones up to 8) and
    original_max_position_embeddings at the top level, beside a longer max_position_embeddings."""
    scaling = {"type": "longrope", "short_factor": (1 + 0.5 * torch.rand(D // 2, dtype=torch.float64)).tolist(),
               "long_factor": (1 + 7 * torch.rand(D // 2, dtype=torch.float64)).tolist()}
    return phi3_config_json(**{"rope_scaling": scaling, "original_max_position_embeddings": ORIGINAL, **changes})


def hf_attention_factor(cfg: dict) -> float:
    """transformers' LongRoPE attention factor for a config.json that names none: sqrt(1 + ln(s) / ln(original))
    for the stretch s = max_position_embeddings / original_max_position_embeddings, 1 when s <= 1."""
    original = cfg["original_max_position_embeddings"]
    stretch = cfg["max_position_embeddings"] / original
    return 1.0 if stretch <= 1 else math.sqrt(1 + math.log(stretch) / math.log(original))


def phi3_longrope_logits(sd: dict[str, torch.Tensor], idx: torch.Tensor, cfg: dict,
                         attention_factor: float | None = None) -> torch.Tensor:
    """phi3_logits with LongRoPE as transformers applies it to a sequence of idx's length: frequency i is
    theta^(-2i/D) / factor_i, the factors long_factor's for a sequence longer than original_max_position_embeddings
    and short_factor's otherwise, and cos and sin are multiplied by the attention factor (given, config.json's,
    or hf_attention_factor). Multiplying cos and sin by a multiplies q and k after RoPE, a linear map, by a: it
    enters the reference as q_proj and k_proj multiplied by a."""
    scaling = cfg["rope_scaling"]
    long = idx.shape[1] > scaling.get("original_max_position_embeddings", cfg["original_max_position_embeddings"])
    factors = scaling["long_factor" if long else "short_factor"]
    freqs = [1 / (f * cfg["rope_theta"] ** (2 * i / D)) for i, f in enumerate(factors)]
    a = attention_factor or scaling.get("attention_factor") or hf_attention_factor(cfg)
    weights = split_as_transformers(sd, cfg)
    for name in weights:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            weights[name] = weights[name].double() * a  # in float64: bf16 weights would be rounded
    with mock.patch.object(test_hf_llama, "reference_inv_freq", lambda cfg, d: freqs):
        return llama_logits(weights, idx, cfg)


def test_a_longrope_context_past_the_original_one_loads_without_a_warning():
    """Each forward pass picks short_factor or long_factor by its sequence's length, as transformers does, so a
    block_size past the original context computes transformers' logits on every sequence: nothing to warn of."""
    cfg = phi3_longrope_json()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_hf_phi3(cfg).block_size == CTX
        assert config_from_hf_phi3(cfg, block_size=ORIGINAL).block_size == ORIGINAL


@pytest.mark.parametrize("block_size, seq_len", [(None, CTX), (None, ORIGINAL + 1), (None, ORIGINAL), (None, 3),
                                                 (ORIGINAL, ORIGINAL), (ORIGINAL, 3)])
def test_longrope_import_gives_the_reference_logits(tmp_path, block_size, seq_len):
    """A longrope Phi-3 read from its folder (config.json, bf16 safetensors) gives transformers' logits on every
    sequence it takes: long_factor on one longer than the original context, short_factor on one no longer than it,
    whether block_size is max_positions_embeddings or the original context."""
    sd, cfg = phi3_state_dict(), phi3_longrope_json()
    (path,) = _save(tmp_path, sd, cfg, dtype=torch.bfloat16)
    model, _ = load_hf_file(str(path), backend="torch", **({} if block_size is None else {"block_size": block_size}))
    scaling = model.config.rope_scaling
    assert scaling == {"rope_type": "longrope", "short_factor": cfg["rope_scaling"]["short_factor"],
                       "long_factor": cfg["rope_scaling"]["long_factor"], "original_max_position_embeddings": ORIGINAL,
                       "attention_factor": pytest.approx(math.sqrt(1 + math.log(4) / math.log(ORIGINAL)), rel=1e-12)}
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    idx = torch.randint(0, VOCAB, (2, seq_len))
    torch.testing.assert_close(logits_of(model, idx), phi3_longrope_logits(bf16, idx, cfg), rtol=1e-5, atol=1e-5)
    # the config is saved with the model's checkpoints and read back
    assert GPTConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))) == model.config


def test_longrope_reference_sees_what_the_import_could_get_wrong():
    """Short and long factors swapped, or the attention factor left out: the logits move past the tolerance. And
    a sequence no longer than the original context takes short_factor whatever block_size is: the logits of a
    model cut to that context, not the start of a long sequence's (long_factor at every position)."""
    sd, cfg = phi3_state_dict(), phi3_longrope_json()
    idx = torch.randint(0, VOCAB, (1, CTX))
    right = phi3_longrope_logits(sd, idx, cfg)
    factors = cfg["rope_scaling"]
    swapped = {**cfg, "rope_scaling": {**factors, "short_factor": factors["long_factor"],
                                       "long_factor": factors["short_factor"]}}
    assert not torch.allclose(logits_of(from_hf_phi3(sd, swapped, backend="torch"), idx), right, atol=1e-3)
    assert not torch.allclose(phi3_longrope_logits(sd, idx, cfg, attention_factor=1.0), right, atol=1e-3)
    short = idx[:, :ORIGINAL]
    model = from_hf_phi3(sd, cfg, backend="torch")
    cut = from_hf_phi3(sd, cfg, backend="torch", block_size=ORIGINAL)
    torch.testing.assert_close(logits_of(model, short), logits_of(cut, short), rtol=0, atol=0)
    assert not torch.allclose(logits_of(model, short), right[:, :ORIGINAL], atol=1e-3)


def test_longrope_config_json_is_read_as_transformers_reads_it():
    base = phi3_longrope_json()
    expected = config_from_hf_phi3(base).rope_scaling
    factors = {k: base["rope_scaling"][k] for k in ("short_factor", "long_factor")}
    # an attention factor named in config.json is taken as it is; with no stretch it is 1
    named = {**base, "rope_scaling": {**base["rope_scaling"], "attention_factor": 1.5}}
    assert config_from_hf_phi3(named).rope_scaling == {**expected, "attention_factor": 1.5}
    assert config_from_hf_phi3({**base, "max_position_embeddings": ORIGINAL}).rope_scaling["attention_factor"] == 1.0
    # "su", the name Phi-3-mini-128k's config.json first had; transformers 5's rope_parameters, the original
    # context inside them; a factor equal to the stretch
    su = {**base, "rope_scaling": {**base["rope_scaling"], "type": "su"}}
    v5_parameters = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 1.0, **factors,
                     "original_max_position_embeddings": ORIGINAL}
    v5 = {**{k: v for k, v in base.items() if k not in ("rope_scaling", "original_max_position_embeddings")},
          "rope_theta": None, "rope_parameters": v5_parameters}
    with_factor = {**base, "rope_scaling": {**base["rope_scaling"], "factor": 4.0}}
    for other in (su, v5, with_factor):
        assert config_from_hf_phi3(other).rope_scaling == expected
    # no original_max_position_embeddings anywhere: Phi3Config's 4096, so no stretch of this context of CTX
    bare = {k: v for k, v in base.items() if k != "original_max_position_embeddings"}
    assert config_from_hf_phi3(bare).rope_scaling == {**expected, "original_max_position_embeddings": 4096,
                                                      "attention_factor": 1.0}


@pytest.mark.parametrize("tied", [False, True])
def test_longrope_export_round_trips(tied):
    sd, cfg = phi3_state_dict(tied), phi3_longrope_json(tie_word_embeddings=tied)
    factors = {k: cfg["rope_scaling"][k] for k in ("short_factor", "long_factor")}
    model = from_hf_phi3(sd, cfg, backend="torch")
    out, out_cfg = to_hf_phi3(model)
    # Phi-3.5-mini's own spelling: every transformers version reads it (those before 5 no other)
    assert out_cfg["rope_scaling"] == {"type": "longrope", **factors}
    assert (out_cfg["max_position_embeddings"], out_cfg["original_max_position_embeddings"]) == (CTX, ORIGINAL)
    back = from_hf_phi3(out, json.loads(json.dumps(out_cfg)), backend="torch")
    assert back.config == model.config
    idx = torch.randint(0, VOCAB, (1, CTX))
    assert torch.equal(logits_of(back, idx), logits_of(model, idx))
    # loaded with block_size cut to the original context, its attention factor is still max_position_embeddings':
    # written out, since transformers would work out 1 from the max_position_embeddings written (block_size)
    short = from_hf_phi3(sd, cfg, backend="torch", block_size=ORIGINAL)
    out, out_cfg = to_hf_phi3(short)
    assert out_cfg["rope_scaling"] == {"rope_type": "longrope", **factors, "original_max_position_embeddings": ORIGINAL,
                                       "attention_factor": short.config.rope_scaling["attention_factor"]}
    assert out_cfg["max_position_embeddings"] == ORIGINAL
    back = from_hf_phi3(out, json.loads(json.dumps(out_cfg)), backend="torch")
    assert back.config == short.config
    idx = torch.randint(0, VOCAB, (1, ORIGINAL))
    assert torch.equal(logits_of(back, idx), logits_of(short, idx))
    torch.testing.assert_close(logits_of(back, idx), phi3_longrope_logits(sd, idx, out_cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"short_factor": [1.0] * (D // 2 - 1)}, (r"config.json's longrope RoPE scaling is not one the model takes: "
                                              r"rope_scaling\['short_factor'\] must be a list of head_dim / 2 = 8")),
    ({"long_factor": None}, r"rope_scaling\['long_factor'\] must be a list"),
    ({"long_factor": [1.0] * (D // 2 - 1) + [-2.0]}, r"rope_scaling\['long_factor\[7\]'\] must be a finite number > 0"),
    ({"attention_factor": 0}, r"rope_scaling\['attention_factor'\] must be a finite number > 0"),
    ({"factor": 2.0}, "factor=2.0, not max_position_embeddings / original_max_position_embeddings = 4.0"),
    ({"original_max_position_embeddings": 2 * ORIGINAL},
     f"original_max_position_embeddings={ORIGINAL}, and {2 * ORIGINAL} in its RoPE scaling"),
    ({"short_mscale": 1.0}, r"longrope RoPE scaling has \['short_mscale'\]"),  # Phi-3-small's (another model)
])
def test_a_bad_longrope_config_json_is_refused(change, message):
    cfg = phi3_longrope_json()
    cfg["rope_scaling"].update(change)
    with pytest.raises(ValueError, match=message):
        config_from_hf_phi3(cfg)


def test_longrope_is_refused_where_it_is_not_phi3s():
    cfg = phi3_longrope_json()
    del cfg["rope_scaling"]["long_factor"]
    with pytest.raises(ValueError, match=r"missing \['long_factor'\]"):
        config_from_hf_phi3(cfg)
    with pytest.raises(ValueError, match="original_max_position_embeddings must be an int >= 1"):
        config_from_hf_phi3(phi3_longrope_json(original_max_position_embeddings=0))
    # a Llama config.json with it, and a longrope model exported as Llama's
    llama = {**phi3_longrope_json(), "model_type": "llama", "sliding_window": None}
    with pytest.raises(ValueError, match="a Llama model here computes plain RoPE or Llama 3.1's 'llama3' or 'linear' scaling"):
        config_from_hf_llama(llama)
    model = from_hf_phi3(phi3_state_dict(), phi3_longrope_json(), backend="torch")
    with pytest.raises(ValueError, match="longrope RoPE scaling is Phi-3's: a model with it exports as Phi-3's"):
        to_hf_llama(model)


# Phi-4-mini: RoPE on 3/4 of each head (partial_rotary_factor 0.75: the first 12 of D = 16 dims here), longrope
# factors for its 12 / 2 = 6 frequencies, tied embeddings, grouped-query attention (HEADS / KV_HEADS)
ROPE_DIM = 12


def phi4_mini_json(**changes) -> dict:
    """The config.json of a tiny Phi-4-mini, written as Phi-4-mini-instruct's is: partial_rotary_factor 0.75 at its
    top level, a longrope rope_scaling of ROPE_DIM / 2 factors each, original_max_position_embeddings, tied
    embeddings, its bias flags (all false) and keys transformers' Phi3Config does not read, a long sliding window."""
    scaling = {"type": "longrope",
               "short_factor": (1 + 0.5 * torch.rand(ROPE_DIM // 2, dtype=torch.float64)).tolist(),
               "long_factor": (1 + 7 * torch.rand(ROPE_DIM // 2, dtype=torch.float64)).tolist()}
    phi4 = {"partial_rotary_factor": 0.75, "rope_scaling": scaling, "original_max_position_embeddings": ORIGINAL,
            "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "lm_head_bias": False,
            "full_attn_mod": 1, "interpolate_factor": 1, "sliding_window": 2 * CTX}
    return phi3_config_json(**{**phi4, **changes})


def partial_rotary_logits(sd: dict[str, torch.Tensor], idx: torch.Tensor, cfg: dict,
                          long: bool | list[bool] | None = None, scale_kept: bool = False) -> torch.Tensor:
    """Phi-3's forward in float64, written here from transformers' definition with partial_rotary_factor p and
    longrope: RoPE on each head's first r = int(D * p) dims of q and k only, pair (x[j], x[j + r/2]) turning by
    position * theta^(-2j/r) / factor_j (long_factor's on a sequence longer than original_max_position_embeddings,
    short_factor's otherwise, unless `long` says which: for all tokens, or one flag per token, as transformers'
    KV cache holds each token's q and k turned with the factors of the forward pass that computed it), cos and
    sin multiplied by the attention factor; the other D - r dims pass as they are. scale_kept: multiply those by
    the attention factor too (a wrong model, for the tests to see)."""
    w = {k.removeprefix("model."): v.double() for k, v in split_as_transformers(sd, cfg).items()}
    heads, kv_heads, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    b, t = idx.shape
    r = int(D * cfg["partial_rotary_factor"])
    scaling = cfg["rope_scaling"]
    if long is None:
        long = t > cfg["original_max_position_embeddings"]
    if isinstance(long, bool):
        long = [long] * t
    inv_freq = torch.tensor([[1 / (f * cfg["rope_theta"] ** (2 * j / r))
                              for j, f in enumerate(scaling["long_factor" if token_long else "short_factor"])]
                             for token_long in long], dtype=torch.float64)  # (T, r/2): each token's factors
    angle = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq  # (T, r/2)
    a = hf_attention_factor(cfg)
    cos, sin = torch.cat([angle.cos()] * 2, -1) * a, torch.cat([angle.sin()] * 2, -1) * a  # (T, r)

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate(x):  # (B, heads, T, D)
        turned, kept = x[..., :r], x[..., r:]
        rotated_half = torch.cat([-turned[..., r // 2:], turned[..., : r // 2]], -1)
        return torch.cat([turned * cos + rotated_half * sin, kept * a if scale_kept else kept], -1)

    x = w["embed_tokens.weight"][idx]
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        layer = {k.removeprefix(f"layers.{i}."): v for k, v in w.items() if k.startswith(f"layers.{i}.")}
        h = rms_norm(x, layer["input_layernorm.weight"])
        q, k, v = (
            (h @ layer[f"self_attn.{name}.weight"].t()).view(b, t, n, D).transpose(1, 2)
            for name, n in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads))
        )
        q, k = rotate(q), rotate(k)
        k, v = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (k, v))  # query head j reads kv head j // g
        att = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(future, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(b, t, heads * D) @ layer["self_attn.o_proj.weight"].t()
        h = rms_norm(x, layer["post_attention_layernorm.weight"])
        gate, up = h @ layer["mlp.gate_proj.weight"].t(), h @ layer["mlp.up_proj.weight"].t()
        x = x + (torch.nn.functional.silu(gate) * up) @ layer["mlp.down_proj.weight"].t()
    return (rms_norm(x, w["norm.weight"]) @ w["lm_head.weight"].t()).float()  # float32, as the model's


@pytest.mark.parametrize("block_size, seq_len", [(None, CTX), (None, 3), (ORIGINAL, ORIGINAL), (ORIGINAL, 3)])
def test_phi4_mini_import_gives_the_reference_logits(tmp_path, block_size, seq_len):
    """A tiny Phi-4-mini read from its folder (config.json, bf16 safetensors without lm_head: tied) gives the
    reference's logits, RoPE on the first 12 of each head's 16 dims, with long_factor (on a sequence past the
    original context) and with short_factor (on a shorter one, whether block_size is cut to the original context
    or not)."""
    sd, cfg = phi3_state_dict(tied=True), phi4_mini_json()
    (path,) = _save(tmp_path, sd, cfg, dtype=torch.bfloat16)
    overrides = {} if block_size is None else {"block_size": block_size}
    model, model_type = load_hf_file(str(path), backend="torch", **overrides)
    c = model.config
    assert model_type == "phi3"
    assert (c.head_dim, c.rope_dim, c.n_head, c.n_kv_head, c.tie_embeddings, c.vocab_size, c.bias) == (
        D, ROPE_DIM, HEADS, KV_HEADS, True, VOCAB, False)
    assert c.rope_scaling["short_factor"] == cfg["rope_scaling"]["short_factor"]
    assert c.rope_scaling["long_factor"] == cfg["rope_scaling"]["long_factor"]
    assert model.lm_head.weight is model.wte.weight
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    idx = torch.randint(0, VOCAB, (2, seq_len))
    torch.testing.assert_close(logits_of(model, idx), partial_rotary_logits(bf16, idx, cfg), rtol=1e-5, atol=1e-5)
    assert GPTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c  # saved with checkpoints, read back


def test_the_partial_rotary_reference_agrees_with_the_longrope_one_and_sees_a_wrong_model():
    """At partial_rotary_factor 1 the reference written here is test_hf_llama's longrope forward; at 0.75 its
    logits move past the tolerance when the unrotated dims get the attention factor too, or when all of each head
    turns (the model imported with partial_rotary_factor 1 and factors for all D / 2 frequencies)."""
    sd = phi3_state_dict(tied=True)
    idx = torch.randint(0, VOCAB, (1, CTX))
    whole = phi3_longrope_json(tie_word_embeddings=True)
    torch.testing.assert_close(partial_rotary_logits(sd, idx, {**whole, "partial_rotary_factor": 1.0}),
                               phi3_longrope_logits(sd, idx, whole), rtol=1e-6, atol=1e-6)
    cfg = phi4_mini_json()
    right = partial_rotary_logits(sd, idx, cfg)
    torch.testing.assert_close(logits_of(from_hf_phi3(sd, cfg, backend="torch"), idx), right, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(partial_rotary_logits(sd, idx, cfg, scale_kept=True), right, atol=1e-3)
    assert not torch.allclose(logits_of(from_hf_phi3(sd, whole, backend="torch"), idx), right, atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("prompts, max_new_tokens", [
    ([[5, 17, 3], [11, 2, 2, 9, 44], [60]], 4),  # at most 8 tokens fed: short_factor throughout
    ([[5, 17, 3, 8, 1, 9, 20, 4, 6], [11, 2, 2, 9, 44, 80, 7, 60, 1, 3, 5], [60] * 10], 12),  # past 8: long_factor
])
def test_phi4_mini_generates_the_same_with_and_without_the_kv_cache(prompts, max_new_tokens):
    """Generation that stays on one side of the original context (8 tokens) gives the same tokens with the KV
    cache and without, and each row is greedy decoding by the reference (transformers' choice of factors by the
    sequence's length), alone."""
    from llmkern.model import generate

    sd, cfg = phi3_state_dict(tied=True), phi4_mini_json()
    model = from_hf_phi3(sd, cfg, backend="torch").eval()
    for p in model.parameters():
        p.mul_(2.0)  # sharper attention (weights of 0.4): a wrong angle changes the tokens
    sd = {k: 2.0 * v for k, v in sd.items()}
    cached = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0)  # left-padded
    assert cached == generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0, use_cache=False)
    for prompt, row in zip(prompts, cached):
        seq = list(prompt)
        for _ in range(max_new_tokens):
            seq.append(int(partial_rotary_logits(sd, torch.tensor([seq]), cfg)[0, -1].argmax()))
        assert row == seq


@torch.no_grad()
def test_longrope_kv_cache_keeps_the_factors_each_token_was_cached_with():
    """Decoding with the KV cache past the original context (8 tokens) from a prompt of 5, as transformers does:
    each step takes the factors of a sequence of every token so far (position + 1), and the keys cached before
    keep the short_factor turn they were cached with. So the logits are those of the reference with each token
    turned as the forward pass that computed it turned it, not the uncached sequence's (long_factor at every
    position, once past 8)."""
    from llmkern.model.kv_cache import KVCache

    sd, cfg = phi3_state_dict(tied=True), phi4_mini_json()
    model = from_hf_phi3(sd, cfg, backend="torch").eval()
    prompt, total = 5, 12
    idx = torch.randint(0, VOCAB, (1, total))
    cache = KVCache(model.config.n_layer, capacity=total)
    steps = [model.hidden_states(idx[:, :prompt], cache=cache)]
    steps += [model.hidden_states(idx[:, j : j + 1], cache=cache) for j in range(prompt, total)]
    cached = model.head(torch.cat(steps, dim=1))
    # each token's forward pass: the prefill's 5 tokens, then position j's j + 1
    long = [(prompt if j < prompt else j + 1) > ORIGINAL for j in range(total)]
    assert long == [False] * 8 + [True] * 4
    torch.testing.assert_close(cached, partial_rotary_logits(sd, idx, cfg, long=long), rtol=1e-5, atol=1e-5)
    uncached = partial_rotary_logits(sd, idx, cfg)  # long_factor at every position
    assert not torch.allclose(cached[:, ORIGINAL:], uncached[:, ORIGINAL:], atol=1e-3)
    torch.testing.assert_close(logits_of(model, idx), uncached, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_len", [ORIGINAL, ORIGINAL + 1])
def test_longrope_factors_are_chosen_under_a_fullgraph_compile(seq_len):
    """The choice of factors compiles without a graph break: by the sequence's length (an int), or by the
    largest of explicit positions (a tensor, which a Python comparison would break the graph on), and the compiled
    logits are the reference's."""
    sd, cfg = phi3_state_dict(tied=True), phi4_mini_json()
    model = from_hf_phi3(sd, cfg, backend="torch").eval()
    idx = torch.randint(0, VOCAB, (2, seq_len))
    right = partial_rotary_logits(sd, idx, cfg)
    positions = torch.arange(seq_len).expand(2, seq_len)

    def logits(idx, positions):
        return model.head(model.hidden_states(idx)), model.head(model.hidden_states(idx, positions))

    with torch.no_grad():  # dynamo's trace is what breaks on a graph break: no need for a compiler behind it
        by_length, by_positions = torch.compile(logits, fullgraph=True, backend="eager")(idx, positions)
    torch.testing.assert_close(by_length, right, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_positions, right, rtol=1e-5, atol=1e-5)


def test_phi4_mini_export_round_trips():
    sd, cfg = phi3_state_dict(tied=True), phi4_mini_json()
    model = from_hf_phi3(sd, cfg, backend="torch")
    out, out_cfg = to_hf_phi3(model)
    factors = {k: cfg["rope_scaling"][k] for k in ("short_factor", "long_factor")}
    assert (out_cfg["partial_rotary_factor"], out_cfg["rope_scaling"]) == (0.75, {"type": "longrope", **factors})
    assert out["lm_head.weight"] is out["model.embed_tokens.weight"]
    assert_exported_as(out, sd)
    back = from_hf_phi3(out, json.loads(json.dumps(out_cfg)), backend="torch")
    assert back.config == model.config and back.config.rope_dim == ROPE_DIM
    idx = torch.randint(0, VOCAB, (1, CTX))
    assert torch.equal(logits_of(back, idx), logits_of(model, idx))
    # a rope_dim whose share of head_dim, divided out, rounds below it (int(44 * (30 / 44)) is 29): written so
    # that transformers' int(head_dim * factor) gives it back
    heads_of_44 = GPTConfig.from_preset("tiny-llama", n_embd=88, rope_dim=30)
    written = json.loads(json.dumps(hf_phi3_config(heads_of_44, torch.float32)))
    assert int(44 * written["partial_rotary_factor"]) == 30
    assert (config_from_hf_phi3(written).head_dim, config_from_hf_phi3(written).rope_dim) == (44, 30)
    # Llama's and Qwen's models turn all of each head: such a model is Phi-3's to export
    partial = GPT(GPTConfig.from_preset("tiny-llama", vocab_size=VOCAB, rope_dim=48))
    with pytest.raises(ValueError, match=r"RoPE on part of each head \(rope_dim=48 of head_dim=64\) is Phi-3's"):
        to_hf_llama(partial)
    sd2, cfg2 = to_hf_phi3(partial)  # and as Phi-3's it reads back as the same model
    assert_same_weights(from_hf_phi3(sd2, json.loads(json.dumps(cfg2)), backend="torch"), partial)
    assert config_from_hf_phi3(json.loads(json.dumps(cfg2))).rope_dim == 48


def test_partial_rotary_factor_is_read_where_each_transformers_version_writes_it():
    base = phi4_mini_json()
    expected = config_from_hf_phi3(base)
    assert expected.rope_dim == ROPE_DIM
    # transformers 5: partial_rotary_factor, the factors and the original context in rope_parameters
    factors = {k: base["rope_scaling"][k] for k in ("short_factor", "long_factor")}
    parameters = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75, **factors,
                  "original_max_position_embeddings": ORIGINAL}
    v5 = {**{k: v for k, v in base.items()
             if k not in ("rope_scaling", "partial_rotary_factor", "original_max_position_embeddings")},
          "rope_theta": None, "rope_parameters": parameters}
    assert config_from_hf_phi3(v5) == expected
    # int(), as transformers takes it: 0.8 of 16 is 12.8, so 12
    assert config_from_hf_phi3(phi4_mini_json(partial_rotary_factor=0.8)).rope_dim == ROPE_DIM
    # 1 or none (Phi-3's): all of each head, the config of a model without rope_dim
    for cfg in (phi3_config_json(partial_rotary_factor=1.0), phi3_config_json(partial_rotary_factor=1)):
        assert config_from_hf_phi3(cfg) == config_from_hf_phi3(phi3_config_json())
        assert config_from_hf_phi3(cfg).rope_dim is None


@pytest.mark.parametrize("change, message", [
    ({"partial_rotary_factor": 0.5625}, r"partial_rotary_factor=0.5625: RoPE on int\(16 \* 0.5625\) = 9 of each"),
    ({"partial_rotary_factor": 0.1}, r"int\(16 \* 0.1\) = 1 of each head's dims"),
    ({"partial_rotary_factor": 0}, r"partial_rotary_factor must be a number in \(0, 1\], got 0"),
    ({"partial_rotary_factor": 1.5}, r"partial_rotary_factor must be a number in \(0, 1\], got 1.5"),
    ({"partial_rotary_factor": "0.75"}, r"partial_rotary_factor must be a number in \(0, 1\], got '0.75'"),
    ({"partial_rotary_factor": True}, r"partial_rotary_factor must be a number in \(0, 1\], got True"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     r"partial_rotary_factor \[0.75, 0.5\] in different places"),
    # longrope factors for all D / 2 frequencies, where RoPE turns 12 dims: 6 of them
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * (D // 2), "long_factor": [1.0] * (D // 2)}},
     r"rope_scaling\['short_factor'\] must be a list of rope_dim / 2 = 6 numbers"),
])
def test_a_bad_partial_rotary_config_json_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf_phi3(phi4_mini_json(**change))
