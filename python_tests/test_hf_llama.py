"""Hugging Face Llama-family weights: a synthetic state dict under LlamaForCausalLM's names (no download)
goes in, gives the logits of a plain Llama forward written here, and comes back out bit for bit. Qwen2's
(Qwen2ForCausalLM: Llama's names, plus biases on q_proj, k_proj and v_proj) likewise."""

import dataclasses
import json
import math
import warnings

import pytest
import torch

from llmkern.model import GPT, GPTConfig
from llmkern.model.hf import (
    config_from_hf_llama,
    from_hf_gpt2,
    from_hf_llama,
    load_hf_file,
    load_hf_llama,
    load_hf_llama_file,
    to_hf_llama,
)

VOCAB, CTX, EMBD, LAYERS, HEADS, KV_HEADS, HIDDEN = 100, 32, 64, 2, 4, 2, 96


def llama_config_json(**changes) -> dict:
    """The config.json save_pretrained writes for a LlamaForCausalLM of llama_state_dict's sizes."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
              "hidden_size": EMBD, "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "hidden_act": "silu",
              "max_position_embeddings": CTX, "rms_norm_eps": 1e-5, "rope_theta": 500.0, "rope_scaling": None,
              "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": "float32"}
    return {**config, **changes}


def qwen2_config_json(**changes) -> dict:
    """The config.json of a Qwen2ForCausalLM of llama_state_dict(qkv_bias=True)'s sizes, as Qwen2.5's are
    written: a sliding window named but off (shorter than the context here: it must be ignored)."""
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": VOCAB,
              "hidden_size": EMBD, "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "hidden_act": "silu",
              "max_position_embeddings": CTX, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
              "use_sliding_window": False, "sliding_window": 8, "max_window_layers": 1, "attention_dropout": 0.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    return {**config, **changes}


def llama_state_dict(tied: bool = False, kv_heads: int = KV_HEADS, qkv_bias: bool = False, head_dim: int | None = None,
                     qk_norm: bool = False) -> dict[str, torch.Tensor]:
    """Random float32 weights under LlamaForCausalLM's names; nn.Linear weights are (out, in). qkv_bias: with
    Qwen2's q_proj, k_proj and v_proj biases; head_dim: heads of that width (None: EMBD / HEADS); qk_norm: with
    Qwen3's q_norm and k_norm, scales far enough from 1 that one misplaced shows."""
    d = head_dim or EMBD // HEADS
    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, EMBD) * 0.2, "model.norm.weight": 1 + 0.1 * torch.randn(EMBD)}
    for i in range(LAYERS):
        shapes = {"self_attn.q_proj.weight": (HEADS * d, EMBD), "self_attn.k_proj.weight": (kv_heads * d, EMBD),
                  "self_attn.v_proj.weight": (kv_heads * d, EMBD), "self_attn.o_proj.weight": (EMBD, HEADS * d),
                  "mlp.gate_proj.weight": (HIDDEN, EMBD), "mlp.up_proj.weight": (HIDDEN, EMBD),
                  "mlp.down_proj.weight": (EMBD, HIDDEN)}
        if qkv_bias:  # large enough to move the logits well past the tolerance
            shapes.update({"self_attn.q_proj.bias": (HEADS * d,), "self_attn.k_proj.bias": (kv_heads * d,),
                           "self_attn.v_proj.bias": (kv_heads * d,)})
        for name, shape in shapes.items():
            sd[f"model.layers.{i}.{name}"] = torch.randn(shape) * (0.5 if name.endswith(".bias") else 0.2)
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            sd[f"model.layers.{i}.{name}"] = 1 + 0.1 * torch.randn(EMBD)
        if qk_norm:
            for name in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
                sd[f"model.layers.{i}.{name}"] = 1 + 0.3 * torch.randn(d)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if tied else torch.randn(VOCAB, EMBD) * 0.2
    return sd


