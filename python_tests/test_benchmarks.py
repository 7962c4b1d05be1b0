"""Every op benchmark runs on the CPU at tiny shapes (--device cpu), each of its providers that runs
here, every mode: a mistake in a benchmark shows here, not on the GPU machine, whose minutes are
few. Marked simt, so the cuda backend's providers run in the CUDA emulator (and Triton's in its
interpreter); bench_train's own CPU run is in test_train.py.

torch.compile is replaced by the function it is given: its CPU compiles take ~10 s a graph, and
what is checked here is the benchmarks' own code, not PyTorch's compiler."""

from __future__ import annotations

import csv
import importlib
import os
import shutil
import subprocess
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
    "attention window": ("bench_attention", ["--window", "5", "--seqlens", "33", "--head-dims", "64", "--hidden",
                                             "128", "--tokens", "33", "--dtype", "float16"], TIME_MODES),
    "attention softcap": ("bench_attention", ["--softcap", "2", "--seqlens", "33", "--head-dims", "64", "--hidden",
                                              "128", "--tokens", "33", "--dtype", "float16"], TIME_MODES),
    "attention softcap window": ("bench_attention", ["--softcap", "2", "--window", "5", "--seqlens", "33",
                                                     "--head-dims", "64", "--hidden", "128", "--tokens", "33",
                                                     "--dtype", "float16"], TIME_MODES),
    "fused_linear_cross_entropy": ("bench_fused_linear_cross_entropy", ["--rows", "7", "--hidden", "32", "--vocab",
                                                                        "67", "--dtype", "float16"],
                                   {"forward+backward"}),
    "adamw": ("bench_adamw", ["--models", "tiny"], None),  # its providers name their mode
    "moe": ("bench_moe", ["--shapes", "16x24x4x2", "--tokens", "33", "--dtype", "float32"], TIME_MODES),
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
    elif "--softcap" in argv:
        window = 5 if "--window" in argv else None
        expected = {(name, mode) for name in bench.capped_providers(device, 1, 33, 2.0, window)
                    if name not in GPU_ONLY for mode in modes}
    elif "--window" in argv:
        expected = {(name, mode) for name in bench.window_providers(device, 1, 33, 5) if name not in GPU_ONLY
                    for mode in modes}
    else:
        names = bench.autocast_providers(device, torch.bfloat16) if "--autocast" in argv else bench.providers(device)
        expected = {(name, mode) for name in names if name not in GPU_ONLY for mode in modes}
    assert got == expected, err
    # both kernel backends were among them (the emulator's cuda, the interpreter's triton); cuda has no soft cap;
    # the MoE layer's providers are its expert paths, not backends
    kernels = {"llmkern triton"} if "--softcap" in argv else {"llmkern cuda", "llmkern triton"}
    kernels = set() if module_name == "bench_moe" else kernels
    assert kernels <= {provider for provider, _ in got}
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


def test_bench_attention_refuses_a_soft_cap_with_documents_or_not_positive(bench_modules, capsys):
    bench = bench_modules("bench_attention")
    for extra, says in ((["--doc-len", "8"], "give --softcap or --doc-len"), (["--softcap", "0"], "finite number > 0"),
                        (["--softcap", "nan"], "finite number > 0")):
        with pytest.raises(SystemExit) as stopped:
            bench.main(["--softcap", "50", *extra, "--device", "cpu"])
        assert stopped.value.code == 2 and says in capsys.readouterr().err


def _fails(*args, **kwargs):
    raise AssertionError()  # no message, as Triton's own asserts raise


# (module, its arguments at tiny shapes, a provider that runs on the CPU, with one that fails put first)
FAILING = {
    "rms_norm": ("bench_rms_norm", ["--rows", "5", "--hidden", "33"], "torch eager"),
    "layer_norm": ("bench_layer_norm", ["--rows", "5", "--hidden", "33"], "F.layer_norm"),
    "rope": ("bench_rope", ["--shapes", "2x9x2x1x16"], "torch eager"),
    "swiglu": ("bench_swiglu", ["--shapes", "5x24"], "torch eager"),
    "attention": ("bench_attention", ["--seqlens", "33", "--head-dims", "64", "--hidden", "128", "--tokens", "33",
                                      "--causal", "true"], "eager math"),
    "fused_linear_cross_entropy": ("bench_fused_linear_cross_entropy", ["--rows", "7", "--hidden", "32", "--vocab",
                                                                        "67"], "torch eager"),
    "adamw": ("bench_adamw", ["--models", "tiny", "--modes", "step"], "torch foreach"),
    "moe": ("bench_moe", ["--shapes", "16x24x4x2", "--tokens", "33", "--dtype", "float32"], "llmkern loop"),
}


