"""Exact dedup, the C++ MinHash against a plain-Python one, and near-dedup recall/false positives."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from llmkern.data.config import NearDedupConfig
from llmkern.data.dedup import (ExactDedupStage, NearDedupStage, minhash_reference, minhash_signatures,
                                permutations, shingle_hashes_reference)
from llmkern.data.readers import Document
from llmkern.data.stage import StageStats


def _random_text(rng: random.Random, n_words: int) -> str:
    pieces = []
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789éßж中🙂"
    for _ in range(n_words):
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        pieces.append(word + rng.choice([" ", " ", "  ", ", ", ".\n", "\t", "-", "'", "\x00", "…"]))
    return "".join(pieces)


def test_exact_dedup_ignores_case_and_whitespace_only():
    stage = ExactDedupStage()
    stats = StageStats("exact_dedup")
    texts = ["Hello  world\n", "hello world", "HELLO\tWORLD ", "hello, world", "other"]
    kept = stage.run([Document(t, "f", i) for i, t in enumerate(texts)], stats)
    assert [d.text for d in kept] == ["Hello  world\n", "hello, world", "other"]
    assert stats.rejected == {"exact_duplicate": 2}
    stage.remember([Document("a remembered one", "f", 9)])
    assert stage.run([Document("A remembered   one", "f", 10)], StageStats("x")) == []


@pytest.mark.parametrize("num_perm,ngram", [(1, 1), (37, 3), (128, 5), (64, 13)])
def test_cpp_signatures_equal_python_reference(num_perm, ngram):
    rng = random.Random(num_perm * 100 + ngram)
    texts = [_random_text(rng, rng.choice([0, 1, 2, ngram - 1, ngram, ngram + 1, 40, 200])) for _ in range(25)]
    texts += ["", "   ,,, ...", "Word", "Mixed CASE words here Are Lowercased ÀÉ stay"]
    a, b = permutations(num_perm, seed=num_perm)
    sigs, counts = minhash_signatures(texts, a, b, ngram, num_threads=2)
    assert sigs.shape == (len(texts), num_perm) and sigs.dtype == np.uint32
    for text, sig, count in zip(texts, sigs, counts):
        assert count == len(shingle_hashes_reference(text, ngram))
        assert sig.tolist() == minhash_reference(text, a, b, ngram)


def test_signatures_do_not_depend_on_threads_case_or_bytes():
    rng = random.Random(5)
    texts = [_random_text(rng, 300) for _ in range(50)]
    a, b = permutations(128, seed=3)
    one, _ = minhash_signatures(texts, a, b, 5, num_threads=1)
    many, _ = minhash_signatures(texts, a, b, 5, num_threads=4)
    as_bytes, _ = minhash_signatures([t.encode() for t in texts], a, b, 5, num_threads=2)
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(one, as_bytes)
    upper, _ = minhash_signatures([t.upper() for t in texts], a, b, 5)
    ascii_only = [i for i, t in enumerate(texts) if t.isascii()]
    np.testing.assert_array_equal(one[ascii_only], upper[ascii_only])


def test_signature_argument_errors():
    a, b = permutations(8, seed=0)
    with pytest.raises(TypeError, match=r"texts\[1\] must be str or bytes"):
        minhash_signatures(["ok", 3], a, b, 5)
    with pytest.raises(TypeError, match="not a single string"):
        minhash_signatures("one text", a, b, 5)
    with pytest.raises(ValueError, match="same length"):
        minhash_signatures(["ok"], a, b[:4], 5)
    with pytest.raises(ValueError, match="ngram must be >= 1"):
        minhash_signatures(["ok"], a, b, 0)
    with pytest.raises(ValueError, match="bands"):
        NearDedupStage(NearDedupConfig(num_perm=16, bands=32))
    with pytest.raises(ValueError, match="threshold"):
        NearDedupStage(NearDedupConfig(threshold=0.0))


def _jaccard(x: str, y: str, ngram: int) -> float:
    sx, sy = set(shingle_hashes_reference(x, ngram)), set(shingle_hashes_reference(y, ngram))
    return len(sx & sy) / len(sx | sy)


def _edit(rng: random.Random, words: list[str], vocab: list[str], edits: int) -> list[str]:
    out = list(words)
    for _ in range(edits):
        i = rng.randrange(len(out))
        kind = rng.random()
        if kind < 0.6:
            out[i] = rng.choice(vocab)
        elif kind < 0.8:
            out.insert(i, rng.choice(vocab))
        elif len(out) > 10:
            del out[i]
    return out


def test_near_dedup_recall_and_false_positives():
    """Recall >= 0.95 on pairs at Jaccard >= 0.85; <= 2% false positives on pairs at Jaccard <= 0.5."""
    rng = random.Random(1234)
    cfg = NearDedupConfig()
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    high, low = [], []
    while len(high) < 300 or len(low) < 300:
        base = [rng.choice(vocab) for _ in range(rng.randint(80, 400))]
        want_high = len(high) < 300 and (len(low) >= 300 or rng.random() < 0.5)
        # Edits per word: few for near-copies, many (tuned to land near 0.5, the hard side) for the rest.
        rate = rng.uniform(0.002, 0.03) if want_high else rng.uniform(0.08, 0.16)
        variant = _edit(rng, base, vocab, max(1, round(rate * len(base))))
        x, y = " ".join(base), " ".join(variant)
        j = _jaccard(x, y, cfg.ngram)
        if j >= 0.85 and len(high) < 300:
            high.append((x, y, j))
        elif j <= 0.5 and len(low) < 300:
            low.append((x, y, j))
    assert max(j for *_, j in low) > 0.4  # the false-positive pairs include hard ones near 0.5

    def flagged(pairs) -> float:
        stage = NearDedupStage(cfg)
        stage.run([Document(x, "base", i) for i, (x, _, _) in enumerate(pairs)], StageStats("near_dedup"))
        stats = StageStats("near_dedup")
        kept = stage.run([Document(y, "variant", i) for i, (_, y, _) in enumerate(pairs)], stats)
        return 1.0 - len(kept) / len(pairs)

    recall = flagged(high)
    false_positive = flagged(low)
    assert recall >= 0.95, f"recall {recall:.3f} at Jaccard >= 0.85"
    assert false_positive <= 0.02, f"false positives {false_positive:.3f} at Jaccard <= 0.5"


def test_near_dedup_keeps_the_first_and_remembers():
    rng = random.Random(7)
    words = [f"w{rng.randrange(10**6)}" for _ in range(200)]
    original = " ".join(words)
    copy = " ".join(words[:-1] + ["changed"])
    other = " ".join(f"v{rng.randrange(10**6)}" for _ in range(200))
    stage = NearDedupStage(NearDedupConfig(batch_size=2))  # several C++ calls per batch
    stats = StageStats("near_dedup")
    docs = [Document(t, "f", i) for i, t in enumerate([original, "", copy, other, copy])]
    kept = stage.run(docs, stats)
    assert [d.line for d in kept] == [0, 1, 3]
    assert stats.rejected == {"near_duplicate": 2} and stats.counts["no_shingles"] == 1
    fresh = NearDedupStage(NearDedupConfig())
    fresh.remember([Document(original, "f", 0)])
    assert fresh.run([Document(copy, "f", 1)], StageStats("near_dedup")) == []


def test_near_dedup_still_finds_the_first_documents_after_its_store_of_signatures_grows():
    # The store of kept signatures starts with room for 1024 and grows: more documents than that, so that
    # the copies of the first ones are compared with signatures carried over by the growth.
    rng = random.Random(11)
    texts = [" ".join(f"w{rng.randrange(10**9)}" for _ in range(40)) for _ in range(1100)]
    stage = NearDedupStage(NearDedupConfig(num_threads=1))
    stats = StageStats("near_dedup")
    assert len(stage.run([Document(t, "f", i) for i, t in enumerate(texts)], stats)) == len(texts)
    assert stage.num_kept == len(texts) > 1024
    near_copies = [t + " one more" for t in texts[:3] + texts[-3:]]
    new = " ".join(f"v{rng.randrange(10**9)}" for _ in range(40))
    kept = stage.run([Document(t, "g", i) for i, t in enumerate(near_copies + [new])], stats)
    assert [d.text for d in kept] == [new]
    assert stats.rejected == {"near_duplicate": 6}


def test_near_dedup_takes_a_lone_surrogate_as_exact_dedup_does():
    # Documents made in Python (not read from files) may hold one; exact dedup encodes it with
    # surrogatepass, near dedup raised UnicodeEncodeError and stopped the run.
    a, b = permutations(16, 3)
    text = "one two three \ud800 four five six"
    sig, counts = minhash_signatures([text, "plain words here"], a, b, 2)
    assert sig[0].tolist() == minhash_reference(text, a, b, 2) and counts.tolist()[0] == 6
    stage = NearDedupStage(NearDedupConfig(num_perm=16, bands=4))
    docs = [Document(text, "x", 1), Document(text + " ", "x", 2)]
    assert [d.line for d in stage.run(docs, StageStats("near_dedup"))] == [1]


def test_cpp_and_python_agree_on_every_edge_of_the_character_table():
    from llmkern.data.dedup import _CHAR_RANGES

    edges = {cp for first, last, _ in _CHAR_RANGES for cp in (first - 1, first, last, last + 1)}
    chars = [chr(cp) for cp in sorted(edges) if not 0xD800 <= cp <= 0xDFFF] + list("aZ9 _-'\ud800")
    rng = random.Random(17)
    texts = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    a, b = permutations(32, seed=4)
    for ngram in (1, 3):
        sigs, counts = minhash_signatures(texts, a, b, ngram)
        for text, sig, count in zip(texts, sigs, counts):
            assert count == len(shingle_hashes_reference(text, ngram)), repr(text)
            assert sig.tolist() == minhash_reference(text, a, b, ngram), repr(text)


def test_words_end_at_unicode_punctuation_and_unspaced_scripts_are_read_by_character():
    from llmkern.data.dedup import _words_reference

    assert _words_reference("“Hello,” she said—twice… «Très» ½ naïve ΑΒΓ мир") == [
        "Hello", "she", "said", "twice", "Très", "naïve", "ΑΒΓ", "мир"]
    assert _words_reference("我们在2024年。ひらがなカタカナ、한국어 ok") == [
        "我", "们", "在", "2024", "年", "ひ", "ら", "が", "な", "カ", "タ", "カ", "ナ", "한국어", "ok"]


def test_typographic_quotes_and_dashes_do_not_hide_a_copy(shared_data):
    """The same story with curly quotes and em dashes for straight ones (what a word processor or a
    second crawl of a page gives) is a near duplicate: punctuation used to stick to the words."""
    with open(os.path.join(shared_data, "the-verdict.txt"), encoding="utf-8") as f:
        text = f.read()[:3000]
    typeset = text.replace('"', "\u201c").replace("'", "\u2019").replace("--", "\u2014")
    assert typeset != text and _jaccard(text, typeset, 5) > 0.95
    stage = NearDedupStage(NearDedupConfig())
    kept = stage.run([Document(text, "a", 1), Document(typeset, "b", 1)], StageStats("near_dedup"))
    assert [d.source for d in kept] == ["a"]


def test_a_chinese_text_with_a_few_characters_changed_is_a_near_duplicate():
    rng = random.Random(8)
    han = [chr(cp) for cp in range(0x4E00, 0x4E00 + 3000)]
    sentences = ["".join(rng.choice(han) for _ in range(rng.randint(8, 20))) + "。" for _ in range(40)]
    text = "".join(sentences)  # no spaces: one word per sentence under a whitespace definition
    edited = list(text)
    for i in rng.sample(range(len(edited)), 3):
        edited[i] = rng.choice(han)
    edited = "".join(edited)
    assert _jaccard(text, edited, 5) > 0.9
    other = "".join(rng.choice(han) for _ in range(len(text)))
    stage = NearDedupStage(NearDedupConfig())
    kept = stage.run([Document(text, "a", 1), Document(edited, "b", 1), Document(other, "c", 1)],
                     StageStats("near_dedup"))
    assert [d.source for d in kept] == ["a", "c"]


def test_signature_agreement_estimates_the_exact_jaccard_within_its_sampling_error():
    # The share of equal values of two signatures is an unbiased estimate of the Jaccard similarity J of
    # the shingle sets, with standard deviation sqrt(J (1 - J) / num_perm) (one Bernoulli draw per
    # permutation). Reference: J from the shingle sets themselves.
    rng = random.Random(31)
    num_perm = 256
    a, b = permutations(num_perm, seed=9)
    z = []
    for _ in range(150):
        base = [f"w{rng.randrange(10**9)}" for _ in range(rng.randint(20, 150))]
        variant = list(base)
        for _ in range(rng.randint(1, max(1, len(base) // 8))):
            variant[rng.randrange(len(base))] = f"v{rng.randrange(10**9)}"
        x, y = " ".join(base), " ".join(variant)
        sx, sy = set(shingle_hashes_reference(x, 5)), set(shingle_hashes_reference(y, 5))
        j = len(sx & sy) / len(sx | sy)
        sigs, _ = minhash_signatures([x, y], a, b, 5)
        estimate = float((sigs[0] == sigs[1]).mean())
        assert 0.0 < j < 1.0
        z.append((estimate - j) / (j * (1 - j) / num_perm) ** 0.5)
    z = np.array(z)
    assert abs(z.mean()) < 4 / len(z) ** 0.5  # no bias: the mean of 150 unit normals is within 4 of their sd
    assert 0.75 < z.std() < 1.25 and np.abs(z).max() < 5


def test_a_chain_of_near_duplicates_keeps_what_the_module_docstring_says():
    # A ~ B and B ~ C, A !~ C: a document is compared with the documents kept before it only.
    rng = random.Random(21)
    first = [f"w{rng.randrange(10**9)}" for _ in range(400)]
    other = [f"v{rng.randrange(10**9)}" for _ in range(60)]
    texts = {"A": " ".join(first), "B": " ".join(other[:30] + first[30:]), "C": " ".join(other + first[60:])}
    cfg = NearDedupConfig(num_perm=256, bands=32, threshold=0.8)
    stage = NearDedupStage(cfg)
    sigs, _ = minhash_signatures(list(texts.values()), stage.a, stage.b, cfg.ngram)
    agree = [float((sigs[i] == sigs[k]).mean()) for i, k in ((0, 1), (1, 2), (0, 2))]
    assert agree[0] >= 0.8 and agree[1] >= 0.8 and agree[2] < 0.8
    expected = {"ABC": "AC", "ACB": "AC", "BAC": "B", "BCA": "B", "CAB": "CA", "CBA": "CA"}
    for order, kept_sources in expected.items():
        kept = NearDedupStage(cfg).run([Document(texts[k], k, 0) for k in order], StageStats("near_dedup"))
        assert "".join(d.source for d in kept) == kept_sources, order
