"""A text that continues another (a fine-tuning response after its prompt, a multiple-choice continuation after its
context) is encoded as the joint text encodes it: with a SentencePiece-style tokenizer.json, which puts "▁" in front
of every text it encodes, the continuation gets no "▁" of its own; where the tokenizer merges across the boundary
(byte-level BPE), a fine-tuning prompt keeps the ids it has alone and the response is encoded apart, while a scored
text is split as lm-evaluation-harness's _encode_pair splits it (harness_pair, written out here from its rule)."""

import json
import math
import os

import pytest
import torch
from bos_tokenizer import train_plain

from llmkern.data.sequences import (
    Marker,
    TemplateText,
    encode_continuation,
    encode_prompt,
    encode_scored_pair,
    encode_sequence,
    join_texts,
)
from llmkern.data.tokenizer import get_tokenizer
from llmkern.eval.lambada import evaluate_lambada
from llmkern.eval.multiple_choice import ChoiceExample, encode_pair, score_choices
from llmkern.eval.win_rate import LMJudge
from llmkern.finetune.data import IGNORE, encode_prompt_response
from llmkern.finetune.templates import PromptFormat
from llmkern.model import GPT, GPTConfig

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


def sentencepiece_style(style: str, corpus: list[str] = CORPUS) -> dict:
    """A small BPE with byte fallback, its specials SPECIALS and the byte tokens first, as Llama 2's: "llama2" has
    Llama 2's normalizer (Prepend "▁", Replace " " -> "▁") and no pre-tokenizer; "metaspace" has no normalizer and a
    Metaspace pre-tokenizer with prepend_scheme "first" (Mistral's newer files)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")  # training only
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
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
    return load_both(tmp_path_factory.mktemp(request.param), request.param, sentencepiece_style(request.param))


def load_both(folder, style: str, data: dict):
    """(llmkern tokenizer, `tokenizers` reference) of the tokenizer.json `data` written in `folder`, with Llama 2's
    tokenizer_config.json (<s> its begin-of-sequence token) beside it for the "llama2" style."""
    path = str(folder / "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    if style == "llama2":
        with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}, f)
    tok = get_tokenizer(path)
    assert tok.bos_token == (1 if style == "llama2" else None) and tok.eot_token == 2
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
    ids, n_continuation = encode_pair(tok, context, continuation, block_size=64, where="examples[0]")
    joint = joint_ids(tok, reference, context + continuation)
    assert ids == joint
    assert n_continuation == len(joint) - len(encode_sequence(tok, context.rstrip()))  # the "\n" is scored too
    scored = "".join(reference.id_to_token(i) for i in ids[-n_continuation:])
    assert scored in ("▁Paris", "<0x0A>Paris"), scored
    # an empty context is still the sequence's start (<s>), or <|endoftext|> without one, then the continuation
    ids, n_continuation = encode_pair(tok, "", continuation, block_size=64, where="examples[0]")
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
    # scored, the prompt's trailing space moves to the continuation: " moon", " Paris", one token after the prompt's
    ids, n_continuation = encode_pair(tok, prompt, continuation, block_size=64, where="examples[0]")
    assert ids == encode_sequence(tok, prompt + continuation) and n_continuation == 1


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
    """The prompt and the example of a template are `tokenizers`' own encoding of the rendered text with its
    specials: with Llama 2's normalizer a "▁" after each special token, with Metaspace "first" none there (only at
    the very start of the text); the response is the tail of the joint example."""
    tok, reference = sentencepiece
    im_start, im_end = tok.special_token("<|im_start|>"), tok.special_token("<|im_end|>")
    fmt = PromptFormat("chatml", "Be brief.")
    prompt, response = fmt.prompt(FRANCE), fmt.response(FRANCE["output"])
    assert encode_sequence(tok, prompt) == joint_ids(tok, reference, prompt)
    tokens, labels = encode_prompt_response(tok, prompt, response, max_len=1000)
    assert tokens == joint_ids(tok, reference, prompt + response) + [tok.eot_token]
    assert tokens[-2] == im_end and tokens.count(im_start) == 3 and tokens.count(im_end) == 3
    prompt_length = len(encode_sequence(tok, prompt))
    assert labels == [IGNORE] * prompt_length + tokens[prompt_length:]
    # the user's text stays ordinary where it spells a marker: only the template's markers are special tokens
    tokens, _ = encode_prompt_response(tok, prompt, fmt.response("Paris <|im_end|> Rome"), max_len=1000)
    assert tokens.count(im_start) == 3 and tokens.count(im_end) == 3 and tokens[-2] == im_end


def test_text_before_and_after_special_tokens_is_encoded_as_tokenizers_encodes_it(sentencepiece):
    """Metaspace "first" puts "▁" in front of the text's first run (no special token before it) only."""
    tok, reference = sentencepiece
    text = TemplateText(["Paris", Marker("<|im_end|>"), "Rome is", Marker("<|im_start|>"), " the capital"])
    assert encode_sequence(tok, text) == joint_ids(tok, reference, text)
    # a marker the tokenizer has no special token for is ordinary text, joined to its neighbours
    text = TemplateText(["Paris", Marker("<|unknown|>"), "Rome", Marker("<|im_end|>"), "capital"])
    assert encode_sequence(tok, text) == joint_ids(tok, reference, text)


