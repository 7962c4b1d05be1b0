"""DPO: the loss against hand computations and its known properties, and a short real run."""

import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from llmkern.finetune.dpo import DPOConfig, dpo_loss, run_dpo
from llmkern.finetune.base import save_finetuned
from llmkern.finetune.data import format_prompt
from llmkern.model import GPT, GPTConfig
from llmkern.train.inference import load_trained_model


def make_base(run_dir, seed=0, **overrides):
    """A tiny random byte-level GPT saved as a run folder that load_base reads."""
    model = make_base_model(seed, **overrides)
    save_finetuned(str(run_dir), 0, model.state_dict(), {"model_config": model.config.to_dict(), "tokenizer": "bytes"})
    return model


def make_base_model(seed=0, **overrides):
    """A tiny random byte-level GPT."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=257, block_size=256, n_layer=1, n_head=2, n_embd=32, backend="torch")
    return GPT(GPTConfig.from_preset("tiny", **{**settings, **overrides}))


def test_dpo_loss_hand_computed():
    pc, pr = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -2.0])
    rc, rr = torch.tensor([-11.0, -3.5]), torch.tensor([-11.5, -2.5])
    beta = 0.5
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta)
    # row 0: r_c = 1, r_r = -0.5 -> z = 0.75; row 1: r_c = 0.5, r_r = 0.5 -> z = 0
    expected = (math.log(1 + math.exp(-0.75)) + math.log(2.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.25])
    assert rejected.tolist() == pytest.approx([-0.25, 0.25])


def test_dpo_loss_is_log2_when_policy_is_reference():
    c, r = torch.randn(7) * 20, torch.randn(7) * 20
    for smoothing in (0.0, 0.2):
        loss, chosen, rejected = dpo_loss(c, r, c.clone(), r.clone(), beta=0.3, label_smoothing=smoothing)
        assert loss.item() == pytest.approx(math.log(2.0), rel=1e-6)
        assert torch.all(chosen == 0) and torch.all(rejected == 0)


def test_dpo_loss_label_smoothing_and_gradients():
    torch.manual_seed(1)
    pc, pr, rc, rr = (torch.randn(5, dtype=torch.float64) for _ in range(4))
    pc.requires_grad_(True)
    beta, eps = 0.2, 0.1
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    z = beta * ((pc - rc) - (pr - rr))
    expected = (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
    torch.testing.assert_close(loss, expected)
    assert not chosen.requires_grad and not rejected.requires_grad
    loss.backward()
    # d loss / d pc = beta / B * ((1 - eps) * (sigmoid(z) - 1) + eps * sigmoid(z))
    zd = z.detach()
    torch.testing.assert_close(pc.grad, beta / 5 * ((1 - eps) * (torch.sigmoid(zd) - 1) + eps * torch.sigmoid(zd)))


def test_dpo_loss_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(x, x, x, torch.zeros(4))
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        dpo_loss([0.0], x, x, x)
    x2 = torch.zeros(3, 2)  # all of one shape, but not 1-D: the message says which and why
    with pytest.raises(ValueError, match=r"1-D \(B,\); policy_chosen_logps has shape \(3, 2\)"):
        dpo_loss(x2, x2, x2, x2)


def random_logps(seed, n=9):
    """Four (n,) float64 log-prob vectors (policy chosen, policy rejected, reference chosen, reference rejected),
    spread so that beta * h lands on both sides of the hinge's kink."""
    generator = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=generator, dtype=torch.float64) * 8) for _ in range(4)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_each_loss_type_against_its_formula_in_float64(loss_type):
    # TRL's DPOTrainer definitions, h = (pc - rc) - (pr - rr): sigmoid -log sigmoid(beta h), IPO
    # (h - 1 / (2 beta))^2, SLiC's hinge relu(1 - beta h); the gradient of each written out by hand.
    pc, pr, rc, rr = random_logps(seed=11)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta, n = 0.7, pc.numel()
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
    h = ((pc - rc) - (pr - rr)).detach()
    if loss_type == "sigmoid":
        expected = torch.log1p(torch.exp(-beta * h)).mean()
        slope = -beta * torch.sigmoid(-beta * h)  # d loss_i / d h_i
    elif loss_type == "ipo":
        expected = ((h - 1 / (2 * beta)) ** 2).mean()
        slope = 2 * (h - 1 / (2 * beta))
    else:
        assert 0 < int((beta * h < 1).sum()) < n  # both sides of the kink
        expected = torch.clamp(1 - beta * h, min=0).mean()
        slope = torch.where(beta * h < 1, torch.full_like(h, -beta), torch.zeros_like(h))
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(chosen, beta * (pc - rc).detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(rejected, beta * (pr - rr).detach(), rtol=1e-12, atol=0)
    loss.backward()
    torch.testing.assert_close(pc.grad, slope / n, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(pr.grad, -slope / n, rtol=1e-10, atol=1e-14)


def test_simpo_loss_against_its_formula_in_float64():
    # SimPO: -log sigmoid(beta (c - r) - gamma) on the mean per-token log-probs, no reference; rewards beta * c.
    from llmkern.finetune.dpo import simpo_loss

    c, r, _, _ = random_logps(seed=12)
    c = (c / 4).requires_grad_(True)
    beta, gamma = 2.5, 0.8
    loss, chosen, rejected = simpo_loss(c, r / 4, beta=beta, gamma=gamma)
    margin = beta * (c.detach() - r / 4) - gamma
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-margin)).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(chosen, beta * c.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(rejected, beta * r / 4, rtol=1e-12, atol=0)
    loss.backward()
    torch.testing.assert_close(c.grad, -beta * torch.sigmoid(-margin) / c.numel(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo"])
def test_dpo_batch_loss_scores_ipo_and_simpo_by_the_mean_log_prob_per_response_token(loss_type):
    # IPO (as TRL's DPOTrainer does) and SimPO divide each response's summed log-prob, the policy's and the
    # reference's, by its length (its tokens and end-of-text); the others keep the sums. Responses of
    # different lengths, so that a sum passed for a mean (or the chosen length for the rejected) shows.
    from llmkern.data.tokenizer import get_tokenizer
    from llmkern.finetune.dpo import (
        chosen_rejected_logps,
        collate_pairs,
        dpo_batch_loss,
        encode_preference,
        simpo_loss,
    )

    tokenizer = get_tokenizer("bytes")
    examples = [{"instruction": "Say hi.", "input": "", "chosen": "Hello there, friend!", "rejected": "No."},
                {"instruction": "Name a colour.", "input": "", "chosen": "Red.", "rejected": "A big wooden table."}]
    encoded = [encode_preference(tokenizer, ex, 256) for ex in examples]
    for enc, ref in zip(encoded, ([-31.5, -12.25], [-9.0, -40.75])):
        enc["ref_chosen"], enc["ref_rejected"] = ref
    batch = collate_pairs(encoded, tokenizer.eot_token)
    policy = make_base_model(seed=4).eval()
    beta = 0.3
    with torch.no_grad():
        loss, metrics = dpo_batch_loss(policy, batch, beta=beta, loss_type=loss_type)
        chosen, rejected = (t.double() for t in chosen_rejected_logps(policy, batch))
    lengths = {side: torch.tensor([len(ex["chosen" if side == "chosen" else "rejected"].encode()) + 1
                                   for ex in examples], dtype=torch.float64) for side in ("chosen", "rejected")}
    ref_chosen = torch.tensor([enc["ref_chosen"] for enc in encoded], dtype=torch.float64)
    ref_rejected = torch.tensor([enc["ref_rejected"] for enc in encoded], dtype=torch.float64)
    if loss_type in ("ipo", "simpo"):
        chosen, rejected = chosen / lengths["chosen"], rejected / lengths["rejected"]
        ref_chosen, ref_rejected = ref_chosen / lengths["chosen"], ref_rejected / lengths["rejected"]
    if loss_type == "simpo":
        expected, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, beta=beta)
    else:
        expected, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta,
                                                              loss_type=loss_type)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["reward_margin"].item() == pytest.approx((chosen_rewards - rejected_rewards).mean().item(),
                                                            rel=1e-5, abs=1e-6)
    assert metrics["reward_accuracy"].item() == (chosen_rewards > rejected_rewards).double().mean().item()


def test_the_loss_types_refuse_settings_they_do_not_read():
    from llmkern.finetune.dpo import simpo_loss

    x = torch.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing=0.1 is defined for loss_type='sigmoid' alone"):
        dpo_loss(x, x, x, x, label_smoothing=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="simpo_loss"):  # SimPO has no reference log-probs to compare with
        dpo_loss(x, x, x, x, loss_type="simpo")
    with pytest.raises(ValueError, match="simpo_gamma"):
        simpo_loss(x, x, gamma=-0.1)
    with pytest.raises(ValueError, match="rejected"):
        simpo_loss(x, torch.zeros(4))
    base = {"data": "x.json"}
    with pytest.raises(ValueError, match="loss_type must be one of"):
        DPOConfig(**base, loss_type="IPO").validate()
    for loss_type in ("ipo", "hinge", "simpo"):
        with pytest.raises(ValueError, match="label_smoothing"):
            DPOConfig(**base, loss_type=loss_type, label_smoothing=0.1).validate()
    with pytest.raises(ValueError, match="simpo_gamma"):  # SimPO's margin, read by no other loss
        DPOConfig(**base, loss_type="ipo", simpo_gamma=1.0).validate()
    for gamma in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="simpo_gamma"):
            DPOConfig(**base, loss_type="simpo", simpo_gamma=gamma).validate()
    with pytest.raises(ValueError, match="reference='ref'"):  # SimPO is reference-free: a reference is never read
        DPOConfig(**base, loss_type="simpo", reference="ref").validate()
    DPOConfig(**base, loss_type="simpo", beta=2.0, simpo_gamma=1.5).validate()
    DPOConfig(**base, label_smoothing=0.1).validate()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.99])
