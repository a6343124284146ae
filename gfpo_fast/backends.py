"""Backend selection: Triton on CUDA, C++ on CPU, the pure-torch reference everywhere.

``backend`` arguments of the public ops take ``"auto"``, the name of a fast backend in
:data:`FAST_BACKENDS` (``"triton"``, ``"cpp"``), or ``"torch"``. ``"auto"`` picks the backend
registered for the tensor's device type (Triton for CUDA, C++ for CPU) when it implements the op
and can load; otherwise it uses the reference and says so once per (op, reason). Asking explicitly
for a backend that cannot run is a ``ValueError``: a fast path is never swapped for another silently.

``force_backend(name)`` overrides ``"auto"`` process-wide (tests use it to pin a path).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import types
import warnings
from collections.abc import Callable

import torch


@functools.cache
def cpp_status() -> tuple[bool, str]:
    """(loaded, reason) for the compiled extension ``gfpo_fast._C``."""
    try:
        importlib.import_module("gfpo_fast._C")
    except ImportError as err:  # not built, or built for another Python
        return False, f"the C++ extension gfpo_fast._C did not load ({err}); reinstall with `pip install .`"
    return True, ""


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(usable, reason) for Triton: installed (where it runs is :func:`triton_runs_on`)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False, "triton is not installed (pip install 'gfpo-fast[triton]')"
    return True, ""


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter (tests)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@dataclasses.dataclass(frozen=True)
class FastBackend:
    """One fast backend: where its launchers live, what it implements, where it runs, whether it loads.

    ``package`` holds one launcher module per op family (``logprobs``, ``advantages``) with the signatures
    every backend shares (docs/extending.md), imported only when first used, so a backend that cannot load
    costs nothing. ``devices`` are the tensor device types ``backend="auto"`` picks it for; ``runs_on``
    (default: the device type is one of ``devices``) may widen where an explicit request runs, and
    ``needs`` says what it takes, for the error.
    """

    package: str
    ops: frozenset[str]
    devices: tuple[str, ...]
    status: Callable[[], tuple[bool, str]]
    needs: str
    runs_on: Callable[[torch.device], bool] | None = None


# The fast backends. Adding one is one entry here plus its launcher modules in ``package``.
FAST_BACKENDS: dict[str, FastBackend] = {
    "triton": FastBackend(
        package="gfpo_fast.kernels",
        ops=frozenset({"token_logprobs", "fused_policy_loss", "group_advantages", "gfpo_filter"}),
        devices=("cuda",), status=triton_status, runs_on=triton_runs_on,
        needs="a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)"),
    "cpp": FastBackend(
        package="gfpo_fast.cpu",
        ops=frozenset({"token_logprobs", "fused_policy_loss", "group_advantages", "gfpo_filter"}),
        devices=("cpu",), status=cpp_status, needs="a CPU tensor"),
}

_forced: str | None = None
_said: set = set()


def names() -> tuple[str, ...]:
    """Every ``backend`` argument value: ``"auto"``, the fast backends of the table, ``"torch"``."""
    return ("auto", *FAST_BACKENDS, "torch")


def _fast(backend: str) -> FastBackend:
    if backend not in FAST_BACKENDS:
        raise ValueError(f"backend must be one of the fast backends {tuple(FAST_BACKENDS)}, got {backend!r}")
    return FAST_BACKENDS[backend]


def launchers(backend: str, op_module: str) -> types.ModuleType:
    """The launcher module ``op_module`` (``"logprobs"``, ``"advantages"``) of a fast ``backend``, e.g.
    ``launchers("cpp", "logprobs")`` is ``gfpo_fast.cpu.logprobs``; imported on first use (Triton may be
    absent). An unknown backend (``"torch"`` and ``"auto"`` included: they have no launchers) is a
    ``ValueError``."""
    return importlib.import_module(f"{_fast(backend).package}.{op_module}")


def _usable(name: str, op: str, device: torch.device) -> tuple[bool, str]:
    """(the fast backend ``name`` can run ``op`` on ``device`` tensors, the reason if not), from its table entry."""
    entry = _fast(name)
    if op not in entry.ops:
        return False, f"the {name} backend has no {op} yet"
    ok, why = entry.status()
    if not ok:
        return False, why
    runs = entry.runs_on(device) if entry.runs_on is not None else device.type in entry.devices
    if not runs:
        return False, f"the {name} backend needs {entry.needs}, got a {device.type} tensor"
    return True, ""


def _say_once(op: str, reason: str) -> None:
    key = (op, reason)
    if key not in _said:
        _said.add(key)
        warnings.warn(f"gfpo_fast.{op}: using the torch reference: {reason}", RuntimeWarning, stacklevel=3)


def select(op: str, backend: str, device: torch.device) -> str:
    """Returns the backend that will run ``op`` on ``device``: a key of :data:`FAST_BACKENDS`, or "torch"."""
    if backend not in names():
        raise ValueError(f"backend must be one of {names()}, got {backend!r}")
    if backend == "auto" and _forced is not None:
        backend = _forced
    if backend == "torch":
        return "torch"
    if backend != "auto":
        ok, why = _usable(backend, op, device)
        if not ok:
            raise ValueError(f"backend={backend!r} cannot run {op}: {why}")
        return backend
    missing = []  # why each backend registered for this device and implementing op cannot run it
    for name, entry in FAST_BACKENDS.items():
        if device.type in entry.devices:
            ok, why = _usable(name, op, device)
            if ok:
                return name
            if op in entry.ops:  # ops without a fast path on this device are plain torch by design: say nothing
                missing.append(why)
    if missing:
        _say_once(op, "; ".join(missing))
    return "torch"


@contextlib.contextmanager
def force_backend(name: str | None):
    """Within the block, ``backend="auto"`` means ``name`` (or normal selection when None)."""
    global _forced
    if name is not None and name not in names()[1:]:
        raise ValueError(f"force_backend takes one of {names()[1:]} or None, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous
