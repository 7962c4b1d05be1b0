"""BPE training: the C++ merges against a naive recount, files tiktoken loads, special tokens."""

import collections
import json
import os
import pathlib
import random

import pytest
import regex
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from llmkern import _cpu
from llmkern.cli import main as cli_main
from llmkern.data.bpe import CL100K_PATTERN, count_words, gpt2_byte_order, gpt2_char_classes, train_bpe
from llmkern.data.tokenizer import ENDOFTEXT, GPT2_PATTERN, get_tokenizer, sidecar_path

from test_tokenizer import random_texts


def naive_bpe(words: list[bytes], counts: list[int], max_new_tokens: int) -> list[tuple[int, int, int, int]]:
    """Recount every pair after every merge: slow and obviously right; same tie-break as C++."""
    seqs = [list(w) for w in words]
    vocab = {bytes([i]): i for i in range(256)}
    token_bytes = [bytes([i]) for i in range(256)]
    merges = []
    new = 0
    while new < max_new_tokens:
        pairs = collections.Counter()
        for seq, count in zip(seqs, counts):
            for pair in zip(seq, seq[1:]):
                pairs[pair] += count
        pairs = {p: c for p, c in pairs.items() if c > 0}
        if not pairs:
            break
        (a, b), best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = token_bytes[a] + token_bytes[b]
        if merged not in vocab:
            vocab[merged] = len(token_bytes)
            token_bytes.append(merged)
            new += 1
        c = vocab[merged]
        merges.append((a, b, c, best))
        for k, seq in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(c)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out
    return merges


def read_ranks(path) -> dict[bytes, int]:
    return load_tiktoken_bpe(str(path))


def test_cpp_merges_of_a_hand_checked_corpus():
    # "aaab" x2, "ab" x3: "ab" occurs 5 times (merge 256); then in a a [ab] the pairs
    # (a, a) and (a, ab) tie at 2: the smaller ids win, "aa" (257); then [aa][ab] (258).
    assert _cpu.bpe_train([b"aaab", b"ab"], [2, 3], 10) == [(97, 98, 256, 5), (97, 97, 257, 2), (257, 256, 258, 2)]
    assert _cpu.bpe_train([b"aaab", b"ab"], [2, 3], 1) == [(97, 98, 256, 5)]
    assert _cpu.bpe_train([b"ab"], [0], 10) == []
    assert _cpu.bpe_train([b"abab", b"aaaa"], [1, 1], 10, min_count=2) == [(97, 97, 256, 3), (97, 98, 257, 2)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cpp_merges_equal_a_naive_recount(seed):
    rng = random.Random(seed)
    alphabet = rng.choice([b"ab", b"abc", b"abcdefgh", bytes(range(256))])
    words = sorted({bytes(rng.choice(alphabet) for _ in range(rng.choice([1, 2, 3, 5, 9, 17]))) for _ in range(200)})
    counts = [rng.choice([0, 1, 1, 2, 3, 7, 100]) for _ in words]
    expected = naive_bpe(words, counts, 60)
    assert _cpu.bpe_train(words, counts, 60) == expected
    # The order of the words does not matter.
    order = list(range(len(words)))
    rng.shuffle(order)
    assert _cpu.bpe_train([words[i] for i in order], [counts[i] for i in order], 60) == expected


def test_cpp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="differ in length"):
        _cpu.bpe_train([b"ab"], [1, 2], 10)
    with pytest.raises(ValueError, match="negative"):
        _cpu.bpe_train([b"ab"], [-1], 10)
    with pytest.raises(ValueError, match="max_new_tokens"):
        _cpu.bpe_train([b"ab"], [1], -1)


def test_train_bpe_first_merges_of_a_tiny_corpus(tmp_path):
    # One word, "aaabdaaabac" (the classic example): "aa" (4 times), then "ab" and "aa"+"a"
    # tie at 2 and the smaller ids win ("ab"), then "aa"+"ab", then the smallest pair of those
    # left at 1, "ac".
    out = tmp_path / "tiny.tiktoken"
    tok = train_bpe(["aaabdaaabac"], vocab_size=256 + 4 + 1, out_path=out)
    ranks = read_ranks(out)
    learned = sorted((r, t) for t, r in ranks.items() if r >= 256)
    assert [t for _, t in learned] == [b"aa", b"ab", b"aaab", b"ac"]
    assert tok.n_vocab == 261 and tok.eot_token == 260
    assert tok.encode("aaabdaaabac") == [ranks[b"aaab"], ranks[b"d"], ranks[b"aaab"], ranks[b"ac"]]


