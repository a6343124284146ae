"""Backend selection: Triton on CUDA, C++ on CPU, the pure-torch reference everywhere.

``backend`` arguments of the public ops take ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.
``"auto"`` picks Triton for CUDA tensors and the C++ extension for CPU tensors when the op
has such an implementation and it can load; otherwise it uses the reference and says so once
per (op, reason). Asking explicitly for a backend that cannot run is a ``ValueError``: a fast
path is never swapped for another silently.

``force_backend(name)`` overrides ``"auto"`` process-wide (tests use it to pin a path).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")

# The ops each fast backend implements. A backend module adds its op here when it lands.
IMPLEMENTED = {
    "triton": frozenset({"token_logprobs", "fused_policy_loss", "group_advantages", "gfpo_filter"}),
    "cpp": frozenset({"group_advantages", "gfpo_filter", "token_logprobs", "fused_policy_loss"}),
}

_forced: str | None = None
_said: set = set()


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
    """(usable, reason) for Triton: installed, and a GPU driver or ``TRITON_INTERPRET=1``."""
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


def _say_once(op: str, reason: str) -> None:
    key = (op, reason)
    if key not in _said:
        _said.add(key)
        warnings.warn(f"gfpo_fast.{op}: using the torch reference: {reason}", RuntimeWarning, stacklevel=3)


def _usable(name: str, op: str, device: torch.device) -> tuple[bool, str]:
    if op not in IMPLEMENTED[name]:
        return False, f"the {name} backend has no {op} yet"
    if name == "triton":
        ok, why = triton_status()
        if ok and not triton_runs_on(device):
            return False, f"Triton needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU), got a {device.type} tensor"
        return ok, why
    if device.type != "cpu":
        return False, f"the C++ backend runs on CPU tensors, got a {device.type} tensor"
    return cpp_status()


def select(op: str, backend: str, device: torch.device) -> str:
    """Returns the backend that will run ``op`` on ``device``: one of "triton", "cpp", "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and _forced is not None:
        backend = _forced
    if backend == "torch":
        return "torch"
    if backend != "auto":
        ok, why = _usable(backend, op, device)
        if not ok:
            raise ValueError(f"backend={backend!r} cannot run {op}: {why}")
        return backend
    preferred = "triton" if device.type == "cuda" else "cpp"
    ok, why = _usable(preferred, op, device)
    if ok:
        return preferred
    # Ops without a fast path on this device are plain torch by design: say nothing then.
    if op in IMPLEMENTED[preferred]:
        _say_once(op, why)
    return "torch"


@contextlib.contextmanager
def force_backend(name: str | None):
    """Within the block, ``backend="auto"`` means ``name`` (or normal selection when None)."""
    global _forced
    if name is not None and name not in BACKENDS[1:]:
        raise ValueError(f"force_backend takes one of {BACKENDS[1:]} or None, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous
