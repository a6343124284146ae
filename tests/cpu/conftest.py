"""C++ CPU backend tests: skipped as a whole when the extension gfpo_fast._C is not built."""
import pytest
import torch

from gfpo_fast import backends

if not backends.cpp_status()[0]:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def threads():
    """``threads(n)`` sets torch's (and so the C++ kernels') thread count for the rest of the test."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)
