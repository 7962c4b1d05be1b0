"""A tiktoken or byte tokenizer written as a Hugging Face tokenizer.json: Hugging Face's `tokenizers` library reading
it gives tiktoken's ids on real text, tricky text and random text, and decodes them back; GPT-2's ranks give GPT-2's
50000 merges; the split pattern is rewritten where Oniguruma reads it otherwise, and refused where it cannot."""

import json
import os
import random

import pytest

from llmkern.data import hf_tokenizer_export
from llmkern.data.bpe import CL100K_PATTERN, train_bpe
from llmkern.data.hf_tokenizer_export import (
    onig_pattern,
    recover_merges,
    tiktoken_to_hf_tokenizer_json,
)
from llmkern.data.tokenizer import (
    ENDOFTEXT,
    TiktokenTokenizer,
    get_tokenizer,
    sidecar_path,
)

tokenizers = pytest.importorskip("tokenizers")

BOS = "<|begin_of_text|>"

TRICKY = [
    "", "a", " ", "   ", "\n", "\n\n\n", "Hello, world!", "hello   world  \n  x", "The fox's tail isn't 3.14 long",
    "WE'LL SEE, YOU'RE 'D", "café naïve Straße Ünïcödé", "日本語のテキストです。中文，한국어", "Привет, мир! مرحبا",
    "🙂🚀👍🏽 emoji 👨‍👩‍👧 🙂", "e\u0301\u0302 combining", "12345678901234567890 1,000,000.50", "x\r\ny\r\n\r\n",
    "  leading and trailing  ", "\t\ttabs\tand spaces \t", "a\u00a0b\u3000c\u2028d\x0be\x1cf\u200bg", "trailing\n  ",
    "end with spaces   ", "    def f(x):\n        return x**2\n", "<|endoftext", "<|begin|>", "Ġ ĠĠ Ċ",
]


def random_texts(seed: int, count: int = 40) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefgh XYZ  \n\n\t\r0123456789.,'!?-_éßñ日本語한🙂👍🏽\u00a0\u3000\u0301'sll've"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(count)]


