"""The GPT features Gemma 3 needs, each a GPTConfig field of its own: per-layer sliding or full attention
(layer_types) with the sliding layers' own RoPE base (rope_local_theta), sandwich norms (post_norms), GeGLU,
scaled embeddings (embed_scale), attention's scale (attn_scale) and the linear RoPE scaling; and Gemma 2's soft caps
(attn_softcap, logit_softcap). Each is checked
against a plain-PyTorch forward written here, on the model's cached and uncached generation, under activation
checkpointing, on the triton backend, in the config's checks and saved form, and in the exports that refuse it."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmkern import _backend
from llmkern.model import GPT, GPTConfig, generate
from llmkern.model.config import identity_dict
from llmkern.nn import CausalSelfAttention, RotaryCache
from llmkern.nn.rotary import check_rope_scaling
from test_model import assert_same_training_step

VOCAB = 300
SLIDE, FULL = "sliding_attention", "full_attention"
LINEAR_8 = {"rope_type": "linear", "factor": 8.0}

# A tiny Llama-shaped model, and the features added to it one at a time, then all together (Gemma 3's shape).
BASE = dict(vocab_size=VOCAB, block_size=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, norm="rmsnorm",
            norm_eps=1e-6, pos="rope", mlp="swiglu", bias=False, tie_embeddings=False)
MIXED_LAYERS = dict(sliding_window=4, layer_types=[SLIDE, FULL, SLIDE], rope_theta=1e6, rope_local_theta=1e4)
FEATURES = {
    "layer_types": MIXED_LAYERS,
    "post_norms": dict(post_norms=True),
    "geglu": dict(mlp="geglu"),
    "embed_scale": dict(embed_scale=8.0),
    "attn_scale": dict(attn_scale=0.3),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 3.0}),
    "gemma3": dict(MIXED_LAYERS, post_norms=True, mlp="geglu", embed_scale=8.0, attn_scale=0.3, qk_norm=True,
                   rope_scaling=LINEAR_8),
}


def config(**overrides) -> GPTConfig:
    return GPTConfig.from_dict({**BASE, **overrides})


def model_of(cfg: GPTConfig, sharpen: float = 1.0) -> GPT:
    """A GPT of fresh random weights, its norm scales moved away from 1 so that a misplaced norm shows."""
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2:
                p.mul_(sharpen)
    return model


# --- a plain forward ---------------------------------------------------------------------------------------


def rope_tables(theta: float, width: int, t: int, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, width, 2, dtype=torch.float64) / width) / factor
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq
    return torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Gemma 3's decoder as transformers writes it, from the model's parameters with plain tensor ops."""
    cfg = model.config
    b, t = idx.shape
    h, hkv, d, eps = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.norm_eps
    factor = cfg.rope_scaling["factor"] if cfg.rope_scaling else 1.0
    full_tables = rope_tables(cfg.rope_theta, d, t, factor)
    local_tables = full_tables if cfg.rope_local_theta is None else rope_tables(cfg.rope_local_theta, d, t)
    x = model.wte.weight[idx]
    if cfg.embed_scale is not None:
        x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
    for i, block in enumerate(model.blocks):
        sliding = cfg.sliding_window is not None and (cfg.layer_types is None or cfg.layer_types[i] == SLIDE)
        cos, sin = local_tables if sliding else full_tables
        seen = torch.ones(t, t, dtype=torch.bool).tril()
        if sliding:
            seen = seen.triu(-(cfg.sliding_window - 1))
        a = block.attn
        q, k, v = F.linear(rms(x, block.norm1.weight, eps), a.qkv.weight).split([h * d, hkv * d, hkv * d], -1)
        q, k, v = (y.reshape(b, t, -1, d).transpose(1, 2) for y in (q, k, v))
        if cfg.qk_norm:
            q, k = rms(q, a.q_norm.weight, eps), rms(k, a.k_norm.weight, eps)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
        scale = cfg.attn_scale if cfg.attn_scale is not None else d ** -0.5
        scores = q @ k.transpose(-1, -2) * scale
        if cfg.attn_softcap is not None:  # Gemma 2's: before the mask
            scores = cfg.attn_softcap * torch.tanh(scores / cfg.attn_softcap)
        weights = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        attn_out = F.linear((weights @ v).transpose(1, 2).reshape(b, t, h * d), a.proj.weight)
        if cfg.post_norms:
            attn_out = rms(attn_out, block.post_attn_norm.weight, eps)
        x = x + attn_out
        gate, up = F.linear(rms(x, block.norm2.weight, eps), block.mlp.gate_up.weight).chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if cfg.mlp == "geglu" else F.silu(gate)
        mlp_out = F.linear(act * up, block.mlp.proj.weight)
        if cfg.post_norms:
            mlp_out = rms(mlp_out, block.post_mlp_norm.weight, eps)
        x = x + mlp_out
    logits = F.linear(rms(x, model.norm_f.weight, eps), model.lm_head.weight)[..., :VOCAB]
    if cfg.logit_softcap is not None:
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
    return logits


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_each_feature_matches_a_plain_forward(feature):
    model = model_of(config(**FEATURES[feature], backend="torch"))
    idx = torch.randint(0, VOCAB, (2, 12))
    logits, _ = model(idx)
    torch.testing.assert_close(logits, reference_logits(model, idx), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("feature", sorted(set(FEATURES) - {"gemma3"}))
def test_each_feature_changes_the_logits(feature):
    """The plain forward above could pass with a feature that both ignored: each one changes the model."""
    featured = model_of(config(**FEATURES[feature], backend="torch"))
    plain = GPT(config(backend="torch"))
    plain.load_state_dict(featured.state_dict(), strict=False)  # the post norms are the featured model's own
    idx = torch.randint(0, VOCAB, (2, 12))
    assert not torch.allclose(featured(idx)[0], plain(idx)[0], atol=1e-4)


@pytest.mark.parametrize("caps", [dict(attn_softcap=0.5), dict(logit_softcap=0.5),
                                  dict(MIXED_LAYERS, attn_softcap=0.5, logit_softcap=2.0, doc_ids=True)])
def test_soft_caps_match_a_plain_forward_and_change_the_logits(caps):
    """Gemma 2's caps on random weights sharpened so that the scores and logits pass them; with doc_ids, packed
    rows of one document each must give the plain forward's logits (the capped path masks documents too)."""
    caps = dict(caps)
    packed = caps.pop("doc_ids", False)
    model = model_of(config(**caps, backend="torch"), sharpen=25.0)
    idx = torch.randint(0, VOCAB, (2, 12))
    doc_ids = torch.zeros(2, 12, dtype=torch.long) if packed else None
    logits = model(idx, doc_ids=doc_ids)[0]
    torch.testing.assert_close(logits, reference_logits(model, idx), rtol=1e-4, atol=1e-4)
    uncapped = GPT(config(**{k: v for k, v in caps.items() if not k.endswith("softcap")}, backend="torch"))
    uncapped.load_state_dict(model.state_dict())
    assert not torch.allclose(uncapped(idx)[0], logits, atol=1e-3)


def test_the_local_rope_base_turns_only_the_sliding_layers():
    model = GPT(config(**MIXED_LAYERS))
    assert model.rotary_local.theta == 1e4 and model.rotary.theta == 1e6
    assert [block.sliding for block in model.blocks] == [True, False, True]
    assert [block.attn.window for block in model.blocks] == [4, None, 4]
    # the local tables take no scaling: Gemma 3's linear factor is its global layers'
    scaled = GPT(config(**MIXED_LAYERS, rope_scaling=LINEAR_8))
    assert scaled.rotary_local.scaling is None
    torch.testing.assert_close(scaled.rotary_local.cos, model.rotary_local.cos)


def test_linear_rope_scaling_divides_the_positions():
    """Position p under factor f turns as position p / f does unscaled: every 4th row of the scaled tables is
    a row of the plain ones."""
    plain = RotaryCache(16, 10, theta=500.0)
    scaled = RotaryCache(16, 40, theta=500.0, scaling={"rope_type": "linear", "factor": 4})
    torch.testing.assert_close(scaled.cos[::4], plain.cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(scaled.sin[::4], plain.sin, rtol=0, atol=1e-6)
    assert not torch.allclose(scaled.cos[:10], plain.cos)


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "linear"}, "missing \\['factor'\\]"),
    ({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0}, "unknown \\['low_freq_factor'\\]"),
    ({"rope_type": "linear", "factor": 0.0}, "factor"),
    ({"rope_type": "linear", "factor": math.inf}, "factor"),
    ({"rope_type": "linear", "factor": "8"}, "factor"),
    ({"rope_type": "linear", "factor": True}, "factor"),
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type"),
])
def test_a_bad_linear_scaling_is_refused(scaling, message):
    with pytest.raises(ValueError, match=message):
        check_rope_scaling(scaling, 16)


