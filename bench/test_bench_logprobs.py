"""pytest-benchmark regression numbers for token_logprobs at small shapes (speed is never asserted)."""
from bench import bench_logprobs as FAMILY  # noqa: F401 (read by conftest.pytest_generate_tests)


def test_logprobs(case_impl, run_bench):
    run_bench(*case_impl)
