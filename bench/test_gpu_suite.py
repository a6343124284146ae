"""The GPU suite's dry run: every part runs at tiny shapes on the CPU, so a lent GPU is never its first run."""
import json
import subprocess
import sys

import pytest

from bench import gpu_suite


@pytest.mark.slow
def test_gpu_suite_dry_run_passes_every_part(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--dry", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=2700)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["part"] for r in rows] == ["gpu_tests", "kernel_bench", "fused_linear_bench", "long_sequence",
                                         "train", "train_liger", "vllm", "train_scale"]
    assert all(r["status"] in ("passed", "skipped", "no tests") for r in rows), rows
    assert (tmp_path / "summary.md").read_text().count("| passed |") >= 6


def test_gpu_time_limits_fit_the_budget(tmp_path):
    assert sum(limit for _, _, limit in gpu_suite.parts(tmp_path, dry=False)) <= 540  # the GPU budget
