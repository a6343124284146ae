"""pytest-benchmark regression numbers for fused_policy_loss at small shapes (speed is never asserted)."""
from bench import bench_fused_policy_loss as FAMILY  # noqa: F401 (read by conftest.pytest_generate_tests)


def test_fused_policy_loss(case_impl, run_bench):
    run_bench(*case_impl)
