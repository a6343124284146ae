"""Test-session setup shared by every directory.

``TRITON_INTERPRET=1`` must be in the environment before any module that defines a ``@triton.jit``
kernel is imported (the decorator reads it), and any test may import ``gfpo_fast.kernels``
indirectly, so it is set here, at the root, on machines without CUDA. It changes nothing else:
``backend="auto"`` still picks the C++ backend for CPU tensors. The backend contract suite's fixture, which
skips a backend that cannot run (and fails under ``CI=true``), is ``tests/backends/conftest.py``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
