"""End to end, as a user fine-tunes a chat model: a Hugging Face tokenizer.json with ChatML, Llama 3 or Phi-3 special
tokens (built here with the `tokenizers` library, no download), the chatml, llama3 and phi3 templates over it, and the
training examples they encode; and a Mistral or Phi-3 model file with a short sliding window, loaded whole without a
word, giving the windowed logits."""

import json
import warnings

import pytest
import torch
from test_continuation import sentencepiece_style
from test_hf_llama import CTX, VOCAB, _save, llama_config_json, llama_logits, llama_state_dict
from test_hf_phi3 import phi3_config_json, phi3_logits, phi3_state_dict

from llmkern.data.sequences import encode_prompt
from llmkern.data.tokenizer import get_tokenizer
from llmkern.finetune.data import IGNORE, encode_prompt_response
from llmkern.finetune.templates import PromptFormat
from llmkern.model.hf import load_hf_llama_file, load_hf_phi3_file

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PHI3_SPECIALS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEXTS = ["Name three colors.", "Red, green and blue.", "What is the capital of France?", "Paris is.",
         "system user assistant", "Translate to French: good morning", "Bonjour."] * 3


def _byte_level_tokenizer(specials: list[str], bos: str | None = None):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos is not None:  # Llama 3's post-processor: <|begin_of_text|> in front of every text
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return tok


def _write_tokenizer(folder, tok, config: dict) -> str:
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder / "tokenizer.json")


def _special_positions(tokens: list[int], tokenizer, names: list[str]) -> list[tuple[int, str]]:
    ids = {tokenizer.special_token(name): name for name in names}
    return [(i, ids[t]) for i, t in enumerate(tokens) if t in ids]


@pytest.fixture
def qwen_instruct_tokenizer(tmp_path):
    """A Qwen2.5-Instruct-like tokenizer: ChatML's special tokens, <|im_end|> its end-of-text (eos_token)."""
    path = _write_tokenizer(tmp_path, _byte_level_tokenizer(CHATML_SPECIALS), {"eos_token": "<|im_end|>"})
    return get_tokenizer(path)


@pytest.fixture
def llama3_instruct_tokenizer(tmp_path):
    """A Llama-3-Instruct-like tokenizer: <|begin_of_text|> from the post-processor, <|eot_id|> its eos_token."""
    tok = _byte_level_tokenizer(LLAMA3_SPECIALS, bos="<|begin_of_text|>")
    return get_tokenizer(_write_tokenizer(tmp_path, tok, {"eos_token": "<|eot_id|>"}))


def test_chatml_examples_carry_the_special_ids_once_each_and_end_at_im_end_once(qwen_instruct_tokenizer):
    tok = qwen_instruct_tokenizer
    assert tok.bos_token is None and tok.eot_token == tok.special_token("<|im_end|>")
    fmt = PromptFormat("chatml", "Be brief.")
    example = {"instruction": "Name three colors.", "input": "Say <|im_end|> here", "output": "Red, green and blue."}
    tokens, labels = encode_prompt_response(tok, fmt.prompt(example), fmt.response(example["output"]), 256)

    # the markers as special ids, and no more: the input's spelled <|im_end|> stays text
    names = [name for _, name in _special_positions(tokens, tok, CHATML_SPECIALS)]
    assert names == ["<|im_start|>", "<|im_end|>", "<|im_start|>", "<|im_end|>", "<|im_start|>", "<|im_end|>"]
    # the response ends at <|im_end|>, once: it is the end-of-text token itself
    assert tokens[-1] == tok.eot_token and tokens[-2] != tok.eot_token
    assert tok.decode(tokens) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName three "
                                  "colors.\n\nSay <|im_end|> here<|im_end|>\n<|im_start|>assistant\n"
                                  "Red, green and blue.<|im_end|>")
    learned = [t for t, lab in zip(tokens, labels) if lab != IGNORE]
    assert tok.decode(learned) == "Red, green and blue.<|im_end|>"


def test_llama3_examples_start_with_one_bos_and_end_with_one_eot_id(llama3_instruct_tokenizer):
    tok = llama3_instruct_tokenizer
    bos, eot_id = tok.special_token("<|begin_of_text|>"), tok.special_token("<|eot_id|>")
    assert (tok.bos_token, tok.eot_token) == (bos, eot_id)
    fmt = PromptFormat("llama3")
    example = {"instruction": "What is the capital of France?", "output": "Paris is."}
    tokens, labels = encode_prompt_response(tok, fmt.prompt(example), fmt.response(example["output"]), 256)

    names = [name for _, name in _special_positions(tokens, tok, LLAMA3_SPECIALS)]
    assert names == ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                     "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert tokens[0] == bos and tokens.count(bos) == 1
    assert tokens[-1] == eot_id and tokens[-2] != eot_id
    assert tok.decode(tokens) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                                  "What is the capital of France?<|eot_id|><|start_header_id|>assistant"
                                  "<|end_header_id|>\n\nParis is.<|eot_id|>")
    assert tok.decode([t for t, lab in zip(tokens, labels) if lab != IGNORE]) == "Paris is.<|eot_id|>"
    # cut to max_len, the example keeps its BOS first
    short, _ = encode_prompt_response(tok, fmt.prompt(example), fmt.response(example["output"]), 5)
    assert short == tokens[:5] and short.count(bos) == 1


