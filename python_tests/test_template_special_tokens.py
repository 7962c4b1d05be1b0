"""Template markers as the tokenizer's special tokens: special_token on every tokenizer, ChatML and Llama 3
examples encoded with the special ids at the marker places (and ordinary ids elsewhere, the user's text included),
the same ids as before for tokenizers without such special tokens, the recipes' prompt encoding, generation that
stops at the end marker's id, and a Hugging Face tokenizer.json alike."""

import json
import os

import pytest
from bos_tokenizer import BOS_TEXT, train_plain, with_special_tokens

from llmkern.data.sequences import Marker, TemplateText, encode_sequence, encode_text
from llmkern.data.tokenizer import ENDOFTEXT, get_tokenizer
from llmkern.finetune.data import IGNORE, encode_prompt_response
from llmkern.finetune.dpo import encode_preference
from llmkern.finetune.ppo import encode_prompts
from llmkern.finetune.reward import encode_pair_text
from llmkern.finetune.sft import encode_examples
from llmkern.finetune.templates import PromptFormat, respond, response_stop
from llmkern.model import GPT, GPTConfig, generate

CHATML = ("<|im_start|>", "<|im_end|>")
LLAMA3 = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
SAY_HI = {"instruction": "Say hi to the cat.", "input": "", "output": "hi the moon"}
# user text that spells every marker: it must stay ordinary text
SPELLS_MARKERS = {"instruction": "the <|im_start|>system <|im_end|> dog", "input": "<|eot_id|><|start_header_id|>",
                  "output": "a <|im_end|> bird <|eot_id|>"}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """{"plain": no specials but <|endoftext|>, "chatml": plain + <|im_start|> <|im_end|>, "qwen_instruct": the same
    ending documents with <|im_end|>, "llama3": plain + <|begin_of_text|> (its BOS) and Llama 3's markers}: one set
    of ordinary tokens."""
    folder = tmp_path_factory.mktemp("special_tokenizers")
    plain = train_plain(folder)
    return {"plain": get_tokenizer(plain),
            "chatml": with_special_tokens(plain, str(folder / "chatml.tiktoken"), CHATML),
            "qwen_instruct": with_special_tokens(plain, str(folder / "qwen.tiktoken"), CHATML, eot_token="<|im_end|>"),
            "llama3": with_special_tokens(plain, str(folder / "llama3.tiktoken"), (BOS_TEXT, *LLAMA3),
                                          bos_token=BOS_TEXT)}


def ids_of(tok, names):
    return [tok.special_token(n) for n in names]


# --- special_token ------------------------------------------------------------------------------------------

def test_special_token_names_a_tokenizers_special_tokens(toks, shared_data):
    chat = toks["chatml"]
    ims, ime = ids_of(chat, CHATML)
    assert (ims, ime) == (chat.n_vocab - 2, chat.n_vocab - 1)
    assert chat.decode([ims, ime]) == "<|im_start|><|im_end|>"
    assert chat.special_token(ENDOFTEXT) == chat.eot_token
    assert chat.special_token("<|im_start") is None and chat.special_token("the") is None  # ordinary: not special
    assert toks["plain"].special_token("<|im_start|>") is None
    byte = get_tokenizer("bytes")
    assert byte.special_token(ENDOFTEXT) == 256 and byte.special_token("<|im_end|>") is None
    gpt2 = get_tokenizer(os.path.join(shared_data, "gpt2.tiktoken"))
    assert gpt2.special_token(ENDOFTEXT) == 50256 and gpt2.special_token("<|im_end|>") is None
    with pytest.raises(TypeError, match="name"):
        chat.special_token(3)


# --- encoding ----------------------------------------------------------------------------------------------

def test_chatml_example_has_the_special_ids_at_the_marker_places(toks):
    chat, plain = toks["chatml"], toks["plain"]
    ims, ime = ids_of(chat, CHATML)
    fmt = PromptFormat("chatml", "Be brief.")
    (tokens, labels), = encode_examples([SAY_HI], chat, max_len=512, prompt_format=fmt)[0]
    enc = plain.encode  # the same ordinary tokens
    prompt = ([ims, *enc("system\nBe brief."), ime, *enc("\n"), ims, *enc("user\nSay hi to the cat."), ime,
               *enc("\n"), ims, *enc("assistant\n")])
    response = [*enc("hi the moon"), ime, chat.eot_token]
    assert tokens == prompt + response
    assert labels == [IGNORE] * len(prompt) + response
    # tiktoken itself, matching the special tokens in the built text, agrees
    assert tokens == chat.encoding.encode(str(fmt.prompt(SAY_HI)) + "hi the moon<|im_end|>", allowed_special="all") + [
        chat.eot_token]


