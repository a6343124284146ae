"""Backend selection from the one table (gfpo_fast.backends.FAST_BACKENDS): auto picks a fast path only where it
runs, says once when it falls back, an explicit backend that cannot run is an error, never a silent substitute,
and a backend's launchers are found from its table entry alone."""
import dataclasses
import warnings

import pytest
import torch

import gfpo_fast as gf
from gfpo_fast import backends

CPU = torch.device("cpu")


def replace_entry(monkeypatch, name, **changes):
    monkeypatch.setitem(backends.FAST_BACKENDS, name, dataclasses.replace(backends.FAST_BACKENDS[name], **changes))
    monkeypatch.setattr(backends, "_said", set())


def test_explicit_backend_that_cannot_run_is_an_error():
    with pytest.raises(ValueError, match="backend='triton' cannot run policy_loss"):
        backends.select("policy_loss", "triton", CPU)


@pytest.mark.parametrize("name", ["metal", "Triton", "fast"])
def test_unknown_backend_name_is_an_error(name):
    with pytest.raises(ValueError, match=rf"backend must be one of \('auto', 'triton', 'cpp', 'torch'\), got '{name}'"):
        backends.select("token_logprobs", name, CPU)
    with pytest.raises(ValueError, match=rf"fast backends \('triton', 'cpp'\), got '{name}'"):
        backends.launchers(name, "logprobs")


@pytest.mark.parametrize("name", ["torch", "auto"])
def test_only_fast_backends_have_launchers(name):
    with pytest.raises(ValueError, match=f"got '{name}'"):
        backends.launchers(name, "advantages")


def test_launchers_come_from_the_table_entry(monkeypatch):
    """``launchers(backend, op_module)`` imports ``<entry.package>.<op_module>``: a new backend needs no dispatch
    code (here a stand-in entry whose package is gfpo_fast itself)."""
    replace_entry(monkeypatch, "cpp", package="gfpo_fast")
    assert backends.launchers("cpp", "nanstats") is __import__("gfpo_fast.nanstats").nanstats


def test_cpp_launchers_are_the_cpu_modules():
    if not backends.cpp_status()[0]:
        pytest.skip(backends.cpp_status()[1])
    from gfpo_fast.cpu import advantages, logprobs

    assert backends.launchers("cpp", "logprobs") is logprobs
    assert backends.launchers("cpp", "advantages") is advantages


def test_entry_without_the_op_gives_the_reason(monkeypatch):
    replace_entry(monkeypatch, "cpp", ops=backends.FAST_BACKENDS["cpp"].ops - {"token_logprobs"},
                  status=lambda: (True, ""))
    with pytest.raises(ValueError, match="backend='cpp' cannot run token_logprobs: the cpp backend has no "
                                         "token_logprobs yet"):
        backends.select("token_logprobs", "cpp", CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an op a backend does not implement is plain torch, said nowhere
        assert backends.select("token_logprobs", "auto", CPU) == "torch"
    assert backends.select("group_advantages", "auto", CPU) == "cpp"


def test_explicit_backend_on_a_device_it_does_not_run_on(monkeypatch):
    replace_entry(monkeypatch, "cpp", status=lambda: (True, ""))
    with pytest.raises(ValueError, match="the cpp backend needs a CPU tensor, got a meta tensor"):
        backends.select("group_advantages", "cpp", torch.device("meta"))


def test_a_new_table_entry_is_selected_for_its_device(monkeypatch):
    """One entry makes a backend: auto picks it for its device type, an explicit request reaches it."""
    monkeypatch.setitem(backends.FAST_BACKENDS, "metal", backends.FastBackend(
        package="gfpo_fast.metal", ops=frozenset({"token_logprobs"}), devices=("mps",), status=lambda: (True, ""),
        needs="an MPS tensor"))
    assert "metal" in backends.names()
    assert backends.select("token_logprobs", "auto", torch.device("mps")) == "metal"
    assert backends.select("token_logprobs", "metal", torch.device("mps")) == "metal"
    with pytest.raises(ValueError, match="the metal backend needs an MPS tensor, got a cpu tensor"):
        backends.select("token_logprobs", "metal", CPU)


def test_ops_without_fast_path_use_torch_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("policy_loss", "auto", CPU) == "torch"


@pytest.mark.parametrize("built, expected", [(True, "cpp"), (False, "torch")])
def test_auto_prefers_cpp_on_cpu_when_built(monkeypatch, built, expected):
    replace_entry(monkeypatch, "cpp", status=lambda: (built, "" if built else "not built"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback is announced (tested below)
        assert backends.select("group_advantages", "auto", CPU) == expected


def test_force_backend_overrides_auto():
    with gf.force_backend("torch"):
        assert backends.select("group_advantages", "auto", CPU) == "torch"
    with pytest.raises(ValueError, match="force_backend"):
        with gf.force_backend("fast"):
            pass


def test_fallback_is_announced_once(monkeypatch):
    replace_entry(monkeypatch, "cpp", status=lambda: (False, "not built"))
    with pytest.warns(RuntimeWarning, match="not built"):
        backends.select("group_advantages", "auto", CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.select("group_advantages", "auto", CPU)
