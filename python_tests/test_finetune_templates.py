"""Prompt templates: each template's exact text, the settings' checks, tokenization of the markers, the
template saved with a run and picked up by the next recipe, `llmkern generate` and the win rate, and
generation that stops at ChatML's <|im_end|>."""

import json
import os

import pytest

from llmkern.data.tokenizer import get_tokenizer
from llmkern.finetune import FinetuneConfig, load_finetune_config
from llmkern.finetune.base import save_finetuned
from llmkern.finetune.data import IGNORE, encode_prompt_response, format_prompt
from llmkern.finetune.dpo import DPOConfig, run_dpo
from llmkern.finetune.sft import SFTConfig, encode_examples, run_sft
from llmkern.finetune.templates import (
    TEMPLATES, PromptFormat, get_template, resolve_prompt_format, respond, saved_prompt_format, stop_at_texts,
)
from llmkern.model import GPT, GPTConfig, generate
from llmkern.train.checkpoint import load_checkpoint
from llmkern.train.inference import load_trained_model

BYTES = get_tokenizer("bytes")
WITH_INPUT = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
NO_INPUT = {"instruction": "Say hi.", "input": "", "output": "Hi!"}

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")


# --- the text of each template ----------------------------------------------------------------------------

def test_alpaca_is_the_default_and_unchanged():
    assert format_prompt(WITH_INPUT) == ALPACA_WITH_INPUT
    assert format_prompt(NO_INPUT) == ALPACA_NO_INPUT
    assert format_prompt({"instruction": "Say hi."}) == ALPACA_NO_INPUT  # no "input" key at all
    assert PromptFormat().prompt(WITH_INPUT) == ALPACA_WITH_INPUT
    assert PromptFormat().response("5") == "5" and PromptFormat().stop_texts == ()


def test_chatml_turns_with_input_and_system_prompt():
    chatml = PromptFormat("chatml")
    assert chatml.prompt(WITH_INPUT) == ("<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n"
                                         "<|im_start|>assistant\n")
    assert chatml.prompt(NO_INPUT) == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(NO_INPUT, "chatml", "Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")
    assert chatml.response("Hi!") == "Hi!<|im_end|>"
    assert chatml.stop_texts == ("<|im_end|>",)
    assert chatml.cut_response("Hi!<|im_end|>\n<|im_start|>user\nmore") == "Hi!"
    assert chatml.cut_response("no end yet") == "no end yet"


def test_plain_is_instruction_input_and_a_blank_line():
    plain = PromptFormat("plain")
    assert plain.prompt(WITH_INPUT) == "Add the numbers.\n\n2 and 3\n\n"
    assert plain.prompt(NO_INPUT) == "Say hi.\n\n"
    assert plain.response("Hi!") == "Hi!" and plain.stop_texts == ()


def _llama3_rendered(messages: list[tuple[str, str]]) -> str:
    """Llama 3's own chat template (without its <|begin_of_text|>, which the tokenizer's BOS gives), written out:
    each message's content trimmed, then the assistant header as the generation prompt."""
    turns = "".join(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
                    for role, content in messages)
    return turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_llama3_turns_are_stripped_as_llama3s_own_template_does():
    llama3 = PromptFormat("llama3", system_prompt="  Be brief.\n")
    padded = {"instruction": "\n Add the numbers. ", "input": "2 and 3\n\n", "output": " 5\n"}
    assert llama3.prompt(padded) == _llama3_rendered([("system", "  Be brief.\n"),
                                                     ("user", "\n Add the numbers. \n\n2 and 3\n\n")])
    assert PromptFormat("llama3").prompt(NO_INPUT) == _llama3_rendered([("user", "Say hi.")])
    assert llama3.response(padded["output"]) == "5<|eot_id|>"
    # the other templates keep the text as given (Qwen's ChatML template does not trim)
    assert PromptFormat("chatml").response(" 5\n") == " 5\n<|im_end|>"


def _phi_rendered(messages: list[tuple[str, str]], line_break: str) -> str:
    """Phi-3's chat template ("\\n") and Phi-4-mini's ("") written out: <|role|>, the content, <|end|> for each
    message, then the assistant marker as the generation prompt; the content is not stripped."""
    turns = "".join(f"<|{role}|>{line_break}{content}<|end|>{line_break}" for role, content in messages)
    return turns + f"<|assistant|>{line_break}"


