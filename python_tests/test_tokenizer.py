"""llmkern.data.tokenizer: specs, round trips on random Unicode, GPT-2's ids, errors."""

import base64
import os
import random

import pytest

from llmkern.data.tokenizer import ENDOFTEXT, get_tokenizer

# Code points drawn from every width of UTF-8 and several scripts; no surrogates.
_ALPHABETS = [
    (0x20, 0x7E),  # ASCII
    (0xA0, 0x17F),  # Latin-1, Latin Extended-A
    (0x300, 0x36F),  # combining marks
    (0x391, 0x3C9),  # Greek
    (0x400, 0x44F),  # Cyrillic
    (0x5D0, 0x5EA),  # Hebrew
    (0x4E00, 0x4FFF),  # CJK
    (0xAC00, 0xACFF),  # Hangul
    (0x1F300, 0x1F64F),  # emoji
    (0x1F900, 0x1F9FF),  # more emoji
]
_WHITESPACE = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u3000", "\u00a0"]


def random_unicode(rng: random.Random, length: int) -> str:
    out = []
    for _ in range(length):
        r = rng.random()
        if r < 0.15:
            out.append(rng.choice(_WHITESPACE))
        elif r < 0.2:
            out.append(rng.choice(["'s", "'ll", "123", "3.14", ENDOFTEXT, "\u200d", "\ufeff"]))
        else:
            lo, hi = rng.choice(_ALPHABETS)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def random_texts(seed: int, count: int = 20) -> list[str]:
    rng = random.Random(seed)
    return [random_unicode(rng, rng.choice([0, 1, 2, 17, 123, 1000])) for _ in range(count)]


@pytest.fixture
def gpt2_file(shared_data):
    path = os.path.join(shared_data, "gpt2.tiktoken")
    if not os.path.exists(path):
        pytest.skip("gpt2.tiktoken is not in ../shared/data")
    return path


def test_bytes_tokenizer_round_trip_and_ids():
    tok = get_tokenizer("bytes")
    assert (tok.n_vocab, tok.eot_token, tok.spec) == (257, 256, "bytes")
    assert tok.encode("hé🙂") == list("hé🙂".encode("utf-8"))
    for text in random_texts(seed=1):
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("a") + [tok.eot_token] + tok.encode("b")) == f"a{ENDOFTEXT}b"
    texts = random_texts(seed=2, count=5)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_bytes_tokenizer_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="ids"):
        get_tokenizer("bytes").decode([65, 257])


def _check_decode_types(tok, good_id):
    # bool is an int subclass, and bytearray.append / tiktoken took a float's or bool's value: decode([1.7,
    # True]) or a float tensor gave text. Each must be a TypeError naming the argument.
    import numpy as np
    import torch

    for bad in ([1.7, True], [good_id, True], [float(good_id)], torch.tensor([float(good_id)]),
                torch.tensor([True]), np.array([float(good_id)]), np.array([True]), [np.True_], "ab", good_id):
        with pytest.raises(TypeError, match="ids"):
            tok.decode(bad)
    want = tok.decode([good_id, good_id])
    for ok in (torch.tensor([good_id, good_id]), np.array([good_id, good_id], dtype=np.int32),
               [np.int64(good_id), good_id]):
        assert tok.decode(ok) == want
    with pytest.raises(ValueError, match="ids"):  # the range check stands for tensors too
        tok.decode(torch.tensor([good_id, tok.n_vocab]))


def test_bytes_tokenizer_rejects_floats_and_bools():
    tok = get_tokenizer("bytes")
    _check_decode_types(tok, 65)
    assert tok.decode([65, 66]) == "AB"


def test_gpt2_file_rejects_floats_and_bools(gpt2_file):
    _check_decode_types(get_tokenizer(gpt2_file), 15496)


def _check_encode_types(tok):
    # encode_batch("hello") encoded each character as a text of its own; encode(b"a") was an AttributeError
    with pytest.raises(TypeError, match="texts"):
        tok.encode_batch("hello")
    for bad in (b"ab", None):
        with pytest.raises(TypeError, match="text"):
            tok.encode(bad)
    assert tok.encode_batch(["he", "llo"], num_threads=1) == [tok.encode("he"), tok.encode("llo")]


def test_bytes_tokenizer_encode_type_errors():
    _check_encode_types(get_tokenizer("bytes"))


