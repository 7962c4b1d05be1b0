"""The build: llmkern._cpu always, llmkern._cuda wherever nvcc was found, and `llmkern info`."""

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkern import _backend


def test_cpu_module_imports():
    importlib.import_module("llmkern._cpu")


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("LLMKERN_SKIP_CUDA", "0") not in ("", "0"),
                    reason="no nvcc here, or LLMKERN_SKIP_CUDA is set: _cuda is not built")
def test_cuda_module_is_built_where_nvcc_is():
    mod = _backend.cuda_module()
    assert mod is not None, "nvcc is here but llmkern._cuda did not build or import"
    assert mod.compiled_archs
    assert mod.device_count() == torch.cuda.device_count()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_kernel_call_without_gpu_raises_clear_error():
    mod = _backend.cuda_module()
    if mod is None:
        pytest.skip("llmkern._cuda is not built here")
    fake = 1 << 20  # any non-null address: the launch must fail before touching it
    with pytest.raises(RuntimeError, match="no CUDA device"):
        mod.rms_norm_forward(fake, 0, fake, fake, 0, 4, 8, 8, 0, 8, 0, 1e-6, 0, 0, 0, 0, 0)


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "llmkern", "info"], capture_output=True, text=True, check=True)
    assert "torch" in out.stdout and "rms_norm" in out.stdout
    assert "cuda_module_built" in out.stdout
    # the list: versions, the architectures _cuda was built for, the GPUs seen, each op's backends
    fields = dict(line.split(None, 1) for line in out.stdout.splitlines() if line and not line[0].isspace()
                  and len(line.split(None, 1)) == 2)
    assert fields["torch"] == torch.__version__ and "triton" in fields and "python" in fields
    mod = _backend.cuda_module()
    if mod is not None:
        assert fields["cuda_module_archs"] == mod.compiled_archs
    assert torch.cuda.is_available() == (fields["gpus"] != "none")
    for op in ("rms_norm", "attention", "adamw"):
        assert any(line.split()[:2] == [op, "available:"] for line in out.stdout.splitlines()), op


def test_info_command_with_a_bad_backend_variable_is_a_clear_error(monkeypatch, capsys):
    from llmkern.cli import main

    monkeypatch.setenv("LLMKERN_BACKEND", "bogus")
    assert main(["info"]) == 2
    assert "llmkern info: error: LLMKERN_BACKEND must be one of" in capsys.readouterr().err


def test_bench_command_lists_and_runs_the_benchmarks(capsys):
    from llmkern.cli import main

    assert main(["bench"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("rms_norm", "attention", "adamw", "train"))
    assert main(["bench", "no_such_op"]) == 2
    assert "no benchmark 'no_such_op'" in capsys.readouterr().err
    if not torch.cuda.is_available():  # the GPU benchmarks say so and fail, never pretend
        assert main(["bench", "rms_norm", "--rows", "8", "--hidden", "8"]) != 0
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_kernel_modules_neither_include_nor_link_pytorch():
    """DESIGN.md: csrc/ has no PyTorch header, CMake does not look for Torch, and the built modules need
    no PyTorch library (one build works with any PyTorch version)."""
    root = Path(__file__).resolve().parents[1]
    sources = [p for p in (root / "csrc").rglob("*") if p.suffix in (".h", ".cuh", ".cu", ".cpp")]
    assert sources
    for path in sources:
        assert not re.search(r'#\s*include\s*[<"](torch|ATen|c10)/', path.read_text()), path
    assert not re.search(r"find_package\s*\(\s*Torch", (root / "CMakeLists.txt").read_text())
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("no readelf here to list the modules' libraries")
    for name in ("llmkern._cpu", "llmkern._cuda"):
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        dynamic = subprocess.run([readelf, "-d", spec.origin], capture_output=True, text=True, check=True).stdout
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
        assert needed and not [lib for lib in needed if re.match(r"lib(torch|c10|shm)", lib)], (name, needed)