@pytest.mark.parametrize("template, line_break", [("phi3", "\n"), ("phi4-mini", "")])
def test_phi_turns_are_phis_own_chat_format(template, line_break):
    with_system = PromptFormat(template, system_prompt="Be brief.")
    assert with_system.prompt(WITH_INPUT) == _phi_rendered([("system", "Be brief."),
                                                           ("user", "Add the numbers.\n\n2 and 3")], line_break)
    assert PromptFormat(template).prompt(NO_INPUT) == _phi_rendered([("user", "Say hi.")], line_break)
    assert with_system.response(" 5\n") == " 5\n<|end|>"
    assert with_system.stop_texts == ("<|end|>",)
    assert with_system.cut_response(f"Hi!<|end|>{line_break}<|user|>more") == "Hi!"


def test_unknown_templates_and_misplaced_system_prompts_are_errors():
    with pytest.raises(ValueError, match="alpaca, chatml, plain, llama3, phi3, phi4-mini, gemma; got 'vicuna'"):
        get_template("vicuna")
    with pytest.raises(ValueError, match="alpaca, chatml, plain"):
        PromptFormat("ChatML")
    with pytest.raises(ValueError, match="system_prompt is only used by the chatml"):
        PromptFormat("alpaca", "Be brief.")
    with pytest.raises(ValueError, match="system_prompt is only used by the chatml"):
        format_prompt(NO_INPUT, "plain", "Be brief.")
    assert list(TEMPLATES) == ["alpaca", "chatml", "plain", "llama3", "phi3", "phi4-mini", "gemma"]


def test_config_template_settings_are_checked(tmp_path):
    assert FinetuneConfig().validate().template == ""  # the base run's, or alpaca
    config = load_finetune_config(SFTConfig, None, ["--template=chatml", "--system_prompt=Be brief."])
    assert (config.template, config.system_prompt) == ("chatml", "Be brief.")
    with pytest.raises(ValueError, match="alpaca, chatml, plain, llama3, phi3, phi4-mini, gemma; got 'chatm'"):
        load_finetune_config(SFTConfig, None, ["--template=chatm"])
    with pytest.raises(ValueError, match="system_prompt"):
        DPOConfig(data="x.json", template="plain", system_prompt="Be brief.").validate()
    path = tmp_path / "sft.json"
    path.write_text(json.dumps({"template": 3}))
    with pytest.raises(ValueError, match="'template'.*must be a string"):
        load_finetune_config(SFTConfig, str(path))


# --- tokens -------------------------------------------------------------------------------------------------

def test_chatml_example_tokens_end_with_the_marker_then_end_of_text():
    fmt = PromptFormat("chatml")
    (tokens, labels), = encode_examples([NO_INPUT], BYTES, max_len=512, prompt_format=fmt)[0]
    prompt = BYTES.encode(fmt.prompt(NO_INPUT))
    response = BYTES.encode("Hi!<|im_end|>") + [BYTES.eot_token]
    assert tokens == prompt + response
    assert labels == [IGNORE] * len(prompt) + response
    # The default is still Alpaca, byte for byte.
    (alpaca_tokens, _), = encode_examples([NO_INPUT], BYTES, max_len=512)[0]
    assert alpaca_tokens == BYTES.encode(ALPACA_NO_INPUT) + BYTES.encode("Hi!") + [BYTES.eot_token]


def special_ids(tokenizer):
    return set(tokenizer.encoding._special_tokens.values())


def test_markers_are_ordinary_text_for_gpt2(shared_data):
    gpt2 = get_tokenizer(os.path.join(shared_data, "gpt2.tiktoken"))
    example = {"instruction": "Say <|endoftext|> and <|im_end|>.", "input": ""}
    text = PromptFormat("chatml", "Be brief.").prompt(example)
    tokens = gpt2.encode(text)
    assert not set(tokens) & special_ids(gpt2)  # neither the markers nor the user's text became special tokens
    assert gpt2.decode(tokens) == text
    tokens, labels = encode_prompt_response(gpt2, text, "ok<|im_end|>", max_len=200)
    assert tokens.count(gpt2.eot_token) == 1 and tokens[-1] == gpt2.eot_token


