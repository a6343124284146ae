"""C++ CPU backend tests: without the extension gfpo_fast._C each module skips with the reason
(``tests/conftest.py``)."""
import pytest
import torch


@pytest.fixture
def threads():
    """``threads(n)`` sets torch's (and so the C++ kernels') thread count for the rest of the test."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)