@pytest.mark.parametrize("case", list(FAILING))
def test_a_failing_provider_loses_no_other_rows(case, bench_modules, tmp_path, monkeypatch, capsys):
    module_name, argv, good = FAILING[case]
    bench = bench_modules(module_name)
    real = bench.providers
    if module_name == "bench_adamw":  # (mode, name) -> a maker of the step
        monkeypatch.setattr(bench, "providers", lambda device: {("step", "broken"): _fails, ("step", good): real(device)[
            ("step", good)]})
    else:
        monkeypatch.setattr(bench, "providers", lambda device, *args: {"broken": _fails, good: real(device, *args)[good]})
    assert bench.main(argv + ["--device", "cpu"]) == 0
    assert "skipped broken" in capsys.readouterr().err
    rows = _rows(tmp_path)
    assert rows and {r["provider"] for r in rows} == {good}
    assert all(float(r["value"]) > 0 for r in rows)


def test_bench_moe_refuses_a_provider_whose_numbers_differ(bench_modules, tmp_path, monkeypatch, capsys):
    """Each provider's output is checked against the first's before it is timed: off by 0.1%, or NaN in one row,
    it is skipped, saying so, and has no rows; the providers that agree have theirs."""
    bench = bench_modules("bench_moe")
    real = bench.providers(torch.device("cpu"))

    def scaled(moe, plain, x):
        return moe(x)[0] * 1.001

    def one_nan_row(moe, plain, x):
        return moe(x)[0].index_fill(0, torch.tensor([5]), float("nan"))

    monkeypatch.setattr(bench, "providers", lambda device: {
        "torch eager": real["torch eager"], "scaled": scaled, "one NaN row": one_nan_row,
        "llmkern loop": real["llmkern loop"]})
    assert bench.main(["--shapes", "16x24x4x2", "--tokens", "33", "--dtype", "float32", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    for name in ("scaled", "one NaN row"):
        assert f"skipped {name} at 33x16x24 E4 k2: ValueError: its output differs from torch eager's" in err, err
    assert {r["provider"] for r in _rows(tmp_path)} == {"torch eager", "llmkern loop"}


def test_bench_train_reports_a_failure_without_a_message(bench_modules, tmp_path, monkeypatch, capsys):
    bench = bench_modules("bench_train")
    common = sys.modules["common"]

    def run(provider, *args):
        if provider == "plain pytorch":
            raise AssertionError()
        return common.Result("train", "train step", "tiny", provider, 1.0, 1.0, "tokens/s")

    monkeypatch.setattr(bench, "run", run)
    assert bench.main(["--device", "cpu", "--preset", "tiny", "--providers", "plain pytorch,llmkern cuda"]) == 0
    assert "plain pytorch: failed: AssertionError" in capsys.readouterr().err
    assert [r["provider"] for r in _rows(tmp_path)] == ["llmkern torch"]


@pytest.fixture
def fake_liger(tmp_path, monkeypatch):
    """fake_liger({module: source}): a liger_kernel package of these modules, importable until the test
    ends, in place of a Liger this machine may have (imported already, or not)."""
    site = tmp_path / "site"
    for name in [m for m in sys.modules if m.split(".")[0] == "liger_kernel"]:
        monkeypatch.delitem(sys.modules, name)  # put back after the test

    def make(modules: dict[str, str]):
        for name, source in {"liger_kernel": "", "liger_kernel.ops": "", **modules}.items():
            path = site.joinpath(*name.split("."))
            path.mkdir(parents=True, exist_ok=True)
            (path / "__init__.py").write_text(source)
        monkeypatch.syspath_prepend(str(site))

    yield make
    for name in [m for m in sys.modules if m.split(".")[0] == "liger_kernel"]:
        del sys.modules[name]


def test_a_kernel_library_that_fails_to_import_is_skipped(bench_modules, fake_liger, tmp_path, capsys):
    fake_liger({"liger_kernel.ops.rms_norm": "raise AttributeError('built for another Triton')"})
    bench = bench_modules("bench_rms_norm")
    assert bench.main(["--rows", "5", "--hidden", "33", "--device", "cpu", "--providers", "torch eager"]) == 0
    assert "skipped liger_kernel.ops.rms_norm.LigerRMSNormFunction: AttributeError: built for another Triton" \
        in capsys.readouterr().err
    assert {r["provider"] for r in _rows(tmp_path)} == {"torch eager"}


LIGER_TUPLE_LOSS = """
import torch.nn.functional as F


class LigerFusedLinearCrossEntropyFunction:  # as Liger's later versions: (loss, z_loss, token_accuracy)
    @staticmethod
    def apply(x, w, target):
        return F.cross_entropy((x @ w.T).float(), target), None, None
"""


def test_liger_cross_entropy_returning_a_tuple_is_measured(bench_modules, fake_liger, tmp_path):
    fake_liger({"liger_kernel.ops.fused_linear_cross_entropy": LIGER_TUPLE_LOSS})
    bench = bench_modules("bench_fused_linear_cross_entropy")
    assert bench.main(["--rows", "7", "--hidden", "32", "--vocab", "67", "--device", "cpu", "--providers",
                       "torch eager", "liger"]) == 0
    rows = _rows(tmp_path)
    assert {r["provider"] for r in rows} == {"torch eager", "liger"}
    assert all(float(r["value"]) > 0 for r in rows)


def test_a_run_cut_short_keeps_every_provider_of_the_shapes_done(bench_modules, tmp_path, monkeypatch):
    """timeout's SIGTERM (a SystemExit in the benchmark) after two measurements: both providers of the
    first shape are saved, a comparison, rather than one provider at two shapes."""
    bench = bench_modules("bench_swiglu")
    measured = []

    def time_modes(run, grad_out, grad_to_none):
        if len(measured) == 2:
            raise SystemExit(124)
        measured.append(run())
        return {"forward": 1.0}

    monkeypatch.setattr(bench, "time_modes", time_modes)
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "5x24", "7x24", "--device", "cpu", "--providers", "torch eager", "F.silu * up"])
    assert {(r["shape"], r["provider"]) for r in _rows(tmp_path)} == {("5x24", "torch eager"), ("5x24", "F.silu * up")}


