"""Test-session setup shared by every directory.

``TRITON_INTERPRET=1`` must be in the environment before any module that defines a ``@triton.jit``
kernel is imported (the decorator reads it), and any test may import ``gfpo_fast.kernels``
indirectly, so it is set here, at the root, on machines without CUDA. It changes nothing else:
``backend="auto"`` still picks the C++ backend for CPU tensors.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The backend folders' modules import their backend at the top. Without it each module is collected as one
# test that skips with the reason (fails under CI=true, where the quickstart has built both), instead of
# vanishing from the count.
BACKEND_FOLDERS = {"cpu": "cpp_status", "kernels": "triton_status"}  # folder -> its gfpo_fast.backends check


class _BackendMissing(pytest.Item):
    def __init__(self, *, reason: str, **kwargs):
        super().__init__(**kwargs)
        self.reason = reason

    def runtest(self):
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"CI must run these tests, but {self.reason}", pytrace=False)
        pytest.skip(self.reason)

    def reportinfo(self):
        return self.path, None, self.name


class _BackendMissingModule(pytest.File):
    def __init__(self, *, reason: str, **kwargs):
        super().__init__(**kwargs)
        self.reason = reason

    def collect(self):
        yield _BackendMissing.from_parent(self, name="[backend missing]", reason=self.reason)


def pytest_pycollect_makemodule(module_path, parent):
    status = BACKEND_FOLDERS.get(module_path.parent.name)
    if status is None or module_path.parent.parent != Path(__file__).parent:
        return None
    from gfpo_fast import backends  # here: TRITON_INTERPRET is set above before anything imports Triton

    ok, why = getattr(backends, status)()
    return None if ok else _BackendMissingModule.from_parent(parent, path=module_path, reason=why)
