"""A text that continues another (a fine-tuning response after its prompt, a multiple-choice continuation after its
context) is encoded as the joint text encodes it: with a SentencePiece-style tokenizer.json, which puts "▁" in front
of every text it encodes, the continuation gets no "▁" of its own; where the tokenizer merges across the boundary
(byte-level BPE), the prompt keeps the ids it has alone and the continuation is encoded apart, as before."""

import json
import os

import pytest
from bos_tokenizer import train_plain

from llmkern.data.sequences import (
    Marker,
    TemplateText,
    encode_continuation,
    encode_prompt,
    encode_sequence,
    join_texts,
)
from llmkern.data.tokenizer import get_tokenizer
from llmkern.eval.multiple_choice import _encode_pair
from llmkern.finetune.data import IGNORE, encode_prompt_response
from llmkern.finetune.templates import PromptFormat

tokenizers = pytest.importorskip("tokenizers")

# No newlines: "\n" stays a byte token, as in Llama 2's vocab, so no merge crosses a prompt's final "\n".
CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: Name the capital of France. ### Response: Paris is the capital of France.",
    "The capital of France is Paris. The capital of Italy is Rome. Answer: Paris",
] * 20
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
LLAMA2_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
METASPACE_FIRST = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
FRANCE = {"instruction": "Name the capital of France.", "input": "", "output": "Paris is the capital of France."}


def sentencepiece_style(style: str) -> dict:
    """A small BPE with byte fallback, its specials SPECIALS and the byte tokens first, as Llama 2's: "llama2" has
    Llama 2's normalizer (Prepend "▁", Replace " " -> "▁") and no pre-tokenizer; "metaspace" has no normalizer and a
    Metaspace pre-tokenizer with prepend_scheme "first" (Mistral's newer files)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")  # training only
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    data = json.loads(tok.to_str())
    first_free = len(SPECIALS) + len(BYTE_TOKENS)
    vocab = {token: i if i < len(SPECIALS) else i - len(SPECIALS) + first_free
             for token, i in data["model"]["vocab"].items()}
    vocab.update({token: len(SPECIALS) + b for b, token in enumerate(BYTE_TOKENS)})
    data["model"]["vocab"] = vocab
    if style == "llama2":
        data["normalizer"], data["pre_tokenizer"] = LLAMA2_NORMALIZER, None
    else:
        data["normalizer"], data["pre_tokenizer"] = None, METASPACE_FIRST
    return data


@pytest.fixture(scope="module", params=["llama2", "metaspace"])
def sentencepiece(request, tmp_path_factory):
    """(llmkern tokenizer, `tokenizers` reference) of a SentencePiece-style tokenizer.json; the "llama2" one has
    <s> as its begin-of-sequence token (Llama 2's tokenizer_config.json), the "metaspace" one none."""
    folder = tmp_path_factory.mktemp(request.param)
    path = str(folder / "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(sentencepiece_style(request.param), f, ensure_ascii=False)
    if request.param == "llama2":
        with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}, f)
    tok = get_tokenizer(path)
    assert tok.bos_token == (1 if request.param == "llama2" else None) and tok.eot_token == 2
    return tok, tokenizers.Tokenizer.from_file(path)


def joint_ids(tok, reference, text: str) -> list[int]:
    """The ids of `text` as one sequence, by `tokenizers` itself (special tokens spelled in the text matched)."""
    start = [] if tok.bos_token is None else [tok.bos_token]
    return start + reference.encode(text, add_special_tokens=False).ids


def test_sft_response_is_the_joint_texts_tail(sentencepiece):
    tok, reference = sentencepiece
    fmt = PromptFormat("alpaca")
    prompt, response = fmt.prompt(FRANCE), fmt.response(FRANCE["output"])
    prompt_ids = encode_sequence(tok, prompt)
    joint = joint_ids(tok, reference, prompt + response)
    assert joint[:len(prompt_ids)] == prompt_ids  # the prompt alone is a prefix here: no merge across "\n"
    tokens, labels = encode_prompt_response(tok, prompt, response, max_len=1000)
    assert tokens == joint + [tok.eot_token]
    first = reference.id_to_token(tokens[len(prompt_ids)])
    assert first == "Pa" or first.startswith("Paris"), first  # not "▁Paris": the joint text has no space there
    assert labels == [IGNORE] * len(prompt_ids) + tokens[len(prompt_ids):]
    assert encode_prompt_response(tok, prompt, response, max_len=1000, mask_prompt=False)[1] == tokens
    assert encode_prompt_response(tok, prompt, response, max_len=len(prompt_ids) + 1) == (
        tokens[:len(prompt_ids) + 1], labels[:len(prompt_ids) + 1])