def test_gpu_check_part_ends_within_its_seconds(tmp_path):
    """A part called alone keeps to GPU_CHECK_SECONDS, as `all SECONDS` does: a device call's limit must
    never kill it mid-step. 30 s, less the seconds kept for packing, leave no step time to start. A copy
    of the script runs, in a folder of its own: its logs must not replace those of a run in progress."""
    script = tmp_path / "scripts" / "gpu_check.sh"
    script.parent.mkdir()
    shutil.copy(BENCHMARKS.parent / "scripts" / "gpu_check.sh", script)
    env = {**os.environ, "GPU_CHECK_SECONDS": "30", "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(script), "bench"], env=env, capture_output=True, text=True, timeout=300)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert done.returncode == 0 and "bench_rms_norm: skipped, no time left" in summary, done.stdout + done.stderr
    assert "rc=" not in summary


LIGER_ROPE = """
class LigerRopeFunction:  # records the tables it is given
    tables = []

    @staticmethod
    def apply(q, k, cos, sin):
        LigerRopeFunction.tables.append((cos, sin))
        return q, k
"""


def test_liger_rope_tables_are_made_once_not_in_each_timed_call(bench_modules, fake_liger):
    fake_liger({"liger_kernel.ops.rope": LIGER_ROPE})
    bench = bench_modules("bench_rope")
    liger = bench.providers(torch.device("cpu"))["liger"]
    qkv = torch.randn(2, 9, 4, 16)
    theta = torch.rand(9, 8)
    cos, sin = theta.cos(), theta.sin()
    for _ in range(3):
        liger(qkv, 2, 1, cos, sin)
    tables = sys.modules["liger_kernel.ops.rope"].LigerRopeFunction.tables
    assert len(tables) == 3 and all(t[0] is tables[0][0] and t[1] is tables[0][1] for t in tables)
    torch.testing.assert_close(tables[0][0], torch.cat([cos, cos], dim=-1)[None], rtol=0, atol=0)
    torch.testing.assert_close(tables[0][1], torch.cat([sin, sin], dim=-1)[None], rtol=0, atol=0)


def test_results_name_their_commit_on_a_machine_without_git(bench_modules, monkeypatch):
    # The GPU machine gets the working tree without .git; the device command passes the commit.
    common = bench_modules("common")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("git")))
    monkeypatch.delenv("LLMKERN_COMMIT", raising=False)
    assert common.git_commit() == "unknown"
    monkeypatch.setenv("LLMKERN_COMMIT", "abc1234-dirty")
    assert common.environment()["commit"] == "abc1234-dirty"
