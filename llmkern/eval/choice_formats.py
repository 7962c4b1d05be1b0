"""The shapes of multiple-choice task files, and how each becomes a ChoiceExample.

A file's format is told by the keys of its first row; every other row must have the same shape (a row of
another format is an error naming its line). The public benchmarks are phrased exactly as
lm-evaluation-harness phrases them, so that accuracies compare with published numbers; the choices are scored
after the harness's target delimiter " ".

- llmkern's own: {"context" (or "question"), "choices": [...], "answer": INDEX}, read as written.
- HellaSwag (the original jsonl and the Hugging Face export): activity_label, ctx_a, ctx_b, endings, label (an
  int or a digit string; the original test split has none, so it cannot be scored). Context
  "{activity_label}: {ctx_a} {ctx_b.capitalize()}", choices the endings, both cleaned of WikiHow's markup:
  stripped, " [title]" -> ". ", other [tags] removed, a double space made single.
- ARC, ARC-Easy and ARC-Challenge alike, as the original jsonl (question: {stem, choices: [{text, label}]},
  answerKey) or the Hugging Face export (question: str, choices: {text: [...], label: [...]}, answerKey): context
  "Question: {question}\\nAnswer:", choices the texts, the answer the choice whose label is answerKey (a letter,
  or a digit "1".."5" in the rows labelled so).
- MMLU as the Hugging Face export of cais/mmlu (question, subject, choices: 4 strings, answer: an int or a letter;
  without "subject" such a row is llmkern's own format), or MMLU's original CSV (a file ending in .csv, no
  header: question, A, B, C, D, answer letter). Context
  "{question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:", choices "A".."D", after the description
  "The following are multiple choice questions (with answers) about {subject}.\\n\\n" (the subject's underscores
  as spaces), written once before the few-shot examples. A CSV's subject is its file name's, as MMLU names them:
  "<subject>_test.csv" (or _dev, _val); a CSV named otherwise gets no description.
- PIQA (the Hugging Face export): goal, sol1, sol2, label: context "Question: {goal}\\nAnswer:", choices the two
  solutions.
- WinoGrande (the Hugging Face export of allenai/winogrande): sentence with one "_", option1, option2, answer "1"
  or "2" (empty in the test split, which cannot be scored). Scored as the harness's "partial evaluation": the
  choices complete the context, not the other way round. Each choice is the sentence up to the "_" with an option
  put in; the continuation, the same for both, is the rest of the sentence, stripped, scored after the delimiter;
  the answer is the option under which that continuation is most likely (only accuracy: acc_norm would divide
  both by the same length). A few-shot shot is the right choice, the delimiter and the continuation.
- OpenBookQA (the Hugging Face export of allenai/openbookqa "main": question_stem, choices {text, label},
  answerKey): context the bare question_stem, choices the texts, the answer the choice whose label is answerKey.
  (The original jsonl has ARC's shape and is read as ARC, phrased "Question: ...\\nAnswer:".)
- BoolQ (super_glue/boolq: passage, question, label 0/1, -1 in the test split, which cannot be scored; or
  google/boolq: passage, question, answer true/false): context "{passage}\\nQuestion: {question}?\\nAnswer:",
  choices "no", "yes".
- SciQ (allenai/sciq: question, distractor1-3, correct_answer, support): context
  "{support.lstrip()}\\nQuestion: {question}\\nAnswer:", choices the three distractors then correct_answer, the
  answer always 3.
- COPA (super_glue/copa: premise, choice1, choice2, question "cause" or "effect", label 0/1, -1 in the test split):
  context the stripped premise without its last character (the period) and " because" or " therefore"; each
  choice " " + itself with its first letter lowercased, as the harness's doc_to_choice writes it (scored after
  the delimiter, so after two spaces).
- TruthfulQA MC1 (truthful_qa "multiple_choice": question, mc1_targets {choices, labels}): context
  "Q: {question}\\nA:" after the harness's fixed six questions and answers (the description, which each
  few-shot shot repeats, as the harness's doc_to_text holds it: TRUTHFULQA_RULES), choices
  mc1_targets' choices, the answer the one labelled 1 (always the first in the published data, which the harness
  takes as gold).
- TruthfulQA MC2 (rows with mc2_targets {choices, labels}): the same prompt, choices mc2_targets' choices, the
  true ones those before the first 0 label, as the harness splits them (a 1 after it counts as false; the
  published labels are all 1s, then all 0s). Scored by mc2 (multiple_choice), not accuracy.
  The export's rows carry both targets: each is read as its MC1 example with its MC2 example attached
  (mc2_example), so that one file is scored by both; a row with only one of them is read as that one alone.
Each format carries its task's HarnessRules, read from the task's yaml in lm-evaluation-harness v0.4: the
metrics it reports (acc and acc_norm for HellaSwag, ARC, PIQA, OpenBookQA and SciQ; acc alone for MMLU,
WinoGrande, BoolQ, COPA and TruthfulQA MC1), and how its few-shot examples are drawn from a separate file
(multiple_choice). llmkern's own format reports both and takes the first k shots of the example's description.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

MMLU_LETTERS = ("A", "B", "C", "D")
MMLU_SPLITS = ("_test", "_dev", "_val")


@dataclass(frozen=True)
class HarnessRules:
    """What lm-evaluation-harness's yaml for a task says beyond its prompt."""
    # Its metric_list holds acc_norm (else acc alone).
    acc_norm: bool = True
    # Shots from a separate file (fewshot_data) are its first k with the example's description, as the harness's
    # first_n sampler takes MMLU's from dev; else they are drawn at random (harness.harness_shots).
    first_n: bool = True
    # Drawn at random, k + 1 are drawn and the example dropped: the harness's `fewshot_split == test_split`, true
    # where the yaml names neither (None == None), false where it names a test split the shots do not come from.
    one_more: bool = True
    # The description is part of the yaml's doc_to_text (TruthfulQA's preamble), so every shot repeats it; else it
    # is the yaml's description, written once before the shots (MMLU's subject line).
    description_per_shot: bool = False


