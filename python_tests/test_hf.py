"""Hugging Face GPT-2 weights: a synthetic state dict with HF's names and Conv1D layouts (no
download) goes in, gives the logits of an HF-style forward written here, and comes back out."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmkern.model import GPT, GPTConfig
from llmkern.model.hf import (config_from_hf_gpt2, from_hf_gpt2, hf_gpt2_config, load_hf_file, load_hf_gpt2,
                              load_hf_gpt2_file, to_hf_gpt2)

VOCAB, CTX, EMBD, LAYERS, HEADS = 100, 24, 64, 2, 4


def hf_state_dict(prefix: str = "transformer.", c: int = EMBD) -> dict[str, torch.Tensor]:
    """Random weights under GPT2LMHeadModel's names, n_embd = c; Conv1D weights are (in, out)."""
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


def hf_style_logits(sd: dict[str, torch.Tensor], idx: torch.Tensor, heads: int = HEADS, eps: float = 1e-5):
    """GPT-2's forward as HF writes it: Conv1D is x @ W + b; c_attn splits into q, k, v."""
    w = {k.removeprefix("transformer."): v for k, v in sd.items()}
    b, t = idx.shape
    c = w["wte.weight"].shape[1]
    d = c // heads
    x = w["wte.weight"][idx] + w["wpe.weight"][:t]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(LAYERS):
        p = lambda n: w[f"h.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (c,), p("ln_1.weight"), p("ln_1.bias"), eps)
        q, k, v = (h @ p("attn.c_attn.weight") + p("attn.c_attn.bias")).split(c, dim=-1)
        q, k, v = (z.view(b, t, heads, d).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + y @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        h = F.layer_norm(x, (c,), p("ln_2.weight"), p("ln_2.bias"), eps)
        h = F.gelu(h @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias"), approximate="tanh")
        x = x + h @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    x = F.layer_norm(x, (c,), w["ln_f.weight"], w["ln_f.bias"], eps)
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


def gpt2_config_json(c: int = EMBD, heads: int = HEADS, **changes) -> dict:
    """The config.json HF's save_pretrained writes beside hf_state_dict(c=c)'s weights (its main fields)."""
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": VOCAB, "n_positions": CTX,
              "n_ctx": CTX, "n_embd": c, "n_layer": LAYERS, "n_head": heads, "n_inner": None,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
              "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    return {**config, **changes}


# n_embd 32 made 0 heads of 64 (a GPTConfig error about n_head=0); 128 with 4 heads made 2, which
# loaded and gave wrong logits, silently; 96 with 3 heads made 1.
@pytest.mark.parametrize("c, heads", [(32, 2), (128, 4), (96, 3), (64, 1)])
def test_the_head_count_comes_from_the_config_not_a_guess(c, heads):
    sd = hf_state_dict(c=c)
    idx = torch.randint(0, VOCAB, (2, 11))
    expected = hf_style_logits(sd, idx, heads=heads)
    for model in (from_hf_gpt2(sd, hf_config=gpt2_config_json(c, heads)), from_hf_gpt2(sd, n_head=heads),
                  from_hf_gpt2(sd, hf_config={"num_attention_heads": heads})):  # GPT2Config's alias
        assert model.config.n_head == heads
        torch.testing.assert_close(model.eval()(idx)[0], expected, rtol=1e-4, atol=1e-4)


def test_an_unknown_or_impossible_head_count_is_refused():
    sd = hf_state_dict()
    with pytest.raises(ValueError, match="n_head is unknown: the weights of GPT-2 do not tell its head count"):
        config_from_hf_gpt2(sd)
    config = gpt2_config_json()
    del config["n_head"]
    with pytest.raises(ValueError, match="config.json has no 'n_head'"):
        config_from_hf_gpt2(sd, hf_config=config)
    with pytest.raises(ValueError, match="config.json's n_head must be a positive int that divides n_embd=64, got 3"):
        config_from_hf_gpt2(sd, hf_config=gpt2_config_json(heads=3))
    for bad in (0, 5, 128, 2.0, True, "4"):
        with pytest.raises(ValueError, match=f"n_head must be a positive int that divides n_embd=64, got {bad!r}"):
            config_from_hf_gpt2(sd, n_head=bad)
    with pytest.raises(ValueError, match="n_head=2 but config.json has n_head=4"):
        config_from_hf_gpt2(sd, n_head=2, hf_config=gpt2_config_json())
    with pytest.raises(TypeError, match="hf_config must be a dict"):
        config_from_hf_gpt2(sd, hf_config=json.dumps(gpt2_config_json()))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type='llama': only GPT-2"),
    ({"n_embd": 768}, "n_embd=768 but the weights have 64"),
    ({"n_layer": 12}, "n_layer=12 but the weights have 2"),
    ({"vocab_size": 50257}, "vocab_size=50257 but the weights have 100"),
    ({"n_positions": 1024}, "n_positions=1024 but the weights have 24"),
    ({"activation_function": "gelu"}, "activation_function='gelu'"),  # the exact GELU, not tanh's
    ({"activation_function": "relu"}, "activation_function='relu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ({"scale_attn_weights": False}, "scale_attn_weights=False"),
    ({"layer_norm_epsilon": 0}, "layer_norm_epsilon must be a number > 0"),
])
def test_a_config_the_model_would_misread_is_refused(change, message):
    # Each of these was ignored: a config.json of another model, or of a GPT-2 variant computing other
    # logits, loaded as if it were plain GPT-2's.
    with pytest.raises(ValueError, match=message):
        from_hf_gpt2(hf_state_dict(), hf_config=gpt2_config_json(**change))


def test_the_config_layer_norm_epsilon_is_read():
    sd = hf_state_dict()
    model = from_hf_gpt2(sd, hf_config=gpt2_config_json(layer_norm_epsilon=0.5)).eval()  # big: it shows
    assert model.config.norm_eps == 0.5
    idx = torch.randint(0, VOCAB, (1, 9))
    torch.testing.assert_close(model(idx)[0], hf_style_logits(sd, idx, eps=0.5), rtol=1e-4, atol=1e-4)


def test_a_model_file_is_read_with_the_config_json_beside_it(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in hf_state_dict(c=128).items() if k != "lm_head.weight"}  # HF stores it once
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"n_head is unknown: .*model.safetensors' has no config.json beside it"):
        load_hf_gpt2_file(str(path))
    assert load_hf_gpt2_file(str(path), n_head=4).config.n_head == 4
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config_json(128, 4)))
    model = load_hf_gpt2_file(str(path)).eval()
    assert model.config.n_head == 4  # the old guess: 128 // 64 = 2
    idx = torch.randint(0, VOCAB, (2, 7))
    torch.testing.assert_close(model(idx)[0], hf_style_logits(sd, idx, heads=4), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="n_head=8 but config.json has n_head=4"):
        load_hf_gpt2_file(str(path), n_head=8)
    # What export writes beside to_hf_gpt2's weights reads back as the same model.
    (tmp_path / "config.json").write_text(json.dumps(hf_gpt2_config(model.config)))
    assert load_hf_gpt2_file(str(path)).config == model.config
    for text, message in (("{not json", "not a readable JSON file"), ("[4]", "must hold a JSON object, got list")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_hf_gpt2_file(str(path))


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


@pytest.mark.parametrize("change", [dict(sliding_window=4), dict(qk_norm=True), dict(head_dim=2 * EMBD // HEADS)])
def test_a_model_gpt2s_config_cannot_say_is_not_exported_as_gpt2(change):
    # config.json of GPT-2 has no key for these: exported, the model would come back without them, silently
    from llmkern.model.hf_gpt2 import hf_gpt2_config

    config = GPTConfig.from_preset("tiny", vocab_size=VOCAB, n_embd=EMBD, n_head=HEADS, **change)
    with pytest.raises(ValueError, match=f"GPT-2-shaped model.*{next(iter(change))}"):
        hf_gpt2_config(config)
    hf_gpt2_config(GPTConfig.from_preset("tiny", vocab_size=VOCAB, n_embd=EMBD, n_head=HEADS))  # the plain one goes


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

    # llmkern's own model.safetensors shares GPT-2's wte/wpe names but has blocks.<i>.*, not h.<i>.*
    ours = GPT(GPTConfig(vocab_size=VOCAB, block_size=CTX, n_layer=1, n_head=2, n_embd=32, tie_embeddings=False))
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"not a GPT-2 state dict: no h\.<i>\.\* blocks.*run or checkpoint folder"):
        load_hf_gpt2_file(str(tmp_path / "model.safetensors"))
    sd = hf_state_dict()
    sd["transformer.wte.weight"] = torch.zeros(VOCAB * EMBD)
    with pytest.raises(ValueError, match=r"wte.weight must be 2-D"):
        from_hf_gpt2(sd)


def test_an_mlp_width_other_than_4x_round_trips(tmp_path):
    """GPT2Config's n_inner: the MLP width, which the tensors tell. The import assumed 4 * n_embd, so an
    exported model with mlp_hidden set (and config.json saying n_inner) could not be read back."""
    from safetensors.torch import save_file

    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=CTX, n_layer=LAYERS, n_head=2, n_embd=32, mlp_hidden=48))
    sd = {k: v for k, v in to_hf_gpt2(model).items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_gpt2_config(model.config)))
    back = load_hf_gpt2_file(str(tmp_path / "model.safetensors"))
    assert back.config.hidden_size == 48
    idx = torch.randint(0, VOCAB, (2, CTX))
    torch.testing.assert_close(back(idx)[0], model(idx)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="config.json has n_inner=64 but the weights have an MLP of 48"):
        from_hf_gpt2(sd, hf_config={**hf_gpt2_config(model.config), "n_inner": 64})


