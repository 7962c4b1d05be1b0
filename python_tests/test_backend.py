"""Backend resolution: "auto" walks the op's preference and skips what cannot run or fit."""

import warnings

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


def test_a_backend_that_is_not_a_string_is_a_type_error(monkeypatch):
    import llmkern

    monkeypatch.setattr(_backend, "_default_backend", None)
    with pytest.raises(TypeError, match="backend must be a str"):
        llmkern.ops.rms_norm(torch.ones(2, 4), torch.ones(4), backend=3)
    with pytest.raises(TypeError, match="backend must be a str"):
        llmkern.set_backend(3)
    with pytest.raises(ValueError, match="backend must be one of"):
        llmkern.set_backend("gpu")
    assert _backend._default_backend is None


def _module(name: str, backend):
    import llmkern.nn
    from llmkern.nn.attention import CausalSelfAttention
    from llmkern.nn.mlp import SwiGLUMLP

    if name == "attention":
        return CausalSelfAttention(8, 2, 2, backend=backend)
    if name == "swiglu":
        return SwiGLUMLP(8, 16, backend=backend)
    return getattr(llmkern.nn, name)(4, backend=backend)


@pytest.mark.parametrize("module", ["RMSNorm", "LayerNorm", "attention", "swiglu"])
def test_a_module_refuses_an_unknown_backend_when_built(module):
    """It ran on torch with a warning that the op had no 'trition' kernels, as if the name were a real one
    (the norms); attention and the MLP took it and failed at their first forward."""
    with pytest.raises(ValueError, match="backend must be one of"):
        _module(module, "trition")
    with pytest.raises(TypeError, match="backend must be a str"):
        _module(module, 3)
    assert _module(module, "torch").backend == "torch"
    assert _module(module, None).backend is None


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


