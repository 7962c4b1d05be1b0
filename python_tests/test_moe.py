"""Mixture-of-experts MLPs (llmkern.nn.MoEMLP, GPTConfig.n_experts): the routing and the experts against a plain
per-token reference, the load-balancing loss against transformers' formula, training-mode-only aux loss, zero
gradients for idle experts, activation checkpointing, the KV cache, the Triton backend, the accounting, the config's
checks and a tiny MoE that trains."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmkern import _backend
from llmkern.model import GPT, GPTConfig
from llmkern.model.config import identity_dict
from llmkern.model.generate import generate
from llmkern.model.kv_cache import KVCache
from llmkern.nn import GatedMLP, MoEMLP, load_balancing_loss
from llmkern.nn import moe as moe_module

VOCAB = 97


def moe_config(**overrides) -> GPTConfig:
    """A small Llama-shaped MoE GPT, torch backend, the plain loss (so logits come back)."""
    values = dict(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, norm="rmsnorm",
                  pos="rope", mlp="swiglu", tie_embeddings=False, bias=False, n_experts=4, experts_per_token=2,
                  expert_hidden=24, backend="torch", fused_loss=False)
    values.update(overrides)
    return GPTConfig(**values)


def random_moe(n_embd=16, hidden=12, n_experts=5, k=2, norm_topk_prob=True, backend="torch", seed=0) -> MoEMLP:
    """A MoEMLP with fresh random weights large enough that the routing and the experts matter."""
    torch.manual_seed(seed)
    moe = MoEMLP(n_embd, hidden, n_experts, k, norm_topk_prob, backend=backend)
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 1.0)
        moe.gate_up.normal_(0.0, 0.3)
        moe.proj.normal_(0.0, 0.3)
    return moe


def reference_moe(moe: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token at a time: softmax over the experts, the top k, their weights (renormalized or
    not), the weighted sum of those experts' SwiGLU MLPs."""
    rows = []
    for token in x.reshape(-1, x.size(-1)):
        probs = torch.softmax(moe.router.weight @ token, dim=-1)
        weights, experts = probs.topk(moe.experts_per_token)
        if moe.norm_topk_prob:
            weights = weights / weights.sum()
        out = torch.zeros_like(token)
        for w, e in zip(weights, experts.tolist()):
            gate, up = (moe.gate_up[e] @ token).split(moe.hidden)
            out = out + w * (moe.proj[e] @ (F.silu(gate) * up))
        rows.append(out)
    return torch.stack(rows).view_as(x)


