"""`prepare` end to end on a small corpus holding every kind of bad input; re-runs; the CLI."""

from __future__ import annotations

import gzip
import json
import os
import random

import pytest

from llmkern.cli import main
from llmkern.data import pipeline
from llmkern.data.config import load_config
from llmkern.data.pipeline import prepare, read_parts
from llmkern.data.readers import BadInputError

STOP = ["the", "and", "of", "to", "with", "that"]


def _doc(rng: random.Random, n_words: int = 120) -> str:
    """A distinct document that passes the quality rules (letters-only words, stop words)."""
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(n_words)]
    for i in range(0, n_words, 7):
        words[i] = rng.choice(STOP)
    return " ".join(words) + "."


def _near_copy(text: str) -> str:
    words = text.split()
    words[len(words) // 2] = "changed"
    return " ".join(words)


def _jsonl(path, texts, extra_lines=()):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def corpus(tmp_path):
    """A corpus directory, and what a run over it must report."""
    zstandard = pytest.importorskip("zstandard")
    rng = random.Random(42)
    root = tmp_path / "corpus"
    root.mkdir()
    first = [_doc(rng) for _ in range(12)]
    _jsonl(root / "a.jsonl", first, extra_lines=[
        '{"text": "broken',  # line 13: malformed JSON
        '{"id": 99}',  # line 14: no text field
        json.dumps({"text": first[0].upper()}),  # line 15: exact duplicate (case differs)
        json.dumps({"text": "far too short"}),  # line 16: quality
    ])
    (root / "b.txt").write_text("\n\n".join([_doc(rng), _near_copy(first[1]), _doc(rng)]), encoding="utf-8")
    (root / "c.txt").write_bytes((_doc(rng) + " caf\xe9").encode("latin-1"))  # invalid UTF-8, line 1
    (root / "d_empty.txt").write_text("  \n")
    with open(root / "e_huge.jsonl", "w") as f:  # line 2 is over max_document_bytes
        f.write(json.dumps({"text": _doc(rng)}) + "\n" + json.dumps({"text": "x " * 300_000}) + "\n")
        f.write(json.dumps({"text": _doc(rng)}) + "\n")
    (root / "f_corrupt.jsonl.gz").write_bytes(b"not a gzip stream")
    with gzip.open(root / "g.jsonl.gz", "wt") as f:  # a near-copy of a.jsonl's 3rd document, inputs later
        f.write(json.dumps({"text": _doc(rng)}) + "\n" + json.dumps({"text": _near_copy(first[2])}) + "\n")
    (root / "h.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(_doc(rng).encode()))
    expected_bad = {"malformed_json": 1, "missing_text_field": 1, "invalid_utf8": 1, "empty_file": 1,
                    "too_long": 1, "unreadable": 1}
    return root, expected_bad


def _config(*overrides):
    return load_config(None, ["reader.separator=\n\n", "reader.max_document_bytes=100000", "progress=false",
                              "num_workers=1", *overrides])


def _documents(out_dir):
    return [(d.source, d.line, d.text) for d in read_parts(str(out_dir))]


def _counts(report):
    """The stage statistics without their timings."""
    return [{k: v for k, v in stage.items() if k != "seconds"} for stage in report["stages"]]


def test_prepare_end_to_end(corpus, tmp_path):
    root, expected_bad = corpus
    out = tmp_path / "out"
    report = prepare([str(root)], str(out), _config())
    assert report["read"]["bad_input"] == expected_bad
    examples = report["read"]["examples"]

    def first(kind):
        return os.path.basename(examples[kind][0]["file"]), examples[kind][0]["line"]

    assert first("malformed_json") == ("a.jsonl", 13)
    assert first("missing_text_field") == ("a.jsonl", 14)
    assert first("too_long") == ("e_huge.jsonl", 2)
    assert first("invalid_utf8") == ("c.txt", 1)
    assert os.path.basename(examples["unreadable"][0]["file"]) == "f_corrupt.jsonl.gz"
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["clean", "quality", "exact_dedup", "near_dedup"]
    assert stages["quality"]["rejected"] == {"too_few_words": 1}
    assert stages["exact_dedup"]["rejected"] == {"exact_duplicate": 1}
    assert stages["near_dedup"]["rejected"] == {"near_duplicate": 2}
    assert stages["clean"]["counts"]["replacement_chars"] == 1
    for earlier, later in zip(report["stages"], report["stages"][1:]):
        assert earlier["docs_out"] == later["docs_in"] and earlier["chars_out"] == later["chars_in"]
    # 12 + 2 good in a.jsonl (the dup, short, bad lines dropped), b: 2 of 3, c: 1, e: 2, g: 1, h: 1
    docs = _documents(out)
    assert len(docs) == report["output"]["documents"] == 12 + 2 + 1 + 2 + 1 + 1
    assert report["read"]["documents"] == stages["clean"]["docs_in"] == 12 + 2 + 3 + 1 + 2 + 2 + 1
    assert json.loads((out / "report.json").read_text())["stages"] == report["stages"]
    assert not [n for n in os.listdir(out / "documents") if n.endswith(".tmp")]
    table = pipeline.format_report(report)
    assert "near_duplicate 2" in table and "a.jsonl:13" in table


def _crash_on_input(monkeypatch, crash_index: int):
    """prepare() dies (a simulated crash) as it starts input crash_index; returns the real _process_file."""
    real = pipeline._process_file

    def process_file(index, *args, **kwargs):
        if index == crash_index:
            raise KeyboardInterrupt("simulated crash")
        return real(index, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_process_file", process_file)
    return real


def test_rerun_continues_after_a_crash_and_matches_a_clean_run(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    clean_run = prepare([str(root)], str(tmp_path / "clean"), _config())

    real = _crash_on_input(monkeypatch, 2)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare([str(root)], str(out), _config())
    monkeypatch.setattr(pipeline, "_process_file", real)
    assert sorted(os.listdir(out / "documents")) == ["part-00000.jsonl", "part-00001.jsonl"]

    resumed = prepare([str(root)], str(out), _config())
    assert resumed["resumed_inputs"] == 2
    # g.jsonl.gz, read after the crash, holds a near-copy of a document kept before it: the
    # resumed run must know that document (re-read from the finished parts) to drop the copy.
    assert _counts(resumed) == _counts(clean_run) and resumed["read"] == clean_run["read"]
    assert _documents(out) == _documents(tmp_path / "clean")

    again = prepare([str(root)], str(out), _config())  # everything done: nothing is redone
    assert again["resumed_inputs"] == again["inputs"] and _counts(again) == _counts(clean_run)


def test_a_resumed_run_reports_the_same_exact_duplicates_as_a_clean_run(tmp_path, monkeypatch):
    # A document that exact dedup lets through but near dedup drops is in no part file; a copy of
    # it in a later input is an exact duplicate all the same, resumed after a crash or not.
    rng = random.Random(7)
    kept = _doc(rng)
    root = tmp_path / "corpus"
    root.mkdir()
    _jsonl(root / "a.jsonl", [kept, _near_copy(kept)])
    _jsonl(root / "b.jsonl", [_near_copy(kept).upper(), _doc(rng)])
    clean_run = prepare([str(root)], str(tmp_path / "clean"), _config())
    stages = {s["name"]: s for s in clean_run["stages"]}
    assert stages["exact_dedup"]["rejected"] == {"exact_duplicate": 1}
    assert stages["near_dedup"]["rejected"] == {"near_duplicate": 1}

    real = _crash_on_input(monkeypatch, 1)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare([str(root)], str(out), _config())
    monkeypatch.setattr(pipeline, "_process_file", real)
    resumed = prepare([str(root)], str(out), _config())
    assert resumed["resumed_inputs"] == 1
    assert _counts(resumed) == _counts(clean_run)
    assert _documents(out) == _documents(tmp_path / "clean")


@pytest.mark.parametrize("override, name", [("tokenize.val_fraction=1.5", "tokenize.val_fraction"),
                                            ("tokenize.shard_tokens=0", "tokenize.shard_tokens"),
                                            ("tokenize.num_workers=-1", "tokenize.num_workers"),
                                            ("reader.max_document_bytes=0", "reader.max_document_bytes"),
                                            # each read as no separator: a .txt file one document
                                            ('reader.separator=""', "reader.separator"),
                                            ("reader.max_examples=-1", "reader.max_examples"),
                                            # range() failed at the first input, naming no setting
                                            ("near_dedup.batch_size=0", "near_dedup.batch_size"),
                                            ("near_dedup.num_threads=-1", "near_dedup.num_threads"),
                                            ("near_dedup.seed=-1", "near_dedup.seed"),  # numpy's own words
                                            # empty text classified: every document rejected, as not kept
                                            ("langid.enabled=true langid.max_chars=0", "langid.max_chars"),
                                            # a fraction over 1 (30 for 30%) switched its rule off unseen
                                            ("quality.max_duplicate_line_fraction=30",
                                             "quality.max_duplicate_line_fraction"),
                                            ("quality.max_duplicate_ngram_char_fraction.5=15",
                                             "quality.max_duplicate_ngram_char_fraction.5")])
def test_bad_settings_fail_before_any_input_is_read(tmp_path, monkeypatch, override, name):
    rng = random.Random(3)
    _jsonl(tmp_path / "a.jsonl", [_doc(rng)])

    def no_reading(*args, **kwargs):
        raise AssertionError("an input was read before the settings were checked")

    monkeypatch.setattr(pipeline, "_process_file", no_reading)
    config = _config("tokenize.enabled=true", "tokenize.tokenizer=bytes", *override.split())
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "out"), config)


def test_worker_processes_give_the_same_output(corpus, tmp_path):
    root, _ = corpus
    one = prepare([str(root)], str(tmp_path / "one"), _config())
    # Tiny batches: many batches in flight at once, results must come back in order.
    two = prepare([str(root)], str(tmp_path / "two"), _config("num_workers=2", "batch_size=2"))
    assert _counts(two) == _counts(one) and two["read"] == one["read"]
    assert _documents(tmp_path / "two") == _documents(tmp_path / "one")
    # So a rerun that only splits the work otherwise continues, it does not start over.
    again = prepare([str(root)], str(tmp_path / "one"), _config("num_workers=2", "batch_size=3",
                                                                "near_dedup.batch_size=5"))
    assert again["resumed_inputs"] == again["inputs"] and _counts(again) == _counts(one)


def test_output_inside_the_input_directory_is_not_read_back(corpus):
    root, _ = corpus
    first = prepare([str(root)], str(root / "out"), _config())
    second = prepare([str(root)], str(root / "out"), _config())
    assert second["inputs"] == first["inputs"] and second["resumed_inputs"] == first["inputs"]
    assert _counts(second) == _counts(first)


def test_changed_settings_start_over(corpus, tmp_path, capsys):
    root, _ = corpus
    out = tmp_path / "out"
    prepare([str(root)], str(out), _config())
    report = prepare([str(root)], str(out), _config("quality.enabled=false"))
    assert report["resumed_inputs"] == 0 and "starting over" in capsys.readouterr().err
    assert [s["name"] for s in report["stages"]] == ["clean", "exact_dedup", "near_dedup"]
    assert len(_documents(out)) == report["output"]["documents"]
    forced = prepare([str(root)], str(out), _config("quality.enabled=false"), resume=False)
    assert forced["resumed_inputs"] == 0


def test_strict_stops_at_the_first_bad_input_and_keeps_earlier_inputs(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    with pytest.raises(BadInputError, match=r"a\.jsonl:13: malformed_json"):
        prepare([str(root)], str(out), _config("reader.strict=true"))
    assert os.listdir(out / "documents") == []  # a.jsonl is the first input; its partial part is gone
    good = tmp_path / "good"
    good.mkdir()
    rng = random.Random(9)
    (good / "1.txt").write_text(_doc(rng))
    (good / "2.jsonl").write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(BadInputError, match=r"2\.jsonl:2: missing_text_field"):
        prepare([str(good)], str(tmp_path / "out2"), _config("reader.strict=true"))
    assert os.listdir(tmp_path / "out2" / "documents") == ["part-00000.jsonl"]


def test_langid_decontam_and_tokenize_stages(tmp_path):
    pytest.importorskip("py3langid")
    rng = random.Random(11)
    english = ("The committee met on Tuesday to discuss the new budget for the public library. Members agreed "
               "that the reading room needs better lighting and that more books for children should be bought "
               "with the money left over from last year. The chair thanked the volunteers who kept the doors "
               "open during the long renovation, and the meeting ended with a vote to publish the minutes.")
    french = ("Le comité s'est réuni mardi pour discuter du nouveau budget de la bibliothèque publique. Les membres "
              "ont convenu que la salle de lecture a besoin d'un meilleur éclairage et que des livres pour les "
              "enfants devraient être achetés avec l'argent restant de l'année dernière, "
              "et la séance a été levée.")
    secret = " ".join(_doc(rng, 30).split()[:20])
    (tmp_path / "eval.txt").write_text(secret)
    corpus = tmp_path / "c.jsonl"
    _jsonl(corpus, [english, french, english.replace("Tuesday", "Monday") + " " + secret, _doc(rng)])
    config = _config("langid.enabled=true", "decontam.enabled=true", f'decontam.eval_sets=["{tmp_path / "eval.txt"}"]',
                     "quality.enabled=false", "tokenize.enabled=true", "tokenize.tokenizer=bytes",
                     "tokenize.val_fraction=0", "tokenize.num_workers=1")
    report = prepare([str(corpus)], str(tmp_path / "out"), config)
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["langid"]["rejected"]["language_not_kept"] >= 1  # French (and perhaps the random words)
    assert stages["decontam"]["rejected"] == {"contaminated": 1}
    kept = [d.text for d in read_parts(str(tmp_path / "out"))]
    assert english in kept and french not in kept
    # Byte tokenizer: one token per UTF-8 byte plus an end-of-text before each document.
    assert report["tokens"]["tokens"]["train"] == sum(len(t.encode()) + 1 for t in kept)
    assert os.path.exists(tmp_path / "out" / "tokens" / "manifest.json")


def test_cli_data_prepare(corpus, tmp_path, capsys):
    root, _ = corpus
    out = tmp_path / "out"
    assert main(["data", "prepare", str(root), "--out", str(out), "--quiet", "--reader.separator=\n\n",
                 "--quality.min_words=5"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["quality"]["min_words"] == 5 and report["output"]["documents"] > 0
    assert main(["data", "prepare", str(root), "--out", str(out), "--quality.min_wrods=5"]) == 2
    assert "unknown key 'quality.min_wrods'" in capsys.readouterr().err
    assert main(["data", "prepare", str(tmp_path / "missing"), "--out", str(out)]) == 2
    config = tmp_path / "c.toml"
    config.write_text('progress = false\n[reader]\nseparator = "\\n\\n"\n[near_dedup]\nenabled = false\n')
    assert main(["data", "prepare", str(root), "--out", str(out), "--config", str(config)]) == 0
    assert [s["name"] for s in json.loads((out / "report.json").read_text())["stages"]] == [
        "clean", "quality", "exact_dedup"]


def test_real_text_to_gpt2_shards(shared_data, tmp_path):
    """The Verdict, split into paragraphs, through every default stage into GPT-2 token shards."""
    source = os.path.join(shared_data, "the-verdict.txt")
    ranks = os.path.join(shared_data, "gpt2.tiktoken")
    config = _config("quality.min_words=20", "tokenize.enabled=true", f"tokenize.tokenizer={ranks}",
                     "tokenize.val_fraction=0", "tokenize.num_workers=1")
    report = prepare([source], str(tmp_path / "out"), config)
    kept = [d.text for d in read_parts(str(tmp_path / "out"))]
    assert report["output"]["documents"] == len(kept) > 5
    from llmkern.data.tokenizer import get_tokenizer

    gpt2 = get_tokenizer(ranks)
    assert report["tokens"]["tokens"]["train"] == sum(len(gpt2.encode(t)) + 1 for t in kept)
    assert report["tokens"]["dtype"] == "uint16"


def _book(tmp_path, paragraphs=3):
    """A .txt file of paragraphs that each pass the quality rules; whole, it has too many words."""
    rng = random.Random(5)
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(_doc(rng) for _ in range(paragraphs)) + "\n", encoding="utf-8")
    return path


def test_a_run_that_keeps_no_documents_is_an_error_naming_the_cause(tmp_path):
    book = _book(tmp_path)
    config = load_config(None, ["progress=false", "num_workers=1", "quality.max_words=200"])
    with pytest.raises(pipeline.NoDocumentsKeptError) as info:
        prepare([str(book)], str(tmp_path / "out"), config)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "no documents kept" in message and "quality rejected 1 (too_many_words 1)" in message
    assert "reader.separator" in message and "--quality.max_words" in message
    # The report is still written, with the error in it.
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["output"]["documents"] == 0 and report["error"] == message
    assert info.value.report["stages"][1]["rejected"] == {"too_many_words": 1}
    # Split into paragraphs, the same book keeps its documents.
    config.reader.separator = "\n\n"
    assert prepare([str(book)], str(tmp_path / "out"), config)["output"]["documents"] == 3


def test_no_readable_documents_is_an_error_too(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "words " * 100}) + "\n")
    with pytest.raises(ValueError, match="none could be read.*missing_text_field 1.*reader.text_field='text'"):
        prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "out"), _config())


