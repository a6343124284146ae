"""tests/spec_fixtures.py holds numbers computed by TRL: recompute them from the installed TRL and compare
(``python tests/make_spec_fixtures.py --check``). Fails naming the rows that differ."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "make_spec_fixtures.py"


@pytest.mark.slow  # importing TRL alone takes about 10 s
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed")
def test_spec_fixtures_match_installed_trl():
    run = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all recomputable rows match TRL" in run.stdout
