"""The package's import layers (gfpo_fast/__init__.py): backends never import the public layer, the public layer
never imports the applications (train/, integrations/), the integrations never import the trainer, and
``import gfpo_fast`` needs no Triton."""
import ast
import subprocess
import sys
from pathlib import Path

from gfpo_fast import backends

ROOT = Path(__file__).resolve().parents[1]
# What a backend module (kernels/*.py, gfpo_fast/cpu/*.py) may import from the package: validation, selection,
# the NaN statistics, the extension, and its own folder.
BACKEND_MAY_IMPORT = {"gfpo_fast._checks", "gfpo_fast.backends", "gfpo_fast.nanstats", "gfpo_fast._C"}


def package_imports(path: Path, package: str) -> set[str]:
    """Absolute names of the gfpo_fast modules ``path`` imports (module level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("gfpo_fast"))
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            if not module.startswith("gfpo_fast"):
                continue
            if node.module is None:  # from .. import _C
                names.update(f"{module}.{a.name}" for a in node.names)
            else:
                names.add(module)
    return names


def test_backends_never_import_the_public_layer():
    folders = {"gfpo_fast.kernels": ROOT / "kernels", "gfpo_fast.cpu": ROOT / "gfpo_fast" / "cpu"}
    assert set(folders) == {entry.package for entry in backends.FAST_BACKENDS.values()}, "a backend folder unchecked"
    for package, folder in folders.items():
        for path in folder.glob("*.py"):
            outside = {n for n in package_imports(path, package) if not n.startswith(package)}
            extra = sorted(outside - BACKEND_MAY_IMPORT)
            assert not extra, f"{path.relative_to(ROOT)} imports {extra}"


def imports_under(package_imports_of: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in package_imports_of if any(n == p or n.startswith(p + ".") for p in prefixes))


def test_the_public_layer_never_imports_the_applications():
    for path in (ROOT / "gfpo_fast").glob("*.py"):
        found = imports_under(package_imports(path, "gfpo_fast"), ("gfpo_fast.train", "gfpo_fast.integrations"))
        assert not found, f"{path.relative_to(ROOT)} imports {found}"


def test_integrations_never_import_the_trainer():
    """Integrations run inside another framework's trainer; what they share with ours lives in the public layer."""
    for path in (ROOT / "gfpo_fast" / "integrations").glob("*.py"):
        found = imports_under(package_imports(path, "gfpo_fast.integrations"), ("gfpo_fast.train",))
        assert not found, f"{path.relative_to(ROOT)} imports {found}"


def test_imports_without_triton():
    code = "import sys; sys.modules['triton'] = None; import gfpo_fast; print(sorted(gfpo_fast.__all__)[0])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
