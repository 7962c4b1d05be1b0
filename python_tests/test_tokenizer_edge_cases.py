"""Tokenizer edge cases: an exported tokenizer.json imported back, special tokens whose names a tokenizer.json's
decoder changes, .tiktoken files whose ranks leave ids out."""

import base64
import json
import random

import pytest

from llmkern.data.hf_tokenizer import import_hf_tokenizer
from llmkern.data.model_vocab import check_vocab_fits, is_ordinary_id
from llmkern.data.tokenizer import ENDOFTEXT, get_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'll see 12345 digits.\n",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, русский текст 🙂🚀\n",
    "def f(x):\n    return x ** 2  # a comment\n\n\t\tTabs   and    spaces   \r\n",
] * 20


def random_texts(seed: int, count: int = 30) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefg ABC  \n\t\r0123456789.,'!?éßñ日本語🙂\u00a0\u3000-_"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(count)]


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
def test_an_exported_tokenizer_json_imports_back_to_the_same_ids(tmp_path, pattern):
    """The tokenizer.json llmkern writes (ignore_merges on, one merge per token) is a byte-level BPE that tiktoken
    reproduces: `llmkern tokenizer import` takes it back, to the ids of the tokenizer it was written from."""
    pytest.importorskip("tokenizers")
    from llmkern.data.bpe import train_bpe
    from llmkern.data.hf_tokenizer_export import tiktoken_to_hf_tokenizer_json

    original = train_bpe(CORPUS, 400, tmp_path / "original.tiktoken", pattern=pattern)
    exported = tmp_path / "exported" / "tokenizer.json"
    exported.parent.mkdir()
    exported.write_text(json.dumps(tiktoken_to_hf_tokenizer_json(original)), encoding="utf-8")
    imported = import_hf_tokenizer(exported, tmp_path / "imported.tiktoken")
    assert (imported.n_vocab, imported.eot_token) == (original.n_vocab, original.eot_token)
    texts = CORPUS[:3] + random_texts(seed=7)
    merged = 0
    for text in texts:
        ids = original.encode(text)
        assert imported.encode(text) == ids, text
        merged += sum(i >= 256 for i in ids)
    assert merged > 50  # the merges were used, not the bytes alone


def _byte_level_backend(special_names: list[str]):
    """A byte-level BPE `tokenizers.Tokenizer` (ByteLevel decoder) trained on CORPUS, with `special_names` added as
    special tokens after its vocabulary; (backend, its vocabulary size before them)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[ENDOFTEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    vocab_size = backend.get_vocab_size()
    backend.add_special_tokens([AddedToken(name, special=True) for name in special_names])
    return backend, vocab_size


def _metaspace_backend(special_names: list[str]):
    """A Unigram with a Metaspace decoder (which turns "▁" into a space and drops a first one), with
    `special_names` added as special tokens after its vocabulary; (backend, its vocabulary size before them)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    backend = tokenizers.Tokenizer(models.Unigram([("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0), ("a", -1.0),
                                                   ("▁", -2.0)], unk_id=1))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    backend.add_special_tokens([AddedToken("</s>", special=True)])
    vocab_size = backend.get_vocab_size()
    backend.add_special_tokens([AddedToken(name, special=True) for name in special_names])
    return backend, vocab_size


@pytest.mark.parametrize("build, names", [
    # ByteLevel's decoder reads "ü" and "Ā" as the bytes they stand for
    (_byte_level_backend, ["<|ü|>", "<|Ā|>", "<|im_start|>"]),
    # Metaspace's decoder turns "▁" into a space, and drops a first one
    (_metaspace_backend, ["<｜begin▁of▁sentence｜>", "▁<mask>", "<start_of_turn>"]),
])
def test_special_tokens_past_the_model_vocabulary_are_special_whatever_the_decoder_makes_of_them(build, names):
    """A tokenizer.json whose special tokens past the model's vocabulary have names its decoder spells otherwise
    (decode([id]) is not the name) still fits the model: those ids are special, never encoded from text."""
    from llmkern.data.hf_tokenizers_backend import HFTokenizersTokenizer

    backend, vocab_size = build(names)
    tok = HFTokenizersTokenizer(backend, "toy", eot_token=0, bos_token=None)
    ids = [tok.special_token(name) for name in names]
    assert ids == list(range(vocab_size, vocab_size + len(names)))
    assert not any(is_ordinary_id(tok, i) for i in ids)
    check_vocab_fits(tok, vocab_size, "toy", "the model")
    # an ordinary token past the vocabulary is still refused
    with pytest.raises(ValueError, match=f"ids {vocab_size - 1} past it are ordinary"):
        check_vocab_fits(tok, vocab_size - 1, "toy", "the model")


def _write_ranks(path, ranks: dict[bytes, int]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in ranks.items()))


def test_a_tiktoken_file_whose_ranks_leave_an_id_out_gets_an_end_of_text_no_token_has(tmp_path):
    """Without a sidecar, <|endoftext|> is the id after the highest rank: len(ranks) where the ranks run without a
    hole; with a hole, len(ranks) is an ordinary token's id, which would make every document end in that token."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"ab"] = 257  # 256: no token
    path = tmp_path / "holed.tiktoken"
    _write_ranks(path, ranks)
    tok = get_tokenizer(str(path))
    assert tok.eot_token == 258 and tok.n_vocab == 259
    assert tok.encode("ab") == [257] and tok.decode([tok.eot_token]) == ENDOFTEXT
    assert tok.special_token(ENDOFTEXT) == 258
    # ranks without a hole keep <|endoftext|> = len(ranks), as GPT-2's 50256
    del ranks[b"ab"]
    ranks[b"ab"] = 256
    _write_ranks(path, ranks)
    assert get_tokenizer(str(path)).eot_token == 257


def test_decoding_an_id_no_token_has_is_a_value_error_naming_it(tmp_path):
    """An id inside the tokenizer's range that no token holds (cl100k_base's 100256) is refused as an id out of
    range is: a ValueError naming it, not tiktoken's KeyError."""
    import tiktoken

    from llmkern.data.tokenizer import TiktokenTokenizer

    ranks = {bytes([b]): b for b in range(256)}
    encoding = tiktoken.Encoding("gaps", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                                 special_tokens={ENDOFTEXT: 257})  # 256: no token
    tok = TiktokenTokenizer(encoding, "gaps")
    assert tok.decode([104, 105, 257]) == "hi" + ENDOFTEXT
    with pytest.raises(ValueError, match="ids: .*256"):
        tok.decode([104, 256, 105])