def test_simpo_with_a_beta_below_1_warns_with_the_papers_range(beta):
    with pytest.warns(UserWarning, match=rf"loss_type='simpo' with beta={beta}: SimPO's paper uses beta 2-10"):
        DPOConfig(data="x.json", loss_type="simpo", beta=beta).validate()


@pytest.mark.parametrize("loss_type,beta", [("simpo", 1.0), ("simpo", 2.5), ("sigmoid", 0.1), ("ipo", 0.1),
                                            ("hinge", 0.1)])
def test_simpo_from_beta_1_and_the_other_loss_types_at_any_beta_do_not_warn(loss_type, beta):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DPOConfig(data="x.json", loss_type=loss_type, beta=beta).validate()


def test_the_simpo_beta_warning_comes_once_though_the_command_line_validates_twice():
    from llmkern.finetune.config import load_finetune_config

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's own: once per place a warning comes from
        config = load_finetune_config(DPOConfig, None, ["--data=x.json", "--loss_type=simpo"])
        config.validate()  # as run_dpo does again
    expected = ("loss_type='simpo' with beta=0.1: SimPO's paper uses beta 2-10 (e.g. --beta=2 --simpo_gamma=1); a "
                "beta below 1 (DPO's default 0.1) makes its rewards and gradients small, and training weak")
    assert [str(w.message) for w in seen if "SimPO's paper" in str(w.message)] == [expected]


