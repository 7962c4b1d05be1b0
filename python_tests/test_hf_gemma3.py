"""Hugging Face Gemma 3 text weights: a synthetic state dict under Gemma3ForCausalLM's names (and under the
multimodal checkpoint's) goes in, gives the logits of a plain Gemma 3 forward written here from transformers'
definition, and comes back out bit for bit; the configs the model would compute otherwise are refused."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmkern.model import GPT, GPTConfig, generate
from llmkern.model.hf import (
    config_from_hf_gemma3,
    from_hf_gemma3,
    load_hf_file,
    load_hf_gemma3,
    load_hf_llama,
    to_hf_gemma3,
    to_hf_llama,
)

# head_dim is not EMBD / HEADS, query_pre_attn_scalar not head_dim; pattern 3 of 5 layers: s s f s s
VOCAB, CTX, EMBD, LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, WINDOW = 100, 32, 48, 5, 4, 2, 16, 80, 5
PATTERN_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
LINEAR = {"rope_type": "linear", "factor": 4.0}


def gemma3_config_json(style: str = "types", **changes) -> dict:
    """A Gemma3ForCausalLM config.json of gemma3_state_dict's sizes: style "types" (newer files: layer_types),
    "pattern" (older: sliding_window_pattern) or "parameters" (transformers 5's rope_parameters per layer type)."""
    config = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": VOCAB,
              "hidden_size": EMBD, "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": CTX, "rms_norm_eps": 1e-6,
              "rope_theta": 1000.0, "rope_local_base_freq": 50.0, "rope_scaling": None, "query_pre_attn_scalar": 24,
              "sliding_window": WINDOW, "attention_bias": False, "attn_logit_softcapping": None,
              "final_logit_softcapping": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    if style == "pattern":
        config["sliding_window_pattern"] = 3
    else:
        config["layer_types"] = list(PATTERN_TYPES)
    config.update(changes)
    if style == "parameters":
        scaling = config.pop("rope_scaling") or {"rope_type": "default"}
        config["rope_parameters"] = {
            "full_attention": {**scaling, "rope_theta": config.pop("rope_theta")},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.pop("rope_local_base_freq")},
        }
    return config


def gemma3_state_dict(tied: bool = True, layers: int = LAYERS, qk_norm: bool = True,
                      spread: float = 0.2) -> dict[str, torch.Tensor]:
    """Random weights under Gemma3ForCausalLM's names, bf16 values (held in float32); the norm weights w (the
    norms scale by 1 + w) far from 0, so that a missing + 1 shows. Without qk_norm, Gemma2ForCausalLM's (its
    layers have no q_norm, k_norm); spread: the projections' standard deviation."""
    def norm(n):
        return 0.5 + 0.3 * torch.randn(n)

    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, EMBD) * 0.3, "model.norm.weight": norm(EMBD)}
    for i in range(layers):
        shapes = {"self_attn.q_proj.weight": (HEADS * HEAD_DIM, EMBD),
                  "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, EMBD),
                  "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, EMBD),
                  "self_attn.o_proj.weight": (EMBD, HEADS * HEAD_DIM),
                  "mlp.gate_proj.weight": (HIDDEN, EMBD), "mlp.up_proj.weight": (HIDDEN, EMBD),
                  "mlp.down_proj.weight": (EMBD, HIDDEN)}
        for name, shape in shapes.items():
            sd[f"model.layers.{i}.{name}"] = torch.randn(shape) * spread
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            sd[f"model.layers.{i}.{name}.weight"] = norm(EMBD)
        for name in ("self_attn.q_norm", "self_attn.k_norm") if qk_norm else ():
            sd[f"model.layers.{i}.{name}.weight"] = norm(HEAD_DIM)
    if not tied:
        sd["lm_head.weight"] = torch.randn(VOCAB, EMBD) * 0.3
    return {k: v.to(torch.bfloat16).float() for k, v in sd.items()}