def test_the_triton_36_interpreter_fix_applies_only_where_it_is_needed(monkeypatch):
    """llmkern.triton._compat mends Triton < 3.8's interpreter for NumPy >= 2.4 (Triton issue 9171). The
    suite runs a newer Triton, so here the version and NumPy's behaviour are set by hand."""
    import types

    import numpy as np
    import triton
    from triton.runtime import interpreter

    from llmkern.triton import _compat

    calls = []

    def original(tensor, scope):  # stands in for the interpreter's own attribute patching
        calls.append(tensor)

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", original)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_compat, "_interpreter_index_is_broken", lambda: True)
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    _compat.patch_interpreter()
    assert interpreter._patch_lang_tensor is original  # fixed upstream: left alone
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(_compat, "_interpreter_index_is_broken", lambda: False)
    _compat.patch_interpreter()
    assert interpreter._patch_lang_tensor is original  # a NumPy that still converts: nothing to mend
    monkeypatch.setattr(_compat, "_interpreter_index_is_broken", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _compat.patch_interpreter()
    assert interpreter._patch_lang_tensor is original  # compiled kernels never take this path

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _compat.patch_interpreter()
    patched = interpreter._patch_lang_tensor
    assert patched is not original
    _compat.patch_interpreter()
    assert interpreter._patch_lang_tensor is patched  # once, not wrapped again

    attrs = {}
    scope = types.SimpleNamespace(set_attr=lambda obj, name, fn: attrs.__setitem__(name, fn))
    patched("tensor class", scope)
    assert calls == ["tensor class"]  # the interpreter's own patching still happens
    loop_bound = types.SimpleNamespace(handle=types.SimpleNamespace(data=np.array([7], dtype=np.int32)))
    assert attrs["__index__"](loop_bound) == 7  # a 1-element array, as Triton 3.6 hands it over


def test_a_module_backend_without_kernels_falls_back_to_torch_with_one_warning(monkeypatch):
    """A model built for one backend runs an op that has no kernels there on torch, and says so once."""
    from llmkern.nn import _dispatch

    monkeypatch.setattr(_dispatch, "_chosen", {})
    monkeypatch.setattr(_backend, "can_run", lambda b, op, device: op == "rms_norm")
    assert _dispatch.op_backend("rms_norm", "triton", GPU) == "triton"
    for backend in (None, "auto", "torch"):
        assert _dispatch.op_backend("attention", backend, GPU) == backend  # the op decides
    with pytest.warns(UserWarning, match="attention has no triton kernels that run on cuda"):
        assert _dispatch.op_backend("attention", "triton", GPU) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.op_backend("attention", "triton", GPU) == "torch"  # once


def test_the_module_backend_choice_traces_under_a_fullgraph_compile(monkeypatch):
    """Inside torch.compile the choice is made without warnings.warn (Dynamo cannot trace it) and
    without an lru_cache (which Dynamo warns it ignores); the next eager call warns."""
    from llmkern.nn import _dispatch

    monkeypatch.setattr(_dispatch, "_chosen", {})

    def pick(x):
        return x + (1 if _dispatch.op_backend("attention", "cuda", x.device) == "torch" else 2)  # no GPU: torch

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither Dynamo's lru_cache warning nor ours while compiling
        assert torch.compile(pick, fullgraph=True, backend="eager")(torch.zeros(1)).item() == 1
    with pytest.warns(UserWarning, match="attention has no cuda kernels that run on cpu"):
        assert pick(torch.zeros(1)).item() == 1
    # A name that is no backend is an error, not torch with a warning that names it as if it were one
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.op_backend("attention", "trition", torch.device("cpu"))


def _triton_module(op):
    """llmkern.triton's module that holds op's kernels and launchers."""
    import importlib

    shared = {"rms_norm": "_norm", "layer_norm": "_norm", "swiglu": "gated_activation"}
    return importlib.import_module(f"llmkern.triton.{shared.get(op, op)}")


def _triton_launches(op):
    """Calls of op's Triton host launchers (forward, backward) on tensors of cuda:1 (fake ones)."""
    module = _triton_module(op)
    gpu = torch.device("cuda", 1)
    x, w = torch.empty(4, 8, device=gpu), torch.empty(8, device=gpu)
    if op in ("rms_norm", "layer_norm"):
        centered = op == "layer_norm"
        bias = w if centered else None
        return [
            lambda: module.forward(x, w, bias, x, 1e-6, torch.empty_like(x), torch.empty_like(x), centered),
            lambda: module.backward(x, x, w, None, 1e-6, torch.empty_like(x), torch.empty_like(w), bias, centered),
        ]
    if op == "rope":
        x4, table = torch.empty(2, 3, 5, 8, device=gpu), torch.empty(5, 4, device=gpu)
        return [lambda: module.forward(x4, table, table, torch.empty_like(x4))]
    if op == "fused_linear_cross_entropy":
        target, loss = torch.zeros(4, dtype=torch.int64, device=gpu), torch.empty(4, device=gpu)
        return [lambda: module.cross_entropy_rows(x, target, loss, torch.ones(1, device=gpu), -100, 0.0, True)]
    # swiglu: its own launchers, over the kernels of gated_activation (the module stubbed)
    import importlib

    swiglu = importlib.import_module("llmkern.triton.swiglu")
    return [lambda: swiglu.forward(x, x, torch.empty_like(x)),
            lambda: swiglu.backward(x, x, x, torch.empty_like(x), torch.empty_like(x))]


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm", "rope", "swiglu", "fused_linear_cross_entropy"])
def test_triton_kernels_launch_on_their_tensors_gpu(op, monkeypatch):
    """Triton launches on the current device, not on the tensors': with them on cuda:1 and cuda:0
    current, a launch outside torch.cuda.device(cuda:1) would run on the wrong GPU (an illegal address,
    or a race with the tensors' own stream). Fake tensors and stub kernels: no GPU is needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    current = [torch.device("cuda", 0)]
    launched_on = []

    class DeviceSwitch:  # stands in for torch.cuda.device, which needs a GPU
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    class Launched(Exception):
        pass

    def launch(*args, **kwargs):
        launched_on.append(current[-1])
        raise Launched  # the host code after a launch would need real tensors

    class StubKernel:
        def __getitem__(self, grid):
            return launch

    monkeypatch.setattr(torch.cuda, "device", DeviceSwitch)
    module = _triton_module(op)
    for name in [name for name in vars(module) if name.endswith("_kernel")]:
        monkeypatch.setattr(module, name, StubKernel())
    with FakeTensorMode():
        launches = _triton_launches(op)
        for call in launches:
            with pytest.raises(Launched):
                call()
    assert launched_on == [torch.device("cuda", 1)] * len(launches), launched_on


@pytest.mark.parametrize("archs,capability,runs", [
    ("80,90", (7, 5), False),  # a T4 under a module built for sm_80 and sm_90: nothing it can load
    ("80,90", (8, 0), True),
    ("80,90", (8, 6), True),
    ("80,90", (12, 0), True),  # the PTX of compute_90, compiled when loaded
    ("90", (8, 0), False),  # built on an H100, run on an A100
    ("90", (10, 0), True),
    ("80-real", (8, 6), True),  # SASS alone: that major version only
    ("80-real", (9, 0), False),
    ("90a", (9, 0), True),  # arch-specific: that GPU only
    ("90a", (10, 0), False),
    ("native", (7, 5), True),  # a CMake keyword: no way to tell, so as before
    ("80,,90", (7, 5), False),  # an empty entry, as a module built before setup.py dropped them from "80, 90" reports
    ("", (7, 5), True),  # no list at all: no way to tell
    ("100f", (10, 3), True),  # family-specific: that major version from its minor up
    ("100f", (12, 0), False),
])
def test_auto_skips_a_cuda_module_without_code_for_this_gpu(monkeypatch, archs, capability, runs):
    """"auto" takes the cuda backend only when llmkern._cuda holds code the GPU can load (compiled_archs, as
    CMake's CUDA_ARCHITECTURES); otherwise its first launch failed (cudaErrorNoKernelImageForDevice) where
    Triton would have run. backend="cuda" then says why."""
    import types

    module = types.SimpleNamespace(compiled_archs=archs, rms_norm_forward=None)
    monkeypatch.setattr(_backend, "_probed", {"cuda_module": module, "triton": True, "triton:rms_norm": True})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    gpu = torch.device("cuda", 0)
    assert _backend.can_run("cuda", "rms_norm", gpu) is runs
    assert _backend.resolve("rms_norm", "auto", gpu) == ("cuda" if runs else "triton")
    if not runs:
        with pytest.raises(ValueError, match=f"built for compute capabilities {archs}.*{capability[0]}.{capability[1]}"):
            _backend.resolve("rms_norm", "cuda", gpu)


def test_the_gpu_code_probe_traces_under_a_fullgraph_compile(monkeypatch):
    """A model's first op call may be inside a fullgraph compile: the probe of the GPU's compute
    capability runs there without a graph break (eagerly, its answer kept as a constant)."""
    monkeypatch.setattr(_backend, "_probed", {"cuda_module": _backend.cuda_module()})

    @torch.compile(fullgraph=True, backend="eager")
    def probe(x):
        return x + int(_backend.cuda_runs_on(torch.device("cuda", 0)))

    assert probe(torch.ones(())).item() == 1 + int(_backend.cuda_runs_on(torch.device("cuda", 0)))