def test_simpo_loads_and_scores_no_reference(tmp_path, monkeypatch):
    # The base alone is read (counted at load_base), and the reference is neither loaded nor scored; the same
    # count with the sigmoid loss and a reference folder reads two models.
    import llmkern.finetune.base
    from llmkern.finetune import dpo

    loads = []
    load_base = llmkern.finetune.base.load_base

    def counting_load_base(config, *args, **kwargs):
        loads.append(config.base)
        return load_base(config, *args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("SimPO loaded or scored a reference")

    monkeypatch.setattr(llmkern.finetune.base, "load_base", counting_load_base)
    make_base(tmp_path / "base")
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "chosen": str(i), "rejected": "No."}
                                for i in range(4)]))
    settings = {"base": str(tmp_path / "base"), "data": str(data), "max_steps": 1, "batch_size": 2, "max_len": 256,
                "val_fraction": 0.0, "device": "cpu", "progress": False}
    run_dpo(DPOConfig(**settings, out_dir=str(tmp_path / "dpo"), reference=str(tmp_path / "base")))
    assert loads == [str(tmp_path / "base")] * 2
    loads.clear()
    with monkeypatch.context() as patch:
        patch.setattr(dpo, "load_reference", never)
        patch.setattr(dpo, "add_reference_logps", never)
        summary = run_dpo(DPOConfig(**settings, out_dir=str(tmp_path / "simpo"), loss_type="simpo", beta=2.0))
    assert loads == [str(tmp_path / "base")] and summary["steps"] == 1


