"""The begin-of-sequence token: every place that starts a sequence of its own puts tokenizer.bos_token first,
once, after any cut too; a tokenizer without one (bos_token None) gives what it gave before there was one."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bos_tokenizer import BOS_TEXT, make_tokenizers
from torch import nn

from llmkern.model import GPT, GPTConfig

IGNORE = -1
LONG = "the cat sees the moon over the hill and the dog eats bread by the river. " * 6


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(without a BOS, with one): the same ordinary tokens."""
    return make_tokenizers(tmp_path_factory.mktemp("bos_tokenizers"))


@pytest.fixture(scope="module")
def bos_tok(tokenizers):
    return tokenizers[1]


@pytest.fixture(scope="module")
def plain_tok(tokenizers):
    return tokenizers[0]


def starts_with_one_bos(ids, tok) -> bool:
    return ids[0] == tok.bos_token and list(ids).count(tok.bos_token) == 1


def tiny_gpt(vocab_size: int, block_size: int = 64) -> GPT:
    return GPT(GPTConfig.from_preset("tiny", vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2,
                                     n_embd=16, backend="torch")).eval()


def test_the_fixture_tokenizers_differ_only_in_the_bos(plain_tok, bos_tok):
    assert bos_tok.encode(LONG) == plain_tok.encode(LONG) and bos_tok.eot_token == plain_tok.eot_token
    assert bos_tok.decode([bos_tok.bos_token]) == BOS_TEXT
    assert BOS_TEXT not in set(map(bos_tok.decode, [[t] for t in bos_tok.encode(BOS_TEXT)]))  # ordinary text


# --- llmkern.data.sequences ---------------------------------------------------------------------------

def test_cut_left_keeps_the_start_and_counts_it(plain_tok, bos_tok):
    from llmkern.data.sequences import cut_left, encode_sequence

    ids = encode_sequence(bos_tok, LONG)
    assert cut_left(bos_tok, ids, 5) == [bos_tok.bos_token] + ids[-4:]
    assert cut_left(bos_tok, ids, 1) == [bos_tok.bos_token]
    assert cut_left(bos_tok, ids, len(ids)) == ids
    with pytest.raises(ValueError, match="max_len"):
        cut_left(bos_tok, ids, 0)
    plain = plain_tok.encode(LONG)
    assert cut_left(plain_tok, plain, 5) == plain[-5:]


# --- fine-tuning ---------------------------------------------------------------------------------------

def test_prompt_response_examples_start_with_the_bos(plain_tok, bos_tok):
    from llmkern.finetune.data import encode_prompt_response

    prompt, response = "### Instruction: name a pet\n### Response:", " a cat"
    tokens, labels = encode_prompt_response(bos_tok, prompt, response, 1000)
    expected = [bos_tok.bos_token] + bos_tok.encode(prompt) + bos_tok.encode(response) + [bos_tok.eot_token]
    assert tokens == expected and starts_with_one_bos(tokens, bos_tok)
    n_prompt = 1 + len(bos_tok.encode(prompt))
    assert labels == [IGNORE] * n_prompt + expected[n_prompt:]  # the BOS is never learned
    tokens, labels = encode_prompt_response(bos_tok, prompt, response, 4)
    assert tokens == expected[:4] and labels == [IGNORE] * 4
    tokens, labels = encode_prompt_response(bos_tok, prompt, response, 1000, mask_prompt=False)
    assert labels == expected

    plain = plain_tok.encode(prompt) + plain_tok.encode(response) + [plain_tok.eot_token]
    for max_len in (1000, 5):
        tokens, labels = encode_prompt_response(plain_tok, prompt, response, max_len)
        assert tokens == plain[:max_len]
        assert labels == ([IGNORE] * len(plain_tok.encode(prompt)) + plain[len(plain_tok.encode(prompt)):])[:max_len]


