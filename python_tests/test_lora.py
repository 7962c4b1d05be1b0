"""LoRA adapters: exact start, training touches only A/B, merge/unmerge, merge_lora, adapter state, bad input."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llmkern.finetune.lora import (
    LoRALinear,
    apply_lora,
    check_lora_targets,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
)
from llmkern.model import GPT, GPTConfig


def tiny_gpt(preset: str = "tiny", **overrides) -> GPT:
    cfg = dict(vocab_size=257, block_size=32, n_layer=2, n_head=2, n_embd=32, backend="torch")
    if preset == "tiny-llama":
        cfg["n_kv_head"] = 1
    cfg.update(overrides)
    return GPT(GPTConfig.from_preset(preset, **cfg))


def random_ids(b: int = 3, t: int = 16) -> torch.Tensor:
    return torch.randint(0, 257, (b, t))


def randomize_adapters(model: nn.Module) -> None:
    """Non-zero B everywhere, so the adapters change the output (B starts at zero)."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.05)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_wraps_every_block_projection_and_starts_equal_to_base(preset):
    model = tiny_gpt(preset).eval()
    ids = random_ids()
    before = model(ids)[0]
    wrapped = apply_lora(model, rank=4)
    mlp_in = "fc" if preset == "tiny" else "gate_up"
    expected = [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", f"mlp.{mlp_in}", "mlp.proj")]
    assert sorted(wrapped) == sorted(expected)
    assert not isinstance(model.lm_head, LoRALinear)
    torch.testing.assert_close(model(ids)[0], before, rtol=0, atol=0)  # B = 0: exactly the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.{k}" for w in wrapped for k in ("lora_A", "lora_B")}


def test_targets_select_layers_by_name_ending():
    model = tiny_gpt()
    wrapped = apply_lora(model, rank=2, targets="attn.qkv, mlp.fc")
    assert wrapped == ["blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.1.attn.qkv", "blocks.1.mlp.fc"]
    model = tiny_gpt()
    assert apply_lora(model, rank=2, targets=["proj"]) == [
        "blocks.0.attn.proj", "blocks.0.mlp.proj", "blocks.1.attn.proj", "blocks.1.mlp.proj"]


def test_training_changes_only_the_adapters():
    model = tiny_gpt()
    apply_lora(model, rank=4, alpha=8.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(4, 17)
    losses = []
    for _ in range(5):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if k.endswith((".lora_A", ".lora_B"))}
    assert changed == adapters  # every A and B moved (B's gradient is non-zero from the first step), nothing else


def test_merge_unmerge_round_trip_and_same_output():
    layer = LoRALinear(nn.Linear(37, 23), rank=5, alpha=10.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    base_weight = layer.weight.detach().clone()
    x = torch.randn(4, 7, 37)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.weight, base_weight + layer.lora_B @ layer.lora_A * 2.0)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-6)
    layer.merge()  # a second merge is a no-op
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, base_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-6)


def test_merge_lora_gives_a_plain_gpt_with_the_same_output():
    model = tiny_gpt("tiny-llama").eval()
    apply_lora(model, rank=3, alpha=6.0)
    randomize_adapters(model)
    ids = random_ids()
    lora_logits = model(ids)[0]
    merge_lora(model)
    assert not lora_layers(model)
    torch.testing.assert_close(model(ids)[0], lora_logits, rtol=1e-4, atol=1e-5)
    plain = GPT(model.config).eval()
    plain.load_state_dict(model.state_dict())  # strict: the keys of a plain GPT
    torch.testing.assert_close(plain(ids)[0], lora_logits, rtol=1e-4, atol=1e-5)


def test_lora_state_dict_round_trip():
    base = tiny_gpt().eval()
    trained = copy.deepcopy(base)
    apply_lora(trained, rank=4, targets="qkv,fc")
    randomize_adapters(trained)
    state = lora_state_dict(trained)
    assert set(state) == {f"blocks.{i}.{m}.{k}" for i in range(2) for m in ("attn.qkv", "mlp.fc")
                          for k in ("lora_A", "lora_B")}
    fresh = copy.deepcopy(base)
    apply_lora(fresh, rank=4, targets="qkv,fc")
    ids = random_ids()
    assert not torch.allclose(fresh(ids)[0], trained(ids)[0])
    load_lora_state_dict(fresh, state)
    torch.testing.assert_close(fresh(ids)[0], trained(ids)[0], rtol=0, atol=0)