@dataclass
class ChoiceExample:
    context: str
    choices: list[str]
    answer: int
    # Written once before the context and before any few-shot examples (MMLU's subject line), not in the shots;
    # where the rules' description_per_shot says (TruthfulQA's preamble), also after each shot.
    description: str = ""
    # Set where the choices complete the context and this text, the same for every choice, is what is scored
    # after each (WinoGrande); None where each choice is scored after the context.
    continuation: str | None = None
    # Set where several choices are right (TruthfulQA MC2): their indices, scored by mc2, the probability mass the
    # model gives them; `answer` is then only the one a few-shot shot writes out.
    true_choices: tuple[int, ...] | None = None
    # Set where the row is also scored as another example (TruthfulQA's export: its MC2 example beside the MC1
    # one), which multiple_choice scores apart and reports under its own key (mc2).
    mc2_example: ChoiceExample | None = None
    # The task's rules (its format's); not compared: the harness compares its rows, which do not hold them.
    harness: HarnessRules = field(default=HarnessRules(), compare=False)
    # The benchmark the row is of (its format's task, "" for an example made in code): shots of another task's
    # file are refused. Not compared, as the rules.
    task: str = field(default="", compare=False)
    # MMLU's subject (None elsewhere, and for a CSV file not named after one): the harness scores each subject as
    # a subtask, and pools their standard errors in its mmlu group. Its description names it, and is compared.
    subject: str | None = field(default=None, compare=False)


# --- checks shared by the formats: each names the row (`where`) and the key --------------------------------------

def _value(row: dict, key: str, where: str) -> object:
    if key not in row:
        raise ValueError(f"{where}: missing key {key!r}")
    return row[key]


def _string(row: dict, key: str, where: str) -> str:
    value = _value(row, key, where)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _strings(row: dict, key: str, where: str) -> list[str]:
    value = _value(row, key, where)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {key!r} must be a list of strings")
    return list(value)


def _object(row: dict, key: str, where: str) -> dict:
    value = _value(row, key, where)
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {key!r} must be a JSON object, got {type(value).__name__}")
    return value


