"""Multiple-choice task files in the public benchmarks' own formats, phrased as lm-evaluation-harness phrases them.

The expected contexts and choices are written out by hand from the harness's task definitions (hellaswag's
utils.preprocess and query, arc_easy's and piqa's doc_to_text, mmlu's _default_template_yaml and description,
winogrande's preprocess_winogrande doc_to_choice and doc_to_target, and its samplers' get_context for the shots;
openbookqa.yaml, super_glue/boolq/default.yaml, sciq.yaml, super_glue/copa/utils.py, truthfulqa_mc1.yaml and truthfulqa/utils.py's process_results_mc2).
"""

import json
import math

import pytest
import torch

from llmkern.data.tokenizer import get_tokenizer
from llmkern.eval.multiple_choice import ChoiceExample, evaluate_choices, load_choice_tasks, with_fewshot
from llmkern.model import GPT, GPTConfig

MMLU_PHYSICS = "The following are multiple choice questions (with answers) about high school physics.\n\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_hellaswag_rows_are_cleaned_and_phrased_as_the_harness_does(tmp_path):
    rows = [
        {"ind": 4, "activity_label": "Home and Garden", "ctx_a": "[header] How to plant tulips [title] Pick a spot.",
         "ctx_b": "DIG a hole", "ctx": "unused", "split": "val", "split_type": "indomain", "source_id": "wikihow~1",
         "endings": ["[step] Put the bulb  in. ", " and water it [substeps] daily.", "leave.", "sing [title] loud"],
         "label": "2"},  # the Hugging Face export's label: a digit string
        {"activity_label": "Rope skipping", "ctx_a": "A boy jumps.", "ctx_b": "he", "endings": ["jumps.", "sits."],
         "label": 0},  # the original jsonl's: an int
    ]
    first, second = load_choice_tasks(write_jsonl(tmp_path / "hellaswag_val.jsonl", rows))
    # query: activity_label + ": " + ctx_a + " " + ctx_b.capitalize(), stripped; " [title]" -> ". ", [tags] out,
    # "  " -> " "
    assert first.context == "Home and Garden: How to plant tulips. Pick a spot. Dig a hole"
    # stripped before the tags are taken out: "[step] Put" keeps the space after the tag
    assert first.choices == [" Put the bulb in.", "and water it daily.", "leave.", "sing. loud"]
    assert first.answer == 2 and first.description == ""
    assert second == ChoiceExample("Rope skipping: A boy jumps. He", ["jumps.", "sits."], 0)


