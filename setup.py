"""Builds the C++ CPU backend (csrc/) as gfpo_fast._C with pybind11; everything else is in pyproject.toml."""
import importlib.util
from glob import glob
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# The digest of csrc/ goes into the extension, so that a checkout can tell a stale build (gfpo_fast/_checkout.py).
_spec = importlib.util.spec_from_file_location("_checkout", "gfpo_fast/_checkout.py")
_checkout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checkout)

ext = Pybind11Extension(
    "gfpo_fast._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    define_macros=[("GFPO_CSRC_DIGEST", f'"{_checkout.csrc_digest(Path("csrc"))}"')],
    # -fno-trapping-math: we never enable floating-point traps, and without it GCC refuses to turn the
    # compare-and-select of the row kernels (min/max, exp underflow) into vector blends, leaving them scalar.
    # It changes no result: NaN, inf and signed zeros keep IEEE semantics (unlike -ffast-math).
    extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math"],
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
