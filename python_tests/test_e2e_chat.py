"""End to end, as a user fine-tunes a chat model: a Hugging Face tokenizer.json with ChatML, Llama 3 or Phi-3 special
tokens (built here with the `tokenizers` library, no download), the chatml, llama3 and phi3 templates over it, and the
training examples they encode; a Mistral or Phi-3 model file with a short sliding window, loaded whole without a
word, giving the windowed logits; and a Gemma 3 model folder whose tokenizer has one special token more than the
model has embeddings (as Gemma 3 1B's <image_soft_token>), fine-tuned, prompted and resumed through the command."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from test_continuation import sentencepiece_style
from test_hf_llama import CTX, VOCAB, _save, llama_config_json, llama_logits, llama_state_dict
from test_hf_phi3 import phi3_config_json, phi3_logits, phi3_state_dict

from llmkern.data.sequences import Marker, TemplateText, encode_prompt
from llmkern.data.tokenizer import get_tokenizer
from llmkern.finetune.base import load_base
from llmkern.finetune.config import FinetuneConfig
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


# --- a Gemma 3 model whose tokenizer has one id more than the model has embeddings ------------------------------

IMAGE_SOFT_TOKEN = "<image_soft_token>"  # Gemma 3's id 262144, past its model's 262144 embeddings


def _gemma3_tokenizer_json(folder, config: dict | None = None) -> tuple[str, int]:
    """(path, vocab_size): test_gemma_text's Gemma-style tokenizer.json with IMAGE_SOFT_TOKEN, a special token, as
    its last id, vocab_size; and Gemma's tokenizer_config.json (<eos> ends text), or `config`."""
    # imported when used: that module needs tokenizers, which the sliding-window test above does not
    from test_gemma_text import GEMMA_CONFIG, gemma_style

    data = gemma_style(None)
    vocab_size = max(data["model"]["vocab"].values()) + 1
    data["added_tokens"].append({"id": vocab_size, "content": IMAGE_SOFT_TOKEN, "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config or GEMMA_CONFIG), encoding="utf-8")
    return str(folder / "tokenizer.json"), vocab_size


def _gemma3_model_file(folder, vocab_size: int) -> str:
    """A tiny Gemma3ForCausalLM model.safetensors (test_hf_gemma3's weights and config.json) of vocab_size
    embeddings, with room for a chat example in its context."""
    from safetensors.torch import save_file
    from test_hf_gemma3 import EMBD, gemma3_config_json, gemma3_state_dict

    sd = gemma3_state_dict(tied=True)
    sd["model.embed_tokens.weight"] = (torch.randn(vocab_size, EMBD) * 0.3).to(torch.bfloat16).float()
    (folder / "config.json").write_text(json.dumps(gemma3_config_json(vocab_size=vocab_size,
                                                                      max_position_embeddings=64)))
    save_file(sd, str(folder / "model.safetensors"))
    return str(folder / "model.safetensors")


@pytest.fixture
def gemma3_folder(tmp_path):
    """(model.safetensors, tokenizer.json, the model's vocab_size) of a Gemma-3-like folder: the tokenizer has
    vocab_size + 1 ids, the last one <image_soft_token>."""
    pytest.importorskip("tokenizers")
    folder = tmp_path / "gemma-3-tiny-it"
    folder.mkdir()
    tokenizer, vocab_size = _gemma3_tokenizer_json(folder)
    return _gemma3_model_file(folder, vocab_size), tokenizer, vocab_size


def test_gemma3_fine_tunes_with_its_own_tokenizer_then_answers_and_resumes(gemma3_folder, tmp_path, capsys):
    from llmkern.cli import main

    model, tokenizer, _ = gemma3_folder
    torch.manual_seed(0)
    data = tmp_path / "chat.json"
    data.write_text(json.dumps([{"instruction": "what time it was", "input": "", "output": "the cat sat"}] * 4))
    run = tmp_path / "sft"
    command = ["finetune", "sft", f"--base={model}", f"--base_tokenizer={tokenizer}", "--template=gemma",
               f"--data={data}", f"--out_dir={run}", "--max_steps=6", "--batch_size=2", "--lr=2e-2",
               "--warmup_steps=2", "--val_fraction=0", "--eval_interval=0", "--num_samples=0", "--backend=torch",
               "--device=cpu", "--progress=false", "--keep_train_state=true"]
    assert main(command) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 6 and summary["train_loss_after"] < 0.2 * summary["train_loss_before"], summary

    # the run answers in Gemma's turns and stops at <end_of_turn>: the learned response and nothing after it
    assert main(["generate", "--run", str(run), "--instruction", "what time it was", "--max-new-tokens", "12",
                 "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == "the cat sat"
    # and is scored by `llmkern eval` with the same tokenizer (its extra special id is no obstacle there either)
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "what time it was", "choices": ["the cat sat", "dogs ran"], "answer": 0}))
    assert main(["eval", "--run", str(run), "--task", "choice", "--data", str(task), "--device", "cpu"]) == 0
    assert "accuracy" in capsys.readouterr().out
    # the same command resumes the finished run from its kept state: the base is the same model, nothing to train
    with pytest.warns(UserWarning, match="already complete"):
        assert main([*command, "--resume=true"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["steps"] == 6


def test_gemma3_base_loads_with_the_extra_special_id_and_its_own_source_label(gemma3_folder):
    model, tokenizer, vocab_size = gemma3_folder
    gpt, tok, meta = load_base(FinetuneConfig(base=model, base_tokenizer=tokenizer, backend="torch", device="cpu"))
    assert meta["source"] == "hf-gemma3"
    assert (gpt.config.vocab_size, tok.n_vocab) == (vocab_size, vocab_size + 1)
    assert tok.special_token("<end_of_turn>") == 106 and tok.eot_token == tok.special_token("<eos>")
    # a template marker past the model's embeddings is refused by name when it is encoded
    with pytest.raises(ValueError, match=f"special token '{IMAGE_SOFT_TOKEN}' is id {vocab_size} .* past the "
                                         f"model's {vocab_size} tokens"):
        encode_prompt(tok, TemplateText([Marker("<start_of_turn>"), "user\n", Marker(IMAGE_SOFT_TOKEN)]))


def test_gemma3_tokenizer_with_ordinary_ids_past_the_model_is_refused_naming_them(gemma3_folder, tmp_path):
    _, tokenizer, vocab_size = gemma3_folder
    (tmp_path / "small").mkdir()
    small = _gemma3_model_file(tmp_path / "small", vocab_size - 3)  # the last 3 byte tokens have no embedding
    first = vocab_size - 3
    with pytest.raises(ValueError, match=rf"has {vocab_size + 1} tokens; the model .* only {first}, and ids "
                                         rf"{first}-{vocab_size - 1} past it are ordinary tokens"):
        load_base(FinetuneConfig(base=small, base_tokenizer=tokenizer, backend="torch", device="cpu"))


def test_gemma3_tokenizer_whose_eos_is_past_the_model_is_refused_naming_it(gemma3_folder):
    model, tokenizer, vocab_size = gemma3_folder
    config = {"bos_token": "<bos>", "eos_token": IMAGE_SOFT_TOKEN, "add_bos_token": True}
    _gemma3_tokenizer_json(Path(tokenizer).parent, config)
    with pytest.raises(ValueError, match=f"end-of-text token '{IMAGE_SOFT_TOKEN}' .* is id {vocab_size}, past the "
                                         f"{vocab_size} tokens of the model"):
        load_base(FinetuneConfig(base=model, base_tokenizer=tokenizer, backend="torch", device="cpu"))


def test_pretraining_data_in_the_gemma3_tokenizer_fits_a_model_without_its_extra_special_id(gemma3_folder):
    from llmkern.train.config import TrainConfig
    from llmkern.train.trainer import build_model

    _, tokenizer, vocab_size = gemma3_folder
    model = {"vocab_size": vocab_size, "n_layer": 1, "n_head": 2, "n_embd": 16}
    config = TrainConfig(preset="tiny", model=model, seq_len=16, backend="torch").validate()
    assert build_model(config, vocab_size + 1, tokenizer).config.vocab_size == vocab_size
    fewer = TrainConfig(preset="tiny", model={**model, "vocab_size": vocab_size - 1}, seq_len=16,
                        backend="torch").validate()
    with pytest.raises(ValueError, match=f"ids {vocab_size - 1} past it are ordinary tokens"):
        build_model(fewer, vocab_size + 1, tokenizer)


def test_ids_no_token_has_are_not_taken_for_ordinary_ones():
    """cl100k_base has ids no token holds (100256, 100261-100275): a model whose vocabulary ends inside such a gap
    reads every token text can give, and is not refused for ids that do not exist."""
    import tiktoken

    from llmkern.data.model_vocab import check_vocab_fits
    from llmkern.data.tokenizer import TiktokenTokenizer

    ranks = {bytes([b]): b for b in range(256)}
    encoding = tiktoken.Encoding("gaps", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": 256, "<|pad|>": 260})  # 257-259: no token
    gapped = TiktokenTokenizer(encoding, "gaps", eot_token=256)
    check_vocab_fits(gapped, 257, "gaps", "the model")  # 257-259 are holes, 260 a special token
    with pytest.raises(ValueError, match="ids 255 past it are ordinary"):
        check_vocab_fits(gapped, 255, "gaps", "the model")


def test_a_token_that_decodes_to_nothing_is_still_an_ordinary_one():
    """SentencePiece's lone "▁" decodes to "" under a Metaspace decoder (it drops a first space) yet is a token
    text encodes to: past the model's vocabulary it must be refused, not taken for a hole in the ids."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    from llmkern.data.hf_tokenizers_backend import HFTokenizersTokenizer
    from llmkern.data.model_vocab import check_vocab_fits

    backend = tokenizers.Tokenizer(models.Unigram([("<eos>", 0.0), ("<unk>", 0.0), ("▁a", -1.0), ("a", -1.0),
                                                   ("▁", -2.0)], unk_id=1))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    backend.add_special_tokens([AddedToken("<eos>", special=True)])
    tok = HFTokenizersTokenizer(backend, "toy", eot_token=0, bos_token=None)
    assert 4 in tok.encode("a  a") and tok.decode([4]) == ""
    with pytest.raises(ValueError, match="ids 4 past it are ordinary"):
        check_vocab_fits(tok, 4, "toy", "the model")
