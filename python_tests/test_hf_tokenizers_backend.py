"""A Hugging Face tokenizer.json as a tokenizer spec, read by the `tokenizers` library: the ids `tokenizers` gives
for ordinary text, special tokens spelled in the text kept as text, end-of-text and begin-of-sequence tokens from
tokenizer_config.json or the post-processor, reloading when a file changes, and clear errors."""

import json
import os
import random
import shutil
import sys

import pytest

from llmkern.data.tokenizer import get_tokenizer, same_tokenizer, tokenizer_file_sha256

tokenizers = pytest.importorskip("tokenizers")
decoders, models, normalizers = tokenizers.decoders, tokenizers.models, tokenizers.normalizers
pre_tokenizers, processors, trainers = tokenizers.pre_tokenizers, tokenizers.processors, tokenizers.trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'll see 12345 digits.",
    "Once upon a time there was a little cat who liked to sit in the sun and look at the birds.",
    "def f(x):\n    return x ** 2  # a comment\n\tTabs   and    spaces",
    "Ünïcödé: naïve café, Straße, русский текст",
] * 20

# Unicode the corpus lacks (byte fallback), spaces at both ends and doubled, special tokens spelled out.
TEXTS = [
    "", "a", " ", "   ", "\n\n", "Hello, world!", " leading space", "  two leading", "trailing  ", "a  b   c",
    "The fox's tail isn't 3.14159 long", "日本語のテキストです。", "🙂🚀👍🏽 emoji 🙂", "Ωmega ĸra ǅ", "x\r\ny\t",
    "a</s>b", "<s> begins", "tab\tand\nnewline", "café naïve Straße",
]

BYTES = [f"<0x{b:02X}>" for b in range(256)]


def random_texts(seed: int, count: int = 20) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijk ABC  \n\t0123456789.,'!?éßñ日本語🙂🚀\u00a0\u3000-_<>/|"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(count)]


def llama2_style() -> dict:
    """A SentencePiece-style BPE as Llama 2's tokenizer.json has it: <unk> <s> </s>, the 256 byte tokens, the
    merges; Llama 2's normalizer (Prepend "▁", Replace " " -> "▁"), no pre-tokenizer, byte fallback, and a
    post-processor that puts <s> in front."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # words split at "▁" while training only: Llama 2 merges across it where its corpus did
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    shifted = {t: i + 256 if i >= 3 else i for t, i in vocab.items()}
    shifted.update({b: 3 + n for n, b in enumerate(BYTES)})
    data["model"]["vocab"] = dict(sorted(shifted.items(), key=lambda kv: kv[1]))
    data["pre_tokenizer"] = None
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    data["post_processor"] = template("<s>", 1)
    return data


def template(name: str, token_id: int) -> dict:
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {name: {"id": name, "ids": [token_id], "tokens": [name]}}}


def unigram_style() -> dict:
    """A Unigram with a Metaspace pre-tokenizer (prepend_scheme "first"), as T5's and newer SentencePiece files."""
    tok = tokenizers.Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return json.loads(tok.to_str())


def wordpiece_style() -> dict:
    """BERT's: a lowercasing normalizer, WordPiece, [CLS] $A [SEP], and truncation at 8 tokens in the file."""
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                         show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tok.enable_truncation(max_length=8)
    return json.loads(tok.to_str())


