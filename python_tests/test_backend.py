"""Backend resolution: "auto" walks the op's preference and skips what cannot run or fit."""

import pytest
import torch

from llmkern import _backend

GPU = torch.device("cuda")  # resolution only inspects the device type: no GPU is needed


def test_auto_skips_backends_whose_kernels_do_not_fit(monkeypatch):
    monkeypatch.setattr(_backend, "can_run", lambda b, op, device: True)
    monkeypatch.setitem(_backend.PREFERENCE, "attention", ("triton", "cuda"))
    assert _backend.resolve("attention", "auto", GPU) == "triton"
    assert _backend.resolve("attention", "auto", GPU, fits=lambda b: b == "cuda") == "cuda"
    assert _backend.resolve("attention", "auto", GPU, fits=lambda b: False) == "torch"


def test_auto_skips_backends_that_cannot_run(monkeypatch):
    monkeypatch.setattr(_backend, "can_run", lambda b, op, device: b == "triton")
    assert _backend.resolve("rms_norm", "auto", GPU) == "triton"


def test_explicit_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    monkeypatch.setattr(_backend, "can_run", lambda b, op, device: b == "torch")
    with pytest.raises(ValueError, match="Triton is not installed"):
        _backend.resolve("rms_norm", "triton", GPU)
    assert _backend.resolve("rms_norm", "torch", GPU) == "torch"
