"""Quick regression numbers for token_logprobs (small shapes; checked against the reference, speed never asserted)."""
from bench import bench_logprobs as FAMILY  # noqa: F401 (read by conftest.pytest_generate_tests)


def test_logprobs(case_impl, run_bench):
    run_bench(*case_impl)
