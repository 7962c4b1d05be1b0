"""Edge cases of the GPT, its MoE layers and AdamW that the per-area tests do not reach: every model feature at once
under activation checkpointing, routing that sends every token to the same experts, and a skipped first step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmkern.model import GPT, GPTConfig
from llmkern.nn import MoEMLP
from llmkern.optim import AdamW

# MoE in two of three layers, a sliding layer with its own RoPE base between full ones, sandwich norms, QK-norm,
# grouped-query attention, a scaled embedding, tied weights and dropout: what a Gemma-3-like MoE model combines.
EVERY_FEATURE = {
    "vocab_size": 100, "block_size": 32, "n_layer": 3, "n_head": 4, "n_kv_head": 2, "n_embd": 64,
    "norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "tie_embeddings": True, "bias": False,
    "n_experts": 4, "experts_per_token": 2, "moe_layers": [0, 2], "router_aux_loss_coef": 0.01,
    "post_norms": True, "sliding_window": 5, "layer_types": ["full_attention", "sliding_attention", "full_attention"],
    "rope_local_theta": 1000.0, "qk_norm": True, "embed_scale": 8.0, "dropout": 0.2, "backend": "torch",
}


def test_checkpointing_gives_the_same_gradients_with_every_feature_at_once():
    plain = GPT(GPTConfig(**EVERY_FEATURE))
    checkpointed = GPT(GPTConfig(**EVERY_FEATURE, activation_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    idx, targets = torch.randint(0, 100, (2, 12)), torch.randint(0, 100, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])  # two documents packed in the first row
    token_mask = torch.ones(2, 12, dtype=torch.bool)
    token_mask[1, 9:] = False  # right padding: out of the load-balancing statistics
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)  # the same dropout masks; the recomputation must draw them again
        loss = model(idx, targets, doc_ids=doc_ids, token_mask=token_mask)[1]
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert checkpointed.lm_head.weight is checkpointed.wte.weight


def _per_token_moe(moe: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """MoEMLP's output in float64, token by token and slot by slot: the definition."""
    tokens = x.reshape(-1, x.size(-1)).double()
    probs = F.softmax(tokens @ moe.router.weight.double().T, dim=-1)
    weights, experts = probs.topk(moe.experts_per_token, dim=-1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(tokens)
    for n in range(tokens.size(0)):
        for weight, e in zip(weights[n], experts[n]):
            gate, up = (tokens[n] @ moe.gate_up[e].double().T).split(moe.hidden)
            out[n] += weight * (F.silu(gate) * up) @ moe.proj[e].double().T
    return out.view_as(x)


@pytest.mark.parametrize("experts_path", ["loop", "grouped"])
def test_every_token_sent_to_the_same_two_experts_matches_the_definition(experts_path, monkeypatch):
    monkeypatch.setenv("LLMKERN_MOE_EXPERTS", experts_path)
    moe = MoEMLP(16, 32, n_experts=4, experts_per_token=2)
    with torch.no_grad():
        moe.gate_up.normal_(0.0, 0.2)
        moe.proj.normal_(0.0, 0.2)
        moe.router.weight.zero_()
        moe.router.weight[0] += 1.0  # positive inputs: expert 0 first, then 1, for every token
        moe.router.weight[1] += 0.5
    x = torch.rand(3, 7, 16) + 0.1  # 21 tokens: no count divides evenly among the 4 experts
    out, stats = moe(x)
    assert torch.bincount(stats.experts.reshape(-1), minlength=4).tolist() == [21, 21, 0, 0]
    torch.testing.assert_close(out.double(), _per_token_moe(moe, x), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.count_nonzero(moe.gate_up.grad[2:]) == 0 and torch.count_nonzero(moe.proj.grad[2:]) == 0
    assert torch.count_nonzero(moe.gate_up.grad[:2]) > 0 and torch.count_nonzero(moe.proj.grad[:2]) > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_skipped_first_step_leaves_no_trace(backend):
    """At step count 0 the bias corrections divide by zero: a first step skipped for a non-finite gradient must
    still leave the parameter and its moments as they were, and the next steps must be torch's from the start."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(37))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt = AdamW([ours], lr=1e-2, max_grad_norm=1.0, backend=backend)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2)
    ours.grad = torch.randn(37)
    ours.grad[3] = math.nan
    opt.step()
    assert opt.skipped_steps == 1
    assert torch.equal(ours.detach(), ref.detach())
    assert opt.state[ours]["step"].item() == 0
    assert not opt.state[ours]["exp_avg"].any() and not opt.state[ours]["exp_avg_sq"].any()
    for _ in range(3):
        grad = torch.randn(37)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        torch.nn.utils.clip_grad_norm_([ref], 1.0)
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


def test_a_moe_layer_used_on_its_own_starts_from_gpt2s_init():
    """MoEMLP is public: built alone (not by GPT, whose init_weights sets its experts), its expert weights are
    N(0, 0.02), not torch.empty's memory; reset_parameters takes proj's std, as GPT passes its residual one."""
    from llmkern.nn.moe import MoEMLP

    torch.manual_seed(0)
    moe = MoEMLP(n_embd=64, hidden=96, n_experts=4, experts_per_token=2, backend="torch")
    for weight in (moe.gate_up, moe.proj):
        assert torch.isfinite(weight).all() and abs(weight.std().item() - 0.02) < 0.002
    moe.reset_parameters(proj_std=0.005)
    assert abs(moe.proj.std().item() - 0.005) < 0.0005 and abs(moe.gate_up.std().item() - 0.02) < 0.002
