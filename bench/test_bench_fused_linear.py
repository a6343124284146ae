"""pytest-benchmark regression numbers for fused-linear policy loss at small shapes (speed is never asserted), and
verl's peers loaded from its wheel's files."""
import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from bench import bench_fused_linear as FAMILY  # read by conftest.pytest_generate_tests
from bench import verl_files
from bench.harness import run_case

ROOT = Path(__file__).resolve().parent.parent


def test_fused_linear(case_impl, run_bench):
    run_bench(*case_impl)


def test_verl_comparison():
    """``python -m bench.bench_fused_linear --verl`` at the test size: both rows timed, both equal to the reference."""
    pytest.importorskip("verl")
    table = FAMILY.verl_comparison("test", rounds=2)
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith(("| gfpo-fast", "| verl"))]
    assert [row[0] for row in rows] == [f"| {FAMILY.VERL_OURS}", f"| {FAMILY.VERL_TORCH}"]
    assert all(float(row[3].rstrip(" |")) < 1e-4 for row in rows)


@pytest.fixture
def verl_wheel_files(tmp_path, monkeypatch):
    """verl 0.9.1's wheel unpacked into a folder on the path, as ``--install`` leaves it on the lent machine, with
    Ray unimportable (so ``import verl`` fails); the verl modules imported are dropped afterwards (and those of an
    installed verl set back). The wheel is the
    one ``python -m bench.gpu_suite --prepare`` carries, else downloaded (skipped where neither can be had)."""
    wheels = sorted((ROOT / ".whl").glob("verl-0.9.1-*.whl"))
    if not wheels:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                              "verl==0.9.1", "-d", str(tmp_path)], capture_output=True, text=True, timeout=300)
        wheels = sorted(tmp_path.glob("verl-0.9.1-*.whl"))
        if not wheels:
            pytest.skip(f"verl 0.9.1's wheel cannot be downloaded: {got.stderr.strip()[-300:]}")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(site, [n for n in wheel.namelist() if n.startswith("verl/")])
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    for name in [n for n in sys.modules if n == "verl" or n.startswith("verl.")]:  # an installed verl, imported
        monkeypatch.delitem(sys.modules, name)  # restored afterwards
    before = set(sys.modules)
    yield site
    for name in set(sys.modules) - before:
        if name == "verl" or name.startswith("verl."):
            del sys.modules[name]


def test_verl_files_load_the_kernel_without_ray(verl_wheel_files):
    """``import verl`` fails without Ray; the peers' modules load from the wheel's files under stub packages."""
    with pytest.raises(ImportError):
        importlib.import_module("verl")
    kernel = verl_files.import_module("verl.utils.kernel.linear_cross_entropy")
    assert Path(kernel.__file__).is_relative_to(verl_wheel_files) and callable(kernel.linear_cross_entropy)
    assert "ray" in verl_files.stubbed()
    torch_backend = verl_files.import_module("verl.utils.experimental.torch_functional")
    assert Path(torch_backend.__file__).is_relative_to(verl_wheel_files)


def test_verl_peers_on_cpu(verl_wheel_files):
    """On the CPU, with verl's files and no Ray: verl's Triton kernel is "Not run" with its reason in the log-prob
    and entropy tables, its torch backend (loaded from the files) runs and agrees with the oracle, and gfpo-fast's
    verl integration, which needs verl's package, says so."""
    cases = FAMILY.cases(torch.device("cpu"), "test", compile=False)
    entropy = next(c for c in cases if c.shape["op"] == "logprobs+entropy")
    cuda_only = "verl's Triton kernel runs on CUDA only"
    for case in [c for c in cases if c.shape["op"] == "logprobs"] + [entropy]:
        assert next(i for i in case.impls if i.name == FAMILY.VERL_TRITON).skip == cuda_only
    entropy.impls = [i for i in entropy.impls if i.role == "oracle" or "verl" in i.name]
    rows = {r["impl"]: r for r in run_case(entropy, torch.device("cpu"), budget_s=0, log=lambda *_: None)}
    assert rows[FAMILY.VERL_TRITON]["status"] == "skipped"
    assert rows[FAMILY.VERL_TRITON]["detail"] == cuda_only
    assert rows[FAMILY.VERL_TORCH]["status"] == "ok"
    assert rows[FAMILY.VERL_OURS]["status"] == "skipped" and "ray" in rows[FAMILY.VERL_OURS]["detail"]
