"""Mixture-of-experts models in the fine-tuning recipes (finetune.aux_loss): each recipe's training loss on a tiny
MoE model adds router_aux_loss_coef times the load-balancing loss over the batch's real tokens (checked against
transformers' formula with its attention_mask, in float64, on router logits captured from a separate forward
pass), logs it as "aux_loss", and sends its gradient to the routers; in eval mode, and for a dense model, the
recipes' losses are what they were."""

import contextlib
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llmkern.finetune.aux_loss import real_tokens
from llmkern.finetune.classify import GPTClassifier, classification_loss, collate_rows
from llmkern.finetune.data import IGNORE, make_lm_batch, make_packed_batch
from llmkern.finetune.dpo import collate_pairs, dpo_batch_loss, dpo_loss
from llmkern.finetune.ppo import PolicyWithValue, ppo_update, score_rollout
from llmkern.finetune.reward import (
    RewardModel,
    collate_score_pairs,
    pair_loss_and_metrics,
    reward_loss,
)
from llmkern.finetune.sft import lm_loss
from llmkern.model import GPT, GPTConfig
from llmkern.nn import MoEMLP

VOCAB = 64
COEF = 0.5  # large, so that the aux term is far above rounding


def tiny_gpt(seed: int = 0, n_experts: int | None = 4) -> GPT:
    """A 2-layer Llama-shaped GPT, MoE (4 experts, top 2, routers far from even) or dense, in training mode."""
    torch.manual_seed(seed)
    moe = {"n_experts": n_experts, "experts_per_token": 2, "expert_hidden": 16, "router_aux_loss_coef": COEF}
    config = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                       norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=False, bias=False, backend="torch",
                       fused_loss=False, **(moe if n_experts else {}))
    model = GPT(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoEMLP):
                module.router.weight.normal_(0.0, 0.5)
    return model.train()


def routers(model) -> list[torch.Tensor]:
    return [m.router.weight for m in model.modules() if isinstance(m, MoEMLP)]


def reference_aux_loss(model: GPT, ids: torch.Tensor, lengths: list[int], doc_ids: torch.Tensor | None = None,
                       k: int = 2) -> torch.Tensor:
    """transformers' load_balancing_loss_func in float64 with attention_mask = the rows' first lengths[b] tokens:
    the router logits of every MoE layer of a forward pass over ids, concatenated; the share of top-k slots per
    expert and the mean router probability, each averaged over the real tokens only."""
    captured = []
    hooks = [m.router.register_forward_hook(lambda mod, args, out: captured.append(out.detach().double()))
             for m in model.modules() if isinstance(m, MoEMLP)]
    with torch.no_grad():
        model.hidden_states(ids, doc_ids=doc_ids)
    for h in hooks:
        h.remove()
    logits = torch.cat(captured)  # (L * B * T, E)
    n_experts = logits.size(-1)
    attention_mask = (torch.arange(ids.size(1))[None, :] < torch.tensor(lengths)[:, None]).double()
    mask = attention_mask.reshape(-1).repeat(len(captured))  # (L * B * T,)
    probs = logits.softmax(dim=-1)
    one_hot = F.one_hot(probs.topk(k, dim=-1).indices, n_experts).double()  # (L * B * T, k, E)
    tokens_per_expert = (one_hot * mask[:, None, None]).sum(0) / (mask.sum() * torch.ones(k, n_experts))
    prob_per_expert = (probs * mask[:, None]).sum(0) / mask.sum()
    return n_experts * (tokens_per_expert * prob_per_expert[None, :]).sum()


