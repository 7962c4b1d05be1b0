"""GSM8K as lm-evaluation-harness's gsm8k task: answer extraction, normalization, prompts, shots, generation, CLI.

The expected values of the extraction and normalization tables are worked out by hand from the harness's
gsm8k.yaml (version 3): strict-match regex "#### (\\-?[0-9\\.\\,]+)", first match; flexible-extract regex
"(-?[$0-9.,]{2,})|(-?[0-9]+)", last match; exact_match removing ",", "\\$", "(?s).*#### ", "\\.$" in turn from both
sides, then lower-casing.
"""

import json
import math
import random

import pytest
import torch

from llmkern.data.tokenizer import get_tokenizer
from llmkern.eval.gsm8k import (
    INVALID,
    evaluate_gsm8k,
    flexible_extract,
    gsm8k_prompt,
    harness_shots,
    is_exact_match,
    load_gsm8k,
    normalize_answer,
    strict_match,
)
from llmkern.model import GPT, GPTConfig, generate
from llmkern.train import checkpoint as ckpt

BYTES = get_tokenizer("bytes")


def tiny_gpt(block_size=64, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig.from_preset("tiny", vocab_size=257, block_size=block_size, n_layer=1, n_head=2, n_embd=32,
                                   backend="torch")
    return GPT(config).eval()


def rows(n, start=0):
    return [{"question": f"Q{i}: what is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
            for i in range(start, start + n)]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


# --- extraction and normalization -----------------------------------------------------------------------

EXTRACTED = [  # (response, strict-match, flexible-extract)
    ("48 + 24 = 72 clips.\n#### 72", "72", "72"),
    ("She earns $1,200.50 a week.\n#### 1,200.50", "1,200.50", "1,200.50"),
    ("It costs $18.", INVALID, "$18."),  # "$", digits and the period are one run
    ("The total is -5 degrees", INVALID, "-5"),  # "-5" has one character after "-": the second alternative
    ("#### -3", "-3", "-3"),
    ("#### 3\n#### 4", "3", "4"),  # strict: the first; flexible: the last
    ("#### 12 apples #### 13", "12", "13"),
    ("no number here", INVALID, INVALID),
    ("####5 apples", INVALID, "5"),  # strict needs the space
    ("1. Add them: 2+3=5", INVALID, "5"),  # "1." is a run, but not the last
    ("#### 1,000,000.", "1,000,000.", "1,000,000."),
    (" #### 7\n\nthen 8 more", "7", "8"),
]


@pytest.mark.parametrize("response, strict, flexible", EXTRACTED)
def test_answers_are_extracted_as_the_harness_filters_do(response, strict, flexible):
    assert strict_match(response) == strict
    assert flexible_extract(response) == flexible


MATCHES = [  # (extracted answer, reference solution, exact match)
    ("1,200", "So 1,200 in all.\n#### 1200", True),
    ("1200", "#### 1,200", True),  # commas go from the reference too
    ("$18.", "The cost is $18.\n#### 18", True),  # "$" and the trailing period removed
    ("18.0", "#### 18", False),
    ("-5", "#### -5", True),
    ("5", "#### -5", False),
    (INVALID, "#### 5", False),
    ("12", "First #### 3 then\n#### 12", True),  # (?s).*: up to the last "#### ", across lines
    ("3", "First #### 3 then\n#### 12", False),
    ("5.$", "#### 5", True),  # "\$" comes before "\.$": "5." then "5"
    ("5..", "#### 5", False),  # one period only
    ("5.\n", "#### 5", False),  # "\.$" matches before a final newline, which stays
    ("7", "#### 7.", True),
    ("ABC", "#### abc", True),  # ignore_case
    ("1.5", "#### 1.50", False),
]


@pytest.mark.parametrize("prediction, answer, expected", MATCHES)
def test_exact_match_normalizes_as_the_harness(prediction, answer, expected):
    assert is_exact_match(prediction, answer) is expected


def test_a_gsm8k_solution_normalizes_to_its_final_number():
    answer = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
              "in April and May.\n#### 72")
    assert normalize_answer(answer) == "72"
    assert normalize_answer("He has $2,125 left.\n#### 2,125") == "2125"


# --- prompts and shots ----------------------------------------------------------------------------------

def test_prompt_with_shots_is_the_harness_prompt_byte_for_byte():
    shots = [{"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}, {"question": "Q2?", "answer": "A2\n#### 3"}]
    assert gsm8k_prompt("Then?", shots) == ("Question: What is 1+1?\nAnswer: 1+1=2\n#### 2\n\n"
                                            "Question: Q2?\nAnswer: A2\n#### 3\n\n"
                                            "Question: Then?\nAnswer:")
    assert gsm8k_prompt("Alone?") == "Question: Alone?\nAnswer:"


def test_shots_are_drawn_as_the_harness_draws_them_from_the_train_split():
    pool, examples = rows(20), rows(6, start=100)
    # The harness: one random.Random(1234) for the task; for each test doc in order, rnd.sample(train, k).
    rnd = random.Random(1234)
    expected = [rnd.sample(pool, 3) for _ in examples]
    assert harness_shots(examples, pool, 3) == expected
    assert harness_shots(examples[:2], pool, 3) == expected[:2]  # --limit keeps the first questions' shots
    assert harness_shots(examples, pool, 0) == [[]] * 6


def test_a_shot_equal_to_the_question_is_dropped_not_replaced():
    pool = rows(4)
    shots = harness_shots(pool, pool, 4)  # every draw is the whole pool, which holds the question
    assert [len(s) for s in shots] == [3, 3, 3, 3]
    assert all(ex not in s for ex, s in zip(pool, shots))


# --- rows and options ------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ('{"question": "Q?"}', "line 2: expected a JSON object with string 'question' and 'answer'"),
    ('{"question": "Q?", "answer": 7}', "line 2: expected a JSON object"),
    ('["Q?", "#### 1"]', "line 2: expected a JSON object"),
    ('{"question": "  ", "answer": "#### 1"}', "line 2: 'question' is empty"),
    ('{"question": "Q?", "answer": "It is 5."}', "line 2: 'answer' must end with '#### <number>'"),
    ('{"question": "Q?", "answer": "#### "}', "line 2: 'answer' must end with '#### <number>'"),
    ('{"question": "Q?", "answer": ', "line 2: not valid JSON"),
])
def test_bad_rows_are_refused_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "gsm8k_test.jsonl"
    path.write_text(json.dumps(rows(1)[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match="gsm8k_test.jsonl " + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*")):
        load_gsm8k(str(path))


def test_rows_load_from_jsonl_or_a_json_list(tmp_path):
    items = [{**r, "extra": 1} for r in rows(3)]
    listed = tmp_path / "test.json"
    listed.write_text(json.dumps(items))
    assert load_gsm8k(write_jsonl(tmp_path / "test.jsonl", items)) == load_gsm8k(str(listed)) == rows(3)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no examples"):
        load_gsm8k(str(tmp_path / "empty.jsonl"))


@pytest.mark.parametrize("kwargs, message", [
    ({"fewshot": 5}, "fewshot=5 needs fewshot_data"),
    ({"fewshot": 0, "fewshot_data": rows(3)}, "fewshot_data has no effect with fewshot=0"),
    ({"fewshot": -1}, "fewshot must be an int >= 0"),
    ({"fewshot": 4, "fewshot_data": rows(3)}, "fewshot=4 needs 4 solved examples"),
    ({"fewshot": 0, "limit": 0}, "limit must be a positive int"),
    ({"fewshot": 0, "batch_size": 0}, "batch_size must be a positive int"),
    ({"fewshot": 0, "max_new_tokens": 64}, "leaves no room for a prompt"),
    ({"fewshot": 0, "max_new_tokens": True}, "max_new_tokens must be a positive int"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_gsm8k(tiny_gpt(block_size=64), BYTES, rows(2), **kwargs)


# --- generation and scoring ------------------------------------------------------------------------------

SCRIPTED = [  # (reference answer, what the model writes, the response kept, strict right, flexible right)
    ("#### 72", " So 72.\n#### 72\n\nQuestion: B?", " So 72.\n#### 72\n\n", True, True),
    ("#### 1,000", " It is $1,000.<EOT>more #### 5", " It is $1,000.", False, True),
    ("#### 5", " #### 6 and then 5</s> #### 5", " #### 6 and then 5", False, True),
    ("#### 9", " #### 9<|im_end|> #### 10", " #### 9", True, True),
    ("#### 4", "#### 4" + " 5" * 40, "#### 4" + " 5" * 17, True, False),  # cut at max_new_tokens = 40 bytes
]


def scripted_tokens(text):
    """The bytes of text, with <EOT> as the bytes tokenizer's end-of-text id."""
    before, eot, after = text.partition("<EOT>")
    return BYTES.encode(before) + ([BYTES.eot_token] + BYTES.encode(after) if eot else [])


def test_generation_stops_at_the_harness_stop_texts_and_is_scored(monkeypatch):
    import llmkern.model

    examples = [{"question": f"Q{i}?", "answer": answer} for i, (answer, *_) in enumerate(SCRIPTED)]
    script = {gsm8k_prompt(ex["question"]): scripted_tokens(text) for ex, (_, text, *_) in zip(examples, SCRIPTED)}
    written = {}

    def fake_generate(model, prompts, max_new_tokens, temperature=1.0, eos_token=None, stop=None, **kwargs):
        # writes each prompt's scripted tokens one at a time, stopping as generate does: at eos_token, when
        # stop() says so, or after max_new_tokens
        assert temperature == 0.0 and eos_token == BYTES.eot_token and len(prompts) <= 2
        out = []
        for ids in prompts:
            tokens = script[BYTES.decode(ids)]
            new = []
            for tok in tokens[:max_new_tokens]:
                new.append(tok)
                if tok == eos_token or stop(new):
                    break
            written[BYTES.decode(ids)] = BYTES.decode(new)
            out.append(list(ids) + new)
        return out

    monkeypatch.setattr(llmkern.model, "generate", fake_generate)
    result = evaluate_gsm8k(tiny_gpt(block_size=64), BYTES, examples, fewshot=0, max_new_tokens=40, batch_size=2,
                            return_predictions=True)
    assert written[gsm8k_prompt("Q0?")].endswith("Question:")  # stopped at the stop text, not run on
    assert written[gsm8k_prompt("Q2?")].endswith("</s>") and written[gsm8k_prompt("Q3?")].endswith("<|im_end|>")
    for prediction, (_, _, kept, strict_right, flexible_right) in zip(result["predictions"], SCRIPTED):
        assert prediction["response"] == kept
        assert (prediction["strict_correct"], prediction["flexible_correct"]) == (strict_right, flexible_right)
    assert result["exact_match_strict"] == pytest.approx(3 / 5)
    assert result["exact_match_flexible"] == pytest.approx(4 / 5)
    # the harness's mean_stderr: sample variance (n - 1) over n, root; 3 of 5: 0.3 / 5, 4 of 5: 0.2 / 5
    assert result["exact_match_strict_stderr"] == pytest.approx(math.sqrt(0.3 / 5))
    assert result["exact_match_flexible_stderr"] == pytest.approx(0.2)
    assert result["examples"] == 5 and result["fewshot"] == 0 and result["cut_prompts"] == 0


def test_batched_responses_are_each_prompts_own_greedy_continuation():
    model = tiny_gpt(block_size=64, seed=3)
    examples, pool = rows(5, start=7), rows(4)
    result = evaluate_gsm8k(model, BYTES, examples, fewshot=1, fewshot_data=pool, max_new_tokens=6, batch_size=2,
                            return_predictions=True)
    room = 64 - 6
    prompts = [gsm8k_prompt(ex["question"], shots) for ex, shots in zip(examples, harness_shots(examples, pool, 1))]
    for prompt, prediction in zip(prompts, result["predictions"]):
        ids = BYTES.encode(prompt)[-room:]  # left-cut to fit, as the harness cuts
        new = generate(model, [ids], 6, temperature=0.0)[0][len(ids):]
        text = BYTES.decode(new[: new.index(BYTES.eot_token)] if BYTES.eot_token in new else new)
        for stop in ("Question:", "</s>", "<|im_end|>"):
            text = text.split(stop)[0]
        assert prediction["response"] == text
        assert prediction["strict"] == strict_match(text) and prediction["flexible"] == flexible_extract(text)
    assert result["cut_prompts"] == sum(len(BYTES.encode(p)) > room for p in prompts) > 0


# --- the command -----------------------------------------------------------------------------------------

def test_eval_command_gsm8k(tmp_path, capsys):
    from llmkern.cli import main

    model = tiny_gpt(block_size=64, seed=1)
    run = str(tmp_path / "run")
    ckpt.save_checkpoint(run, 1, model.state_dict(), {}, {"model_config": model.config.to_dict(),
                                                          "tokenizer": "bytes"})
    test = write_jsonl(tmp_path / "gsm8k_test.jsonl", rows(4, start=10))
    train = write_jsonl(tmp_path / "gsm8k_train.jsonl", rows(6))
    out = tmp_path / "result.json"
    base = ["eval", "--run", run, "--task", "gsm8k", "--data", test, "--device", "cpu", "--quiet"]
    assert main(base + ["--fewshot-data", train, "--fewshot", "2", "--limit", "3", "--max-new-tokens", "5",
                        "--batch-size", "2", "--predictions", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["exact_match_strict", "exact_match_flexible", "examples",
                                                   "cut_prompts"]
    saved = json.loads(out.read_text())
    for line, name in zip(lines, ("exact_match_strict", "exact_match_flexible")):  # "0.3333 ± 0.3333"
        assert line.split()[1:] == [f"{saved[name]:.4f}", "±", f"{saved[name + '_stderr']:.4f}"]
    direct = evaluate_gsm8k(model, BYTES, test, fewshot=2, fewshot_data=train, limit=3, max_new_tokens=5,
                            return_predictions=True)
    assert saved["task"] == "gsm8k" and saved["examples"] == 3 and saved["fewshot"] == 2
    assert saved["predictions"] == direct["predictions"]
    assert saved["exact_match_strict"] == direct["exact_match_strict"]

    assert main(base) == 2  # 5 shots by default, as the harness: from the train split, which is needed
    assert "--fewshot-data train.jsonl (or --fewshot 0)" in capsys.readouterr().err
    assert main(base + ["--fewshot", "0", "--max-new-tokens", "64"]) == 2
    assert "leaves no room for a prompt" in capsys.readouterr().err
    assert main(base + ["--fewshot-data", train, "--fewshot", "0"]) == 2
    assert "--fewshot-data needs --fewshot K" in capsys.readouterr().err
    assert main(base + ["--fewshot", "0", "--max-new-tokens", "4", "--json", str(out)]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text())["examples"] == 4