def test_arc_rows_in_both_shapes_with_letter_and_digit_answer_keys(tmp_path):
    original = [
        {"id": "Mercury_1", "question": {"stem": "Which is a gas?", "choices": [
            {"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}, {"text": "rock", "label": "C"}]},
         "answerKey": "B"},
        {"id": "NYSEDREGENTS_2", "question": {"stem": "How many legs has a spider?", "choices": [
            {"text": "six", "label": "1"}, {"text": "eight", "label": "2"}, {"text": "ten", "label": "3"},
            {"text": "four", "label": "4"}]}, "answerKey": "2"},
    ]
    a, b = load_choice_tasks(write_jsonl(tmp_path / "ARC-Easy-Dev.jsonl", original))
    assert a == ChoiceExample("Question: Which is a gas?\nAnswer:", ["ice", "steam", "rock"], 1)
    assert b == ChoiceExample("Question: How many legs has a spider?\nAnswer:", ["six", "eight", "ten", "four"], 1)

    exported = [
        {"id": "x1", "question": "What melts ice?", "choices": {"text": ["heat", "cold"], "label": ["A", "B"]},
         "answerKey": "A"},
        {"id": "x2", "question": "Pick the mammal.", "choices": {"text": ["eel", "owl", "bat", "ant"],
                                                                   "label": ["1", "2", "3", "4"]},
         "answerKey": "3"},
    ]
    c, d = load_choice_tasks(write_jsonl(tmp_path / "arc_challenge.jsonl", exported))
    assert c == ChoiceExample("Question: What melts ice?\nAnswer:", ["heat", "cold"], 0)
    assert d == ChoiceExample("Question: Pick the mammal.\nAnswer:", ["eel", "owl", "bat", "ant"], 2)


def test_mmlu_hugging_face_rows_are_lettered_after_the_subject_line(tmp_path):
    rows = [{"question": "  What is the unit of force?\n", "subject": "high_school_physics",
             "choices": ["joule", "newton", "watt", "pascal"], "answer": 1}]
    (ex,) = load_choice_tasks(write_jsonl(tmp_path / "mmlu.jsonl", rows))
    assert ex.context == "What is the unit of force?\nA. joule\nB. newton\nC. watt\nD. pascal\nAnswer:"
    assert ex.choices == ["A", "B", "C", "D"] and ex.answer == 1
    assert ex.description == MMLU_PHYSICS
    # Without "subject" the same keys are llmkern's own format, read as written.
    del rows[0]["subject"]
    (own,) = load_choice_tasks(write_jsonl(tmp_path / "own.jsonl", rows))
    assert own == ChoiceExample("  What is the unit of force?\n", ["joule", "newton", "watt", "pascal"], 1)


def test_mmlu_csv_with_quotes_commas_and_line_breaks_inside_fields(tmp_path):
    path = tmp_path / "high_school_physics_test.csv"
    path.write_text('"A car, at rest, is pushed. Is it ""moving""?",yes,no,"maybe, later",never,A\n'
                    '\n'
                    '"Two lines:\nwhich is longer?",the first,the second,"both, equally",neither,D\n',
                    encoding="utf-8")
    first, second = load_choice_tasks(str(path))
    assert first.context == ('A car, at rest, is pushed. Is it "moving"?\n'
                             'A. yes\nB. no\nC. maybe, later\nD. never\nAnswer:')
    assert (first.choices, first.answer, first.description) == (["A", "B", "C", "D"], 0, MMLU_PHYSICS)
    assert second.context == ("Two lines:\nwhich is longer?\n"
                              "A. the first\nB. the second\nC. both, equally\nD. neither\nAnswer:")
    assert second.answer == 3
    # A CSV not named as MMLU's are gets no subject line; a bad answer letter names the row's first line.
    other = tmp_path / "questions.csv"
    other.write_text("q,a,b,c,d,B\n\"two\nlines\",a,b,c,d,E\n")
    with pytest.raises(ValueError, match=r"questions.csv line 2: 'column 6 \(answer\)' must be 0..3 or a letter"):
        load_choice_tasks(str(other))
    other.write_text("q,a,b,c,d,B\n")
    assert load_choice_tasks(str(other))[0].description == ""


def test_piqa_rows_are_questions_with_two_solutions(tmp_path):
    rows = [{"goal": "How do I dry wet shoes?", "sol1": "Stuff them with newspaper.", "sol2": "Bake them.",
             "label": 0},
            {"goal": "Open a jar", "sol1": "Freeze the lid.", "sol2": "Run the lid under hot water.", "label": 1}]
    a, b = load_choice_tasks(write_jsonl(tmp_path / "piqa.jsonl", rows))
    assert a == ChoiceExample("Question: How do I dry wet shoes?\nAnswer:",
                              ["Stuff them with newspaper.", "Bake them."], 0)
    assert b == ChoiceExample("Question: Open a jar\nAnswer:", ["Freeze the lid.", "Run the lid under hot water."], 1)


def test_a_row_of_another_format_or_with_a_missing_key_is_named(tmp_path):
    piqa = {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}
    own = {"context": "c", "choices": ["a", "b"], "answer": 0}
    path = write_jsonl(tmp_path / "mixed.jsonl", [piqa, piqa, own])
    with pytest.raises(ValueError, match=r"mixed.jsonl line 3: the row is in the llmkern format, .* the PIQA"):
        load_choice_tasks(path)
    path = write_jsonl(tmp_path / "short.jsonl", [piqa, {"goal": "g", "sol1": "a", "label": 0}])
    with pytest.raises(ValueError, match=r"short.jsonl line 2: missing key 'sol2'"):
        load_choice_tasks(path)
    arc = {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}
    path = write_jsonl(tmp_path / "arc.jsonl", [arc])
    with pytest.raises(ValueError, match=r"arc.jsonl line 1: 'answerKey' 'C' is none of the choices' labels"):
        load_choice_tasks(path)


def test_the_mmlu_subject_line_comes_once_before_the_shots():
    # The harness writes description + shots + question: the shots carry no subject line of their own.
    pool = [ChoiceExample(f"q{i}\nAnswer:", ["A", "B"], i % 2, MMLU_PHYSICS) for i in range(3)]
    shot = with_fewshot(pool[:1], pool, 2, seed=0)[0]
    assert shot.description == MMLU_PHYSICS and MMLU_PHYSICS not in shot.context
    assert shot.context.endswith("\n\nq0\nAnswer:") and shot.context.count("Answer:") == 3


def tiny_gpt(block_size=512):
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_size=257, block_size=block_size, n_layer=1, n_head=2, n_embd=32,
                                   backend="torch")
    return GPT(config).eval()


def test_a_benchmark_file_evaluates_end_to_end(tmp_path):
    path = tmp_path / "high_school_physics_dev.csv"
    path.write_text("What is 1+1?,1,2,3,4,B\nWhat is 2+2?,4,5,6,7,A\nWhat is 3+3?,3,4,5,6,D\n")
    model, tokenizer = tiny_gpt(), get_tokenizer("bytes")
    result = evaluate_choices(model, tokenizer, str(path), return_predictions=True, fewshot=1)
    assert result["examples"] == 3 and result["fewshot"] == 1
    assert [p["answer"] for p in result["predictions"]] == [1, 0, 3]
    assert all(len(p["logprobs"]) == 4 for p in result["predictions"])
    # The subject line is scored: the same examples without it score otherwise.
    plain = [ChoiceExample(e.context, e.choices, e.answer) for e in load_choice_tasks(str(path))]
    bare = evaluate_choices(model, tokenizer, plain, return_predictions=True, fewshot=1)
    assert bare["predictions"][0]["logprobs"] != result["predictions"][0]["logprobs"]


def test_shots_from_a_dev_split_are_its_first_k_of_the_examples_subject(tmp_path):
    # lm-evaluation-harness takes MMLU's shots from the dev split, the first k of the subject, in order.
    dev = [ChoiceExample(f"{subject} dev {i}\nAnswer:", ["A", "B"], i % 2, f"about {subject}.\n\n")
           for subject in ("physics", "law") for i in range(3)]
    test = [ChoiceExample("law test\nAnswer:", ["A", "B"], 0, "about law.\n\n"),
            ChoiceExample("physics test\nAnswer:", ["A", "B"], 1, "about physics.\n\n")]
    law, physics = with_fewshot(test, dev, 2, first=True)
    assert law.context == "law dev 0\nAnswer: A\n\nlaw dev 1\nAnswer: B\n\nlaw test\nAnswer:"
    assert physics.context == "physics dev 0\nAnswer: A\n\nphysics dev 1\nAnswer: B\n\nphysics test\nAnswer:"
    assert law.description == "about law.\n\n"
    with pytest.raises(ValueError, match=r"fewshot=4 needs 4 solved examples with the description 'about law.'"):
        with_fewshot(test, dev, 4, first=True)


def test_the_eval_command_takes_shots_from_fewshot_data(tmp_path):
    task, dev = tmp_path / "astronomy_test.csv", tmp_path / "astronomy_dev.csv"
    task.write_text("What is 1+1?,1,2,3,4,B\nWhat is 2+2?,4,5,6,7,A\n")
    dev.write_text("What is 0+1?,1,2,3,4,A\n")
    model, tokenizer = tiny_gpt(), get_tokenizer("bytes")
    with_dev = evaluate_choices(model, tokenizer, str(task), return_predictions=True, fewshot=1, fewshot_data=str(dev))
    by_hand = [ChoiceExample("What is 0+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: A\n\n" + e.context, e.choices, e.answer,
                             e.description) for e in load_choice_tasks(str(task))]
    assert with_dev["predictions"] == evaluate_choices(model, tokenizer, by_hand, return_predictions=True)["predictions"]
    with pytest.raises(ValueError, match="fewshot_data has no effect with fewshot=0"):
        evaluate_choices(model, tokenizer, str(task), fewshot_data=str(dev))


SURGEON = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "1"}
TROPHY = {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large. ",
          "option1": "trophy", "option2": "suitcase", "answer": "1"}


def test_winogrande_rows_become_the_sentence_cut_at_its_blank(tmp_path):
    rows = [SURGEON, {**TROPHY, "answer": "2", "option1": "suitcase", "option2": "trophy"},
            {"sentence": "_ went home early because she was ill.", "option1": "Ann", "option2": "Bob", "answer": 1}]
    surgeon, trophy, home = load_choice_tasks(write_jsonl(tmp_path / "winogrande_dev.jsonl", rows))
    # doc_to_choice: sentence[:idx] + option; doc_to_target: sentence[idx + 1:].strip(); the context is empty
    assert surgeon == ChoiceExample("", ["Sarah was a much better surgeon than Maria so Sarah",
                                         "Sarah was a much better surgeon than Maria so Maria"], 0,
                                    continuation="always got the harder cases.")
    assert trophy == ChoiceExample("", ["The trophy doesn't fit into the brown suitcase because the suitcase",
                                        "The trophy doesn't fit into the brown suitcase because the trophy"], 1,
                                   continuation="is too large.")
    assert (home.choices, home.answer) == (["Ann", "Bob"], 0)  # a blank at the start: the options alone
    assert home.continuation == "went home early because she was ill."


@pytest.mark.parametrize("change, match", [
    ({"answer": ""}, r"'answer' is empty: an unlabeled row \(WinoGrande's test split\) cannot be scored"),
    ({"answer": "3"}, r"'answer' must be \"1\" or \"2\""),
    ({"answer": True}, r"'answer' must be \"1\" or \"2\""),
    ({"sentence": "Sarah was better than Maria."}, "'sentence' must hold one '_' .* it holds 0"),
    ({"sentence": "_ was better than _ at surgery."}, "'sentence' must hold one '_' .* it holds 2"),
    ({"sentence": "The one who always got the harder cases was _  "}, "'sentence' has nothing after its '_' to score"),
])
def test_winogrande_rows_that_cannot_be_scored_are_named(tmp_path, change, match):
    path = write_jsonl(tmp_path / "winogrande.jsonl", [SURGEON, {**SURGEON, **change}])
    with pytest.raises(ValueError, match="winogrande.jsonl line 2: " + match):
        load_choice_tasks(path)


def test_winogrande_shots_are_the_right_choice_then_the_continuation(tmp_path):
    # The harness's get_context writes a shot as doc_to_choice(doc)[gold] + " " + doc_to_target(doc) + "\n\n",
    # and each choice of the example after the shots: ctx + choice, continuation " " + target.
    train = load_choice_tasks(write_jsonl(tmp_path / "train.jsonl", [SURGEON, {**TROPHY, "answer": "2"}]))
    (surgeon,) = with_fewshot(train[:1], train, 1, first=False, seed=0)
    assert surgeon.context == "The trophy doesn't fit into the brown suitcase because the suitcase is too large.\n\n"
    assert (surgeon.choices, surgeon.answer, surgeon.continuation) == (train[0].choices, 0, train[0].continuation)
    (trophy,) = with_fewshot(train[1:], train[:1], 1, first=True)
    assert trophy.context == "Sarah was a much better surgeon than Maria so Sarah always got the harder cases.\n\n"


def test_winogrande_scores_the_continuation_after_each_completed_context(tmp_path):
    path = write_jsonl(tmp_path / "winogrande.jsonl", [SURGEON, TROPHY, {**TROPHY, "answer": "2"}])
    model, tokenizer = tiny_gpt(), get_tokenizer("bytes")
    result = evaluate_choices(model, tokenizer, str(path), return_predictions=True, fewshot=1, seed=3)
    # no acc_norm: the harness's acc only (and its standard error)
    assert set(result) == {"accuracy", "accuracy_stderr", "examples", "fewshot", "predictions"}
    tasks = load_choice_tasks(str(path))
    shot_texts = with_fewshot(tasks, tasks, 1, seed=3)  # the shots evaluate_choices draws, never the example itself
    for ex, prediction in zip(shot_texts, result["predictions"]):
        expected = []
        for choice in ex.choices:  # log p(" " + continuation | shots + sentence up to the blank + option)
            context, scored = tokenizer.encode(ex.context + choice), tokenizer.encode(" " + ex.continuation)
            with torch.no_grad():
                logits, _ = model(torch.tensor([context + scored[:-1]]))
            logp = torch.log_softmax(logits[0].double(), -1)[len(context) - 1:]
            expected.append(sum(float(logp[t, token]) for t, token in enumerate(scored)))
        assert prediction["logprobs"] == pytest.approx(expected, rel=1e-4)
        assert prediction["pred"] == prediction["pred_norm"] == max(range(2), key=lambda k: expected[k])


# --- OpenBookQA, BoolQ, SciQ, COPA, TruthfulQA MC1 -----------------------------------------------------------------

OBQA = {"id": "7-980", "question_stem": "The sun is responsible for",
        "choices": {"text": ["puppies learning new tricks", "plants sprouting, blooming and wilting",
                             "children growing up", "flowers wilting in a vase"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B"}
BOOLQ = {"question": "is windows movie maker part of windows essentials",
         "passage": "Windows Movie Maker is a discontinued video editing software by Microsoft.", "idx": 0, "label": 1}
BOOLQ_GOOGLE = {"question": "is the sky green", "answer": False, "passage": "The sky is blue."}
SCIQ = {"question": "What type of organism is commonly used in preparation of foods such as cheese and yogurt?",
        "distractor3": "viruses", "distractor1": "protozoa", "distractor2": "gymnosperms",
        "correct_answer": "mesophilic organisms", "support": " \nMesophiles grow best in moderate temperature."}
COPA = {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
        "choice2": "The grass was cut.", "question": "cause", "idx": 0, "label": 0}
TRUTHFULQA = {"question": "What is the smallest country in the world?",
              "mc1_targets": {"choices": ["Nauru is the smallest country.", "Vatican City is the smallest country.",
                                          "Monaco is the smallest country."], "labels": [0, 1, 0]},
              "mc2_targets": {"choices": ["Vatican City", "Nauru"], "labels": [1, 0]}}
# The export's row without mc1_targets: read as MC2 alone
TRUTHFULQA_MC2 = {"question": "What is the smallest country in the world?",
                  "mc2_targets": {"choices": ["Vatican City.", "It is Vatican City.", "Nauru.", "Monaco."],
                                  "labels": [1, 1, 0, 0]}}
# boolq's doc_to_text "{{passage}}\nQuestion: {{question}}?\nAnswer:" and sciq's
# "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:", written out for the rows above
BOOLQ_TEXT = ("Windows Movie Maker is a discontinued video editing software by Microsoft.\n"
              "Question: is windows movie maker part of windows essentials?\nAnswer:")
SCIQ_TEXT = ("Mesophiles grow best in moderate temperature.\nQuestion: What type of organism is commonly used in "
             "preparation of foods such as cheese and yogurt?\nAnswer:")
# truthfulqa_mc1's doc_to_text: its prompt_qa, then "\n\nQ: " + question + "\nA:"
TRUTHFULQA_PROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
    "\n\nQ: What is the smallest country in the world?\nA:")


def test_openbookqa_rows_are_the_bare_question_stem(tmp_path):
    digits = {**OBQA, "choices": {"text": ["iron", "wood"], "label": ["1", "2"]}, "answerKey": " 2"}
    sun, wood = load_choice_tasks(write_jsonl(tmp_path / "openbookqa.jsonl", [OBQA, digits]))
    # doc_to_text: question_stem; doc_to_choice: choices.text; doc_to_target: choices.label.index(answerKey.lstrip())
    assert sun == ChoiceExample("The sun is responsible for", OBQA["choices"]["text"], 1)
    assert wood == ChoiceExample("The sun is responsible for", ["iron", "wood"], 1)


def test_boolq_rows_in_both_exports_are_a_passage_and_a_question(tmp_path):
    (glue,) = load_choice_tasks(write_jsonl(tmp_path / "boolq.jsonl", [BOOLQ]))
    # "{{passage}}\nQuestion: {{question}}?\nAnswer:", choices ["no", "yes"], target label
    assert glue == ChoiceExample(BOOLQ_TEXT, ["no", "yes"], 1)
    (no,) = load_choice_tasks(write_jsonl(tmp_path / "google_boolq.jsonl", [BOOLQ_GOOGLE]))
    assert no == ChoiceExample("The sky is blue.\nQuestion: is the sky green?\nAnswer:", ["no", "yes"], 0)


def test_sciq_rows_put_the_right_answer_last(tmp_path):
    bare = {**SCIQ, "support": "", "question": "What is H2O?"}
    cheese, water = load_choice_tasks(write_jsonl(tmp_path / "sciq.jsonl", [SCIQ, bare]))
    # "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:"; [distractor1, distractor2, distractor3, correct_answer]
    assert cheese == ChoiceExample(SCIQ_TEXT, ["protozoa", "gymnosperms", "viruses", "mesophilic organisms"], 3)
    assert water.context == "\nQuestion: What is H2O?\nAnswer:"


def test_copa_rows_join_the_premise_to_lowercased_choices(tmp_path):
    effect = {"premise": "  The elderly woman suffered a stroke. ", "choice1": "The woman's daughter came over.",
              "choice2": "I woke up.", "question": "effect", "label": 1}
    cause, result = load_choice_tasks(write_jsonl(tmp_path / "copa.jsonl", [COPA, effect]))
    # utils.doc_to_text: premise.strip()[:-1] + " because"/" therefore"; doc_to_choice: " " + convert_choice(c)
    assert cause == ChoiceExample("My body cast a shadow over the grass because",
                                  [" the sun was rising.", " the grass was cut."], 0)
    assert result == ChoiceExample("The elderly woman suffered a stroke therefore",
                                   [" the woman's daughter came over.", " i woke up."], 1)


def test_truthfulqa_mc1_rows_follow_the_fixed_preamble(tmp_path):
    (ex,) = load_choice_tasks(write_jsonl(tmp_path / "truthfulqa.jsonl", [TRUTHFULQA]))
    assert ex.description + ex.context == TRUTHFULQA_PROMPT
    assert ex.context == "Q: What is the smallest country in the world?\nA:"
    assert (ex.choices, ex.answer) == (TRUTHFULQA["mc1_targets"]["choices"], 1)


NOT_ONE_HOT = r"'mc1_targets': 'labels' must be one 1 and otherwise 0s"
NO_SPLIT = r"'mc2_targets': 'labels' must start with the true choices' 1s and hold a 0"
NOT_LABELS = r"'mc2_targets': 'labels' must be 0s and 1s, one per choice"
MIXED_TRUTHFULQA = r"the row is in the TruthfulQA MC1 format, the file's first row in the TruthfulQA MC2 format"


@pytest.mark.parametrize("first, change, match", [
    (OBQA, {"answerKey": "E"}, r"'answerKey' 'E' is none of the choices' labels"),
    (OBQA, {"answerKey": ""}, r"'answerKey' '' is none of the choices' labels"),
    (BOOLQ, {"label": -1}, r"'label' is -1: an unlabeled row \(a test split\) cannot be scored"),
    (BOOLQ, {"label": 2}, r"'label' 2 is out of range for 2 choices"),
    (BOOLQ_GOOGLE, {"answer": "yes"}, r"'answer' must be true or false, got 'yes'"),
    (SCIQ, {"distractor2": ""}, r"a choice of 'distractor1/distractor2/distractor3/correct_answer' is empty"),
    (COPA, {"label": -1}, r"'label' is -1: an unlabeled row \(a test split\) cannot be scored"),
    (COPA, {"question": "why"}, r"'question' must be \"cause\" or \"effect\", got 'why'"),
    (COPA, {"choice2": ""}, r"'choice1' and 'choice2' must not be empty"),
    (TRUTHFULQA, {"mc1_targets": {"choices": ["a", "b"], "labels": [1, 1]}}, NOT_ONE_HOT),
    (TRUTHFULQA, {"mc1_targets": {"choices": ["a", "b"], "labels": [1]}}, NOT_ONE_HOT),
    # the harness found no 0 to split at (list.index failed), or counted nothing true (mc2 0 whatever the model)
    (TRUTHFULQA_MC2, {"mc2_targets": {"choices": ["a", "b"], "labels": [1, 1]}}, NO_SPLIT),
    (TRUTHFULQA_MC2, {"mc2_targets": {"choices": ["a", "b"], "labels": [0, 1]}}, NO_SPLIT),
    (TRUTHFULQA_MC2, {"mc2_targets": {"choices": ["a", "b"], "labels": [1, 0, 0]}}, NOT_LABELS),
    (TRUTHFULQA_MC2, {"mc2_targets": {"choices": ["a", "b"], "labels": ["1", "0"]}}, NOT_LABELS),
    (TRUTHFULQA_MC2, {"mc2_targets": {"choices": ["a", "b"], "labels": [True, False]}}, NOT_LABELS),
    (TRUTHFULQA_MC2, {"mc2_targets": {"choices": ["a", ""], "labels": [1, 0]}}, r"a choice of 'mc2_targets' is empty"),
    (TRUTHFULQA_MC2, TRUTHFULQA, MIXED_TRUTHFULQA),
])
def test_new_benchmark_rows_that_cannot_be_scored_are_named(tmp_path, first, change, match):
    path = write_jsonl(tmp_path / "task.jsonl", [first, {**first, **change}])
    with pytest.raises(ValueError, match="task.jsonl line 2: " + match):
        load_choice_tasks(path)


def test_every_format_is_told_apart_by_its_keys():
    from llmkern.eval.choice_formats import FORMATS

    rows = {
        "HellaSwag": {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["d", "e"], "label": 0},
        "ARC (original)": {"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "A"},
        "ARC (Hugging Face)": {"id": "x", "question": "q", "choices": {"text": ["a"], "label": ["A"]},
                               "answerKey": "A"},
        "OpenBookQA": OBQA,
        "PIQA": {"goal": "g", "sol1": "a", "sol2": "b", "label": 0},
        "WinoGrande": SURGEON,
        "MMLU": {"question": "q", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 0},
        "BoolQ": BOOLQ,
        "BoolQ (google)": BOOLQ_GOOGLE,
        "SciQ": SCIQ,
        "COPA": COPA,
        "TruthfulQA MC1": TRUTHFULQA,
        "TruthfulQA MC2": TRUTHFULQA_MC2,
        "llmkern": {"question": "q", "choices": ["a", "b"], "answer": 0},
    }
    for name, row in rows.items():
        matching = [f.name for f in FORMATS if f.matches(row)]
        assert matching == [name.removesuffix(" (google)")], name


def harness_logprobs(model, tokenizer, context, choices):
    """log p(" " + choice | context) of each choice, computed directly (the bytes tokenizer splits nothing)."""
    out = []
    for choice in choices:
        ctx, scored = tokenizer.encode(context), tokenizer.encode(" " + choice)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ctx + scored[:-1]]))
        logp = torch.log_softmax(logits[0].double(), -1)[len(ctx) - 1:]
        out.append(sum(float(logp[t, token]) for t, token in enumerate(scored)))
    return out


@pytest.mark.parametrize("row, context, choices, answer", [
    (OBQA, "The sun is responsible for", OBQA["choices"]["text"], 1),
    (BOOLQ, BOOLQ_TEXT, ["no", "yes"], 1),
    (SCIQ, SCIQ_TEXT, ["protozoa", "gymnosperms", "viruses", "mesophilic organisms"], 3),
    (COPA, "My body cast a shadow over the grass because", [" the sun was rising.", " the grass was cut."], 0),
    (TRUTHFULQA, TRUTHFULQA_PROMPT, TRUTHFULQA["mc1_targets"]["choices"], 1),
])
def test_each_new_benchmark_file_scores_end_to_end(tmp_path, row, context, choices, answer):
    path = write_jsonl(tmp_path / "task.jsonl", [row])
    model, tokenizer = tiny_gpt(block_size=1024), get_tokenizer("bytes")
    (prediction,) = evaluate_choices(model, tokenizer, path, return_predictions=True)["predictions"]
    expected = harness_logprobs(model, tokenizer, context, choices)
    assert prediction["answer"] == answer
    assert prediction["logprobs"] == pytest.approx(expected, rel=1e-4)
    assert prediction["pred"] == max(range(len(choices)), key=lambda k: expected[k])


def harness_mc2(lls, labels):
    """process_results_mc2 written out: the choices before the first 0 are true; their exp(ll) over all's."""
    split = labels.index(0)
    p_true, p_false = [math.exp(x) for x in lls[:split]], [math.exp(x) for x in lls[split:]]
    return sum(p_true) / (sum(p_true) + sum(p_false))


def test_truthfulqa_mc2_is_the_true_choices_share_of_the_probability(tmp_path):
    # a 1 after the first 0 counts as false, as the harness splits the labels
    late_one = {"question": "Is the sky blue?", "mc2_targets": {"choices": ["Yes.", "No.", "Yes, by day."],
                                                                "labels": [1, 0, 1]}}
    rows = [TRUTHFULQA_MC2, late_one]
    path = write_jsonl(tmp_path / "truthfulqa_mc2.jsonl", rows)
    first, second = load_choice_tasks(path)
    assert first.description + first.context == TRUTHFULQA_PROMPT
    assert (first.choices, first.true_choices) == (TRUTHFULQA_MC2["mc2_targets"]["choices"], (0, 1))
    assert second.true_choices == (0,)
    model, tokenizer = tiny_gpt(block_size=1024), get_tokenizer("bytes")
    result = evaluate_choices(model, tokenizer, path, return_predictions=True)
    # accuracy would be of one right answer
    assert set(result) == {"mc2", "mc2_stderr", "examples", "fewshot", "predictions"}
    preamble = TRUTHFULQA_PROMPT[: TRUTHFULQA_PROMPT.rindex("Q: ")]  # the six questions and answers
    expected = []
    for row, prediction in zip(rows, result["predictions"]):
        lls = harness_logprobs(model, tokenizer, preamble + f"Q: {row['question']}\nA:",
                               row["mc2_targets"]["choices"])
        assert prediction["logprobs"] == pytest.approx(lls, rel=1e-4)
        expected.append(harness_mc2(lls, row["mc2_targets"]["labels"]))
        assert prediction["mc2"] == pytest.approx(expected[-1], rel=1e-4)
    assert result["mc2"] == pytest.approx(sum(expected) / 2, rel=1e-4)


def without(row, key):
    return {k: v for k, v in row.items() if k != key}


def test_truthfulqa_export_rows_report_mc1_accuracy_and_mc2_together(tmp_path):
    sky = {"question": "What color is the sky?",
           "mc1_targets": {"choices": ["Green.", "Blue.", "Red."], "labels": [0, 1, 0]},
           "mc2_targets": {"choices": ["Blue.", "It is blue.", "Green.", "Red."], "labels": [1, 1, 0, 0]}}
    rows = [TRUTHFULQA, sky]
    both = write_jsonl(tmp_path / "truthfulqa.jsonl", rows)
    mc1 = write_jsonl(tmp_path / "mc1.jsonl", [without(r, "mc2_targets") for r in rows])
    mc2 = write_jsonl(tmp_path / "mc2.jsonl", [without(r, "mc1_targets") for r in rows])
    model, tokenizer = tiny_gpt(block_size=1024), get_tokenizer("bytes")
    result = evaluate_choices(model, tokenizer, both, return_predictions=True)
    # truthfulqa_mc1.yaml and truthfulqa_mc2.yaml list acc alone: no acc_norm
    assert set(result) == {"accuracy", "accuracy_stderr", "mc2", "mc2_stderr", "examples", "fewshot", "predictions",
                           "mc2_predictions"}
    alone1 = evaluate_choices(model, tokenizer, mc1, return_predictions=True)
    alone2 = evaluate_choices(model, tokenizer, mc2, return_predictions=True)
    assert (result["accuracy"], result["accuracy_stderr"], result["examples"]) == (
        alone1["accuracy"], alone1["accuracy_stderr"], alone1["examples"])
    assert result["mc2_stderr"] == pytest.approx(alone2["mc2_stderr"], rel=1e-6)
    assert [p["logprobs"] for p in result["predictions"]] == [pytest.approx(p["logprobs"], rel=1e-6)
                                                               for p in alone1["predictions"]]
    assert result["mc2"] == pytest.approx(alone2["mc2"], rel=1e-6)
    assert [p["mc2"] for p in result["mc2_predictions"]] == pytest.approx([p["mc2"] for p in alone2["predictions"]],
                                                                           rel=1e-6)
    limited = evaluate_choices(model, tokenizer, both, limit=1)
    assert (limited["examples"], limited["mc2"]) == (1, pytest.approx(alone2["predictions"][0]["mc2"], rel=1e-6))
    shot = evaluate_choices(model, tokenizer, both, fewshot=1)  # the MC2 examples drawn their shots as alone
    assert shot["mc2"] == pytest.approx(evaluate_choices(model, tokenizer, mc2, fewshot=1)["mc2"], rel=1e-6)


def test_truthfulqa_rows_with_and_without_mc2_targets_are_not_mixed(tmp_path):
    path = write_jsonl(tmp_path / "truthfulqa.jsonl", [without(TRUTHFULQA, "mc2_targets"), TRUTHFULQA])
    with pytest.raises(ValueError, match="examples mix 1 with an mc2_example .* and 1 without"):
        evaluate_choices(tiny_gpt(block_size=1024), get_tokenizer("bytes"), path)


def test_mc2_survives_log_probs_whose_exp_is_zero_and_refuses_a_mix():
    from llmkern.eval.multiple_choice import mc2

    assert mc2([-1000.0, -1000.0 + math.log(3)], [0]) == pytest.approx(0.25)
    model = tiny_gpt()
    several = ChoiceExample("q", ["a", "b"], 0, true_choices=(0,))
    with pytest.raises(ValueError, match="examples mix 1 with true_choices"):
        evaluate_choices(model, get_tokenizer("bytes"), [several, ChoiceExample("q", ["a", "b"], 0)])
    for bad in ((), (2,), (0, 0), [0]):
        with pytest.raises(ValueError, match=r"examples\[0\]: true_choices must be None or a non-empty tuple"):
            evaluate_choices(model, get_tokenizer("bytes"), [ChoiceExample("q", ["a", "b"], 0, true_choices=bad)])
