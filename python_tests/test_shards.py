"""llmkern.data.shards: shard files, the manifest, checksums, and tokenize_documents."""

import hashlib
import json
import os
import random

import numpy as np
import pytest

from llmkern.data import shards
from llmkern.data.tokenizer import get_tokenizer


def write_split(out_dir, split, dtype, chunks, tokens_per_shard):
    with shards.ShardWriter(out_dir, split, dtype, tokens_per_shard=tokens_per_shard) as w:
        for chunk in chunks:
            w.write(chunk)
    return w.close()


def test_writer_splits_into_shards_and_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 50257, size=n) for n in (1, 17, 123, 1000, 0, 1362)]
    tokens = np.concatenate(chunks)  # 2503 tokens
    entries = write_split(tmp_path, "train", "uint16", chunks, tokens_per_shard=1000)
    assert [e["file"] for e in entries] == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert [e["tokens"] for e in entries] == [1000, 1000, 503]
    for e in entries:
        raw = (tmp_path / e["file"]).read_bytes()
        assert e["sha256"] == hashlib.sha256(raw).hexdigest()
    # Raw little-endian uint16, no header.
    on_disk = np.concatenate([np.fromfile(tmp_path / e["file"], dtype="<u2") for e in entries])
    np.testing.assert_array_equal(on_disk, tokens)

    shards.write_manifest(tmp_path, "gpt2", 50257, 50256, "uint16", {"train": entries, "val": []})
    maps = shards.open_split(tmp_path, "train")
    assert all(isinstance(m, np.memmap) for m in maps)
    np.testing.assert_array_equal(np.concatenate(maps), tokens)
    assert shards.open_split(tmp_path, "val") == []
    assert shards.verify(tmp_path) == {"train": 2503, "val": 0}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_uint32_path(tmp_path):
    assert shards.dtype_for_vocab(65536) == "uint16"
    assert shards.dtype_for_vocab(65537) == "uint32"
    tokens = np.array([0, 65535, 65536, 100_276, 2**32 - 1], dtype=np.int64)
    entries = write_split(tmp_path, "train", "uint32", [tokens], tokens_per_shard=4)
    shards.write_manifest(tmp_path, "o200k_base", 200_019, 199_999, "uint32", {"train": entries})
    manifest = shards.load_manifest(tmp_path)
    assert manifest["dtype"] == "uint32" and manifest["n_vocab"] == 200_019
    np.testing.assert_array_equal(np.fromfile(tmp_path / "train_000000.bin", dtype="<u4"), tokens[:4])
    np.testing.assert_array_equal(np.concatenate(shards.open_split(tmp_path, "train")), tokens)


def test_writer_rejects_bad_tokens(tmp_path):
    w = shards.ShardWriter(tmp_path, "train", "uint16")
    with pytest.raises(ValueError, match="tokens"):
        w.write([1, 70_000])
    with pytest.raises(ValueError, match="tokens"):
        w.write([-1])
    with pytest.raises(TypeError, match="tokens"):
        w.write(np.array([1.5]))
    with pytest.raises(ValueError, match="tokens"):
        w.write(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="dtype"):
        shards.ShardWriter(tmp_path, "train", "int32")
    with pytest.raises(ValueError, match="tokens_per_shard"):
        shards.ShardWriter(tmp_path, "train", "uint16", tokens_per_shard=0)
    with pytest.raises(ValueError, match="split"):
        shards.ShardWriter(tmp_path, "a/b", "uint16")
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write([1])


def test_failed_write_leaves_no_temporary_file(tmp_path):
    with pytest.raises(RuntimeError, match="crash"):
        with shards.ShardWriter(tmp_path, "train", "uint16", tokens_per_shard=10) as w:
            w.write(np.arange(15))  # one full shard, then half of a second
            raise RuntimeError("crash")
    assert sorted(os.listdir(tmp_path)) == ["train_000000.bin"]


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        shards.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "llmkern-shards", "vers')
    with pytest.raises(ValueError, match="corrupt"):
        shards.load_manifest(tmp_path)
    good = {"format": "llmkern-shards", "version": 1, "tokenizer": "bytes", "n_vocab": 257,
            "eot_token": 256, "dtype": "uint16", "splits": {"train": []}}
    for key, value in [("format", "other"), ("version", 2), ("dtype", "float32"), ("splits", []),
                       ("n_vocab", "257")]:
        (tmp_path / "manifest.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(ValueError, match=key):
            shards.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**good, "splits": {"train": [{"file": "x"}]}}))
    with pytest.raises(ValueError, match="entries"):
        shards.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(good))
    with pytest.raises(KeyError, match="val"):
        shards.open_split(tmp_path, "val")
    with pytest.raises(ValueError, match="dtype"):
        shards.write_manifest(tmp_path, "bytes", 257, 256, "int8", {})


