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


def test_the_cuda_module_is_probed_when_llmkern_is_imported():
    """Not at the first op call, which may be inside torch.compile(fullgraph=True): Dynamo cannot trace
    the import of llmkern._cuda."""
    import subprocess
    import sys

    probe = "import llmkern; from llmkern import _backend; print('cuda_module' in _backend._probed)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


def test_backend_probes_trace_under_a_fullgraph_compile(monkeypatch):
    """The probes that are still computed lazily (what the cuda module and Triton hold) run inside a
    compiled function without a graph break (torch 2.11 refused dir() and importlib.util.find_spec)."""
    import torch

    from llmkern import _backend

    monkeypatch.setattr(_backend, "_probed", {"cuda_module": _backend.cuda_module()})

    @torch.compile(fullgraph=True, backend="eager")
    def probe(x):
        return x + int(_backend.cuda_has("rms_norm")) + int(_backend.triton_has("rms_norm"))

    expected = 1 + int(_backend.cuda_module() is not None) + 1
    assert probe(torch.ones(())).item() == expected
