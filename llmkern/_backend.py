"""Which backends exist here, and which one an op call uses.

Backends: "cuda" (llmkern._cuda, the pybind11 kernels), "triton" (llmkern/triton), "torch"
(the plain-PyTorch reference in llmkern/ops/reference.py) and "auto", which picks the fastest
one that can run on the tensors given (the order per op is in PREFERENCE).

On CPU tensors "auto" means "torch": Triton runs on a CPU only in its interpreter
(TRITON_INTERPRET=1), which is for tests, not for work. Ask for backend="triton" to use it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")

# The GPU backends tried by "auto", fastest first (from benchmarks/results).
PREFERENCE: dict[str, tuple[str, ...]] = {
    "rms_norm": ("cuda", "triton"),
    "layer_norm": ("cuda", "triton"),  # the same kernels as rms_norm's, centered
    # Triton first until the CUDA attention kernels are verified on a GPU (they only compile here).
    "attention": ("triton", "cuda"),
    # Triton (checked in the interpreter) first until the CUDA AdamW is verified on a GPU.
    "adamw": ("triton", "cuda"),
    # The matmuls are cuBLAS's either way; the row kernels (Triton, CUDA) are unmeasured: Triton first.
    "fused_linear_cross_entropy": ("triton", "cuda"),
    # Triton first: the CUDA RoPE and SwiGLU/GeGLU kernels (csrc/cuda/rope.cu, gated_activation.cu) compile
    # but have never run on a GPU; a GPU session that verifies and benchmarks them decides the order.
    "rope": ("triton", "cuda"),
    "swiglu": ("triton", "cuda"),
    "geglu": ("triton", "cuda"),  # SwiGLU's kernels with another activation: the same order
}
DEFAULT_PREFERENCE = ("cuda", "triton")

_default_backend: str | None = None


def _validate(name: object, what: str = "backend") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, one of {BACKENDS}; got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the default backend of every op (overrides the LLMKERN_BACKEND variable)."""
    global _default_backend
    _default_backend = _validate(name)


def get_backend() -> str:
    """The default backend: set_backend(), else $LLMKERN_BACKEND, else "auto"."""
    if _default_backend is not None:
        return _default_backend
    # empty means unset, as a shell's `LLMKERN_BACKEND= command` intends
    return _validate(os.environ.get("LLMKERN_BACKEND") or "auto", "LLMKERN_BACKEND")


# Answers that cannot change within a process, memoized in plain dicts (torch.compile traces
# through dict lookups; it would warn about, and re-trace, functools caches).
_probed: dict[str, object] = {}


def _memo(key: str, probe):
    if key not in _probed:
        _probed[key] = probe()
    return _probed[key]


def _import_cuda_module():
    try:
        return importlib.import_module("llmkern._cuda")
    except ImportError:
        return None


def cuda_module():
    """llmkern._cuda, or None when it was not built (no nvcc, or LLMKERN_SKIP_CUDA=1)."""
    return _memo("cuda_module", _import_cuda_module)


# Imported now, with llmkern, outside any torch.compile: Dynamo cannot trace importlib.import_module
# (torch 2.11 to 2.13), and a process's first op call may well be inside a fullgraph compile.
cuda_module()


def cuda_has(op: str) -> bool:
    """True when llmkern._cuda was built with kernels for `op`."""

    def probe():
        mod = cuda_module()
        # vars(), not dir(): torch.compile may be tracing this, and Dynamo traces vars() of a
        # module on torch 2.11 and 2.13 alike, but refuses dir() on 2.11.
        return mod is not None and any(name.startswith(op) for name in vars(mod))

    return _memo(f"cuda:{op}", probe)


def kernels(op: str, backend: str):
    """llmkern.cuda.<op> or llmkern.triton.<op>, the launchers of op's kernels: imported on first use
    (Triton's import takes seconds, and a process on the torch backend never needs it), then looked up
    here, not imported again on every call."""
    if backend not in ("cuda", "triton"):
        raise ValueError(f"llmkern::{op} runs the cuda or triton backend, got {backend!r}")
    return _memo(f"kernels:{backend}.{op}", lambda: importlib.import_module(f"llmkern.{backend}.{op}"))


def _arch_runs_on(arch: str, capability: int) -> bool:
    """Whether code built for one of CMake's CUDA architectures ("80", "80-real", "90-virtual", "90a", "100f")
    loads on a GPU of compute capability `capability` (major * 10 + minor). A plain or -virtual arch carries PTX,
    which the driver compiles for any GPU at least that new; -real is SASS alone, which runs on that major
    version from its minor up, as does a family-specific one ("100f"); an arch-specific one ("90a") runs on
    that GPU only."""
    name, _, kind = arch.strip().partition("-")
    digits = name.rstrip("af")
    if not digits.isdigit():
        return True  # a keyword ("native", "all"): nothing to tell from it, so assume it does
    built = int(digits)
    if name.endswith("a"):
        return capability == built
    if kind == "real" or name.endswith("f"):
        return capability // 10 == built // 10 and capability >= built
    return capability >= built