def test_cli_data_prepare_that_keeps_nothing_exits_non_zero(tmp_path, capsys):
    book = _book(tmp_path)
    out = tmp_path / "out"
    assert main(["data", "prepare", str(book), "--out", str(out), "--quiet", "--quality.max_words=200",
                 "--tokenize.enabled=true", "--tokenize.tokenizer=bytes", "--num_workers=1"]) == 2
    err = capsys.readouterr().err
    assert "error: no documents kept" in err and "too_many_words" in err and "reader.separator" in err
    assert not (out / "tokens").exists()


def test_small_corpus_still_gets_a_val_document(tmp_path):
    """The default val_fraction (0.0005) picks no document of a few by hash: one is moved to val."""
    rng = random.Random(9)
    _jsonl(tmp_path / "c.jsonl", [_doc(rng) for _ in range(20)])
    config = _config("tokenize.enabled=true", "tokenize.tokenizer=bytes", "tokenize.num_workers=1")
    report = prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "out"), config)
    assert report["output"]["documents"] == 20
    assert report["tokens"]["tokens"]["val"] > 0 and report["tokens"]["tokens"]["train"] > 0


def test_a_single_kept_document_warns_that_val_is_empty(tmp_path, capsys):
    book = _book(tmp_path)
    config = _config("reader.separator=null", "quality.enabled=false", "tokenize.enabled=true",
                     "tokenize.tokenizer=bytes", "tokenize.num_workers=1")
    report = prepare([str(book)], str(tmp_path / "out"), config)
    assert report["output"]["documents"] == 1 and report["tokens"]["tokens"]["val"] == 0
    assert "val split is empty" in report["warnings"][0] and "reader.separator" in report["warnings"][0]
    assert "warning: the val split is empty" in capsys.readouterr().err


