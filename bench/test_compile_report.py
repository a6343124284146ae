"""Every shipped Triton kernel compiles for sm_90a, sm_80 and gfx942 at the launchers' GPU configuration,
with no spill and shared memory within each device's limit (``python -m bench.compile_report --check``)."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_every_kernel_compiles_for_every_target_without_spills(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    out = tmp_path / "compile-report.md"
    run = subprocess.run([sys.executable, "-m", "bench.compile_report", "--check", "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(out.with_suffix(".json").read_text())
    assert {r["device"] for r in rows} == {"H100/H200 (sm_90a)", "A100 (sm_80)", "MI300 (gfx942)"}
    assert all(r["error"] is None and r["spill_bytes"] == 0 for r in rows)
    kernels = {r["kernel"] for r in rows}
    assert len(kernels) >= 3, kernels
