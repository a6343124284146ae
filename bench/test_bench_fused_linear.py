"""Quick regression numbers for fused-linear policy loss (small shapes; checked against the reference, speed never asserted)."""
from bench import bench_fused_linear as FAMILY  # noqa: F401 (read by conftest.pytest_generate_tests)


def test_fused_linear(case_impl, run_bench):
    run_bench(*case_impl)