def test_verify_finds_corrupt_missing_and_truncated_shards(tmp_path):
    entries = write_split(tmp_path, "train", "uint16", [np.arange(30)], tokens_per_shard=10)
    shards.write_manifest(tmp_path, "bytes", 257, 256, "uint16", {"train": entries})
    assert shards.verify(tmp_path) == {"train": 30}

    path = tmp_path / "train_000001.bin"
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="train_000001.bin: sha256"):
        shards.verify(tmp_path)

    (tmp_path / "train_000002.bin").write_bytes(b"\x00" * 6)
    with pytest.raises(ValueError, match="expected 20 bytes"):
        shards.open_split(tmp_path, "train")
    os.remove(tmp_path / "train_000000.bin")
    with pytest.raises(ValueError, match="train_000000.bin: missing"):
        shards.verify(tmp_path)
    with pytest.raises(FileNotFoundError, match="train_000000.bin"):
        shards.open_split(tmp_path, "train")


def random_docs(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "é", "日本", "🙂", "\n", "42", "<|endoftext|>"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(count)]


def read_docs(out_dir, split, tok):
    """The documents of a split: the text between consecutive EOT tokens."""
    maps = shards.open_split(out_dir, split)
    ids = np.concatenate(maps).tolist() if maps else []
    docs, current = [], None
    for i in ids:
        if i == tok.eot_token:
            if current is not None:
                docs.append(tok.decode(current))
            current = []
        else:
            current.append(i)
    if current is not None:
        docs.append(tok.decode(current))
    return docs


def test_tokenize_documents_eot_before_every_document_and_split(tmp_path):
    tok = get_tokenizer("bytes")
    docs = random_docs(seed=4, count=1000)
    manifest = shards.tokenize_documents(docs, tok, tmp_path, val_fraction=0.2, seed=7, batch_size=64,
                                         tokens_per_shard=5000)
    assert manifest["tokenizer"] == "bytes" and manifest["dtype"] == "uint16" and manifest["eot_token"] == 256
    train, val = read_docs(tmp_path, "train", tok), read_docs(tmp_path, "val", tok)
    assert len(train) + len(val) == len(docs)
    assert 0.1 < len(val) / len(docs) < 0.3
    # Each document lies wholly in the split its hash picks, in the input order.
    assert val == [d for d in docs if shards.is_val_document(d, 0.2, 7)]
    assert train == [d for d in docs if not shards.is_val_document(d, 0.2, 7)]
    first = np.asarray(shards.open_split(tmp_path, "train")[0])
    assert first[0] == tok.eot_token
    shards.verify(tmp_path)


def test_tokenize_documents_two_workers_equal_one(tmp_path, shared_data):
    path = os.path.join(shared_data, "gpt2.tiktoken")
    if not os.path.exists(path):
        pytest.skip("gpt2.tiktoken is not in ../shared/data")
    tok = get_tokenizer(path)
    docs = random_docs(seed=5, count=600)
    kwargs = dict(val_fraction=0.1, seed=3, batch_size=50, tokens_per_shard=3000)
    one = shards.tokenize_documents(docs, tok, tmp_path / "one", num_workers=1, **kwargs)
    two = shards.tokenize_documents(iter(docs), tok, tmp_path / "two", num_workers=2, **kwargs)
    assert one["splits"] == two["splits"] and len(one["splits"]["train"]) > 1
    for entry in one["splits"]["train"] + one["splits"]["val"]:
        assert (tmp_path / "one" / entry["file"]).read_bytes() == (tmp_path / "two" / entry["file"]).read_bytes()
    assert read_docs(tmp_path / "one", "train", tok) + read_docs(tmp_path / "one", "val", tok) != []
    assert sorted(read_docs(tmp_path / "two", "train", tok) + read_docs(tmp_path / "two", "val", tok)) == sorted(docs)


def test_tokenize_documents_rerun_removes_stale_shards(tmp_path):
    docs = random_docs(seed=8, count=200)
    first = shards.tokenize_documents(docs, "bytes", tmp_path, tokens_per_shard=1000)
    (tmp_path / "notes.bin").write_bytes(b"not ours")
    (tmp_path / "train_000042.bin.tmp").write_bytes(b"a shard a killed run left unfinished")
    second = shards.tokenize_documents(docs[:20], "bytes", tmp_path, tokens_per_shard=1000)
    assert len(first["splits"]["train"]) > len(second["splits"]["train"])
    listed = {e["file"] for e in second["splits"]["train"] + second["splits"]["val"]}
    assert {p for p in os.listdir(tmp_path) if p != "notes.bin"} == listed | {"manifest.json"}
    shards.verify(tmp_path)


def test_a_rerun_cut_short_leaves_no_manifest_over_its_new_shards(tmp_path):
    docs = random_docs(seed=9, count=200)
    shards.tokenize_documents(docs, "bytes", tmp_path, tokens_per_shard=1000)

    def cut_short():
        yield from docs[::-1][:100]  # other documents into train_000000.bin and on
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        shards.tokenize_documents(cut_short(), "bytes", tmp_path, tokens_per_shard=1000, batch_size=10)
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        shards.load_manifest(tmp_path)


