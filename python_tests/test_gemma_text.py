"""The "gemma" template and a Gemma-style tokenizer.json: the template's text is Gemma 3's chat template rendered
(written out below from its Jinja), and llmkern's tokens of a prompt and an SFT example are the ones Hugging Face's
`tokenizers` gives the rendered conversation, on a small synthetic tokenizer.json laid out as Gemma's is: BPE with
byte fallback, " " -> "▁" with no dummy prefix, <bos> put in front by the post-processor, <start_of_turn> (105)
and <end_of_turn> (106) special."""

import json
import random
import shutil

import pytest

from llmkern.data.sequences import encode_prompt
from llmkern.data.tokenizer import get_tokenizer
from llmkern.finetune.data import IGNORE, encode_prompt_response
from llmkern.finetune.templates import (
    PromptFormat,
    get_template,
    respond,
    response_stop,
)

tokenizers = pytest.importorskip("tokenizers")

START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "said", "hi", "to", "every", "dog", "in", "town", "while",
         "user", "model", "asked", "what", "time", "it", "was", "add", "numbers", "two", "three", "answer", "please"]
# words from outside the training text too: byte fallback, tabs, runs of spaces
RARE_WORDS = ["héllo", "日本", "12345", "a\tb", "x  y"]


def gemma_rendered(messages: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    """Gemma 3's chat template written out: <bos>; a first system message's content and "\\n\\n" go in front of
    the first user turn's content; each turn "<start_of_turn>" + role ("model" for the assistant) + "\\n" + the
    content trimmed + "<end_of_turn>\\n"; then "<start_of_turn>model\\n" as the generation prompt."""
    prefix = ""
    if messages and messages[0][0] == "system":
        prefix, messages = messages[0][1] + "\n\n", messages[1:]
    text = "<bos>"
    for index, (role, content) in enumerate(messages):
        role = "model" if role == "assistant" else role
        text += f"{START_OF_TURN}{role}\n{prefix if index == 0 else ''}{content.strip()}{END_OF_TURN}\n"
    return text + (f"{START_OF_TURN}model\n" if add_generation_prompt else "")


def special_names() -> list[str]:
    """Gemma's first 107 ids: <pad> <eos> <bos> <unk> <mask>, unused ones, <start_of_turn> 105, <end_of_turn> 106."""
    return ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *(f"<unused{i}>" for i in range(100)), START_OF_TURN,
            END_OF_TURN]


def training_texts(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    return texts + ["\n\n", "\n\n\n", "\n"] * 20  # newline runs are tokens of their own, as in Gemma's vocab


def gemma_style(pre_tokenizer: dict | None) -> dict:
    """A tiny tokenizer.json laid out as Gemma's: trained on `training_texts`, then given Gemma's normalizer,
    pre-tokenizer, decoder, post-processor and byte-fallback tokens <0x00>..<0xFF>."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special_names(), initial_alphabet=["\n"],
                                  show_progress=False)
    tok.train_from_iterator(training_texts(), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    data["pre_tokenizer"] = pre_tokenizer
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]}
    bos = {"SpecialToken": {"id": "<bos>", "type_id": 0}}
    data["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}}
    return data


# Gemma's files have no pre-tokenizer, or (newer conversions) a Split on " " that never splits: " " is "▁" by then
PRE_TOKENIZERS = {"none": None,
                  "split": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                            "invert": False}}
GEMMA_CONFIG = {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True, "add_eos_token": False}


@pytest.fixture(scope="module", params=sorted(PRE_TOKENIZERS))
def gemma_path(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"gemma_{request.param}")
    (folder / "tokenizer.json").write_text(json.dumps(gemma_style(PRE_TOKENIZERS[request.param])), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(GEMMA_CONFIG), encoding="utf-8")
    return str(folder / "tokenizer.json")


def reference(path: str):
    """`tokenizers` as Hugging Face uses it: special tokens matched in the text, the post-processor's <bos>."""
    return tokenizers.Tokenizer.from_file(path)


def random_example(rng: random.Random) -> dict:
    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS + RARE_WORDS) for _ in range(rng.randint(low, high)))

    def padded(text: str) -> str:  # whitespace at the edges, which the template trims
        return rng.choice(["", " ", "\n", "  \n "]) + text + rng.choice(["", " ", "\n"])

    return {"instruction": padded(words(1, 8)), "input": rng.choice(["", words(1, 5)]), "output": padded(words(1, 10))}


def messages_of(example: dict, system_prompt: str) -> list[tuple[str, str]]:
    user = f"{example['instruction']}\n\n{example['input']}" if example["input"] else example["instruction"]
    return ([("system", system_prompt)] if system_prompt else []) + [("user", user)]


# --- the template's text ---------------------------------------------------------------------------------

@pytest.mark.parametrize("system_prompt", ["", "Be brief.", " Be brief. \n"])
def test_gemma_prompt_is_gemmas_chat_template_rendered(system_prompt):
    fmt = PromptFormat("gemma", system_prompt)
    rng = random.Random(1)
    for _ in range(20):
        example = random_example(rng)
        rendered = gemma_rendered(messages_of(example, system_prompt), add_generation_prompt=True)
        assert "<bos>" + fmt.prompt(example) == rendered
        whole = gemma_rendered([*messages_of(example, system_prompt), ("assistant", example["output"])], False)
        assert "<bos>" + fmt.prompt(example) + fmt.response(example["output"]) + "\n" == whole
    assert fmt.prompt({"instruction": "Add.", "input": "2 and 3"}) == (
        f"{START_OF_TURN}user\n{system_prompt + chr(10) * 2 if system_prompt else ''}Add.\n\n2 and 3{END_OF_TURN}\n"
        f"{START_OF_TURN}model\n")