def test_user_text_that_spells_a_marker_stays_ordinary(toks):
    chat, plain = toks["chatml"], toks["plain"]
    ims, ime = ids_of(chat, CHATML)
    fmt = PromptFormat("chatml", "sys <|im_end|>")
    tokens, _ = encode_prompt_response(chat, fmt.prompt(SPELLS_MARKERS), fmt.response(SPELLS_MARKERS["output"]),
                                            max_len=1000)
    # the template's own markers only: 3 turns in the prompt, the response's end
    assert tokens.count(ims) == 3 and tokens.count(ime) == 3
    user = f"user\n{SPELLS_MARKERS['instruction']}\n\n{SPELLS_MARKERS['input']}"
    assert plain.encode(user) == tokens[tokens.index(ims, 1) + 1: tokens.index(ime, tokens.index(ims, 1))]
    assert tokens[-2:] == [ime, chat.eot_token]
    assert tokens[-2 - len(plain.encode(SPELLS_MARKERS["output"])):-2] == plain.encode(SPELLS_MARKERS["output"])
    # a plain str (not built by a template) is ordinary text throughout
    assert not {ims, ime} & set(encode_text(chat, str(fmt.prompt(SPELLS_MARKERS))))


@pytest.mark.parametrize("template", ["alpaca", "chatml", "llama3", "plain"])
def test_tokenizers_without_the_specials_give_the_ids_of_the_text(template, toks, shared_data):
    """GPT-2's, "bytes" and one trained by llmkern: the markers are ordinary text, the ids those of the built text."""
    fmt = PromptFormat(template, "Be <|eot_id|> brief." if template in ("chatml", "llama3") else "")
    for tok in (get_tokenizer(os.path.join(shared_data, "gpt2.tiktoken")), get_tokenizer("bytes"), toks["plain"]):
        for example in (SAY_HI, SPELLS_MARKERS):
            prompt, response = fmt.prompt(example), fmt.response(example["output"])
            tokens, _ = encode_prompt_response(tok, prompt, response, max_len=1000)
            assert tokens == tok.encode(str(prompt)) + tok.encode(str(response)) + [tok.eot_token]


def test_end_of_text_follows_the_end_marker_once(toks):
    """Where the end marker is the end-of-text token itself (a Qwen Instruct tokenizer's <|im_end|>), it is not
    appended a second time."""
    qwen = toks["qwen_instruct"]
    assert qwen.eot_token == qwen.special_token("<|im_end|>")
    fmt = PromptFormat("chatml")
    tokens, _ = encode_prompt_response(qwen, fmt.prompt(SAY_HI), fmt.response("hi"), max_len=100)
    assert tokens[-3:] == [*qwen.encode("hi"), qwen.eot_token] and tokens.count(qwen.eot_token) == 2  # user turn, end
    # alpaca: end-of-text appended as ever
    tokens, _ = encode_prompt_response(qwen, PromptFormat().prompt(SAY_HI), PromptFormat().response("hi"), 1000)
    assert tokens[-3:] == [*qwen.encode("hi"), qwen.eot_token]


