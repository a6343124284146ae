"""verl's modules for the bench's peers, where verl is installed but its package does not import.

verl's package ``__init__`` (and ``verl.utils``') pulls in Ray and the rest of its trainer's stack, which the lent
GPU machine lacks (the GPU suite carries verl's wheel and installs it with ``--no-deps``). The modules the peers
need, ``verl.utils.kernel.linear_cross_entropy`` (with ``kernels.py``) and ``verl.utils.experimental.
torch_functional``, import only ``verl.utils.device`` and ``verl.plugin.platform``, which need torch, triton and
packaging. :func:`import_module` imports a module normally, and where that fails because ``verl`` itself does not
import, loads it from the installed files under stub ``verl`` and ``verl.utils`` packages (empty modules whose
``__path__`` is the installed folder). The stubs stay in ``sys.modules``: the kernels import their siblings lazily.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

STUBS = ("verl", "verl.utils")


def import_module(name: str) -> types.ModuleType:
    """``importlib.import_module(name)``; for a module of verl whose package ``__init__`` fails to import (Ray
    missing), the module from verl's installed files under stub parent packages."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if name.partition(".")[0] != "verl" or "verl" in sys.modules:
            raise  # not verl's, or verl's package imported and the module itself failed
        spec = importlib.util.find_spec("verl")
        if spec is None or not spec.submodule_search_locations:
            raise  # verl is not installed
        _stub_parents(spec.submodule_search_locations[0], f"{type(err).__name__}: {err}")
    return importlib.import_module(name)


def stubbed() -> str | None:
    """Why verl's package does not import, where :func:`import_module` loaded its modules under stubs (then
    ``import verl`` gives the stub, which is not verl), else None."""
    return getattr(sys.modules.get("verl"), "stub_of_why", None)


def _stub_parents(folder: str, why: str) -> None:
    for name in STUBS:
        if name in sys.modules:  # imported before verl's __init__ failed: the real package, kept
            continue
        path = os.path.join(folder, *name.split(".")[1:])
        module = types.ModuleType(name, f"stub of verl's package {name}: its __init__ does not import")
        module.stub_of_why = why
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__spec__.submodule_search_locations = module.__path__ = [path]
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
