"""Hugging Face mixture-of-experts models: synthetic Mixtral (MixtralForCausalLM) and Qwen3-MoE (Qwen3MoeForCausalLM)
state dicts (no download, no transformers) go in, give the logits of a plain forward written here from transformers'
semantics, and come back out bit for bit; what the model here does not compute is refused."""

import json
import math

import pytest
import torch

from llmkern.model import generate
from llmkern.model.hf import (
    config_from_hf_llama,
    from_hf_llama,
    hf_llama_config,
    load_hf_file,
    to_hf_llama,
)

VOCAB, CTX, EMBD, LAYERS, HEADS, KV_HEADS = 50, 16, 32, 3, 4, 2
EXPERTS, TOP_K, EXPERT_HIDDEN, DENSE_HIDDEN = 4, 2, 24, 40
QWEN3_HEAD_DIM = 16  # not EMBD / HEADS: the config's head_dim must be read


def mixtral_config_json(**changes) -> dict:
    config = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": VOCAB,
              "hidden_size": EMBD, "intermediate_size": EXPERT_HIDDEN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "hidden_act": "silu",
              "max_position_embeddings": CTX, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
              "num_local_experts": EXPERTS, "num_experts_per_tok": TOP_K, "output_router_logits": False,
              "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0, "tie_word_embeddings": False,
              "torch_dtype": "float32"}
    return {**config, **changes}


def qwen3_moe_config_json(**changes) -> dict:
    """Layer 1 dense (mlp_only_layers), layers 0 and 2 MoE; top-k weights not renormalized (Qwen3-MoE's default)."""
    config = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": VOCAB,
              "hidden_size": EMBD, "intermediate_size": DENSE_HIDDEN, "moe_intermediate_size": EXPERT_HIDDEN,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "head_dim": QWEN3_HEAD_DIM, "hidden_act": "silu", "max_position_embeddings": CTX, "rms_norm_eps": 1e-6,
              "rope_theta": 1e6, "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
              "max_window_layers": LAYERS, "num_experts": EXPERTS, "num_experts_per_tok": TOP_K,
              "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [1],
              "output_router_logits": False, "router_aux_loss_coef": 0.001, "tie_word_embeddings": False,
              "torch_dtype": "float32"}
    return {**config, **changes}


def _randn(*shape, scale=0.2):
    return torch.randn(shape) * scale


def _attention_weights(i: int, d: int, qk_norm: bool) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    sd = {p + "self_attn.q_proj.weight": _randn(HEADS * d, EMBD),
          p + "self_attn.k_proj.weight": _randn(KV_HEADS * d, EMBD),
          p + "self_attn.v_proj.weight": _randn(KV_HEADS * d, EMBD),
          p + "self_attn.o_proj.weight": _randn(EMBD, HEADS * d),
          p + "input_layernorm.weight": 1 + _randn(EMBD, scale=0.1),
          p + "post_attention_layernorm.weight": 1 + _randn(EMBD, scale=0.1)}
    if qk_norm:
        sd[p + "self_attn.q_norm.weight"] = 1 + _randn(d, scale=0.3)
        sd[p + "self_attn.k_norm.weight"] = 1 + _randn(d, scale=0.3)
    return sd


def _experts(prefix: str, names: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    """A router far from uniform (so routing matters) and EXPERTS SwiGLU experts under names (gate, up, down)."""
    gate, up, down = names
    sd = {f"{prefix}.gate.weight": _randn(EXPERTS, EMBD, scale=1.0)}
    for j in range(EXPERTS):
        sd[f"{prefix}.experts.{j}.{gate}.weight"] = _randn(EXPERT_HIDDEN, EMBD)
        sd[f"{prefix}.experts.{j}.{up}.weight"] = _randn(EXPERT_HIDDEN, EMBD)
        sd[f"{prefix}.experts.{j}.{down}.weight"] = _randn(EMBD, EXPERT_HIDDEN)
    return sd


def _outer_weights() -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": _randn(VOCAB, EMBD), "model.norm.weight": 1 + _randn(EMBD, scale=0.1),
            "lm_head.weight": _randn(VOCAB, EMBD)}