def test_a_sharded_checkpoint_is_read_whole(tmp_path):
    """save_pretrained shards a big model (model-0000i-of-0000n.safetensors and an index). One shard alone
    was read: it lacked layers, and the error said the config.json was another model's, or not GPT-2's."""
    from safetensors.torch import save_file

    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in hf_state_dict().items() if k != "lm_head.weight"}
    first = {k: v for k, v in sd.items() if k.startswith(("transformer.h.0.", "transformer.wte", "transformer.wpe"))}
    shards = {"model-00001-of-00002.safetensors": first,
              "model-00002-of-00002.safetensors": {k: v for k, v in sd.items() if k not in first}}
    for name, part in shards.items():
        save_file(part, str(tmp_path / name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config_json()))
    idx = torch.randint(0, VOCAB, (2, 9))
    expected = hf_style_logits({k: v.float() for k, v in sd.items()}, idx)  # bf16 weights, read exactly
    for name in shards:
        model = load_hf_gpt2_file(str(tmp_path / name)).eval()
        torch.testing.assert_close(model(idx)[0], expected, rtol=1e-4, atol=1e-4)
    # the index names its model too: it was "not a readable safetensors file"
    by_index, model_type = load_hf_file(str(tmp_path / "model.safetensors.index.json"))
    assert model_type == "gpt2"
    torch.testing.assert_close(by_index.eval()(idx)[0], expected, rtol=1e-4, atol=1e-4)
    out = to_hf_gpt2(model)
    assert all(torch.equal(out[k].to(torch.bfloat16), v) for k, v in sd.items() if not k.endswith("attn.bias"))
    # A tensor the index names but no shard holds, a shard that is not there, a folder: each said clearly.
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {**weight_map, "x.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match=r"lists tensors that its shards lack: \['x.weight'\]"):
        load_hf_gpt2_file(str(tmp_path / "model-00001-of-00002.safetensors"))
    index.write_text(json.dumps({"weight_map": {**weight_map, "y": "model-3.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-3.safetensors', a shard that .* lists, does not exist"):
        load_hf_gpt2_file(str(tmp_path / "model-00001-of-00002.safetensors"))
    index.write_text("{}")
    with pytest.raises(ValueError, match="not a readable index of shards"):
        load_hf_gpt2_file(str(tmp_path / "model-00001-of-00002.safetensors"))
    with pytest.raises(ValueError, match="is a folder; give the model.safetensors file in it"):
        load_hf_gpt2_file(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist; the checkpoint there is sharded"):
        load_hf_gpt2_file(str(tmp_path / "model.safetensors"))


def test_a_key_mismatch_names_the_keys_and_counts_the_rest():
    sd = hf_state_dict()
    sd = {k.replace("transformer.h.", "transformer.layers."): v for k, v in sd.items()}
    sd["transformer.h.0.ln_1.weight"] = torch.ones(EMBD)  # one layer found, under the names GPT-2 uses
    with pytest.raises(ValueError, match=r"missing \['h.0.attn.c_attn.bias', .*\] and 6 more, "
                                         r"unexpected \['layers.0.attn.c_attn.bias', .*\] and 19 more"):
        from_hf_gpt2(sd, n_head=HEADS)
