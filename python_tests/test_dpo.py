"""DPO: the loss against hand computations and its known properties, and a short real run."""

import json
import math
import os

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


def test_a_dpo_resume_with_another_beta_or_label_smoothing_is_refused(tmp_path):
    # The examples and batch settings alone let a resume continue under another loss: beta and
    # label_smoothing are recorded with the training state and compared too.
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "chosen": str(i), "rejected": "No."}
                                for i in range(6)]))
    make_base(tmp_path / "base")
    config = DPOConfig(base=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / "dpo"), max_steps=2,
                       batch_size=2, max_len=256, val_fraction=0.0, ckpt_interval=1, keep_train_state=True,
                       device="cpu", progress=False)
    run_dpo(config)  # its state at step 1 is kept
    for change, message in (({"beta": 0.5}, r"'beta': \(0.1, 0.5\)"),
                            ({"label_smoothing": 0.2}, r"'label_smoothing': \(0.0, 0.2\)")):
        with pytest.raises(ValueError, match=message):
            run_dpo(DPOConfig(**{**config.to_dict(), "resume": True, **change}))
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
