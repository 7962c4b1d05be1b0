"""Hugging Face Gemma 2 weights: a synthetic state dict under Gemma2ForCausalLM's names goes in, gives the logits of a
plain float64 Gemma 2 forward written here from transformers' definition (soft-capped attention scores and logits,
alternating sliding and full layers), generates alike with and without the KV cache, trains on the capped logits,
and comes back out bit for bit; the configs the model would compute otherwise are refused."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_hf_gemma3 import gemma3_config_json, gemma3_state_dict

from llmkern import _backend
from llmkern.model import GPT, GPTConfig, generate
from llmkern.model.hf import (
    config_from_hf_gemma2,
    from_hf_gemma2,
    from_hf_gemma3,
    load_hf_file,
    load_hf_gemma2,
    to_hf_gemma2,
    to_hf_gemma3,
)
from llmkern.ops import reference

# head_dim is not EMBD / HEADS, query_pre_attn_scalar not head_dim; 4 layers alternate s f s f. The caps are far
# below Gemma 2's 50 and 30, so that these small random weights' scores and logits feel them.
VOCAB, CTX, EMBD, LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, WINDOW = 100, 32, 48, 4, 4, 2, 16, 80, 5
ALTERNATING = ["sliding_attention", "full_attention"] * 2
ATTN_CAP, LOGIT_CAP = 2.0, 4.0


def gemma2_config_json(style: str = "old", **changes) -> dict:
    """A Gemma2ForCausalLM config.json of gemma2_state_dict's sizes: style "old" (transformers before layer_types:
    the layers alternate), "types" (layer_types) or "parameters" (transformers 5's rope_parameters)."""
    config = {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "vocab_size": VOCAB,
              "hidden_size": EMBD, "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
              "max_position_embeddings": CTX, "rms_norm_eps": 1e-6, "rope_theta": 500.0, "query_pre_attn_scalar": 24,
              "sliding_window": WINDOW, "attention_bias": False, "attn_logit_softcapping": ATTN_CAP,
              "final_logit_softcapping": LOGIT_CAP, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
              "cache_implementation": "hybrid"}
    if style == "types":
        config["layer_types"] = list(ALTERNATING)
    config.update(changes)
    if style == "parameters":
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    return config


def gemma2_state_dict(tied: bool = True) -> dict[str, torch.Tensor]:
    """Random weights under Gemma2ForCausalLM's names: Gemma 3's without QK-norm (see gemma3_state_dict), of this
    file's layer count; the projections a little wider spread, so that the caps bite."""
    return gemma3_state_dict(tied, layers=LAYERS, qk_norm=False, spread=0.25)


def gemma2_logits(sd: dict[str, torch.Tensor], idx: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Gemma 2's forward, plainly (float64), written from transformers' Gemma2ForCausalLM (eager attention):
    embeddings times sqrt(hidden_size); per layer x += post_attention_layernorm(attn(input_layernorm(x))), then
    x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))); RMSNorms scale by 1 + w; no QK-norm; RoPE
    of base rope_theta on every layer; scores times query_pre_attn_scalar ** -0.5, then
    attn_logit_softcapping * tanh(scores / attn_logit_softcapping), then the mask: causal, and on the even (sliding)
    layers a key only when q - kv < sliding_window (transformers' tril(diagonal=-sliding_window) masked, later its
    kv > q - sliding_window); MLP down(gelu_tanh(gate) * up); logits capped by final_logit_softcapping alike.
    cfg is config.json's keys (the "old" or "types" style)."""
    w = {k.removeprefix("model."): v.double() for k, v in sd.items()}
    b, t = idx.shape
    eps, d = cfg["rms_norm_eps"], cfg["head_dim"]
    types = cfg.get("layer_types") or ["full_attention" if i % 2 else "sliding_attention" for i in range(LAYERS)]

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + weight)

    def soft_cap(x, cap):
        return x if cap is None else cap * torch.tanh(x / cap)

    inv_freq = cfg["rope_theta"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

    def rotate(x):
        return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin

    x = w["embed_tokens.weight"][idx] * math.sqrt(cfg["hidden_size"])
    pos = torch.arange(t)
    causal = pos[None, :] <= pos[:, None]
    in_window = pos[:, None] - pos[None, :] < cfg["sliding_window"]
    for i in range(LAYERS):
        def p(name, i=i):
            return w[f"layers.{i}.{name}"]

        h = rms_norm(x, p("input_layernorm.weight"))
        q, k, v = (
            (h @ p(f"self_attn.{name}.weight").t()).view(b, t, n, d).transpose(1, 2)
            for name, n in (("q_proj", HEADS), ("k_proj", KV_HEADS), ("v_proj", KV_HEADS))
        )
        q, k = rotate(q), rotate(k)
        k, v = (z.repeat_interleave(HEADS // KV_HEADS, dim=1) for z in (k, v))
        seen = causal & in_window if types[i] == "sliding_attention" else causal
        att = soft_cap(q @ k.transpose(-1, -2) * cfg["query_pre_attn_scalar"] ** -0.5, cfg["attn_logit_softcapping"])
        y = (att.masked_fill(~seen, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(b, t, HEADS * d)
        x = x + rms_norm(y @ p("self_attn.o_proj.weight").t(), p("post_attention_layernorm.weight"))
        h = rms_norm(x, p("pre_feedforward_layernorm.weight"))
        gate, up = h @ p("mlp.gate_proj.weight").t(), h @ p("mlp.up_proj.weight").t()
        m = (F.gelu(gate, approximate="tanh") * up) @ p("mlp.down_proj.weight").t()
        x = x + rms_norm(m, p("post_feedforward_layernorm.weight"))
    x = rms_norm(x, w["norm.weight"])
    logits = x @ w.get("lm_head.weight", w["embed_tokens.weight"]).t()
    return soft_cap(logits, cfg["final_logit_softcapping"]).float()


def assert_logits(model: GPT, sd: dict, cfg: dict, t: int = CTX) -> None:
    idx = torch.randint(0, VOCAB, (2, t))
    torch.testing.assert_close(model.eval()(idx)[0], gemma2_logits(sd, idx, cfg), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied, style", [(True, "old"), (False, "types"), (True, "parameters")])
def test_import_gives_gemma2_logits(tied, style):
    sd = gemma2_state_dict(tied)
    model = from_hf_gemma2(sd, gemma2_config_json(style, tie_word_embeddings=tied), backend="torch")
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.hidden_size, c.tie_embeddings, c.sliding_window,
            c.layer_types, c.rope_theta, c.rope_local_theta, c.rope_scaling, c.attn_scale, c.qk_norm,
            c.attn_softcap, c.logit_softcap) == (
        LAYERS, EMBD, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, tied, WINDOW, ALTERNATING, 500.0, None, None, 24 ** -0.5,
        False, ATTN_CAP, LOGIT_CAP)
    # sequences of CTX tokens: past the window of 5 on the sliding layers
    assert_logits(model, sd, gemma2_config_json("old", tie_word_embeddings=tied))


def test_the_reference_sees_what_the_import_could_get_wrong():
    """Each cap, the window (by one), the layer kinds and the attention scale change the logits."""
    sd, idx = gemma2_state_dict(), torch.randint(0, VOCAB, (1, CTX))
    cfg = gemma2_config_json("types")
    expected = gemma2_logits(sd, idx, cfg)
    for change in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None},
                   {"sliding_window": WINDOW + 1}, {"layer_types": ALTERNATING[::-1]},
                   {"query_pre_attn_scalar": HEAD_DIM}):
        assert not torch.allclose(gemma2_logits(sd, idx, {**cfg, **change}), expected, atol=1e-3), change


def test_defaults_and_canonical_forms():
    """A config.json without the optional keys takes Gemma2Config's defaults: caps of 50 and 30, RoPE base 10000,
    window 4096 on the even layers; null caps are none."""
    cfg = {k: v for k, v in gemma2_config_json().items()
           if k not in ("rope_theta", "rms_norm_eps", "tie_word_embeddings", "query_pre_attn_scalar", "sliding_window",
                        "attn_logit_softcapping", "final_logit_softcapping", "hidden_activation")}
    c = config_from_hf_gemma2(cfg)
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings, c.attn_scale, c.sliding_window, c.layer_types,
            c.attn_softcap, c.logit_softcap) == (10000.0, 1e-6, True, 256 ** -0.5, 4096, ALTERNATING, 50.0, 30.0)
    uncapped = config_from_hf_gemma2(gemma2_config_json(attn_logit_softcapping=None, final_logit_softcapping=None))
    assert (uncapped.attn_softcap, uncapped.logit_softcap) == (None, None)
    full = config_from_hf_gemma2(gemma2_config_json("types", layer_types=["full_attention"] * LAYERS))
    assert (full.sliding_window, full.layer_types) == (None, None)
    assert config_from_hf_gemma2(gemma2_config_json(), block_size=8).block_size == 8


@pytest.mark.parametrize("tied", [True, False])
def test_export_round_trips_bitwise(tied):
    sd, cfg = gemma2_state_dict(tied), gemma2_config_json(tie_word_embeddings=tied)
    model = from_hf_gemma2(sd, cfg, backend="torch")
    out, out_cfg = to_hf_gemma2(model)
    assert set(out) == set(sd) | {"lm_head.weight"}
    for name, tensor in sd.items():
        assert torch.equal(out[name], tensor), name  # the norms' w = (1 + w) - 1 exactly
    assert (out_cfg["model_type"], out_cfg["architectures"], out_cfg["layer_types"], out_cfg["rope_theta"],
            out_cfg["attn_logit_softcapping"], out_cfg["final_logit_softcapping"], out_cfg["query_pre_attn_scalar"],
            out_cfg["sliding_window"]) == (
        "gemma2", ["Gemma2ForCausalLM"], ALTERNATING, 500.0, ATTN_CAP, LOGIT_CAP, 24, WINDOW)
    assert config_from_hf_gemma2(json.loads(json.dumps(out_cfg)), backend="torch") == model.config
    back = from_hf_gemma2(out, out_cfg, backend="torch")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_a_folder_is_read_by_its_model_type(tmp_path):
    from safetensors.torch import save_file

    sd, cfg = gemma2_state_dict(), gemma2_config_json()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    model, model_type = load_hf_file(str(tmp_path / "model.safetensors"), backend="torch")
    assert model_type == "gemma2"
    assert_logits(model, sd, cfg, t=9)


# --- the caps in the model: loss, gradients, generation ------------------------------------------------------


def test_generation_with_and_without_the_cache_follows_the_reference():
    """The cached path (SDPA's place taken by the capped math, the sliding layers' ring) and the uncached one both
    follow the reference's greedy choices past the window; left-padded prompts generate alike in both."""
    sd, cfg = gemma2_state_dict(), gemma2_config_json()
    model = from_hf_gemma2(sd, cfg, backend="torch").eval()
    prompt = torch.randint(0, VOCAB, (6,)).tolist()
    expected = list(prompt)
    for _ in range(12):  # past the window of 5
        expected.append(int(gemma2_logits(sd, torch.tensor([expected]), cfg)[0, -1].argmax()))
    for use_cache in (True, False):
        assert generate(model, [prompt], max_new_tokens=12, temperature=0, use_cache=use_cache)[0] == expected
    prompts = [prompt, [3, 1], [7, 8, 9, 10, 11, 12, 13, 14]]
    cached = generate(model, prompts, max_new_tokens=10, temperature=0)
    assert cached == generate(model, prompts, max_new_tokens=10, temperature=0, use_cache=False)


def _kernel_backends() -> list[str]:
    cpu = torch.device("cpu")
    return ["torch"] + [b for b in ("triton",) if _backend.can_run(b, "fused_linear_cross_entropy", cpu)]


@pytest.mark.parametrize("backend", _kernel_backends())
def test_the_loss_is_the_cross_entropy_of_the_capped_logits(backend):
    """With fused_loss on, the loss is that of the capped logits (the triton backend's fused kernels cap them
    themselves and return no logits; the torch backend's plain path caps them); head() caps too."""
    model = from_hf_gemma2(gemma2_state_dict(tied=False), gemma2_config_json(tie_word_embeddings=False),
                           backend=backend, fused_loss=True).train()
    idx, targets = torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (2, 12))
    targets[0, :3] = -1
    logits, loss = model(idx, targets)
    hidden = model.hidden_states(idx).double()
    raw = hidden @ model.lm_head.weight.double()[:VOCAB].t()
    capped = LOGIT_CAP * torch.tanh(raw / LOGIT_CAP)
    expected = F.cross_entropy(capped.view(-1, VOCAB), targets.view(-1), ignore_index=-1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert (logits is None) == (backend == "triton")  # the fused path materializes no logits
    head_logits = model.head(model.hidden_states(idx))
    torch.testing.assert_close(head_logits.double(), capped, rtol=1e-5, atol=1e-5)
    if logits is not None:
        torch.testing.assert_close(head_logits, logits)
    assert raw.abs().max() > LOGIT_CAP and head_logits.abs().max() < LOGIT_CAP  # the cap is seen to bite


def test_gradients_match_the_float64_reference():
    """Backward through the capped attention and logits: the fp32 model's gradients are those of the float64
    reference forward's loss with respect to the HF weights (a norm's 1 + w moves as its w does)."""
    sd, cfg = gemma2_state_dict(), gemma2_config_json()
    model = from_hf_gemma2(sd, cfg, backend="torch").train()
    idx, targets = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    model(idx, targets)[1].backward()
    sd64 = {k: v.double().requires_grad_() for k, v in sd.items()}
    F.cross_entropy(gemma2_logits(sd64, idx, cfg).double().view(-1, VOCAB), targets.view(-1)).backward()
    block_names = (
        ("attn.qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
        ("attn.proj.weight", ("self_attn.o_proj.weight",)), ("norm1.weight", ("input_layernorm.weight",)),
        ("post_attn_norm.weight", ("post_attention_layernorm.weight",)),
        ("mlp.gate_up.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
        ("post_mlp_norm.weight", ("post_feedforward_layernorm.weight",)))
    ours_to_theirs = {"wte.weight": ("embed_tokens.weight",), "norm_f.weight": ("norm.weight",)}
    for i in range(LAYERS):
        for ours, theirs in block_names:
            ours_to_theirs[f"blocks.{i}.{ours}"] = tuple(f"layers.{i}.{name}" for name in theirs)
    for ours, theirs in ours_to_theirs.items():
        got = model.get_parameter(ours).grad[: VOCAB if ours == "wte.weight" else None]
        want = torch.cat([sd64["model." + name].grad for name in theirs])
        assert want.abs().max() > 0, ours
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-5, msg=ours)


def capped_attention_by_hand(q, k, v, scale, cap, window, doc_ids):
    """Softmax(cap * tanh(q k^T * scale / cap), masked causally, by the window and by document) @ v, GQA by
    repeating k and v."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q @ k.transpose(-1, -2) * scale
    s = cap * torch.tanh(s / cap)
    t = q.size(2)
    pos = torch.arange(t)
    seen = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < window)
    seen = seen & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    return s.masked_fill(~seen, float("-inf")).softmax(-1) @ v


def test_capped_attention_and_its_gradients_match_a_float64_one():
    q = torch.randn(2, 4, 11, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 11, 8, requires_grad=True) for _ in range(2))
    q.data *= 3  # scores of a few units: the cap of 1.5 bites
    doc_ids = torch.tensor([[0] * 6 + [1] * 5, [0] * 11])
    do = torch.randn(2, 4, 11, 8)
    out = reference.attention(q, k, v, scale=0.5, window=4, doc_ids=doc_ids, softcap=1.5)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = capped_attention_by_hand(q64, k64, v64, 0.5, 1.5, 4, doc_ids)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), do.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    uncapped = reference.attention(q, k, v, scale=0.5, window=4, doc_ids=doc_ids)
    assert not torch.allclose(uncapped, out, atol=1e-3)


# --- what is refused ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"attn_logit_softcapping": 0}, "attn_logit_softcapping must be a finite number > 0"),
    ({"final_logit_softcapping": -30.0}, "final_logit_softcapping must be a finite number > 0"),
    ({"final_logit_softcapping": True}, "final_logit_softcapping must be a finite number > 0"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "plain RoPE only"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 500.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}}, "share one"),
    ({"layer_types": ["sliding_attention"] * 2}, "layer_types must list one of"),
    ({"model_type": "gemma3_text"}, "Gemma 2 weights are of 'gemma2'"),
])
def test_a_config_the_model_would_misread_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        from_hf_gemma2(gemma2_state_dict(), gemma2_config_json(**change))


def test_a_model_of_another_shape_is_refused():
    gemma3 = from_hf_gemma3(gemma3_state_dict(), gemma3_config_json())
    with pytest.raises(ValueError, match="Gemma-2-shaped.*'qk_norm': True"):
        to_hf_gemma2(gemma3)
    with pytest.raises(ValueError, match="Gemma-2-shaped"):
        load_hf_gemma2(gemma3, gemma2_state_dict())
    gemma2 = from_hf_gemma2(gemma2_state_dict(), gemma2_config_json())
    with pytest.raises(ValueError, match="Gemma-3-shaped.*'qk_norm': False"):
        to_hf_gemma3(gemma2)
    scaled = GPT(GPTConfig.from_dict({**gemma2.config.to_dict(), "rope_scaling": {"rope_type": "linear", "factor": 2}}))
    with pytest.raises(ValueError, match="Gemma-2-shaped.*rope_scaling"):
        to_hf_gemma2(scaled)
    # Gemma 3's q_norm and k_norm weights are no Gemma 2 weights
    with pytest.raises(ValueError, match="unexpected .*q_norm"):
        from_hf_gemma2({**gemma2_state_dict(), **{k: v for k, v in gemma3_state_dict().items() if "q_norm" in k}},
                       gemma2_config_json())