def mixtral_state_dict() -> dict[str, torch.Tensor]:
    sd = _outer_weights()
    for i in range(LAYERS):
        sd.update(_attention_weights(i, EMBD // HEADS, qk_norm=False))
        sd.update(_experts(f"model.layers.{i}.block_sparse_moe", ("w1", "w3", "w2")))
    return sd


def qwen3_moe_state_dict(dense_layers=(1,)) -> dict[str, torch.Tensor]:
    sd = _outer_weights()
    for i in range(LAYERS):
        sd.update(_attention_weights(i, QWEN3_HEAD_DIM, qk_norm=True))
        p = f"model.layers.{i}.mlp"
        if i in dense_layers:
            sd.update({f"{p}.gate_proj.weight": _randn(DENSE_HIDDEN, EMBD),
                       f"{p}.up_proj.weight": _randn(DENSE_HIDDEN, EMBD),
                       f"{p}.down_proj.weight": _randn(EMBD, DENSE_HIDDEN)})
        else:
            sd.update(_experts(p, ("gate_proj", "up_proj", "down_proj")))
    return sd


def stacked_experts(sd: dict[str, torch.Tensor], prefix: str, names: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    """sd with each MoE layer's experts in newer transformers' layout: mlp.gate, mlp.experts.gate_up_proj (E, 2H, C:
    each expert's [gate | up]) and mlp.experts.down_proj (E, C, H)."""
    gate, up, down = names
    out = {k: v for k, v in sd.items() if f".{prefix}.experts." not in k and f".{prefix}.gate.weight" not in k}
    for i in range(LAYERS):
        p = f"model.layers.{i}.{prefix}"
        if f"{p}.gate.weight" not in sd:
            continue
        out[f"model.layers.{i}.mlp.gate.weight"] = sd[f"{p}.gate.weight"]
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{p}.experts.{j}.{gate}.weight"], sd[f"{p}.experts.{j}.{up}.weight"]])
             for j in range(EXPERTS)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [sd[f"{p}.experts.{j}.{down}.weight"] for j in range(EXPERTS)])
    return out


def moe_logits(sd: dict[str, torch.Tensor], idx: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The model's forward, plainly, in float64, from transformers' Mixtral and Qwen3-MoE: Llama's attention (Qwen3's
    QK-norm on each head before RoPE when the weights have it); in a MoE layer a softmax over the router's logits,
    the top k (renormalized for Mixtral, or by Qwen3-MoE's norm_topk_prob), and the weighted sum of those experts'
    SwiGLU outputs, token by token."""
    w = {k.removeprefix("model."): v.double() for k, v in sd.items()}
    heads, kv_heads, eps, k_top = (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"],
                                   cfg["num_experts_per_tok"])
    mixtral = cfg["model_type"] == "mixtral"
    normalize = mixtral or cfg["norm_topk_prob"]
    b, t = idx.shape
    d = cfg.get("head_dim") or EMBD // heads

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate(x):
        inv_freq = cfg["rope_theta"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angle = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin

    def swiglu(x, gate, up, down):
        g = x @ gate.t()
        return (g * torch.sigmoid(g) * (x @ up.t())) @ down.t()

    def moe(x, p, names):
        tokens = x.reshape(-1, EMBD)
        probs = (tokens @ w[f"{p}.gate.weight"].t()).softmax(-1)
        top, chosen = probs.topk(k_top, dim=-1)
        if normalize:
            top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(tokens)
        for n in range(tokens.shape[0]):
            for slot in range(k_top):
                e = int(chosen[n, slot])
                expert = [w[f"{p}.experts.{e}.{name}.weight"] for name in names]
                out[n] += top[n, slot] * swiglu(tokens[n], *expert)
        return out.view_as(x)

    x = w["embed_tokens.weight"][idx]
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    for i in range(LAYERS):
        p = f"layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q, k, v = ((h @ w[f"{p}self_attn.{name}.weight"].t()).view(b, t, n, d).transpose(1, 2)
                   for name, n in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)))
        if p + "self_attn.q_norm.weight" in w:
            q, k = rms_norm(q, w[p + "self_attn.q_norm.weight"]), rms_norm(k, w[p + "self_attn.k_norm.weight"])
        q, k = rotate(q), rotate(k)
        k, v = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(b, t, heads * d) @ w[p + "self_attn.o_proj.weight"].t()
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        if mixtral:
            x = x + moe(h, p + "block_sparse_moe", ("w1", "w3", "w2"))
        elif p + "mlp.gate.weight" in w:
            x = x + moe(h, p + "mlp", ("gate_proj", "up_proj", "down_proj"))
        else:
            x = x + swiglu(h, *(w[f"{p}mlp.{name}.weight"] for name in ("gate_proj", "up_proj", "down_proj")))
    x = rms_norm(x, w["norm.weight"])
    return (x @ w["lm_head.weight"].t()).float()


MODELS = {
    "mixtral": (mixtral_state_dict, mixtral_config_json),
    "qwen3_moe": (qwen3_moe_state_dict, qwen3_moe_config_json),
}


@pytest.mark.parametrize("model_type", MODELS)
def test_import_gives_the_reference_logits(model_type):
    torch.manual_seed(0)
    make_sd, make_cfg = MODELS[model_type]
    sd, cfg = make_sd(), make_cfg()
    model = from_hf_llama(sd, cfg, backend="torch").eval()
    c = model.config
    assert (c.n_experts, c.experts_per_token, c.expert_hidden_size) == (EXPERTS, TOP_K, EXPERT_HIDDEN)
    if model_type == "qwen3_moe":
        assert (c.moe_layers, c.hidden_size, c.norm_topk_prob, c.qk_norm, c.head_dim) == (
            [0, 2], DENSE_HIDDEN, False, True, QWEN3_HEAD_DIM)
    else:
        assert (c.moe_layers, c.norm_topk_prob, c.qk_norm) == (None, True, False)
    idx = torch.randint(0, VOCAB, (2, CTX))
    torch.testing.assert_close(model(idx)[0], moe_logits(sd, idx, cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", MODELS)
def test_newer_transformers_stacked_experts_load_the_same(model_type):
    torch.manual_seed(1)
    make_sd, make_cfg = MODELS[model_type]
    sd, cfg = make_sd(), make_cfg()
    prefix, names = (("block_sparse_moe", ("w1", "w3", "w2")) if model_type == "mixtral"
                     else ("mlp", ("gate_proj", "up_proj", "down_proj")))
    stacked = stacked_experts(sd, prefix, names)
    assert "model.layers.0.mlp.experts.gate_up_proj" in stacked and "model.layers.0.mlp.gate.weight" in stacked
    a = from_hf_llama(sd, cfg, backend="torch")
    b = from_hf_llama(stacked, cfg, backend="torch")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("model_type", MODELS)
def test_export_round_trips_bitwise_and_its_config_reads_back(model_type):
    torch.manual_seed(2)
    make_sd, make_cfg = MODELS[model_type]
    sd, cfg = make_sd(), make_cfg()
    model = from_hf_llama(sd, cfg, backend="torch")
    out_sd, out_cfg = to_hf_llama(model)
    assert sorted(out_sd) == sorted(sd)
    for name, tensor in sd.items():
        assert torch.equal(out_sd[name], tensor), name
    assert out_cfg["model_type"] == model_type
    assert config_from_hf_llama(out_cfg, backend="torch") == model.config
    assert json.loads(json.dumps(out_cfg)) == out_cfg  # config.json-writable


def test_qwen3_moe_sparse_step_and_aux_loss_are_read_as_transformers_does():
    # decoder_sparse_step=2 makes layer 1 MoE ((i + 1) % 2 == 0); mlp_only_layers takes it out again
    assert config_from_hf_llama(qwen3_moe_config_json(decoder_sparse_step=2, mlp_only_layers=[])).moe_layers == [1]
    assert config_from_hf_llama(qwen3_moe_config_json(mlp_only_layers=None)).moe_layers is None  # every layer
    # the load-balancing loss is transformers' only with output_router_logits
    assert config_from_hf_llama(qwen3_moe_config_json()).router_aux_loss_coef == 0.0
    assert config_from_hf_llama(mixtral_config_json(output_router_logits=True)).router_aux_loss_coef == 0.02
    # a window on: every Qwen3-MoE layer slides; a max_window_layers saying otherwise is refused
    on = config_from_hf_llama(qwen3_moe_config_json(use_sliding_window=True, sliding_window=8, max_window_layers=0))
    assert (on.sliding_window, on.layer_types) == (8, None)
    with pytest.raises(ValueError, match="every layer"):
        config_from_hf_llama(qwen3_moe_config_json(use_sliding_window=True, sliding_window=8, max_window_layers=2))
    with pytest.warns(UserWarning, match="router_jitter_noise"):
        config_from_hf_llama(mixtral_config_json(router_jitter_noise=0.01))


def test_load_hf_file_routes_a_saved_folder(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    for model_type, (make_sd, make_cfg) in MODELS.items():
        folder = tmp_path / model_type
        folder.mkdir()
        sd, cfg = make_sd(), make_cfg()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(cfg))
        model, found = load_hf_file(str(folder / "model.safetensors"), backend="torch")
        assert found == model_type
        idx = torch.randint(0, VOCAB, (1, CTX))
        torch.testing.assert_close(model.eval()(idx)[0], moe_logits(sd, idx, cfg), rtol=1e-5, atol=1e-5)


def test_other_mixture_of_experts_models_are_refused(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="shared expert"):
        config_from_hf_llama(qwen3_moe_config_json(model_type="qwen2_moe", shared_expert_intermediate_size=8))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    for config, match in ((qwen3_moe_config_json(model_type="qwen2_moe"), "shared expert"),
                          ({"model_type": "olmoe", "num_experts": 64}, "olmoe.*not supported")):
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=match):
            load_hf_file(str(tmp_path / "model.safetensors"))
    # a Llama config.json naming experts is not read as a dense Llama
    with pytest.raises(ValueError, match="not supported"):
        config_from_hf_llama({**mixtral_config_json(), "model_type": "llama"})


def test_wrong_or_missing_experts_are_refused():
    torch.manual_seed(4)
    sd, cfg = mixtral_state_dict(), mixtral_config_json()
    wrong = dict(sd)
    wrong["model.layers.1.block_sparse_moe.experts.2.w1.weight"] = _randn(EXPERT_HIDDEN + 1, EMBD)
    with pytest.raises(ValueError, match=r"experts\.2\.w1\.weight has shape"):
        from_hf_llama(wrong, cfg)
    missing = {k: v for k, v in sd.items() if k != "model.layers.2.block_sparse_moe.experts.3.w2.weight"}
    with pytest.raises(ValueError, match=r"missing \['layers\.2\.block_sparse_moe\.experts\.3\.w2\.weight'\]"):
        from_hf_llama(missing, cfg)
    # a model of more experts than the weights have
    with pytest.raises(ValueError, match="missing"):
        from_hf_llama(sd, mixtral_config_json(num_local_experts=EXPERTS + 1))
    # Qwen3-MoE's weights under a config that makes the dense layer a MoE one
    with pytest.raises(ValueError, match="missing"):
        from_hf_llama(qwen3_moe_state_dict(), qwen3_moe_config_json(mlp_only_layers=[]))


def test_a_model_mixtral_cannot_express_is_not_exported_as_mixtral():
    torch.manual_seed(5)
    model = from_hf_llama(mixtral_state_dict(), mixtral_config_json())
    model.config.norm_topk_prob = False  # Mixtral always renormalizes
    with pytest.raises(ValueError, match="renormalizes"):
        to_hf_llama(model)


@pytest.mark.parametrize("model_type", MODELS)
def test_greedy_generation_is_the_same_with_and_without_the_cache(model_type):
    torch.manual_seed(6)
    make_sd, make_cfg = MODELS[model_type]
    model = from_hf_llama(make_sd(), make_cfg(), backend="torch").eval()
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    cached = generate(model, prompts, max_new_tokens=6, temperature=0.0, use_cache=True)
    uncached = generate(model, prompts, max_new_tokens=6, temperature=0.0, use_cache=False)
    assert cached == uncached


def test_keys_a_mixtral_config_leaves_out_take_mixtral_config_defaults():
    """MixtralConfig's rope_theta is 1e6 and its rms_norm_eps 1e-5 (Llama's: 10000 and 1e-6): a config.json
    without them (hand-written, or trimmed) is the model those defaults make."""
    cfg = mixtral_config_json()
    for key in ("rope_theta", "rms_norm_eps"):
        cfg.pop(key, None)
    config = config_from_hf_llama(cfg)
    assert (config.rope_theta, config.norm_eps) == (1e6, 1e-5)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_an_export_without_a_load_balancing_loss_keeps_transformers_default_coefficient(model_type):
    """A model whose load-balancing loss is off exports it off (output_router_logits false) with transformers'
    default coefficient, not 0, so that a fine-tuning there that turns it on gets a load-balancing loss."""
    cfg = mixtral_config_json() if model_type == "mixtral" else qwen3_moe_config_json()
    cfg.update(output_router_logits=False, router_aux_loss_coef=0.02)
    config = config_from_hf_llama(cfg)
    assert config.router_aux_loss_coef == 0.0
    out = hf_llama_config(config, torch.float32)
    assert (out["output_router_logits"], out["router_aux_loss_coef"]) == (False, 0.001)
    assert config_from_hf_llama(out) == config