def gemma3_logits(sd: dict[str, torch.Tensor], idx: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Gemma 3's forward, plainly (float64), written from transformers' Gemma3ForCausalLM: embeddings times
    sqrt(hidden_size); per layer x += post_attention_layernorm(attn(input_layernorm(x))), then
    x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))); RMSNorms scale by 1 + w; q and k
    RMS-normed per head before RoPE; sliding layers (query q sees key kv when q - W < kv <= q) turn by
    rope_local_base_freq, unscaled, the full ones by rope_theta with positions / factor under linear scaling;
    scores times query_pre_attn_scalar ** -0.5, then soft-capped (cap * tanh(s / cap)) when
    attn_logit_softcapping is set, as are the logits by final_logit_softcapping; MLP down(gelu_tanh(gate) * up).
    cfg is config.json's keys (the "types" or "pattern" style)."""
    w = {k.removeprefix("model."): v.double() for k, v in sd.items()}
    b, t = idx.shape
    eps, d = cfg["rms_norm_eps"], cfg["head_dim"]
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % cfg["sliding_window_pattern"] == 0
                                       else "sliding_attention" for i in range(LAYERS)]

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + weight)

    def rotate(x, base, factor):
        inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angle = (torch.arange(t, dtype=torch.float64) / factor)[:, None] * inv_freq[None, :]
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin

    x = w["embed_tokens.weight"][idx] * math.sqrt(cfg["hidden_size"])
    pos = torch.arange(t)
    causal = pos[None, :] <= pos[:, None]
    in_window = pos[None, :] > pos[:, None] - cfg["sliding_window"]
    scaling = cfg.get("rope_scaling") or {}
    for i in range(LAYERS):
        p = lambda n: w[f"layers.{i}.{n}"]  # noqa: E731
        sliding = types[i] == "sliding_attention"
        h = rms_norm(x, p("input_layernorm.weight"))
        q, k, v = (
            (h @ p(f"self_attn.{name}.weight").t()).view(b, t, n, d).transpose(1, 2)
            for name, n in (("q_proj", HEADS), ("k_proj", KV_HEADS), ("v_proj", KV_HEADS))
        )
        q, k = rms_norm(q, p("self_attn.q_norm.weight")), rms_norm(k, p("self_attn.k_norm.weight"))
        base, factor = (cfg["rope_local_base_freq"], 1.0) if sliding else (cfg["rope_theta"], scaling.get("factor", 1))
        q, k = rotate(q, base, factor), rotate(k, base, factor)
        k, v = (z.repeat_interleave(HEADS // KV_HEADS, dim=1) for z in (k, v))
        seen = causal & in_window if sliding else causal
        att = q @ k.transpose(-1, -2) * cfg["query_pre_attn_scalar"] ** -0.5
        if cfg["attn_logit_softcapping"] is not None:
            att = cfg["attn_logit_softcapping"] * torch.tanh(att / cfg["attn_logit_softcapping"])
        att = att.masked_fill(~seen, float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, HEADS * d)
        x = x + rms_norm(y @ p("self_attn.o_proj.weight").t(), p("post_attention_layernorm.weight"))
        h = rms_norm(x, p("pre_feedforward_layernorm.weight"))
        gate, up = h @ p("mlp.gate_proj.weight").t(), h @ p("mlp.up_proj.weight").t()
        m = (F.gelu(gate, approximate="tanh") * up) @ p("mlp.down_proj.weight").t()
        x = x + rms_norm(m, p("post_feedforward_layernorm.weight"))
    x = rms_norm(x, w["norm.weight"])
    logits = x @ w.get("lm_head.weight", w["embed_tokens.weight"]).t()
    if cfg["final_logit_softcapping"] is not None:
        logits = cfg["final_logit_softcapping"] * torch.tanh(logits / cfg["final_logit_softcapping"])
    return logits.float()


def assert_logits(model: GPT, sd: dict, cfg: dict, t: int = CTX) -> None:
    idx = torch.randint(0, VOCAB, (2, t))
    torch.testing.assert_close(model.eval()(idx)[0], gemma3_logits(sd, idx, cfg), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied, style, scaling", [
    (True, "types", None), (False, "types", LINEAR), (True, "pattern", LINEAR), (False, "pattern", None),
    (True, "parameters", LINEAR), (True, "parameters", None),
])
def test_import_gives_gemma3_logits(tied, style, scaling):
    sd = gemma3_state_dict(tied)
    cfg = gemma3_config_json(style, tie_word_embeddings=tied, rope_scaling=scaling)
    model = from_hf_gemma3(sd, cfg, backend="torch")
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.hidden_size, c.tie_embeddings, c.sliding_window,
            c.layer_types, c.rope_theta, c.rope_local_theta, c.rope_scaling, c.attn_scale) == (
        LAYERS, EMBD, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, tied, WINDOW, PATTERN_TYPES, 1000.0, 50.0, scaling, 24 ** -0.5)
    # the reference is read in the "types" style: every style must be the same model
    assert_logits(model, sd, gemma3_config_json("types", tie_word_embeddings=tied, rope_scaling=scaling))