def write(folder, data, config=None):
    """tokenizer.json (and tokenizer_config.json when given) in `folder`; the tokenizer.json's path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    if config is not None:
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
    return path


def reference(path: str):
    """`tokenizers` itself, as Hugging Face encodes text with add_special_tokens=False."""
    return tokenizers.Tokenizer.from_file(path)


LLAMA2_CONFIG = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "unk_token": "<unk>",
                 "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False}}


@pytest.fixture(scope="module")
def llama2_path(tmp_path_factory):
    return write(tmp_path_factory.mktemp("llama2"), llama2_style(), LLAMA2_CONFIG)


def test_llama2_style_gives_the_ids_of_tokenizers_and_round_trips(llama2_path):
    tok = get_tokenizer(llama2_path)
    ref = reference(llama2_path)
    assert (tok.spec, tok.eot_token, tok.bos_token) == (llama2_path, 2, 1)
    assert tok.n_vocab == ref.get_vocab_size(with_added_tokens=True)
    fell_back = 0
    for text in TEXTS + random_texts(1):
        ids = tok.encode(text)
        if "<s>" not in text and "</s>" not in text:
            assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text, text  # Llama 2's normalizer and Strip decoder: lossless
        fell_back += sum(3 <= i < 259 for i in ids)
    assert fell_back > 50  # the byte tokens were used: the corpus lacks the CJK and emoji
    # encode adds no <s>, though the post-processor does with add_special_tokens
    assert ref.encode("hi", add_special_tokens=True).ids[0] == 1 and tok.encode("hi")[0] != 1


def test_special_tokens_in_the_text_are_text(llama2_path):
    tok = get_tokenizer(llama2_path)
    for text in ("a</s>b", "</s>", "<s></s><unk>", "x <s> y"):
        ids = tok.encode(text)
        assert not {0, 1, 2} & set(ids), text
        assert tok.decode(ids) == text
    assert reference(llama2_path).encode("a</s>b", add_special_tokens=False).ids.count(2) == 1  # HF's default
    # the Strip decoder takes the prepended "▁" off the first token only: behind <s> it is a space (as in HF)
    assert tok.decode([1, *tok.encode("hi"), 2]) == "<s> hi</s>"
    assert tok.decode([1, *tok.encode("hi"), 2]) == reference(llama2_path).decode([1, *tok.encode("hi"), 2],
                                                                                  skip_special_tokens=False)


def test_encode_batch_and_decode_checks(llama2_path):
    tok = get_tokenizer(llama2_path)
    texts = TEXTS + random_texts(2)
    want = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=1) == want
    assert tok.encode_batch(texts, num_threads=4) == want
    assert tok.encode_batch(["\ud800 lone"], num_threads=4) == [tok.encode("\ufffd lone")]
    with pytest.raises(TypeError, match="texts"):
        tok.encode_batch("hello")
    for bad in (b"ab", None):
        with pytest.raises(TypeError, match="text"):
            tok.encode(bad)
    with pytest.raises(TypeError, match="text"):
        tok.encode_batch(["a", 3], num_threads=4)
    for bad in (-1, tok.n_vocab, 10**6):
        with pytest.raises(ValueError, match=rf"ids: expected token ids in \[0, {tok.n_vocab}\), got {bad}"):
            tok.decode([5, bad])
    for bad in ([1.5], [True], "ab"):
        with pytest.raises(TypeError, match="ids"):
            tok.decode(bad)


def test_decode_refuses_an_id_in_range_that_no_token_has(tmp_path):
    data = llama2_style()
    vocab = data["model"]["vocab"]
    top = max(vocab.values())
    # the last 10 tokens moved up by 4: ids top-9 .. top-6 are holes, inside [0, n_vocab)
    data["model"]["vocab"] = {t: i + 4 if i >= top - 9 else i for t, i in vocab.items()}
    path = write(tmp_path, data, LLAMA2_CONFIG)
    tok, ref = get_tokenizer(path), reference(path)
    assert tok.n_vocab == top + 5
    holes = range(top - 9, top - 5)
    for hole in holes:
        with pytest.raises(ValueError, match=rf"ids: {hole} is the id of no token of"):
            tok.decode([5, hole, 300])
    rng = random.Random(0)
    ids = [i for i in range(tok.n_vocab) if i not in holes]
    for _ in range(5):
        some = rng.choices(ids, k=20)
        assert tok.decode(some) == ref.decode(some, skip_special_tokens=False)


def test_lone_surrogates_encode_as_the_replacement_character(llama2_path):
    tok = get_tokenizer(llama2_path)
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")


def test_unigram_gives_the_ids_of_tokenizers(tmp_path):
    path = write(tmp_path, unigram_style())
    tok = get_tokenizer(path)
    ref = reference(path)
    assert tok.eot_token == ref.token_to_id("</s>") and tok.bos_token is None
    for text in TEXTS + random_texts(3):
        if "</s>" not in text:
            assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
    assert tok.decode(tok.encode("the quick  fox")) == "the quick  fox"
    # Metaspace with prepend_scheme "first": the "▁" of a leading space is the one prepended (module docstring)
    assert tok.decode(tok.encode(" the fox")) == "the fox"


def with_digits_split_first(data: dict) -> dict:
    """`data` with its pre-tokenizer inside a Sequence, after a Digits one."""
    digits = {"type": "Digits", "individual_digits": True}
    return {**data, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, data["pre_tokenizer"]]}}


@pytest.mark.parametrize("style", [llama2_style, unigram_style, lambda: with_digits_split_first(unigram_style()),
                                   wordpiece_style], ids=["llama2", "unigram", "unigram-in-sequence", "wordpiece"])
def test_text_after_a_special_token_is_encoded_as_tokenizers_encodes_it_there(style, tmp_path):
    """encode_after_special(text) is what `tokenizers` gives `text` after a special token: no "▁" in front where
    a Metaspace has prepend_scheme "first" (Unigram), a "▁" where Llama 2's normalizer prepends one to every text
    between special tokens; `text` encoded alone otherwise."""
    path = write(tmp_path, style())
    tok, ref = get_tokenizer(path), reference(path)
    ref.no_truncation()  # the WordPiece file's own truncation
    eot_name = ref.id_to_token(tok.eot_token)
    specials = [token.content for token in ref.get_added_tokens_decoder().values() if token.special]
    for text in TEXTS + random_texts(3) + ["the 42 foxes", " the fox"]:
        if not any(name in text for name in specials):  # `tokenizers` would match them in the text
            after = ref.encode(eot_name + text, add_special_tokens=False).ids
            assert [tok.eot_token] + tok.encode_after_special(text) == after, text
    if style is llama2_style:
        assert tok.encode_after_special("the fox") == tok.encode("the fox")
    if style is unigram_style:
        assert tok.encode_after_special("the fox") != tok.encode("the fox")  # no "▁" in front
    with pytest.raises(TypeError, match="text"):
        tok.encode_after_special(b"the fox")


def test_wordpiece_is_not_truncated_and_takes_cls_and_sep(tmp_path):
    path = write(tmp_path, wordpiece_style())
    tok = get_tokenizer(path)
    assert (tok.bos_token, tok.eot_token) == (2, 3)  # BertProcessing's [CLS]; [SEP], a well-known end
    text = "the quick brown fox jumps over the lazy dog " * 5
    ids = tok.encode(text)
    assert len(ids) == 45 and ids == tok.encode_batch([text, text], num_threads=4)[1]
    assert tok.decode(ids) == text.strip()  # lowercased, spaces normalized: lossy by its normalizer


def test_end_and_begin_tokens_from_the_config_and_the_template(tmp_path):
    data = llama2_style()
    # no tokenizer_config.json: "</s>" is a well-known end; the post-processor's <s> begins
    tok = get_tokenizer(write(tmp_path / "none", data))
    assert (tok.eot_token, tok.bos_token) == (2, 1)
    # the config's eos_token (a string) and add_bos_token false
    tok = get_tokenizer(write(tmp_path / "config", data, {"eos_token": "<unk>", "add_bos_token": False}))
    assert (tok.eot_token, tok.bos_token) == (0, None)
    # add_bos_token true with another bos_token (an AddedToken dict), though the template says <s>
    tok = get_tokenizer(write(tmp_path / "dict", data, {"add_bos_token": True,
                                                        "bos_token": {"content": "</s>", "lstrip": False}}))
    assert (tok.eot_token, tok.bos_token) == (2, 2)
    # no post-processor and no add_bos_token: none
    tok = get_tokenizer(write(tmp_path / "nobos", {**data, "post_processor": None}, {"bos_token": "<s>"}))
    assert tok.bos_token is None


def test_end_and_begin_token_errors(tmp_path):
    data = llama2_style()
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "</s>"]
    with pytest.raises(ValueError, match="no end-of-text token .*\"eos_token\""):
        get_tokenizer(write(tmp_path / "noeot", data))
    with pytest.raises(ValueError, match="end-of-text token '<\\|nope\\|>'"):
        get_tokenizer(write(tmp_path / "badeot", llama2_style(), {"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="add_bos_token but names no"):
        get_tokenizer(write(tmp_path / "nobos", llama2_style(), {"add_bos_token": True}))
    with pytest.raises(ValueError, match="malformed 'eos_token'"):
        get_tokenizer(write(tmp_path / "malformed", llama2_style(), {"eos_token": 3}))


def test_a_changed_file_is_reloaded_and_hashed(tmp_path):
    data = llama2_style()
    path = write(tmp_path / "a", data, {"eos_token": "</s>"})
    first = get_tokenizer(path)
    assert first.eot_token == 2 and get_tokenizer(path) is first
    sha = tokenizer_file_sha256(path)
    write(tmp_path / "a", data, {"eos_token": "<unk>", "more": "x"})  # the config alone decides the end
    assert get_tokenizer(path).eot_token == 0
    assert tokenizer_file_sha256(path) != sha
    write(tmp_path / "a", {**data, "post_processor": None}, {"eos_token": "<unk>", "more": "x"})
    assert get_tokenizer(path).bos_token is None
    # copies in two folders are one tokenizer; another config makes another
    copy = shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert same_tokenizer(path, os.path.join(copy, "tokenizer.json"))
    write(tmp_path / "b", {**data, "post_processor": None}, {"eos_token": "</s>", "more": "x"})
    assert not same_tokenizer(path, os.path.join(copy, "tokenizer.json"))
    with_config = tokenizer_file_sha256(os.path.join(copy, "tokenizer.json"))
    os.remove(os.path.join(copy, "tokenizer_config.json"))
    assert tokenizer_file_sha256(os.path.join(copy, "tokenizer.json")) != with_config


def test_shards_record_the_hash_of_a_tokenizer_json(llama2_path, tmp_path):
    from llmkern.data.shards import tokenize_documents

    manifest = tokenize_documents(["one document.", "another document, café 🙂."], llama2_path, str(tmp_path),
                                  val_fraction=0.0, num_workers=1)
    assert manifest["tokenizer"] == llama2_path and manifest["eot_token"] == 2
    assert manifest["tokenizer_sha256"] == tokenizer_file_sha256(llama2_path)


def test_missing_tokenizers_package_is_a_clear_import_error(tmp_path, monkeypatch):
    path = write(tmp_path, llama2_style())
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` raises ImportError
    with pytest.raises(ImportError, match="pip install tokenizers.*llmkern tokenizer import"):
        get_tokenizer(path)


def test_files_that_are_no_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        get_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))
    (tmp_path / "config.json").write_text('{"vocab_size": 32000}')
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        get_tokenizer(str(tmp_path / "config.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        get_tokenizer(str(tmp_path / "bad.json"))
    (tmp_path / "odd.json").write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(ValueError, match="cannot read"):
        get_tokenizer(str(tmp_path / "odd.json"))
    with pytest.raises(ValueError, match="sidecar of a .tiktoken file"):
        get_tokenizer(str(tmp_path / "x.tiktoken.json"))
    path = write(tmp_path / "cfg", llama2_style())
    (tmp_path / "cfg" / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json.*not a JSON file"):
        get_tokenizer(path)


def test_a_run_folder_keeps_a_loadable_copy_of_a_tokenizer_json_with_its_config(llama2_path, tmp_path):
    """The copy was written as <run>/tokenizer.tiktoken (loaded by the tiktoken reader: unreadable) without the
    tokenizer_config.json, so its hash never matched: every save copied again and a moved run found no copy."""
    from llmkern.train import checkpoint as ckpt

    source = shutil.copytree(os.path.dirname(llama2_path), tmp_path / "tok")
    spec = str(source / "tokenizer.json")
    with open(source / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "</s>", "bos_token": {"content": "<s>"}, "add_bos_token": True}, f)
    os.makedirs(tmp_path / "run")
    wanted = ckpt._keep_tokenizer_copy(spec, str(tmp_path / "run"))
    assert wanted == tokenizer_file_sha256(spec)
    copy = ckpt.tokenizer_copy_path(str(tmp_path / "run"), spec)
    assert tokenizer_file_sha256(copy) == wanted  # the config came along: the next save copies nothing

    shutil.rmtree(source)  # the original gone: the checkpoint loads with the copy, config included
    meta = {"tokenizer": spec, "tokenizer_sha256": wanted}
    loaded = ckpt._tokenizer_to_load(meta, str(tmp_path / "run" / "checkpoints" / "step_0000001"))
    assert loaded == copy
    tok, ref = get_tokenizer(loaded), reference(copy)
    assert tok.bos_token == 1 and tok.eot_token == 2
    assert tok.encode("Hello, world!") == ref.encode("Hello, world!", add_special_tokens=False).ids
