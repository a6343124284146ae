"""The backend contract suite: every test taking the ``backend`` fixture runs once per fast backend of
``gfpo_fast.backends.FAST_BACKENDS`` (one table entry adds a backend here too), on the device it runs on here:
the C++ backend on the CPU, Triton on CUDA or, without a GPU, under the interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``) at tiny shapes. A backend that cannot run here skips with the reason, and fails under
``CI=true``, where the quickstart builds every backend. A behaviour that exists for some backends only carries
``@pytest.mark.only_backends(*names, reason=...)``.
"""
import dataclasses
import os

import pytest
import torch

from gfpo_fast import backends


def pytest_configure(config):
    config.addinivalue_line("markers", "only_backends(*names, reason): a behaviour of these fast backends only")


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("only_backends")
    if marker is not None:
        assert marker.kwargs.get("reason"), f"{metafunc.definition.nodeid}: only_backends needs a reason"
        unknown = set(marker.args) - set(backends.FAST_BACKENDS)
        assert not unknown, f"{metafunc.definition.nodeid}: only_backends names unknown backends {sorted(unknown)}"
    names = marker.args if marker is not None else tuple(backends.FAST_BACKENDS)
    metafunc.parametrize("backend", names, indirect=True)


@dataclasses.dataclass(frozen=True)
class Backend:
    """A fast backend as the contract tests use it: its name, the device it runs on here, whether that is the
    Triton interpreter on the CPU (slow: tiny shapes, a subset of the broad matrices)."""

    name: str
    device: torch.device
    interpreted: bool

    def launchers(self, op_module: str):
        return backends.launchers(self.name, op_module)


def _device(name: str) -> tuple[torch.device | None, str]:
    """The first device the backend runs on here (its own device types, then the CPU), or why none."""
    entry = backends.FAST_BACKENDS[name]
    reasons = []
    for kind in (*entry.devices, "cpu"):
        if kind != "cpu" and not (hasattr(torch, kind) and getattr(torch, kind).is_available()):
            reasons.append(f"no {kind} device")
            continue
        ok, why = backends._usable(name, next(iter(entry.ops)), torch.device(kind))
        if ok:
            return torch.device(kind), ""
        reasons.append(why)
    return None, "; ".join(dict.fromkeys(reasons))


def _ragged_vocab_tiles(monkeypatch):
    """Small vocab tiles under the interpreter: V = 300 is then 128 + 128 + 44, not one tile."""
    from gfpo_fast.kernels import _launch

    monkeypatch.setattr(_launch, "MAX_BLOCK_V_INTERPRETER", 128)


# Per-backend test setup, by backend name (none for most).
SETUP = {"triton": _ragged_vocab_tiles}


@pytest.fixture
def backend(request, monkeypatch) -> Backend:
    name = request.param
    device, why = _device(name)
    if device is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"CI must run the {name} backend's contract tests, but {why}", pytrace=False)
        pytest.skip(f"the {name} backend cannot run here: {why}")
    if name in SETUP:
        SETUP[name](monkeypatch)
    # Running on a device outside the entry's own ones means an emulation (Triton's interpreter on the CPU).
    return Backend(name, device, interpreted=device.type not in backends.FAST_BACKENDS[name].devices)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture
def threads():
    """``threads(n)`` sets torch's (and so the C++ kernels') thread count for the rest of the test."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)