def test_the_reference_sees_what_the_import_could_get_wrong():
    """The window, the layer kinds, the local base, the scaling and the attention scale each change the logits."""
    sd, idx = gemma3_state_dict(), torch.randint(0, VOCAB, (1, CTX))
    cfg = gemma3_config_json(rope_scaling=LINEAR)
    expected = gemma3_logits(sd, idx, cfg)
    for change in ({"sliding_window": CTX}, {"layer_types": ["sliding_attention"] * LAYERS},
                   {"rope_local_base_freq": 1000.0}, {"rope_scaling": None}, {"query_pre_attn_scalar": HEAD_DIM}):
        assert not torch.allclose(gemma3_logits(sd, idx, {**cfg, **change}), expected, atol=1e-3), change


def test_soft_capping_is_read_and_written_back():
    """transformers' Gemma 3 caps as Gemma 2 does when its config.json sets the caps (Google's leave them null)."""
    sd, cfg = gemma3_state_dict(), gemma3_config_json(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    model = from_hf_gemma3(sd, cfg, backend="torch")
    assert (model.config.attn_softcap, model.config.logit_softcap) == (2.0, 3.0)
    assert_logits(model, sd, cfg)
    idx = torch.randint(0, VOCAB, (1, CTX))
    assert not torch.allclose(gemma3_logits(sd, idx, cfg), gemma3_logits(sd, idx, gemma3_config_json()), atol=1e-3)
    out_cfg = to_hf_gemma3(model)[1]
    assert (out_cfg["attn_logit_softcapping"], out_cfg["final_logit_softcapping"]) == (2.0, 3.0)
    assert config_from_hf_gemma3(out_cfg, backend="torch") == model.config


def test_defaults_and_canonical_forms():
    """A config.json without the optional keys takes Gemma3TextConfig's defaults; query_pre_attn_scalar equal to
    head_dim is no attn_scale; layers that all slide are no layer_types, and none sliding no window."""
    cfg = {k: v for k, v in gemma3_config_json("pattern").items()
           if k not in ("rope_theta", "rope_local_base_freq", "rms_norm_eps", "tie_word_embeddings",
                        "sliding_window_pattern", "query_pre_attn_scalar", "hidden_activation")}
    c = config_from_hf_gemma3(cfg)
    assert (c.rope_theta, c.rope_local_theta, c.norm_eps, c.tie_embeddings, c.attn_scale) == (
        1e6, 10000.0, 1e-6, True, 256 ** -0.5)  # pattern 6 of 5 layers: all of them slide
    assert c.layer_types is None and c.sliding_window == WINDOW
    assert config_from_hf_gemma3(gemma3_config_json(query_pre_attn_scalar=HEAD_DIM)).attn_scale is None
    full = config_from_hf_gemma3(gemma3_config_json(layer_types=["full_attention"] * LAYERS))
    assert (full.sliding_window, full.layer_types, full.rope_local_theta) == (None, None, None)
    assert config_from_hf_gemma3(gemma3_config_json(), block_size=8).block_size == 8


@pytest.mark.parametrize("prefix, head", [("language_model.model.", "language_model.lm_head.weight"),
                                          ("model.language_model.", "lm_head.weight")])
def test_the_multimodal_checkpoints_text_part_is_read(prefix, head):
    sd = gemma3_state_dict(tied=False)
    mm = {prefix + k.removeprefix("model."): v for k, v in sd.items() if k != "lm_head.weight"}
    mm[head] = sd["lm_head.weight"]
    vision = prefix.replace("language_model.", "").removesuffix("model.")  # "" (older) or "model." (newer)
    mm[vision + "vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.randn(4, 3, 2, 2)
    mm[vision + "multi_modal_projector.mm_input_projection_weight"] = torch.randn(4, EMBD)
    text = gemma3_config_json(tie_word_embeddings=False, rope_scaling=LINEAR)
    cfg = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
           "text_config": {k: v for k, v in text.items() if k not in ("architectures", "tie_word_embeddings")},
           "vision_config": {"model_type": "siglip_vision_model"}, "tie_word_embeddings": False}
    assert_logits(from_hf_gemma3(mm, cfg, backend="torch"), sd, text)


@pytest.mark.parametrize("tied", [True, False])
def test_export_round_trips_bitwise(tied):
    sd, cfg = gemma3_state_dict(tied), gemma3_config_json("pattern", tie_word_embeddings=tied, rope_scaling=LINEAR)
    model = from_hf_gemma3(sd, cfg, backend="torch")
    out, out_cfg = to_hf_gemma3(model)
    assert set(out) == set(sd) | {"lm_head.weight"}
    for name, tensor in sd.items():
        assert torch.equal(out[name], tensor), name  # the norms' w = (1 + w) - 1 exactly
    assert out_cfg["model_type"] == "gemma3_text" and out_cfg["sliding_window_pattern"] == 3
    assert out_cfg["layer_types"] == PATTERN_TYPES and out_cfg["query_pre_attn_scalar"] == 24
    assert config_from_hf_gemma3(json.loads(json.dumps(out_cfg)), backend="torch") == model.config
    back = from_hf_gemma3(out, out_cfg, backend="torch")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_an_irregular_layer_pattern_exports_as_layer_types_alone():
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    model = from_hf_gemma3(gemma3_state_dict(), gemma3_config_json(layer_types=types))
    out_cfg = to_hf_gemma3(model)[1]
    assert out_cfg["layer_types"] == types and "sliding_window_pattern" not in out_cfg
    assert config_from_hf_gemma3(out_cfg) == model.config


def test_a_folder_is_read_and_other_gemmas_are_named(tmp_path):
    from safetensors.torch import save_file

    sd, cfg = gemma3_state_dict(), gemma3_config_json()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    model, model_type = load_hf_file(str(tmp_path / "model.safetensors"), backend="torch")
    assert model_type == "gemma3_text"
    assert_logits(model, sd, cfg, t=9)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma"}))
    with pytest.raises(ValueError, match="model_type='gemma' is not supported: .*Gemma 1"):
        load_hf_file(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("change, message", [
    ({"attn_logit_softcapping": 0.0}, "attn_logit_softcapping must be a finite number > 0"),
    ({"final_logit_softcapping": "30"}, "final_logit_softcapping must be a finite number > 0"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling is .*yarn"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 8}},
     "rope_scaling is"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor must be a number > 0"),
    ({"layer_types": ["sliding_attention"] * 2}, "layer_types must list one of"),
    ({"sliding_window_pattern": 2}, "name other sliding layers"),
    ({"model_type": "gemma2"}, "model_type='gemma2'"),
])
def test_a_config_the_model_would_misread_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        from_hf_gemma3(gemma3_state_dict(), gemma3_config_json(**change))


def test_a_model_of_another_shape_is_refused():
    llama = GPT(GPTConfig.from_preset("tiny-llama", vocab_size=VOCAB))
    with pytest.raises(ValueError, match="Gemma-3-shaped"):
        to_hf_gemma3(llama)
    with pytest.raises(ValueError, match="Gemma-3-shaped"):
        load_hf_gemma3(llama, gemma3_state_dict())
    gemma = from_hf_gemma3(gemma3_state_dict(), gemma3_config_json())
    with pytest.raises(ValueError, match="Llama-shaped"):
        to_hf_llama(gemma)
    # a Llama-shaped model with one Gemma part: Llama's weights would leave it as it is
    llama_sd = to_hf_llama(llama)[0]
    for change in ({"post_norms": True}, {"embed_scale": 2.0}, {"attn_scale": 0.1}, {"attn_softcap": 50.0},
                   {"logit_softcap": 30.0}):
        other = GPT(GPTConfig.from_preset("tiny-llama", vocab_size=VOCAB, **change))
        with pytest.raises(ValueError, match="Gemma's"):
            load_hf_llama(other, llama_sd)


def test_greedy_generation_follows_the_reference():
    sd, cfg = gemma3_state_dict(), gemma3_config_json(rope_scaling=LINEAR)
    model = from_hf_gemma3(sd, cfg, backend="torch")
    prompt = torch.randint(0, VOCAB, (6,)).tolist()
    expected = list(prompt)
    for _ in range(12):  # past the window of 5
        expected.append(int(gemma3_logits(sd, torch.tensor([expected]), cfg)[0, -1].argmax()))
    for use_cache in (True, False):
        out = generate(model, [prompt], max_new_tokens=12, temperature=0, use_cache=use_cache)[0]
        assert out == expected, use_cache  # the prompt and its continuation