def test_reward_texts_keep_the_bos_when_cut_to_their_end(plain_tok, bos_tok):
    from llmkern.finetune.reward import encode_pair_text

    ids = encode_pair_text(bos_tok, LONG, " a good answer", 12)
    text = bos_tok.encode(LONG) + bos_tok.encode(" a good answer") + [bos_tok.eot_token]
    assert ids == [bos_tok.bos_token] + text[-11:]
    plain = plain_tok.encode(LONG) + plain_tok.encode(" a good answer") + [plain_tok.eot_token]
    assert encode_pair_text(plain_tok, LONG, " a good answer", 12) == plain[-12:]


def test_classifier_texts_start_with_the_bos(plain_tok, bos_tok):
    from llmkern.finetune.classify import encode_texts

    texts = [LONG, "a cat", ""]
    bos = bos_tok.bos_token
    assert encode_texts(bos_tok, texts, 6) == [[bos] + bos_tok.encode(LONG)[:5], [bos] + bos_tok.encode("a cat"),
                                               [bos]]
    head = [plain_tok.encode(t)[:6] or [plain_tok.eot_token] for t in texts]  # what it was before BOS tokens
    assert encode_texts(plain_tok, texts, 6) == head


def test_ppo_prompts_keep_the_bos_first_when_left_cut(plain_tok, bos_tok):
    from llmkern.finetune.ppo import encode_prompts
    from llmkern.finetune.templates import PromptFormat

    rows = [{"instruction": LONG, "input": ""}, {"instruction": "hi", "input": ""}]
    texts = [bos_tok.encode(PromptFormat().prompt(row)) for row in rows]
    for max_len in (1, 9, 10_000):
        prompts = encode_prompts(rows, bos_tok, max_len)
        for ids, text in zip(prompts, texts):
            assert starts_with_one_bos(ids, bos_tok) and len(ids) <= max_len
            assert ids == [bos_tok.bos_token] + text[max(len(text) - (max_len - 1), 0):]
    assert encode_prompts(rows, plain_tok, 9) == [t[-9:] for t in texts]


class RecordingReward(nn.Module):
    """A reward model of block_size 4 that scores 0 and keeps the rows it read."""

    def __init__(self):
        super().__init__()
        self.body = SimpleNamespace(config=SimpleNamespace(block_size=4))
        self.rows = []

    def forward(self, ids, lengths):
        self.rows += [row[:n] for row, n in zip(ids.tolist(), lengths.tolist())]
        return torch.zeros(len(ids))


def test_ppo_reward_model_reads_the_bos_when_the_text_is_cut():
    from llmkern.finetune.ppo import PolicyWithValue, score_rollout

    bos, eot = 40, 41
    policy, reference = PolicyWithValue(tiny_gpt(42)), tiny_gpt(42)
    prompts, responses = [[bos, 5, 6, 7]], [[8, 9, eot]]
    reward = RecordingReward()
    score_rollout(policy, reference, reward, prompts, responses, pad_id=eot, kl_coef=0.1, bos_token=bos)
    assert reward.rows == [[bos, 8, 9, eot]]
    without = RecordingReward()
    score_rollout(policy, reference, without, [[4, 5, 6, 7]], responses, pad_id=eot, kl_coef=0.1)
    assert without.rows == [[7, 8, 9, eot]]  # the last block_size tokens, as before


def fake_generate(calls, new_tokens, keep_firsts=None):
    """A stand-in for llmkern.model.generate: records the prompts (and keep_first in keep_firsts), appends
    new_tokens to each."""
    def generate(model, prompts, max_new_tokens, **kwargs):
        calls.append([list(p) for p in prompts])
        if keep_firsts is not None:
            keep_firsts.append(kwargs.get("keep_first", 0))
        return [list(p) + list(new_tokens) for p in prompts]

    return generate