def reference_aux_loss(router_logits: list[torch.Tensor], k: int, attention_mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """transformers' load_balancing_loss_func in float64: the layers' router logits concatenated, then
    E * sum over (slot, expert) of the share of tokens whose slot went to that expert times its mean probability,
    both averages weighted by the attention_mask (B, T) (1 = a real token) repeated for every layer when given."""
    logits = torch.cat(router_logits, dim=0).double()  # (L * B * T, E)
    n_experts = logits.size(-1)
    probs = torch.softmax(logits, dim=-1)
    one_hot = F.one_hot(probs.topk(k, dim=-1).indices, n_experts).double()  # (L * B * T, k, E)
    if attention_mask is None:
        tokens_per_expert, prob_per_expert = one_hot.mean(dim=0), probs.mean(dim=0)
    else:
        layers = logits.size(0) // attention_mask.numel()
        mask = attention_mask.double().reshape(1, -1).expand(layers, -1).reshape(-1)  # (L * B * T,)
        slot_mask = mask[:, None, None].expand_as(one_hot)
        tokens_per_expert = (one_hot * slot_mask).sum(dim=0) / slot_mask.sum(dim=0)  # (k, E)
        prob_mask = mask[:, None].expand_as(probs)
        prob_per_expert = (probs * prob_mask).sum(dim=0) / prob_mask.sum(dim=0)  # (E,)
    return n_experts * (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum()


def right_padding_mask(lengths: list[int], t: int) -> torch.Tensor:
    """(B, T) bool: True at each row's first lengths[b] tokens."""
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


def capture_router_logits(model: GPT) -> list[torch.Tensor]:
    """A list that each MoE router's forward appends its logits to (in layer order)."""
    captured = []
    for module in model.modules():
        if isinstance(module, MoEMLP):
            module.router.register_forward_hook(lambda mod, args, out: captured.append(out.detach()))
    return captured


# --- the module against the reference ----------------------------------------------------------------


@pytest.mark.parametrize("experts_path", ["loop", "grouped"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_mlp_matches_the_per_token_reference(k, norm_topk_prob, experts_path, monkeypatch):
    monkeypatch.setenv(moe_module.EXPERTS_ENV, experts_path)
    moe = random_moe(k=k, norm_topk_prob=norm_topk_prob, seed=k)
    x = torch.randn(3, 7, 16, requires_grad=True)  # 21 tokens: an odd count, split unevenly over the experts
    out, stats = moe(x)
    expected = reference_moe(moe, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), [x, *moe.parameters()])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *moe.parameters()])
    # fp32 sums in another order: an absolute tolerance on the gradients' scale (the router's is 0 for k=1
    # renormalized, a weight of 1 whatever the logits: rounding noise of that scale)
    scale = max(e.abs().max().item() for e in expected_grads)
    for name, g, e in zip(["x", *dict(moe.named_parameters())], grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6 * scale, msg=name)
    # the routing per token: k distinct experts each, and probabilities that sum to 1
    assert stats.experts.shape == (21, k) and stats.probs.shape == (21, 5)
    assert all(len(set(row)) == k for row in stats.experts.tolist())
    torch.testing.assert_close(stats.probs.sum(dim=-1), torch.ones(21))


def test_each_expert_is_the_gated_mlp_of_its_slices():
    """gate_up[e] and proj[e] are a GatedMLP's gate_up.weight and proj.weight (the importer stacks HF's experts
    that way): with one expert chosen per token and its weight 1, the output is that expert's GatedMLP."""
    moe = random_moe(n_experts=3, k=1)
    x = torch.randn(5, 16)
    expert = torch.softmax(moe.router(x), dim=-1).argmax(dim=-1)
    mlp = GatedMLP(16, moe.hidden, backend="torch")
    for i in range(5):
        e = int(expert[i])
        mlp.gate_up.weight.data.copy_(moe.gate_up[e])
        mlp.proj.weight.data.copy_(moe.proj[e])
        torch.testing.assert_close(moe(x[i : i + 1])[0], mlp(x[i : i + 1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("experts_path", ["loop", "grouped"])
def test_an_expert_without_tokens_gets_a_zero_gradient_not_none(experts_path, monkeypatch):
    """DDP takes a parameter without a gradient for an unused one and fails: every expert must stay in the graph."""
    monkeypatch.setenv(moe_module.EXPERTS_ENV, experts_path)
    moe = random_moe(n_experts=4, k=2)
    with torch.no_grad():  # positive inputs: expert 3's logit is the lowest for every token, never in the top 2
        moe.router.weight.uniform_(0.5, 1.0)
        moe.router.weight[3] = -1.0
    x = torch.rand(9, 16) + 0.1
    out, stats = moe(x)
    assert not (stats.experts == 3).any()
    out.sum().backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None, name
    assert torch.count_nonzero(moe.gate_up.grad[3]) == 0 and torch.count_nonzero(moe.proj.grad[3]) == 0
    for used in stats.experts.unique().tolist():  # those the router picked (which, the random draw decides)
        assert torch.count_nonzero(moe.gate_up.grad[used]) > 0, used


# --- the experts by grouped GEMM ------------------------------------------------------------------------


def moe_outputs_and_grads(moe: MoEMLP, x: torch.Tensor, experts_path: str, monkeypatch) -> dict[str, torch.Tensor]:
    """The MoE's output on x and the gradients of a fixed random projection of it for x and every parameter
    (router.weight, gate_up, proj), by name, with the experts run by experts_path."""
    monkeypatch.setenv(moe_module.EXPERTS_ENV, experts_path)
    x = x.detach().requires_grad_()
    out = moe(x)[0]
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    names, params = zip(*moe.named_parameters())
    grads = torch.autograd.grad((out * probe).sum(), [x, *params])
    return {"output": out.detach(), **dict(zip(["x", *names], grads))}


@pytest.mark.parametrize("k,norm_topk_prob,n_experts,n_tokens", [
    (1, True, 8, 5),  # 5 tokens for 8 experts: at least 3 idle
    (2, True, 5, 21),
    (2, False, 7, 3),  # 6 assignments for 7 experts
    (3, False, 4, 17),
])
def test_grouped_experts_match_the_loop_in_fp32(k, norm_topk_prob, n_experts, n_tokens, monkeypatch):
    """The same matmuls on the same rows, grouped or one expert at a time: equal but for the order of the sums
    inside a matmul, which another kernel may change (the CPU's grouped_mm runs each group's mm, bit for bit the
    loop's here): rtol 1e-5 and an atol of 1e-6 times each tensor's scale."""
    moe = random_moe(n_embd=16, hidden=12, n_experts=n_experts, k=k, norm_topk_prob=norm_topk_prob, seed=k)
    assert moe_module._experts_path(torch.empty(1, 16), moe.hidden) == "grouped"  # auto picks it here
    x = torch.randn(n_tokens, 16)
    grouped = moe_outputs_and_grads(moe, x, "grouped", monkeypatch)
    looped = moe_outputs_and_grads(moe, x, "loop", monkeypatch)
    assert list(grouped) == ["output", "x", "gate_up", "proj", "router.weight"]
    for name, e in looped.items():
        torch.testing.assert_close(grouped[name], e, rtol=1e-5, atol=1e-6 * e.abs().max().item(), msg=name)
    idle = torch.ones(n_experts, dtype=torch.bool)
    idle[moe(x)[1].experts.unique()] = False  # some, by the pigeonhole principle, in the 1st and 3rd cases
    for name in ("gate_up", "proj"):
        assert torch.count_nonzero(grouped[name][idle]) == 0, name  # zero, where the experts had no token
        assert torch.count_nonzero(grouped[name][~idle]) > 0, name


@pytest.mark.parametrize("k", [1, 2])
def test_grouped_experts_in_bf16_are_within_twice_the_loops_error(k, monkeypatch):
    """bf16 against the float64 module (the loop: grouped_mm has no float64): the grouped path's error, output
    and every gradient, at most twice the loop's own plus a small atol."""
    moe = random_moe(n_embd=16, hidden=24, n_experts=6, k=k, seed=k)  # widths of 16 bytes' multiples in bf16
    x = torch.randn(19, 16)
    expected = moe_outputs_and_grads(moe.double(), x.double(), "loop", monkeypatch)
    bf16 = moe.bfloat16()
    grouped = moe_outputs_and_grads(bf16, x.bfloat16(), "grouped", monkeypatch)
    looped = moe_outputs_and_grads(bf16, x.bfloat16(), "loop", monkeypatch)
    for name, e in expected.items():
        grouped_error = (grouped[name].double() - e).abs().max().item()
        loop_error = (looped[name].double() - e).abs().max().item()
        assert grouped_error <= 2 * loop_error + 1e-3 * e.abs().max().item(), name


def test_grouped_experts_multiply_in_autocasts_dtype_as_the_loop_does(monkeypatch):
    """grouped_mm has no autocast kernel: the path casts its operands itself, so that under autocast its output
    and gradients are those of the loop's autocast F.linear, in bf16."""
    moe = random_moe(n_embd=16, hidden=24, n_experts=4, k=2)
    x = torch.randn(13, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped = moe_outputs_and_grads(moe, x, "grouped", monkeypatch)
        looped = moe_outputs_and_grads(moe, x, "loop", monkeypatch)
    assert grouped["output"].dtype == looped["output"].dtype == torch.bfloat16
    for name, e in looped.items():
        torch.testing.assert_close(grouped[name], e, rtol=1e-2, atol=1e-2 * e.abs().max().item(), msg=name)


@pytest.mark.parametrize("device,dtype,widths,capability,expected", [
    ("cpu", torch.float32, (16, 12), None, True),  # 48-byte rows
    ("cpu", torch.bfloat16, (16, 24), None, True),
    ("cpu", torch.float16, (16, 24), None, True),
    ("cpu", torch.float64, (16, 12), None, False),  # no float64 kernel
    ("cpu", torch.float32, (16, 13), None, False),  # 52-byte rows
    ("cpu", torch.bfloat16, (16, 12), None, False),  # 24-byte rows
    ("cpu", torch.float32, (18, 12), None, False),
    ("cuda", torch.bfloat16, (16, 24), (9, 0), True),  # Hopper's grouped kernel
    ("cuda", torch.bfloat16, (16, 24), (8, 0), False),  # a loop with a host sync there
    ("cuda", torch.bfloat16, (16, 24), (10, 0), False),  # pytorch/pytorch#172439
    ("cuda", torch.float32, (16, 24), (9, 0), False),
    ("cuda", torch.bfloat16, (16, 12), (9, 0), False),
    ("meta", torch.float32, (16, 12), None, False),
])
def test_grouped_mm_is_chosen_only_where_it_runs_well(device, dtype, widths, capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert moe_module._grouped_mm_runs_well(torch.device(device), dtype, *widths) is expected


def test_grouped_mm_is_not_chosen_on_rocm_nor_without_the_function(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert not moe_module._grouped_mm_runs_well(torch.device("cuda"), torch.bfloat16, 16, 24)
    monkeypatch.setattr(moe_module, "_GROUPED_MM", None)
    assert not moe_module._grouped_mm_runs_well(torch.device("cpu"), torch.float32, 16, 12)
    assert moe_module._experts_path(torch.empty(3, 16), 12) == "loop"


def test_the_experts_switch_forces_a_path_and_refuses_a_bad_value(monkeypatch):
    calls = []

    def counted_grouped_mm(*args, **kwargs):
        calls.append(1)
        return torch._grouped_mm(*args, **kwargs)

    monkeypatch.setattr(moe_module, "_GROUPED_MM", counted_grouped_mm)
    moe, x = random_moe(), torch.randn(7, 16)
    for mode, grouped_calls in [("auto", 2), ("grouped", 2), ("loop", 0)]:
        calls.clear()
        monkeypatch.setenv(moe_module.EXPERTS_ENV, mode)
        moe(x)
        assert len(calls) == grouped_calls, mode
    monkeypatch.setenv(moe_module.EXPERTS_ENV, "cutlass")
    with pytest.raises(ValueError, match="LLMKERN_MOE_EXPERTS must be one of auto, loop, grouped; got 'cutlass'"):
        moe(x)
    monkeypatch.setenv(moe_module.EXPERTS_ENV, "grouped")
    monkeypatch.setattr(moe_module, "_GROUPED_MM", None)
    with pytest.raises(RuntimeError, match="LLMKERN_MOE_EXPERTS=grouped, but this torch"):
        moe(x)


def test_a_bf16_moe_gpt_compiles_whole_with_the_grouped_experts():
    """No host sync and no graph break: torch.compile(fullgraph=True) takes the whole model, its loss and
    gradients those of eager mode. bf16: torch.compile traces grouped_mm with a meta function that takes only
    that (the loop's counts.tolist() breaks the graph). aot_eager: dynamo and AOT autograd as inductor sees them,
    in seconds rather than a minute of C++ compilation."""
    torch.manual_seed(0)
    model = GPT(moe_config(n_experts=6, experts_per_token=2, router_aux_loss_coef=0.1)).bfloat16()
    idx = torch.randint(0, VOCAB, (2, 11))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for run in (compiled, model):
        model.zero_grad()
        _, loss = run(idx, idx)
        loss.backward()
        results.append([loss.detach(), *(p.grad.clone() for p in model.parameters())])
    for name, c, e in zip(["loss", *dict(model.named_parameters())], *results):
        torch.testing.assert_close(c, e, rtol=2e-2, atol=1e-2 * e.abs().max().item(), msg=name)


def test_every_parameter_of_a_moe_gpt_has_a_gradient_after_a_step_with_idle_experts():
    torch.manual_seed(0)
    model = GPT(moe_config(n_experts=8, experts_per_token=1, router_aux_loss_coef=0.01))
    idx = torch.randint(0, VOCAB, (1, 3))  # 3 tokens, 1 expert each: at least 5 of 8 idle in every layer
    _, loss = model(idx, idx)
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


# --- the load-balancing loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("k,moe_layers", [(2, None), (1, [0, 2]), (3, [1])])
def test_aux_loss_is_transformers_formula_over_all_moe_layers(k, moe_layers):
    """Over the concatenation of the layers' router logits (one product of averages, not an average of the
    layers' losses: the two differ with more than one layer)."""
    torch.manual_seed(k)
    model = GPT(moe_config(n_layer=3, experts_per_token=k, moe_layers=moe_layers, router_aux_loss_coef=0.1))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoEMLP):
                module.router.weight.normal_(0.0, 0.5)  # routing far from uniform
    captured = capture_router_logits(model)
    idx = torch.randint(0, VOCAB, (3, 5))
    model.train()
    model(idx, idx)
    assert len(captured) == (3 if moe_layers is None else len(moe_layers))
    torch.testing.assert_close(model.aux_loss.double(), reference_aux_loss(captured, k), rtol=1e-5, atol=1e-6)


def uneven_moe(k: int = 2, moe_layers=None, **overrides) -> GPT:
    """A 3-layer MoE GPT whose routers send the tokens far from evenly."""
    model = GPT(moe_config(n_layer=3, experts_per_token=k, moe_layers=moe_layers, **overrides))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoEMLP):
                module.router.weight.normal_(0.0, 0.5)
    return model.train()


@pytest.mark.parametrize("k,moe_layers", [(2, None), (1, [0, 2]), (3, [1])])
def test_the_masked_aux_loss_is_transformers_formula_with_its_attention_mask(k, moe_layers):
    """Over the real tokens only, in every layer: both averages weighted by the mask, as transformers' are."""
    torch.manual_seed(10 + k)
    model = uneven_moe(k, moe_layers)
    captured = capture_router_logits(model)
    idx = torch.randint(0, VOCAB, (4, 9))
    mask = right_padding_mask([9, 3, 6, 1], 9)
    _, hidden_aux = model.hidden_states_with_aux_loss(idx, mask)
    expected = reference_aux_loss(captured, k, mask)
    torch.testing.assert_close(hidden_aux.double(), expected, rtol=1e-5, atol=1e-6)
    # the whole batch's loss is another number: the padding would have counted
    assert not torch.allclose(hidden_aux.double(), reference_aux_loss(captured, k), rtol=1e-3)
    captured.clear()
    model(idx, idx, token_mask=mask)  # forward keeps the same
    torch.testing.assert_close(model.aux_loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_mask_without_padding_gives_the_unmasked_loss():
    torch.manual_seed(3)
    model = uneven_moe()
    captured = capture_router_logits(model)
    idx = torch.randint(0, VOCAB, (3, 7))
    _, unmasked = model.hidden_states_with_aux_loss(idx)
    _, masked = model.hidden_states_with_aux_loss(idx, torch.ones(3, 7, dtype=torch.bool))
    torch.testing.assert_close(masked, unmasked, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(unmasked.double(), reference_aux_loss(captured[:3], 2), rtol=1e-5, atol=1e-6)


def test_the_padding_tokens_do_not_change_the_masked_aux_loss():
    """Right padding: the real tokens never attend to it, so their routing, and the masked loss, stay put."""
    torch.manual_seed(4)
    model = uneven_moe()
    idx = torch.randint(0, VOCAB, (3, 8))
    mask = right_padding_mask([8, 2, 5], 8)
    other = torch.where(mask, idx, torch.randint(0, VOCAB, idx.shape))  # other padding tokens
    assert not torch.equal(other, idx)
    aux = model.hidden_states_with_aux_loss(idx, mask)[1]
    torch.testing.assert_close(model.hidden_states_with_aux_loss(other, mask)[1], aux, rtol=0, atol=0)
    assert not torch.allclose(model.hidden_states_with_aux_loss(other)[1], model.hidden_states_with_aux_loss(idx)[1])


def test_forward_adds_the_masked_aux_loss_and_its_gradient_reaches_the_routers():
    torch.manual_seed(5)
    model = uneven_moe(router_aux_loss_coef=0.5)
    idx = torch.randint(0, VOCAB, (3, 6))
    mask = right_padding_mask([6, 4, 2], 6)
    targets = torch.where(mask, torch.randint(0, VOCAB, idx.shape), -1)
    _, loss = model(idx, targets, token_mask=mask)
    hidden, aux = model.hidden_states_with_aux_loss(idx, mask)
    cross_entropy = F.cross_entropy(model.head(hidden).reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, cross_entropy + 0.5 * aux)
    routers = [m.router.weight for m in model.modules() if isinstance(m, MoEMLP)]
    grads = torch.autograd.grad(aux, routers)
    assert all(g.abs().sum() > 0 for g in grads)


def test_hidden_states_with_aux_loss_gives_none_in_eval_mode_and_for_a_dense_model():
    torch.manual_seed(6)
    idx = torch.randint(0, VOCAB, (2, 5))
    model = uneven_moe().eval()
    hidden, aux = model.hidden_states_with_aux_loss(idx)
    assert aux is None
    torch.testing.assert_close(hidden, model.hidden_states(idx))
    dense = GPT(moe_config(n_experts=0, expert_hidden=None, experts_per_token=2)).train()
    assert dense.hidden_states_with_aux_loss(idx)[1] is None and dense.aux_loss is None


def test_an_all_padding_mask_gives_zero_not_nan():
    model = uneven_moe()
    aux = model.hidden_states_with_aux_loss(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))[1]
    assert aux.item() == 0.0


@pytest.mark.parametrize("token_mask,error,match", [
    (torch.ones(2, 5, dtype=torch.long), TypeError, "token_mask must be a bool tensor"),
    ([[True] * 5] * 2, TypeError, "token_mask must be a bool tensor"),
    (torch.ones(2, 4, dtype=torch.bool), ValueError, r"token_mask must have idx's shape \(2, 5\)"),
])
def test_a_bad_token_mask_is_refused_naming_it(token_mask, error, match):
    model = uneven_moe()
    idx = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(error, match=match):
        model(idx, idx, token_mask=token_mask)
    with pytest.raises(error, match=match):
        model.hidden_states_with_aux_loss(idx, token_mask)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_the_masked_aux_loss_runs_under_deterministic_algorithms(device, monkeypatch):
    """torch.use_deterministic_algorithms refuses a GPU bincount with weights (float atomic adds), which a masked
    loss counting the real tokens' slots by weights 0/1 ran into: each recipe passes a mask, so a MoE fine-tuning
    run in deterministic mode failed on a GPU. On the CPU, where a weighted bincount passes, no such call may run."""
    torch.manual_seed(7)
    model = uneven_moe().to(device)
    idx = torch.randint(0, VOCAB, (3, 6), device=device)
    mask = right_padding_mask([6, 4, 2], 6).to(device)
    captured = capture_router_logits(model)
    weighted = []  # per torch.bincount call: whether it had weights
    bincount = torch.bincount

    def recording_bincount(input, weights=None, minlength=0):
        weighted.append(weights is not None)
        return bincount(input, weights, minlength)

    monkeypatch.setattr(torch, "bincount", recording_bincount)
    torch.use_deterministic_algorithms(True)
    try:
        _, aux = model.hidden_states_with_aux_loss(idx, mask)
        aux.backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert weighted and not any(weighted)
    expected = reference_aux_loss([c.cpu() for c in captured], 2, mask.cpu())
    torch.testing.assert_close(aux.detach().cpu().double(), expected, rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_refuses_a_mask_of_other_tokens():
    stats = [MoEMLP(8, 4, 3, 1)(torch.randn(2, 5, 8))[1]]
    with pytest.raises(ValueError, match=r"one flag per routed token \(10\)"):
        load_balancing_loss(stats, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        load_balancing_loss(stats, torch.ones(2, 5))


def test_aux_loss_is_added_in_training_mode_only():
    torch.manual_seed(0)
    model = GPT(moe_config(router_aux_loss_coef=0.25))
    idx, targets = torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (2, 9))
    assert model.aux_loss is None  # no training forward yet
    model.eval()
    logits, loss = model(idx, targets)
    cross_entropy = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    torch.testing.assert_close(loss, cross_entropy)
    assert model.aux_loss is None
    model.train()  # no dropout: the same logits
    _, train_loss = model(idx, targets)
    assert model.aux_loss is not None and not model.aux_loss.requires_grad
    torch.testing.assert_close(train_loss, cross_entropy + 0.25 * model.aux_loss)


def test_the_aux_loss_gradient_reaches_the_routers():
    """The aux loss is differentiable through the router probabilities (not the top-k counts)."""
    torch.manual_seed(0)
    model = GPT(moe_config(router_aux_loss_coef=1.0))
    idx = torch.randint(0, VOCAB, (2, 7))
    model(idx, idx)[1].backward()
    with_aux = [m.router.weight.grad.clone() for m in model.modules() if isinstance(m, MoEMLP)]
    model.zero_grad()
    model.config.router_aux_loss_coef = 0.0
    model(idx, idx)[1].backward()
    without = [m.router.weight.grad for m in model.modules() if isinstance(m, MoEMLP)]
    assert all(not torch.allclose(a, b) for a, b in zip(with_aux, without))


def test_load_balancing_loss_refuses_no_layers():
    with pytest.raises(ValueError, match="at least one MoE layer"):
        load_balancing_loss([])


# --- the model -----------------------------------------------------------------------------------------


def test_moe_layers_picks_the_layers_with_experts():
    model = GPT(moe_config(n_layer=3, moe_layers=[1]))
    kinds = [type(block.mlp) for block in model.blocks]
    assert kinds == [GatedMLP, MoEMLP, GatedMLP]
    assert model.blocks[1].mlp.hidden == 24 and model.blocks[0].mlp.hidden == model.config.hidden_size


def test_checkpointing_gives_the_same_loss_and_gradients():
    """The aux loss of a checkpointed block counts once (the recomputation in the backward pass adds nothing), the
    per-token RouterStats coming out of torch.utils.checkpoint whole (the masked loss reads them)."""
    torch.manual_seed(0)
    plain = GPT(moe_config(router_aux_loss_coef=0.5))
    checkpointed = GPT(moe_config(router_aux_loss_coef=0.5, activation_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    idx = torch.randint(0, VOCAB, (2, 11))
    mask = right_padding_mask([11, 6], 11)
    losses = []
    for model in (plain, checkpointed):
        model.train()
        _, loss = model(idx, idx, token_mask=mask)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(plain.aux_loss, checkpointed.aux_loss)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


@torch.no_grad()
def test_the_kv_cache_gives_the_uncached_hidden_states_and_greedy_tokens():
    torch.manual_seed(0)
    model = GPT(moe_config(n_layer=3, moe_layers=[0, 2])).eval()
    idx = torch.randint(0, VOCAB, (2, 10))
    cache = KVCache(model.config.n_layer, capacity=10)
    chunks = [model.hidden_states(idx[:, a:b], cache=cache) for a, b in ((0, 4), (4, 5), (5, 10))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model.hidden_states(idx), rtol=1e-4, atol=1e-4)
    prompts = [[5, 17, 3], [8, 1, 40, 2, 9]]
    cached = generate(model, prompts, max_new_tokens=8, temperature=0)
    assert cached == generate(model, prompts, max_new_tokens=8, temperature=0, use_cache=False)


def test_init_gives_the_experts_gpt2_std_and_proj_the_residual_std():
    torch.manual_seed(0)
    model = GPT(moe_config(n_layer=4, n_embd=64, expert_hidden=128, n_experts=8))
    moe = model.blocks[0].mlp
    assert moe.gate_up.std().item() == pytest.approx(0.02, rel=0.05)
    assert moe.router.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert moe.proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)


def test_flops_count_the_active_parameters_of_k_experts_and_the_router():
    """k experts of width H hold the parameters of one dense SwiGLU MLP of width k * H; the router adds E * C."""
    model = GPT(moe_config(n_layer=3, moe_layers=[0, 2], n_experts=6, experts_per_token=2, expert_hidden=24,
                           mlp_hidden=48))
    dense = GPT(moe_config(n_layer=3, n_experts=None, expert_hidden=None, mlp_hidden=48))
    active = dense.num_parameters(non_embedding=True) + 2 * 6 * 32  # + the two MoE layers' routers
    assert model.num_parameters(non_embedding=True, active=True) == active
    assert model.flops_per_token(16) == 6 * active + 12 * 3 * 32 * 16
    idle_experts = 2 * (6 - 2) * (2 * 24 * 32 + 32 * 24)
    assert model.num_parameters(non_embedding=True) == active + idle_experts


def test_the_stacked_expert_weights_decay():
    model = GPT(moe_config())
    decay = {id(p) for p in model.optimizer_groups(0.1)[0]["params"]}
    for module in model.modules():
        if isinstance(module, MoEMLP):
            assert {id(module.gate_up), id(module.proj), id(module.router.weight)} <= decay


def test_triton_backend_matches_torch_in_the_interpreter():
    if not _backend.triton_has("swiglu") or not _backend.can_run("triton", "swiglu", torch.device("cpu")):
        pytest.skip("no Triton swiglu kernels that run here")
    reference = random_moe(n_embd=16, hidden=8, n_experts=3, k=2)
    model = random_moe(n_embd=16, hidden=8, n_experts=3, k=2, backend="triton")
    model.load_state_dict(reference.state_dict())
    x = torch.randn(7, 16)
    out, ref = model(x)[0], reference(x)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- training ------------------------------------------------------------------------------------------


def test_tiny_moe_trains_and_its_loss_falls(tmp_path):
    from llmkern.data.shards import tokenize_documents
    from llmkern.train import TrainConfig, Trainer

    documents = [f"the {w} sees the {v}. " * 6 for w in ("cat", "dog", "fox", "owl") for v in ("moon", "sun", "sea")]
    data_dir = str(tmp_path / "shards")
    tokenize_documents(documents * 10, "bytes", data_dir, val_fraction=0.15, seed=0)
    config = TrainConfig(out_dir=str(tmp_path / "run"), data_dir=data_dir, preset="tiny-moe",
                         model={"n_layer": 1, "block_size": 32}, batch_tokens=256, micro_batch=4, seq_len=32,
                         max_steps=15, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=0, eval_steps=2,
                         ckpt_interval=0, log_interval=1, progress=False, seed=7).validate()
    trainer = Trainer(config)
    before = trainer.evaluate()
    trainer.fit()
    assert trainer.evaluate() < before - 1.0
    assert trainer.raw_model.aux_loss is not None


# --- the config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,error,match", [
    ({"n_experts": 1}, ValueError, "n_experts must be >= 2"),
    ({"n_experts": "4"}, TypeError, "n_experts"),
    ({"n_experts": 4, "mlp": "gelu"}, ValueError, "n_experts needs mlp='swiglu'"),
    ({"n_experts": 4, "mlp": "geglu"}, ValueError, "n_experts needs mlp='swiglu'"),
    ({"n_experts": 4, "experts_per_token": 0}, ValueError, "experts_per_token must be in"),
    ({"n_experts": 4, "experts_per_token": 5}, ValueError, "experts_per_token must be in"),
    ({"n_experts": 4, "experts_per_token": 2.0}, TypeError, "experts_per_token"),
    ({"n_experts": 4, "expert_hidden": 0}, ValueError, "expert_hidden must be >= 1"),
    ({"n_experts": 4, "router_aux_loss_coef": -0.1}, ValueError, "router_aux_loss_coef must be"),
    ({"n_experts": 4, "router_aux_loss_coef": math.inf}, ValueError, "router_aux_loss_coef must be"),
    ({"n_experts": 4, "norm_topk_prob": 1}, TypeError, "norm_topk_prob"),
    ({"n_experts": 4, "moe_layers": [0, 2]}, ValueError, r"moe_layers holds 2; layer indices are in \[0, n_layer=2\)"),
    ({"n_experts": 4, "moe_layers": [-1]}, ValueError, "moe_layers holds -1"),
    ({"n_experts": 4, "moe_layers": []}, ValueError, "moe_layers is empty"),
    ({"n_experts": 4, "moe_layers": [1, 0]}, ValueError, "moe_layers must be sorted and without repeats"),
    ({"n_experts": 4, "moe_layers": [1, 1]}, ValueError, "moe_layers must be sorted and without repeats"),
    ({"n_experts": 4, "moe_layers": [True]}, TypeError, "moe_layers"),
    ({"n_experts": 4, "moe_layers": 1}, TypeError, "moe_layers"),
    ({"experts_per_token": 1}, ValueError, "experts_per_token is for mixture-of-experts models"),
    ({"moe_layers": [0]}, ValueError, "moe_layers is for mixture-of-experts models"),
    ({"router_aux_loss_coef": 0.01}, ValueError, "router_aux_loss_coef is for mixture-of-experts models"),
])
def test_bad_moe_settings_are_refused_naming_the_field(overrides, error, match):
    values = {"n_layer": 2, "mlp": "swiglu", **overrides}
    with pytest.raises(error, match=match):
        GPTConfig(**values)


def test_zero_experts_and_every_layer_listed_mean_none():
    assert GPTConfig(mlp="swiglu", n_experts=0).n_experts is None
    assert GPTConfig(mlp="swiglu", n_layer=3, n_experts=4, moe_layers=[0, 1, 2]).moe_layers is None
    layers = [0, 2]
    config = GPTConfig(mlp="swiglu", n_layer=3, n_experts=4, moe_layers=layers)
    layers.append(1)  # a copy is kept
    assert config.moe_layers == [0, 2] and [config.is_moe_layer(i) for i in range(3)] == [True, False, True]


def test_moe_configs_round_trip_and_old_dicts_still_load():
    config = GPTConfig.from_preset("tiny-moe", moe_layers=[1], expert_hidden=64, norm_topk_prob=False)
    assert GPTConfig.from_dict(config.to_dict()) == config
    preset = GPTConfig.from_preset("tiny-moe")
    assert (preset.n_experts, preset.experts_per_token, preset.router_aux_loss_coef) == (4, 2, 0.01)
    dense = GPTConfig.from_preset("tiny-llama").to_dict()
    moe_fields = ("n_experts", "experts_per_token", "expert_hidden", "norm_topk_prob", "router_aux_loss_coef",
                  "moe_layers")
    old = {k: v for k, v in dense.items() if k not in moe_fields}  # as an llmkern before MoE saved it
    assert GPTConfig.from_dict(old) == GPTConfig.from_dict(dense)
    assert identity_dict(dense) == identity_dict(old)
    assert set(moe_fields) - {"experts_per_token", "norm_topk_prob"} <= set(identity_dict(config.to_dict()))


# --- the exports refuse MoE models ------------------------------------------------------------------------


def test_the_hugging_face_exports_of_dense_models_refuse_moe_models():
    """GPT-2's, Phi-3's and Gemma 3's formats have no experts (a MoE model exports as Mixtral's or Qwen3-MoE's:
    test_hf_moe.py)."""
    from llmkern.model.hf_gemma3_config import check_gemma3_shaped
    from llmkern.model.hf_gpt2 import hf_gpt2_config
    from llmkern.model.hf_llama import check_llama_shaped
    from llmkern.model.hf_llama_config import hf_llama_config

    config = GPTConfig.from_preset("tiny-moe")
    with pytest.raises(ValueError, match="n_experts"):
        check_llama_shaped(config)  # Phi-3's check: no experts
    assert hf_llama_config(config, torch.float32)["model_type"] == "mixtral"
    with pytest.raises(ValueError, match="n_experts"):
        hf_gpt2_config(config)
    gemma = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, qk_norm=True, post_norms=True,
                 embed_scale=128 ** 0.5, n_experts=4)
    with pytest.raises(ValueError, match="'n_experts': 4"):
        check_gemma3_shaped(GPTConfig(n_embd=128, n_head=2, **gemma))
