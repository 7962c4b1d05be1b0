"""Classification fine-tuning: last-real-token pooling, learning a separable task, save/load, bad data."""

import json
import random

import pytest
import torch

from llmkern.finetune import get_method
from llmkern.finetune.base import save_finetuned
from llmkern.finetune.classify import (
    ClassifyConfig,
    GPTClassifier,
    classify_texts,
    load_classification_data,
    load_classifier,
    run_classify,
)
from llmkern.model import GPT, GPTConfig


def tiny_gpt(block_size: int = 64) -> GPT:
    return GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                                     backend="torch"))


def make_base(path: str) -> str:
    model = tiny_gpt()
    save_finetuned(path, 0, model.state_dict(), {"model_config": model.config.to_dict(), "tokenizer": "bytes"})
    return path


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def separable_rows(n: int, seed: int) -> list[dict]:
    """Words of the letters a-e ("low") or v-z ("high"), of random lengths: every byte tells the class."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["low", "high"])
        letters = "abcde" if label == "low" else "vwxyz"
        rows.append({"text": "".join(rng.choice(letters) for _ in range(rng.randint(3, 14))), "label": label})
    return rows


def test_pooling_reads_each_rows_last_real_token():
    clf = GPTClassifier(tiny_gpt(), num_classes=3).eval()
    lengths = torch.tensor([5, 11, 1, 8])
    idx = torch.randint(0, 256, (4, 11))
    padded = idx.clone()
    for i, n in enumerate(lengths.tolist()):
        padded[i, n:] = 256  # right padding
    logits = clf(padded, lengths)
    assert logits.shape == (4, 3)
    for i, n in enumerate(lengths.tolist()):
        # Manual: the row alone, unpadded; the head on the hidden state of its last token.
        hidden = clf.body.hidden_states(idx[i : i + 1, :n])  # (1, n, C)
        expected = hidden[0, -1] @ clf.head.weight.T + clf.head.bias
        torch.testing.assert_close(logits[i], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clf(padded), clf(padded, torch.full((4,), 11)))  # no lengths: the last column
    with pytest.raises(ValueError, match="lengths"):
        clf(padded, torch.tensor([5, 12, 1, 8]))
    with pytest.raises(ValueError, match="lengths"):
        clf(padded, torch.tensor([5, 0, 1, 8]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        clf(padded, torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        GPTClassifier(tiny_gpt(), num_classes=1)


def test_learns_a_separable_task_and_round_trips(tmp_path):
    base = make_base(str(tmp_path / "base"))
    data = write_jsonl(tmp_path / "train.jsonl", separable_rows(96, seed=1))
    out = tmp_path / "clf"
    config = ClassifyConfig(base=base, data=data, out_dir=str(out), max_steps=40, batch_size=16, lr=3e-3,
                            min_lr=3e-4, warmup_steps=4, eval_interval=0, val_fraction=0.25, device="cpu",
                            progress=False).validate()
    summary = run_classify(config)
    assert summary["num_classes"] == 2 and summary["labels"] == ["high", "low"]
    assert summary["examples"] == {"train": 72, "val": 24}
    assert summary["val_accuracy"] >= 0.95, summary
    assert summary["train_accuracy"] >= 0.95, summary
    assert summary["val_loss"] < summary["val_loss_before"]

    clf, tok, meta = load_classifier(str(out), device="cpu")
    assert meta["classifier"]["labels"] == ["high", "low"]
    fresh = separable_rows(40, seed=2)
    predicted = classify_texts(clf, tok, [r["text"] for r in fresh], batch_size=7)
    assert sum(p == r["label"] for p, r in zip(predicted, fresh)) >= 36

    # Saving and loading again gives identical logits.
    clf2, _, _ = load_classifier(str(out), device="cpu")
    idx = torch.randint(0, 256, (3, 10))
    lengths = torch.tensor([10, 4, 7])
    torch.testing.assert_close(clf(idx, lengths), clf2(idx, lengths), rtol=0, atol=0)


def test_freeze_body_and_lora_train_only_what_they_say(tmp_path):
    base = make_base(str(tmp_path / "base"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": r["text"], "label": int(r["label"] == "high")}
                                              for r in separable_rows(16, seed=3)])
    common = dict(base=base, data=data, max_steps=2, batch_size=8, lr=1e-3, eval_interval=0, val_fraction=0.0,
                  device="cpu", progress=False)
    frozen = run_classify(ClassifyConfig(out_dir=str(tmp_path / "frozen"), freeze_body=True, **common))
    block = 2 * 32 + 2 * 32 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)  # norms, attn, mlp
    assert frozen["trainable_params"] == block + 2 * 32 + (32 * 2 + 2)  # last block, final norm, head
    assert frozen["labels"] is None and frozen["num_classes"] == 2
    lora = run_classify(ClassifyConfig(out_dir=str(tmp_path / "lora"), lora_rank=2, lora_targets="qkv", **common))
    assert lora["trainable_params"] == 2 * (2 * 32 + 96 * 2) + (32 * 2 + 2)
    assert (tmp_path / "lora" / "lora.safetensors").is_file()
    clf, tok, _ = load_classifier(str(tmp_path / "lora"), device="cpu")
    assert all(p in (0, 1) for p in classify_texts(clf, tok, ["abc", "", "xyz"]))


@pytest.mark.parametrize("freeze_body,lora_rank", [(True, 2), (False, 2), (True, 0)])
def test_the_saved_run_rebuilds_the_trained_model_exactly(tmp_path, outputs_after_fit, freeze_body, lora_rank):
    """freeze_body + LoRA trains the last block in full beside the adapters, and LoRA alone trains the head:
    lora.safetensors held only the adapters, so the base plus it lost that work."""
    import llmkern.finetune.classify as classify
    from llmkern.finetune.lora import apply_lora, load_lora_state_dict, read_lora_adapters
    from llmkern.train.checkpoint import load_checkpoint

    base = make_base(str(tmp_path / "base"))
    data = write_jsonl(tmp_path / "d.jsonl", separable_rows(16, seed=4))
    idx, lengths = torch.randint(0, 256, (3, 10)), torch.tensor([10, 4, 7])
    trained = outputs_after_fit(classify, idx, lengths)
    out = tmp_path / "run"
    run_classify(ClassifyConfig(base=base, data=data, out_dir=str(out), freeze_body=freeze_body, lora_rank=lora_rank,
                                lora_targets="qkv" if lora_rank else "", max_steps=3, batch_size=8, lr=1e-2,
                                eval_interval=0, val_fraction=0.0, device="cpu", progress=False))
    clf, _, _ = load_classifier(str(out), device="cpu")
    with torch.no_grad():
        loaded = clf(idx, lengths)
    if not lora_rank:  # nothing merged: the checkpoint is the trained model itself
        torch.testing.assert_close(loaded, trained["out"], rtol=0, atol=0)
        return
    torch.testing.assert_close(loaded, trained["out"], rtol=1e-4, atol=1e-5)  # merged: up to rounding
    tensors, info = read_lora_adapters(str(out / "lora.safetensors"))
    gpt = tiny_gpt()
    gpt.load_state_dict(load_checkpoint(base).model)
    rebuilt = GPTClassifier(gpt, num_classes=2).eval()
    apply_lora(rebuilt, info["rank"], info["alpha"], targets=info["modules"])
    load_lora_state_dict(rebuilt, tensors)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(idx, lengths), trained["out"], rtol=0, atol=0)
    assert {"head.weight", "head.bias"} <= set(tensors)
    assert ("body.blocks.1.attn.qkv.weight" in tensors) == freeze_body  # trained in full beside its adapters


def test_bad_data_names_file_and_line(tmp_path):
    good = {"text": "a", "label": 0}
    path = write_jsonl(tmp_path / "missing.jsonl", [good, {"text": "b", "label": 1}, {"text": "c"}])
    with pytest.raises(ValueError, match=r"missing\.jsonl:3: has no 'label'"):
        load_classification_data(path)
    (tmp_path / "blank.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps({"label": 1}) + "\n")
    with pytest.raises(ValueError, match=r"blank\.jsonl:3: needs a string 'text'"):
        load_classification_data(str(tmp_path / "blank.jsonl"))
    path = write_jsonl(tmp_path / "range.jsonl", [good, {"text": "b", "label": 1}, {"text": "c", "label": 5}])
    with pytest.raises(ValueError, match=r"range\.jsonl:3: label 5 is out of range"):
        load_classification_data(path, num_classes=2)
    path = write_jsonl(tmp_path / "neg.jsonl", [good, {"text": "b", "label": -1}])
    with pytest.raises(ValueError, match=r"neg\.jsonl:2: label -1 is out of range"):
        load_classification_data(path)
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, {"text": "b", "label": "x"}])
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: .*mixes strings and integers"):
        load_classification_data(path)
    (tmp_path / "list.json").write_text(json.dumps([good, {"text": "b", "label": 1.5}]))
    with pytest.raises(ValueError, match=r"list\.json: example 1: label 1.5"):
        load_classification_data(str(tmp_path / "list.json"))
    path = write_jsonl(tmp_path / "keys.jsonl", [{"review": "a", "stars": "good"}, {"review": "b", "stars": "bad"}])
    rows, names, k = load_classification_data(path, text_key="review", label_key="stars")
    assert rows == [("a", 1), ("b", 0)] and names == ["bad", "good"] and k == 2
    rows, names, k = load_classification_data(path, text_key="review", label_key="stars", num_classes=3)
    assert k == 3 and len(names) == 3
    # run_classify reports the same error before loading any model.
    with pytest.raises(ValueError, match=r"range\.jsonl:3"):
        run_classify(ClassifyConfig(base="unused", data=str(tmp_path / "range.jsonl"), num_classes=2,
                                    out_dir=str(tmp_path / "o")))


def test_registered_and_settings_checked(tmp_path):
    assert get_method("classify") == (ClassifyConfig, run_classify)
    with pytest.raises(ValueError, match="num_classes"):
        ClassifyConfig(num_classes=1).validate()
    with pytest.raises(ValueError, match="text_key and label_key must name two keys"):  # each text its own class
        ClassifyConfig(text_key="review", label_key="review").validate()
    with pytest.raises(ValueError, match="not a classifier"):
        load_classifier(make_base(str(tmp_path / "plain")))


def test_the_prompt_template_is_not_read_by_classify(tmp_path):
    """classify reads each text as it is: --template/--system_prompt were silently ignored."""
    import warnings

    from llmkern.finetune import load_finetune_config
    from llmkern.finetune.sft import SFTConfig

    with pytest.raises(ValueError, match="'template' on the command line has no effect"):
        load_finetune_config(ClassifyConfig, None, ["--template=chatml"])
    with pytest.raises(ValueError, match="'system_prompt' on the command line has no effect"):
        load_finetune_config(ClassifyConfig, None, ["--system_prompt=Be brief."])
    common = tmp_path / "common.toml"  # a file of common settings that SFT and classify runs share
    common.write_text('template = "chatml"\nlr = 1e-4\n')
    with pytest.warns(UserWarning, match="template='chatml' has no effect"):
        assert load_finetune_config(ClassifyConfig, str(common)).lr == 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_finetune_config(SFTConfig, str(common)).template == "chatml"
        ClassifyConfig(max_len=1).validate()  # one token is a text the head can read
