"""No folder of this checkout shadows an installed package.

Python puts the current directory first on ``sys.path`` (``python -m``, ``python -c``) and pytest prepends the
folder of each test module, so a module or a regular package (a folder with ``__init__.py``) in one of those
folders hides any installed package of the same import name. transformers 5.25 imports Hugging Face's
``kernels`` distribution, which a ``kernels/__init__.py`` at the root (or in ``tests/kernels/``) used to shadow.
"""
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import gfpo_fast

REPO = Path(__file__).resolve().parents[1]
OUR_DISTRIBUTION = "gfpo-fast"

HF_KERNELS_PROBE = """
import importlib.metadata
from pathlib import Path
import kernels
dist = importlib.metadata.distribution("kernels")
assert Path(kernels.__file__).resolve().is_relative_to(Path(dist.locate_file("")).resolve()), kernels.__file__
import transformers.integrations.hub_kernels
import transformers.models.llama.modeling_llama
import gfpo_fast
from gfpo_fast.kernels import _launch  # ours: a module Hugging Face's package does not have
assert Path(_launch.__file__).parent.name == "kernels", _launch.__file__
print("OK")
"""


def _tracked_folders() -> set[Path]:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    return {(REPO / name).parent for name in files if name}


def _search_folders() -> list[Path]:
    """The folders Python or pytest may put on ``sys.path``: the root, and every folder outside the package
    sources that holds Python files but no ``__init__.py`` (pytest's and a script's folder)."""
    sources = [REPO / "gfpo_fast", REPO / "kernels", REPO / "csrc"]
    folders = {REPO}
    for folder in _tracked_folders():
        if any(folder.is_relative_to(s) for s in sources) or (folder / "__init__.py").exists():
            continue
        if any(folder.glob("*.py")):
            folders.add(folder)
    return sorted(folders)


def _import_names(folder: Path) -> set[str]:
    """Top-level names a folder on ``sys.path`` provides: its modules and its regular packages."""
    modules = {p.stem for p in folder.glob("*.py")}
    packages = {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return modules | packages


def test_no_folder_on_the_path_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    clashes = []
    for folder in _search_folders():
        for name in sorted(_import_names(folder)):
            others = [d for d in installed.get(name, []) if d != OUR_DISTRIBUTION]
            if others:
                clashes.append(f"{folder.relative_to(REPO) or '.'}: '{name}' hides {others}")
    assert not clashes, "rename these (or drop their __init__.py):\n" + "\n".join(clashes)


def test_every_checkout_folder_on_this_sys_path_is_checked():
    """The guard above covers the folders pytest really put on ``sys.path`` in this run."""
    checked = set(_search_folders())
    source_folders = _tracked_folders() | {REPO}  # not a venv inside the checkout, nor a path hook's name
    on_path = {Path(p).resolve() for p in sys.path if p and Path(p).resolve() in source_folders}
    assert REPO in on_path and on_path <= checked, sorted(on_path - checked)


def test_triton_kernels_stay_ours():
    assert [Path(p).resolve() for p in gfpo_fast.kernels.__path__] == [REPO / "kernels"]
    if importlib.util.find_spec("triton") is not None:
        from gfpo_fast.kernels import logprobs
        assert Path(logprobs.__file__).resolve() == REPO / "kernels" / "logprobs.py"


def _require_hf_kernels():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels distribution is not installed")


def test_hugging_face_kernels_imports_inside_pytest():
    _require_hf_kernels()
    import transformers.integrations.hub_kernels  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import kernels

    location = Path(importlib.metadata.distribution("kernels").locate_file("")).resolve()
    assert Path(kernels.__file__).resolve().is_relative_to(location), kernels.__file__
    assert not Path(kernels.__file__).resolve().is_relative_to(REPO / "kernels")


@pytest.mark.parametrize("folder", [".", "tests", "tests/backends"])
def test_hugging_face_kernels_imports_from_checkout_folders(folder):
    """``python -c`` run in the root and in the test folders, where the current directory leads ``sys.path``."""
    _require_hf_kernels()
    run = subprocess.run([sys.executable, "-c", HF_KERNELS_PROBE], cwd=REPO / folder,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "OK"