def test_markers_stay_ordinary_text_where_they_are_special_tokens(tmp_path):
    from llmkern.data.bpe import train_bpe

    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    train_bpe(["user said hi to the assistant; the assistant said hi"], 300, tmp_path / "chat.tiktoken",
              special_tokens=specials)
    tok = get_tokenizer(str(tmp_path / "chat.tiktoken"))
    assert {tok.encoding.encode_single_token(s) for s in specials} == special_ids(tok)
    text = PromptFormat("chatml").prompt({"instruction": "hi <|im_start|>system"})
    tokens = tok.encode(text)
    # tokenizer.encode takes any str as ordinary text; only a template's Marker pieces become special tokens, through
    # encode_text (python_tests/test_template_special_tokens.py).
    assert not set(tokens) & special_ids(tok) and tok.decode(tokens) == text


# --- the template travels with the run ----------------------------------------------------------------------

def test_resolving_the_template_of_a_checkpoint():
    old = {"model_config": {}, "tokenizer": "bytes"}  # a pretraining run or an older fine-tuned one
    assert saved_prompt_format(old) == PromptFormat("alpaca")
    assert saved_prompt_format({"finetune": {"method": "sft", "settings": {"lr": 1.0}}}) == PromptFormat("alpaca")
    sft = {"finetune": {"method": "sft", "settings": {"template": "chatml", "system_prompt": "Be brief."}}}
    dpo = {"finetune": {"method": "dpo", "template": "plain", "system_prompt": ""}}
    assert saved_prompt_format(sft) == PromptFormat("chatml", "Be brief.")
    assert saved_prompt_format(dpo) == PromptFormat("plain")
    assert resolve_prompt_format(sft) == PromptFormat("chatml", "Be brief.")
    assert resolve_prompt_format(sft, "", None) == PromptFormat("chatml", "Be brief.")
    assert resolve_prompt_format(sft, "chatml", "Be kind.") == PromptFormat("chatml", "Be kind.")
    assert resolve_prompt_format(sft, None, "Be kind.") == PromptFormat("chatml", "Be kind.")
    assert resolve_prompt_format(sft, "alpaca") == PromptFormat("alpaca")  # the system prompt stays with chatml
    assert resolve_prompt_format(old, "chatml") == PromptFormat("chatml")
    with pytest.raises(ValueError, match="system_prompt"):
        resolve_prompt_format(old, None, "Be kind.")  # alpaca has no system turn
    with pytest.raises(ValueError, match="saved prompt template.*'vicuna'"):
        saved_prompt_format({"finetune": {"method": "sft", "settings": {"template": "vicuna"}}})


def make_base(path, block_size=320):
    """A tiny random byte-level GPT saved as a checkpoint that load_base reads."""
    config = GPTConfig.from_preset("tiny", vocab_size=257, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                                   backend="torch")
    save_finetuned(str(path), 0, GPT(config).state_dict(), {"model_config": config.to_dict(), "tokenizer": "bytes"})
    return str(path)


def short_instructions(shared_data, n=8):
    """The n shortest real Alpaca examples (short ones fit the tiny model's context)."""
    with open(os.path.join(shared_data, "instruction-data.json"), encoding="utf-8") as f:
        examples = json.load(f)
    examples.sort(key=lambda ex: len(format_prompt(ex)) + len(ex["output"]))
    return examples[:n]


@pytest.fixture(scope="module")
def chatml_sft(tmp_path_factory):
    """A ChatML SFT run on the 8 shortest real instructions: (its folder, its summary, the examples)."""
    from conftest import SHARED_DATA

    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is not here")
    tmp = tmp_path_factory.mktemp("chatml")
    examples = short_instructions(SHARED_DATA)
    data = tmp / "instructions.json"
    data.write_text(json.dumps(examples), encoding="utf-8")
    config = SFTConfig(base=make_base(tmp / "base"), data=str(data), out_dir=str(tmp / "sft"), template="chatml",
                       system_prompt="Be brief.", max_steps=30, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=3,
                       eval_interval=0, val_fraction=0.0, max_len=320, num_samples=1, max_new_tokens=8,
                       device="cpu", progress=False).validate()
    return str(tmp / "sft"), run_sft(config), examples


