"""Building Triton kernels' GPU code (PTX through ptxas) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, which conftest sets) runs a kernel's Python but never lowers
it, so a kernel the compiler would reject (a type, a layout, too much shared memory) passes there
and fails on the first GPU. run_build compiles kernels ahead of time for given GPU targets in a
fresh Python without the interpreter flag:

    out = run_build('''
    from llmkern.triton import rope
    build(rope._rope_kernel, {"X": "*bf16", ...}, {"INVERSE": False, ...}, arch=90, num_warps=4)
    print("built")
    ''')

build(kernel, signature, constexprs, arch, aligned, **options) returns the PTX; `signature` maps each
run-time argument to a Triton type ("*bf16", "i32", "fp32"...), `constexprs` each constexpr argument
to its value; `aligned` names the arguments to build for as multiples of 16 (the JIT specializes a
launch so: 16-byte aligned tensors, strides that are multiples of 16).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PRELUDE = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction


def build(kernel, signature, constexprs, arch=90, aligned=(), **options):
    fn = kernel
    while not isinstance(fn, JITFunction):  # an autotuned or heuristics-wrapped kernel: the JITFunction inside
        fn = fn.fn
    missing = [n for n in fn.arg_names if n not in signature and n not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no type or value for {missing}")
    full = {n: "constexpr" if n in constexprs else signature[n] for n in fn.arg_names}
    # What the JIT does at a launch whose pointer (or integer) is a multiple of 16: without it the
    # compiler cannot prove 16-byte alignment, and loads stay narrow and unpipelined.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(fn, full, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()}, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]
'''


def run_build(body: str, timeout: int = 600) -> str:
    """Run PRELUDE + body in a fresh Python (no interpreter flag, the repo on the path); its stdout.
    Raises AssertionError with the end of stderr when it fails."""
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def build_norm_kernels(centered: bool) -> str:
    """Build llmkern/triton/_norm.py's kernels for sm_80 and sm_90 as RMSNorm (centered=False) or
    LayerNorm uses them: one pass and several, with and without the residual (and, for LayerNorm,
    the bias), in one dtype and in autocast's mix (bf16 x, y and dy beside an fp32 stream)."""
    return run_build(f"""
    from llmkern.triton import _norm as k
    rows = {{n: "i32" for n in ("x_stride", "r_stride", "y_stride", "h_stride", "n_cols")}}
    back = {{n: "i32" for n in ("dy_stride", "h_stride", "e_stride", "dh_stride", "n_rows", "n_cols")}}
    centered = {centered}
    for arch in (80, 90):
        for single in (True, False):
            block = 4096 if single else 1024
            for flag in (True, False):
                for stream in ("bf16", "fp32"):  # the stream's dtype; x, y and dy are bf16 either way
                    fwd = {{"X": "*bf16", "R": "*" + stream, "W": "*fp32", "B": "*fp32", "Y": "*bf16",
                            "H": "*" + stream, **rows, "eps": "fp32"}}
                    build(k._forward_kernel, fwd, {{"CENTERED": centered, "HAS_BIAS": centered and flag,
                          "HAS_RESIDUAL": flag, "BLOCK": block, "SINGLE_PASS": single}}, arch, num_warps=8)
                    bwd = {{"DY": "*bf16", "H": "*" + stream, "W": "*fp32", "E": "*" + stream, "DH": "*" + stream,
                            "PARTIAL": "*fp32", **back, "eps": "fp32"}}
                    build(k._backward_kernel, bwd, {{"CENTERED": centered, "HAS_BIAS": centered and flag,
                          "HAS_EXTRA": flag, "BLOCK": block, "SINGLE_PASS": single}}, arch, num_warps=8)
    print("built")
    """)
