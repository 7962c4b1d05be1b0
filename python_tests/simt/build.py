"""Build llmkern's CUDA kernels for the CPU emulator (simt.h) into a module with `_cuda`'s API.

The sources are the ones CMakeLists.txt gives `_cuda` (kernels and bindings), copied with two
rewrites the host compiler needs: `kernel<<<grid, block, smem, stream>>>(args)` becomes a
`simt::Launch`, and an `extern __shared__` array becomes the launch's dynamic shared memory.
csrc/cuda/attention_ptx.cuh (the only inline assembly) is replaced by the emulator's model of the
same instructions. Builds are cached under build/simt/<hash of everything that goes in>.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SIMT_DIR = Path(__file__).resolve().parent
REPO = SIMT_DIR.parents[1]
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off",
         "-Wno-unknown-pragmas", "-Wno-attributes", '-DLLMKERN_CUDA_ARCHS="simt"']

# LLMKERN_SIMT_ASAN=1: also AddressSanitizer, for out-of-bounds global accesses (run Python with
# LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0; scripts/simt_memcheck.sh).
if os.environ.get("LLMKERN_SIMT_ASAN") == "1":  # + misaligned plain accesses (a Pack16 load, say)
    FLAGS += ["-fsanitize=address,alignment", "-fno-sanitize-recover=alignment", "-fno-omit-frame-pointer"]

# `name<<<config>>>(` at a statement's start (after an optional case label); one line each in csrc.
LAUNCH = re.compile(r"^(\s*(?:case\s+\w+:\s*|default:\s*)?)(\S.*?)<<<(.+?)>>>\(", re.MULTILINE)
EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\[\];")
# A static `__shared__ T name[N];` (one block's array: a function-local static, see simt.h), poisoned
# when the first thread of each block reaches it.
STATIC_SHARED = re.compile(r"__shared__\s+((?:__align__\(\d+\)\s+)?)([\w: ]+?)\s+(\w+)((?:\[[^\]]+\])*);")


class Unavailable(RuntimeError):
    """The emulator cannot be built here (no CUDA headers, no C++ compiler, no pybind11)."""


def cuda_include_dir() -> Path:
    """The CUDA headers: nvcc's own, else $CUDA_HOME's, else the copy Triton ships."""
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        match = re.search(r'INCLUDES="-I([^"]+?)"', out)
        if match and (Path(match.group(1)) / "cuda_runtime.h").exists():
            return Path(match.group(1))
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"]
    triton = importlib.util.find_spec("triton")
    if triton and triton.origin:
        candidates.append(Path(triton.origin).parent / "backends" / "nvidia" / "include")
    for path in candidates:
        if (path / "cuda_runtime.h").exists() and (path / "cuda_bf16.h").exists():
            return path
    raise Unavailable("no CUDA headers (nvcc, $CUDA_HOME or Triton's copy)")


def cmake_list(name: str) -> list[str]:
    text = (REPO / "CMakeLists.txt").read_text()
    match = re.search(rf"set\({name}\s+(.*?)\)", text, re.DOTALL)
    if not match:
        raise RuntimeError(f"CMakeLists.txt has no {name}")
    return match.group(1).split()


# `__launch_bounds__(N)` of a kernel: the GPU refuses a launch of more than N threads a block.
LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\(([^()]*)\)")


def _check_launch_bounds(text: str) -> str:
    """Each kernel's bound becomes a check at the top of its body (the first `{` after it)."""
    out, pos = [], 0
    for m in LAUNCH_BOUNDS.finditer(text):
        body = text.index("{", m.end())
        max_threads = m.group(1).split(",")[0].strip()
        out += [text[pos:m.start()], text[m.end():body + 1], f" ::simt::require_launch_bounds({max_threads});"]
        pos = body + 1
    return "".join(out) + text[pos:]