def reference_inv_freq(cfg: dict, d: int) -> list[float]:
    """theta^(-2j/D) for each pair j, stretched one by one as Llama 3.1's reference code does when
    rope_scaling is {"rope_type": "llama3", ...}."""
    freqs = [cfg["rope_theta"] ** (-2 * j / d) for j in range(d // 2)]
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return freqs
    if scaling.get("rope_type", scaling.get("type")) == "linear":  # transformers' linear: every position / factor
        return [freq / scaling["factor"] for freq in freqs]
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen = old_context / scaling["low_freq_factor"]
    high_wavelen = old_context / scaling["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / scaling["factor"])
        else:
            smooth = (old_context / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"])
            out.append((1 - smooth) * freq / scaling["factor"] + smooth * freq)
    return out


def llama_logits(sd: dict[str, torch.Tensor], idx: torch.Tensor, cfg: dict, qk_norm_after_rope: bool = False,
                 ) -> torch.Tensor:
    """Llama's forward, plainly: written from the model's definition, not from llmkern's code. With q/k/v
    biases in sd (Qwen2's), they are added to the projections, before RoPE. Heads are config.json's head_dim
    wide when it has one. With q_norm and k_norm in sd (Qwen3's), each head's q and k is RMS-normed over its
    head_dim with them, before RoPE (after it with qk_norm_after_rope: a wrong order, for the tests to see). A
    Mistral or Phi-3 config's sliding_window W masks as transformers' masking_utils does: query q sees key kv when
    q - W < kv <= q; a Qwen config's (use_sliding_window true) on the layers from max_window_layers on."""
    w = {k.removeprefix("model."): v.double() for k, v in sd.items()}
    heads, kv_heads, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    b, t = idx.shape
    c = w["embed_tokens.weight"].shape[1]
    d = cfg.get("head_dim") or c // heads

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate(x):  # (B, heads, T, D): pair (x[j], x[j + D/2]) turns by position * theta^(-2j/D)
        inv_freq = torch.tensor(reference_inv_freq(cfg, d), dtype=torch.float64)
        angle = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        rotated_half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * cos + rotated_half * sin

    x = w["embed_tokens.weight"][idx]
    causal_future = torch.ones(t, t, dtype=torch.bool).triu(1)
    default_window = 4096 if cfg.get("model_type") in ("mistral", "qwen2", "qwen3") else None  # a key left out
    window = cfg.get("sliding_window", default_window) if cfg.get("model_type") in ("mistral", "phi3") else None
    qwen_window = cfg.get("model_type") in ("qwen2", "qwen3") and cfg.get("use_sliding_window")
    for i in range(LAYERS):
        future = causal_future
        if qwen_window:
            window = cfg.get("sliding_window", default_window) if i >= cfg["max_window_layers"] else None
        if window is not None:
            future = future | torch.ones(t, t, dtype=torch.bool).tril(-window)  # kv <= q - W: out of the window
        p = lambda n: w[f"layers.{i}.{n}"]  # noqa: E731
        h = rms_norm(x, p("input_layernorm.weight"))
        q, k, v = (
            (h @ p(f"self_attn.{name}.weight").t() + w.get(f"layers.{i}.self_attn.{name}.bias", 0))  # Qwen2's bias
            .view(b, t, n, d).transpose(1, 2)
            for name, n in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads))
        )
        has_qk_norm = f"layers.{i}.self_attn.q_norm.weight" in w
        if has_qk_norm and not qk_norm_after_rope:  # Qwen3's QK-norm: one (D,) scale for all of q's heads, one for k's
            q, k = rms_norm(q, p("self_attn.q_norm.weight")), rms_norm(k, p("self_attn.k_norm.weight"))
        q, k = rotate(q), rotate(k)
        if has_qk_norm and qk_norm_after_rope:
            q, k = rms_norm(q, p("self_attn.q_norm.weight")), rms_norm(k, p("self_attn.k_norm.weight"))
        k, v = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (k, v))  # query head j reads kv head j // g
        att = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, heads * d)
        x = x + y @ p("self_attn.o_proj.weight").t()
        h = rms_norm(x, p("post_attention_layernorm.weight"))
        gate, up = h @ p("mlp.gate_proj.weight").t(), h @ p("mlp.up_proj.weight").t()
        x = x + (gate * torch.sigmoid(gate) * up) @ p("mlp.down_proj.weight").t()
    x = rms_norm(x, w["norm.weight"])
    head = w.get("lm_head.weight", w["embed_tokens.weight"])
    return (x @ head.t()).float()


