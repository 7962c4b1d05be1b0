"""Few-shot draws, metric lists and standard errors as lm-evaluation-harness v0.4 makes them.

The expected shots are drawn here as the harness's code draws them (lm_eval/api/samplers.py
ContextSampler.get_context, one random.Random(fewshot_random_seed=1234) per task, set by task.set_fewshot_seed):
for each test doc in turn, k + 1 docs sampled where `config.fewshot_split == config.test_split` (both None in
hellaswag.yaml, which names no test split) or k (arc_easy.yaml names test_split: test), the doc itself dropped,
the first k kept; each written doc_to_text + target_delimiter " " + the right choice + fewshot_delimiter "\\n\\n".
The metric lists are the tasks' yaml metric_list; the standard errors lm_eval/api/metrics.py mean_stderr.
"""

import json
import math
import random

import pytest
import torch

from llmkern.data.tokenizer import get_tokenizer
from llmkern.eval.harness import harness_shots, mean_stderr
from llmkern.eval.multiple_choice import (
    ChoiceExample,
    evaluate_choices,
    load_choice_tasks,
    with_fewshot,
)
from llmkern.model import GPT, GPTConfig

BYTES = get_tokenizer("bytes")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_gpt(block_size=1024):
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_size=257, block_size=block_size, n_layer=1, n_head=2, n_embd=32,
                                   backend="torch")
    return GPT(config).eval()


def harness_contexts(docs, fewshot_docs, k, same_split, doc_to_text, doc_to_target):
    """Each doc's context as the harness writes it: its k shots, then its own doc_to_text."""
    rnd = random.Random(1234)
    contexts = []
    for doc in docs:
        fewshotex = rnd.sample(fewshot_docs, k + 1 if same_split else k)
        selected = [x for x in fewshotex if x != doc][:k]
        shots = "".join(doc_to_text(d) + " " + doc_to_target(d) + "\n\n" for d in selected)
        contexts.append(shots + doc_to_text(doc))
    return contexts


def arc_row(i):
    return {"id": f"Mercury_{i}", "question": f"Which planet is number {i}?",
            "choices": {"text": [f"planet {i}", f"moon {i}", "a comet"], "label": ["A", "B", "C"]},
            "answerKey": "ABC"[i % 3]}


def arc_text(doc):
    return f"Question: {doc['question']}\nAnswer:"  # arc_easy.yaml doc_to_text


def arc_target(doc):
    return doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])]  # doc_to_choice[doc_to_target]


def hellaswag_row(i):
    return {"ind": i, "activity_label": "Cooking", "ctx_a": f"A cook cuts {i} onions.", "ctx_b": "she",
            "ctx": "unused", "split": "train", "split_type": "indomain", "source_id": f"activitynet~{i}",
            "endings": [f"fries them {i} times.", "sings.", "leaves the room.", "waves."], "label": str(i % 4)}


def hellaswag_text(doc):
    return f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}"  # query, no tags to clean here


def hellaswag_target(doc):
    return doc["endings"][int(doc["label"])]


def contexts_scored(tmp_path, test_rows, train_rows, k):
    """(the model, evaluate_choices' result with k shots from the train file, the test file's examples)."""
    model = tiny_gpt()
    test, train = write_jsonl(tmp_path / "test.jsonl", test_rows), write_jsonl(tmp_path / "train.jsonl", train_rows)
    shot = evaluate_choices(model, BYTES, test, fewshot=k, fewshot_data=train, return_predictions=True)
    return model, shot, load_choice_tasks(test)


@pytest.mark.parametrize("task, same_split", [("arc", False), ("hellaswag", True)])
def test_shots_from_the_training_split_are_the_harness_draw(tmp_path, task, same_split):
    row, text, target = {"arc": (arc_row, arc_text, arc_target),
                         "hellaswag": (hellaswag_row, hellaswag_text, hellaswag_target)}[task]
    train_rows, test_rows = [row(i) for i in range(7)], [row(i) for i in range(100, 105)]
    expected = harness_contexts(test_rows, train_rows, 3, same_split, text, target)
    model, shot, tests = contexts_scored(tmp_path, test_rows, train_rows, 3)
    by_hand = [ChoiceExample(context, ex.choices, ex.answer) for context, ex in zip(expected, tests)]
    assert shot["predictions"] == evaluate_choices(model, BYTES, by_hand, return_predictions=True)["predictions"]
    # The other rule (k + 1 for ARC, k for HellaSwag) draws other shots from the second example on: the check
    # above tells them apart.
    other = harness_contexts(test_rows, train_rows, 3, not same_split, text, target)
    assert other[0] == expected[0] and other[1:] != expected[1:]


def test_harness_shots_draw_k_or_k_plus_one_and_drop_the_example():
    pool = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(9)]
    examples = [pool[4], {"question": "new", "answer": "#### 0"}, pool[0], pool[8]]
    for one_more in (False, True):
        rnd = random.Random(1234)
        expected = [[x for x in rnd.sample(pool, 3 + one_more) if x != ex][:3] for ex in examples]
        assert harness_shots(examples, pool, 3, one_more=one_more) == expected
    same_split = harness_shots(pool, pool, 3, one_more=True)
    assert all(len(shots) == 3 and ex not in shots for ex, shots in zip(pool, same_split))
    with pytest.raises(ValueError, match="fewshot=8 needs 9 solved examples to draw from; the few-shot data has 8"):
        harness_shots(pool, pool[:8], 8, one_more=True)