def test_byte_ranks_follow_gpt2_order(tmp_path, shared_data):
    order = gpt2_byte_order()
    assert sorted(order) == list(range(256))
    path = os.path.join(shared_data, "gpt2.tiktoken")
    if os.path.exists(path):
        gpt2 = read_ranks(path)
        assert [gpt2[bytes([b])] for b in order] == list(range(256))
    out = tmp_path / "t.tiktoken"
    train_bpe(["hello world"], 300, out)
    ranks = read_ranks(out)
    assert [ranks[bytes([b])] for b in order] == list(range(256))


def test_training_is_deterministic(tmp_path, shared_data):
    text = pathlib.Path(shared_data, "the-verdict.txt").read_text(encoding="utf-8")
    docs = text.split("\n\n")
    train_bpe(docs, 600, tmp_path / "a.tiktoken", num_workers=1)
    random.Random(0).shuffle(docs)
    train_bpe(docs, 600, tmp_path / "b.tiktoken", num_workers=2)
    assert (tmp_path / "a.tiktoken").read_bytes() == (tmp_path / "b.tiktoken").read_bytes()


def test_tiktoken_loads_the_file_and_round_trips(tmp_path, shared_data):
    out = tmp_path / "shakespeare.tiktoken"
    tok = train_bpe(pathlib.Path(shared_data, "tinyshakespeare.txt"), 1000, out)
    assert tok.n_vocab == 1000 and tok.eot_token == 999
    # Plain tiktoken, with the pattern and special tokens of the sidecar.
    meta = json.loads(pathlib.Path(sidecar_path(str(out))).read_text())
    assert meta["pattern"] == GPT2_PATTERN and meta["special_tokens"] == {ENDOFTEXT: 999}
    enc = tiktoken.Encoding("t", pat_str=meta["pattern"], mergeable_ranks=read_ranks(out),
                            special_tokens=meta["special_tokens"])
    for text in random_texts(seed=11) + ["First Citizen:\nBefore we proceed any further, hear me speak."]:
        ids = enc.encode_ordinary(text)
        assert ids == tok.encode(text)
        assert enc.decode(ids) == text
    ids = tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert len(ids) < 30  # merges learned from Shakespeare compress Shakespeare
    assert enc.encode(ENDOFTEXT, allowed_special="all") == [999]


def test_vocab_size_respected(tmp_path, shared_data):
    corpus = pathlib.Path(shared_data, "the-verdict.txt")
    for size in (257, 300, 777):
        tok = train_bpe(corpus, size, tmp_path / f"v{size}.tiktoken")
        assert tok.n_vocab == size
        assert len(read_ranks(tmp_path / f"v{size}.tiktoken")) == size - 1
    # A corpus too small for the vocabulary gives fewer tokens, never more.
    tok = train_bpe(["abc abc"], 1000, tmp_path / "small.tiktoken")
    assert tok.n_vocab < 1000
    assert tok.decode(tok.encode("abc abc")) == "abc abc"


def test_special_tokens_are_cut_out_and_get_the_last_ids(tmp_path):
    corpus = [f"hello{ENDOFTEXT}world<|pad|>"] * 50
    tok = train_bpe(corpus, 300, tmp_path / "s.tiktoken", special_tokens=(ENDOFTEXT, "<|pad|>"))
    ranks = read_ranks(tmp_path / "s.tiktoken")
    assert not any(b"<|" in t or b"endof" in t or b"pad" in t for t in ranks)
    assert b"hello" in ranks and b"world" in ranks
    assert tok.eot_token == len(ranks) and tok.n_vocab == len(ranks) + 2
    assert tok.encoding.encode("<|pad|>", allowed_special="all") == [len(ranks) + 1]
    assert tok.decode(tok.encode(corpus[0])) == corpus[0]