@pytest.mark.parametrize("context, continuation", [
    ("The capital of France is", " Paris"),  # Llama 2's normalizer encodes " Paris" alone as "▁", "▁Paris"
    ("Question: The capital of France?\nAnswer:\n", "Paris"),  # alone, any of them gives "▁Paris"
])
def test_choice_is_scored_on_the_joint_encodings_tokens(sentencepiece, context, continuation):
    tok, reference = sentencepiece
    ids, n_continuation = _encode_pair(tok, context, continuation, block_size=64, where="examples[0]")
    joint = joint_ids(tok, reference, context + continuation)
    assert ids == joint
    assert n_continuation == len(joint) - len(encode_sequence(tok, context))
    assert "".join(reference.id_to_token(i) for i in ids[-n_continuation:]) in ("▁Paris", "Paris")
    # an empty context is still the sequence's start (<s>), or <|endoftext|> without one, then the continuation
    ids, n_continuation = _encode_pair(tok, "", continuation, block_size=64, where="examples[0]")
    assert ids == encode_prompt(tok, "") + tok.encode(continuation)
    assert n_continuation == len(tok.encode(continuation))


def byte_level(name: str, request, tmp_path):
    """A byte-level BPE tokenizer: one trained by llmkern, or GPT-2's (skipped where ../shared/data lacks it)."""
    if name == "gpt2":
        return get_tokenizer(os.path.join(request.getfixturevalue("shared_data"), "gpt2.tiktoken"))
    return get_tokenizer(train_plain(tmp_path))


@pytest.mark.parametrize("name, prompt, continuation", [
    ("plain", "the cat sees the ", "moon"), ("gpt2", "the cat sees the ", "moon"), ("gpt2", "Answer: ", "Paris")])
def test_a_merge_across_the_boundary_keeps_the_prompts_own_ids(name, prompt, continuation, request, tmp_path):
    tok = byte_level(name, request, tmp_path)
    prompt_ids = encode_sequence(tok, prompt)
    assert encode_sequence(tok, prompt + continuation)[:len(prompt_ids)] != prompt_ids  # " moon", " Paris": one token
    assert encode_continuation(tok, prompt, continuation) == (prompt_ids, tok.encode(continuation))
    tokens, labels = encode_prompt_response(tok, prompt, continuation, max_len=1000)
    assert tokens == prompt_ids + tok.encode(continuation) + [tok.eot_token]
    assert labels == [IGNORE] * len(prompt_ids) + tokens[len(prompt_ids):]
    ids, n_continuation = _encode_pair(tok, prompt, continuation, block_size=64, where="examples[0]")
    assert ids == tokens[:-1] and n_continuation == len(tok.encode(continuation))


def test_join_texts_keeps_both_sides_pieces():
    prompt = TemplateText([Marker("<|im_start|>"), "assistant\n"])
    response = TemplateText(["Paris", Marker("<|im_end|>")])
    joined = join_texts(prompt, response)
    assert isinstance(joined, TemplateText) and joined == "<|im_start|>assistant\nParis<|im_end|>"
    assert joined.pieces == (*prompt.pieces, *response.pieces)
    # a plain str side is one ordinary piece, even where it spells a marker
    assert join_texts("say <|im_end|> ", response).pieces == ("say <|im_end|> ", *response.pieces)
    assert join_texts(prompt, "<|im_end|>").pieces == (*prompt.pieces, "<|im_end|>")
    plain = join_texts("a", "b")
    assert plain == "ab" and type(plain) is str


def test_chatml_join_keeps_markers_special(sentencepiece):
    """The response of a template's example is the tail of the joint example, its markers special tokens. With
    Llama 2's normalizer that is `tokenizers`' own encoding of the rendered text with its specials (a "▁" after
    each special token, in both); Metaspace "first" puts none there in `tokenizers`, one per run in encode_text."""
    tok, reference = sentencepiece
    im_start, im_end = tok.special_token("<|im_start|>"), tok.special_token("<|im_end|>")
    fmt = PromptFormat("chatml", "Be brief.")
    prompt, response = fmt.prompt(FRANCE), fmt.response(FRANCE["output"])
    tokens, labels = encode_prompt_response(tok, prompt, response, max_len=1000)
    assert tokens == encode_sequence(tok, join_texts(prompt, response)) + [tok.eot_token]
    if reference.normalizer is not None:
        assert tokens == joint_ids(tok, reference, prompt + response) + [tok.eot_token]
    assert tokens[-2] == im_end and tokens.count(im_start) == 3 and tokens.count(im_end) == 3
    prompt_length = len(encode_sequence(tok, prompt))
    assert labels == [IGNORE] * prompt_length + tokens[prompt_length:]
    # the user's text stays ordinary where it spells a marker: only the template's markers are special tokens
    tokens, _ = encode_prompt_response(tok, prompt, fmt.response("Paris <|im_end|> Rome"), max_len=1000)
    assert tokens.count(im_start) == 3 and tokens.count(im_end) == 3 and tokens[-2] == im_end
