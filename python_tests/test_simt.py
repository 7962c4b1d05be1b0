"""The CUDA emulator (python_tests/simt) itself: it must report the defects it claims to find, and
compute the warp instructions as the PTX ISA defines them. The kernels are in simt/selftest.cu."""

from __future__ import annotations

import pytest
import torch

import simt


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
    data = torch.randn(80)
    with pytest.raises(RuntimeError, match="misaligned"):
        selftest.misaligned_async_copy(data.data_ptr(), torch.zeros(64).data_ptr())


def test_launches_the_gpu_refuses_are_errors_not_runs(selftest):
    out = torch.full((2048,), -1.0)
    assert selftest.oversized_block(out.data_ptr()) != 0  # cudaErrorInvalidConfiguration
    assert (out == -1).all()
    data = torch.randn(64)
    assert selftest.too_much_shared(data.data_ptr(), out.data_ptr()) != 0  # over 48 KiB without the opt-in


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


def test_schedule_names_are_checked(selftest):
    with simt.schedule("sideways"), pytest.raises(RuntimeError, match="LLMKERN_SIMT_SCHEDULE"):
        selftest.warp_reductions(torch.zeros(32).data_ptr(), torch.zeros(32).data_ptr())