def _capability(device: torch.device) -> int:
    """The GPU's compute capability as major * 10 + minor."""
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@torch.compiler.assume_constant_result
def _cuda_module_runs_on(device: torch.device) -> bool:
    """cuda_runs_on's answer, which cannot change within a process. torch.compile may be tracing the
    caller: Dynamo runs this eagerly and keeps the answer (as for _module_exists)."""
    if not torch.cuda.is_available():
        return True  # no GPU to ask (a resolution checked on a CPU machine): a launch would say
    # without the empty entries of a list given as "80, 90" (setup.py makes it "80;;90", which CMake reads as
    # 80 and 90): an empty one, like a keyword, would say that any GPU runs the module
    archs = [arch for arch in str(getattr(cuda_module(), "compiled_archs", "")).split(",") if arch.strip()]
    if not archs:
        return True  # no list to tell from
    capability = _capability(device)
    return any(_arch_runs_on(arch, capability) for arch in archs)


def cuda_runs_on(device: torch.device) -> bool:
    """Whether llmkern._cuda holds code the GPU `device` can load: its compiled_archs (CMake's list, as
    built) include one for it. A module built for sm_90 alone fails every launch on an A100 or a T4
    (cudaErrorNoKernelImageForDevice), where "auto" should take Triton instead."""
    return _memo(f"cuda_arch:{device.index}", lambda: _cuda_module_runs_on(device))


def cuda_emulated() -> bool:
    """True when llmkern._cuda is the tests' CPU emulator of the kernels (python_tests/simt): its
    kernels then run on CPU tensors, as Triton's do under TRITON_INTERPRET=1."""
    mod = cuda_module()
    return mod is not None and getattr(mod, "compiled_archs", None) == "simt"


@torch.compiler.assume_constant_result
def _module_exists(name: str) -> bool:
    """Whether module `name` can be imported. torch.compile may be tracing the caller: Dynamo runs
    this eagerly and keeps the answer (which cannot change within a process); torch 2.11's Dynamo
    refuses to trace importlib.util.find_spec itself."""
    return importlib.util.find_spec(name) is not None


def triton_available() -> bool:
    return _memo("triton", lambda: _module_exists("triton"))


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_has(op: str) -> bool:
    return _memo(
        f"triton:{op}",
        lambda: triton_available() and _module_exists(f"llmkern.triton.{op}"),
    )


def can_run(backend: str, op: str, device: torch.device) -> bool:
    """Whether `backend` has `op` and can run it on tensors on `device`."""
    if backend == "torch":
        return True
    if backend == "cuda":
        if device.type == "cpu":
            return cuda_has(op) and cuda_emulated()
        return cuda_has(op) and device.type == "cuda" and cuda_runs_on(device)
    if backend == "triton":
        on_gpu = device.type == "cuda"
        return triton_has(op) and (on_gpu or (device.type == "cpu" and triton_interpreted()))
    return False


def _why_not(backend: str, op: str, device: torch.device) -> str:
    if backend == "cuda":
        if device.type != "cuda":
            return f"the tensors are on {device}, and the cuda backend needs them on a GPU"
        if cuda_module() is None:
            return "llmkern._cuda was not built (no nvcc at install time, or LLMKERN_SKIP_CUDA=1)"
        if not cuda_runs_on(device):
            major, minor = divmod(_capability(device), 10)
            return (f"llmkern._cuda was built for compute capabilities {cuda_module().compiled_archs}, and this "
                    f"GPU ({device}) is {major}.{minor}: reinstall with LLMKERN_CUDA_ARCHS={major}{minor}")
        return f"llmkern._cuda has no kernels for {op}"
    if not triton_available():
        return "Triton is not installed"
    if not triton_has(op):
        return f"llmkern.triton has no kernels for {op}"
    return f"the tensors are on {device}; Triton runs on a GPU, or on a CPU with TRITON_INTERPRET=1"


def resolve(op: str, backend: str | None, device: torch.device, fits=None) -> str:
    """The concrete backend ("cuda" | "triton" | "torch") that runs `op` on `device`.

    `fits(backend) -> bool`, when given, says whether a backend's kernels cover these
    particular arguments (a head dim, a dtype): "auto" skips the ones that don't; an explicit
    backend is returned as is, and the op's own checks explain what does not fit.
    """
    backend = get_backend() if backend is None else _validate(backend)
    if backend == "auto":
        if device.type == "cuda":
            for candidate in PREFERENCE.get(op, DEFAULT_PREFERENCE):
                if can_run(candidate, op, device) and (fits is None or fits(candidate)):
                    return candidate
        return "torch"
    if not can_run(backend, op, device):
        raise ValueError(f"backend={backend!r} cannot run {op}: {_why_not(backend, op, device)}")
    return backend


def available_backends(op: str, device: torch.device) -> list[str]:
    return [b for b in ("cuda", "triton", "torch") if can_run(b, op, device)]
