"""Kernel tests: on a machine without CUDA they run under the Triton interpreter at tiny shapes
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1``). Without triton each module
skips with the reason (``tests/conftest.py``).
On CPU the vocab tile is capped at 128 so that V = 300 runs several ragged tiles.
"""
import pytest
import torch


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def ragged_vocab_tiles(monkeypatch):
    """Small vocab tiles under the interpreter: V = 300 is then 128 + 128 + 44, not one tile."""
    from gfpo_fast.kernels import _launch

    monkeypatch.setattr(_launch, "MAX_BLOCK_V_INTERPRETER", 128)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
