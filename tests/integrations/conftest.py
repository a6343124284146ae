"""Each integration test runs in its own ``tmp_path``: the frameworks' configs write their relative output
folders there, never into a folder shared by two runs on one machine."""
import pytest


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