def _simpo_two_process_worker(rank, port, settings, record_dir):
    """run_dpo as one of two gloo processes (spawned), with the reference's loading and scoring made to fail;
    writes this rank's closing train evaluation to record_dir/rank<rank>.json."""
    import spawned

    from llmkern.finetune import dpo

    spawned.enter(rank, port)

    def never(*args, **kwargs):
        raise AssertionError(f"rank {rank}: SimPO loaded or scored a reference")

    dpo.load_reference, dpo.add_reference_logps = never, never
    summary = dpo.run_dpo(DPOConfig(**settings))
    with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as f:
        json.dump(summary["train_eval"], f)
    spawned.leave()


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_simpo_in_two_processes_scores_no_reference_and_learns_like_one(tmp_path, parallel):
    # SimPO skips the reference on every rank: under fsdp a rank that went into the sharded scoring alone would
    # wait there for the others. Two gloo processes of one micro-batch each compute what one process computes
    # with two accumulated.
    import spawned
    import torch.multiprocessing as mp

    make_base(tmp_path / "base")
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "input": "", "chosen": str(2 * i + 1),
                                 "rejected": str(2 * i)} for i in range(10)]))
    settings = {"base": str(tmp_path / "base"), "data": str(data), "max_steps": 3, "batch_size": 2, "lr": 3e-3,
                "min_lr": 3e-4, "warmup_steps": 1, "val_fraction": 0.2, "eval_interval": 0, "ckpt_interval": 0,
                "device": "cpu", "progress": False, "seed": 5, "loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.8}
    single = run_dpo(DPOConfig(**settings, out_dir=str(tmp_path / "single"), grad_accum=2))
    multi = dict(settings, out_dir=str(tmp_path / "multi"), grad_accum=1, parallel=parallel)
    mp.start_processes(_simpo_two_process_worker, args=(spawned.free_port(), multi, str(tmp_path)),
                       nprocs=spawned.WORLD, join=True, start_method="spawn")
    spawned.assert_same_run(tmp_path / "single", tmp_path / "multi")
    for rank in range(spawned.WORLD):
        train_eval = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert train_eval == pytest.approx(single["train_eval"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.5), ("hinge", 0.1), ("simpo", 2.0)])
def test_each_loss_type_trains_down_its_loss_and_up_its_reward_margin(tmp_path, loss_type, beta):
    # One batch of all the pairs, so that step 1's logged loss is the untrained policy's on the pairs that the
    # closing evaluation scores after training.
    from llmkern.train.metrics import read_metrics

    make_base(tmp_path / "base")
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "chosen": f"Yes {i}.", "rejected": "No!"}
                                for i in range(4)]))
    config = DPOConfig(base=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / "dpo"), max_steps=8,
                       batch_size=4, max_len=256, lr=1e-2, min_lr=1e-3, warmup_steps=1, val_fraction=0.0,
                       device="cpu", progress=False, loss_type=loss_type, beta=beta)
    summary = run_dpo(config)
    first = next(r for r in read_metrics(summary["metrics"]) if r["kind"] == "train" and r["step"] == 1)
    final = summary["train_eval"]
    assert final["train_loss"] < 0.8 * first["loss"], (first, final)
    assert final["train_reward_margin"] > first["reward_margin"] + 0.1, (first, final)
    assert final["train_reward_accuracy"] == 1.0


