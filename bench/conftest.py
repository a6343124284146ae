"""pytest-benchmark regression runs of the bench cases at the ``test`` size (``pytest bench/``).

Each test module names its family (``FAMILY``); every (case, implementation other than the oracle) becomes one
test that first checks the implementation against the oracle, then times it. Speed is never asserted. Every
implementation runs (one that is not installed, or needs a GPU, is skipped with the reason), but the costly ones
run once per name and mode (forward, forward + backward), on the smallest case that has them: ``torch.compile``
peers (each shape is a new compile of seconds) and, on a CPU, Triton kernels (only under ``TRITON_INTERPRET=1``,
which the tests' root conftest sets: ~1000x slower).
"""
import math
import os

import pytest
import torch

from bench.harness import check, exact_outputs
from bench.report import slug

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "case_impl" not in metafunc.fixturenames:
        return
    params = []
    cases = metafunc.module.FAMILY.cases(DEVICE, "test", compile=True)
    smallest = {}  # (costly implementation name, mode) -> the smallest case that has it
    for case in sorted(cases, key=lambda c: math.prod(c.shape.get(k, 1) for k in "NHV")):
        for impl in case.impls:
            if costly(impl) and not impl.skip:
                smallest.setdefault((impl.name, case.shape.get("mode")), case)
    for case in cases:
        for impl in case.impls[1:]:  # every implementation but the oracle, which each one is checked against
            skip = impl.skip
            if not skip and costly(impl) and smallest[impl.name, case.shape.get("mode")] is not case:
                skip = "runs on the family's smallest case only (a compile per shape, or the Triton interpreter)"
            marks = [pytest.mark.skip(reason=skip)] if skip else []
            name = "-".join(str(v) for v in case.shape.values()) + "-" + slug(impl.name)
            params.append(pytest.param((case, impl), id=name, marks=marks))
    metafunc.parametrize("case_impl", params)


def interpreted(impl) -> bool:
    """A Triton kernel run by the interpreter (a CPU machine with ``TRITON_INTERPRET=1``)."""
    return impl.triton and DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def costly(impl) -> bool:
    return impl.name.startswith("torch.compile") or interpreted(impl)


@pytest.fixture
def run_bench(benchmark):
    """Checks ``impl`` against the case's oracle on fresh inputs, then benchmarks it (3 rounds; an interpreted
    Triton kernel 1 round, no warm-up)."""

    def run(case, impl):
        inputs = case.make_inputs()
        ok, err = check(impl.fn(inputs), case.impls[0].fn(inputs), exact_outputs(case, inputs))
        assert ok, f"{impl.name} disagrees with {case.impls[0].name}: normalised max error {err:.3g}"
        benchmark.extra_info.update(case.shape)
        slow = interpreted(impl)
        benchmark.pedantic(impl.fn, args=(inputs,), rounds=1 if slow else 3, warmup_rounds=0 if slow else 1)

    return run