def _byte_ranks(path, merged=()):
    """A .tiktoken file: the 256 bytes, then the tokens of `merged` (bytes objects)."""
    import base64

    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    lines += [f"{base64.b64encode(t).decode()} {256 + j}" for j, t in enumerate(merged)]
    path.write_text("\n".join(lines) + "\n")


def _shard_tokens(out_dir):
    from llmkern.data.shards import load_manifest

    manifest = load_manifest(str(out_dir / "tokens"))
    return {split: sum(e["tokens"] for e in entries) for split, entries in manifest["splits"].items()}


def test_a_rerun_tokenizes_again_when_the_tokenizer_file_was_retrained_in_place(tmp_path):
    rng = random.Random(3)
    _jsonl(tmp_path / "a.jsonl", [_doc(rng) for _ in range(6)])
    ranks = tmp_path / "tok.tiktoken"
    _byte_ranks(ranks)
    config = _config("tokenize.enabled=true", f"tokenize.tokenizer={ranks}", "tokenize.num_workers=1")
    first = prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "out"), config)
    assert sum(first["tokens"]["tokens"].values()) == sum(_shard_tokens(tmp_path / "out").values())
    _byte_ranks(ranks, [b"th", b"he", b" t", b"an"])  # same path, another vocabulary
    second = prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "out"), config)
    # The new merges shorten the text: reusing the old shards would report (and keep) more tokens.
    assert sum(second["tokens"]["tokens"].values()) < sum(first["tokens"]["tokens"].values())
    assert second["tokens"]["tokens"] == _shard_tokens(tmp_path / "out")


