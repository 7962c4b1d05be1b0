"""Hugging Face GPT-2 weights: a synthetic state dict with HF's names and Conv1D layouts (no
download) goes in, gives the logits of an HF-style forward written here, and comes back out."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmkern.model import GPT, GPTConfig
from llmkern.model.hf import config_from_hf_gpt2, from_hf_gpt2, load_hf_gpt2, to_hf_gpt2

VOCAB, CTX, EMBD, LAYERS, HEADS = 100, 24, 64, 2, 4


def hf_state_dict(prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """Random weights under GPT2LMHeadModel's names; Conv1D weights are (in, out)."""
    c = EMBD
    sd = {"wte.weight": torch.randn(VOCAB, c) * 0.1, "wpe.weight": torch.randn(CTX, c) * 0.1}
    for i in range(LAYERS):
        shapes = {
            "ln_1.weight": (c,), "ln_1.bias": (c,), "attn.c_attn.weight": (c, 3 * c), "attn.c_attn.bias": (3 * c,),
            "attn.c_proj.weight": (c, c), "attn.c_proj.bias": (c,), "ln_2.weight": (c,), "ln_2.bias": (c,),
            "mlp.c_fc.weight": (c, 4 * c), "mlp.c_fc.bias": (4 * c,), "mlp.c_proj.weight": (4 * c, c),
            "mlp.c_proj.bias": (c,),
        }
        for name, shape in shapes.items():
            base = 1.0 if name.startswith("ln") and name.endswith("weight") else 0.0
            sd[f"h.{i}.{name}"] = base + torch.randn(shape) * 0.2
        sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, CTX, CTX).tril()  # the mask buffer old checkpoints carry
    sd["ln_f.weight"], sd["ln_f.bias"] = 1 + 0.1 * torch.randn(c), 0.1 * torch.randn(c)
    sd = {prefix + k: v for k, v in sd.items()}
    sd["lm_head.weight"] = sd[prefix + "wte.weight"]
    return sd


def hf_style_logits(sd: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """GPT-2's forward as HF writes it: Conv1D is x @ W + b; c_attn splits into q, k, v."""
    w = {k.removeprefix("transformer."): v for k, v in sd.items()}
    b, t = idx.shape
    d = EMBD // HEADS
    x = w["wte.weight"][idx] + w["wpe.weight"][:t]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(LAYERS):
        p = lambda n: w[f"h.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (EMBD,), p("ln_1.weight"), p("ln_1.bias"), 1e-5)
        q, k, v = (h @ p("attn.c_attn.weight") + p("attn.c_attn.bias")).split(EMBD, dim=-1)
        q, k, v = (z.view(b, t, HEADS, d).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, EMBD)
        x = x + y @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        h = F.layer_norm(x, (EMBD,), p("ln_2.weight"), p("ln_2.bias"), 1e-5)
        h = F.gelu(h @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias"), approximate="tanh")
        x = x + h @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    x = F.layer_norm(x, (EMBD,), w["ln_f.weight"], w["ln_f.bias"], 1e-5)
    return x @ w["wte.weight"].t()


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_import_gives_hf_logits(prefix):
    sd = hf_state_dict(prefix)
    model = from_hf_gpt2(sd, n_head=HEADS).eval()
    cfg = model.config
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd, cfg.n_head) == (VOCAB, CTX, LAYERS, EMBD, HEADS)
    assert cfg.padded_vocab_size == 128 and torch.all(model.wte.weight[VOCAB:] == 0)
    idx = torch.randint(0, VOCAB, (2, 19))
    torch.testing.assert_close(model(idx)[0], hf_style_logits(sd, idx), rtol=1e-4, atol=1e-4)


def test_export_round_trips():
    sd = hf_state_dict()
    out = to_hf_gpt2(from_hf_gpt2(sd, n_head=HEADS))
    expected = {k: v for k, v in sd.items() if not k.endswith("attn.bias") or "c_attn" in k}
    assert sorted(out) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(out[name], tensor), name


def test_default_heads_are_64_wide():
    assert config_from_hf_gpt2(hf_state_dict()).n_head == EMBD // 64


def test_import_errors():
    sd = hf_state_dict()
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing \['h.1.mlp.c_fc.bias'\]"):
        from_hf_gpt2(sd, n_head=HEADS)
    sd = hf_state_dict()
    sd["transformer.h.0.attn.c_proj.weight"] = torch.zeros(EMBD, EMBD + 1)
    with pytest.raises(ValueError, match="attn.c_proj.weight has shape"):
        from_hf_gpt2(sd, n_head=HEADS)
    with pytest.raises(ValueError, match="not a GPT-2 state dict"):
        from_hf_gpt2({"foo": torch.zeros(1)})
    llama = GPT(GPTConfig.from_preset("tiny-llama", vocab_size=VOCAB))
    with pytest.raises(ValueError, match="GPT-2-shaped model"):
        load_hf_gpt2(llama, hf_state_dict())


def test_an_untied_lm_head_is_refused_not_dropped():
    # The import ties the output layer to wte; an lm_head of its own would be lost, and the logits wrong.
    sd = hf_state_dict()
    sd["lm_head.weight"] = sd["lm_head.weight"] + 0.01
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        from_hf_gpt2(sd, n_head=HEADS)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()  # tied, stored twice: the same model
    assert from_hf_gpt2(sd, n_head=HEADS).config.tie_embeddings


def test_llmkern_weights_are_not_taken_for_gpt2(tmp_path):
    from safetensors.torch import save_file

    from llmkern.model.hf import load_hf_gpt2_file

    # llmkern's own model.safetensors shares GPT-2's wte/wpe names but has blocks.<i>.*, not h.<i>.*
    ours = GPT(GPTConfig(vocab_size=VOCAB, block_size=CTX, n_layer=1, n_head=2, n_embd=32, tie_embeddings=False))
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"not a GPT-2 state dict: no h\.<i>\.\* blocks.*run or checkpoint folder"):
        load_hf_gpt2_file(str(tmp_path / "model.safetensors"))
    sd = hf_state_dict()
    sd["transformer.wte.weight"] = torch.zeros(VOCAB * EMBD)
    with pytest.raises(ValueError, match=r"wte.weight must be 2-D"):
        from_hf_gpt2(sd)
