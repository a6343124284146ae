"""pytest-benchmark regression numbers for fused-linear policy loss at small shapes (speed is never asserted)."""
import pytest

from bench import bench_fused_linear as FAMILY  # read by conftest.pytest_generate_tests


def test_fused_linear(case_impl, run_bench):
    run_bench(*case_impl)


def test_verl_comparison():
    """``python -m bench.bench_fused_linear --verl`` at the test size: both rows timed, both equal to the reference."""
    pytest.importorskip("verl")
    table = FAMILY.verl_comparison("test", rounds=2)
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith(("| gfpo-fast", "| verl"))]
    assert [row[0] for row in rows] == [f"| {FAMILY.VERL_OURS}", f"| {FAMILY.VERL_TORCH}"]
    assert all(float(row[3].rstrip(" |")) < 1e-4 for row in rows)
