"""Users' functions named by a string, as the trainer's and the integrations' options take them (reward
functions, GFPO group filters): ``package.module:function`` (importable) or ``path/to/file.py:function``."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def load_function(spec: str, what: str):
    """Imports ``module:function`` or ``file.py:function``; ``what`` names the option in errors.

    A ``.py`` file is imported under its stem, registered in ``sys.modules`` unless that name is taken
    (dataclasses and pickling look a function's module up there). Raises ``ValueError`` naming ``what`` and
    ``spec``: no ``:``, an import that fails, or no callable of that name."""
    if ":" not in spec:
        raise ValueError(f"{what}: {spec!r} is neither a built-in nor 'module:function' / 'file.py:function'")
    module_name, func_name = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            if mod_spec is None or not path.is_file():
                raise ImportError(f"no file {path}")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules.setdefault(path.stem, module)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what}: cannot import {module_name!r} for {spec!r}: {err}") from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"{what}: {module_name!r} has no function {func_name!r}")
    return func
