"""Every op benchmark runs on the CPU at tiny shapes (--device cpu), each of its providers that runs
here, every mode: a mistake in a benchmark shows here, not on the GPU machine, whose minutes are
few. Marked simt, so the cuda backend's providers run in the CUDA emulator (and Triton's in its
interpreter); bench_train's own CPU run is in test_train.py.

torch.compile is replaced by the function it is given: its CPU compiles take ~10 s a graph, and
what is checked here is the benchmarks' own code, not PyTorch's compiler."""

from __future__ import annotations

import csv
import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TIME_MODES = {"forward", "backward", "forward+backward"}

# (module, its arguments at tiny shapes, the modes each provider has rows for); fp16 where Triton's
# interpreter runs a matmul (it computes tl.dot on bf16 operands wrongly).
CASES = {
    "rms_norm": ("bench_rms_norm", ["--rows", "5", "--hidden", "33", "--dtype", "float16"], TIME_MODES),
    "rms_norm autocast": ("bench_rms_norm", ["--autocast", "--rows", "5", "--hidden", "33"], TIME_MODES),
    "layer_norm": ("bench_layer_norm", ["--rows", "5", "--hidden", "33", "--dtype", "float32"], TIME_MODES),
    "layer_norm autocast": ("bench_layer_norm", ["--autocast", "--rows", "5", "--hidden", "33"], TIME_MODES),
    "rope": ("bench_rope", ["--shapes", "2x9x2x1x16"], TIME_MODES),
    "swiglu": ("bench_swiglu", ["--shapes", "5x24"], TIME_MODES),
    "attention": ("bench_attention", ["--seqlens", "33", "--head-dims", "64", "--hidden", "128", "--tokens", "33",
                                      "--causal", "true", "--dtype", "float16"], TIME_MODES),
    "attention documents": ("bench_attention", ["--doc-len", "8", "--seqlens", "33", "--head-dims", "64", "--hidden",
                                                "128", "--tokens", "33", "--dtype", "float16"], TIME_MODES),
    "fused_linear_cross_entropy": ("bench_fused_linear_cross_entropy", ["--rows", "7", "--hidden", "32", "--vocab",
                                                                        "67", "--dtype", "float16"],
                                   {"forward+backward"}),
    "adamw": ("bench_adamw", ["--models", "tiny"], None),  # its providers name their mode
}
# providers with no CPU implementation (FlexAttention has a CPU forward but no backward; its forward
# is checked against the reference in test_attention.py)
GPU_ONLY = {"SDPA cuDNN", "FlexAttention"}


@pytest.fixture
def bench_modules(monkeypatch, tmp_path):
    """import_bench(name): benchmarks/<name>.py imported afresh, writing its results under tmp_path."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn)
    for name in [m for m in sys.modules if m == "common" or m.startswith("bench_")]:
        monkeypatch.delitem(sys.modules, name)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(common, "_measured_device", common._measured_device)  # bench_device sets it

    def import_bench(name):
        return importlib.import_module(name)

    return import_bench


def _rows(directory: Path) -> list[dict]:
    with open(directory / "cpu.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.simt
@pytest.mark.parametrize("case", list(CASES))
def test_benchmark_runs_every_provider_on_the_cpu(case, bench_modules, tmp_path, capsys):
    module_name, argv, modes = CASES[case]
    bench = bench_modules(module_name)
    assert bench.main(argv + ["--device", "cpu"]) == 0
    err = capsys.readouterr().err
    rows = _rows(tmp_path)
    assert rows and all(r["gpu"] == "cpu" for r in rows)  # a CPU run never lands in a GPU's results
    assert (tmp_path / f"cpu_{rows[0]['bench']}.png").is_file()
    got = {(r["provider"], r["mode"]) for r in rows}
    device = torch.device("cpu")
    if module_name == "bench_adamw":
        expected = {(name, mode) for mode, name in bench.providers(device)} | {("torch copy", "copy")}
    elif "--doc-len" in argv:
        doc_ids = bench.packed_doc_ids(1, 33, 8, device)
        expected = {(name, mode) for name in bench.document_providers(device, doc_ids) if name not in GPU_ONLY
                    for mode in modes}
    else:
        names = bench.autocast_providers(device, torch.bfloat16) if "--autocast" in argv else bench.providers(device)
        expected = {(name, mode) for name in names if name not in GPU_ONLY for mode in modes}
    assert got == expected, err
    # both kernel backends were among them (the emulator's cuda, the interpreter's triton)
    assert {"llmkern cuda", "llmkern triton"} <= {provider for provider, _ in got}
    assert all(float(r["ms"]) > 0 and float(r["value"]) > 0 for r in rows)


def test_a_benchmark_refuses_a_device_that_cannot_run_it(bench_modules, capsys):
    bench = bench_modules("bench_swiglu")
    assert bench.main(["--device", "meta"]) == 1
    assert "--device must be a CUDA device or cpu" in capsys.readouterr().err
    assert bench.main(["--device", "tpu"]) == 1
    assert "is not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 1
        assert "needs a CUDA GPU" in capsys.readouterr().err
