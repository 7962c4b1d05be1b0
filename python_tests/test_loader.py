"""TokenLoader: windows are slices of the shards, deterministic by seed, resumable, split by rank."""

import hashlib

import numpy as np
import pytest
import torch

from llmkern.data.loader import TokenLoader
from llmkern.data.shards import shard_name, verify, write_manifest

EOT = 7


def write_shards(path, train_lengths=(1000, 13, 2345), val_length=300, n_vocab=65536):
    """Shards whose token at global position p is p % n_vocab, so a window shows where it came from."""
    dtype = "uint16" if n_vocab <= 65536 else "uint32"
    splits, offset = {}, 0
    for split, lengths in (("train", train_lengths), ("val", (val_length,))):
        splits[split] = []
        for index, n in enumerate(lengths):
            name = shard_name(split, index)
            data = (np.arange(offset, offset + n) % n_vocab).astype(np.dtype(dtype).newbyteorder("<"))
            data.tofile(path / name)
            splits[split].append({"file": name, "tokens": n, "sha256": hashlib.sha256(data.tobytes()).hexdigest()})
            offset += n
    write_manifest(str(path), "bytes", n_vocab, EOT, dtype, splits)
    return str(path)


@pytest.fixture
def shard_dir(tmp_path):
    path = write_shards(tmp_path)
    verify(path)  # the helper writes data-B's format exactly
    return path


def rows(batch):
    return [tuple(r) for r in batch.tolist()]


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_windows_are_contiguous_slices_and_y_is_x_shifted(shard_dir, mode):
    loader = TokenLoader(shard_dir, "train", batch_size=5, seq_len=17, mode=mode, seed=3)
    for _ in range(4):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (5, 17) and x.dtype == y.dtype == torch.int64
        # tokens count up by one inside a window (never across the short 13-token shard's edges)
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, 16, dtype=torch.int64))
        assert torch.equal(y, x + 1)
        assert not ((x >= 1000) & (x < 1013)).any(), "the 13-token shard is shorter than a window"


def test_same_seed_same_batches_other_seed_other_batches(shard_dir):
    a, b, c = (TokenLoader(shard_dir, "train", 4, 33, seed=s) for s in (1, 1, 2))
    batches_a = [a.next_batch()[0] for _ in range(3)]
    batches_b = [b.next_batch()[0] for _ in range(3)]
    batches_c = [c.next_batch()[0] for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(batches_a, batches_b))
    assert not all(torch.equal(p, q) for p, q in zip(batches_a, batches_c))
    assert not torch.equal(batches_a[0], batches_a[1])


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_from_state_dict_continues_the_stream(shard_dir, mode):
    full = TokenLoader(shard_dir, "train", 3, 19, mode=mode, seed=5)
    expected = [full.next_batch()[0] for _ in range(6)]
    first = TokenLoader(shard_dir, "train", 3, 19, mode=mode, seed=5)
    for _ in range(2):
        first.next_batch()
    resumed = TokenLoader(shard_dir, "train", 3, 19, mode=mode, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(resumed.next_batch()[0], e) for e in expected[2:])


def test_random_windows_past_one_block_of_draws_are_new_and_found_without_replaying(shard_dir):
    # Random windows are drawn RANDOM_BLOCK at a time from a generator of their block: a batch that spans
    # two blocks, resumed at any position, must give the windows one long batch gives there.
    from llmkern.data.loader import RANDOM_BLOCK

    count = RANDOM_BLOCK + 5
    whole = TokenLoader(shard_dir, "train", count, 4, seed=5).next_batch()[0]
    for position in (RANDOM_BLOCK - 2, RANDOM_BLOCK + 1):
        loader = TokenLoader(shard_dir, "train", 3, 4, seed=5)
        loader.load_state_dict({**loader.state_dict(), "position": position})
        assert torch.equal(loader.next_batch()[0], whole[position : position + 3])
    # the second block's draws are its own, not the first block's again
    assert not torch.equal(whole[RANDOM_BLOCK:], whole[:5])


def test_resume_refuses_another_stream(shard_dir):
    state = TokenLoader(shard_dir, "train", 3, 19, seed=5).state_dict()
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(shard_dir, "train", 3, 19, seed=6).load_state_dict(state)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_ranks_take_disjoint_windows_that_together_equal_one_big_batch(shard_dir, mode):
    world = 3
    single = TokenLoader(shard_dir, "train", 4 * world, 16, mode=mode, seed=9)
    ranks = [TokenLoader(shard_dir, "train", 4, 16, mode=mode, seed=9, rank=r, world_size=world) for r in range(world)]
    for _ in range(3):
        big = single.next_batch()[0]
        parts = [loader.next_batch()[0] for loader in ranks]
        for r, part in enumerate(parts):
            assert torch.equal(part, big[r::world])
        if mode == "sequential":  # consecutive strided windows: no two ranks share a start
            starts = torch.cat(parts)[:, 0].tolist()
            assert len(set(starts)) == len(starts)