def test_chosen_rejected_logps_sum_each_response_alone_and_the_reference_stores_its_own():
    """The log-prob of a response is the sum over its tokens and its end-of-text, never the prompt's, read
    from the chosen half and the rejected half of the batch in that order; add_reference_logps stores the
    reference's (not the policy's). Each against the row scored alone by plain log-softmax."""
    from types import SimpleNamespace

    from llmkern.data.tokenizer import get_tokenizer
    from llmkern.finetune.dpo import add_reference_logps, chosen_rejected_logps, collate_pairs, encode_preference

    tokenizer = get_tokenizer("bytes")
    examples = [{"instruction": "Say hi.", "input": "", "chosen": "Hello there!", "rejected": "No."},
                {"instruction": "Name a colour, please.", "input": "", "chosen": "Red.", "rejected": "A table."}]
    encoded = [encode_preference(tokenizer, ex, 256) for ex in examples]
    policy, reference = make_base_model(seed=0).eval(), make_base_model(seed=1).eval()

    def response_logp(model, tokens, labels):
        row = torch.tensor([tokens])
        logp = torch.log_softmax(model(row[:, :-1])[0].double(), -1)[0]
        return sum(logp[t, labels[t + 1]].item() for t in range(len(tokens) - 1) if labels[t + 1] != -1)

    batch = collate_pairs(encoded, tokenizer.eot_token)
    with torch.no_grad():
        chosen, rejected = chosen_rejected_logps(policy, batch)
    add_reference_logps(reference, encoded, tokenizer.eot_token, SimpleNamespace(batch_size=1, progress=False,
                                                                                 dtype="float32"), "cpu")
    for i, (ex, enc) in enumerate(zip(examples, encoded)):
        prompt_len = len(tokenizer.encode(format_prompt(ex)))
        for side, got in (("chosen", chosen[i]), ("rejected", rejected[i])):
            tokens, labels = enc[side]
            assert len([x for x in labels if x != -1]) == len(tokens) - prompt_len == len(ex[side].encode()) + 1
            with torch.no_grad():
                expected = response_logp(policy, tokens, labels)
                expected_ref = response_logp(reference, tokens, labels)
            assert got.item() == pytest.approx(expected, rel=1e-5)
            assert enc[f"ref_{side}"] == pytest.approx(expected_ref, rel=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_the_reference_without_a_reference_folder_shares_the_policys_weights(preset):
    # It was a deepcopy: a second whole model on the device (under fsdp, on rank 0's host). The view scores as
    # the policy does, and freezing it or putting it in eval mode leaves the policy training.
    from llmkern.finetune.dpo import frozen_view

    torch.manual_seed(3)  # "tiny": GPT-2's blocks, its LM head tied; "tiny-llama": RoPE's tables, an untied head
    policy = GPT(GPTConfig.from_preset(preset, vocab_size=257, block_size=256, n_layer=1, n_head=2, n_embd=32,
                                       backend="torch")).train()
    view = frozen_view(policy)
    assert view is not policy and not view.training and policy.training
    for (name, param), (view_name, view_param) in zip(policy.named_parameters(), view.named_parameters(),
                                                      strict=True):
        assert view_name == name and view_param.data_ptr() == param.data_ptr(), name
        assert param.requires_grad and not view_param.requires_grad, name
    assert (view.lm_head.weight is view.wte.weight) == (policy.lm_head.weight is policy.wte.weight)
    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        expected = policy.eval()(ids)[0]
        torch.testing.assert_close(view(ids)[0], expected, rtol=0, atol=0)


def test_dpo_config_validation(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(data="x.json", beta=-1.0).validate()
    with pytest.raises(ValueError, match="beta"):  # inf * 0 = NaN: every step skipped, the base saved as the result
        DPOConfig(data="x.json", beta=math.inf).validate()
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*torch.zeros(4, 2), beta=math.inf)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(data="x.json", label_smoothing=0.7).validate()
    with pytest.raises(ValueError, match="data"):
        DPOConfig(base=str(tmp_path)).validate()
    # DPO evaluates on held-out pairs only: none held out, eval_interval is never read
    with pytest.warns(UserWarning, match="eval_interval=10 has no effect: val_fraction=0"):
        DPOConfig(data="x.json", val_fraction=0.0, eval_interval=10).validate()


def short_preference_examples(shared_data, count, max_len):
    """The first `count` real preference examples whose prompt and both responses fit in max_len bytes."""
    with open(os.path.join(shared_data, "instruction-data-with-preference.json"), encoding="utf-8") as f:
        examples = json.load(f)

    def length(ex):
        return len(format_prompt(ex).encode()) + max(len(ex["chosen"].encode()), len(ex["rejected"].encode()))

    return [ex for ex in examples if length(ex) < max_len][:count]


def test_dpo_run_raises_reward_accuracy(tmp_path, shared_data):
    examples = short_preference_examples(shared_data, 10, 256)
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(examples))
    make_base(tmp_path / "base")
    config = DPOConfig(base=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / "dpo"),
                       max_steps=20, batch_size=8, max_len=256, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                       val_fraction=0.2, eval_interval=0, beta=0.1, device="cpu", progress=False)
    summary = run_dpo(config)
    assert summary["train_examples"] == 8 and summary["val_examples"] == 2
    assert summary["method"] == "dpo" and summary["out_dir"] == config.out_dir  # every recipe's summary names them
    # At the start the policy is the reference: every reward is 0 and the loss is log 2.
    assert summary["first_eval"]["val_loss"] == pytest.approx(math.log(2.0), abs=1e-4)
    assert summary["first_eval"]["val_reward_accuracy"] == 0.0
    train_eval = summary["train_eval"]
    assert train_eval["train_reward_accuracy"] >= 0.875
    assert train_eval["train_reward_margin"] > 0.5
    assert train_eval["train_loss"] < 0.5
    assert os.path.isfile(summary["metrics"])
    records = [json.loads(line) for line in open(summary["metrics"], encoding="utf-8")]
    assert any("reward_margin" in r for r in records if r["kind"] == "train")
    # The saved policy is a plain GPT that the inference loader reads.
    model, tokenizer, _ = load_trained_model(str(tmp_path / "dpo"), "cpu")
    assert isinstance(model, GPT) and tokenizer.spec == "bytes"


