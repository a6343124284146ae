"""The loss ops accept an empty batch (B = 0, as a rank whose rows the GFPO filter all dropped may see):
loss 0, gradients of the inputs' (empty) shapes, on every backend that runs here."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import gfpo_fast as gf
from gfpo_fast import backends
from gfpo_fast.policy_loss import LOSS_TYPES

T, V, H = 5, 11, 4
OPTIONS = [dict(loss_type=t, max_completion_length=T) for t in LOSS_TYPES] + [
    dict(importance_sampling_level="sequence"), dict(algorithm="gmpo"), dict(beta=0.04)]


def _inputs(with_old: bool, beta: float):
    old = torch.zeros(0, T) if with_old else None
    ref = torch.zeros(0, T) if beta else None
    return dict(token_ids=torch.zeros(0, T, dtype=torch.long), old_logp=old, advantages=torch.zeros(0),
                mask=torch.ones(0, T), ref_logp=ref)


@pytest.mark.parametrize("kwargs", OPTIONS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("with_old", [False, True], ids=["on_policy", "old_logp"])
def test_policy_loss_of_an_empty_batch_is_zero(kwargs, with_old):
    inputs = _inputs(with_old, kwargs.get("beta", 0.0))
    inputs.pop("token_ids")
    logp = torch.zeros(0, T, requires_grad=True)
    loss, _ = gf.policy_loss(logp, **inputs, **kwargs)
    loss.backward()
    assert loss.item() == 0.0 and logp.grad.shape == (0, T)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])  # triton: under TRITON_INTERPRET (tests/conftest.py)
@pytest.mark.parametrize("kwargs", OPTIONS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_fused_losses_of_an_empty_batch_are_zero(backend, kwargs):
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if backend == "cpp" and not backends.cpp_status()[0]:
        pytest.skip(backends.cpp_status()[1])
    inputs = _inputs(True, kwargs.get("beta", 0.0))
    logits = torch.zeros(0, T, V, requires_grad=True)
    loss, metrics = gf.fused_policy_loss(logits, **inputs, backend=backend, return_entropy=True, **kwargs)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == (0, T, V)
    assert metrics["entropy"].numel() == 1
    hidden = torch.zeros(0, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    loss, _ = gf.fused_linear_policy_loss(hidden, weight, **inputs, backend=backend, return_entropy=True, **kwargs)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, T, H)
    assert weight.grad is None or not weight.grad.any()
