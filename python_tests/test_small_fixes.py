"""Small fixes that have no better home: each test names the bug it guards against."""

import pytest
import torch

from llmkern.train.distributed import DistInfo, pick_device


@pytest.mark.parametrize("rank", [0, 1])
def test_a_gpu_index_under_torchrun_is_refused(monkeypatch, rank):
    """pick_device("cuda:N") under torchrun put every rank on GPU N, with no error; LOCAL_RANK picks each one's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    two_ranks = DistInfo(rank=rank, local_rank=rank, world_size=2)
    for requested in ("cuda:0", "cuda:1"):
        with pytest.raises(ValueError, match=rf"device={requested!r} .* LOCAL_RANK picks .* device='cuda'"):
            pick_device(requested, two_ranks)
    assert pick_device("cuda", two_ranks) == torch.device("cuda", rank)
    assert pick_device("auto", two_ranks) == torch.device("cuda", rank)
    assert pick_device("cpu", two_ranks) == torch.device("cpu")
    assert pick_device("cuda:1", DistInfo()) == torch.device("cuda", 1)  # one process: the GPU it names


def test_a_rank_shown_one_gpu_may_name_it(monkeypatch):
    """A launcher that shows each rank its own GPU (CUDA_VISIBLE_DEVICES per rank: every rank sees one, cuda:0)
    leaves "cuda" past it for LOCAL_RANK 1; its "cuda:0", refused since GPU indices were, was the only way left."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    second_rank = DistInfo(rank=1, local_rank=1, world_size=2)
    assert pick_device("cuda:0", second_rank) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="LOCAL_RANK=1"):
        pick_device("cuda", second_rank)


def test_a_sharded_base_given_by_its_index_is_fingerprinted_by_every_shard(tmp_path):
    """base_fingerprint hashed the index.json alone (names only), while every shard is loaded: another model of
    the same layout (a fine-tune of the same base) resumed as the same base."""
    import json

    from safetensors.torch import save_file

    from llmkern.finetune.base import base_fingerprint

    def write_shards(second_seed):
        gens = {i: torch.Generator().manual_seed(seed) for i, seed in ((1, 0), (2, second_seed))}
        shards = {f"model-0000{i}-of-00002.safetensors": {f"w{i}": torch.randn(4, 4, generator=gen)}
                  for i, gen in gens.items()}
        for name, part in shards.items():
            save_file(part, str(tmp_path / name))
        weight_map = {k: name for name, part in shards.items() for k in part}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    config, index = {"n_layer": 1}, str(tmp_path / "model.safetensors.index.json")
    write_shards(second_seed=1)
    first = base_fingerprint(index, config)
    assert base_fingerprint(index, config) == first
    # other weights (in the second shard): the index.json the same, byte for byte
    write_shards(second_seed=2)
    assert base_fingerprint(index, config) != first
