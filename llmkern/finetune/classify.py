"""Text classification by fine-tuning a GPT: a linear head on the hidden state of each text's last token.

    llmkern finetune classify --base=runs/main --data=reviews.jsonl --out_dir=runs/clf [--freeze_body=true]

Data: a .jsonl file (one object per line) or a .json list of objects, each with a text and a label
(keys text_key and label_key). Labels are integers 0..num_classes-1, or strings, which are mapped to
ids in sorted order (the names are saved with the model and classify_texts returns them).

The run folder's checkpoint is the trained classifier, LoRA merged into the weights (load_classifier). With
LoRA, out_dir/lora.safetensors also holds every parameter that trained (adapters, head, and under
freeze_body the last block and final norm) under the classifier's names, so the trained model comes back
exactly, unmerged, from the base:  clf = GPTClassifier(base_gpt, num_classes);
apply_lora(clf, info["rank"], info["alpha"], targets=info["modules"]); load_lora_state_dict(clf, tensors)
with (tensors, info) = read_lora_adapters(path).

The head and its pooling are finetune.heads.LastTokenHead's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F

from .._modes import eval_mode
from ..data.sequences import encode_prompt
from ..model import GPT, GPTConfig
from ..train import checkpoint as ckpt
from ..train.inference import resolve_device
from .aux_loss import with_aux_loss
from .base import effective_max_len, load_base, save_finetuned
from .config import FinetuneConfig
from .data import pad_batch, read_examples, split_examples
from .heads import LastTokenHead
from .lora import apply_lora_from_config, check_lora_targets, lora_info, save_and_merge_lora, trainable_parameters
from .loop import check_run_folder, drop_train_state, fit, to_device

EVAL_TRAIN_EXAMPLES = 512  # train loss/accuracy are measured on this many training examples


class GPTClassifier(LastTokenHead):
    """A GPT body and a linear head (n_embd -> num_classes) on each row's last real token.

    labels: the class names (index = class id), or None for integer labels.
    max_len: classify_texts cuts texts to their first max_len tokens (None: the model's block_size).
    """

    def __init__(self, gpt: GPT, num_classes: int, labels: Sequence[Any] | None = None, max_len: int | None = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"labels must name the {num_classes} classes, got {len(labels)} names")
        # a max_len below 1 would cut texts to ids[:max_len]: 0 to nothing, -3 to all but their last 3 tokens
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)):
            raise TypeError(f"max_len must be None (the model's block_size) or an int, got {max_len!r}")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be None (the model's block_size) or >= 1, got {max_len}")
        super().__init__(gpt, num_classes, init_std=0.02)
        self.num_classes = num_classes
        self.labels = list(labels) if labels is not None else None
        self.max_len = min(max_len or gpt.config.block_size, gpt.config.block_size)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) right-padded token ids, lengths (B,) real tokens per row (None: all T) -> logits (B, K)."""
        return self.head_outputs(idx, lengths)


# --- settings and data --------------------------------------------------------------------------------

@dataclass
class ClassifyConfig(FinetuneConfig):
    """FinetuneConfig plus what classification adds."""

    out_dir: str = "runs/classify"
    num_classes: int = 0  # 0: as many as the data has (the largest integer label + 1, or the distinct strings)
    text_key: str = "text"
    label_key: str = "label"
    freeze_body: bool = False  # train only the head, the last block and the final norm

    # a classifier reads its texts as they are: no prompt template
    UNREAD: ClassVar[dict[str, str]] = {
        name: "classify reads each text as it is, in no prompt template" for name in ("template", "system_prompt")}
    MIN_MAX_LEN: ClassVar[int] = 1  # one token is a text the head can read

    def validate(self) -> "ClassifyConfig":
        super().validate()
        if self.num_classes < 0 or self.num_classes == 1:
            raise ValueError(f"num_classes must be 0 (from the data) or >= 2, got {self.num_classes}")
        if not self.text_key or not self.label_key:
            raise ValueError("text_key and label_key must not be empty")
        if self.text_key == self.label_key:  # every text would be its own class
            raise ValueError(f"text_key and label_key must name two keys, got {self.text_key!r} for both")
        return self


def _rows_with_places(path: str) -> list[tuple[str, Any]]:
    """(place, object) of each example: "file:line" for .jsonl, "file: example i" for a .json list."""
    path = os.fspath(path)
    if not path.endswith(".jsonl"):
        return [(f"{path}: example {i}", row) for i, row in enumerate(read_examples(path))]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{line_no}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON: {e}") from e
    return rows


def load_classification_data(path: str, text_key: str = "text", label_key: str = "label",
                             num_classes: int = 0) -> tuple[list[tuple[str, int]], list[Any] | None, int]:
    """([(text, class id)], class names or None for integer labels, num_classes) of a data file.

    Every problem is a ValueError naming the file and line (or example index): not an object, a missing
    or non-string text, a missing label, a label that is neither an int nor a string, mixed label kinds,
    an integer label outside [0, num_classes), more distinct string labels than num_classes.
    """
    rows = _rows_with_places(path)
    if not rows:
        raise ValueError(f"{path}: no examples")
    texts, raw = [], []
    for place, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{place}: expected a JSON object, got {type(row).__name__}")
        if not isinstance(row.get(text_key), str):
            raise ValueError(f"{place}: needs a string {text_key!r}; it has keys {sorted(row)}")
        if label_key not in row:
            raise ValueError(f"{place}: has no {label_key!r}; it has keys {sorted(row)}")
        label = row[label_key]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise ValueError(f"{place}: label {label!r} must be an integer or a string")
        if raw and isinstance(label, str) != isinstance(raw[0][1], str):
            raise ValueError(f"{place}: label {label!r} mixes strings and integers (the first label was "
                             f"{raw[0][1]!r} at {raw[0][0]})")
        texts.append(row[text_key])
        raw.append((place, label))

    if isinstance(raw[0][1], str):
        names = sorted({label for _, label in raw})
        if num_classes and len(names) > num_classes:
            raise ValueError(f"{path}: {len(names)} distinct labels {names[:20]} but num_classes={num_classes}")
        num_classes = num_classes or len(names)
        if num_classes < 2:
            raise ValueError(f"{path}: every example has the label {names[0]!r}; classification needs two or more")
        names += [f"unused_{i}" for i in range(len(names), num_classes)]
        ids = {name: i for i, name in enumerate(names)}
        return [(text, ids[label]) for text, (_, label) in zip(texts, raw)], names, num_classes

    limit = num_classes or max(label for _, label in raw) + 1
    for place, label in raw:
        if not 0 <= label < limit:
            raise ValueError(f"{place}: label {label} is out of range: labels are 0..{limit - 1}"
                             + ("" if num_classes else " (negative labels are not allowed)"))
    if limit < 2:
        raise ValueError(f"{path}: every label is 0; classification needs two or more classes")
    return [(text, label) for text, (_, label) in zip(texts, raw)], None, limit


def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each text (after the tokenizer's begin-of-sequence token where it has one), cut to its
    first max_len tokens; an empty text is the begin-of-sequence token, or one end-of-text token without one."""
    return [encode_prompt(tokenizer, t)[:max_len] for t in texts]


def collate_rows(rows: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """{"idx": (B, T) right-padded ids, "lengths": (B,), "labels": (B,)}."""
    return {"idx": pad_batch([ids for ids, _ in rows], pad_id),
            "lengths": torch.tensor([len(ids) for ids, _ in rows], dtype=torch.long),
            "labels": torch.tensor([label for _, label in rows], dtype=torch.long)}


def classification_loss(model: GPTClassifier, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The cross-entropy of a collate_rows batch and its accuracy; a mixture-of-experts body in training mode adds
    its load-balancing loss (finetune.aux_loss: transformers' sequence classifiers leave it out, a fine-tuning
    here does not, so that the routers stay balanced under any recipe)."""
    logits, aux = model.head_outputs_with_aux_loss(batch["idx"], batch["lengths"])
    logits = logits.float()  # (B, K)
    loss, aux_metrics = with_aux_loss(F.cross_entropy(logits, batch["labels"]), aux, model.body.config)
    accuracy = (logits.argmax(dim=-1) == batch["labels"]).float().mean()
    return loss, {"accuracy": accuracy.detach(), **aux_metrics}


@torch.no_grad()
def evaluate_rows(model: GPTClassifier, rows: Sequence[tuple[list[int], int]], pad_id: int,
                  batch_size: int) -> dict[str, float]:
    """Mean loss and accuracy over all rows (each example weighs the same)."""
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = to_device(collate_rows(rows[start : start + batch_size], pad_id), device)
        logits = model(batch["idx"], batch["lengths"]).float()
        loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    return {"loss": loss_sum / len(rows), "accuracy": correct / len(rows)}


def _choose_trainable(clf: GPTClassifier, config: ClassifyConfig) -> list[str]:
    """Freeze what config says; the wrapped LoRA modules ([] without LoRA).

    LoRA: the body's adapters train, the rest of the body is frozen. freeze_body: the body is frozen
    but for its last block and final norm (in full, beside any adapters). The head always trains.
    """
    gpt = clf.body
    wrapped = apply_lora_from_config(gpt, config)
    if config.freeze_body:
        if not wrapped:
            gpt.requires_grad_(False)
        gpt.blocks[-1].requires_grad_(True)
        gpt.norm_f.requires_grad_(True)
    if gpt.lm_head.weight is not gpt.wte.weight:
        gpt.lm_head.weight.requires_grad_(False)  # an untied LM head plays no part in classifying
    clf.head.requires_grad_(True)
    return wrapped


# --- the recipe ---------------------------------------------------------------------------------------

def run_classify(config: ClassifyConfig) -> dict[str, Any]:
    """Fine-tune config.base as a classifier of config.data; save it to config.out_dir.

    Returns {"out_dir", "checkpoint", "steps", "num_classes", "labels", "train_loss/accuracy",
    "val_loss/accuracy" (after training) and their values before, "trainable_params", ...}. The train
    metrics are measured on the first EVAL_TRAIN_EXAMPLES training examples.
    """
    if not isinstance(config, ClassifyConfig):
        raise TypeError(f"config must be a ClassifyConfig, got {type(config).__name__}")
    config.validate()
    torch.manual_seed(config.seed)
    examples, names, num_classes = load_classification_data(config.data, config.text_key, config.label_key,
                                                            config.num_classes)
    check_run_folder(config)  # before the base is loaded
    # under fsdp only rank 0 holds the whole model: after fit it alone saves the classifier
    gpt, tokenizer, base_meta = load_base(config, language_model=False, whole_on_rank_0=True)
    check_lora_targets(gpt, config)  # before the texts are encoded; the adapters come after
    max_len = effective_max_len(config, gpt)
    pad_id = tokenizer.eot_token  # any id: padding is on the right, after the token the head reads
    train_examples, val_examples = split_examples(examples, config.val_fraction, config.seed)
    train = list(zip(encode_texts(tokenizer, [t for t, _ in train_examples], max_len), [y for _, y in train_examples]))
    val = list(zip(encode_texts(tokenizer, [t for t, _ in val_examples], max_len), [y for _, y in val_examples]))
    train_probe = train[:EVAL_TRAIN_EXAMPLES]

    clf = GPTClassifier(gpt, num_classes, names, max_len).train()
    wrapped = _choose_trainable(clf, config)
    trainable = trainable_parameters(clf)

    def evaluate(model) -> dict[str, float]:
        metrics = {f"train_{k}": v for k, v in evaluate_rows(model, train_probe, pad_id, config.batch_size).items()}
        if val:
            metrics.update({f"val_{k}": v for k, v in evaluate_rows(model, val, pad_id, config.batch_size).items()})
        return metrics

    # each micro-batch weighs its rows: an epoch's short last batch counts each of its rows once in a step, as
    # the full batches do
    result = fit(clf, classification_loss, train, lambda rows: collate_rows(rows, pad_id), config, evaluate=evaluate,
                 charts=("accuracy",), settings={"freeze_body": config.freeze_body,  # it decides what trains
                                              "base_sha256": base_meta["base_sha256"]},
                 weigh=lambda batch: batch["labels"].numel())

    # The whole classifier, not its body alone: beside the adapters, the head (and under freeze_body the last
    # block and final norm) trained too, and the file must hold them all to rebuild the trained model.
    wrapped = [f"body.{name}" for name in wrapped]
    lora_path = save_and_merge_lora(clf, config, wrapped)
    meta = {"model_config": gpt.config.to_dict(), "tokenizer": tokenizer.spec,
            "classifier": {"num_classes": num_classes, "labels": names, "max_len": max_len,
                           "text_key": config.text_key, "label_key": config.label_key},
            "finetune": {"method": "classify", "settings": config.to_dict(), "base": config.base,
                         "base_step": base_meta.get("step"), "lora": lora_info(config, wrapped) if wrapped else None}}
    checkpoint = save_finetuned(config.out_dir, result["steps"], clf.state_for_saving(), meta)
    drop_train_state(config)

    first, last = result["first_eval"] or {}, result["last_eval"]  # first: lost with the log of a resumed run
    summary = {"method": "classify", "out_dir": config.out_dir, "checkpoint": checkpoint, "steps": result["steps"],
               "skipped_steps": result["skipped_steps"], "seconds": round(result["seconds"], 2),
               "num_classes": num_classes, "labels": names,
               "examples": {"train": len(train), "val": len(val)},
               "trainable_params": trainable, "total_params": sum(p.numel() for p in clf.parameters()),
               "lora": lora_path, "metrics": result["metrics"]}
    for key in last:
        summary[key] = last[key]
        summary[f"{key}_before"] = first.get(key)
    return summary


# --- using a trained classifier -----------------------------------------------------------------------

def load_classifier(run_dir: str, device: str | torch.device = "auto"):
    """(GPTClassifier in eval mode, tokenizer, meta) from a run folder (or checkpoint folder) of run_classify."""
    from ..data.tokenizer import get_tokenizer

    state = ckpt.load_model_checkpoint(run_dir)
    info = state.meta.get("classifier")
    if not isinstance(info, dict) or "model_config" not in state.meta:
        raise ValueError(f"checkpoint {state.path!r} is not a classifier (no 'classifier' meta): "
                         f"it was not written by llmkern finetune classify")
    gpt = GPT(GPTConfig.from_dict(state.meta["model_config"]))
    clf = GPTClassifier(gpt, int(info["num_classes"]), info.get("labels"), info.get("max_len"))
    clf.load_saved_state(state.model)
    clf.to(resolve_device(device)).eval()
    return clf, get_tokenizer(state.meta["tokenizer"]), state.meta


@torch.no_grad()
def classify_texts(clf: GPTClassifier, tokenizer, texts: Sequence[str], batch_size: int = 32) -> list[Any]:
    """The predicted label of each text: its class name when the classifier has names, else the class id."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")
    # a batch_size below 1 would take no batch at all (range(0, n, -1) is empty): no prediction, silently
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not texts:
        return []
    encoded = encode_texts(tokenizer, texts, clf.max_len)
    device = next(clf.parameters()).device
    predictions: list[int] = []
    with eval_mode(clf):
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            idx = pad_batch(chunk, tokenizer.eot_token).to(device)
            lengths = torch.tensor([len(ids) for ids in chunk], dtype=torch.long, device=device)
            predictions += clf(idx, lengths).argmax(dim=-1).tolist()
    return [clf.labels[p] for p in predictions] if clf.labels is not None else predictions