def test_gpt2_file_encode_type_errors(gpt2_file):
    _check_encode_types(get_tokenizer(gpt2_file))


def test_gpt2_file_gives_gpt2_ids(gpt2_file):
    tok = get_tokenizer(gpt2_file)
    assert tok.n_vocab == 50257 and tok.eot_token == 50256
    # Known GPT-2 ids (the same as HuggingFace's GPT2Tokenizer gives).
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert tok.encode(" The quick brown fox") == [383, 2068, 7586, 21831]
    assert tok.decode([15496, 995]) == "Hello world"


def test_gpt2_file_round_trips_random_unicode(gpt2_file):
    tok = get_tokenizer(gpt2_file)
    texts = random_texts(seed=3)
    encoded = tok.encode_batch(texts, num_threads=2)
    assert encoded == [tok.encode(t) for t in texts]
    for text, ids in zip(texts, encoded):
        assert tok.decode(ids) == text


def test_gpt2_file_rejects_out_of_range_ids_naming_them(gpt2_file):
    # tiktoken raised KeyError or OverflowError, naming no argument, as ByteTokenizer names it.
    tok = get_tokenizer(gpt2_file)
    for bad in (-1, 50257, 10**6):
        with pytest.raises(ValueError, match=rf"ids: expected token ids in \[0, 50257\), got {bad}"):
            tok.decode([15496, bad, 995])
    assert tok.decode([15496, tok.eot_token]) == f"Hello{ENDOFTEXT}"


def test_endoftext_inside_text_is_ordinary_text(gpt2_file):
    tok = get_tokenizer(gpt2_file)
    ids = tok.encode(f"a{ENDOFTEXT}b")
    assert tok.eot_token not in ids
    assert tok.decode(ids) == f"a{ENDOFTEXT}b"


def test_spec_reloads_the_same_tokenizer(gpt2_file, tmp_path, monkeypatch):
    tok = get_tokenizer(gpt2_file)
    assert os.path.isabs(tok.spec)
    # A relative path resolves to the same absolute spec.
    monkeypatch.chdir(os.path.dirname(gpt2_file))
    again = get_tokenizer(os.path.join(".", "gpt2.tiktoken"))
    assert again.spec == tok.spec and again.encode("spec round trip") == tok.encode("spec round trip")


def test_same_tokenizer_compares_files_by_contents(tmp_path):
    from llmkern.data.bpe import train_bpe
    from llmkern.data.tokenizer import same_tokenizer, tokenizer_file_sha256

    one, copy, other = (str(tmp_path / f"{name}.tiktoken") for name in ("one", "copy", "other"))
    train_bpe(["the cat sees the moon. " * 20], 270, one, num_workers=1)
    train_bpe(["the cat sees the moon. " * 20], 270, copy, num_workers=1)  # the same contents, sidecar included
    train_bpe(["a dog eats bread. " * 20], 270, other, num_workers=1)
    assert same_tokenizer("bytes", "bytes") and same_tokenizer(one, one)
    assert same_tokenizer(one, copy) and not same_tokenizer(one, other)
    assert not same_tokenizer("bytes", "gpt2") and not same_tokenizer(one, "bytes")
    with open(copy + ".json", "a") as f:
        f.write(" ")  # another sidecar: another tokenizer, as far as the hash can tell
    assert not same_tokenizer(one, copy)
    recorded = tokenizer_file_sha256(one)
    os.rename(one, str(tmp_path / "moved.tiktoken"))
    os.rename(one + ".json", str(tmp_path / "moved.tiktoken.json"))
    assert tokenizer_file_sha256(one) is None
    assert not same_tokenizer(str(tmp_path / "moved.tiktoken"), one)  # gone: nothing to compare
    assert same_tokenizer(str(tmp_path / "moved.tiktoken"), one, sha256_b=recorded)  # unless its hash was kept