def _index(row: dict, key: str, where: str) -> int:
    """An int, or a string of digits (the Hugging Face exports write HellaSwag's labels as "0".."3")."""
    value = _value(row, key, where)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key!r} must be an int (the index of the right choice), got {value!r}")
    return value


def _example(context: str, choices: list[str], answer: int, where: str, choices_key: str, answer_key: str,
             description: str = "") -> ChoiceExample:
    """The example, once its choices can be scored and its answer is one of them."""
    if len(choices) < 2:
        raise ValueError(f"{where}: {choices_key!r} needs at least 2 entries, got {len(choices)}")
    if any(c == "" for c in choices):
        raise ValueError(f"{where}: a choice of {choices_key!r} is empty (it would have no tokens to score)")
    if not 0 <= answer < len(choices):
        raise ValueError(f"{where}: {answer_key!r} {answer} is out of range for {len(choices)} choices")
    return ChoiceExample(context, choices, answer, description)


# --- the formats ---------------------------------------------------------------------------------------------------

def parse_choice_example(row: object, where: str) -> ChoiceExample:
    """llmkern's own format: {"context" (or "question"), "choices", "answer": int}; `where` ("file.jsonl line 3")
    names the row in errors."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    key = "context" if "context" in row else "question"
    if key not in row:
        raise ValueError(f"{where}: missing key 'context' (or 'question')")
    context = _string(row, key, where)
    choices = _strings(row, "choices", where)
    answer = _value(row, "answer", where)
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise ValueError(f"{where}: 'answer' must be an int (the index of the right choice), got {answer!r}")
    return _example(context, choices, answer, where, "choices", "answer")


def clean_hellaswag(text: str) -> str:
    """HellaSwag's text as the harness reads it: the WikiHow rows' [title], [header], [step] tags taken out."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(row: dict, where: str) -> ChoiceExample:
    ctx = _string(row, "ctx_a", where) + " " + _string(row, "ctx_b", where).capitalize()
    query = clean_hellaswag(_string(row, "activity_label", where) + ": " + ctx)
    endings = [clean_hellaswag(e) for e in _strings(row, "endings", where)]
    return _example(query, endings, _index(row, "label", where), where, "endings", "label")


def _arc_example(question: str, texts: list[str], labels: list[str], row: dict, where: str) -> ChoiceExample:
    if len(labels) != len(texts):
        raise ValueError(f"{where}: {len(texts)} choice texts but {len(labels)} labels")
    key = _value(row, "answerKey", where)
    if key not in labels:
        raise ValueError(f"{where}: 'answerKey' {key!r} is none of the choices' labels {labels}")
    return _example(f"Question: {question}\nAnswer:", texts, labels.index(key), where, "choices", "answerKey")


def arc_example(row: dict, where: str) -> ChoiceExample:
    """The original jsonl: question {stem, choices: [{text, label}, ...]}."""
    question = _object(row, "question", where)
    stem = _string(question, "stem", f"{where}: 'question'")
    choices = _value(question, "choices", f"{where}: 'question'")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise ValueError(f"{where}: 'question': 'choices' must be a list of {{text, label}} objects")
    texts = [_string(c, "text", f"{where}: 'question': choice {i}") for i, c in enumerate(choices)]
    labels = [_string(c, "label", f"{where}: 'question': choice {i}") for i, c in enumerate(choices)]
    return _arc_example(stem, texts, labels, row, where)


def arc_hf_example(row: dict, where: str) -> ChoiceExample:
    """The Hugging Face export: question str, choices {text: [...], label: [...]}."""
    choices = _object(row, "choices", where)
    texts = _strings(choices, "text", f"{where}: 'choices'")
    labels = _strings(choices, "label", f"{where}: 'choices'")
    return _arc_example(_string(row, "question", where), texts, labels, row, where)