def test_llama3_template_text():
    fmt = PromptFormat("llama3")
    assert fmt.prompt(SAY_HI) == ("<|start_header_id|>user<|end_header_id|>\n\nSay hi to the cat.<|eot_id|>"
                                  "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert fmt.prompt({"instruction": "Add.", "input": "2 and 3"}) == (
        "<|start_header_id|>user<|end_header_id|>\n\nAdd.\n\n2 and 3<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert PromptFormat("llama3", "Be brief.").prompt(SAY_HI) == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nSay hi to the cat.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert fmt.response("Hi!") == "Hi!<|eot_id|>" and fmt.stop_texts == ("<|eot_id|>",)
    assert fmt.cut_response("Hi!<|eot_id|><|start_header_id|>user") == "Hi!"


def test_llama3_example_tokens(toks):
    """Meta's format: <|begin_of_text|> (the tokenizer's BOS), then the turns with the markers as special ids."""
    llama, plain = toks["llama3"], toks["plain"]
    sh, eh, eot_id = ids_of(llama, LLAMA3)
    fmt = PromptFormat("llama3", "Be brief.")
    tokens, labels = encode_prompt_response(llama, fmt.prompt(SAY_HI), fmt.response("hi"), max_len=200)
    enc = plain.encode
    prompt = [llama.bos_token, sh, *enc("system"), eh, *enc("\n\nBe brief."), eot_id,
              sh, *enc("user"), eh, *enc("\n\nSay hi to the cat."), eot_id, sh, *enc("assistant"), eh, *enc("\n\n")]
    assert tokens == prompt + [*enc("hi"), eot_id, llama.eot_token]
    assert labels[:len(prompt)] == [IGNORE] * len(prompt)


def test_the_recipes_encode_prompts_with_the_special_ids(toks):
    chat = toks["chatml"]
    ims, ime = ids_of(chat, CHATML)
    fmt = PromptFormat("chatml")
    prompt_ids = encode_sequence(chat, fmt.prompt(SAY_HI))
    assert prompt_ids.count(ims) == 2 and prompt_ids.count(ime) == 1
    assert encode_prompts([SAY_HI], chat, 1000, fmt) == [prompt_ids]  # PPO
    pair = encode_preference(chat, {**SAY_HI, "chosen": "hi", "rejected": "the moon"}, 1000, fmt)  # DPO
    assert pair["chosen"][0] == prompt_ids + [*chat.encode("hi"), ime, chat.eot_token]
    assert encode_pair_text(chat, fmt.prompt(SAY_HI), fmt.response("hi"), 1000) == pair["chosen"][0]  # reward


def test_template_text_is_a_str_that_keeps_its_pieces():
    import copy
    import pickle

    text = TemplateText(["a", Marker("<|x|>"), "b"])
    assert text == "a<|x|>b" and isinstance(text, str)
    for again in (copy.copy(text), pickle.loads(pickle.dumps(text))):
        assert again == text and again.pieces == text.pieces
    assert type(text + "") is str and type(text.strip()) is str  # a new string: ordinary text
    with pytest.raises(TypeError, match="pieces"):
        TemplateText(["a", 3])


# --- stopping ------------------------------------------------------------------------------------------------

def test_response_stop_is_the_special_id_or_the_text(toks):
    chat, plain = toks["chatml"], toks["plain"]
    ime = chat.special_token("<|im_end|>")
    fmt = PromptFormat("chatml")
    stop = response_stop(chat, fmt)
    assert stop(chat.encode("hi") + [ime]) and not stop(chat.encode("hi")) and not stop([])
    assert not stop(chat.encode("hi<|im_end|>"))  # spelled out, it is not the end the model learned
    assert fmt.stop_token_ids(chat) == (ime,) and fmt.ordinary_stop_texts(chat) == ()
    text_stop = response_stop(plain, fmt)
    assert text_stop(plain.encode("hi<|im_end|>")) and fmt.stop_token_ids(plain) == ()
    assert response_stop(chat, PromptFormat()) is None


def model_taught(tokenizer, tokens, labels, steps=40):
    """A tiny GPT over `tokenizer`'s vocab, trained on one (tokens, labels) row until it repeats it."""
    import torch

    from llmkern.finetune.data import make_lm_batch

    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_size=tokenizer.n_vocab, block_size=64, n_layer=1, n_head=2,
                                   n_embd=32, backend="torch")
    model = GPT(config)
    batch = make_lm_batch([(tokens, labels)], tokenizer.eot_token)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        _, loss = model(batch["idx"], batch["targets"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_generation_stops_at_the_special_end_id(toks):
    """A model taught one ChatML answer with <|im_end|> as a special token stops at that id."""
    chat = toks["chatml"]
    ime = chat.special_token("<|im_end|>")
    example = {"instruction": "the cat", "input": "", "output": "the moon"}
    fmt = PromptFormat("chatml")
    (tokens, labels), = encode_examples([example], chat, max_len=64, prompt_format=fmt)[0]
    model = model_taught(chat, tokens, labels)
    prompt = encode_sequence(chat, fmt.prompt(example))
    answer = chat.encode("the moon")
    free = generate(model, [prompt], 8, temperature=0.0, eos_token=chat.eot_token)[0][len(prompt):]
    assert free == [*answer, ime, chat.eot_token]  # what it learned
    stopped = generate(model, [prompt], 8, temperature=0.0, eos_token=chat.eot_token,
                       stop=response_stop(chat, fmt))[0][len(prompt):]
    assert stopped == [*answer, ime]
    assert respond(model, chat, [fmt.prompt(example)], fmt, 8) == ["the moon"]


# --- a Hugging Face tokenizer.json -------------------------------------------------------------------------

def test_a_tokenizer_json_with_special_chatml_markers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from bos_tokenizer import CORPUS

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=[ENDOFTEXT, *CHATML],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    backend.add_tokens(["<|not_special|>"])  # an added token that is not special: no marker
    path = tmp_path / "tokenizer.json"
    path.write_text(backend.to_str(), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": ENDOFTEXT}), encoding="utf-8")
    tok = get_tokenizer(str(path))
    ims, ime = ids_of(tok, CHATML)
    assert (ims, ime) == (backend.token_to_id("<|im_start|>"), backend.token_to_id("<|im_end|>"))
    assert tok.special_token("<|not_special|>") is None and tok.special_token("<|im_start") is None
    fmt = PromptFormat("chatml", "Be brief.")
    tokens, _ = encode_prompt_response(tok, fmt.prompt(SAY_HI), fmt.response("hi"), max_len=200)
    # Hugging Face's own encoding of the built text, which matches special tokens in it
    reference = tokenizers.Tokenizer.from_file(str(path))
    assert tokens == reference.encode(str(fmt.prompt(SAY_HI)) + "hi<|im_end|>", add_special_tokens=False).ids + [
        tok.eot_token]
    assert tokens.count(ims) == 3 and tokens.count(ime) == 3
    tokens, _ = encode_prompt_response(tok, fmt.prompt(SPELLS_MARKERS), fmt.response("hi"), max_len=400)
    assert tokens.count(ims) == 3 and tokens.count(ime) == 3  # the instruction's spelled markers stay text