def test_tokenize_documents_seed_changes_the_split_and_checks_arguments(tmp_path):
    docs = random_docs(seed=6, count=300)
    assert [shards.is_val_document(d, 0.5, 1) for d in docs] != [shards.is_val_document(d, 0.5, 2) for d in docs]
    with pytest.raises(ValueError, match="val_fraction"):
        shards.tokenize_documents(docs, "bytes", tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="num_workers"):
        shards.tokenize_documents(docs, "bytes", tmp_path, num_workers=0)
    with pytest.raises(ValueError, match="seed"):
        shards.tokenize_documents(docs, "bytes", tmp_path, seed=-1)
    with pytest.raises(TypeError, match="docs"):
        shards.tokenize_documents([b"bytes, not text"], "bytes", tmp_path)
    with pytest.raises(TypeError, match="tokenizer"):
        shards.tokenize_documents(docs, object(), tmp_path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _distinct(docs):
    return list(dict.fromkeys(docs))


def test_small_corpus_moves_its_lowest_ranked_document_to_val(tmp_path):
    tok = get_tokenizer("bytes")
    docs = _distinct(random_docs(seed=10, count=40))
    assert not any(shards.is_val_document(d, 0.0005, 0) for d in docs)  # hashing alone gives val nothing
    lowest = min(docs, key=lambda d: shards.hash_rank(d, 0))
    kwargs = dict(val_fraction=0.0005, tokens_per_shard=50)  # small shards: the moved document spans several
    outs = []
    for name, workers, batch in (("one", 1, 4), ("three", 3, 7), ("big", 1, 1000)):
        out = tmp_path / name
        outs.append((out, shards.tokenize_documents(iter(docs), tok, out, num_workers=workers, batch_size=batch,
                                                    **kwargs)))
        assert read_docs(out, "val", tok) == [lowest]
        assert read_docs(out, "train", tok) == [d for d in docs if d != lowest]
        assert shards.verify(out) == {"train": sum(len(d.encode()) + 1 for d in docs if d != lowest),
                                      "val": len(lowest.encode()) + 1}
        assert sorted(os.listdir(out)) == sorted(
            [e["file"] for e in outs[-1][1]["splits"]["train"] + outs[-1][1]["splits"]["val"]] + ["manifest.json"])
    # The same output whatever the worker count or batch size.
    (one, first), *rest = outs
    for out, manifest in rest:
        assert manifest["splits"] == first["splits"]
        for entry in first["splits"]["train"] + first["splits"]["val"]:
            assert (out / entry["file"]).read_bytes() == (one / entry["file"]).read_bytes()


def test_the_moved_document_takes_its_identical_copies_along(tmp_path):
    tok = get_tokenizer("bytes")
    docs = _distinct(random_docs(seed=11, count=30))
    lowest = min(docs, key=lambda d: shards.hash_rank(d, 0))
    docs = docs[:5] + [lowest] + docs[5:] + [lowest]  # three copies in all, in different batches
    shards.tokenize_documents(docs, tok, tmp_path, val_fraction=0.001, batch_size=3, tokens_per_shard=64)
    assert read_docs(tmp_path, "val", tok) == [lowest] * 3
    assert read_docs(tmp_path, "train", tok) == [d for d in docs if d != lowest]


def test_no_document_is_moved_when_train_would_be_left_empty_or_val_is_off(tmp_path):
    tok = get_tokenizer("bytes")
    cases = [(["just one document"], 0.001), (["the same text"] * 3, 0.001), (["a cat", "a mat", "a hat"], 0.0)]
    for i, (docs, val_fraction) in enumerate(cases):
        manifest = shards.tokenize_documents(docs, tok, tmp_path / str(i), val_fraction=val_fraction)
        assert manifest["splits"]["val"] == []
        assert read_docs(tmp_path / str(i), "train", tok) == docs


def test_split_is_unchanged_when_hashing_already_gives_val_documents(tmp_path):
    """Byte for byte the hash split: ids written by hand from is_val_document."""
    tok = get_tokenizer("bytes")
    docs = random_docs(seed=12, count=300)
    manifest = shards.tokenize_documents(docs, tok, tmp_path, val_fraction=0.02, seed=5, batch_size=16)
    for split, wanted in (("train", False), ("val", True)):
        expected = [i for d in docs if shards.is_val_document(d, 0.02, 5) == wanted for i in [256, *d.encode()]]
        assert expected  # both splits have documents
        assert (tmp_path / manifest["splits"][split][0]["file"]).read_bytes() == np.array(expected, "<u2").tobytes()


def test_a_prepare_output_folder_given_for_its_shards_is_pointed_to_them(tmp_path):
    shards.tokenize_documents(random_docs(seed=2, count=5), "bytes", tmp_path / "tokens")
    with pytest.raises(FileNotFoundError, match=r"its token shards are in .*tokens"):
        shards.load_manifest(tmp_path)