# lm-evaluation-harness's mmlu group: its four categories (groups mmlu_stem, mmlu_humanities, ...), each the
# subjects whose yaml is tagged with it (mmlu/default/mmlu_<subject>.yaml).
MMLU_CATEGORIES = {
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions"),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging", "management",
        "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology"),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy"),
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning"),
}
MMLU_CATEGORY_OF = {subject: category for category, subjects in MMLU_CATEGORIES.items() for subject in subjects}


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _mmlu(question: str, choices: list[str], answer: object, where: str, answer_key: str,
          subject: str | None) -> ChoiceExample:
    """The harness's MMLU prompt: the question, its lettered choices, "Answer:"; the letters are the choices."""
    if len(choices) != 4:
        raise ValueError(f"{where}: MMLU has 4 choices, got {len(choices)}")
    if answer in MMLU_LETTERS:
        answer = MMLU_LETTERS.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
        raise ValueError(f"{where}: {answer_key!r} must be 0..3 or a letter A..D, got {answer!r}")
    lines = [question.strip()] + [f"{letter}. {c}" for letter, c in zip(MMLU_LETTERS, choices)] + ["Answer:"]
    description = "" if subject is None else mmlu_description(subject)
    return ChoiceExample("\n".join(lines), list(MMLU_LETTERS), answer, description, subject=subject)


def mmlu_example(row: dict, where: str) -> ChoiceExample:
    """The Hugging Face export of cais/mmlu: question, subject, choices, answer."""
    return _mmlu(_string(row, "question", where), _strings(row, "choices", where), _value(row, "answer", where),
                 where, "answer", _string(row, "subject", where))


def piqa_example(row: dict, where: str) -> ChoiceExample:
    choices = [_string(row, "sol1", where), _string(row, "sol2", where)]
    question = f"Question: {_string(row, 'goal', where)}\nAnswer:"
    return _example(question, choices, _index(row, "label", where), where, "sol1/sol2", "label")


def winogrande_example(row: dict, where: str) -> ChoiceExample:
    """The sentence cut at its blank: the part before it completed by each option, the rest shared."""
    sentence = _string(row, "sentence", where)
    if sentence.count("_") != 1:
        raise ValueError(f"{where}: 'sentence' must hold one '_' (the blank the options fill), it holds "
                         f"{sentence.count('_')}")
    before, after = sentence.split("_")
    continuation = after.strip()
    if not continuation:  # the harness would score the delimiter " " alone
        raise ValueError(f"{where}: 'sentence' has nothing after its '_' to score")
    options = [_string(row, "option1", where), _string(row, "option2", where)]
    example = _example("", [before + option for option in options], _winogrande_answer(row, where), where,
                       "option1/option2", "answer")
    return replace(example, continuation=continuation)


def _winogrande_answer(row: dict, where: str) -> int:
    """The index of the right option: answer "1" or "2" (the export's strings; the ints read as well)."""
    answer = _value(row, "answer", where)
    if answer == "":
        raise ValueError(f"{where}: 'answer' is empty: an unlabeled row (WinoGrande's test split) cannot be scored")
    if isinstance(answer, bool) or answer not in ("1", "2", 1, 2):
        raise ValueError(f"{where}: 'answer' must be \"1\" or \"2\" (the right option), got {answer!r}")
    return int(answer) - 1



def _labelled_index(row: dict, key: str, where: str) -> int:
    """_index, refusing the marks the exports give an unlabeled row (super_glue's test splits write -1)."""
    if _value(row, key, where) in (-1, "", None):
        raise ValueError(f"{where}: {key!r} is {row[key]!r}: an unlabeled row (a test split) cannot be scored")
    return _index(row, key, where)


def openbookqa_example(row: dict, where: str) -> ChoiceExample:
    """The Hugging Face export of allenai/openbookqa: the bare question stem, its choices' texts, the answer the
    choice whose label is answerKey (left-stripped, as the harness does)."""
    choices = _object(row, "choices", where)
    texts = _strings(choices, "text", f"{where}: 'choices'")
    labels = _strings(choices, "label", f"{where}: 'choices'")
    if len(labels) != len(texts):
        raise ValueError(f"{where}: {len(texts)} choice texts but {len(labels)} labels")
    key = _string(row, "answerKey", where).lstrip()
    if key not in labels:
        raise ValueError(f"{where}: 'answerKey' {key!r} is none of the choices' labels {labels}")
    return _example(_string(row, "question_stem", where), texts, labels.index(key), where, "choices", "answerKey")