def lm_rows(lengths: list[int], seed: int) -> list[tuple[list[int], list[int]]]:
    """(tokens, labels) rows of random tokens, the first two of each a prompt (IGNORE labels)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        tokens = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        rows.append((tokens, [IGNORE, IGNORE, *tokens[2:]]))
    return rows


# --- each recipe's loss function on one batch: (loss, metrics, {"ids", "lengths" of their real tokens, ...}) ------


def sft_loss(model):
    lengths = [9, 4, 6]
    batch = make_lm_batch(lm_rows(lengths, 1), pad_id=0)
    loss, metrics = lm_loss(model, batch)
    return loss, metrics, {"ids": batch["idx"], "lengths": [min(n, batch["idx"].size(1)) for n in lengths]}


def packed_sft_loss(model):
    rows = [(tokens, labels, [0] * 3 + [1] * (len(tokens) - 3)) for tokens, labels in lm_rows([8, 5], 2)]
    batch = make_packed_batch(rows, pad_id=0)
    loss, metrics = lm_loss(model, batch)
    return loss, metrics, {"ids": batch["idx"], "lengths": [7, 5], "doc_ids": batch["doc_ids"]}


def dpo_batch(model):
    chosen, rejected = lm_rows([7, 5], 3), lm_rows([4, 8], 4)
    examples = [{"chosen": c, "rejected": r, "ref_chosen": -20.0 + i, "ref_rejected": -21.0 - i}
                for i, (c, r) in enumerate(zip(chosen, rejected))]
    batch = collate_pairs(examples, pad_id=0)
    loss, metrics = dpo_batch_loss(model, batch, beta=0.2)
    return loss, metrics, {"ids": batch["idx"], "lengths": [min(len(t), batch["idx"].size(1))
                                                            for t, _ in chosen + rejected]}


def reward_batch(model):
    rows = [tokens for tokens, _ in lm_rows([6, 9, 3, 7], 5)]
    batch = collate_score_pairs([(rows[0], rows[1]), (rows[2], rows[3])], pad_id=0)
    torch.manual_seed(12)  # the head's initialisation
    loss, metrics = pair_loss_and_metrics(RewardModel(model), batch)
    return loss, metrics, {"ids": batch["ids"], "lengths": [6, 3, 9, 7]}  # the chosen rows, then the rejected


def classify_batch(model):
    rows = [(tokens, label) for (tokens, _), label in zip(lm_rows([5, 10, 2], 6), [0, 2, 1])]
    torch.manual_seed(11)  # the head's initialisation
    loss, metrics = classification_loss(GPTClassifier(model, 3), collate_rows(rows, pad_id=0))
    return loss, metrics, {"ids": collate_rows(rows, pad_id=0)["idx"], "lengths": [5, 10, 2]}


RECIPES = {"sft": sft_loss, "packed_sft": packed_sft_loss, "dpo": dpo_batch, "reward": reward_batch,
           "classify": classify_batch}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_adds_the_load_balancing_loss_of_its_real_tokens(recipe):
    """loss(coef) = loss(coef = 0) + coef * aux, aux transformers' masked formula; logged as "aux_loss"; the aux
    term's gradient reaches every router."""
    model = tiny_gpt(seed=1)
    loss, metrics, inputs = RECIPES[recipe](model)
    grads = torch.autograd.grad(loss, routers(model))
    expected_aux = reference_aux_loss(model, **inputs)
    # the batch has padding, which the loss must leave out
    assert inputs["lengths"] != [inputs["ids"].size(1)] * len(inputs["lengths"])
    torch.testing.assert_close(metrics["aux_loss"].double(), expected_aux, rtol=1e-5, atol=1e-6)
    assert not metrics["aux_loss"].requires_grad

    model.config.router_aux_loss_coef = 0.0
    plain, plain_metrics, _ = RECIPES[recipe](model)
    plain_grads = torch.autograd.grad(plain, routers(model))
    torch.testing.assert_close(plain_metrics["aux_loss"], metrics["aux_loss"])  # logged all the same
    torch.testing.assert_close(loss.double(), plain.double() + COEF * expected_aux, rtol=1e-5, atol=1e-6)
    # the metrics' "loss", which finetune.loop logs, is the recipe's own loss (see the logged-loss test below)
    torch.testing.assert_close(metrics["loss"], plain.detach(), rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, plain_grads):
        assert (g - p).abs().max() > 1e-4  # coef * d aux / d router


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_in_eval_mode_a_recipe_adds_no_load_balancing_loss(recipe):
    """Evaluation (and a frozen reference or reward model, which run in eval mode): the recipe's own loss."""
    model = tiny_gpt(seed=2)
    train_loss, _, _ = RECIPES[recipe](model)
    model.eval()
    with torch.no_grad():
        loss, metrics, _ = RECIPES[recipe](model)
    assert "aux_loss" not in metrics
    model.train()
    model.config.router_aux_loss_coef = 0.0
    with torch.no_grad():
        plain, _, _ = RECIPES[recipe](model)
    torch.testing.assert_close(loss, plain)  # no dropout: train and eval forward passes agree
    assert not torch.allclose(train_loss, loss)


