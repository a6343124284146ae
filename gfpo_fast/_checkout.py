"""Make ``import gfpo_fast`` whole when it is imported from a source checkout.

An installed package holds ``gfpo_fast/kernels/`` (setuptools maps the top-level ``kernels/`` folder
there) and the compiled extension ``gfpo_fast/_C*.so``. ``kernels/`` has no ``__init__.py`` on purpose: from
the repository root (first on ``sys.path`` under ``python -m`` and pytest) a regular package named ``kernels``
would shadow the Hugging Face ``kernels`` distribution that transformers imports, whereas a folder without
one is at most a namespace portion, which never shadows an installed package. ``gfpo_fast.kernels`` is
therefore a namespace package, installed or wired in here. A checkout has neither inside ``gfpo_fast/``:
``kernels/`` lies beside it, and ``_C`` exists there only after an editable install. Python imports the
checkout's ``gfpo_fast/`` whenever the repository root is first on ``sys.path`` (``python -m ...`` or
``python -c`` run from the root), so without this module a non-editable install would give half a package.

Imported first by ``gfpo_fast/__init__.py``, :func:`complete` does, in a checkout only:

1. registers the checkout's ``kernels/`` folder as the package ``gfpo_fast.kernels`` (never as a top-level
   ``kernels``);
2. when ``gfpo_fast/`` holds no built ``_C``, loads the one that a non-editable install put on
   ``sys.path``;
3. warns when the extension was built from other ``csrc/`` sources than the checkout's (compared by
   :func:`csrc_digest`, which ``setup.py`` compiles into the extension).

This module imports nothing from the package and no third-party module (``setup.py`` loads it by path).
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import sys
import warnings
from pathlib import Path


def csrc_digest(csrc: Path) -> str:
    """A short sha256 over the names and bytes of ``csrc/*.cpp`` and ``csrc/*.h``, in name order."""
    h = hashlib.sha256()
    for f in sorted([*csrc.glob("*.cpp"), *csrc.glob("*.h")]):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _extension_in(folder: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (folder / f"_C{suffix}").is_file():
            return folder / f"_C{suffix}"
    return None


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def complete(package: object) -> None:
    """Wire ``gfpo_fast.kernels`` and ``gfpo_fast._C`` into ``package`` if it was imported from a checkout."""
    here = Path(package.__path__[0]).resolve()
    repo = here.parent
    if (here / "kernels").is_dir() or not (repo / "kernels").is_dir() or not (repo / "csrc").is_dir():
        return  # an installed package, complete as it is
    if "gfpo_fast.kernels" not in sys.modules:  # a namespace package over the checkout's folder
        spec = importlib.machinery.ModuleSpec("gfpo_fast.kernels", None, is_package=True)
        spec.submodule_search_locations = [str(repo / "kernels")]
        package.kernels = sys.modules["gfpo_fast.kernels"] = importlib.util.module_from_spec(spec)

    built = _extension_in(here)
    if built is None:  # no editable build: take the extension of a non-editable install, if any
        for entry in sys.path:
            folder = (Path(entry or ".").resolve()) / "gfpo_fast"
            if folder != here and (built := _extension_in(folder)) is not None:
                break
    if built is None:
        return  # backends.cpp_status says how to build it
    try:
        extension = _load("gfpo_fast._C", built)
    except ImportError:
        return  # built for another Python: backends.cpp_status reports the import error
    package._C = extension
    want = csrc_digest(repo / "csrc")
    if getattr(extension, "csrc_digest", None) != want:
        warnings.warn(f"gfpo_fast: the C++ extension {built} was built from other csrc/ sources than this checkout "
                      f"({getattr(extension, 'csrc_digest', 'unknown')} != {want}); rebuild it with "
                      "`./quickstart.sh` or `pip install -e .`", RuntimeWarning, stacklevel=3)


if __name__ == "gfpo_fast._checkout":  # not when setup.py loads this file by path for csrc_digest
    complete(sys.modules["gfpo_fast"])