def test_a_metaspace_inside_a_sequence_pre_tokenizer_prepends_at_the_start_only(tmp_path):
    data = sentencepiece_style("metaspace")
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, METASPACE_FIRST]}
    tok, reference = load_both(tmp_path, "metaspace", data)
    fmt = PromptFormat("chatml", "Answer in 3 words.")
    example = {"instruction": "Name 2 capitals.", "input": "", "output": "Paris and 1 more"}
    prompt, response = fmt.prompt(example), fmt.response(example["output"])
    assert encode_sequence(tok, prompt) == joint_ids(tok, reference, prompt)
    tokens, _ = encode_prompt_response(tok, prompt, response, max_len=1000)
    assert tokens == joint_ids(tok, reference, prompt + response) + [tok.eot_token]


@pytest.mark.parametrize("style", ["llama2", "metaspace"])
@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_an_lm_judges_answer_ids_are_the_tokens_after_its_prompt(style, template, tmp_path):
    """The judge reads the probabilities of the tokens it would emit after its prompt: "A", not "▁A" (a token
    of this vocab, as "A" encoded alone)."""
    corpus = CORPUS + ["Which response is better? Answer with a single letter: A or B. A B A B"] * 20
    tok, reference = load_both(tmp_path, style, sentencepiece_style(style, corpus))
    assert [reference.id_to_token(i) for i in tok.encode("A") + tok.encode("B")] == ["▁A", "▁B"]
    judge = LMJudge(model=None, tokenizer=tok, prompt_format=PromptFormat(template))
    prompt = judge.judging_prompt("Name the capital of France.", "Paris", "Rome")
    prompt_ids = encode_sequence(tok, prompt)
    for label, label_id in zip("AB", judge.label_ids):
        assert joint_ids(tok, reference, prompt + label) == prompt_ids + [label_id]
        assert reference.id_to_token(label_id) == label


def test_a_choice_with_no_tokens_of_its_own_is_a_clear_error(tmp_path):
    """A tokenizer whose normalizer strips whitespace gives a whitespace choice no tokens after the context."""
    data = sentencepiece_style("metaspace")
    data["normalizer"] = {"type": "Strip", "strip_left": True, "strip_right": True}
    tok, _ = load_both(tmp_path, "metaspace", data)
    assert encode_pair(tok, "The capital of France is", " Paris", block_size=64, where="examples[3]")[1] > 0
    with pytest.raises(ValueError, match=r"examples\[3\]: the scored text '  ' .*no tokens"):
        encode_pair(tok, "The capital of France is", "  ", block_size=64, where="examples[3]")


# --- scored pairs, as lm-evaluation-harness splits them -------------------------------------------------------

def harness_pair(encode, context: str, continuation: str, prefix: int, bos: int | None = None):
    """(context ids, continuation ids) of a loglikelihood request as lm-evaluation-harness makes them for a causal
    model (TemplateLM.loglikelihood, _encode_pair), from `encode`, the tokenizer's text-only encoding: an empty
    context is [prefix] and the continuation alone; otherwise the context's trailing whitespace (str.rstrip's)
    goes to the continuation's front, and the continuation's ids are those of the joint text past as many as the
    context has. `bos` (where the tokenizer has one) starts both encodings, as the harness's add_bos_token=True."""
    if not context:
        return [prefix], encode(continuation)
    start = [] if bos is None else [bos]
    kept = context.rstrip()
    whole = start + encode(context + continuation)  # the same text as kept + moved whitespace + continuation
    context_ids = start + encode(kept)
    return context_ids, whole[len(context_ids):]


def harness_inputs(context_ids, continuation_ids, max_length: int):
    """The harness's model input for a pair: the joint ids cut to the last max_length + 1, less the last."""
    return (context_ids + continuation_ids)[-(max_length + 1):][:-1]