def test_sequential_epoch_covers_every_window_once(tmp_path):
    shard_dir = write_shards(tmp_path, train_lengths=(101, 50), val_length=40)
    loader = TokenLoader(shard_dir, "train", 1, 10, mode="sequential")
    assert loader.windows_per_epoch == 10 + 4
    starts = [loader.next_batch()[0][0, 0].item() for _ in range(loader.windows_per_epoch)]
    assert starts == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 101, 111, 121, 131]
    assert loader.next_batch()[0][0, 0].item() == 0  # the next epoch


def test_val_split_and_document_ids(tmp_path):
    shard_dir = write_shards(tmp_path, n_vocab=20)  # tokens cycle 0..19; EOT = 7 starts each "document"
    loader = TokenLoader(shard_dir, "val", 2, 25, mode="sequential", document_ids=True)
    x, y, doc = loader.next_batch()
    assert doc.shape == x.shape and doc.dtype == torch.int32
    for row_x, row_doc in zip(x.tolist(), doc.tolist()):
        count = 0
        for token, d in zip(row_x, row_doc):
            count += token == EOT
            assert d == count
    assert int(doc.max()) >= 1


def test_bad_arguments_are_clear_errors(shard_dir, tmp_path):
    with pytest.raises(ValueError, match="mode"):
        TokenLoader(shard_dir, "train", 2, 8, mode="shuffled")
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(shard_dir, "train", 2, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TokenLoader(shard_dir, "train", 0, 8)
    with pytest.raises(ValueError, match="split 'test'"):
        TokenLoader(shard_dir, "test", 2, 8)
    with pytest.raises(ValueError, match=r"at least seq_len \+ 1 = 301 tokens"):
        TokenLoader(shard_dir, "val", 2, 300)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TokenLoader(str(tmp_path / "nowhere"), "train", 2, 8)


def test_a_shard_of_exactly_seq_len_plus_one_tokens_gives_one_window(shard_dir):
    # The error said "no shard longer than seq_len + 1 tokens", yet a shard of exactly seq_len + 1 is
    # one window (x its first seq_len tokens, y its last): the rule is right, the wording now says it.
    loader = TokenLoader(shard_dir, "val", 1, 299, mode="sequential")  # the val shard holds 300 tokens
    assert loader.windows_per_epoch == 1
    x, y = loader.next_batch()
    assert x[0].tolist() == list(range(3358, 3358 + 299)) and y[0].tolist() == list(range(3359, 3359 + 299))
    with pytest.raises(ValueError, match=r"no shard of at least seq_len \+ 1 = 301 tokens"):
        TokenLoader(shard_dir, "val", 1, 300)


def test_document_ids_must_be_a_bool(shard_dir):
    # Not checked: the string "false" (a config read as text) turned document ids on.
    for bad in ("false", 1, 0, None):
        with pytest.raises(TypeError, match="document_ids"):
            TokenLoader(shard_dir, "train", 2, 8, document_ids=bad)
    assert len(TokenLoader(shard_dir, "train", 2, 8, document_ids=False).next_batch()) == 2


def test_bools_and_non_integers_are_type_errors_naming_the_argument(shard_dir):
    # bool is an int subclass: batch_size=True made batches of one, seed=True the stream of seed 1.
    for name, bad in (("batch_size", True), ("batch_size", 2.0), ("seq_len", True), ("seq_len", "8"),
                      ("world_size", True), ("rank", False), ("rank", 0.0), ("seed", True), ("seed", 1.5)):
        with pytest.raises(TypeError, match=name):
            TokenLoader(shard_dir, "train", **{"batch_size": 2, "seq_len": 8, name: bad})
    with pytest.raises(ValueError, match="seed"):  # numpy refused it only at the first batch, naming nothing
        TokenLoader(shard_dir, "train", 2, 8, seed=-1)
    loader = TokenLoader(shard_dir, "train", 2, 8)
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict({**loader.state_dict(), "position": True})


@pytest.mark.cuda
def test_batches_on_the_gpu_equal_the_cpu_ones(shard_dir):
    cpu = TokenLoader(shard_dir, "train", 4, 32, seed=1)
    gpu = TokenLoader(shard_dir, "train", 4, 32, seed=1, device="cuda")
    for _ in range(3):
        (x, y), (gx, gy) = cpu.next_batch(), gpu.next_batch()
        assert gx.is_cuda and gy.is_cuda
        assert torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)


def test_resume_refuses_shards_that_changed_since_the_state_was_saved(tmp_path):
    # The position counts windows of the saved shards: over re-tokenized shards it names other windows.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    state = TokenLoader(write_shards(tmp_path / "a"), "train", 3, 19).state_dict()
    changed = write_shards(tmp_path / "b", train_lengths=(1000, 13, 2344))
    with pytest.raises(ValueError, match="shards"):
        TokenLoader(changed, "train", 3, 19).load_state_dict(state)
    copy = write_shards(tmp_path / "b")  # the same shards elsewhere resume
    TokenLoader(copy, "train", 3, 19).load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "shards_sha256"}  # saved before shards were checked
    TokenLoader(changed, "train", 3, 19).load_state_dict(older)


def test_resume_refuses_a_negative_saved_position(shard_dir):
    state = TokenLoader(shard_dir, "train", 3, 19).state_dict()
    loader = TokenLoader(shard_dir, "train", 3, 19)
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict({**state, "position": -3})