def test_dpo_with_lora_and_reference_folder(tmp_path, shared_data):
    examples = short_preference_examples(shared_data, 4, 256)
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(examples))
    make_base(tmp_path / "base")
    config = DPOConfig(base=str(tmp_path / "base"), reference=str(tmp_path / "base"), data=str(data),
                       out_dir=str(tmp_path / "dpo"), max_steps=10, batch_size=4, max_len=256, lr=2e-2, min_lr=2e-3,
                       warmup_steps=2, val_fraction=0.0, lora_rank=4, device="cpu", progress=False)
    summary = run_dpo(config)
    assert summary["val_examples"] == 0 and summary["first_eval"] is None
    assert summary["train_eval"]["train_reward_accuracy"] >= 0.75
    assert summary["train_eval"]["train_reward_margin"] > 0
    model, _, _ = load_trained_model(str(tmp_path / "dpo"), "cpu")  # LoRA merged: a plain GPT
    base, _, _ = load_trained_model(str(tmp_path / "base"), "cpu")
    assert set(model.state_dict()) == set(base.state_dict())
    # The adapters file rebuilds the result on the base: base + B @ A * scale, merged.
    from llmkern.finetune.lora import apply_lora, load_lora_state_dict, merge_lora, read_lora_adapters

    adapters, info = read_lora_adapters(summary["lora"])
    apply_lora(base, info["rank"], info["alpha"], targets=info["modules"])
    load_lora_state_dict(base, adapters)
    merge_lora(base)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, base.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_dpo_skips_pairs_that_read_the_same(tmp_path):
    # A pair whose chosen and rejected tokens are the same (identical responses, or cut to max_len where they
    # still agree) has z = 0 whatever the policy: a constant log 2 in the loss and a 0 in reward accuracy.
    # Like the reward model, DPO skips it and counts it, instead of diluting the loss and the metrics.
    from llmkern.data.tokenizer import get_tokenizer
    from llmkern.finetune.dpo import encode_preference

    tokenizer = get_tokenizer("bytes")
    same = {"instruction": "Say hi.", "input": "", "chosen": "Hi.", "rejected": "Hi."}
    assert encode_preference(tokenizer, same, 256) is None
    late = {"instruction": "Say hi.", "input": "", "chosen": "Hi" + "!" * 300, "rejected": "Hi" + "!" * 299 + "?"}
    assert encode_preference(tokenizer, late, 256) is None  # they differ only after max_len
    assert encode_preference(tokenizer, {**same, "rejected": "Go away."}, 256) is not None

    data = tmp_path / "prefs.json"
    data.write_text(json.dumps([same, {**same, "rejected": "Go away."}, {**same, "chosen": "Hello!", "rejected": "No."}]))
    make_base(tmp_path / "base")
    config = DPOConfig(base=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / "dpo"), max_steps=1,
                       batch_size=2, max_len=256, val_fraction=0.0, device="cpu", progress=False)
    with pytest.warns(UserWarning, match="prefs.json: 1 of 3 examples dropped: .* read the same") as seen:
        summary = run_dpo(config)
    assert summary["train_examples"] == 2 and summary["skipped_examples"] == 1
    assert [w.filename for w in seen if "dropped" in str(w.message)] == [__file__]  # at the caller of run_dpo
    data.write_text(json.dumps([same, same]))
    with pytest.raises(ValueError, match="prefs.json"):
        run_dpo(DPOConfig(**{**config.to_dict(), "out_dir": str(tmp_path / "dpo2")}))