def test_shots_from_the_task_itself_are_drawn_with_the_harness_seed():
    # Without a separate file the shots come from the split scored (as the harness takes TruthfulQA's, which has
    # no other): k + 1 drawn with random.Random(1234), the example dropped.
    pool = [ChoiceExample(f"Question {i}?\nAnswer:", [f"yes {i}", "no"], i % 2) for i in range(6)]
    rnd = random.Random(1234)
    for ex, shot in zip(pool, with_fewshot(pool, pool, 2)):
        drawn = [x for x in rnd.sample(pool, 3) if x != ex][:2]
        assert shot.context == "".join(f"{d.context} {d.choices[d.answer]}\n\n" for d in drawn) + ex.context


BOOLQ = {"passage": "Water is wet.", "question": "is water wet", "idx": 0, "label": 1}
COPA = {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause",
        "idx": 0, "label": 0}
TRUTHFULQA_MC1 = {"question": "Is the sky blue?", "mc1_targets": {"choices": ["Yes.", "No."], "labels": [1, 0]}}
MMLU = {"question": "What is 2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"],
        "answer": 1}
PIQA = {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}
SCIQ = {"question": "What is H2O?", "distractor1": "salt", "distractor2": "sand", "distractor3": "air",
        "correct_answer": "water", "support": "Water is H2O."}
OPENBOOKQA = {"id": "7-1", "question_stem": "The sun is", "choices": {"text": ["hot", "cold"], "label": ["A", "B"]},
              "answerKey": "A"}


@pytest.mark.parametrize("row, metrics", [
    # super_glue/boolq/default.yaml, super_glue/copa/default.yaml, truthfulqa_mc1.yaml,
    # mmlu/default/_default_template_yaml: metric_list acc
    (BOOLQ, {"accuracy"}), (COPA, {"accuracy"}), (TRUTHFULQA_MC1, {"accuracy"}), (MMLU, {"accuracy"}),
    # hellaswag.yaml, arc_easy.yaml, piqa.yaml, sciq.yaml, openbookqa.yaml: acc and acc_norm
    (hellaswag_row(0), {"accuracy", "acc_norm"}), (arc_row(0), {"accuracy", "acc_norm"}),
    (PIQA, {"accuracy", "acc_norm"}), (SCIQ, {"accuracy", "acc_norm"}), (OPENBOOKQA, {"accuracy", "acc_norm"}),
])
def test_each_task_reports_the_harness_metrics_with_their_standard_errors(tmp_path, row, metrics):
    path = write_jsonl(tmp_path / "task.jsonl", [row, row, row])
    result = evaluate_choices(tiny_gpt(), BYTES, path, return_predictions=True)
    stderrs = {f"{name}_stderr" for name in metrics}
    assert set(result) == metrics | stderrs | {"examples", "fewshot", "predictions"}
    right = [float(p["pred"] == p["answer"]) for p in result["predictions"]]
    assert result["accuracy_stderr"] == pytest.approx(mean_stderr(right), abs=0)


def test_mean_stderr_is_the_sample_deviation_over_root_n():
    # lm_eval/api/metrics.py: sample_stddev (n - 1) / sqrt(n); 3 of 5 right: variance 0.3, stderr sqrt(0.3 / 5)
    assert mean_stderr([1.0, 0.0, 1.0, 1.0, 0.0]) == pytest.approx(math.sqrt(0.06))
    assert mean_stderr([0.25, 0.75]) == pytest.approx(0.25)  # variance 0.125 over 2, root
    assert mean_stderr([1.0, 1.0, 1.0]) == 0.0
    assert mean_stderr([1.0]) is None  # the harness's "N/A" for a single item
    with pytest.raises(ValueError, match="scores is empty"):
        mean_stderr([])


def test_accuracy_stderr_is_reported_on_fresh_outcomes():
    # Random answers to a random model: the standard error follows whatever outcomes came.
    generator = torch.Generator().manual_seed(5)
    examples = [ChoiceExample(f"q{i}", ["ab", "cd", "ef"], int(torch.randint(3, (1,), generator=generator)))
                for i in range(12)]
    result = evaluate_choices(tiny_gpt(), BYTES, examples, return_predictions=True)
    right = [p["pred"] == p["answer"] for p in result["predictions"]]
    p, n = sum(right) / len(right), len(right)
    assert result["accuracy"] == pytest.approx(p)
    assert result["accuracy_stderr"] == pytest.approx(math.sqrt(p * (1 - p) * n / (n - 1) / n))


def test_first_shots_from_a_file_holding_the_example_leave_it_out(tmp_path):
    # The harness drops a shot equal to the doc (`x != doc`); the few-shot file is read apart from the task, so
    # its copy of an example is another object, equal to it: it must not be the example's own shot (its answer).
    rows = [{"context": f"Question {i}?\nAnswer:", "choices": [f"yes {i}", f"no {i}"], "answer": i % 2}
            for i in range(4)]
    path = write_jsonl(tmp_path / "task.jsonl", rows)
    model = tiny_gpt()
    shot = evaluate_choices(model, BYTES, path, fewshot=2, fewshot_data=path, return_predictions=True)
    tests = load_choice_tasks(path)
    by_hand = []
    for ex in tests:
        others = [s for s in tests if s.context != ex.context][:2]
        prefix = "".join(f"{s.context} {s.choices[s.answer]}\n\n" for s in others)
        by_hand.append(ChoiceExample(prefix + ex.context, ex.choices, ex.answer))
    assert shot["predictions"] == evaluate_choices(model, BYTES, by_hand, return_predictions=True)["predictions"]
    assert with_fewshot(tests, load_choice_tasks(path), 2, first=True)[0].context == by_hand[0].context