def test_respond_prompts_start_with_the_bos(monkeypatch, plain_tok, bos_tok):
    import llmkern.model
    from llmkern.finetune.templates import PromptFormat, respond

    new = bos_tok.encode(" a cat") + [bos_tok.eot_token]
    for tok, start in ((bos_tok, [bos_tok.bos_token]), (plain_tok, [])):
        calls, keep_firsts = [], []
        monkeypatch.setattr(llmkern.model, "generate", fake_generate(calls, new, keep_firsts))
        out = respond(None, tok, ["name a pet", ""], PromptFormat(), max_new_tokens=4)
        assert out == [" a cat", " a cat"]
        empty = start or [tok.eot_token]  # an empty prompt without a BOS: <|endoftext|>, as before
        assert calls == [[start + tok.encode("name a pet"), empty]]
        assert keep_firsts == [len(start)]  # a sequence past block_size keeps reading its BOS


def test_sample_text_prompts_start_with_the_bos_and_the_text_leaves_it_out(monkeypatch, plain_tok, bos_tok):
    import llmkern.model
    from llmkern.train.inference import sample_text

    new = bos_tok.encode(" the moon") + [bos_tok.eot_token]
    for tok, start in ((bos_tok, [bos_tok.bos_token]), (plain_tok, [])):
        calls = []
        monkeypatch.setattr(llmkern.model, "generate", fake_generate(calls, new))
        assert sample_text(None, tok, ["the cat sees", ""]) == ["the cat sees the moon", " the moon"]
        assert calls == [[start + tok.encode("the cat sees"), start or [tok.eot_token]]]


# --- evaluation ----------------------------------------------------------------------------------------

def test_multiple_choice_contexts_start_with_the_bos_after_the_cut(plain_tok, bos_tok):
    from llmkern.eval.multiple_choice import encode_pair

    context = LONG.rstrip()  # a trailing space would move into the choice (the harness's rule: test_continuation)
    cont = bos_tok.encode(" the moon")
    full, n = encode_pair(bos_tok, context, " the moon", 12, "here")
    assert full == [bos_tok.bos_token] + (bos_tok.encode(context) + cont)[-12:] and n == len(cont)
    assert encode_pair(bos_tok, "", " the moon", 12, "here") == ([bos_tok.bos_token] + cont, len(cont))
    full, _ = encode_pair(bos_tok, context, " the moon", 100_000, "here")
    assert full == [bos_tok.bos_token] + bos_tok.encode(context) + cont
    # without a BOS: as before, an empty context is <|endoftext|>
    assert encode_pair(plain_tok, context, " the moon", 12, "here") == ((plain_tok.encode(context) + cont)[-13:], len(cont))
    assert encode_pair(plain_tok, "", " the moon", 12, "here") == ([plain_tok.eot_token] + cont, len(cont))


def test_perplexity_of_text_starts_the_document_with_the_bos(plain_tok, bos_tok):
    from llmkern.eval.perplexity import perplexity, perplexity_of_text

    torch.manual_seed(0)
    model = tiny_gpt(bos_tok.n_vocab, block_size=16)
    text = "the cat sees the moon over the hill"
    ids = bos_tok.encode(text)
    for tok, first in ((bos_tok, bos_tok.bos_token), (plain_tok, plain_tok.eot_token)):
        got = perplexity_of_text(model, tok, text, stride=8, context=16)
        want = perplexity(model, [first] + ids, stride=8, context=16)
        assert got["tokens"] == len(ids) and got["loss"] == want["loss"]
    assert perplexity_of_text(model, bos_tok, text)["loss"] != perplexity_of_text(model, plain_tok, text)["loss"]


def test_judging_prompts_start_with_the_bos_and_fit_after_the_cut(plain_tok, bos_tok):
    from llmkern.eval.win_rate import LMJudge

    probe = LMJudge(None, bos_tok)
    block = len(bos_tok.encode(probe.judging_prompt("name a pet", "a cat", "a dog"))) + 30  # LONG will not fit
    judge = LMJudge(SimpleNamespace(config=SimpleNamespace(block_size=block)), bos_tok)
    short = judge._judging_ids(0, "name a pet", "a cat", "a dog")
    assert short == [bos_tok.bos_token] + bos_tok.encode(judge.judging_prompt("name a pet", "a cat", "a dog"))
    cut = judge._judging_ids(1, "name a pet", LONG, LONG)
    assert starts_with_one_bos(cut, bos_tok) and len(cut) <= block and judge.cut_prompts == 1

    plain_judge = LMJudge(SimpleNamespace(config=SimpleNamespace(block_size=block)), plain_tok)
    assert plain_judge._judging_ids(0, "name a pet", "a cat", "a dog") == short[1:]
    assert plain_tok.bos_token not in plain_judge._judging_ids(1, "name a pet", LONG, LONG)


