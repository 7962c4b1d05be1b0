"""Hugging Face Qwen3 weights (Qwen3ForCausalLM: Llama's names, no biases, plus q_norm and k_norm; heads of
config.json's head_dim, wider than hidden_size / num_attention_heads): a synthetic state dict goes in, gives the
logits of the plain float64 forward of test_hf_llama (QK-norm before RoPE), and comes back out bit for bit."""

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
    assert_exported_as,
    assert_same_weights,
    llama_logits,
    llama_state_dict,
)

from llmkern.model import GPT, GPTConfig
from llmkern.model.hf import (
    config_from_hf_llama,
    from_hf_llama,
    load_hf_file,
    to_hf_llama,
)

HEAD_DIM = 32  # 4 heads of 32: q_proj 64 -> 128 and o_proj 128 -> 64, as Qwen3-0.6B's 1024 -> 2048 -> 1024


def qwen3_config_json(**changes) -> dict:
    """The config.json of a Qwen3ForCausalLM of qwen3_state_dict's sizes, written as Qwen3-0.6B's is: a sliding
    window named but off (shorter than the context here: it must be ignored)."""
    config = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": VOCAB,
              "hidden_size": EMBD, "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "hidden_act": "silu", "max_position_embeddings": CTX, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
              "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
              "sliding_window": 8, "max_window_layers": LAYERS, "tie_word_embeddings": True,
              "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "use_cache": True}
    return {**config, **changes}


def qwen3_state_dict(tied: bool = True) -> dict[str, torch.Tensor]:
    return llama_state_dict(tied, head_dim=HEAD_DIM, qk_norm=True)


def logits_of(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    return model.eval()(idx)[0]


@pytest.mark.parametrize("tied", [True, False])
def test_import_gives_qwen3_logits(tied):
    sd, cfg = qwen3_state_dict(tied), qwen3_config_json(tie_word_embeddings=tied)
    model = from_hf_llama(sd, cfg, backend="torch")
    c = model.config
    assert (c.head_dim, c.qk_norm, c.qkv_bias, c.bias, c.n_kv_head, c.tie_embeddings) == (
        HEAD_DIM, True, False, False, KV_HEADS, tied)
    assert (c.rope_theta, c.norm_eps) == (1e6, 1e-6)
    attn = model.blocks[0].attn
    assert attn.qkv.weight.shape == ((HEADS + 2 * KV_HEADS) * HEAD_DIM, EMBD)
    assert attn.proj.weight.shape == (EMBD, HEADS * HEAD_DIM) and attn.q_norm.eps == 1e-6
    assert torch.equal(attn.k_norm.weight, sd["model.layers.0.self_attn.k_norm.weight"])
    idx = torch.randint(0, VOCAB, (2, CTX))  # the whole context, past the sliding window that is off
    torch.testing.assert_close(logits_of(model, idx), llama_logits(sd, idx, cfg), rtol=1e-5, atol=1e-5)


def test_the_reference_sees_where_qk_norm_goes():
    """The comparison above would pass a misplaced QK-norm if the reference could not tell: normed after RoPE
    (the scales differ between the rotated pairs' dims; the RMS alone is rotation-invariant), left out, or q's and
    k's scales swapped, the logits move far past the tolerance."""
    sd, cfg = qwen3_state_dict(), qwen3_config_json()
    idx = torch.randint(0, VOCAB, (1, 16))
    right = llama_logits(sd, idx, cfg)
    assert not torch.allclose(llama_logits(sd, idx, cfg, qk_norm_after_rope=True), right, atol=1e-3)
    skipped = {k: v for k, v in sd.items() if not k.endswith(("q_norm.weight", "k_norm.weight"))}
    assert not torch.allclose(llama_logits(skipped, idx, cfg), right, atol=1e-3)
    swapped = {**sd, "model.layers.0.self_attn.q_norm.weight": sd["model.layers.0.self_attn.k_norm.weight"],
               "model.layers.0.self_attn.k_norm.weight": sd["model.layers.0.self_attn.q_norm.weight"]}
    assert not torch.allclose(logits_of(from_hf_llama(swapped, cfg, backend="torch"), idx), right, atol=1e-3)


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_export_round_trips_bitwise(tied):
    sd, cfg = qwen3_state_dict(tied), qwen3_config_json(tie_word_embeddings=tied)
    model = from_hf_llama(sd, cfg, backend="torch")
    out, out_cfg = to_hf_llama(model)
    assert_exported_as(out, sd)
    assert out_cfg["model_type"] == "qwen3" and out_cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert (out_cfg["head_dim"], out_cfg["attention_bias"], out_cfg["use_sliding_window"]) == (HEAD_DIM, False, False)
    assert "mlp_bias" not in out_cfg and out_cfg["tie_word_embeddings"] == tied
    back = from_hf_llama(out, json.loads(json.dumps(out_cfg)), backend="torch")
    assert back.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    # and a llmkern model with QK-norm and wide heads exports as Qwen3's and reads back as the same model
    ours = GPT(GPTConfig.from_preset("tiny-llama", vocab_size=VOCAB, head_dim=96, qk_norm=True, backend="torch"))
    sd2, cfg2 = to_hf_llama(ours)
    assert cfg2["model_type"] == "qwen3" and sd2["model.layers.1.self_attn.o_proj.weight"].shape == (128, 2 * 96)
    again = from_hf_llama(sd2, json.loads(json.dumps(cfg2)), backend="torch")
    assert_same_weights(again, ours)


def test_a_qwen3_folder_is_read_and_generates_as_the_reference(tmp_path):
    from llmkern.model.generate import generate
    from llmkern.train.inference import load_gpt

    sd, cfg = qwen3_state_dict(), qwen3_config_json()
    (path,) = _save(tmp_path, sd, cfg, dtype=torch.bfloat16)
    model, model_type = load_hf_file(str(path), backend="torch")
    assert model_type == "qwen3" and model.config.qk_norm and model.config.head_dim == HEAD_DIM
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}  # bf16 weights, read exactly
    idx = torch.randint(0, VOCAB, (1, 9))
    torch.testing.assert_close(logits_of(model, idx), llama_logits(bf16, idx, cfg), rtol=1e-5, atol=1e-5)
    model, _, meta = load_gpt(str(path), backend="torch", hf_tokenizer="bytes")
    assert meta["source"] == "hf-llama"
    # greedy decoding with the KV cache: each new token is the argmax of the reference's logits
    out = generate(model.eval(), [idx[0, :5].tolist()], max_new_tokens=4, temperature=0.0)[0]
    for n in range(5, 9):
        assert out[n] == int(llama_logits(bf16, torch.tensor([out[:n]]), cfg)[0, -1].argmax())