def test_shards_of_other_settings_left_by_a_crash_are_not_reported_as_these(tmp_path, monkeypatch):
    rng = random.Random(4)
    _jsonl(tmp_path / "a.jsonl", [_doc(rng) for _ in range(30)])
    inputs, out = [str(tmp_path / "a.jsonl")], tmp_path / "out"

    def settings(val_fraction):
        return _config("tokenize.enabled=true", "tokenize.tokenizer=bytes", "tokenize.num_workers=1",
                       f"tokenize.val_fraction={val_fraction}")

    first = prepare(inputs, str(out), settings(0.1))
    # Another val fraction, interrupted after its shards and manifest are written but before
    # progress.json records them.
    real_save = pipeline._Progress.save

    def crash_once_tokenized(self):
        if self.data.get("tokenized", {}).get("settings", "").find('"val_fraction": 0.5') >= 0:
            raise KeyboardInterrupt("killed")
        real_save(self)

    monkeypatch.setattr(pipeline._Progress, "save", crash_once_tokenized)
    with pytest.raises(KeyboardInterrupt):
        prepare(inputs, str(out), settings(0.5))
    monkeypatch.setattr(pipeline._Progress, "save", real_save)
    assert _shard_tokens(out) != first["tokens"]["tokens"]  # the disk holds the other settings' shards
    again = prepare(inputs, str(out), settings(0.1))
    assert again["tokens"]["tokens"] == first["tokens"]["tokens"] == _shard_tokens(out)