def test_a_dpo_resume_with_another_beta_label_smoothing_or_loss_type_is_refused(tmp_path):
    # The examples and batch settings alone let a resume continue under another loss: beta,
    # label_smoothing and loss_type are recorded with the training state and compared too.
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "chosen": str(i), "rejected": "No."}
                                for i in range(6)]))
    make_base(tmp_path / "base")
    config = DPOConfig(base=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / "dpo"), max_steps=2,
                       batch_size=2, max_len=256, val_fraction=0.0, ckpt_interval=1, keep_train_state=True,
                       device="cpu", progress=False)
    run_dpo(config)  # its state at step 1 is kept
    for change, message in (({"beta": 0.5}, r"'beta': \(0.1, 0.5\)"),
                            ({"label_smoothing": 0.2}, r"'label_smoothing': \(0.0, 0.2\)"),
                            ({"loss_type": "hinge"}, r"'loss_type': \('sigmoid', 'hinge'\)")):
        with pytest.raises(ValueError, match=message):
            run_dpo(DPOConfig(**{**config.to_dict(), "resume": True, **change}))
    # a state saved before loss_type was recorded trained the sigmoid loss, the only one there was: not another
    state_meta = next((tmp_path / "dpo" / "train_state").rglob("meta.json"))
    meta = json.loads(state_meta.read_text())
    assert meta["finetune_state"]["position"].pop("loss_type") == "sigmoid"
    state_meta.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'loss_type': \('sigmoid', 'ipo'\)"):
        run_dpo(DPOConfig(**{**config.to_dict(), "resume": True, "loss_type": "ipo"}))
    assert run_dpo(DPOConfig(**{**config.to_dict(), "resume": True}))["steps"] == 2


def test_a_reference_of_a_shorter_context_bounds_the_rows(tmp_path):
    make_base(tmp_path / "base", block_size=256)
    make_base(tmp_path / "ref", seed=1, block_size=200)
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps([{"instruction": "Say something kind about the weather today.", "input": "",
                                 "chosen": "It is a lovely day. " * 6, "rejected": "No."}] * 4))
    config = DPOConfig(base=str(tmp_path / "base"), reference=str(tmp_path / "ref"), data=str(data),
                       out_dir=str(tmp_path / "dpo"), max_steps=1, batch_size=4, max_len=256, val_fraction=0.0,
                       device="cpu", progress=False)
    assert run_dpo(config)["steps"] == 1  # its log-probs of rows longer than 200 tokens failed