def test_a_dense_model_s_lm_and_dpo_losses_are_their_plain_formulas():
    """No aux_loss metric and nothing added: each loss as the recipe defines it, from plain forward passes."""
    model = tiny_gpt(seed=3, n_experts=None)
    loss, metrics, _ = sft_loss(model)
    batch = make_lm_batch(lm_rows([9, 4, 6], 1), pad_id=0)
    assert set(metrics) == set() and loss.item() == model(batch["idx"], batch["targets"])[1].item()

    loss, metrics, _ = dpo_batch(model)
    batch = collate_pairs([{"chosen": c, "rejected": r, "ref_chosen": -20.0 + i, "ref_rejected": -21.0 - i}
                           for i, (c, r) in enumerate(zip(lm_rows([7, 5], 3), lm_rows([4, 8], 4)))], 0)
    logits = model(batch["idx"])[0].float()
    logp = -F.cross_entropy(logits.transpose(1, 2), batch["targets"], ignore_index=IGNORE, reduction="none").sum(1)
    expected, _, _ = dpo_loss(logp[:2], logp[2:], batch["ref_chosen"], batch["ref_rejected"], beta=0.2)
    assert "aux_loss" not in metrics
    torch.testing.assert_close(loss, expected)


def test_the_reward_and_classifier_losses_of_a_dense_model_are_their_formulas():
    model = tiny_gpt(seed=4, n_experts=None)
    rows = [tokens for tokens, _ in lm_rows([6, 9, 3, 7], 5)]
    batch = collate_score_pairs([(rows[0], rows[1]), (rows[2], rows[3])], pad_id=0)
    rm = RewardModel(model)
    loss, metrics = pair_loss_and_metrics(rm, batch)
    hidden = model.hidden_states(batch["ids"])
    scores = rm.head(hidden[torch.arange(4), batch["lengths"] - 1]).squeeze(-1)
    torch.testing.assert_close(loss, reward_loss(scores[:2], scores[2:]))
    assert set(metrics) == {"accuracy", "margin"}

    clf = GPTClassifier(model, 3)
    batch = collate_rows([(tokens, label) for (tokens, _), label in zip(lm_rows([5, 10, 2], 6), [0, 2, 1])], 0)
    loss, metrics = classification_loss(clf, batch)
    hidden = model.hidden_states(batch["idx"])
    logits = clf.head(hidden[torch.arange(3), batch["lengths"] - 1])
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["labels"]))
    assert set(metrics) == {"accuracy"}


# --- PPO ---------------------------------------------------------------------------------------------------------


class _RouterGradients:
    """An optimizer that keeps the routers' gradients of each step and changes nothing."""

    def __init__(self, model):
        self.params, self.param_groups, self.grads = routers(model), [{"lr": 0.0}], []

    def step(self):
        self.grads.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def ppo_losses(model: PolicyWithValue, rollout, seed: int = 0):
    """ppo_update over the whole rollout in one minibatch: (its means, the routers' gradients)."""
    config = SimpleNamespace(ppo_epochs=1, batch_size=rollout.ids.size(0), grad_accum=1, clip_range=0.2,
                             vf_coef=0.5, value_clip=0.2)
    recorder = _RouterGradients(model.policy)
    torch.manual_seed(seed)
    _, losses = ppo_update(model, recorder, rollout, config, lambda step: 0.0, 0, contextlib.nullcontext)
    return losses, recorder.grads[0]


def test_ppo_adds_the_policy_s_load_balancing_loss_and_the_frozen_models_add_none():
    policy = tiny_gpt(seed=5)
    reference = tiny_gpt(seed=6).eval().requires_grad_(False)
    model = PolicyWithValue(policy)
    prompts, responses = [[1, 2, 3], [4, 5, 6, 7, 8]], [[9, 10, 11, 12], [13]]
    model.eval()
    with torch.no_grad():
        rollout = score_rollout(model, reference, lambda ids, lengths: torch.zeros(ids.size(0)), prompts,
                                responses, pad_id=0, kl_coef=0.05)
    assert policy.aux_loss is None and reference.aux_loss is None  # scoring runs in eval mode: no aux loss
    lengths = [len(p) + len(r) - 1 for p, r in zip(prompts, responses)]  # the ids of each row
    assert rollout.token_mask.tolist() == real_tokens(torch.tensor(lengths), rollout.ids.size(1)).tolist()
    rollout.advantages, rollout.returns = torch.randn_like(rollout.rewards), torch.randn_like(rollout.rewards)

    losses, grads = ppo_losses(model, rollout)
    expected_aux = reference_aux_loss(policy, rollout.ids, lengths)
    torch.testing.assert_close(torch.tensor(losses["aux_loss"], dtype=torch.float64), expected_aux,
                               rtol=1e-5, atol=1e-6)
    policy.config.router_aux_loss_coef = 0.0
    plain, plain_grads = ppo_losses(model, rollout)
    assert losses["policy_loss"] == plain["policy_loss"] and losses["value_loss"] == plain["value_loss"]
    assert plain["loss"] == pytest.approx(plain["policy_loss"] + 0.5 * plain["value_loss"], rel=1e-6)
    assert losses["loss"] == pytest.approx(plain["loss"] + COEF * expected_aux.item(), rel=1e-5)
    for g, p in zip(grads, plain_grads):
        assert (g - p).abs().max() > 1e-4