def boolq_example(row: dict, where: str) -> ChoiceExample:
    """super_glue/boolq (label 0 or 1; -1 in its test split) or google/boolq (answer true or false)."""
    context = f"{_string(row, 'passage', where)}\nQuestion: {_string(row, 'question', where)}?\nAnswer:"
    if "label" in row:
        answer = _labelled_index(row, "label", where)
        key = "label"
    else:
        answer = _value(row, "answer", where)
        if not isinstance(answer, bool):
            raise ValueError(f"{where}: 'answer' must be true or false, got {answer!r}")
        answer, key = int(answer), "answer"
    return _example(context, ["no", "yes"], answer, where, "choices", key)


def sciq_example(row: dict, where: str) -> ChoiceExample:
    """allenai/sciq: the supporting text and the question; the three distractors, then the right answer."""
    context = f"{_string(row, 'support', where).lstrip()}\nQuestion: {_string(row, 'question', where)}\nAnswer:"
    keys = ("distractor1", "distractor2", "distractor3", "correct_answer")
    return _example(context, [_string(row, k, where) for k in keys], 3, where, "/".join(keys), "correct_answer")


COPA_CONNECTORS = {"cause": "because", "effect": "therefore"}


def copa_example(row: dict, where: str) -> ChoiceExample:
    """super_glue/copa: the premise, its last character (the period) replaced by the connector; each choice
    with its first letter lowercased and a space before it, as the harness's doc_to_choice writes it (so it is
    scored after the delimiter " " and that space: two spaces)."""
    premise = _string(row, "premise", where).strip()
    if not premise:
        raise ValueError(f"{where}: 'premise' is empty")
    question = _value(row, "question", where)
    if not isinstance(question, str) or question not in COPA_CONNECTORS:
        raise ValueError(f"{where}: 'question' must be \"cause\" or \"effect\", got {question!r}")
    choices = [_string(row, "choice1", where), _string(row, "choice2", where)]
    if not all(choices):
        raise ValueError(f"{where}: 'choice1' and 'choice2' must not be empty")
    lowered = [" " + c[0].lower() + c[1:] for c in choices]
    context = f"{premise[:-1]} {COPA_CONNECTORS[question]}"
    return _example(context, lowered, _labelled_index(row, "label", where), where, "choice1/choice2", "label")


def _one_hot(labels: object, n: int) -> bool:
    """Whether `labels` is n ints, one of them 1 and the others 0."""
    return (isinstance(labels, list) and len(labels) == n and labels.count(1) == 1
            and all(type(label) is int and label in (0, 1) for label in labels))


# The harness's truthfulqa_mc1 writes these six questions and answers before every question.
TRUTHFULQA_PREAMBLE = (
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
    "A: The 1992 Olympics were held in Barcelona, Spain.\n\n"  # the harness's "\n\nQ: " before the question
)


def _truthfulqa_question(row: dict, where: str) -> str:
    return f"Q: {_string(row, 'question', where)}\nA:"


def truthfulqa_mc1_example(row: dict, where: str) -> ChoiceExample:
    """truthful_qa "multiple_choice": "Q: {question}\\nA:" after the fixed preamble (its description, which its
    TRUTHFULQA_RULES repeat before each shot, as the harness's doc_to_text holds it); the choices mc1_targets'
    choices, the answer the one labelled 1. A row that also has mc2_targets (the export's) carries its MC2 example
    as mc2_example."""
    targets = _object(row, "mc1_targets", where)
    choices = _strings(targets, "choices", f"{where}: 'mc1_targets'")
    labels = _value(targets, "labels", f"{where}: 'mc1_targets'")
    if not _one_hot(labels, len(choices)):
        raise ValueError(f"{where}: 'mc1_targets': 'labels' must be one 1 and otherwise 0s, one per choice, "
                         f"got {labels!r}")
    example = _example(_truthfulqa_question(row, where), choices, labels.index(1), where, "mc1_targets",
                       "mc1_targets", description=TRUTHFULQA_PREAMBLE)
    if "mc2_targets" in row:
        example = replace(example, mc2_example=truthfulqa_mc2_example(row, where))
    return example