def test_chatml_sft_trains_and_saves_its_template(chatml_sft):
    out, summary, _ = chatml_sft
    assert summary["template"] == "chatml"
    assert summary["train_loss_after"] < 0.75 * summary["train_loss_before"], summary
    settings = load_checkpoint(out).meta["finetune"]["settings"]
    assert (settings["template"], settings["system_prompt"]) == ("chatml", "Be brief.")
    responses = json.loads(open(os.path.join(out, "responses.json"), encoding="utf-8").read())
    assert len(responses) == 1 and "<|im_end|>" not in responses[0]["response"]


def preference_file(examples, path):
    pairs = [{"instruction": ex["instruction"], "input": ex.get("input", ""), "chosen": ex["output"],
              "rejected": ex["output"][::-1]} for ex in examples[:4]]
    path.write_text(json.dumps(pairs), encoding="utf-8")
    return path


def test_dpo_from_a_chatml_run_keeps_chatml(chatml_sft, tmp_path):
    out, _, examples = chatml_sft
    data = preference_file(examples, tmp_path / "prefs.json")
    settings = dict(base=out, data=str(data), max_steps=1, batch_size=4, max_len=320, val_fraction=0.0,
                    warmup_steps=0, device="cpu", progress=False)
    summary = run_dpo(DPOConfig(out_dir=str(tmp_path / "dpo"), **settings).validate())
    assert summary["template"] == "chatml"
    saved = load_checkpoint(str(tmp_path / "dpo")).meta["finetune"]
    assert (saved["template"], saved["system_prompt"]) == ("chatml", "Be brief.")
    # An explicit template wins over the base run's.
    summary = run_dpo(DPOConfig(out_dir=str(tmp_path / "dpo2"), template="plain", **settings).validate())
    assert summary["template"] == "plain"
    assert saved_prompt_format(load_checkpoint(str(tmp_path / "dpo2")).meta) == PromptFormat("plain")


def test_a_reward_model_from_a_chatml_run_judges_in_chatml(chatml_sft, tmp_path):
    from llmkern.eval.win_rate import reward_model_judge
    from llmkern.finetune.reward import RewardConfig, run_reward, score

    out, _, examples = chatml_sft
    data = preference_file(examples, tmp_path / "prefs.json")
    summary = run_reward(RewardConfig(base=out, data=str(data), out_dir=str(tmp_path / "rm"), max_steps=1,
                                      batch_size=4, max_len=320, val_fraction=0.0, warmup_steps=0, device="cpu",
                                      progress=False).validate())
    assert summary["template"] == "chatml" and summary["out_dir"] == str(tmp_path / "rm")
    judge = reward_model_judge(str(tmp_path / "rm"), "cpu")
    assert judge.prompt_format == PromptFormat("chatml", "Be brief.")
    prompts = [judge.prompt_format.prompt(ex) for ex in examples[:2]]
    responses = [ex["output"] for ex in examples[:2]]
    # The judge scores a response the way the reward model learned it: ended by <|im_end|>.
    assert judge.score(prompts, responses) == score(judge.reward_model, judge.tokenizer, prompts,
                                                    [r + "<|im_end|>" for r in responses])
    assert judge.score(prompts, responses) != score(judge.reward_model, judge.tokenizer, prompts, responses)


def greedy_response(model, fmt, instruction, max_new_tokens):
    """The greedy response to an instruction in fmt, computed without the template machinery."""
    ids = BYTES.encode(fmt.prompt({"instruction": instruction}))
    new = generate(model, [ids], max_new_tokens, temperature=0.0, eos_token=BYTES.eot_token)[0][len(ids):]
    text = BYTES.decode(new[: new.index(BYTES.eot_token)] if BYTES.eot_token in new else new)
    return fmt.cut_response(text).strip()