def test_a_missing_an_empty_and_a_written_sidecar_hash_apart_and_as_recorded_runs_expect(tmp_path):
    """An absent sidecar and an empty one are different tokenizer folders; the hashes of the usual cases (no
    sidecar, a sidecar with contents) stay those that runs and shard manifests recorded: the file, a NUL, the
    sidecar's bytes (none when absent), a NUL."""
    import hashlib

    from llmkern.data.tokenizer import tokenizer_file_sha256

    path = tmp_path / "tok.tiktoken"
    main = base64.b64encode(os.urandom(12)) + b" 0\n"
    sidecar = b'{"pattern": "\\\\s+", "special": {}}'
    path.write_bytes(main)
    absent = tokenizer_file_sha256(str(path))
    (tmp_path / "tok.tiktoken.json").write_bytes(b"")
    empty = tokenizer_file_sha256(str(path))
    (tmp_path / "tok.tiktoken.json").write_bytes(sidecar)
    written = tokenizer_file_sha256(str(path))

    assert len({absent, empty, written}) == 3
    assert absent == hashlib.sha256(main + b"\0" + b"\0").hexdigest()
    assert written == hashlib.sha256(main + b"\0" + sidecar + b"\0").hexdigest()


def test_unknown_spec_and_bad_types():
    with pytest.raises(ValueError, match="spec"):
        get_tokenizer("no_such_encoding")
    with pytest.raises(TypeError, match="spec"):
        get_tokenizer(50257)
    with pytest.raises(ValueError, match="spec"):
        get_tokenizer("")


def test_missing_and_corrupt_tiktoken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        get_tokenizer(str(tmp_path / "missing.tiktoken"))
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("this is not base64 and a rank\n")
    with pytest.raises(ValueError, match="bad.tiktoken"):
        get_tokenizer(str(bad))
    empty = tmp_path / "empty.tiktoken"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        get_tokenizer(str(empty))
    good = tmp_path / "good.tiktoken"
    good.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    assert get_tokenizer(str(good)).eot_token == 256
    (tmp_path / "good.tiktoken.json").write_text('{"pattern": ')
    with pytest.raises(ValueError, match="sidecar"):
        get_tokenizer(str(good))


def _offline(monkeypatch):
    import tiktoken

    def offline(name):
        try:  # a chained error, as requests raises it
            raise TimeoutError("connect timed out")
        except TimeoutError as inner:
            raise ConnectionError("HTTPSConnectionPool: Max retries exceeded") from inner

    monkeypatch.setattr(tiktoken, "get_encoding", offline)


def test_named_encoding_unavailable_offline_is_a_clear_error(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(RuntimeError, match="not available offline"):
        get_tokenizer("cl100k_base")


def test_offline_error_is_an_oserror_without_the_network_traceback(monkeypatch):
    from llmkern.data.tokenizer import TokenizerUnavailableError

    _offline(monkeypatch)
    with pytest.raises(OSError, match="not available offline") as info:
        get_tokenizer("gpt2")
    err = info.value
    assert isinstance(err, TokenizerUnavailableError)
    # Raised `from None`: no chained requests/urllib3 traceback, though the cause is named.
    assert err.__cause__ is None and err.__suppress_context__
    message = str(err)
    assert "'gpt2'" in message and "ConnectionError" in message
    assert "--tokenize.tokenizer=PATH.tiktoken" in message and "--tokenizer=PATH.tiktoken" in message


def test_cli_reports_an_offline_tokenizer_in_one_line(monkeypatch, tmp_path, capsys):
    from llmkern.cli import main

    _offline(monkeypatch)
    text = tmp_path / "book.txt"
    text.write_text("The cat sat on the mat and looked at the dog with the hat.\n")
    out = tmp_path / "out"
    status = main(["data", "prepare", str(text), "--out", str(out), "--quiet", "--quality.enabled=false",
                   "--tokenize.enabled=true", "--tokenize.num_workers=1", "--num_workers=1"])
    err = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "not available offline" in err and ".tiktoken" in err
    # The tokenizer is checked before the documents are processed.
    assert not (out / "documents").exists()


def test_a_folder_named_like_an_encoding_does_not_hide_it(gpt2_file, tmp_path, monkeypatch):
    import tiktoken

    from llmkern.data.tokenizer import _get_cached, is_file_spec

    encoding = get_tokenizer(gpt2_file).encoding
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: encoding)  # "gpt2" as if cached
    (tmp_path / "gpt2").mkdir()  # say, a checkpoint folder of that name where the run starts
    monkeypatch.chdir(tmp_path)
    assert not is_file_spec("gpt2")
    try:
        tok = get_tokenizer("gpt2")
        assert tok.spec == "gpt2" and tok.encode("Hello world") == [15496, 995]
    finally:
        _get_cached.cache_clear()  # the stand-in "gpt2" must not outlive this test
