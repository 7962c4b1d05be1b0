"""The CUDA emulator (python_tests/simt) itself: it must report the defects it claims to find, and
compute the warp instructions as the PTX ISA defines them. The kernels are in simt/selftest.cu."""

from __future__ import annotations

import importlib
import re

import pytest
import torch

import simt

build = importlib.import_module("simt.build")  # the module, not the function simt exports


@pytest.fixture(scope="module")
def selftest():
    try:
        return simt.load("_simt_selftest")
    except simt.Unavailable as e:
        pytest.skip(f"the CUDA emulator cannot be built here: {e}")


def test_deadlock_is_reported_with_thread_states(selftest):
    out = torch.zeros(32)
    with pytest.raises(RuntimeError, match=r"deadlock.*at __syncthreads.*__shfl_xor_sync"):
        selftest.shuffle_against_barrier(out.data_ptr())


def test_a_race_changes_with_the_schedule_and_the_barrier_removes_it(selftest):
    results = {}
    for order in ("forward", "reverse", "random:3"):
        for with_barrier in (False, True):
            out = torch.full((64,), float("nan"))
            with simt.schedule(order):
                selftest.neighbour_read(out.data_ptr(), with_barrier)
            results[order, with_barrier] = out
    expected = (torch.arange(64) + 1) % 64
    for order in ("forward", "reverse", "random:3"):
        assert torch.equal(results[order, True], expected.float())
    racy = [results[order, False] for order in ("forward", "reverse", "random:3")]
    assert not all(torch.equal(racy[0], r) for r in racy[1:])
    # Forward, thread 0 runs to its end first: slot 1 was never written in this block, so it reads
    # the poison, not what an earlier launch left in the array.
    assert torch.isnan(results["forward", False][0])


def test_reading_cp_async_data_before_the_wait_sees_poison(selftest):
    data = torch.randn(64)
    out = torch.zeros(64)
    selftest.async_copy(data.data_ptr(), out.data_ptr(), True)
    assert torch.equal(out, data)
    selftest.async_copy(data.data_ptr(), out.data_ptr(), False)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_racecheck_of_cp_async_and_ldmatrix(selftest, order):
    data, out = torch.randn(512).half(), torch.zeros(64)
    with simt.schedule(order):
        selftest.tile_reuse(data.data_ptr(), out.data_ptr(), True, True)  # both barriers: no race
        with pytest.raises(RuntimeError, match=r"shared-memory race"):
            selftest.tile_reuse(data.data_ptr(), out.data_ptr(), False, True)
        with pytest.raises(RuntimeError, match=r"shared-memory race"):
            selftest.tile_reuse(data.data_ptr(), out.data_ptr(), True, False)


def test_misaligned_cp_async_source_is_reported(selftest):
    data, out = torch.randn(80), torch.zeros(64)
    with pytest.raises(RuntimeError, match="misaligned"):
        selftest.misaligned_async_copy(data.data_ptr(), out.data_ptr())


def test_launches_the_gpu_refuses_are_errors_not_runs(selftest):
    out = torch.full((2048,), -1.0)
    assert selftest.oversized_block(out.data_ptr()) != 0  # cudaErrorInvalidConfiguration
    assert (out == -1).all()
    data = torch.randn(64)
    assert selftest.too_much_shared(data.data_ptr(), out.data_ptr()) != 0  # over 48 KiB without the opt-in


def test_a_block_beyond_the_kernels_launch_bounds_is_refused(selftest):
    out = torch.zeros(128)
    with pytest.raises(RuntimeError, match=r"128 threads exceeds the kernel's __launch_bounds__\(64\)"):
        selftest.beyond_launch_bounds(out.data_ptr())


def test_shuffles(selftest):
    x = torch.randn(32)
    out = torch.zeros(32)
    selftest.warp_reductions(x.data_ptr(), out.data_ptr())
    expected = x.sum() + 1000.0 * x[5]
    torch.testing.assert_close(out, expected.expand(32), rtol=1e-6, atol=1e-4)


