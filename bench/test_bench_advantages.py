"""pytest-benchmark regression numbers for group_advantages / gfpo_filter at small shapes (speed is never asserted)."""
from bench import bench_advantages as FAMILY  # noqa: F401 (read by conftest.pytest_generate_tests)


def test_advantages(case_impl, run_bench):
    run_bench(*case_impl)