def test_embed_scale_is_rounded_to_the_embeddings_dtype_first():
    """transformers' Gemma multiplies bf16 embeddings by sqrt(hidden_size) rounded to bf16 (55.5 for 3072's
    55.43): the model's first block must see that, not the embeddings times the exact scale."""
    scale = math.sqrt(3072)
    model = GPT(config(embed_scale=scale, backend="torch")).to(torch.bfloat16).eval()
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    idx = torch.randint(0, VOCAB, (2, 12))
    model(idx)
    table = model.wte.weight[idx]
    expected = table * torch.tensor(scale, dtype=torch.bfloat16)
    assert seen["x"].dtype == torch.bfloat16
    assert torch.equal(seen["x"], expected)
    assert not torch.equal(expected, (table.float() * scale).bfloat16())  # the rounding is seen to matter


def test_the_triton_backend_agrees_with_torch_on_a_gemma3_shaped_model(monkeypatch):
    kernels = [op for op in ("rms_norm", "attention", "rope", "geglu") if _backend.triton_has(op)]
    if not kernels or not _backend.can_run("triton", kernels[0], torch.device("cpu")):
        pytest.skip("no Triton kernels that run here")
    # the GeGLU MLPs run the kernels, forward and backward, once per layer each
    geglu_kernels = _backend.kernels("geglu", "triton")
    launches = []
    for name in ("forward", "backward"):
        kernel = getattr(geglu_kernels, name)
        monkeypatch.setattr(geglu_kernels, name, lambda *a, kernel=kernel, name=name: (launches.append(name), kernel(*a)))
    # fp32 (the interpreter's bf16 dot is wrong); heads of 32, one of the Triton attention sizes
    shape = dict(FEATURES["gemma3"], n_layer=2, layer_types=[SLIDE, FULL], n_head=2, n_kv_head=1, block_size=16)
    reference = model_of(config(**shape, backend="torch"))
    model = GPT(config(**shape, backend="triton", fused_loss=False))
    assert_same_training_step(model, reference, batch=1, seq_len=10)
    assert sorted(launches) == ["backward"] * 2 + ["forward"] * 2, launches