def test_cl100k_pattern(tmp_path, shared_data):
    tok = train_bpe(pathlib.Path(shared_data, "the-verdict.txt"), 500, tmp_path / "c.tiktoken", pattern="cl100k")
    for text in random_texts(seed=12, count=8):
        assert tok.decode(tok.encode(text)) == text
    # cl100k splits numbers into groups of three digits and keeps contractions case-insensitive.
    assert count_words(["12345 DON'T"], pattern=CL100K_PATTERN) == {"123": 1, "45": 1, " DON": 1, "'T": 1}
    assert count_words(["12345 DON'T"], pattern=GPT2_PATTERN) == {"12345": 1, " DON": 1, "'": 1, "T": 1}
    assert json.loads(pathlib.Path(sidecar_path(str(tmp_path / "c.tiktoken"))).read_text())["pattern"] == CL100K_PATTERN


def regex_counts(texts, pattern=GPT2_PATTERN):
    counts = collections.Counter()
    for text in texts:
        counts.update(regex.findall(pattern, text))
    return counts


def test_cpp_gpt2_split_equals_the_regex():
    texts = random_texts(seed=21, count=300) + [
        "a'sb 'll x'LL 'S  \n\n  x\t\t\ty   \n", "   ", " ", "\n", "x  ", "  x", "\u3000\u3000x", "'", "''s",
        "x\n\n\n\ny\n", "12 345x\u00b2\u2167", "a\r\n\r\nb", "\U0001F600 \U0001F600\u200d\U0001F680",
    ]
    counter = _cpu.Gpt2WordCounter(gpt2_char_classes())
    counter.add([t.encode("utf-8") for t in texts], 2)
    words, counts = counter.words()
    assert dict(zip((w.decode("utf-8") for w in words), counts)) == regex_counts(texts)


def test_cpp_gpt2_split_of_big_texts_cut_for_threads():
    # Texts over 1 MB are cut for the threads; the cuts must not change any piece.
    rng = random.Random(22)
    lines = ["def f(x):", "    return x  ", "", "  ", "\t# é 日本 🙂", "x = 's'", "}", "\n\n", "a\nb"]
    big = "\n".join(rng.choice(lines) for _ in range(300_000))
    assert len(big.encode()) > 2 << 20
    assert count_words([big], num_workers=2) == regex_counts([big])


def test_char_classes_agree_with_regex():
    classes = gpt2_char_classes()
    assert len(classes) == 0x110000
    for chars in ("aZé日ß\u01c5", "5\u0663\u00b2\u2167", " \t\n\r\u00a0\u3000\u2028", "!_\u00ad\U0001F600\x1c"):
        for c in chars:
            expected = ((1 if regex.match(r"\p{L}", c) else 0) | (2 if regex.match(r"\p{N}", c) else 0)
                        | (4 if regex.match(r"\s", c) else 0))
            assert expected != 0 or c in "!_\u00ad\U0001F600\x1c"
            assert classes[ord(c)] == expected, repr(c)


def test_count_words_two_workers_equal_one(shared_data):
    corpus = pathlib.Path(shared_data, "tinyshakespeare.txt")
    one = count_words(corpus, special_tokens=(ENDOFTEXT,), num_workers=1)
    assert one == count_words(corpus, special_tokens=(ENDOFTEXT,), num_workers=2)
    assert one[" the"] > 1000
    # The `regex` path (any pattern but GPT-2's; this one is GPT-2's in other words) agrees.
    assert one == count_words(corpus, pattern=f"(?:{GPT2_PATTERN})", special_tokens=(ENDOFTEXT,), num_workers=2)


def test_train_bpe_argument_errors(tmp_path):
    out = tmp_path / "x.tiktoken"
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], 200, out)
    with pytest.raises(ValueError, match="special_tokens"):
        train_bpe(["abc"], 300, out, special_tokens=("<|pad|>",))
    with pytest.raises(ValueError, match="pattern"):
        train_bpe(["abc"], 300, out, pattern="(unclosed")
    with pytest.raises(FileNotFoundError, match="corpus"):
        train_bpe(tmp_path / "missing.txt", 300, out)
    with pytest.raises(TypeError, match="corpus"):
        train_bpe([b"bytes"], 300, out)
    assert not out.exists()


