"""What `llmkern info` prints: versions, the CUDA build, the GPUs, and each op's backends."""

from __future__ import annotations

import platform

import torch

from . import __version__, _backend

# Every public op, in the order `llmkern info` lists them.
OPS = ("rms_norm", "layer_norm", "rope", "swiglu", "geglu", "attention", "adamw", "fused_linear_cross_entropy")


def collect() -> dict:
    info: dict = {
        "llmkern": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    mod = _backend.cuda_module()
    info["cuda_module_built"] = mod is not None
    if mod is not None:
        info["cuda_module_archs"] = mod.compiled_archs
        info["cuda_module_runtime"] = mod.cuda_runtime_version
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    info["gpus"] = gpus
    info["triton_interpreter"] = _backend.triton_interpreted()
    device = torch.device("cuda") if gpus else torch.device("cpu")
    info["device"] = str(device)
    info["default_backend"] = _backend.get_backend()
    info["ops"] = {
        op: {
            "available": _backend.available_backends(op, device),
            "auto": _backend.resolve(op, "auto", device),
        }
        for op in OPS
    }
    return info


def print_info() -> None:
    info = collect()
    width = max(22, max(len(op) for op in info["ops"]) + 3)
    for key, value in info.items():
        if key == "ops":
            continue
        if isinstance(value, list):
            value = ", ".join(value) if value else "none"
        print(f"{key:<{width}} {value}")
    print(f"backends on {info['device']} (auto picks the first that runs):")
    for op, row in info["ops"].items():
        print(f"  {op:<{width - 2}} available: {', '.join(row['available'])}; auto -> {row['auto']}")