def test_ppo_with_a_dense_policy_logs_no_aux_loss():
    policy = tiny_gpt(seed=7, n_experts=None)
    model = PolicyWithValue(policy)
    model.eval()
    with torch.no_grad():
        rollout = score_rollout(model, tiny_gpt(seed=8, n_experts=None).eval(),
                                lambda ids, lengths: torch.ones(ids.size(0)), [[1, 2], [3, 4, 5]], [[6, 7], [8]],
                                pad_id=0, kl_coef=0.05)
    rollout.advantages, rollout.returns = torch.randn_like(rollout.rewards), torch.randn_like(rollout.rewards)
    config = SimpleNamespace(ppo_epochs=1, batch_size=2, grad_accum=1, clip_range=0.2, vf_coef=0.5, value_clip=0.2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    _, losses = ppo_update(model, optimizer, rollout, config, lambda step: 0.0, 0, contextlib.nullcontext)
    assert set(losses) == {"loss", "policy_loss", "value_loss", "clip_fraction"}
    assert losses["loss"] == pytest.approx(losses["policy_loss"] + 0.5 * losses["value_loss"], rel=1e-6)


def test_a_moe_fine_tuning_run_logs_and_charts_its_aux_loss(tmp_path):
    """finetune.loop's log: each train record of a MoE run has "aux_loss" (the step's mean), the eval records none,
    and aux_loss.png is drawn."""
    from llmkern.finetune import FinetuneConfig
    from llmkern.finetune.loop import batched_evaluation, fit

    examples = lm_rows([6, 9, 4, 7, 5, 8], 9)
    cfg = FinetuneConfig(out_dir=str(tmp_path), max_steps=2, batch_size=3, lr=1e-3, warmup_steps=0, progress=False)
    collate = lambda rows: make_lm_batch(rows, 0)
    evaluate = batched_evaluation(lm_loss, collate, examples[:3], "val", cfg, torch.device("cpu"))
    summary = fit(tiny_gpt(seed=9), lm_loss, examples, collate, cfg, evaluate=evaluate)
    with open(summary["metrics"]) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2 and all(r["aux_loss"] > 0 for r in train)
    assert not any("aux_loss" in k for r in records if r["kind"] == "eval" for k in r)
    assert os.path.exists(os.path.join(tmp_path, "aux_loss.png"))


def _classify_rows(lengths: list[int], seed: int) -> list[tuple[list[int], int]]:
    return [(tokens, i % 3) for i, (tokens, _) in enumerate(lm_rows(lengths, seed))]


@pytest.mark.parametrize("recipe", ["sft", "classify"])
def test_the_logged_training_loss_is_the_recipe_s_loss_comparable_with_val_loss(tmp_path, recipe):
    """As the pretraining trainer logs the cross-entropy alone: a MoE run's train "loss" is the recipe's loss (what
    val_loss measures), aux_loss beside it; the objective trained on adds router_aux_loss_coef * aux_loss. With lr 0
    and the training batch as the validation set, the two read the same (they were coef * aux_loss apart)."""
    from llmkern.finetune import FinetuneConfig
    from llmkern.finetune.loop import batched_evaluation, fit

    if recipe == "sft":
        model, loss_fn = tiny_gpt(seed=10), lm_loss
        examples, collate = lm_rows([6, 9, 4], 10), lambda rows: make_lm_batch(rows, 0)
    else:
        model, loss_fn = GPTClassifier(tiny_gpt(seed=10), 3), classification_loss
        examples, collate = _classify_rows([6, 9, 4], 10), lambda rows: collate_rows(rows, 0)
    cfg = FinetuneConfig(out_dir=str(tmp_path), max_steps=1, batch_size=3, lr=0.0, min_lr=0.0, warmup_steps=0,
                         eval_interval=1, progress=False)
    evaluate = batched_evaluation(loss_fn, collate, examples, "val", cfg, torch.device("cpu"))
    summary = fit(model, loss_fn, examples, collate, cfg, evaluate=evaluate)
    with open(summary["metrics"]) as f:
        records = [json.loads(line) for line in f]
    (train,) = [r for r in records if r["kind"] == "train"]
    val_loss = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert train["aux_loss"] > 1.0  # top 2 of 4 experts: 2 when even, so COEF * aux_loss is far above rounding
    assert val_loss[0] == val_loss[-1] and train["loss"] == pytest.approx(val_loss[0], rel=1e-5)
