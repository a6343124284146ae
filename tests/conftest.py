"""Test-session setup shared by every directory.

``TRITON_INTERPRET=1`` must be in the environment before any module that defines a ``@triton.jit``
kernel is imported (the decorator reads it), and any test may import ``gfpo_fast.kernels``
indirectly, so it is set here, at the root, on machines without CUDA. It changes nothing else:
``backend="auto"`` still picks the C++ backend for CPU tensors. The backend contract suite's fixture, which
skips a backend that cannot run (and fails under ``CI=true``), is ``tests/backends/conftest.py``.

No test may leave torch.distributed's variables behind: a later trainer subprocess (``bench.gpu_suite``'s train
part, for one) would take a leaked ``RANK``/``MASTER_PORT`` as a launch and try to join a process group.
"""
import os

import pytest
import torch

DISTRIBUTED_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _distributed_variables_unchanged():
    before = {k: os.environ.get(k) for k in DISTRIBUTED_VARS}
    yield
    after = {k: os.environ.get(k) for k in DISTRIBUTED_VARS}
    assert after == before, f"the test changed torch.distributed's environment variables: {before} -> {after}"
