"""Backend selection: auto picks a fast path only where it runs, says once when it falls back,
and an explicit backend that cannot run is an error, never a silent substitute."""
import warnings

import pytest
import torch

import gfpo_fast as gf
from gfpo_fast import backends


def test_explicit_backend_that_cannot_run_is_an_error():
    with pytest.raises(ValueError, match="backend='triton' cannot run policy_loss"):
        backends.select("policy_loss", "triton", torch.device("cpu"))


def test_ops_without_fast_path_use_torch_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("policy_loss", "auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("built, expected", [(True, "cpp"), (False, "torch")])
def test_auto_prefers_cpp_on_cpu_when_built(monkeypatch, built, expected):
    monkeypatch.setattr(backends, "cpp_status", lambda: (built, "" if built else "not built"))
    monkeypatch.setattr(backends, "_said", set())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback is announced (tested below)
        assert backends.select("group_advantages", "auto", torch.device("cpu")) == expected


def test_force_backend_overrides_auto():
    with gf.force_backend("torch"):
        assert backends.select("group_advantages", "auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="force_backend"):
        with gf.force_backend("fast"):
            pass


def test_fallback_is_announced_once(monkeypatch):
    monkeypatch.setattr(backends, "cpp_status", lambda: (False, "not built"))
    monkeypatch.setattr(backends, "_said", set())
    with pytest.warns(RuntimeWarning, match="not built"):
        backends.select("group_advantages", "auto", torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.select("group_advantages", "auto", torch.device("cpu"))
