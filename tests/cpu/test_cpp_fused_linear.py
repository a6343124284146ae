"""fused_linear_policy_loss's two paths (gfpo_fast/fused_linear.py) on the C++ launchers and the torch reference
per chunk: grad in forward (token-separable losses, 6 N H V FLOPs) and recompute (the rest, 8 N H V). For every
algorithm, loss type and importance-sampling level, on and off policy, with KL, delta and IS ratios: the loss,
metrics and gradients to hidden, weight and bias equal the unchunked reference, the path taken is the one
``token_separable`` names (counted projections: the grad-in-forward backward projects nothing). (That
``token_separable`` agrees with the reference's gradients needs no C++: tests/test_policy_loss.py.)"""
import pytest
import torch

import gfpo_fast as gf
from gfpo_fast.fused_linear import fused_linear_policy_loss_ref
from gfpo_fast.policy_loss import token_separable

from fused_linear_cases import CONFIG_WARNINGS, CONFIGS, HEAD, counted_projections, make_inputs, split

CHUNK = 8  # 24 tokens: chunks [0, 8), [8, 16), [16, 24); the last one is fully masked
ACTIVE_CHUNKS = 2
UPSTREAM = 1.7  # the gradients are of UPSTREAM * loss: the grad-in-forward backward scales what it stored
pytestmark = CONFIG_WARNINGS


def run_counted(backend, leaves, ids, mask, loss_args, kw):
    """The op's ``(loss, metrics, gradients of UPSTREAM * loss)`` and the rows projected in forward and backward."""
    with counted_projections() as forward:
        loss, metrics = gf.fused_linear_policy_loss(leaves[0], leaves[1], ids, *loss_args, mask, bias=leaves[2],
                                                    chunk_size=CHUNK, backend=backend, return_entropy=True, **HEAD,
                                                    **kw)
    with counted_projections() as backward:
        grads = torch.autograd.grad(UPSTREAM * loss, leaves)
    return loss, metrics, grads, {"forward": forward, "backward": backward}


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize(("kwargs", "on_policy"), [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_both_paths_match_reference(backend, kwargs, on_policy):
    (hidden, weight, bias, ids, mask), tensors = make_inputs()
    cfg, loss_args, kw, ref_kw = split(kwargs, tensors, on_policy)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    loss, metrics, grads, projected = run_counted(backend, leaves, ids, mask, loss_args, kw)
    if token_separable(cfg, on_policy=on_policy):  # grad in forward: one projection per active chunk, none after
        assert projected == {"forward": [CHUNK] * ACTIVE_CHUNKS, "backward": []}
    else:  # recompute: the backward projects every active chunk again
        assert projected == {"forward": [CHUNK] * ACTIVE_CHUNKS, "backward": [CHUNK] * ACTIVE_CHUNKS}
    ref_leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    ref, ref_metrics = fused_linear_policy_loss_ref(cfg, ref_leaves[0], ref_leaves[1], ids, *loss_args, mask,
                                                    bias=ref_leaves[2], return_entropy=True, **HEAD, **ref_kw)
    ref_grads = torch.autograd.grad(UPSTREAM * ref, ref_leaves)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], ref_metrics[key], atol=1e-6, rtol=1e-5, msg=key)
    for name, a, e in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, atol=1e-6 * max(1.0, e.abs().max().item()), rtol=1e-4, msg=f"d{name}")
    assert torch.equal(grads[0][3], torch.zeros_like(grads[0][3]))  # the fully masked row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_in_forward_equals_recompute(dtype):
    """On the same inputs the two paths give the same gradients (the recompute path taken because the
    advantages want a gradient), bf16 included: the same logits, dlogp and GEMMs, in another order."""
    (hidden, weight, bias, ids, mask), tensors = make_inputs(dtype)
    out = []
    for adv_grad in (False, True):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        adv = tensors["advantages"].clone().requires_grad_(adv_grad)
        loss, _ = gf.fused_linear_policy_loss(leaves[0], leaves[1], ids, tensors["old_logp"], adv, mask,
                                              bias=leaves[2], chunk_size=CHUNK, **HEAD)
        assert (loss.grad_fn.name() == "FusedLinearLossGradFunctionBackward") != adv_grad
        out.append((loss, torch.autograd.grad(loss, leaves)))
    (loss, grads), (rec_loss, rec_grads) = out
    torch.testing.assert_close(loss, rec_loss, atol=0, rtol=0)
    for a, e in zip(grads, rec_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), e.float(), atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-2)


def test_one_backward_per_forward_and_no_grad():
    (hidden, weight, bias, ids, mask), tensors = make_inputs()
    args = (ids, tensors["old_logp"], tensors["advantages"], mask)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
    loss, _ = gf.fused_linear_policy_loss(*leaves, *args, chunk_size=CHUNK)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="run the forward again"):
        loss.backward()
    with torch.no_grad():
        value, _ = gf.fused_linear_policy_loss(*leaves, *args, chunk_size=CHUNK)
    assert value.grad_fn is None
    torch.testing.assert_close(value, loss.detach(), atol=0, rtol=0)