def test_cli_tokenizer_train(tmp_path, shared_data, capsys):
    out = tmp_path / "cli.tiktoken"
    assert cli_main(["tokenizer", "train", os.path.join(shared_data, "the-verdict.txt"),
                     "--vocab-size", "400", "--out", str(out)]) == 0
    assert "400 tokens" in capsys.readouterr().out
    tok = get_tokenizer(str(out))
    assert tok.n_vocab == 400 and tok.decode(tok.encode("I had always thought")) == "I had always thought"
    assert cli_main(["tokenizer", "train", str(tmp_path / "missing"), "--vocab-size", "400", "--out", str(out)]) == 2


def test_train_bpe_creates_the_output_folder(tmp_path):
    out = tmp_path / "new" / "deeper" / "tiny.tiktoken"
    tok = train_bpe(["the cat sat on the mat, the cat sat"], 300, str(out))
    assert out.is_file() and pathlib.Path(sidecar_path(str(out))).is_file()
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    assert sorted(os.listdir(out.parent)) == ["tiny.tiktoken", "tiny.tiktoken.json"]  # no .tmp left


def test_train_bpe_checks_the_output_location_before_training(tmp_path, monkeypatch):
    import llmkern.data.bpe as bpe

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the output location was checked")

    monkeypatch.setattr(bpe, "count_words", no_training)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(OSError, match="out_path: cannot write .*a_file"):
        train_bpe(["abc"], 300, tmp_path / "a_file" / "x.tiktoken")
    with pytest.raises(ValueError, match="out_path: .*folder"):
        train_bpe(["abc"], 300, tmp_path)
    with pytest.raises(TypeError, match="out_path"):
        train_bpe(["abc"], 300, None)


def test_cli_tokenizer_train_into_a_new_folder(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 50)
    out = tmp_path / "newdir" / "shk.tiktoken"
    assert cli_main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(out),
                     "--workers", "1"]) == 0
    tok = get_tokenizer(str(out))  # a small corpus: fewer merges than asked for
    assert 256 < tok.n_vocab <= 300 and tok.decode(tok.encode("the cat sat")) == "the cat sat"
    blocked = tmp_path / "corpus.txt" / "x.tiktoken"
    assert cli_main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(blocked)]) == 2
    assert "out_path: cannot write" in capsys.readouterr().err


def test_a_sidecar_of_another_tiktoken_file_is_an_error(tmp_path):
    # train_bpe replaces the sidecar, then the .tiktoken file, each atomically but not as a pair:
    # a retraining stopped between the two leaves the new sidecar beside the old ranks, whose
    # <|endoftext|> id would then be an ordinary token's. Loading must say so, not tokenize wrong.
    import shutil

    corpus = ["the cat sat on the mat, the cat sat on the hat. " * 20]
    old = tmp_path / "tok.tiktoken"
    train_bpe(corpus, 300, str(old), num_workers=1)
    smaller = tmp_path / "smaller.tiktoken"
    train_bpe(corpus, 270, str(smaller), num_workers=1)
    shutil.copy(sidecar_path(str(smaller)), sidecar_path(str(old)))  # the crash: new sidecar, old ranks
    with pytest.raises(ValueError, match=r"sidecar .*tok\.tiktoken\.json.* another"):
        get_tokenizer(str(old))
    # A sidecar without the recorded hash (an older llmkern) is still checked: a special token's id
    # that is also an ordinary token's is an error.
    meta = json.loads(pathlib.Path(sidecar_path(str(old))).read_text())
    del meta["tiktoken_sha256"]
    pathlib.Path(sidecar_path(str(old))).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="special token .* ordinary token"):
        get_tokenizer(str(old))


