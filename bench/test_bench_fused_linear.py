"""pytest-benchmark regression numbers for fused-linear policy loss at small shapes (speed is never asserted)."""
from bench import bench_fused_linear as FAMILY  # noqa: F401 (read by conftest.pytest_generate_tests)


def test_fused_linear(case_impl, run_bench):
    run_bench(*case_impl)