def test_load_lora_state_dict_errors():
    model = tiny_gpt()
    apply_lora(model, rank=4, targets="qkv")
    state = lora_state_dict(model)
    missing = dict(state)
    del missing["blocks.0.attn.qkv.lora_A"]
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.attn.qkv.lora_A'\]"):
        load_lora_state_dict(model, missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.0.mlp.fc.lora_A'\]"):
        load_lora_state_dict(model, {**state, "blocks.0.mlp.fc.lora_A": torch.zeros(4, 32)})
    other_rank = tiny_gpt()
    apply_lora(other_rank, rank=2, targets="qkv")
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(model, lora_state_dict(other_rank))
    with pytest.raises(ValueError, match="no LoRA layers"):
        load_lora_state_dict(tiny_gpt(), state)


def test_dropout_only_in_training():
    layer = LoRALinear(nn.Linear(16, 8), rank=2, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(64, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


@pytest.mark.parametrize("kwargs, name", [
    ({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"alpha": 0.0}, "alpha"), ({"alpha": -1.0}, "alpha"),
    ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
])
def test_bad_arguments(kwargs, name):
    args = {"rank": 4, "alpha": 16.0, "dropout": 0.0, **kwargs}
    with pytest.raises(ValueError, match=name):
        apply_lora(tiny_gpt(), **args)
    with pytest.raises(ValueError, match=name):
        LoRALinear(nn.Linear(4, 4), **args)


def test_bad_targets_and_double_wrap():
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"match no linear layer.*blocks\.0\.attn\.qkv"):
        apply_lora(model, rank=2, targets=["qkv", "q_proj"])
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(model, rank=2, targets="lm_head")
    for bad in (5, b"qkv"):  # was "'int' object is not iterable", or bytes read as a list of ints
        with pytest.raises(TypeError, match="targets must be"):
            apply_lora(model, rank=2, targets=bad)
    assert not lora_layers(model)  # a refused call changes nothing
    assert all(p.requires_grad for p in model.parameters())
    apply_lora(model, rank=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=2)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1), rank=1)


def test_targets_naming_nothing_and_an_infinite_alpha_are_refused():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="names no module"):  # was read as "" (every projection)
        apply_lora(model, rank=2, targets=",")
    with pytest.raises(ValueError, match="alpha"):  # an infinite scale: NaN outputs once B moves
        apply_lora(model, rank=2, alpha=float("inf"))
    assert not lora_layers(model)
    assert apply_lora(model, rank=2, targets=" ") == apply_lora(tiny_gpt(), rank=2)  # blank: the default


def test_a_rank_above_a_layers_smaller_side_is_refused_before_anything_changes():
    # A (r, in) and B (out, r) with r > min(in, out) is no low-rank update: was taken silently, with more
    # adapter parameters and a smaller scale than the full-rank r = min(in, out).
    with pytest.raises(ValueError, match=r"rank 9 .*'base' \(16 -> 8\).*= 8"):
        LoRALinear(nn.Linear(16, 8), rank=9)
    assert LoRALinear(nn.Linear(16, 8), rank=8).lora_A.shape == (8, 16)
    model = tiny_gpt()  # n_embd 32: every projection has a side of 32
    with pytest.raises(ValueError, match=r"rank 33 .*'blocks\.0\.attn\.qkv' \(32 -> 96\)"):
        apply_lora(model, rank=33)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"rank 40 .*'blocks\.0\.mlp\.proj' \(128 -> 32\)"):  # a recipe's early check
        check_lora_targets(model, SimpleNamespace(lora_rank=40, lora_targets="mlp.proj"))
    assert len(apply_lora(model, rank=32)) == 8


def test_merged_state_loads_as_merged():
    """A merged layer's weight holds the update: loaded into an unmerged model it was counted twice."""
    trained = tiny_gpt().eval()
    apply_lora(trained, rank=4, targets="qkv")
    randomize_adapters(trained)
    ids = random_ids()
    expected = trained(ids)[0]
    layer = trained.blocks[0].attn.qkv
    layer.merge()
    merged_state = {k: v.clone() for k, v in trained.state_dict().items()}
    fresh = tiny_gpt().eval()
    apply_lora(fresh, rank=4, targets="qkv")
    fresh.load_state_dict(merged_state)  # strict: the flag is a key it takes
    torch.testing.assert_close(fresh(ids)[0], trained(ids)[0], rtol=0, atol=0)
    torch.testing.assert_close(fresh(ids)[0], expected, rtol=1e-4, atol=1e-5)
    assert fresh.blocks[0].attn.qkv.merged and not fresh.blocks[1].attn.qkv.merged
    assert "blocks.0.attn.qkv.merged" in merged_state and "blocks.1.attn.qkv.merged" not in merged_state
    # And the other way: an unmerged state into a merged model takes the base weight as it is.
    layer.unmerge()
    fresh.load_state_dict(trained.state_dict())
    assert not fresh.blocks[0].attn.qkv.merged
    torch.testing.assert_close(fresh(ids)[0], trained(ids)[0], rtol=0, atol=0)