def test_a_tokenizer_retrained_in_place_loads_its_new_ranks(tmp_path):
    # tiktoken's load_tiktoken_bpe keeps every file it reads in a cache keyed by the path alone (in the
    # temp folder, across processes): a file retrained in place loaded its old ranks beside the new sidecar.
    import shutil

    path = str(tmp_path / "tok.tiktoken")
    train_bpe(["the cat sat on the mat, the cat sat on the hat. " * 20], 300, path, num_workers=1)
    retrained = train_bpe(["something else entirely, " * 50], 290, path, num_workers=1)
    elsewhere = str(tmp_path / "copy.tiktoken")  # a path read for the first time: the new ranks for sure
    shutil.copy(path, elsewhere)
    shutil.copy(sidecar_path(path), sidecar_path(elsewhere))
    fresh = get_tokenizer(elsewhere)
    text = "something else entirely, the cat sat"
    for tokenizer in (retrained, get_tokenizer(path)):
        assert tokenizer.n_vocab == fresh.n_vocab
        assert tokenizer.encode(text) == fresh.encode(text)


def test_a_corpus_file_without_ascii_around_its_newlines_is_read_in_chunks(tmp_path, monkeypatch):
    from llmkern.data import bpe

    monkeypatch.setattr(bpe, "_CHUNK_CHARS", 64)
    rng = random.Random(7)
    lines = ["".join(rng.choice("的一是不了人我在有他这中大来上国个") for _ in range(rng.randint(5, 40))) + "。"
             for _ in range(200)]
    lines += [" пример  текста\u00a0", "中\r", "x", "", "‘quoted’"]
    rng.shuffle(lines)
    text = "\n".join(lines)
    path = tmp_path / "zh.txt"
    path.write_text(text, encoding="utf-8", newline="")
    chunks = list(bpe._file_chunks(path))
    assert "".join(chunks) == text
    assert len(chunks) > 50 and max(map(len, chunks)) < 64 + 200  # not the whole file as one piece
    for pattern in (GPT2_PATTERN, CL100K_PATTERN):  # cut only where splitting it whole cuts too
        assert count_words(chunks, pattern) == count_words([text], pattern)


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, CL100K_PATTERN])
def test_a_windows_corpus_file_is_read_in_chunks_that_split_as_the_whole(tmp_path, monkeypatch, pattern):
    from llmkern.data import bpe

    monkeypatch.setattr(bpe, "_CHUNK_CHARS", 64)
    rng = random.Random(11)
    words = ["the", "Ünïcode", "x", "中文", "42", "it's", "…", "<|endoftext|>"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    text = "\r\n".join(lines + ["", "  tail  ", "end"])  # CRLF only: no cut before this change
    path = tmp_path / "windows.txt"
    path.write_text(text, encoding="utf-8", newline="")
    chunks = list(bpe._file_chunks(path, pattern))
    assert "".join(chunks) == text
    assert len(chunks) > 50 and max(map(len, chunks)) < 64 + 200
    special = ("<|endoftext|>",)
    assert count_words(chunks, pattern, special) == count_words([text], pattern, special)


def test_train_bpe_bools_and_non_integers_are_type_errors(tmp_path):
    # bool is an int subclass: min_frequency=True or num_workers=True passed as 1; num_workers=2.5 reached
    # the C++ counter, whose error named no argument; num_workers=-1 was handed to it as a thread count.
    out = tmp_path / "x.tiktoken"
    for name, bad in (("vocab_size", True), ("vocab_size", 300.0), ("min_frequency", True),
                      ("num_workers", True), ("num_workers", 2.5)):
        with pytest.raises(TypeError, match=name):
            train_bpe(["hello world hello"], **{"vocab_size": 300, "out_path": out, name: bad})
    with pytest.raises(ValueError, match="num_workers"):
        train_bpe(["hello world hello"], 300, out, num_workers=-1)
    assert not out.exists()


def test_train_bpe_refuses_an_empty_corpus(tmp_path):
    # A corpus with no text (an empty file or folder, no texts) wrote a tokenizer of bytes alone, as if trained.
    out = tmp_path / "x.tiktoken"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("")
    for corpus in ([], [""], tmp_path / "empty", tmp_path / "empty.txt", [ENDOFTEXT]):
        with pytest.raises(ValueError, match="corpus"):
            train_bpe(corpus, 300, out)
        assert not out.exists()
    assert train_bpe([" "], 300, out).n_vocab == 257  # whitespace is text: one word, no pair to merge


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, CL100K_PATTERN])
def test_a_byte_order_mark_in_a_corpus_file_is_not_counted(tmp_path, pattern):
    # The readers drop a file's BOM from its first document: training counted it as a word of its own.
    with_bom, without = tmp_path / "a.txt", tmp_path / "b.txt"
    with_bom.write_bytes(b"\xef\xbb\xbfhello world\r\nhi \xef\xbb\xbf\n")
    without.write_bytes(b"hello world\r\nhi \xef\xbb\xbf\n")  # one inside the text is text
    assert count_words(with_bom, pattern) == count_words(without, pattern)
    assert sum(n for word, n in count_words(with_bom, pattern).items() if "\ufeff" in word) == 1


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, CL100K_PATTERN])
def test_a_special_token_that_starts_another_does_not_cut_it_short(pattern):
    # With "<|end" listed first, "<|endoftext|>" in the text was cut after "<|end" and "oftext", "|>"
    # counted as words: the counts depended on the order the special tokens were given in.
    text = ["a<|endoftext|>b<|end c"]
    for specials in (("<|end", ENDOFTEXT), (ENDOFTEXT, "<|end")):
        assert count_words(text, pattern, specials) == collections.Counter({"a": 1, "b": 1, " c": 1})


