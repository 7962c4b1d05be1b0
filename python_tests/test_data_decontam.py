"""Decontamination: planted eval passages are found (despite case and punctuation), near misses are not."""

from __future__ import annotations

import json
import random

import pytest

from llmkern.data.config import DecontamConfig
from llmkern.data.decontam import DecontamStage, Decontaminator, ngram_hashes
from llmkern.data.readers import Document
from llmkern.data.stage import StageStats


def _sentence(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(n)]


def test_ngram_hashes():
    assert len(ngram_hashes("one two three", 13)) == 0
    h = ngram_hashes(" ".join(f"w{i}" for i in range(20)), 13)
    assert len(h) == 8 and len(set(h.tolist())) == 8
    same = ngram_hashes("The QUICK, brown fox!", 2)
    assert same.tolist() == ngram_hashes("the quick brown   fox", 2).tolist()


def test_planted_contamination_is_found(tmp_path):
    rng = random.Random(0)
    questions = [" ".join(_sentence(rng, rng.randint(15, 40))) for _ in range(50)]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(json.dumps({"text": q}) for q in questions))
    other_eval = tmp_path / "other.txt"
    other_eval.write_text(" ".join(_sentence(rng, 30)))
    index = Decontaminator.from_files([str(eval_file), str(other_eval)], ngram=13)
    assert index.set_names == ["eval.jsonl", "other.txt"] and index.num_ngrams > 0

    docs, planted = [], []
    for i in range(200):
        words = _sentence(rng, 120)
        if i % 10 == 0:  # plant 13 consecutive words of a question, with other case and punctuation
            q = questions[i // 10].split()
            start = rng.randint(0, len(q) - 13)
            passage = [w.upper() if k % 3 == 0 else w + "," for k, w in enumerate(q[start:start + 13])]
            pos = rng.randint(0, len(words))
            words[pos:pos] = passage
            planted.append(i)
        elif i % 10 == 5:  # 12 words of a question: below the n-gram length, not contamination
            q = questions[i // 10].split()
            words[40:40] = q[:12]
        docs.append(Document(" ".join(words), "train", i))
    found = [d.line for d in docs if index.matches(d.text)]
    assert found == planted
    assert index.matches(" ".join(["x"] + other_eval.read_text().split()[5:20])) == ["other.txt"]


@pytest.mark.parametrize("action", ["drop", "flag"])
def test_decontam_stage_drop_or_flag(tmp_path, action):
    rng = random.Random(1)
    question = " ".join(_sentence(rng, 20))
    (tmp_path / "eval.txt").write_text(question)
    stage = DecontamStage(DecontamConfig(enabled=True, eval_sets=[str(tmp_path / "eval.txt")], action=action))
    stats = StageStats("decontam")
    clean = Document(" ".join(_sentence(rng, 50)), "train", 1)
    dirty = Document("Answer key: " + question + " and more", "train", 2)
    kept = stage.run([clean, dirty], stats)
    assert stats.counts["matched_eval.txt"] == 1
    if action == "drop":
        assert kept == [clean] and stats.rejected == {"contaminated": 1}
    else:
        assert kept == [clean, dirty] and dirty.meta["contaminated"] == ["eval.txt"] and not stats.rejected


def test_decontam_config_errors(tmp_path):
    with pytest.raises(ValueError, match="action"):
        DecontamStage(DecontamConfig(enabled=True, eval_sets=["x"], action="delete"))
    with pytest.raises(ValueError, match="eval_sets"):
        DecontamStage(DecontamConfig(enabled=True))
    with pytest.raises(ValueError, match="no such file"):
        DecontamStage(DecontamConfig(enabled=True, eval_sets=[str(tmp_path / "missing.jsonl")]))


def test_eval_sets_with_their_own_text_field(tmp_path):
    rng = random.Random(2)
    question = " ".join(_sentence(rng, 16))
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": question, "answer": "b"}) + "\n")
    config = DecontamConfig(enabled=True, eval_sets=[str(tmp_path / "qa.jsonl")], text_field="question")
    stage = DecontamStage(config)
    assert stage.index.num_ngrams == 16 - 13 + 1
    assert stage.run([Document("so " + question, "train", 1)], StageStats("decontam")) == []
    with pytest.raises(ValueError, match="missing_text_field"):  # a broken eval set is an error
        DecontamStage(DecontamConfig(enabled=True, eval_sets=[str(tmp_path / "qa.jsonl")]))


def test_an_ngram_in_several_eval_sets_names_every_set():
    text = "the quick brown fox jumps over the lazy dog near the river bank today"
    index = Decontaminator(ngram=13)
    index.add("a", [text])
    index.add("b", ["unrelated words only here"])
    index.add("c", [text, text])
    assert index.matches("Yesterday " + text + ".") == ["a", "c"]


def test_eval_items_match_text_as_the_clean_stage_leaves_it():
    import unicodedata

    from llmkern.data.clean import clean_text

    index = Decontaminator(ngram=5)
    index.add("nfd", [unicodedata.normalize("NFD", "le café était très bien fermé ce matin")])
    index.add("soft_hyphen", ["the answer is photo\u00adsynthesis in green plants"])
    assert index.matches(clean_text("Hier, le café était très bien fermé ce matin.")) == ["nfd"]
    assert index.matches(clean_text("So the answer is photo\u00adsynthesis in green plants!")) == ["soft_hyphen"]


def test_eval_items_too_short_to_look_for_are_named_in_a_warning(tmp_path):
    (tmp_path / "eval.jsonl").write_text('{"text": "two plus two"}\n{"text": "' + " ".join(["word"] * 20) + '"}\n')
    with pytest.warns(UserWarning, match=r"1 eval item\(s\) have fewer than decontam.ngram=13 words"):
        DecontamStage(DecontamConfig(enabled=True, eval_sets=[str(tmp_path / "eval.jsonl")]))


def test_a_chinese_eval_item_is_found_inside_unspaced_chinese_text():
    # Chinese has no spaces: as \w+ runs, an item was one "word", too short for any n-gram, and neither its
    # own text nor a copy inside a longer sentence was ever found. Each Han character is a word now.
    rng = random.Random(4)
    han = [chr(cp) for cp in range(0x4E00, 0x4E00 + 3000)]
    item = "".join(rng.sample(han, 30))  # distinct characters: 30 - 13 + 1 distinct 13-grams
    index = Decontaminator(ngram=13)
    index.add("ceval", [item])
    assert index.too_short == 0 and index.num_ngrams == 30 - 13 + 1
    assert index.matches(item) == ["ceval"]  # the item's own text
    before, after = "".join(rng.sample(han, 20)), "".join(rng.sample(han, 20))
    assert index.matches(before + item[5:18] + after) == ["ceval"]  # 13 characters of it, no separator
    assert index.matches(before + item[5:17] + after) == []  # 12: below n
    assert index.matches(before + "，" + item[:13] + "。" + after) == ["ceval"]  # punctuation does not count
    # Half-width katakana (NFKC) and Latin words among the characters still read as one would expect.
    index = Decontaminator(ngram=5)
    index.add("ja", ["ｶﾀｶﾅ OK です"])
    assert index.matches("これはカタカナokです") == ["ja"]
    assert [len(ngram_hashes(t, 1)) for t in ("カタカナ・テスト", "naïve 中文", "")] == [7, 3, 0]
