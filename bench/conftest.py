"""pytest-benchmark regression runs of the bench cases at the ``test`` size (``pytest bench/``).

Each test module names its family (``FAMILY``); every (case, implementation) becomes one test that first
checks the implementation against the oracle, then times it. Speed is never asserted. Every peer runs (a peer
that is not installed, or needs a GPU, is skipped with the reason); ``torch.compile`` peers run on the first case
of each family only, since each shape is a new compile of a few seconds.
"""
import pytest
import torch

from bench.harness import check
from bench.report import slug

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "case_impl" not in metafunc.fixturenames:
        return
    params = []
    for i, case in enumerate(metafunc.module.FAMILY.cases(DEVICE, "test", compile=True)):
        for impl in case.impls:
            skip = impl.skip
            if not skip and i > 0 and impl.name.startswith("torch.compile"):
                skip = "torch.compile runs on the first case of the family only (a compile per shape)"
            marks = [pytest.mark.skip(reason=skip)] if skip else []
            name = "-".join(str(v) for v in case.shape.values()) + "-" + slug(impl.name)
            params.append(pytest.param((case, impl), id=name, marks=marks))
    metafunc.parametrize("case_impl", params)


@pytest.fixture
def run_bench(benchmark):
    """Checks ``impl`` against the case's reference on fresh inputs, then benchmarks it (3 rounds)."""

    def run(case, impl):
        inputs = case.make_inputs()
        ok, err = check(impl.fn(inputs), case.impls[0].fn(inputs), case.low_precision)
        assert ok, f"{impl.name} disagrees with {case.impls[0].name}: normalised max error {err:.3g}"
        benchmark.extra_info.update(case.shape)
        benchmark.pedantic(impl.fn, args=(inputs,), rounds=3, warmup_rounds=1)

    return run
