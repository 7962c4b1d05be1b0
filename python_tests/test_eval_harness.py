"""Few-shot draws, metric lists and standard errors as lm-evaluation-harness v0.4 makes them.

The expected shots are drawn here as the harness's code draws them (lm_eval/api/samplers.py
ContextSampler.get_context, one random.Random(fewshot_random_seed=1234) per task, set by task.set_fewshot_seed):
for each test doc in turn, k + 1 docs sampled where `config.fewshot_split == config.test_split` (both None in
hellaswag.yaml, which names no test split) or k (arc_easy.yaml names test_split: test), the doc itself dropped,
the first k kept; each written doc_to_text + target_delimiter " " + the right choice + fewshot_delimiter "\\n\\n".
The metric lists are the tasks' yaml metric_list; the standard errors lm_eval/api/metrics.py mean_stderr, its
pooled_sample_stderr for a group (MMLU) and its bootstrap_stderr for a perplexity.
"""

import json
import math
import random
import statistics

import numpy as np
import pytest
import torch

from llmkern.data.tokenizer import get_tokenizer
from llmkern.eval.choice_formats import TRUTHFULQA_PREAMBLE
from llmkern.eval.harness import (
    bootstrap_stderr,
    harness_shots,
    mean_stderr,
    pooled_stderr,
)
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


# --- MMLU's group: the subjects' standard errors pooled ------------------------------------------------------------

def test_pooled_stderr_is_the_within_subject_variance_over_n():
    # metrics.py pooled_sample_stderr: sum (n_i - 1) n_i se_i^2 / (N - g), over N, root. With se_i^2 = s_i^2 / n_i
    # (s_i^2 the sample variance) that is the within-subject variance pooled over N - g degrees of freedom.
    # Subjects: 3 of 4 right (s^2 = 1/4), 1 of 3 (s^2 = 1/3), 3 of 5 (s^2 = 3/10); N = 12, g = 3.
    subjects = [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0, 1.0]]
    by_hand = math.sqrt((3 * 1 / 4 + 2 * 1 / 3 + 4 * 3 / 10) / (12 - 3) / 12)
    assert pooled_stderr(subjects) == pytest.approx(by_hand, rel=1e-12)
    every_score = [x for scores in subjects for x in scores]
    assert by_hand != pytest.approx(mean_stderr(every_score), rel=1e-3)  # not the plain stderr of all 12
    assert pooled_stderr([[1.0, 0.0, 0.0]]) == pytest.approx(mean_stderr([1.0, 0.0, 0.0]), rel=1e-12)
    assert pooled_stderr([[1.0, 0.0], [1.0]]) is None  # a subject of one: the harness's "N/A" spreads to the group
    with pytest.raises(ValueError, match="groups must be non-empty"):
        pooled_stderr([[1.0, 0.0], []])


def mmlu_row(subject, i):
    return {"question": f"Question {i} of {subject}?", "subject": subject,
            "choices": [f"w{i}", f"x{i}", f"y{i}", f"z{i}"], "answer": (i * 7 + len(subject)) % 4}


def pooled_by_hand(groups):
    """sqrt(sum (n_i - 1) s_i^2 / (N - g) / N), the sample variances by the statistics module."""
    n = sum(len(g) for g in groups)
    return math.sqrt(sum((len(g) - 1) * statistics.variance(g) for g in groups) / (n - len(groups)) / n)


def test_mmlu_of_several_subjects_reports_the_harness_group_stderr_and_its_categories(tmp_path):
    # Two stem subjects and one humanities one, on a random model: the group's accuracy is the plain mean (weighted
    # by size), its stderr the subjects' pooled; each category the same over its own subjects.
    sizes = {"abstract_algebra": 7, "anatomy": 5, "philosophy": 6}
    rows = [mmlu_row(subject, i) for subject, n in sizes.items() for i in range(n)]
    result = evaluate_choices(tiny_gpt(), BYTES, write_jsonl(tmp_path / "mmlu.jsonl", rows), return_predictions=True)
    right = [float(p["pred"] == p["answer"]) for p in result["predictions"]]
    by_subject = {s: [r for r, row in zip(right, rows) if row["subject"] == s] for s in sizes}
    assert result["accuracy"] == pytest.approx(sum(right) / 18)
    assert result["accuracy_stderr"] == pytest.approx(pooled_by_hand(list(by_subject.values())), rel=1e-9)
    stem = by_subject["abstract_algebra"] + by_subject["anatomy"]
    assert result["categories"] == {
        "humanities": {"accuracy": pytest.approx(sum(by_subject["philosophy"]) / 6),
                       "accuracy_stderr": pytest.approx(math.sqrt(statistics.variance(by_subject["philosophy"]) / 6)),
                       "examples": 6},
        "stem": {"accuracy": pytest.approx(sum(stem) / 12),
                 "accuracy_stderr": pytest.approx(pooled_by_hand([by_subject["abstract_algebra"],
                                                                  by_subject["anatomy"]])),
                 "examples": 12}}
    # One subject is one task: its own mean_stderr, no categories.
    alone = evaluate_choices(tiny_gpt(), BYTES, write_jsonl(tmp_path / "one.jsonl", rows[:7]))
    assert alone["accuracy_stderr"] == pytest.approx(mean_stderr(by_subject["abstract_algebra"]))
    assert "categories" not in alone


# --- the perplexity's bootstrap --------------------------------------------------------------------------------------