def _word_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "über", "中文", "it's", "42", "x"]
    return ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(40))
            for _ in range(count)]


def test_a_corpus_folder_is_read_as_the_data_pipeline_reads_it(tmp_path):
    # A folder was read file by file as text, whatever the file: JSONL syntax, gzip bytes, a binary file and
    # .git internals were learned from, with no error. Now only what the readers read, as they read it.
    import gzip
    import warnings

    from llmkern.data.readers import read_documents

    texts = _word_texts(3, 4)
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"\xef\xbb\xbf" + texts[0].encode())  # the BOM is no text
    records = [json.dumps({"text": texts[1], "id": 1}), "not json", json.dumps({"text": texts[2]})]
    (folder / "b.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    (folder / "sub" / "c.txt.gz").write_bytes(gzip.compress(texts[3].encode()))
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "objects" / "ab").write_bytes(gzip.compress(b"blob 11\0hidden text" * 50))
    (folder / ".notes.txt").write_text("hidden hidden hidden hidden", encoding="utf-8")
    (folder / "image.bin").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(5000)))
    assert [d.text for d in read_documents([str(folder)])] == texts  # what the pipeline reads

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_bpe(folder, 280, tmp_path / "folder.tiktoken")  # merges cut short: their order counts
    train_bpe(texts, 280, tmp_path / "list.tiktoken")
    assert (tmp_path / "folder.tiktoken").read_bytes() == (tmp_path / "list.tiktoken").read_bytes()
    assert [str(w.message) for w in caught if "malformed_json" in str(w.message)]  # skipped, but not silently
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_bpe([folder / "a.txt", folder / "b.jsonl", folder / "sub" / "c.txt.gz"], 280, tmp_path / "files.tiktoken")
    assert (tmp_path / "files.tiktoken").read_bytes() == (tmp_path / "list.tiktoken").read_bytes()

    # Named explicitly, a file the readers do not read is refused by name, not read as text.
    for name in ("image.bin", ".git/objects/ab"):
        with pytest.raises(ValueError, match=f"corpus: .*{name}.* no format"):
            train_bpe(folder / name, 400, tmp_path / "x.tiktoken")
    assert not (tmp_path / "x.tiktoken").exists()


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, CL100K_PATTERN])
def test_a_compressed_text_file_is_read_in_chunks(tmp_path, monkeypatch, pattern):
    # Decompressed as it is read, in the chunks a plain file is read in: never held whole.
    import gzip

    from llmkern.data import bpe

    monkeypatch.setattr(bpe, "_CHUNK_CHARS", 64)
    text = "\n".join(_word_texts(5, 3))
    path = tmp_path / "big.txt.gz"
    path.write_bytes(gzip.compress(text.encode()))
    chunks = list(bpe._file_chunks(path, pattern))
    assert "".join(chunks) == text and len(chunks) > 20 and max(map(len, chunks)) < 64 + 200
    assert count_words(path, pattern) == count_words([text], pattern)
