"""Quick regression numbers for group_advantages and gfpo_filter (small shapes; checked against the reference, speed never asserted)."""
from bench import bench_advantages as FAMILY  # noqa: F401 (read by conftest.pytest_generate_tests)


def test_advantages(case_impl, run_bench):
    run_bench(*case_impl)
