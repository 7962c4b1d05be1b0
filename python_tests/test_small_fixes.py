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