def test_a_changed_eval_set_starts_over_instead_of_resuming(tmp_path, monkeypatch, capsys):
    # The eval sets decide what decontam drops: documents done under the old eval set must not be kept
    # as done when it changes, else the output mixes the two (a clean run drops the newly listed text).
    rng = random.Random(5)
    docs = [_doc(rng, 40) for _ in range(3)]
    for i, text in enumerate(docs):
        _jsonl(tmp_path / f"in{i}.jsonl", [text])
    inputs = [str(tmp_path / f"in{i}.jsonl") for i in range(3)]
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(_doc(rng, 30))
    config = _config("decontam.enabled=true", f'decontam.eval_sets=["{eval_file}"]', "quality.enabled=false")
    real = _crash_on_input(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        prepare(inputs, str(tmp_path / "out"), config)
    monkeypatch.setattr(pipeline, "_process_file", real)
    eval_file.write_text(" ".join(docs[0].split()[:20]))  # now input 0's document is contaminated

    resumed = prepare(inputs, str(tmp_path / "out"), config)
    prepare(inputs, str(tmp_path / "clean"), config)
    assert resumed["resumed_inputs"] == 0 and "starting over" in capsys.readouterr().err
    assert _documents(tmp_path / "out") == _documents(tmp_path / "clean")
    assert {s["name"]: s["rejected"] for s in resumed["stages"]}["decontam"] == {"contaminated": 1}


def test_a_rerun_with_other_thread_or_worker_counts_keeps_the_work_done(corpus, tmp_path, monkeypatch):
    # How many threads hash the documents and processes tokenize them leaves the output as it is,
    # so a rerun that changes them continues instead of throwing away hours of work.
    root, _ = corpus
    out = tmp_path / "out"
    real = _crash_on_input(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(root)], str(out), _config("near_dedup.num_threads=1"))
    monkeypatch.setattr(pipeline, "_process_file", real)
    tokenize = ["tokenize.enabled=true", "tokenize.tokenizer=bytes", "tokenize.val_fraction=0"]
    resumed = prepare([str(root)], str(out), _config("near_dedup.num_threads=2", *tokenize, "tokenize.num_workers=1"))
    assert resumed["resumed_inputs"] == 2

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again though the shards of these settings are there")

    monkeypatch.setattr(pipeline, "_tokenize", no_tokenizing)
    again = prepare([str(root)], str(out), _config("near_dedup.num_threads=2", *tokenize, "tokenize.num_workers=2"))
    assert again["tokens"] == resumed["tokens"]


def test_a_start_over_cut_short_leaves_no_progress_claiming_deleted_parts(corpus, tmp_path, monkeypatch):
    # Other settings start over; interrupted while deleting the old parts, then run again with the old
    # settings, the run must not resume from a progress.json whose parts are partly gone.
    root, _ = corpus
    out = tmp_path / "out"
    first = prepare([str(root)], str(out), _config())
    documents = _documents(out)
    real_rmtree = pipeline.shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        if os.path.basename(path) == pipeline.DOCUMENTS_DIR:
            os.remove(os.path.join(path, pipeline.part_name(0)))
            raise KeyboardInterrupt("killed while deleting")
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(pipeline.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(root)], str(out), _config("quality.enabled=false"))
    monkeypatch.setattr(pipeline.shutil, "rmtree", real_rmtree)
    again = prepare([str(root)], str(out), _config())
    assert again["resumed_inputs"] == 0 and _counts(again) == _counts(first)
    assert _documents(out) == documents
