"""Data pipeline benchmark (CPU): near-dedup, tokenization, BPE training, each beside a baseline.

Corpus: Python source files (the standard library first, then site-packages, in sorted
order), one document per file, up to --mb megabytes of UTF-8.

  near-dedup   llmkern NearDedupStage (MinHash in C++, LSH) vs datasketch MinHash + MinHashLSH:
               128 permutations, 5-word shingles, threshold 0.8; MB/s and documents/s.
  tokenize     llmkern tokenize_documents (tiktoken, GPT-2 ranks, shards written) with 1 and 2
               processes, and tiktoken's encode_ordinary_batch in one thread; tokens/s.
  bpe          llmkern train_bpe vs HuggingFace tokenizers' BpeTrainer (byte-level), both from
               the corpus file, --vocab-size tokens; seconds.

The baselines are optional (pip install datasketch tokenizers). Results append to
benchmarks/results/cpu.csv (on a machine without a GPU) with versions and the git commit.

  python benchmarks/bench_data.py --mb 100
  python benchmarks/bench_data.py --mb 10 --only bpe
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import re
import sys
import sysconfig
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Result, save  # noqa: E402

SHARED_GPT2 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gpt2.tiktoken"


def python_sources(megabytes: float) -> list[str]:
    """Python files as documents, the standard library first, until `megabytes` MB of UTF-8."""
    lib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(lib, "**", "*.py"), recursive=True))
    files = [f for f in files if "site-packages" not in f] + [f for f in files if "site-packages" in f]
    docs, size, limit = [], 0, megabytes * 1e6
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        docs.append(text)
        size += len(text.encode("utf-8"))
        if size >= limit:
            break
    return docs


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count()}


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# --- near-dedup ------------------------------------------------------------------------------


def bench_near_dedup(docs: list[str], mb: float, shape: str) -> list[Result]:
    from llmkern.data.config import NearDedupConfig
    from llmkern.data.dedup import NearDedupStage
    from llmkern.data.readers import Document
    from llmkern.data.stage import StageStats

    results = []
    documents = [Document(text=t, source=f"doc{i}", line=1) for i, t in enumerate(docs)]
    stage = NearDedupStage(NearDedupConfig(num_perm=128, ngram=5, threshold=0.8))
    stats = StageStats("near_dedup")
    seconds, kept = timed(lambda: stage.process(documents, stats))
    results.append(Result("data", "near-dedup", shape, "llmkern", seconds * 1e3, mb / seconds, "MB/s",
                          {"docs_per_s": round(len(docs) / seconds, 1), "duplicates": len(docs) - len(kept)}))

    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError:
        print("datasketch is not installed: no near-dedup baseline")
        return results
    word = re.compile(r"\w+")

    def datasketch_dedup() -> int:
        lsh = MinHashLSH(threshold=0.8, num_perm=128)
        duplicates = 0
        for i, text in enumerate(docs):
            words = word.findall(text.lower())
            shingles = {" ".join(words[j:j + 5]).encode("utf-8") for j in range(max(1, len(words) - 4))}
            m = MinHash(num_perm=128)
            m.update_batch(list(shingles))
            if lsh.query(m):
                duplicates += 1
            else:
                lsh.insert(str(i), m)
        return duplicates

    seconds, duplicates = timed(datasketch_dedup)
    results.append(Result("data", "near-dedup", shape, "datasketch", seconds * 1e3, mb / seconds, "MB/s",
                          {"docs_per_s": round(len(docs) / seconds, 1), "duplicates": duplicates}))
    return results


# --- tokenization ----------------------------------------------------------------------------


def bench_tokenize(docs: list[str], mb: float, shape: str) -> list[Result]:
    from llmkern.data.shards import tokenize_documents
    from llmkern.data.tokenizer import get_tokenizer

    spec = str(SHARED_GPT2) if SHARED_GPT2.exists() else "bytes"
    tok = get_tokenizer(spec)
    results = []
    seconds, encoded = timed(lambda: [tok.encoding.encode_ordinary(t) for t in docs] if spec != "bytes"
                             else tok.encode_batch(docs))
    n_tokens = sum(map(len, encoded))
    results.append(Result("data", "tokenize", shape, "tiktoken 1 thread", seconds * 1e3, n_tokens / seconds,
                          "tokens/s", {"MB_per_s": round(mb / seconds, 2), "tokenizer": Path(spec).name}))
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            seconds, manifest = timed(lambda: tokenize_documents(docs, tok, out, val_fraction=0.001,
                                                                 num_workers=workers))
        tokens = sum(e["tokens"] for entries in manifest["splits"].values() for e in entries)
        results.append(Result("data", "tokenize", shape, f"llmkern shards {workers} proc", seconds * 1e3,
                              tokens / seconds, "tokens/s", {"MB_per_s": round(mb / seconds, 2)}))
    return results


# --- BPE training ----------------------------------------------------------------------------


def bench_bpe(corpus_file: str, mb: float, shape: str, vocab_size: int, sample: list[str]) -> list[Result]:
    """`sample`: texts to encode with each trained vocabulary; bytes per token says both learned
    equally useful merges (a fast trainer that learned worse ones would show here)."""
    from llmkern.data import bpe

    sample_bytes = sum(len(t.encode("utf-8")) for t in sample)
    results = []
    with tempfile.TemporaryDirectory() as out:
        pre_seconds, counts = timed(lambda: bpe.count_words(Path(corpus_file), special_tokens=("<|endoftext|>",),
                                                            num_workers=os.cpu_count() or 1))
        seconds, tok = timed(lambda: bpe.train_bpe(Path(corpus_file), vocab_size, os.path.join(out, "b.tiktoken")))
    # MB/s, not seconds, so that higher is better everywhere and the ratios read the same way.
    results.append(Result("data", f"bpe train {vocab_size}", shape, "llmkern", seconds * 1e3, mb / seconds, "MB/s",
                          {"pretokenize_s": round(pre_seconds, 2), "distinct_words": len(counts),
                           "n_vocab": tok.n_vocab,
                           "sample_bytes_per_token": round(sample_bytes / sum(map(len, tok.encode_batch(sample))), 3)}))
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        print("tokenizers is not installed: no BPE baseline")
        return results

    def hf_train():
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train([corpus_file], trainer)
        return hf

    seconds, hf = timed(hf_train)
    hf_tokens = sum(len(e.ids) for e in hf.encode_batch(sample))
    extra = {"n_vocab": hf.get_vocab_size(), "sample_bytes_per_token": round(sample_bytes / hf_tokens, 3)}
    results.append(Result("data", f"bpe train {vocab_size}", shape, "hf tokenizers", seconds * 1e3, mb / seconds,
                          "MB/s", extra))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size in MB (default 100)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--only", choices=["near-dedup", "tokenize", "bpe"], action="append",
                        help="run only these (repeatable; default: all)")
    args = parser.parse_args()
    which = args.only or ["near-dedup", "tokenize", "bpe"]

    docs = python_sources(args.mb)
    mb = sum(len(t.encode("utf-8")) for t in docs) / 1e6
    shape = f"{mb:.0f}MB/{len(docs)}docs"
    print(f"corpus: {len(docs)} Python files, {mb:.1f} MB; {machine()}")
    env = {**machine(), "datasketch": version("datasketch"), "tokenizers": version("tokenizers"),
           "tiktoken": version("tiktoken")}

    results: list[Result] = []
    if "near-dedup" in which:
        results += bench_near_dedup(docs, mb, shape)
    if "tokenize" in which:
        results += bench_tokenize(docs, mb, shape)
    if "bpe" in which:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
            f.write("\n".join(docs))
        try:
            # Held-out sample: the next Python files after the corpus.
            sample = python_sources(args.mb + 2)[len(docs):]
            results += bench_bpe(f.name, mb, shape, args.vocab_size, sample)
        finally:
            os.remove(f.name)
    for r in results:
        r.extra.update(env)
    path = save(results, "llmkern data pipeline (CPU)", baselines=("datasketch", "tiktoken 1 thread", "hf tokenizers"))
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
