"""scripts/sanitize_kernels.py, the driver that compute-sanitizer runs on a GPU, dry-run here on the
CUDA emulator: a GPU session must not lose its few minutes to a broken script."""

import importlib.util
from pathlib import Path

import pytest
import torch

import llmkern

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sanitize_kernels.py"


def _load():
    spec = importlib.util.spec_from_file_location("sanitize_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.simt
def test_every_kernel_matches_its_reference(capsys):
    driver = _load()
    assert driver.main(["--device", "cpu", "--backend", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "0 cases wrong" in out
    for op in driver.OPS:  # every op ran, not only the first
        assert f"-- {op}:" in out


@pytest.mark.simt
def test_a_wrong_kernel_is_reported(capsys, monkeypatch):
    driver = _load()
    right = llmkern.ops.swiglu
    monkeypatch.setattr(llmkern.ops, "swiglu", lambda gate, up, backend=None: right(gate, up, backend) * 1.1)
    assert driver.main(["--device", "cpu", "--backend", "cuda", "--ops", "swiglu"]) == 1
    assert "FAIL swiglu 3x17 torch.float32:" in capsys.readouterr().out


def test_it_refuses_a_missing_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert _load().main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_an_op_that_raises_is_reported_and_the_others_still_run(capsys, monkeypatch):
    driver = _load()

    def raises(backend, device):
        raise RuntimeError("attention_forward failed: cudaErrorIllegalAddress")

    monkeypatch.setitem(driver.OPS, "attention", raises)
    assert driver.main(["--device", "cpu", "--backend", "triton", "--ops", "attention", "rope"]) == 1
    out = capsys.readouterr().out
    assert "FAIL attention: RuntimeError: attention_forward failed: cudaErrorIllegalAddress" in out
    assert "-- rope:" in out and "ok   rope 2x3x37x64 strided torch.float32 dx" in out
    assert "1 cases wrong: attention raised RuntimeError" in out