# --- pretraining shards ---------------------------------------------------------------------------------

DOCS = ["the cat sees the moon.", "a dog eats bread by the river and the hill.", "a bird sings.",
        "the moon over the hill."]


def train_stream(out_dir, split="train") -> list[int]:
    from llmkern.data.shards import open_split

    return [int(t) for shard in open_split(out_dir, split) for t in np.asarray(shard)]


def test_shard_documents_are_bos_doc_eot_and_each_has_its_own_document_ids(tmp_path, bos_tok):
    from llmkern.data.loader import TokenLoader
    from llmkern.data.shards import tokenize_documents

    manifest = tokenize_documents(DOCS, bos_tok, str(tmp_path), val_fraction=0.0)
    assert manifest["bos_token"] == bos_tok.bos_token and manifest["eot_token"] == bos_tok.eot_token
    bos, eot = bos_tok.bos_token, bos_tok.eot_token
    docs = [[bos] + bos_tok.encode(d) + [eot] for d in DOCS]
    stream = train_stream(str(tmp_path))
    assert stream == [t for doc in docs for t in doc]

    loader = TokenLoader(str(tmp_path), "train", 1, len(stream) - 1, mode="sequential", document_ids=True)
    x, _, doc_ids = loader.next_batch()
    expected = [k + 1 for k, doc in enumerate(docs) for _ in doc][:-1]  # the whole document, BOS to EOT
    assert x[0].tolist() == stream[:-1] and doc_ids[0].tolist() == expected


def test_a_document_moved_to_val_keeps_its_bos_and_eot(tmp_path, bos_tok):
    from llmkern.data.shards import tokenize_documents

    # no document's hash falls under this fraction: the lowest-ranked one moves to val, whole
    tokenize_documents(DOCS, bos_tok, str(tmp_path), val_fraction=1e-12)
    val = train_stream(str(tmp_path), "val")
    moved = [d for d in DOCS if val == [bos_tok.bos_token] + bos_tok.encode(d) + [bos_tok.eot_token]]
    assert len(moved) == 1
    train = train_stream(str(tmp_path))
    assert train.count(bos_tok.bos_token) == train.count(bos_tok.eot_token) == len(DOCS) - 1
    assert train[0] == bos_tok.bos_token and train[-1] == bos_tok.eot_token


def test_shards_without_a_bos_are_as_before(tmp_path, plain_tok):
    from llmkern.data.loader import TokenLoader
    from llmkern.data.shards import tokenize_documents

    manifest = tokenize_documents(DOCS, plain_tok, str(tmp_path), val_fraction=0.0)
    assert "bos_token" not in manifest
    stream = train_stream(str(tmp_path))
    assert stream == [t for d in DOCS for t in [plain_tok.eot_token] + plain_tok.encode(d)]
    loader = TokenLoader(str(tmp_path), "train", 1, len(stream) - 1, mode="sequential", document_ids=True)
    x, _, doc_ids = loader.next_batch()
    assert x[0].tolist() == stream[:-1]
    assert doc_ids[0].tolist() == np.cumsum(np.array(stream[:-1]) == plain_tok.eot_token).tolist()


def test_a_manifest_bos_token_must_be_an_int(tmp_path):
    import json

    from llmkern.data.shards import load_manifest, write_manifest

    path = write_manifest(str(tmp_path), "bytes", 257, 256, "uint16", {"train": []}, bos_token=5)
    assert load_manifest(str(tmp_path))["bos_token"] == 5
    with open(path) as f:
        manifest = json.load(f)
    manifest["bos_token"] = "5"
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match="bos_token"):
        load_manifest(str(tmp_path))