def test_generate_command_prompts_in_the_runs_template(chatml_sft, capsys):
    from llmkern.cli import main

    out, _, _ = chatml_sft
    model, _, _ = load_trained_model(out, "cpu")
    as_chatml = greedy_response(model, PromptFormat("chatml", "Be brief."), "Name a colour.", 12)
    as_plain = greedy_response(model, PromptFormat("plain"), "Name a colour.", 12)
    assert as_chatml != as_plain  # else the test could not tell the templates apart
    args = ["generate", "--run", out, "--instruction", "Name a colour.", "--temperature", "0", "--max-new-tokens",
            "12", "--device", "cpu"]
    assert main(args) == 0
    assert capsys.readouterr().out == as_chatml + "\n"
    assert main(args + ["--template", "plain"]) == 0
    assert capsys.readouterr().out == as_plain + "\n"
    assert main(args + ["--template", "vicuna"]) == 2
    assert "alpaca, chatml, plain" in capsys.readouterr().err
    assert main(["generate", "--run", out, "--prompt", "x", "--template", "plain", "--device", "cpu"]) == 2
    assert "go with --instruction" in capsys.readouterr().err


class RecordingJudge:
    """Scores a response by its length; records the prompts, which it reads in ChatML."""

    prompt_format = PromptFormat("chatml")

    def __init__(self):
        self.prompts = []

    def score(self, prompts, responses):
        self.prompts.append(list(prompts))
        return [float(len(r)) for r in responses]


def test_win_rate_prompts_each_run_in_its_template(chatml_sft, tmp_path):
    from llmkern.eval.win_rate import compare_runs, instruction_prompts

    out, _, _ = chatml_sft
    base = make_base(tmp_path / "pretrained", block_size=320)  # no saved template: alpaca
    data = [{"instruction": "Say hi."}, {"instruction": "Count.", "input": "1 2"}]
    judge = RecordingJudge()
    result = compare_runs(out, base, judge, data, max_new_tokens=4, device="cpu")
    assert result["templates"] == {"run": "chatml", "baseline": "alpaca", "judge": "chatml"}
    assert judge.prompts[0] == instruction_prompts(data, PromptFormat("chatml"))
    result = compare_runs(out, base, judge, data, max_new_tokens=4, device="cpu", template="plain")
    assert result["templates"] == {"run": "plain", "baseline": "plain", "judge": "chatml"}


# --- stopping at <|im_end|> ---------------------------------------------------------------------------------

def test_stop_at_texts_sees_a_marker_split_over_tokens():
    stop = stop_at_texts(BYTES, ["<|im_end|>"])
    assert stop_at_texts(BYTES, []) is None
    text = BYTES.encode("Hi there<|im_end|>")
    assert [stop(text[:i]) for i in range(len(text) - 1, len(text) + 1)] == [False, True]
    assert not any(stop(text[:i]) for i in range(len(text)))


def test_generation_stops_at_im_end_before_end_of_text(tmp_path):
    """A model taught one ChatML answer stops right after its <|im_end|>, before the end-of-text after it."""
    example = {"instruction": "Hi?", "input": "", "output": "Yo"}
    data = tmp_path / "one.json"
    data.write_text(json.dumps([example] * 4), encoding="utf-8")
    config = SFTConfig(base=make_base(tmp_path / "base", block_size=96), data=str(data), out_dir=str(tmp_path / "sft"),
                       template="chatml", max_steps=60, batch_size=4, lr=1e-2, min_lr=1e-2, warmup_steps=0,
                       eval_interval=0, val_fraction=0.0, max_len=96, num_samples=0, device="cpu",
                       progress=False).validate()
    run_sft(config)
    model, _, _ = load_trained_model(str(tmp_path / "sft"), "cpu")
    fmt = PromptFormat("chatml")
    prompt = BYTES.encode(fmt.prompt(example))
    free = generate(model, [prompt], 16, temperature=0.0, eos_token=BYTES.eot_token)[0][len(prompt):]
    assert free == BYTES.encode("Yo<|im_end|>") + [BYTES.eot_token]  # what it learned
    stopped = generate(model, [prompt], 16, temperature=0.0, eos_token=BYTES.eot_token,
                       stop=stop_at_texts(BYTES, fmt.stop_texts))[0][len(prompt):]
    assert stopped == BYTES.encode("Yo<|im_end|>")
    assert respond(model, BYTES, [fmt.prompt(example)], fmt, 16) == ["Yo"]