def byte_level_json(corpus: list[str] = CORPUS) -> dict:
    """A small byte-level BPE tokenizer.json (GPT-2's pre-tokenizer and decoder), </s> its end-of-text token."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus + ["The answer is 1234. 12 34 123"] * 20, trainer)
    return json.loads(tok.to_str())


def tokenizer_and_encode(name: str, request, tmp_path):
    """(llmkern tokenizer, the reference text-only encode the harness's tokenizer does) of one tokenizer kind."""
    if name in ("gpt2", "plain"):
        tok = byte_level(name, request, tmp_path)
        return tok, tok.encode
    data = byte_level_json() if name == "bytelevel" else sentencepiece_style(name)
    tok, reference = load_both(tmp_path, name, data)
    return tok, lambda text: reference.encode(text, add_special_tokens=False).ids


SCORED_PAIRS = [
    ("The answer is", " 1234"),
    ("The answer is 12", "34"),  # GPT-2: " 12", "34" either way
    ("The answer is 1", "234"),  # GPT-2: " 1" alone, " 12", "34" joint: the context's ids are no prefix
    ("Answer: ", "Paris"),  # the space moves: " Paris"
    ("the cat sees the ", "moon"),
    ("the cat s", "ees the moon"),  # llmkern's plain BPE: no prefix either
    ("Question: The capital of France?\nAnswer:", "\nParis"),  # a continuation starting with a newline
    ("Question: The capital of France?\nAnswer:\n\n", "Paris"),  # two newlines move
    ("the cat sees the \t ", " moon"),
    ("", " Paris"),  # the prefix token, then the continuation alone
    ("  ", "Paris"),  # only whitespace: the harness fails (no context ids), llmkern conditions on the prefix
]


@pytest.mark.parametrize("name", ["gpt2", "plain", "bytelevel", "llama2", "metaspace"])
def test_scored_pairs_are_the_harness_encode_pair_ids(name, request, tmp_path):
    tok, encode = tokenizer_and_encode(name, request, tmp_path)
    prefix = tok.eot_token if tok.bos_token is None else tok.bos_token
    differs = 0
    for context, continuation in SCORED_PAIRS:
        context_ids, continuation_ids = harness_pair(encode, context, continuation, prefix, tok.bos_token)
        context_ids = context_ids or [prefix]  # "  ": where the harness fails
        pair = (context_ids, continuation_ids)
        assert encode_scored_pair(tok, context, continuation) == pair, (context, continuation)
        if not continuation_ids:  # merged into the context: the harness fails too
            with pytest.raises(ValueError, match="no tokens of its own"):
                encode_pair(tok, context, continuation, block_size=64, where="examples[0]")
            continue
        ids, n_continuation = encode_pair(tok, context, continuation, block_size=64, where="examples[0]")
        assert (ids, n_continuation) == (context_ids + continuation_ids, len(continuation_ids))
        differs += encode_continuation(tok, context, continuation)[1] != continuation_ids
        # cut to block_size as the harness cuts, a BOS kept in front (the harness's cut drops it)
        block = len(continuation_ids) + 1
        ids, n_continuation = encode_pair(tok, context, continuation, block_size=block, where="examples[0]")
        cut = harness_inputs(context_ids, continuation_ids, block) + continuation_ids[-1:]
        if tok.bos_token is not None and len(context_ids + continuation_ids) > block + 1:
            cut = [tok.bos_token] + cut[-block:]
        assert (ids, n_continuation) == (cut, len(continuation_ids)), (context, continuation)
    assert differs > 0  # the pairs tell the harness's rule from encode_continuation's


def tiny_gpt(vocab_size: int, block_size: int):
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2,
                                   n_embd=32, backend="torch")
    model = GPT(config).eval()
    with torch.no_grad():  # larger logits than the init's, so that other ids score clearly otherwise
        model.lm_head.weight.mul_(20)
    return model


def harness_scores(model, encode, prefix: int, pairs):
    """(summed log-prob of the continuation's ids, whether each is the argmax) of each (context, continuation),
    as the harness computes them from its ids and input."""
    out = []
    for context, continuation in pairs:
        context_ids, continuation_ids = harness_pair(encode, context, continuation, prefix)
        inputs = harness_inputs(context_ids, continuation_ids, model.config.block_size)
        with torch.no_grad():
            logits = model(torch.tensor([inputs]))[0][0, -len(continuation_ids):].double()  # (n, vocab)
        target = torch.tensor(continuation_ids)
        logprob = logits.log_softmax(-1).gather(1, target[:, None]).sum().item()
        out.append((logprob, bool((logits.argmax(-1) == target).all())))
    return out


def test_choice_and_lambada_scores_sum_the_harness_continuation_ids(tmp_path):
    """Short blocks cut the longer contexts; the trailing spaces and the merge across "the cat s|ees" split the
    pairs otherwise than encode_continuation."""
    tok = get_tokenizer(train_plain(tmp_path))
    model = tiny_gpt(tok.n_vocab, block_size=6)
    examples = [ChoiceExample(context="the cat sees the ", choices=["moon", "bread", "hill and the river"], answer=0),
                ChoiceExample(context="the cat s", choices=["ees the moon", "ings over the hill"], answer=0)]
    pairs = [(ex.context, choice) for ex in examples for choice in ex.choices]
    expected = [logprob for logprob, _ in harness_scores(model, tok.encode, tok.eot_token, pairs)]
    scores = score_choices(model, tok, examples, separator="")
    assert [s for row in scores for s in row] == pytest.approx(expected, abs=1e-4)
    # LAMBADA's (context, " " + last word) pairs, one cut at the block, one with an empty context
    passages = [("the dog eats bread; a bird sings over the hill and the", " river."), ("the cat s", "ees"),
                ("", " the")]
    expected = harness_scores(model, tok.encode, tok.eot_token, passages)
    result = evaluate_lambada(model, tok, passages, bootstrap_iters=10)
    assert result["perplexity"] == pytest.approx(math.exp(-sum(lp for lp, _ in expected) / 3), rel=1e-5)
    assert result["accuracy"] == sum(greedy for _, greedy in expected) / 3
