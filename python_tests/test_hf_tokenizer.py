"""Importing a Hugging Face tokenizer.json of byte-level BPE: the same ids as the tokenizer it was written from
and as Hugging Face's BPE (re-implemented here), and clear refusals of what tiktoken cannot reproduce."""

import copy
import json
import random

import pytest
import regex

from llmkern.cli import main as cli_main
from llmkern.data.bpe import train_bpe
from llmkern.data.hf_tokenizer import import_hf_tokenizer
from llmkern.data.tokenizer import ENDOFTEXT, get_tokenizer

# Hugging Face's ByteLevel regex, as its Rust code writes it (not llmkern's tiktoken spelling).
HF_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3's Split regex.
LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'll see 12345 digits.\n",
    "Ünïcödé: naïve café, Straße,日本語のテキスト, русский текст, العربية 🙂🚀👍🏽\n",
    "def f(x):\n    return x ** 2  # a comment\n\n\t\tTabs   and    spaces\r\n",
] * 30

TEXTS = [
    "", "a", " ", "   ", "\n\n\n", "Hello, world!", "hello   world  \n  x", "The fox's tail isn't 3.14159 long",
    "café naïve Straße", "日本語のテキストです。", "🙂🚀👍🏽 emoji 🙂", "12345678901234567890", "x\r\ny\r\n",
    "  leading and trailing  ", "\t\ttabs\tand spaces \t", "WE'LL SEE, YOU'RE 'D", "a<|endoftext|>b",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of bytes to the printable characters that byte-level vocabs are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def spell(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def merge_parts(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens a merged token was made of: its bytes merged with the lower-ranked tokens only."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        found = [(ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1)]
        rank, i = min(found)
        assert rank < limit
        parts[i: i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def hf_json(tok, pattern=None, merges_as_pairs=True, shift=0, specials=None) -> dict:
    """A tokenizer.json of the BPE of `tok` (a trained .tiktoken), as `tokenizers` writes one.

    pattern: None for ByteLevel's own regex, else a Split regex. shift: ids of the BPE moved up by that
    many, the special tokens `specials` (name -> id) first, as SmolLM's trainer orders them."""
    ranks = tok.encoding._mergeable_ranks
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            a, b = merge_parts(token, ranks)
            merges.append([spell(a), spell(b)] if merges_as_pairs else f"{spell(a)} {spell(b)}")
    vocab = {spell(t): r + shift for t, r in ranks.items()}
    if specials is None:
        specials = {ENDOFTEXT: len(ranks)}
    if shift:
        vocab.update(specials)  # the trainer's special tokens are in the vocab too
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": pattern is None}
    pre = byte_level if pattern is None else {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}, byte_level]}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in specials.items()],
        "normalizer": None, "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def hf_encode(data: dict, text: str, split_regex: str) -> list[int]:
    """Hugging Face's byte-level BPE, written out: split (matches and the text between them are pieces), map
    bytes to characters, merge the adjacent pair earliest in the merges list."""
    model = data["model"]
    rank = {}
    for i, m in enumerate(model["merges"]):
        rank.setdefault(tuple(m) if isinstance(m, list) else tuple(m.split(" ")), i)
    pieces, at = [], 0
    for match in regex.finditer(split_regex, text):
        pieces += [text[at: match.start()], match.group()]
        at = match.end()
    pieces.append(text[at:])
    ids = []
    for piece in filter(None, pieces):
        word = list(spell(piece.encode("utf-8")))
        while len(word) > 1:
            best = min(range(len(word) - 1), key=lambda i: rank.get((word[i], word[i + 1]), len(rank)))
            if (word[best], word[best + 1]) not in rank:
                break
            word[best: best + 2] = [word[best] + word[best + 1]]
        ids += [model["vocab"][w] for w in word]
    return ids


def random_texts(seed: int, count: int = 30) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijk ABC  \n\t\r0123456789.,'!?éßñ日本語🙂🚀👍🏽\u00a0\u3000-_"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BPE trained with GPT-2's pattern, and one with Llama 3's."""
    folder = tmp_path_factory.mktemp("bpe")
    gpt2 = train_bpe(CORPUS, 600, folder / "gpt2.tiktoken", num_workers=1)
    llama = train_bpe(CORPUS, 600, folder / "llama.tiktoken", pattern=LLAMA3_REGEX, num_workers=1)
    return gpt2, llama


def write(tmp_path, data, name="tokenizer.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("merges_as_pairs", [True, False])
def test_byte_level_import_gives_the_same_ids(tmp_path, trained, merges_as_pairs):
    original = trained[0]
    data = hf_json(original, merges_as_pairs=merges_as_pairs)
    tok = import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken")
    assert (tok.n_vocab, tok.eot_token) == (original.n_vocab, original.eot_token)
    for text in TEXTS + random_texts(1):
        ids = tok.encode(text)
        assert ids == original.encode(text) == hf_encode(data, text, HF_GPT2_REGEX), text
        assert tok.decode(ids) == text
    assert tok.decode([tok.eot_token]) == ENDOFTEXT
    assert get_tokenizer(str(tmp_path / "out.tiktoken")).encode("The fox") == tok.encode("The fox")


def test_split_regex_import_gives_the_same_ids(tmp_path, trained):
    original = trained[1]
    data = hf_json(original, pattern=LLAMA3_REGEX)
    tok = import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken")
    for text in TEXTS + random_texts(2):
        assert tok.encode(text) == original.encode(text) == hf_encode(data, text, LLAMA3_REGEX), text
        assert tok.decode(tok.encode(text)) == text


def test_split_regex_that_leaves_gaps(tmp_path, trained):
    # "Isolated" keeps the text between matches as pieces; tiktoken alone would drop it.
    data = hf_json(trained[0], pattern=r"\p{L}+")
    tok = import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken")
    for text in TEXTS + random_texts(3):
        assert tok.encode(text) == hf_encode(data, text, r"\p{L}+"), text
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_first_and_another_end_of_text(tmp_path, trained):
    # SmolLM's layout: special tokens at ids 0.. in the vocab too, the bytes and merges after them; and an
    # end-of-text token of another name, as Llama 3's <|end_of_text|>.
    original = trained[0]
    specials = {"<|end_of_text|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    data = hf_json(original, shift=3, specials=specials)
    path = write(tmp_path, data)
    with pytest.raises(ValueError, match="eot_token: '<\\|endoftext\\|>' is not a special token"):
        import_hf_tokenizer(path, tmp_path / "out.tiktoken")
    tok = import_hf_tokenizer(path, tmp_path / "out.tiktoken", eot_token="<|end_of_text|>")
    assert (tok.n_vocab, tok.eot_token) == (original.n_vocab - 1 + 3, 0)
    for text in TEXTS + random_texts(4):
        assert tok.encode(text) == [i + 3 for i in original.encode(text)] == hf_encode(data, text, HF_GPT2_REGEX)
    assert tok.decode([0, *tok.encode("hi"), 2]) == "<|end_of_text|>hi<|im_end|>"
    reloaded = get_tokenizer(str(tmp_path / "out.tiktoken"))
    assert reloaded.eot_token == 0
    # a sidecar naming an end-of-text token that it lacks is an error, not <|endoftext|>'s absence
    side = tmp_path / "out.tiktoken.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "eot_token": "<|eos|>"}))
    with pytest.raises(ValueError, match="names the end-of-text token '<\\|eos\\|>'"):
        get_tokenizer(str(tmp_path / "out.tiktoken"))
    with pytest.raises(ValueError, match="eot_token: '<\\|nope\\|>'"):
        import_hf_tokenizer(path, tmp_path / "other.tiktoken", eot_token="<|nope|>")


def test_ignore_merges_with_every_split_listed(tmp_path, trained):
    # A file converted from tiktoken (Llama 3's) lists every split of a token into two tokens, by rank.
    original = trained[0]
    data = hf_json(original)
    vocab = data["model"]["vocab"]
    full = [[t[:k], t[k:]] for t in sorted(vocab, key=vocab.get) if t != ENDOFTEXT
            for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    data["model"].update(merges=full, ignore_merges=True)
    tok = import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken")
    for text in TEXTS + random_texts(5):
        assert tok.encode(text) == original.encode(text), text
    # with one split missing (of a token that other splits still make) that its own BPE takes, it is refused:
    # Hugging Face's BPE stops at that split where tiktoken goes on to the token
    made = [m[0] + m[1] for m in full]
    taken = hf_json(original)["model"]["merges"]  # each token's split by its own BPE
    dropped = next(m for m in full if made.count(m[0] + m[1]) > 1 and m in taken)
    data["model"]["merges"] = [m for m in full if m != dropped]
    with pytest.raises(ValueError, match="ignore_merges but no merge"):
        import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken")
    # one that no token's BPE takes changes nothing: the merges still rebuild every token
    data["model"]["merges"] = [m for m in full if m in taken or made.count(m[0] + m[1]) == 1]
    assert len(data["model"]["merges"]) < len(full)
    tok = import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken")
    for text in TEXTS + random_texts(6):
        assert tok.encode(text) == original.encode(text) == hf_encode(data, text, HF_GPT2_REGEX), text


def _swap_ids_of_two_merges(data):
    vocab = data["model"]["vocab"]
    a, b = ("".join(data["model"]["merges"][i]) for i in (10, 20))
    vocab[a], vocab[b] = vocab[b], vocab[a]


def _drop_a_byte(data):
    del data["model"]["vocab"]["Ā"]  # byte 0


def _unreachable_token(data):
    data["model"]["vocab"]["xyzw"] = data["added_tokens"][0]["id"]
    data["added_tokens"][0]["id"] += 1


def _merge_not_in_vocab(data):
    data["model"]["merges"].append(["Ġthe", "Ġfox"])


def _sentencepiece_char(data):
    vocab = data["model"]["vocab"]
    vocab["▁the"] = vocab.pop(next(iter(sorted(vocab, key=vocab.get)[300:])))


def _non_special_added(data):
    data["added_tokens"][0]["special"] = False


def _hole_in_ids(data):
    data["added_tokens"][0]["id"] += 5


@pytest.mark.parametrize("change, match", [
    (lambda d: d["model"].update(type="Unigram"), "'Unigram' model"),
    (lambda d: d["model"].update(type="WordPiece"), "'WordPiece' model"),
    (lambda d: d["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda d: d["model"].update(dropout=0.1), "dropout"),
    (lambda d: d["model"].update(continuing_subword_prefix="##"), "continuing_subword_prefix"),
    (lambda d: d.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}),
     "Metaspace"),
    (lambda d: d.update(pre_tokenizer=None), "no pre-tokenizer"),
    (lambda d: d["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
    (lambda d: d["pre_tokenizer"].update(use_regex=False), "never split"),
    (lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Removed", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}), "behavior 'Removed'"),
    (lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?<!x"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}), "cannot compile"),
    (lambda d: d.update(normalizer={"type": "NFKC"}), r"normalizer that changes the text \(NFKC\)"),
    (lambda d: d.update(normalizer={"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}),
     "NFC, Lowercase"),
    (_swap_ids_of_two_merges, "out of merge order"),
    (_drop_a_byte, "lacks 1 of the 256 single bytes"),
    (_unreachable_token, "1 tokens that no merge gives"),
    (_merge_not_in_vocab, "'Ġthe' \\+ 'Ġfox'"),
    (_sentencepiece_char, "'▁', which is no byte"),
    (_non_special_added, "non-special added token"),
    (_hole_in_ids, "no token of id"),
])
def test_refusals_name_what_was_found(tmp_path, trained, change, match):
    data = copy.deepcopy(hf_json(trained[0]))
    change(data)
    with pytest.raises(ValueError, match=match):
        import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken")
    assert not (tmp_path / "out.tiktoken").exists()


def test_merges_that_do_not_rebuild_a_token_are_refused(tmp_path, trained):
    # "bc" is merged before "ab", so Hugging Face turns "abc" into "a" "bc" (no such merge) and never into the
    # token "abc" = "ab" + "c"; tiktoken would take a piece "abc" whole.
    data = hf_json(trained[0])
    vocab, n = data["model"]["vocab"], len(data["model"]["vocab"])  # ids 0..n-1, <|endoftext|> = n
    for i, token in enumerate(["qz", "xq", "xqz"]):
        vocab[token] = n + i
    data["added_tokens"][0]["id"] = n + 3
    data["model"]["merges"] += [["q", "z"], ["x", "q"], ["xq", "z"]]
    with pytest.raises(ValueError, match="merges the characters of its token 'xqz' into \\['x', 'qz'\\]"):
        import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken")


def test_nfc_normalizer_imports_with_a_warning(tmp_path, trained):
    data = hf_json(trained[0])
    data["normalizer"] = {"type": "NFC"}
    with pytest.warns(UserWarning, match="NFC"):
        tok = import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken")
    assert tok.encode("café") == trained[0].encode("café")


def test_malformed_parts(tmp_path, trained):
    for key, value in (("normalizer", [1]), ("pre_tokenizer", "ByteLevel")):
        data = {**hf_json(trained[0]), key: value}
        with pytest.raises(ValueError, match=f"malformed {key}"):
            import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken")
    data = hf_json(trained[0])
    data["added_tokens"].append("<|x|>")
    with pytest.raises(ValueError, match="malformed added token"):
        import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken")


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="tokenizer_json"):
        import_hf_tokenizer(3, tmp_path / "out.tiktoken")
    with pytest.raises(FileNotFoundError, match="tokenizer_json"):
        import_hf_tokenizer(tmp_path / "missing.json", tmp_path / "out.tiktoken")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_json: .* not a JSON file"):
        import_hf_tokenizer(tmp_path / "bad.json", tmp_path / "out.tiktoken")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        import_hf_tokenizer(write(tmp_path, {"a": 1}), tmp_path / "out.tiktoken")


def test_cli_import(tmp_path, trained, capsys):
    path = write(tmp_path, hf_json(trained[0]))
    out = tmp_path / "cli.tiktoken"
    assert cli_main(["tokenizer", "import", str(path), "--out", str(out)]) == 0
    assert get_tokenizer(str(out)).encode("The quick fox") == trained[0].encode("The quick fox")
    data = hf_json(trained[0])
    data["model"]["byte_fallback"] = True
    assert cli_main(["tokenizer", "import", str(write(tmp_path, data, "b.json")), "--out", str(out)]) == 2
    assert "byte_fallback" in capsys.readouterr().err


def _llama3_post_processor(name="<|begin_of_text|>", token_id=None) -> dict:
    """Llama 3's post-processor: ByteLevel (offsets only), then a template with `name` in front of the text."""
    return {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": name, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {name: {"id": name, "ids": [token_id], "tokens": [name]}}}]}


LLAMA3_SPECIALS = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|eot_id|>": 2}


def test_begin_of_sequence_from_the_post_processor(tmp_path, trained):
    data = hf_json(trained[1], pattern=LLAMA3_REGEX, shift=3, specials=LLAMA3_SPECIALS)
    data["post_processor"] = _llama3_post_processor(token_id=0)
    tok = import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken", eot_token="<|end_of_text|>")
    assert (tok.bos_token, tok.eot_token) == (0, 1)
    reloaded = get_tokenizer(str(tmp_path / "out.tiktoken"))
    assert (reloaded.bos_token, reloaded.eot_token) == (0, 1)
    assert json.loads((tmp_path / "out.tiktoken.json").read_text())["bos_token"] == "<|begin_of_text|>"
    assert 0 not in tok.encode("<|begin_of_text|>hi")  # encode itself adds none and matches none
    # the template alone, not in a Sequence
    data["post_processor"] = data["post_processor"]["processors"][1]
    tok = import_hf_tokenizer(write(tmp_path, data), tmp_path / "alone.tiktoken", eot_token="<|end_of_text|>")
    assert tok.bos_token == 0


@pytest.mark.parametrize("post_processor", [
    None,
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
    {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}], "pair": [],
     "special_tokens": {}},
])
def test_no_begin_of_sequence_where_the_post_processor_puts_none(tmp_path, trained, post_processor):
    data = {**hf_json(trained[0]), "post_processor": post_processor}
    tok = import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken")
    assert tok.bos_token is None and get_tokenizer(str(tmp_path / "out.tiktoken")).bos_token is None


def test_begin_of_sequence_override_and_refusals(tmp_path, trained, capsys):
    data = hf_json(trained[1], pattern=LLAMA3_REGEX, shift=3, specials=LLAMA3_SPECIALS)
    data["post_processor"] = _llama3_post_processor(token_id=0)
    path = write(tmp_path, data)
    assert import_hf_tokenizer(path, tmp_path / "a.tiktoken", eot_token="<|end_of_text|>",
                               bos_token="<|eot_id|>").bos_token == 2
    assert import_hf_tokenizer(path, tmp_path / "b.tiktoken", eot_token="<|end_of_text|>", bos_token=None).bos_token \
        is None
    with pytest.raises(ValueError, match="bos_token: '<\\|nope\\|>' is not a special token"):
        import_hf_tokenizer(path, tmp_path / "c.tiktoken", eot_token="<|end_of_text|>", bos_token="<|nope|>")
    with pytest.raises(TypeError, match="bos_token"):
        import_hf_tokenizer(path, tmp_path / "c.tiktoken", eot_token="<|end_of_text|>", bos_token=0)
    # the command line: the template's by default, --bos-token NAME, --no-bos-token
    out = str(tmp_path / "cli.tiktoken")
    base = ["tokenizer", "import", str(path), "--out", out, "--eot-token", "<|end_of_text|>"]
    for extra, want in (([], 0), (["--bos-token", "<|eot_id|>"], 2), (["--no-bos-token"], None)):
        assert cli_main(base + extra) == 0
        assert get_tokenizer(out).bos_token == want
    assert "begin of sequence = none" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(base + ["--no-bos-token", "--bos-token", "<|eot_id|>"])
    # a template that puts an ordinary token (or none of the file's) in front is refused
    for name in ("hello", "<|begin_of_text|>x"):
        data["post_processor"] = _llama3_post_processor(name=name, token_id=5)
        with pytest.raises(ValueError, match="puts .* in front of every text, which is not one of its special"):
            import_hf_tokenizer(write(tmp_path, data), tmp_path / "d.tiktoken", eot_token="<|end_of_text|>")
    assert not (tmp_path / "d.tiktoken").exists()


def test_refusal_says_the_tokenizer_json_is_a_spec(tmp_path, trained):
    data = hf_json(trained[0])
    data["model"]["byte_fallback"] = True
    with pytest.raises(ValueError, match="the tokenizer.json itself is a tokenizer spec"):
        import_hf_tokenizer(write(tmp_path, data), tmp_path / "out.tiktoken")


def test_end_of_text_from_the_tokenizer_config_beside_the_file(tmp_path, trained, capsys):
    """The import took <|endoftext|> whatever tokenizer_config.json said (a Llama 3 file needed --eot-token, and an
    Instruct model's <|im_end|> was read by the tokenizer.json spec but not by the import): both routes agree now."""
    data = hf_json(trained[1], pattern=LLAMA3_REGEX, shift=3, specials=LLAMA3_SPECIALS)
    path = write(tmp_path, data)
    with pytest.raises(ValueError, match="'<\\|endoftext\\|>' is not a special token"):
        import_hf_tokenizer(path, tmp_path / "none.tiktoken")  # no config: the default, which this file lacks
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot_id|>"}}))
    assert import_hf_tokenizer(path, tmp_path / "a.tiktoken").eot_token == 2
    assert import_hf_tokenizer(path, tmp_path / "b.tiktoken", eot_token="<|end_of_text|>").eot_token == 1  # given
    assert cli_main(["tokenizer", "import", str(path), "--out", str(tmp_path / "c.tiktoken")]) == 0
    assert "end of text = 2" in capsys.readouterr().out
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": ["<|eot_id|>"]}))
    with pytest.raises(ValueError, match="malformed 'eos_token'"):
        import_hf_tokenizer(path, tmp_path / "d.tiktoken")