def rewrite(text: str) -> str:
    def launch(m: re.Match) -> str:
        kernel = m.group(2).strip()
        return f'{m.group(1)}(::simt::Launch("{kernel}", {m.group(3)}) | {kernel})('

    text = LAUNCH.sub(launch, text)
    text = _check_launch_bounds(text)
    text = EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::simt::dynamic_shared());", text)
    text = STATIC_SHARED.sub(r"\1static \2 \3\4; ::simt::poison_shared_once(&\3, sizeof(\3));", text)
    # Anything left would compile (simt.h makes the keyword `static`) as an array that is never
    # poisoned and keeps an earlier block's values: refuse it instead.
    for line_number, line in enumerate(_without_comments(text).splitlines(), 1):
        if "__shared__" in line or "<<<" in line:
            raise ValueError(f"simt cannot rewrite line {line_number}: {line.strip()!r} (one shared array "
                             f"per declaration, one launch per line)")
    return text


def _without_comments(text: str) -> str:
    """text with its comments blanked, lines kept where they were."""
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", "", text)


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise Unavailable("no C++ compiler")
    return cxx


def _inputs() -> list[Path]:
    files = sorted(p for p in (REPO / "csrc").rglob("*") if p.is_file())
    return files + sorted(p for p in SIMT_DIR.iterdir() if p.suffix in {".h", ".cuh", ".cu", ".cpp", ".py"})


def _sources(name: str, src: Path) -> list[Path]:
    if name == "_cuda":
        listed = cmake_list("LLMKERN_CUDA_SOURCES") + cmake_list("LLMKERN_CUDA_BINDINGS")
        sources = [src / Path(s).relative_to("csrc") for s in listed]
    elif name == "_simt_selftest":
        sources = [src / "selftest.cu"]
    else:
        raise ValueError(f"unknown emulated module {name!r}")
    return sources + [SIMT_DIR / "simt_runtime.cpp"]


def build(name: str = "_cuda") -> Path:
    """Compile (or reuse) an emulated module: "_cuda" (the kernels, with llmkern._cuda's API) or
    "_simt_selftest" (the emulator's own tests); returns the path of the shared library."""
    try:
        import pybind11
    except ImportError as e:
        raise Unavailable("pybind11 is not installed (pip install -e '.[test]')") from e
    cxx, cuda_include = _compiler(), cuda_include_dir()
    digest = hashlib.sha256(name.encode())
    for path in _inputs():
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    digest.update(" ".join([cxx, str(cuda_include), *FLAGS]).encode())
    flavor = "asan" if "-fsanitize=address" in FLAGS else "plain"
    out_dir = REPO / "build" / "simt" / f"{flavor}-{digest.hexdigest()[:16]}"
    library = out_dir / (name + importlib.machinery.EXTENSION_SUFFIXES[0])
    if library.exists():
        return library

    work = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    for path in (REPO / "csrc").rglob("*"):
        if path.is_file():
            target = src / path.relative_to(REPO / "csrc")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(rewrite(path.read_text()))
    shutil.copy(SIMT_DIR / "attention_ptx.cuh", src / "cuda" / "attention_ptx.cuh")
    (src / "selftest.cu").write_text(rewrite((SIMT_DIR / "selftest.cu").read_text()))

    includes = ["-include", str(SIMT_DIR / "simt.h"), "-I", str(src), "-I", str(SIMT_DIR),
                "-isystem", str(cuda_include), "-isystem", pybind11.get_include(),
                "-isystem", sysconfig.get_paths()["include"]]

    def compile_one(source: Path) -> Path:
        obj = work / (source.name + ".o")
        cmd = [cxx, *FLAGS, *includes, "-x", "c++", "-c", str(source), "-o", str(obj)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"simt: compiling {source.name} failed:\n{done.stderr[:6000]}")
        return obj

    jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        objects = list(pool.map(compile_one, _sources(name, src)))
    linked = work / library.name
    done = subprocess.run([cxx, "-shared", *FLAGS, "-o", str(linked), *map(str, objects)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"simt: linking failed:\n{done.stderr[-6000:]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    os.replace(linked, library)  # atomic: a concurrent build or a crash never leaves half a library
    shutil.rmtree(work, ignore_errors=True)
    for old in out_dir.parent.glob(f"{flavor}-*"):  # builds of this module from older sources
        if old != out_dir and (old / library.name).exists():
            shutil.rmtree(old, ignore_errors=True)
    return library


def load(name: str = "_cuda"):
    """An emulated module (built on first use); "_cuda" has the same functions as llmkern._cuda."""
    library = build(name)
    spec = importlib.util.spec_from_file_location(f"llmkern_simt.{name}", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