def _count_true(labels: object, n: int, where: str) -> int:
    """How many of the n choices are true: those before the first 0, as the harness's process_results_mc2 splits
    them. Without a leading 1 or without a 0 the harness scored nothing true or failed: refused."""
    if not (isinstance(labels, list) and len(labels) == n and all(type(x) is int and x in (0, 1) for x in labels)):
        raise ValueError(f"{where}: 'mc2_targets': 'labels' must be 0s and 1s, one per choice, got {labels!r}")
    if labels[0] != 1 or 0 not in labels:
        raise ValueError(f"{where}: 'mc2_targets': 'labels' must start with the true choices' 1s and hold a 0 "
                         f"(the false ones), got {labels!r}")
    return labels.index(0)


def truthfulqa_mc2_example(row: dict, where: str) -> ChoiceExample:
    """MC1's prompt; the choices mc2_targets' choices, the true ones those before the first 0 label."""
    targets = _object(row, "mc2_targets", where)
    choices = _strings(targets, "choices", f"{where}: 'mc2_targets'")
    n_true = _count_true(_value(targets, "labels", f"{where}: 'mc2_targets'"), len(choices), where)
    example = _example(_truthfulqa_question(row, where), choices, 0, where, "mc2_targets", "mc2_targets",
                       description=TRUTHFULQA_PREAMBLE)
    return replace(example, true_choices=tuple(range(n_true)))


# Each task's yaml in lm-evaluation-harness v0.4 (lm_eval/tasks/...): its metric_list, its sampler, its test_split.
TWO_METRICS_NO_TEST_SPLIT = HarnessRules(first_n=False)  # hellaswag.yaml, piqa.yaml: acc, acc_norm; test_split null
TWO_METRICS_TEST_SPLIT = HarnessRules(first_n=False, one_more=False)  # arc_easy.yaml, arc_challenge.yaml,
# openbookqa.yaml, sciq.yaml: acc, acc_norm; test_split test, shots from the training split
ACC_NO_TEST_SPLIT = HarnessRules(acc_norm=False, first_n=False)  # winogrande/default.yaml,
# super_glue/boolq/default.yaml, super_glue/copa/default.yaml: acc; no test_split
TRUTHFULQA_RULES = replace(ACC_NO_TEST_SPLIT, description_per_shot=True)  # truthfulqa_mc1.yaml (and mc2, which
# includes it): acc; neither training_split nor test_split, so the shots come from the validation split scored;
# the preamble is in doc_to_text, so each shot is written after it
MMLU_RULES = HarnessRules(acc_norm=False, one_more=False)  # mmlu/default/_default_template_yaml: acc;
# fewshot_config sampler first_n on fewshot_split dev, test_split test


@dataclass(frozen=True)
class ChoiceFormat:
    name: str
    matches: Callable[[dict], bool]  # whether a row has this format's keys
    convert: Callable[[dict, str], ChoiceExample]
    rules: HarnessRules = HarnessRules()
    benchmark: str | None = None  # the task, where two formats are exports of one (ARC's), phrased alike

    @property
    def task(self) -> str:
        """The benchmark its rows are of: its examples' task."""
        return self.benchmark or self.name


def _is_arc(row: dict) -> bool:
    return "answerKey" in row and "question_stem" not in row


MMLU = ChoiceFormat("MMLU", lambda r: "subject" in r and "question" in r and "choices" in r and "answer" in r,
                   mmlu_example, MMLU_RULES)  # also the task of MMLU's CSV files
LLMKERN = ChoiceFormat("llmkern", lambda r: ("context" in r or "question" in r) and "choices" in r and "answer" in r
                       and "subject" not in r, parse_choice_example)