def test_a_biased_qkv_alone_is_wrapped_kept_frozen_and_merged():
    """Qwen2's shape (GPTConfig.qkv_bias): a bias on qkv and on no other layer. The wrapper keeps it, frozen,
    and merge_lora gives back a plain model whose state loads into GPT(config)."""
    model = tiny_gpt("tiny-llama", qkv_bias=True).eval()
    with torch.no_grad():  # a non-zero bias, so that one dropped or doubled shows in the logits
        for block in model.blocks:
            block.attn.qkv.bias.normal_(0, 0.5)
    bias = model.blocks[0].attn.qkv.bias.detach().clone()
    ids = random_ids()
    before = model(ids)[0]
    wrapped = apply_lora(model, rank=4)
    torch.testing.assert_close(model(ids)[0], before, rtol=0, atol=0)
    layer = model.blocks[0].attn.qkv
    assert layer.bias is not None and not layer.bias.requires_grad and model.blocks[0].attn.proj.bias is None
    randomize_adapters(model)
    model.train()
    model(ids, random_ids())[1].backward()
    assert layer.bias.grad is None and layer.lora_B.grad is not None
    model.eval()
    with torch.no_grad():
        expected = model(ids)[0]
    assert not torch.allclose(expected, before, atol=1e-4)
    merge_lora(model)
    assert not lora_layers(model) and len(wrapped) == 8
    assert torch.equal(model.blocks[0].attn.qkv.bias, bias)
    plain = GPT(model.config).eval()
    plain.load_state_dict(model.state_dict())  # strict: the same keys, qkv.bias among them
    torch.testing.assert_close(plain(ids)[0], expected, rtol=1e-4, atol=1e-5)


def test_a_moe_models_default_targets_leave_the_router_and_the_experts_frozen():
    # layer 0 MoE (a router nn.Linear and 3-D expert stacks), layer 1 a dense SwiGLU MLP
    model = tiny_gpt("tiny-moe", n_kv_head=1, moe_layers=[0])
    wrapped = apply_lora(model, rank=2)
    assert sorted(wrapped) == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.1.attn.qkv",
                               "blocks.1.mlp.gate_up", "blocks.1.mlp.proj"]
    moe = model.blocks[0].mlp
    assert not any(p.requires_grad for p in (moe.router.weight, moe.gate_up, moe.proj))
    # the router is still a target by name
    routed = tiny_gpt("tiny-moe", n_kv_head=1)
    assert sorted(apply_lora(routed, rank=2, targets="router")) == ["blocks.0.mlp.router", "blocks.1.mlp.router"]


def _lora_a(device: str, dtype: torch.dtype, seed: int = 7) -> torch.Tensor:
    base = nn.Linear(24, 16, device=device, dtype=dtype)
    torch.manual_seed(seed)
    return LoRALinear(base, rank=4).lora_A.detach()


def test_lora_a_is_drawn_in_fp32_on_the_cpu_whatever_the_base(monkeypatch):
    """A is drawn in fp32 on the CPU, then copied: a bf16 base's A is the fp32 base's rounded, and a seed gives on a
    GPU (and on an FSDP run's rank-0 CPU copy) the adapters it gives on the CPU; a meta base's is drawn nowhere."""
    drawn_on = []
    kaiming = nn.init.kaiming_uniform_

    def recording(tensor, *args, **kwargs):
        drawn_on.append((tensor.device.type, tensor.dtype))
        return kaiming(tensor, *args, **kwargs)

    base = nn.Linear(24, 16, dtype=torch.bfloat16)
    monkeypatch.setattr(nn.init, "kaiming_uniform_", recording)
    LoRALinear(base, rank=4)
    assert drawn_on == [("cpu", torch.float32)]
    monkeypatch.undo()
    full = _lora_a("cpu", torch.float32)
    assert torch.equal(_lora_a("cpu", torch.bfloat16), full.to(torch.bfloat16))
    assert not torch.equal(_lora_a("cpu", torch.float32, seed=8), full)
    assert _lora_a("meta", torch.float32).device.type == "meta"


@pytest.mark.cuda
def test_lora_a_on_a_gpu_is_the_cpu_s():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    assert torch.equal(_lora_a("cuda", torch.float32).cpu(), _lora_a("cpu", torch.float32))