def test_mma_and_ldmatrix_follow_the_ptx_fragment_formulas(selftest):
    a = torch.randn(16, 16).half()
    b = torch.randn(16, 8).half()
    c = torch.randn(16, 8)
    direct, through_ldmatrix = torch.full((16, 8), float("nan")), torch.full((16, 8), float("nan"))
    selftest.mma_from_formulas(a.data_ptr(), b.data_ptr(), c.data_ptr(), direct.data_ptr(),
                               through_ldmatrix.data_ptr())
    expected = a.double() @ b.double() + c.double()
    torch.testing.assert_close(direct.double(), expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(through_ldmatrix.double(), expected, rtol=1e-6, atol=1e-5)


def test_arch_names_are_checked(selftest):
    data, out = torch.randn(64), torch.zeros(64)
    with simt.arch("sm70"), pytest.raises(RuntimeError, match="LLMKERN_SIMT_ARCH"):
        selftest.async_copy(data.data_ptr(), out.data_ptr(), True)


def test_schedule_names_are_checked(selftest):
    zeros, out = torch.zeros(32), torch.zeros(32)
    with simt.schedule("sideways"), pytest.raises(RuntimeError, match="LLMKERN_SIMT_SCHEDULE"):
        selftest.warp_reductions(zeros.data_ptr(), out.data_ptr())


# --- the PTX models against the ISA's formulas, register by register --------------------------------
# groupID g = lane // 4, threadID_in_group q = lane % 4 (PTX ISA, "Matrix Fragments for mma.m16n8k16
# with floating point type" and "ldmatrix").


@pytest.mark.parametrize("transposed", [False, True])
def test_ldmatrix_registers_of_every_lane(selftest, transposed):
    data = torch.randint(0, 2**16, (256,), dtype=torch.int32).to(torch.int64)
    tile = data.to(torch.int16)  # 32 rows of 8 b16, bit patterns
    rows = torch.randperm(32, dtype=torch.int32)  # lane l gives the address of row rows[l]
    out = torch.zeros(32 * 4, dtype=torch.int32)
    selftest.ldmatrix_registers(tile.data_ptr(), rows.data_ptr(), out.data_ptr(), transposed)
    got = out.view(32, 4).to(torch.int64) & 0xFFFFFFFF
    for lane in range(32):
        g, q = lane // 4, lane % 4
        for i in range(4):  # matrix i: rows given by lanes 8i..8i+7
            def element(r, c):
                return int(data[int(rows[8 * i + r]) * 8 + c])
            if transposed:  # element (2q + j, g) of the matrix
                lo, hi = element(2 * q, g), element(2 * q + 1, g)
            else:  # element (g, 2q + j)
                lo, hi = element(g, 2 * q), element(g, 2 * q + 1)
            assert int(got[lane, i]) == lo | (hi << 16), (lane, i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_registers_of_every_lane(selftest, dtype):
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(16, 8).to(dtype)
    c = torch.randn(16, 8)
    bits = lambda t: t.view(torch.int16).to(torch.int64) & 0xFFFF  # noqa: E731
    a_bits, b_bits = bits(a), bits(b)
    a_regs, b_regs, c_regs = torch.zeros(32, 4, dtype=torch.int64), torch.zeros(32, 2, dtype=torch.int64), torch.zeros(32, 4)
    for lane in range(32):
        g, q = lane // 4, lane % 4
        for j in range(4):  # a_j: rows g (j even) or g + 8, cols 2q, 2q + 1 (+8 for j >= 2)
            row, col = g + 8 * (j % 2), 2 * q + 8 * (j // 2)
            a_regs[lane, j] = a_bits[row, col] | (a_bits[row, col + 1] << 16)
        for j in range(2):  # b_j: rows (k) 2q, 2q + 1 (+8 for j = 1), col g
            k = 2 * q + 8 * j
            b_regs[lane, j] = b_bits[k, g] | (b_bits[k + 1, g] << 16)
        c_regs[lane] = torch.stack([c[g, 2 * q], c[g, 2 * q + 1], c[g + 8, 2 * q], c[g + 8, 2 * q + 1]])
    a_words, b_words = a_regs.to(torch.int32), b_regs.to(torch.int32)  # the same 32 bits
    d = torch.full((32, 4), float("nan"))
    selftest.mma_registers(a_words.data_ptr(), b_words.data_ptr(), c_regs.data_ptr(), d.data_ptr(),
                           dtype == torch.bfloat16)
    expected = a.double() @ b.double() + c.double()
    for lane in range(32):
        g, q = lane // 4, lane % 4
        want = [expected[g, 2 * q], expected[g, 2 * q + 1], expected[g + 8, 2 * q], expected[g + 8, 2 * q + 1]]
        torch.testing.assert_close(d[lane].double(), torch.stack(want), rtol=1e-6, atol=1e-5)


def test_a_warp_reading_its_own_copies_before_the_wait_is_a_race(selftest):
    data, out = torch.randint(0, 2**15, (256,), dtype=torch.int16), torch.zeros(32)
    with pytest.raises(RuntimeError, match="shared-memory race.*may still be writing"):
        selftest.read_before_own_wait(data.data_ptr(), out.data_ptr())


def test_float_min_max_drop_a_nan_like_cuda(selftest):
    values, out = torch.tensor([float("nan"), 1.0]), torch.full((4,), -1.0)
    selftest.float_min_max(values.data_ptr(), out.data_ptr())
    assert out.tolist() == [1.0, 1.0, 1.0, 1.0]


# --- the source rewriting of build.py ---------------------------------------------------------------


def _code_without_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", "", text)


def test_every_shared_declaration_and_launch_in_csrc_is_rewritten():
    seen = 0
    for path in sorted((build.REPO / "csrc").rglob("*")):
        if path.is_file() and path.suffix in {".cu", ".cuh", ".h", ".cpp"}:
            code = _code_without_comments(build.rewrite(path.read_text()))
            assert "__shared__" not in code and "<<<" not in code, path
            seen += _code_without_comments(path.read_text()).count("__shared__")
    assert seen > 0  # the walk saw the kernels' shared arrays


def test_a_static_shared_array_is_poisoned_per_block_and_what_cannot_be_rewritten_is_refused():
    assert "poison_shared_once(&scratch, sizeof(scratch))" in build.rewrite("  __shared__ float scratch[32];\n")
    with pytest.raises(ValueError, match="cannot rewrite line 2"):
        build.rewrite("// two arrays\n  __shared__ float first[32], second[32];\n")
    assert "simt::Launch(\"k<T>\", grid, 256)" in build.rewrite("  k<T><<<grid, 256>>>(x);\n")


def test_the_selftest_source_is_part_of_the_build_hash():
    assert build.SIMT_DIR / "selftest.cu" in build._inputs()