def test_gemma_template_settings():
    template = get_template("gemma")
    assert template.takes_system_prompt and template.strips_turns and template.response_end == END_OF_TURN
    fmt = PromptFormat("gemma")
    assert fmt.response(" Hi!\n") == "Hi!<end_of_turn>" and fmt.stop_texts == (END_OF_TURN,)
    assert fmt.cut_response(f"Hi!{END_OF_TURN}\n{START_OF_TURN}user") == "Hi!"


# --- a Gemma-style tokenizer.json --------------------------------------------------------------------------

def test_gemma_tokenizer_ends_and_begins_as_gemmas(gemma_path):
    tok = get_tokenizer(gemma_path)
    assert (tok.eot_token, tok.bos_token) == (1, 2)  # <eos>, <bos>
    assert (tok.special_token(START_OF_TURN), tok.special_token(END_OF_TURN)) == (105, 106)
    text = " héllo  日本\tworld \n\n"
    assert tok.encode(text) == reference(gemma_path).encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text  # no dummy prefix, nothing stripped: lossless


def test_gemma_tokenizer_without_a_config_still_ends_with_eos(gemma_path, tmp_path):
    """Without tokenizer_config.json: <eos> is found among the special tokens, <bos> from the post-processor."""
    lone = tmp_path / "tokenizer.json"
    shutil.copy(gemma_path, lone)
    tok = get_tokenizer(str(lone))
    assert (tok.eot_token, tok.bos_token) == (1, 2)


@pytest.mark.parametrize("system_prompt", ["", "Be brief."])
def test_gemma_prompt_ids_are_those_of_the_rendered_prompt(gemma_path, system_prompt):
    tok, hf = get_tokenizer(gemma_path), reference(gemma_path)
    fmt = PromptFormat("gemma", system_prompt)
    rng = random.Random(2)
    for _ in range(30):
        example = random_example(rng)
        rendered = gemma_rendered(messages_of(example, system_prompt), add_generation_prompt=True)
        expected = hf.encode(rendered[len("<bos>"):], add_special_tokens=True).ids
        assert expected[0] == tok.bos_token and expected.count(105) == 2
        assert encode_prompt(tok, fmt.prompt(example)) == expected


@pytest.mark.parametrize("system_prompt", ["", "Be brief."])
def test_gemma_sft_example_is_the_rendered_conversation_then_eos(gemma_path, system_prompt):
    """An SFT example's tokens: Hugging Face's of the rendered conversation, whose model turn ends
    "<end_of_turn>\\n", up to and with <end_of_turn>, then <eos> (the tokenizer's end-of-text); only the response
    and its ends are learned."""
    tok, hf = get_tokenizer(gemma_path), reference(gemma_path)
    fmt = PromptFormat("gemma", system_prompt)
    newline = hf.token_to_id("\n")
    rng = random.Random(3)
    for _ in range(30):
        example = random_example(rng)
        messages = [*messages_of(example, system_prompt), ("assistant", example["output"])]
        expected = hf.encode(gemma_rendered(messages, False)[len("<bos>"):], add_special_tokens=True).ids
        tokens, labels = encode_prompt_response(tok, fmt.prompt(example), fmt.response(example["output"]), 10_000)
        assert tokens[:-1] + [newline] == expected
        assert tokens[-2:] == [106, tok.eot_token]
        prompt_len = len(encode_prompt(tok, fmt.prompt(example)))
        assert labels[:prompt_len] == [IGNORE] * prompt_len and labels[prompt_len:] == tokens[prompt_len:]
        assert tok.decode(tokens[prompt_len:-2]) == example["output"].strip()


def test_gemma_user_text_that_spells_a_marker_stays_ordinary(gemma_path):
    tok = get_tokenizer(gemma_path)
    fmt = PromptFormat("gemma")
    spelled = {"instruction": f"say {END_OF_TURN} now", "input": "", "output": f"ok {START_OF_TURN}"}
    tokens, _ = encode_prompt_response(tok, fmt.prompt(spelled), fmt.response(spelled["output"]), 1000)
    assert tokens.count(105) == 2 and tokens.count(106) == 2  # the template's own: user turn, model turn, two ends


def test_gemma_generation_stops_at_end_of_turn(gemma_path):
    tok = get_tokenizer(gemma_path)
    fmt = PromptFormat("gemma")
    stop = response_stop(tok, fmt)
    hi = tok.encode("hi there")
    assert stop(hi + [106]) and not stop(hi) and not stop(tok.encode(f"hi {END_OF_TURN}"))
    assert fmt.stop_token_ids(tok) == (106,) and fmt.ordinary_stop_texts(tok) == ()


def test_gemma_respond_cuts_at_end_of_turn(gemma_path, monkeypatch):
    """respond: the new ids up to <end_of_turn>, decoded, with the prompt's ids starting with <bos>."""
    import llmkern.model

    tok = get_tokenizer(gemma_path)
    fmt = PromptFormat("gemma")
    answer = tok.encode(" the cat sat")
    seen = []

    def fake_generate(model, ids, max_new_tokens, **kwargs):
        seen.extend(ids)
        return [row + answer + [106, *tok.encode("\nmore")] for row in ids]

    monkeypatch.setattr(llmkern.model, "generate", fake_generate)
    prompt = fmt.prompt({"instruction": "Sit."})
    assert respond(None, tok, [prompt], fmt, 8) == [" the cat sat"]
    assert seen == [encode_prompt(tok, prompt)] and seen[0][0] == tok.bos_token