@pytest.fixture(params=["llama2", "metaspace"])
def phi3_instruct_tokenizer(request, tmp_path):
    """(llmkern tokenizer, `tokenizers` reference) of a Phi-3-Instruct-like tokenizer.json: SentencePiece-style BPE
    with byte fallback (Llama 2's normalizer, or Metaspace "first" as files converted with legacy=False have), <s>
    its BOS, <|endoftext|> its eos_token, and the chat markers special tokens that take the whitespace after them
    (rstrip, as Phi-3's <|user|>, <|assistant|> and <|end|> do)."""
    data = sentencepiece_style(request.param)
    first = max(data["model"]["vocab"].values()) + 1
    data["added_tokens"] += [{"id": first + i, "content": name, "single_word": False, "lstrip": False,
                              "rstrip": name != "<|endoftext|>", "normalized": False, "special": True}
                             for i, name in enumerate(PHI3_SPECIALS)]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizers = pytest.importorskip("tokenizers")
    return get_tokenizer(str(path)), tokenizers.Tokenizer.from_file(str(path))


def test_phi3_examples_are_the_ids_hugging_face_gives_the_rendered_chat(phi3_instruct_tokenizer):
    # Phi-3's chat template renders the text below; Hugging Face encodes it with the special tokens matched, the
    # line break after each marker taken into the marker (rstrip), and its own BOS in front.
    tok, reference = phi3_instruct_tokenizer
    assert tok.eot_token == tok.special_token("<|endoftext|>") and tok.bos_token == 1
    fmt = PromptFormat("phi3", "Be brief.")
    example = {"instruction": "Name the capital of France.", "output": "Paris is the capital of France."}
    prompt = "<|system|>\nBe brief.<|end|>\n<|user|>\nName the capital of France.<|end|>\n<|assistant|>\n"

    def hf(text: str) -> list[int]:
        return [tok.bos_token] + reference.encode(text, add_special_tokens=False).ids

    assert encode_prompt(tok, fmt.prompt(example)) == hf(prompt)  # what generation reads
    tokens, labels = encode_prompt_response(tok, fmt.prompt(example), fmt.response(example["output"]), 256)
    assert tokens == hf(prompt + "Paris is the capital of France.<|end|>\n<|endoftext|>")
    learned = [t for t, lab in zip(tokens, labels) if lab != IGNORE]
    assert learned == tokens[len(hf(prompt)):] and learned[-2:] == [tok.special_token("<|end|>"), tok.eot_token]


@pytest.mark.parametrize("instruction", ["\x1cName it.", "\u3000Name it.", " \n\tName it."])
def test_a_marker_takes_exactly_the_whitespace_hugging_face_strips(phi3_instruct_tokenizer, instruction):
    # tokenizers strips Unicode White_Space beside a special token (Rust's char::is_whitespace): U+3000 too, but
    # not the separators U+001C..U+001F that Python's str.strip() would also take.
    tok, reference = phi3_instruct_tokenizer
    prompt = PromptFormat("phi3").prompt({"instruction": instruction})
    hf = [tok.bos_token] + reference.encode(f"<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
                                            add_special_tokens=False).ids
    assert encode_prompt(tok, prompt) == hf


def _warnings_of(load):
    """(what load() returns, the UserWarnings it gave, each time it gave one)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load()
    return model, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("kind", ["mistral", "phi3"])
def test_a_model_file_with_a_short_sliding_window_loads_whole_and_silently_with_the_window(tmp_path, kind):
    window = CTX // 2
    if kind == "phi3":
        sd, cfg, load = phi3_state_dict(), phi3_config_json(sliding_window=window), load_hf_phi3_file
        reference = phi3_logits
    else:
        sd, cfg = llama_state_dict(), llama_config_json(model_type="mistral", sliding_window=window)
        load, reference = load_hf_llama_file, llama_logits
    (path,) = _save(tmp_path, sd, cfg)
    model, said = _warnings_of(lambda: load(str(path), backend="torch"))
    assert (model.config.block_size, model.config.sliding_window) == (CTX, window)
    assert said == []
    embeddings = sd["model.embed_tokens.weight"]
    assert torch.equal(model.wte.weight[: len(embeddings)], embeddings)  # the file's weights, loaded
    idx = torch.randint(0, VOCAB, (1, CTX))  # twice the window
    with torch.no_grad():
        logits = model.eval()(idx)[0]
    torch.testing.assert_close(logits, reference(sd, idx, cfg), rtol=1e-4, atol=1e-4)  # fp32 against float64