@pytest.mark.parametrize("tied", [False, True])
def test_import_gives_llama_logits(tied):
    sd, cfg = llama_state_dict(tied), llama_config_json(tie_word_embeddings=tied)
    model = from_hf_llama(sd, cfg, backend="torch").eval()
    c = model.config
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.hidden_size, c.rope_theta,
            c.norm_eps, c.tie_embeddings) == (VOCAB, CTX, LAYERS, EMBD, HEADS, KV_HEADS, HIDDEN, 500.0, 1e-5, tied)
    assert c.padded_vocab_size == 128 and torch.all(model.wte.weight[VOCAB:] == 0)
    assert torch.all(model.lm_head.weight[VOCAB:] == 0)
    idx = torch.randint(0, VOCAB, (2, CTX))
    expected = llama_logits(sd, idx, cfg)
    torch.testing.assert_close(model(idx)[0], expected, rtol=1e-5, atol=1e-5)
    # LlamaModel's names (no "model." prefix) and a stored rotary buffer (older transformers) read the same
    bare = {k.removeprefix("model."): v for k, v in sd.items()}
    bare["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(EMBD // HEADS // 2)
    if tied:
        del bare["lm_head.weight"]  # save_pretrained stores a tied table once
    torch.testing.assert_close(from_hf_llama(bare, cfg, backend="torch").eval()(idx)[0], expected,
                               rtol=1e-5, atol=1e-5)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def test_llama3_rope_scaling_gives_the_reference_logits_and_exports_back():
    # Head dim 16, theta 500: wavelengths from 6.3 to 1440 positions, so with an original context of 64 the
    # pairs fall in all three bands (kept below 16, blended between, slowed by 8 above 64).
    sd, cfg = llama_state_dict(), llama_config_json(rope_scaling=LLAMA3_SCALING)
    bands = [2 * math.pi / f for f in reference_inv_freq(llama_config_json(), EMBD // HEADS)]
    assert min(bands) < 16 and any(16 < w < 64 for w in bands) and max(bands) > 64
    model = from_hf_llama(sd, cfg, backend="torch").eval()
    assert model.config.rope_scaling == LLAMA3_SCALING
    idx = torch.randint(0, VOCAB, (2, CTX))
    torch.testing.assert_close(model(idx)[0], llama_logits(sd, idx, cfg), rtol=1e-5, atol=1e-5)
    # without the scaling the logits differ: the test would see a scaling left out
    assert not torch.allclose(llama_logits(sd, idx, llama_config_json()), llama_logits(sd, idx, cfg), atol=1e-3)
    out_sd, out_cfg = to_hf_llama(model)
    assert out_cfg["rope_scaling"] == LLAMA3_SCALING
    again = from_hf_llama(out_sd, out_cfg, backend="torch").eval()
    assert torch.equal(again(idx)[0], model(idx)[0])
    # the config is saved with the model's checkpoints and read back
    assert GPTConfig.from_dict(model.config.to_dict()).rope_scaling == LLAMA3_SCALING


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 2.5}])
def test_linear_rope_scaling_gives_the_reference_logits_and_exports_back(scaling):
    """transformers' Llama reads "linear" (older files name it under "type"): every position divided by the factor.
    The export writes it back, and the model that reads that file is the same."""
    sd, cfg = llama_state_dict(), llama_config_json(rope_scaling=scaling)
    model = from_hf_llama(sd, cfg, backend="torch").eval()
    assert model.config.rope_scaling == {"rope_type": "linear", "factor": scaling["factor"]}
    idx = torch.randint(0, VOCAB, (2, CTX))
    torch.testing.assert_close(model(idx)[0], llama_logits(sd, idx, cfg), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(llama_logits(sd, idx, llama_config_json()), llama_logits(sd, idx, cfg), atol=1e-3)
    out_sd, out_cfg = to_hf_llama(model)
    assert config_from_hf_llama(out_cfg, backend="torch") == model.config
    assert torch.equal(from_hf_llama(out_sd, out_cfg, backend="torch").eval()(idx)[0], model(idx)[0])


@pytest.mark.parametrize("scaling, message", [
    ({**LLAMA3_SCALING, "factor": 0}, "factor"),
    ({**LLAMA3_SCALING, "low_freq_factor": 4.0}, "low_freq_factor must be < high_freq_factor"),
    ({**LLAMA3_SCALING, "extra": 1}, "unknown"),
    ({"rope_type": "yarn", "factor": 2.0}, "rope_type 'llama3'"),
])
def test_a_bad_rope_scaling_is_refused(scaling, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig.from_preset("tiny-llama", rope_scaling=scaling)
    with pytest.raises(ValueError, match="for pos='rope'"):
        GPTConfig.from_preset("tiny", rope_scaling=LLAMA3_SCALING)


def test_the_reference_is_sensitive_to_what_the_mapping_could_get_wrong():
    """The checks above would pass a wrong mapping if the reference could not tell: each of these gives
    other logits (k and v swapped, gate and up swapped, kv heads shared the other way, RoPE off)."""
    sd, cfg = llama_state_dict(), llama_config_json()
    idx = torch.randint(0, VOCAB, (1, 16))
    right = llama_logits(sd, idx, cfg)
    wrong = [{**sd, "model.layers.0.self_attn.k_proj.weight": sd["model.layers.0.self_attn.v_proj.weight"],
              "model.layers.0.self_attn.v_proj.weight": sd["model.layers.0.self_attn.k_proj.weight"]},
             {**sd, "model.layers.0.mlp.gate_proj.weight": sd["model.layers.0.mlp.up_proj.weight"],
              "model.layers.0.mlp.up_proj.weight": sd["model.layers.0.mlp.gate_proj.weight"]}]
    for other in wrong:
        assert not torch.allclose(from_hf_llama(other, cfg, backend="torch").eval()(idx)[0], right, atol=1e-3)
    # kv head j // 2 for query head j (repeat_interleave), not j % 2 (repeat)
    k = sd["model.layers.0.self_attn.k_proj.weight"].view(KV_HEADS, -1, EMBD)
    swapped = {**sd, "model.layers.0.self_attn.k_proj.weight": k.flip(0).reshape(-1, EMBD)}
    assert not torch.allclose(from_hf_llama(swapped, cfg, backend="torch").eval()(idx)[0], right, atol=1e-3)
    other_theta = from_hf_llama(sd, llama_config_json(rope_theta=10000.0), backend="torch").eval()(idx)[0]
    assert not torch.allclose(other_theta, right, atol=1e-3)


@pytest.mark.parametrize("tied", [False, True])
def test_export_round_trips_bitwise(tied):
    sd, cfg = llama_state_dict(tied), llama_config_json(tie_word_embeddings=tied)
    out, out_cfg = to_hf_llama(from_hf_llama(sd, cfg))
    assert_exported_as(out, sd)
    if tied:
        assert out["lm_head.weight"] is out["model.embed_tokens.weight"]
    assert {k: out_cfg[k] for k in cfg if k != "rope_theta"} == {k: v for k, v in cfg.items() if k != "rope_theta"}
    assert out_cfg["rope_theta"] == 500.0 and out_cfg["head_dim"] == EMBD // HEADS
    # and a llmkern model exported reads back as the same model
    ours = GPT(GPTConfig.from_preset("tiny-llama", vocab_size=VOCAB, tie_embeddings=tied, backend="torch"))
    sd2, cfg2 = to_hf_llama(ours)
    back = from_hf_llama(sd2, json.loads(json.dumps(cfg2)), backend="torch")
    # the MLP width comes back as mlp_hidden, set; the same width the preset's None makes
    assert dataclasses.replace(back.config, mlp_hidden=None) == ours.config
    assert back.config.hidden_size == ours.config.hidden_size
    assert_same_weights(back, ours)


def assert_exported_as(out: dict, sd: dict) -> None:
    """An export `out` holds exactly the Hugging Face state dict `sd` it was imported from: its names, bitwise."""
    assert sorted(out) == sorted(sd)
    for name, tensor in sd.items():
        assert torch.equal(out[name], tensor), name


def assert_same_weights(back: GPT, ours: GPT) -> None:
    """back (ours exported and read back) holds ours' weights; the vocabulary padding is not exported, and reads
    back 0."""
    for name, tensor in ours.state_dict().items():
        rows = VOCAB if name in ("wte.weight", "lm_head.weight") else None
        assert torch.equal(back.state_dict()[name][:rows], tensor[:rows]), name


def _save(folder, sd: dict, cfg: dict | None, shards: int = 1, dtype=torch.float32) -> list:
    from safetensors.torch import save_file

    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    if cfg is not None:
        (folder / "config.json").write_text(json.dumps(cfg))
    if cfg is not None and cfg["tie_word_embeddings"]:
        sd.pop("lm_head.weight", None)
    if shards == 1:
        save_file(sd, str(folder / "model.safetensors"))
        return [folder / "model.safetensors"]
    names = sorted(sd)
    files, weight_map = [], {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in names[s::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
        files.append(folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


@pytest.mark.parametrize("shards, tied", [(1, False), (1, True), (3, False)])
def test_a_model_folder_is_read(tmp_path, shards, tied):
    sd, cfg = llama_state_dict(tied), llama_config_json(tie_word_embeddings=tied)
    files = _save(tmp_path, sd, cfg, shards, torch.bfloat16)
    idx = torch.randint(0, VOCAB, (2, 9))
    expected = llama_logits({k: v.to(torch.bfloat16) for k, v in sd.items()}, idx, cfg)  # bf16 weights, read exactly
    for file in files:
        model = load_hf_llama_file(str(file), backend="torch").eval()
        torch.testing.assert_close(model(idx)[0], expected, rtol=1e-5, atol=1e-5)
        routed, model_type = load_hf_file(str(file), backend="torch")
        assert model_type == "llama" and routed.config == model.config


def test_load_gpt_routes_by_model_type(tmp_path):
    from llmkern.model.generate import generate
    from llmkern.train.inference import load_gpt

    sd, cfg = llama_state_dict(), llama_config_json()
    (path,) = _save(tmp_path, sd, cfg)
    model, spec, meta = load_gpt(str(path), backend="torch", hf_tokenizer="bytes")
    assert spec == "bytes" and meta["source"] == "hf-llama" and model.config.n_kv_head == KV_HEADS
    idx = torch.randint(0, VOCAB, (1, 5))
    torch.testing.assert_close(model.eval()(idx)[0], llama_logits(sd, idx, cfg), rtol=1e-5, atol=1e-5)
    # greedy decoding with the KV cache: each new token is the argmax of the reference's logits
    out = generate(model, [idx[0].tolist()], max_new_tokens=4, temperature=0.0)[0]  # the prompt, then 4 more
    assert len(out) == 9
    for n in range(5, 9):
        assert out[n] == int(llama_logits(sd, torch.tensor([out[:n]]), cfg)[0, -1].argmax())
    # a mistral config (no sliding window) is Llama's model; another model_type is named
    (tmp_path / "config.json").write_text(json.dumps(llama_config_json(model_type="mistral", sliding_window=None)))
    assert load_gpt(str(path), backend="torch")[2]["source"] == "hf-llama"
    (tmp_path / "config.json").write_text(json.dumps(llama_config_json(model_type="bert")))
    with pytest.raises(ValueError, match="model_type=.bert.; the models that can be imported are"):
        load_gpt(str(path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="not a GPT-2 state dict.*a Llama-family model's weights: they load with "
                                         "its config.json beside them"):  # no config: GPT-2's loader, as before
        load_gpt(str(path))
    with pytest.raises(ValueError, match="has no config.json beside it; a Llama model's weights"):
        load_hf_llama_file(str(path))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"},
     r"model_type='gpt2'; Llama-family weights are of \('llama', 'mistral', 'qwen2', 'qwen3'\)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 RoPE scaling .* missing"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling"),
    ({"rope_scaling": {"type": "linear", "factor": 0.0}}, "linear RoPE scaling is not one the model takes"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0}}, "RoPE scaling"),
    ({"attention_bias": True}, "attention_bias=True; the Llama model here has no biases"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    # heads of config.json's head_dim (Mistral NeMo's are not hidden_size / num_attention_heads wide): these
    # weights have heads of 16
    ({"head_dim": 32}, r"layers.0.self_attn.q_proj.weight has shape \(64, 64\); the model needs \(128, 64\)"),
    ({"num_attention_heads": None}, "config.json has no 'num_attention_heads'"),
    ({"num_key_value_heads": 2.0}, "num_key_value_heads must be an int >= 1, got 2.0"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a number > 0"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false"),
    # RoPE on part of each head: transformers' Llama-family rotary tables would be that narrow; the model here turns
    # all of each head (a partial turn is Phi-3's)
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
])
def test_a_config_the_model_would_misread_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        from_hf_llama(llama_state_dict(), llama_config_json(**change))


def test_a_mistral_sliding_window_loads_whole_and_gives_the_windowed_logits():
    """Mistral 7B v0.1's window of 4096 beside 32768 positions (here 8 of CTX): the model loads with its whole
    context and the window as GPTConfig.sliding_window, without a warning, and gives transformers' logits on a
    sequence longer than the window. Exported, it is a Mistral config.json with the window again."""
    sd, cfg = llama_state_dict(), llama_config_json(model_type="mistral", architectures=["MistralForCausalLM"],
                                                    sliding_window=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = from_hf_llama(sd, cfg, backend="torch").eval()
    assert (model.config.block_size, model.config.sliding_window) == (CTX, 8)
    idx = torch.randint(0, VOCAB, (2, CTX))
    expected = llama_logits(sd, idx, cfg)
    torch.testing.assert_close(model(idx)[0], expected, rtol=1e-4, atol=1e-4)  # fp32 against float64
    # the window matters here: the plain causal reference gives other logits past it, the same ones within it
    plain = llama_logits(sd, idx, {**cfg, "sliding_window": None})
    assert not torch.allclose(plain, expected, atol=1e-3)
    torch.testing.assert_close(plain[:, :8], expected[:, :8], rtol=1e-5, atol=1e-5)
    out, out_cfg = to_hf_llama(model)
    assert "attention_bias" not in out_cfg and "mlp_bias" not in out_cfg  # MistralConfig has neither
    assert {k: out_cfg[k] for k in cfg if k not in ("attention_bias", "mlp_bias")} == {
        k: v for k, v in cfg.items() if k not in ("attention_bias", "mlp_bias")}
    back = from_hf_llama(out, json.loads(json.dumps(out_cfg)), backend="torch")
    assert back.config == model.config
    # a context given shorter or longer than max_position_embeddings keeps the window
    assert config_from_hf_llama(cfg, block_size=4).sliding_window == 8
    assert config_from_hf_llama(cfg, block_size=4 * CTX).sliding_window == 8


def test_a_window_exports_as_a_type_that_slides_it_on_the_same_layers():
    windowed = GPT(GPTConfig.from_preset("tiny-llama", vocab_size=VOCAB, sliding_window=16))
    assert to_hf_llama(windowed)[1]["model_type"] == "mistral"
    assert "sliding_window" not in to_hf_llama(GPT(GPTConfig.from_preset("tiny-llama", vocab_size=VOCAB)))[1]
    for change in ({"qkv_bias": True}, {"qk_norm": True}):  # Qwen's, sliding on every layer: from layer 0 on
        every = GPT(GPTConfig.from_preset("tiny-llama", vocab_size=VOCAB, sliding_window=16, **change))
        out_cfg = to_hf_llama(every)[1]
        assert (out_cfg["use_sliding_window"], out_cfg["sliding_window"], out_cfg["max_window_layers"]) == (True, 16, 0)
        back = config_from_hf_llama(out_cfg)
        assert (back.sliding_window, back.layer_types, back.block_size) == (16, None, every.config.block_size)
        # sliding layers before a full one: no max_window_layers says it, so older transformers would misread it
        first = GPT(GPTConfig.from_preset("tiny-llama", vocab_size=VOCAB, sliding_window=16,
                                          layer_types=["sliding_attention", "full_attention"], **change))
        with pytest.raises(ValueError, match=r"sliding layers are \[0\]"):
            to_hf_llama(first)
    with pytest.raises(ValueError, match="cannot express .*layer_types"):  # Llama's and Mistral's have no layer_types
        to_hf_llama(GPT(GPTConfig.from_preset("tiny-llama", vocab_size=VOCAB, sliding_window=16,
                                              layer_types=["full_attention", "sliding_attention"])))


@pytest.mark.parametrize("layer_types", [None, ["full_attention", "sliding_attention"]])
def test_a_qwen2_window_slides_on_its_layers_with_the_whole_context(layer_types):
    """Qwen2's window (use_sliding_window true) slides on the layers from max_window_layers on (here 1 of 2), or
    those layer_types names: GPTConfig.layer_types, the context whole; exported back, the same config."""
    sd, idx = llama_state_dict(qkv_bias=True), torch.randint(0, VOCAB, (1, CTX))
    cfg = qwen2_config_json(use_sliding_window=True, sliding_window=6, max_window_layers=1, layer_types=layer_types)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing cut, nothing to warn of
        model = from_hf_llama(sd, cfg, backend="torch")
    c = model.config
    assert (c.block_size, c.sliding_window, c.layer_types) == (CTX, 6, ["full_attention", "sliding_attention"])
    expected = llama_logits(sd, idx, cfg)
    torch.testing.assert_close(model.eval()(idx)[0], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(llama_logits(sd, idx, {**cfg, "use_sliding_window": False}), expected, atol=1e-3)
    out_cfg = to_hf_llama(model)[1]
    assert (out_cfg["max_window_layers"], out_cfg["layer_types"]) == (1, ["full_attention", "sliding_attention"])
    assert config_from_hf_llama(out_cfg, backend="torch") == c
    with_types = qwen2_config_json(use_sliding_window=True, sliding_window=6, max_window_layers=0,
                                   layer_types=["sliding_attention", "full_attention"])  # layer_types wins
    assert config_from_hf_llama(with_types).layer_types == ["sliding_attention", "full_attention"]


@pytest.mark.parametrize("change", [{"model_type": "llama", "sliding_window": 16}])
def test_a_window_not_slid_on_every_layer_makes_the_context_that_long(change):
    """transformers' Llama reads no sliding_window: the context is cut to the window (with a warning), where the
    window masks nothing, whichever way it is read."""
    sd, idx = llama_state_dict(), torch.randint(0, VOCAB, (1, 16))
    cfg = llama_config_json(**change)
    with pytest.warns(UserWarning, match="loaded with block_size=16"):
        model = from_hf_llama(sd, cfg, backend="torch")
    assert (model.config.block_size, model.config.sliding_window) == (16, None)
    plain = {**cfg, "sliding_window": None, "use_sliding_window": False}
    torch.testing.assert_close(model.eval()(idx)[0], llama_logits(sd, idx, plain), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sliding_window=16, shorter than block_size=32"):
        from_hf_llama(sd, cfg, block_size=32)  # a longer context asked for: refused, not computed otherwise


def test_an_import_warning_names_the_users_call(tmp_path):
    """An import's warning (a Llama window that cuts the context) is the user's call's (its file and line),
    however many llmkern functions lie between that call and the warning (it named one of them, in llmkern)."""
    from llmkern.train.inference import load_gpt

    sd, cfg = llama_state_dict(), llama_config_json(model_type="llama", sliding_window=16)
    (path,) = _save(tmp_path, sd, cfg)
    loads = [lambda: config_from_hf_llama(cfg), lambda: from_hf_llama(sd, cfg, backend="torch"),
             lambda: load_hf_file(str(path), backend="torch"),
             lambda: load_gpt(str(path), backend="torch", hf_tokenizer="bytes")]
    for load in loads:
        with pytest.warns(UserWarning, match="loaded with block_size=16") as record:
            load()
        assert [w.filename for w in record if "block_size=16" in str(w.message)] == [__file__]


def test_configs_that_compute_the_same_model_are_accepted():
    sd, idx = llama_state_dict(), torch.randint(0, VOCAB, (1, 8))
    expected = llama_logits(sd, idx, llama_config_json())
    for change in ({"rope_scaling": {"rope_type": "default"}}, {"head_dim": EMBD // HEADS},
                   {"model_type": "mistral", "sliding_window": CTX}, {"model_type": "mistral", "sliding_window": None},
                   {"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}):
        cfg = {k: v for k, v in llama_config_json(**change).items() if v is not None or k == "sliding_window"}
        torch.testing.assert_close(from_hf_llama(sd, cfg, backend="torch").eval()(idx)[0], expected,
                                   rtol=1e-5, atol=1e-5)
    # num_key_value_heads null (older configs): as many as the query heads
    mha = llama_state_dict(kv_heads=HEADS)
    assert from_hf_llama(mha, llama_config_json(num_key_value_heads=None)).config.n_kv_head == HEADS
    # a mistral window no shorter than the context given masks nothing, and is kept
    mistral = config_from_hf_llama(llama_config_json(model_type="mistral", sliding_window=16), block_size=16)
    assert (mistral.block_size, mistral.sliding_window) == (16, 16)


def test_a_window_left_out_is_the_config_class_default():
    """A config.json without sliding_window: MistralConfig, Qwen2Config and Qwen3Config fill in 4096 (Qwen's only
    on with use_sliding_window), MixtralConfig none; null is none. Read as none, a Mistral past 4096 tokens (or a
    Qwen with its window on) would attend to the whole context where transformers slides."""
    def without_window(cfg):
        return {k: v for k, v in cfg.items() if k != "sliding_window"}

    mistral = without_window(llama_config_json(model_type="mistral", max_position_embeddings=8192))
    assert config_from_hf_llama(mistral).sliding_window == 4096
    assert config_from_hf_llama({**mistral, "sliding_window": None}).sliding_window is None
    qwen = without_window(qwen2_config_json(use_sliding_window=True, max_window_layers=1, max_position_embeddings=8192))
    for model_type in ("qwen2", "qwen3"):
        c = config_from_hf_llama({**qwen, "model_type": model_type})
        assert (c.sliding_window, c.layer_types) == (4096, ["full_attention", "sliding_attention"])
    off = config_from_hf_llama(without_window(qwen2_config_json(max_position_embeddings=8192)))
    assert (off.sliding_window, off.layer_types) == (None, None)


def test_kv_heads_left_out_are_the_config_class_default():
    """A config.json without num_key_value_heads: LlamaConfig makes it num_attention_heads, MistralConfig 8,
    Qwen2Config and Qwen3Config 32; null is num_attention_heads for each. A Mistral of 32 heads on 8 kv heads
    loads, rather than being refused for k_proj's shape."""
    heads = {"num_attention_heads": 32, "hidden_size": 32 * 16}
    for model_type, kv_heads in (("llama", 32), ("mistral", 8), ("qwen2", 32), ("qwen3", 32)):
        cfg = {k: v for k, v in llama_config_json(model_type=model_type, **heads).items() if k != "num_key_value_heads"}
        assert config_from_hf_llama(cfg).n_kv_head == kv_heads, model_type
        assert config_from_hf_llama({**cfg, "num_key_value_heads": None}).n_kv_head == 32, model_type


def test_weights_that_do_not_fit_are_refused():
    cfg = llama_config_json()
    sd = llama_state_dict()
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing \['layers.1.mlp.up_proj.weight'\]"):
        from_hf_llama(sd, cfg)
    sd = {**llama_state_dict(), "model.layers.0.self_attn.q_proj.bias": torch.zeros(EMBD)}
    with pytest.raises(ValueError, match=r"unexpected \['layers.0.self_attn.q_proj.bias'\]"):
        from_hf_llama(sd, cfg)
    # multi-head k/v under a config of 2 kv heads: stacked they are 2 heads too many, each part is named
    with pytest.raises(ValueError, match=r"layers.0.self_attn.k_proj.weight has shape \(64, 64\); the model needs "
                                         r"\(32, 64\)"):
        from_hf_llama(llama_state_dict(kv_heads=HEADS), cfg)
    with pytest.raises(ValueError, match=r"embed_tokens.weight has shape \(100, 64\); config.json's vocab_size"):
        from_hf_llama(llama_state_dict(), llama_config_json(vocab_size=120))
    with pytest.raises(ValueError, match="not a Llama state dict of 3 layers"):
        from_hf_llama(llama_state_dict(), llama_config_json(num_hidden_layers=3))
    sd = llama_state_dict()
    with pytest.raises(ValueError, match="lm_head.weight differs from embed_tokens.weight"):
        from_hf_llama(sd, llama_config_json(tie_word_embeddings=True))
    del sd["lm_head.weight"]
    with pytest.raises(ValueError, match="no lm_head.weight, and config.json has tie_word_embeddings=false"):
        from_hf_llama(sd, cfg)
    with pytest.raises(TypeError, match="hf_config must be a dict"):
        from_hf_llama(llama_state_dict(), json.dumps(cfg))
    gpt2 = GPT(GPTConfig.from_preset("tiny", vocab_size=VOCAB))
    with pytest.raises(ValueError, match="Llama weights need a Llama-shaped model"):
        load_hf_llama(gpt2, llama_state_dict())
    with pytest.raises(ValueError, match="Llama weights need a Llama-shaped model"):
        to_hf_llama(gpt2)
    with pytest.raises(ValueError, match="model_type='llama': only GPT-2 .* from_hf_llama"):
        from_hf_gpt2({"wte.weight": torch.zeros(VOCAB, EMBD), "wpe.weight": torch.zeros(CTX, EMBD),
                      "h.0.ln_1.weight": torch.zeros(EMBD)}, hf_config=cfg)


# --- Qwen2: Llama's model with biases on q/k/v alone ----------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_import_gives_qwen2_logits(tied):
    sd, cfg = llama_state_dict(tied, qkv_bias=True), qwen2_config_json(tie_word_embeddings=tied)
    model = from_hf_llama(sd, cfg, backend="torch").eval()
    c = model.config
    assert (c.qkv_bias, c.bias, c.rope_theta, c.norm_eps, c.tie_embeddings) == (True, False, 1e6, 1e-6, tied)
    attn = model.blocks[0].attn
    assert attn.qkv.bias is not None and attn.proj.bias is None and model.blocks[0].mlp.proj.bias is None
    idx = torch.randint(0, VOCAB, (2, CTX))  # the whole context, past the sliding window that is off
    expected = llama_logits(sd, idx, cfg)
    torch.testing.assert_close(model(idx)[0], expected, rtol=1e-5, atol=1e-5)
    # the reference sees the biases (dropped, or k's and v's swapped, the logits differ)
    no_bias = {k: v for k, v in sd.items() if not k.endswith(".bias")}
    assert not torch.allclose(llama_logits(no_bias, idx, cfg), expected, atol=1e-3)
    swapped = {**sd, "model.layers.0.self_attn.k_proj.bias": sd["model.layers.0.self_attn.v_proj.bias"],
               "model.layers.0.self_attn.v_proj.bias": sd["model.layers.0.self_attn.k_proj.bias"]}
    assert not torch.allclose(from_hf_llama(swapped, cfg, backend="torch").eval()(idx)[0], expected, atol=1e-3)


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_export_round_trips_bitwise(tied):
    sd, cfg = llama_state_dict(tied, qkv_bias=True), qwen2_config_json(tie_word_embeddings=tied)
    model = from_hf_llama(sd, cfg, backend="torch")
    out, out_cfg = to_hf_llama(model)
    assert_exported_as(out, sd)
    assert out_cfg["model_type"] == "qwen2" and out_cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert out_cfg["use_sliding_window"] is False and "attention_bias" not in out_cfg
    assert out_cfg["tie_word_embeddings"] == tied and out_cfg["rope_theta"] == 1e6
    back = from_hf_llama(out, json.loads(json.dumps(out_cfg)), backend="torch")
    assert back.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_a_qwen2_folder_is_read(tmp_path):
    sd, cfg = llama_state_dict(qkv_bias=True), qwen2_config_json()
    (path,) = _save(tmp_path, sd, cfg)
    model, model_type = load_hf_file(str(path), backend="torch")
    assert model_type == "qwen2" and model.config.qkv_bias
    idx = torch.randint(0, VOCAB, (1, 9))
    torch.testing.assert_close(model.eval()(idx)[0], llama_logits(sd, idx, cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"use_sliding_window": "false"}, "use_sliding_window must be true or false, got 'false'"),
    ({"mlp_bias": True}, "mlp_bias=True"),
])
def test_a_qwen2_config_the_model_would_misread_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        from_hf_llama(llama_state_dict(qkv_bias=True), qwen2_config_json(**change))


def test_qwen2_configs_that_compute_the_same_model_are_accepted():
    sd, idx = llama_state_dict(qkv_bias=True), torch.randint(0, VOCAB, (1, 8))
    expected = llama_logits(sd, idx, qwen2_config_json())
    for change in ({"use_sliding_window": True, "sliding_window": CTX}, {"sliding_window": None},
                   {"use_sliding_window": None}):
        cfg = {k: v for k, v in qwen2_config_json(**change).items() if v is not None}  # absent: Qwen2's default
        torch.testing.assert_close(from_hf_llama(sd, cfg, backend="torch").eval()(idx)[0], expected,
                                   rtol=1e-5, atol=1e-5)


def test_qwen2_weights_that_do_not_fit_are_refused():
    # a Qwen2 config without the biases: missing; Llama's config with them: unexpected (the model would drop them)
    with pytest.raises(ValueError, match=r"missing \['layers.0.self_attn.k_proj.bias', "):
        from_hf_llama(llama_state_dict(), qwen2_config_json())
    with pytest.raises(ValueError, match=r"unexpected \['layers.0.self_attn.k_proj.bias', "):
        from_hf_llama(llama_state_dict(qkv_bias=True), llama_config_json())
    sd = llama_state_dict(qkv_bias=True)
    sd["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(EMBD + 1)
    with pytest.raises(ValueError, match=r"layers.1.self_attn.q_proj.bias has shape \(65,\); the model needs \(64,\)"):
        from_hf_llama(sd, qwen2_config_json())