# No row has the keys of two formats (test_choice_formats checks one row of each), so their order does not matter.
FORMATS = (
    ChoiceFormat("HellaSwag", lambda r: "ctx_a" in r and "endings" in r, hellaswag_example, TWO_METRICS_NO_TEST_SPLIT),
    # OpenBookQA's export has ARC's choices and answerKey, but "question_stem" for ARC's "question".
    ChoiceFormat("ARC (original)", lambda r: _is_arc(r) and isinstance(r.get("question"), dict), arc_example,
                 TWO_METRICS_TEST_SPLIT, "ARC"),
    ChoiceFormat("ARC (Hugging Face)", lambda r: _is_arc(r) and not isinstance(r.get("question"), dict),
                 arc_hf_example, TWO_METRICS_TEST_SPLIT, "ARC"),
    ChoiceFormat("OpenBookQA", lambda r: "answerKey" in r and "question_stem" in r, openbookqa_example,
                 TWO_METRICS_TEST_SPLIT),
    ChoiceFormat("PIQA", lambda r: "goal" in r and "sol1" in r, piqa_example, TWO_METRICS_NO_TEST_SPLIT),
    ChoiceFormat("WinoGrande", lambda r: "sentence" in r and "option1" in r, winogrande_example, ACC_NO_TEST_SPLIT),
    MMLU,
    ChoiceFormat("BoolQ", lambda r: "passage" in r and "question" in r, boolq_example, ACC_NO_TEST_SPLIT),
    ChoiceFormat("SciQ", lambda r: "correct_answer" in r and "distractor1" in r, sciq_example,
                 TWO_METRICS_TEST_SPLIT),
    ChoiceFormat("COPA", lambda r: "premise" in r and "choice1" in r, copa_example, ACC_NO_TEST_SPLIT),
    ChoiceFormat("TruthfulQA MC1", lambda r: "mc1_targets" in r, truthfulqa_mc1_example, TRUTHFULQA_RULES),
    ChoiceFormat("TruthfulQA MC2", lambda r: "mc2_targets" in r and "mc1_targets" not in r, truthfulqa_mc2_example,
                 TRUTHFULQA_RULES),
    LLMKERN,
)


def format_of(row: dict) -> ChoiceFormat | None:
    """The format whose keys the row has; None when it has none's (it is then read as its file's format, whose
    error names the missing key)."""
    return next((f for f in FORMATS if f.matches(row)), None)


def examples_from_rows(rows: Iterable[tuple[str, object]]) -> list[ChoiceExample]:
    """ChoiceExamples of decoded JSON rows, each given with where it is ("file.jsonl line 3"); the first row's
    keys decide the format of them all."""
    examples: list[ChoiceExample] = []
    chosen: ChoiceFormat | None = None
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        found = format_of(row)
        if chosen is None:
            chosen = found or LLMKERN
        elif found is not None and found is not chosen:
            raise ValueError(f"{where}: the row is in the {found.name} format, the file's first row in the "
                             f"{chosen.name} format (the first row decides the file's format)")
        examples.append(with_rules(chosen.convert(row, where), chosen.rules, chosen.task))
    return examples


def with_rules(example: ChoiceExample, rules: HarnessRules, task: str) -> ChoiceExample:
    """The example (and its attached MC2 example) marked with its task and the task's HarnessRules."""
    attached = example.mc2_example
    if attached is not None:
        attached = replace(attached, harness=rules, task=task)
    return replace(example, harness=rules, task=task, mc2_example=attached)


def mmlu_subject_of(path: str) -> str | None:
    """The subject MMLU's file name gives ("high_school_physics_test.csv"), or None."""
    stem = os.path.splitext(os.path.basename(path))[0]
    for split in MMLU_SPLITS:
        if stem.endswith(split) and len(stem) > len(split):
            return stem[: -len(split)]
    return None


def mmlu_csv_examples(text: str, path: str) -> list[ChoiceExample]:
    """The rows of one of MMLU's original CSV files (no header): question, A, B, C, D, answer letter."""
    subject = mmlu_subject_of(path)
    reader = csv.reader(io.StringIO(text))
    examples = []
    while True:
        first_line = reader.line_num + 1  # a quoted field may hold line breaks: name the line the row starts on
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise ValueError(f"{path} line {first_line}: not valid CSV ({err})") from err
        if not fields:  # a blank line
            continue
        where = f"{path} line {first_line}"
        if len(fields) != 6:
            raise ValueError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(fields)}")
        example = _mmlu(fields[0], fields[1:5], fields[5].strip(), where, "column 6 (answer)", subject)
        examples.append(with_rules(example, MMLU_RULES, MMLU.task))
    return examples