def corpus_texts() -> list[str]:
    """Slices of the shared data's real text, where it is here."""
    from conftest import SHARED_DATA

    texts = []
    for name, size in (("the-verdict.txt", 20_000), ("tinyshakespeare.txt", 60_000)):
        path = os.path.join(SHARED_DATA, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                texts.append(f.read()[:size])
    return texts


def build(tokenizer):
    return tokenizers.Tokenizer.from_str(json.dumps(tiktoken_to_hf_tokenizer_json(tokenizer)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """BPEs trained by llmkern: with GPT-2's pattern; with cl100k's (possessive "{1,3}+"); with a BOS named."""
    folder = tmp_path_factory.mktemp("bpe")
    corpus = corpus_texts() or [" ".join(TRICKY) * 20]
    corpus = [text[:20_000] for text in corpus] + TRICKY * 5
    gpt2 = train_bpe(corpus, 700, folder / "gpt2.tiktoken", num_workers=1)
    cl100k = train_bpe(corpus, 700, folder / "cl100k.tiktoken", pattern="cl100k", num_workers=1)
    path = folder / "bos.tiktoken"
    train_bpe(corpus, 500, path, special_tokens=(ENDOFTEXT, BOS), num_workers=1)
    with open(sidecar_path(str(path)), encoding="utf-8") as f:
        meta = json.load(f)
    with open(sidecar_path(str(path)), "w", encoding="utf-8") as f:
        json.dump({**meta, "bos_token": BOS}, f)
    return {"gpt2": gpt2, "cl100k": cl100k, "bos": get_tokenizer(str(path))}


@pytest.fixture(scope="module")
def gpt2_ranks():
    from conftest import SHARED_DATA

    path = os.path.join(SHARED_DATA, "gpt2.tiktoken")
    if not os.path.isfile(path):
        pytest.skip("../shared/data/gpt2.tiktoken is not here")
    return get_tokenizer(os.path.abspath(path))


def tokenizer_of(name, trained, gpt2_ranks):
    if name == "gpt2.tiktoken":
        return gpt2_ranks
    return get_tokenizer("bytes") if name == "bytes" else trained[name]


def assert_same_ids(tokenizer, hf, texts):
    for text in texts:
        ids = tokenizer.encode(text)
        got = hf.encode(text, add_special_tokens=False).ids
        assert got == ids, (text[:80], got[:20], ids[:20])
        assert hf.decode(got, skip_special_tokens=False) == text


@pytest.mark.parametrize("name", ["gpt2.tiktoken", "gpt2", "cl100k", "bos", "bytes"])
def test_the_tokenizer_json_gives_tiktoken_s_ids(name, trained, gpt2_ranks):
    tokenizer = tokenizer_of(name, trained, gpt2_ranks)
    hf = build(tokenizer)
    assert hf.get_vocab_size() == tokenizer.n_vocab
    assert_same_ids(tokenizer, hf, corpus_texts() + TRICKY + random_texts(random.randrange(2**31)))


@pytest.mark.parametrize("name", ["gpt2.tiktoken", "cl100k", "bos", "bytes"])
def test_special_tokens_in_the_text_are_matched_as_tiktoken_s_allowed_special(name, trained, gpt2_ranks):
    tokenizer = tokenizer_of(name, trained, gpt2_ranks)
    hf = build(tokenizer)
    eot = tokenizer.special_token(ENDOFTEXT)
    for text in ("a<|endoftext|>b", "<|endoftext|>", " x <|endoftext|>\n\n<|endoftext|>  y", "<|endoftext"):
        if name == "bytes":  # no tiktoken encoding: the special token between the pieces' bytes
            pieces = text.split(ENDOFTEXT)
            expected = sum(([eot, *tokenizer.encode(p)] for p in pieces[1:]), tokenizer.encode(pieces[0]))
        else:
            expected = tokenizer.encoding.encode(text, allowed_special="all")
        got = hf.encode(text, add_special_tokens=False).ids
        assert got == expected
        assert (eot in got) == (ENDOFTEXT in text)
        assert hf.decode(got, skip_special_tokens=False) == text


def test_a_bos_goes_first_as_llmkern_puts_it(trained, gpt2_ranks):
    bos_tokenizer = trained["bos"]
    assert bos_tokenizer.bos_token == bos_tokenizer.special_token(BOS)
    text = "The quick brown fox."
    ids = build(bos_tokenizer).encode(text).ids  # add_special_tokens=True, as transformers encodes
    assert ids == [bos_tokenizer.bos_token] + bos_tokenizer.encode(text)
    assert build(gpt2_ranks).encode(text).ids == gpt2_ranks.encode(text)  # GPT-2's: nothing added


def test_gpt2_s_ranks_give_gpt2_s_merges(gpt2_ranks):
    data = tiktoken_to_hf_tokenizer_json(gpt2_ranks)
    merges, vocab = data["model"]["merges"], data["model"]["vocab"]
    assert len(merges) == 50000
    assert len(vocab) + len(data["added_tokens"]) == 50257
    assert data["added_tokens"][0]["content"] == ENDOFTEXT and data["added_tokens"][0]["id"] == 50256
    # merges.txt of GPT-2's Hugging Face files begins so
    assert merges[:6] == ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n"]
    # each merge makes its token, at its rank: the merges are in the vocab's order
    made = [vocab["".join(m.split(" "))] for m in merges]
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(vocab[part] < token for m, token in zip(merges, made) for part in m.split(" "))


def test_recovered_merges_replay_the_bpe_ranks():
    # "ab" first, then "abc" as "ab" + "c"; "bcd" forms as "b" + "cd", "cd" ranked before it
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"ab", b"cd", b"abc", b"bcd", b"abcd"):
        ranks[token] = len(ranks)
    assert recover_merges(ranks) == [(b"a", b"b"), (b"c", b"d"), (b"ab", b"c"), (b"b", b"cd"), (b"ab", b"cd")]
    # a token no merges reach gets none: "xyz" with neither "xy" nor "yz" a token
    ranks[b"xyz"] = len(ranks)
    assert recover_merges(ranks)[-1] == (b"ab", b"cd")


@pytest.mark.parametrize("pattern, expected", [
    (r"\p{N}{1,3}+|\s++$", r"(?>\p{N}{1,3})|\s++\z"),
    (r"(?:ab){2}+|[\d]{1,}+x", r"(?>(?:ab){2})|(?>[\d]{1,})x"),
    (r"^a|[$^]|\$|\^", r"\Aa|[$^]|\$|\^"),
    (r"(?P<w>\p{L}+)", r"(?<w>\p{L}+)"),
    (r"x{2}y?+", r"x{2}y?+"),
    (r"(?i:'s)|[^\]\[]{1,3}+", r"(?i:'s)|(?>[^\]\[]{1,3})"),
])
def test_patterns_are_rewritten_for_oniguruma(pattern, expected):
    assert onig_pattern(pattern) == expected
    assert onig_pattern(CL100K_PATTERN) == CL100K_PATTERN.replace(r"\p{N}{1,3}+", r"(?>\p{N}{1,3})").replace(
        "$", r"\z")


def test_flags_the_engines_read_apart_are_refused():
    for pattern in (r"(?m)^a$", r"(?s:.)", r"(?x) a"):
        with pytest.raises(ValueError, match="pattern: the inline flags"):
            onig_pattern(pattern)


def test_the_unrewritten_cl100k_pattern_fails_the_check(trained, monkeypatch):
    # Oniguruma reads "\p{N}{1,3}+" as a repetition of the interval: "12345" one piece, not "123" + "45"
    monkeypatch.setattr(hf_tokenizer_export, "onig_pattern", lambda pattern: pattern)
    with pytest.raises(ValueError, match=r"gives other pieces in `tokenizers`' regex engine .*'123', '45'"):
        tiktoken_to_hf_tokenizer_json(trained["cl100k"])


def test_a_pattern_that_leaves_text_unmatched_is_refused(trained):
    import tiktoken

    ranks = trained["gpt2"].encoding._mergeable_ranks
    encoding = tiktoken.Encoding("gaps", pat_str=r"\p{L}+|\p{N}+", mergeable_ranks=ranks,
                                 special_tokens={ENDOFTEXT: len(ranks)})
    with pytest.raises(ValueError, match="gives other pieces"):
        tiktoken_to_hf_tokenizer_json(TiktokenTokenizer(encoding, "gaps"))


def test_a_pattern_oniguruma_cannot_compile_is_refused(trained):
    import tiktoken

    ranks = trained["gpt2"].encoding._mergeable_ranks
    pattern = r"(?P<w>\p{L})(?P=w)|[\p{L}--a]+|\p{N}+|\s+|[^\s\p{L}\p{N}]+"
    encoding = tiktoken.Encoding("odd", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens={ENDOFTEXT: len(ranks)})
    with pytest.raises(ValueError, match="cannot be written as a tokenizer.json: Hugging Face's `tokenizers` "
                                         "cannot read it"):
        tiktoken_to_hf_tokenizer_json(TiktokenTokenizer(encoding, "odd"))


def test_other_tokenizers_are_a_type_error():
    with pytest.raises(TypeError, match="tokenizer: expected a tiktoken or byte tokenizer"):
        tiktoken_to_hf_tokenizer_json("gpt2")