def harness_bootstrap(statistic, xs, iters):
    """metrics.py bootstrap_stderr as the harness runs it: iters // chunk chunks of chunk = min(1000, iters)
    resamples, chunk i drawn by random.Random(i).choices; the sample standard deviation of the statistic."""
    chunk, replicates = min(1000, iters), []
    for i in range(iters // chunk):
        rnd = random.Random(i)
        replicates += [statistic(rnd.choices(xs, k=len(xs))) for _ in range(chunk)]
    return statistics.stdev(replicates)


def harness_perplexity(items):
    return math.exp(-sum(items) / len(items))  # metrics.py perplexity: exp(-mean)


@pytest.mark.parametrize("iters", [300, 2500])  # one chunk of 300; two of 1000 (the 500 left over are not drawn)
def test_bootstrap_stderr_repeats_the_harness_resamples(iters):
    rng = random.Random(iters)
    logprobs = [rng.gauss(-3.0, 2.0) for _ in range(41)]
    ours = bootstrap_stderr(lambda rows: np.exp(-rows.mean(axis=1)), logprobs, iters)
    assert ours == pytest.approx(harness_bootstrap(harness_perplexity, logprobs, iters), rel=1e-9)
    assert bootstrap_stderr(lambda rows: rows.mean(axis=1), [1.5], iters) is None  # the harness's "N/A"
    with pytest.raises(ValueError, match="iters must be an int >= 2"):
        bootstrap_stderr(lambda rows: rows.mean(axis=1), logprobs, 1)


# --- TruthfulQA's preamble before each shot --------------------------------------------------------------------------

def truthfulqa_text(doc):
    # truthfulqa_mc1.yaml doc_to_text: prompt_qa + '\n\nQ: ' + question + '\nA:', prompt_qa the six questions
    return TRUTHFULQA_PREAMBLE.removesuffix("\n\n") + "\n\nQ: " + doc["question"] + "\nA:"


def test_truthfulqa_shots_each_follow_the_preamble_as_the_harness_writes_them(tmp_path):
    rows = [{"question": f"Is {i} odd?", "mc1_targets": {"choices": [f"Yes {i}.", "No."], "labels": [1, 0]}}
            for i in range(6)]
    tests = load_choice_tasks(write_jsonl(tmp_path / "truthfulqa.jsonl", rows))
    expected = harness_contexts(rows, rows, 2, True, truthfulqa_text, lambda doc: doc["mc1_targets"]["choices"][0])
    assert [ex.description + ex.context for ex in with_fewshot(tests, tests, 2)] == expected
    assert all(text.count(TRUTHFULQA_PREAMBLE) == 3 for text in expected)  # two shots and the question


# --- few-shot data of another task -----------------------------------------------------------------------------------

def arc_original_row(i):
    row = arc_row(i)
    choices = [{"text": t, "label": label} for t, label in zip(row["choices"]["text"], row["choices"]["label"])]
    return {"id": row["id"], "question": {"stem": row["question"], "choices": choices}, "answerKey": row["answerKey"]}


def test_fewshot_data_of_another_task_is_refused(tmp_path):
    model = tiny_gpt()
    arc = write_jsonl(tmp_path / "arc_test.jsonl", [arc_row(i) for i in range(100, 103)])
    hellaswag = write_jsonl(tmp_path / "hellaswag_train.jsonl", [hellaswag_row(i) for i in range(5)])
    with pytest.raises(ValueError, match=r"fewshot_data \(--fewshot-data\) holds HellaSwag rows, the task ARC rows"):
        evaluate_choices(model, BYTES, arc, fewshot=2, fewshot_data=hellaswag)
    gsm8k = write_jsonl(tmp_path / "gsm8k_train.jsonl", [{"question": "1+1?", "answer": "2\n#### 2"}])
    with pytest.raises(ValueError, match=r"fewshot_data \(--fewshot-data\): .*gsm8k_train.jsonl line 1: missing key "
                                         r"'choices'"):
        evaluate_choices(model, BYTES, arc, fewshot=1, fewshot_data=gsm8k)
    # The task's own train split, in the other of ARC's exports (phrased alike), is the task's.
    arc_train = write_jsonl(tmp_path / "arc_train.jsonl", [arc_original_row(i) for i in range(5)])
    assert evaluate_choices(model, BYTES, arc, fewshot=2, fewshot_data=arc_train)["fewshot"] == 2
    # MMLU's dev split as its CSV file, for the Hugging Face export's test rows.
    dev = tmp_path / "philosophy_dev.csv"
    dev.write_text("".join(f"Dev question {i}?,a,b,c,d,{'ABCD'[i % 4]}\n" for i in range(3)))
    mmlu = write_jsonl(tmp_path / "mmlu_test.jsonl", [mmlu_row("philosophy", i) for i in range(2)])
    assert evaluate_choices(model, BYTES, mmlu, fewshot=2, fewshot_data=str(dev))["fewshot"] == 2
    other_subject = tmp_path / "anatomy_dev.csv"
    other_subject.write_text(dev.read_text())
    with pytest.raises(ValueError, match=r"about philosophy.'; the few-shot data has 0 \(fewshot_data, "
                                         r"--fewshot-data\)"):
        evaluate_choices(model, BYTES, mmlu, fewshot=2, fewshot_data=str(other_subject))


def test_gsm8k_fewshot_data_of_another_task_names_the_option(tmp_path):
    from llmkern.eval.gsm8k import evaluate_gsm8k

    test = write_jsonl(tmp_path / "test.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    mmlu = write_jsonl(tmp_path / "mmlu_dev.jsonl", [mmlu_row("philosophy", i) for i in range(3)])
    with pytest.raises(ValueError, match=r"fewshot_data \(--fewshot-data\) must be GSM8K's train split: "
                                         r".*mmlu_dev.jsonl line 1"):
        evaluate_gsm8k(tiny_gpt(), BYTES, test, fewshot=2, fewshot_data=mmlu)
