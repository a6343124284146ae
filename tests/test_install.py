"""The newcomer's path: a fresh copy of the checkout, a fresh virtual environment, a non-editable install.

Run from the copy's root, ``import gfpo_fast`` finds the checkout's ``gfpo_fast/`` folder first (the
current directory leads ``sys.path``), which holds neither ``kernels/`` nor a built ``_C``: the package must
still import whole, report the C++ backend and run a fused op on it, with the extension from the install.
"""
import os
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import os, sys
import torch
import gfpo_fast as gf
from gfpo_fast import backends
ok, why = backends.cpp_status()
assert ok, why
assert gf.__file__.startswith(os.getcwd()), gf.__file__      # the checkout's package ...
assert gf._C.__file__.startswith(sys.prefix), gf._C.__file__  # ... with the installed extension
assert list(gf.kernels.__path__)[0].startswith(os.getcwd()), gf.kernels.__path__
logits = torch.randn(2, 3, 11, requires_grad=True)
ids = torch.randint(0, 11, (2, 3))
loss, _ = gf.fused_policy_loss(logits, ids, torch.randn(2, 3), torch.randn(2), torch.ones(2, 3), backend="cpp")
loss.backward()
assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
print("OK")
"""


def _checkout_copy(dest: Path) -> None:
    """The files a fresh clone would have, plus uncommitted ones that git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())


@pytest.mark.slow
def test_non_editable_install_imports_whole_from_the_checkout_root(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    checkout, env_dir = tmp_path / "gfpo-fast", tmp_path / "venv"
    checkout.mkdir()
    _checkout_copy(checkout)
    assert not list((checkout / "gfpo_fast").glob("_C*")), "the copy must not hold an in-place build"

    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    # torch, numpy and the rest come from this test's environment (a .pth line), so the install adds no download;
    # the package itself is built and installed into the fresh environment, not editable.
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "."], cwd=checkout, env=env, check=True)

    run = subprocess.run([python, "-c", PROBE], cwd=checkout, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK" in run.stdout
    assert "RuntimeWarning" not in run.stderr, run.stderr  # no stale-extension warning, no reference fallback