# --- generation and training ---------------------------------------------------------------------------------


def greedy_by_hand(model: GPT, prompt: list[int], steps: int) -> list[int]:
    seq = list(prompt)
    for _ in range(steps):
        logits, _ = model(torch.tensor([seq[-model.config.block_size:]]))
        seq.append(int(logits[0, -1].argmax()))
    return seq


def test_cached_and_uncached_generation_of_a_mixed_model_follow_the_full_forward():
    """Per-layer windows (the cached path masks each layer's own), the local RoPE tables and attn_scale (SDPA's
    scale) in generation; left-padded prompts longer than the window."""
    model = model_of(config(**FEATURES["gemma3"], backend="torch"), sharpen=5.0).eval()
    prompts = [[5, 17, 3, 9, 250, 31, 7], [101, 2], [60, 61, 62, 63, 64]]
    cached = generate(model, prompts, max_new_tokens=10, temperature=0)
    assert cached == generate(model, prompts, max_new_tokens=10, temperature=0, use_cache=False)
    for prompt, row in zip(prompts, cached):
        assert row == greedy_by_hand(model, prompt, 10)
    # and the mix is seen: the same weights with every layer sliding generate something else
    all_sliding = GPT(config(**{**FEATURES["gemma3"], "layer_types": None}, backend="torch"))
    all_sliding.load_state_dict(model.state_dict())
    assert generate(all_sliding.eval(), prompts, max_new_tokens=10, temperature=0) != cached


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = config(**FEATURES["gemma3"], backend="torch")
    plain = model_of(cfg)
    checkpointed = GPT(config(**FEATURES["gemma3"], backend="torch", activation_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    idx, targets = torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (2, 12))
    losses = []
    for model in (plain, checkpointed):
        model.train()
        _, loss = model(idx, targets)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_flops_per_token_counts_each_layers_window():
    model = GPT(config(**MIXED_LAYERS))
    n, width, seq = model.num_parameters(non_embedding=True), 4 * 16, 32
    keys_seen = 4 * 5 // 2 + (seq - 4) * 4  # the window's (query, key) pairs
    share = keys_seen / (seq * (seq + 1) // 2)
    assert model.flops_per_token(seq) == pytest.approx(6 * n + 12 * width * seq * (2 * share + 1), rel=1e-12)


def test_post_norms_and_geglu_have_the_expected_modules():
    model = GPT(config(post_norms=True, mlp="geglu"))
    block = model.blocks[0]
    assert torch.equal(block.post_attn_norm.weight, torch.ones(64))  # init_weights: unit scales
    assert block.mlp.activation == "gelu_tanh" and block.mlp.gate_up.weight.shape == (2 * 192, 64)
    assert config(mlp="geglu").hidden_size == config(mlp="swiglu").hidden_size == 192
    plain = GPT(config())
    assert plain.blocks[0].post_attn_norm is None and plain.blocks[0].post_mlp_norm is None
    assert set(plain.state_dict()) < set(model.state_dict())  # the same names, and the post norms


# --- config ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, error, message", [
    (dict(layer_types=(SLIDE, FULL, SLIDE), sliding_window=4), TypeError, "layer_types"),
    (dict(layer_types=[SLIDE, 1, SLIDE], sliding_window=4), TypeError, "layer_types"),
    (dict(layer_types=SLIDE, sliding_window=4), TypeError, "layer_types"),
    (dict(layer_types=[SLIDE, FULL], sliding_window=4), ValueError, "layer_types"),
    (dict(layer_types=[SLIDE, "global", SLIDE], sliding_window=4), ValueError, "layer_types\\[1\\]"),
    (dict(layer_types=[SLIDE, FULL, FULL]), ValueError, "sliding_window"),
    (dict(rope_local_theta=1e4, sliding_window=4, pos="learned", norm="layernorm"), ValueError, "rope_local_theta"),
    (dict(rope_local_theta=0.0, sliding_window=4), ValueError, "rope_local_theta"),
    (dict(rope_local_theta=math.inf, sliding_window=4), ValueError, "rope_local_theta"),
    (dict(rope_local_theta=1e4), ValueError, "rope_local_theta"),
    (dict(rope_local_theta="1e4", sliding_window=4), TypeError, "rope_local_theta"),
    (dict(post_norms=1), TypeError, "post_norms"),
    (dict(mlp="gegelu"), ValueError, "mlp"),
    (dict(embed_scale=0.0), ValueError, "embed_scale"),
    (dict(embed_scale=-8.0), ValueError, "embed_scale"),
    (dict(embed_scale=math.nan), ValueError, "embed_scale"),
    (dict(embed_scale=True), TypeError, "embed_scale"),
    (dict(attn_scale=0.0), ValueError, "attn_scale"),
    (dict(attn_scale=math.inf), ValueError, "attn_scale"),
    (dict(attn_scale="0.1"), TypeError, "attn_scale"),
    (dict(attn_softcap=0.0), ValueError, "attn_softcap"),
    (dict(attn_softcap=math.inf), ValueError, "attn_softcap"),
    (dict(attn_softcap=math.nan), ValueError, "attn_softcap"),
    (dict(attn_softcap="50"), TypeError, "attn_softcap"),
    (dict(logit_softcap=-30.0), ValueError, "logit_softcap"),
    (dict(logit_softcap=True), TypeError, "logit_softcap"),
])
def test_a_bad_value_is_refused_naming_its_field(change, error, message):
    with pytest.raises(error, match=message):
        config(**change)