def test_head_dim_defaults_as_transformers_configs_do():
    """Absent from config.json: Qwen3Config's 128; Llama's (and Qwen2's) hidden_size / num_attention_heads."""
    no_head_dim = {k: v for k, v in qwen3_config_json(sliding_window=None).items() if k != "head_dim"}
    assert config_from_hf_llama(no_head_dim).head_dim == 128
    assert config_from_hf_llama({**no_head_dim, "model_type": "llama"}).head_dim == EMBD // HEADS
    assert config_from_hf_llama({**no_head_dim, "model_type": "qwen2"}).head_dim == EMBD // HEADS
    assert config_from_hf_llama(qwen3_config_json(head_dim=None)).head_dim == 128
    with pytest.raises(ValueError, match="no head_dim, and hidden_size=64 is not a multiple of num_attention_heads=3"):
        config_from_hf_llama({**no_head_dim, "model_type": "llama", "num_attention_heads": 3,
                              "num_key_value_heads": 3})


def test_a_llama_with_heads_of_its_own_width_gives_the_reference_logits():
    # Mistral NeMo's shape: heads of config.json's head_dim, not hidden_size / num_attention_heads
    sd = llama_state_dict(head_dim=HEAD_DIM)
    for model_type in ("llama", "mistral"):
        cfg = {**qwen3_config_json(model_type=model_type, tie_word_embeddings=False), "sliding_window": None}
        model = from_hf_llama(sd, cfg, backend="torch")
        assert (model.config.head_dim, model.config.qk_norm) == (HEAD_DIM, False)
        idx = torch.randint(0, VOCAB, (1, 12))
        torch.testing.assert_close(logits_of(model, idx), llama_logits(sd, idx, cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias=True; the Llama model here has no biases"),
    ({"use_sliding_window": "no"}, "use_sliding_window must be true or false, got 'no'"),
    ({"head_dim": 0}, "head_dim must be an int >= 1, got 0"),
    ({"head_dim": 17}, "pos='rope' needs an even head dim"),
    ({"head_dim": 16}, r"layers.0.self_attn.q_proj.weight has shape \(128, 64\); the model needs \(64, 64\)"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_a_qwen3_config_the_model_would_misread_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        from_hf_llama(qwen3_state_dict(), qwen3_config_json(**change))


def test_qwen3_weights_that_do_not_fit_are_refused():
    # Qwen3's config without the norms: missing; Llama's config with them: unexpected (the model would drop them)
    with pytest.raises(ValueError, match=r"missing \['layers.0.self_attn.k_norm.weight', "):
        from_hf_llama(llama_state_dict(True, head_dim=HEAD_DIM), qwen3_config_json())
    with pytest.raises(ValueError, match=r"unexpected \['layers.0.self_attn.k_norm.weight', "):
        from_hf_llama(qwen3_state_dict(), qwen3_config_json(model_type="llama", sliding_window=None))
    sd = qwen3_state_dict()
    sd["model.layers.1.self_attn.q_norm.weight"] = torch.ones(HEAD_DIM // 2)
    with pytest.raises(ValueError, match=r"layers.1.self_attn.q_norm.weight has shape \(16,\); "
                                         r"blocks.1.attn.q_norm.weight needs \(32,\)"):
        from_hf_llama(sd, qwen3_config_json())
    # q/k/v biases and QK-norm together are no Hugging Face model (Qwen2 has the one, Qwen3 the other)
    both = GPT(GPTConfig.from_preset("tiny-llama", qkv_bias=True, qk_norm=True))
    with pytest.raises(ValueError, match="both qkv_bias and qk_norm has no Hugging Face model_type"):
        to_hf_llama(both)
