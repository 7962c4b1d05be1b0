"""setup.py drives CMake, which builds the pybind11 modules llmkern._cpu and llmkern._cuda.

Environment:
  LLMKERN_CUDA_ARCHS   CUDA architectures, e.g. "80;90" (default: the GPU present, else "80;90")
  LLMKERN_SKIP_CUDA=1  do not build llmkern._cuda even when nvcc is found
  MAX_JOBS             parallel compile jobs (default: the number of cores)
  LLMKERN_BUILD_TYPE   CMake build type (default: Release)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension that CMake builds; setuptools only gets its name."""

    def __init__(self, name: str, required: bool = True):
        super().__init__(name, sources=[])
        self.required = required


def _detect_cuda_archs() -> str:
    archs = os.environ.get("LLMKERN_CUDA_ARCHS", "").strip()
    if archs:
        # "80;90", "80,90" or "80, 90": one ";" list without empty items (which llmkern._cuda would report)
        return ";".join(arch for arch in archs.replace(",", " ").replace(";", " ").split())
    try:  # the GPU present, if nvidia-smi can tell
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.split()
        caps = sorted({c.strip().replace(".", "") for c in out if c.strip()})
        if caps:
            return ";".join(caps)
    except (OSError, subprocess.SubprocessError):
        pass
    return "80;90"


def _pybind11_cmake_dir() -> str:
    import pybind11

    return pybind11.get_cmake_dir()


class CMakeBuild(build_ext):
    def build_extensions(self):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("llmkern needs CMake (>= 3.18) to build: pip install cmake")
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        # Every module lands in one folder; we then copy each to where setuptools wants it.
        out_dir = build_temp / "modules"
        skip_cuda = os.environ.get("LLMKERN_SKIP_CUDA", "0") not in ("", "0")
        cfg = os.environ.get("LLMKERN_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={_pybind11_cmake_dir()}",
            f"-DLLMKERN_OUTPUT_DIR={out_dir}",
            f"-DLLMKERN_SKIP_CUDA={'ON' if skip_cuda else 'OFF'}",
            f"-DLLMKERN_CUDA_ARCHS={_detect_cuda_archs()}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_temp), *args], check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_temp), "--parallel", jobs], check=True)

        for ext in self.extensions:
            short = ext.name.split(".")[-1]
            built = sorted(out_dir.glob(f"{short}.*.so")) + sorted(out_dir.glob(f"{short}.*.pyd"))
            dest = Path(self.get_ext_fullpath(ext.name))
            if not built:
                if ext.required:
                    raise RuntimeError(f"CMake did not build {ext.name}")
                print(f"llmkern: {ext.name} was not built (no nvcc, or LLMKERN_SKIP_CUDA=1)")
                if dest.exists():  # never leave a stale module from an earlier build
                    dest.unlink()
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built[0], dest)


setup(
    ext_modules=[CMakeExtension("llmkern._cpu"), CMakeExtension("llmkern._cuda", required=False)],
    cmdclass={"build_ext": CMakeBuild},
)