def test_layer_window_and_a_bad_index():
    cfg = config(**MIXED_LAYERS)
    assert [cfg.layer_window(i) for i in range(3)] == [4, None, 4]
    assert [config(sliding_window=4).layer_window(i) for i in range(3)] == [4, 4, 4]
    assert [config().layer_window(i) for i in range(3)] == [None, None, None]
    for bad in (3, -1, 1.0, True):
        with pytest.raises(ValueError, match="layer index"):
            cfg.layer_window(bad)


def test_attention_refuses_a_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        CausalSelfAttention(64, 4, 2, scale=0.0)
    with pytest.raises(TypeError, match="scale"):
        CausalSelfAttention(64, 4, 2, scale="0.1")
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        CausalSelfAttention(64, 4, 2, softcap=0.0)
    with pytest.raises(TypeError, match="softcap"):
        CausalSelfAttention(64, 4, 2, softcap="50")


def test_layer_types_that_say_what_none_says_become_none():
    assert config(sliding_window=4, layer_types=[SLIDE] * 3).layer_types is None
    assert config(layer_types=[FULL] * 3).layer_types is None
    assert config(sliding_window=4, layer_types=[SLIDE] * 3) == config(sliding_window=4)
    given = [SLIDE, FULL, SLIDE]
    cfg = config(sliding_window=4, layer_types=given)
    given[1] = SLIDE  # the config keeps its own copy
    assert cfg.layer_types == [SLIDE, FULL, SLIDE]


def test_the_new_fields_round_trip_and_an_older_config_keeps_its_identity():
    cfg = config(**FEATURES["gemma3"], attn_softcap=50.0, logit_softcap=30.0)
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    new_fields = ("layer_types", "rope_local_theta", "post_norms", "embed_scale", "attn_scale", "attn_softcap",
                  "logit_softcap")
    for name in new_fields:
        assert name in identity_dict(cfg.to_dict())  # not the default: another model
    now = config().to_dict()
    older = {k: v for k, v in now.items() if k not in new_fields}
    assert GPTConfig.from_dict(older) == config()
    assert identity_dict(now) == identity_dict(older)


# --- exports that cannot express them -------------------------------------------------------------------------


GEMMA_ONLY = {
    "layer_types": MIXED_LAYERS,
    "rope_local_theta": dict(sliding_window=4, rope_local_theta=1e4),
    "post_norms": dict(post_norms=True),
    "mlp": dict(mlp="geglu"),
    "embed_scale": dict(embed_scale=8.0),
    "attn_scale": dict(attn_scale=0.3),
    "attn_softcap": dict(attn_softcap=50.0),
    "logit_softcap": dict(logit_softcap=30.0),
}


@pytest.mark.parametrize("feature", sorted(GEMMA_ONLY))
def test_llama_and_phi3_exports_refuse_gemma_features(feature):
    from llmkern.model.hf import hf_llama_config, hf_phi3_config

    cfg = config(**GEMMA_ONLY[feature])
    for export in (hf_llama_config, hf_phi3_config):
        with pytest.raises(ValueError, match=f"cannot express .*'{feature}'"):
            export(cfg, torch.float32)


@pytest.mark.parametrize("feature", ["post_norms", "embed_scale", "attn_scale", "attn_softcap", "logit_softcap"])
def test_gpt2_export_refuses_gemma_features(feature):
    from llmkern.model.hf import hf_gpt2_config

    cfg = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=64, **GEMMA_ONLY[feature])
    with pytest.raises(ValueError, match=f"GPT-2-shaped.*'{feature}'"):
        hf_gpt2_config(cfg)


def test_linear_scaling_exports_as_llamas_and_is_refused_by_phi3():
    from llmkern.model.hf import hf_llama_config, hf_phi3_config

    cfg = config(rope_scaling=LINEAR_8)
    assert hf_llama_config(cfg, torch.float32)["rope_scaling"] == LINEAR_8  # what transformers' Llama reads
    with pytest.raises(ValueError, match="Phi-3's model has no .* RoPE scaling other than longrope"):
        hf_phi3_config(cfg, torch.float32)
