"""gf.GRPOLoss and gf.FusedLinearGRPOLoss equal gf.policy_loss on gf.token_logprobs (values, metrics, gradients)."""
import pytest
import torch

import gfpo_fast as gf

B, T, H, V = 4, 5, 8, 37
CASES = [
    ("dapo-token", dict(loss_type="dapo")),
    ("grpo-sequence-kl", dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04)),
    ("gspo-token", dict(loss_type="grpo", importance_sampling_level="sequence_token", epsilon=0.05)),
    ("vespo", dict(loss_type="vespo")),
    ("gmpo", dict(algorithm="gmpo", epsilon=0.1)),
]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    bias = 0.1 * torch.randn(V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T) < torch.tensor([5, 3, 1, 0])[:, None]).float()
    adv = torch.randn(B, generator=g)
    logp = gf.token_logprobs(hidden @ weight.T + bias, ids, temperature=0.7)
    old = logp + 0.2 * torch.randn(B, T, generator=g)
    ref = logp + 0.1 * torch.randn(B, T, generator=g)
    return hidden, weight, bias, ids, mask, adv, old, ref


def _tensors(kw, ref):
    return dict(ref_logp=ref if kw.get("beta") else None, num_items_in_batch=9)


def _expected(kw, hidden, weight, bias, ids, mask, adv, old, ref):
    """Loss, metrics and (hidden, weight, bias) gradients of the unfused composition."""
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logits = leaves[0] @ leaves[1].T + leaves[2]
    logp, ent = gf.token_logprobs(logits, ids, temperature=0.7, return_entropy=True, backend="torch")
    loss, metrics = gf.policy_loss(logp, old, adv, mask, entropy=ent, **kw, **_tensors(kw, ref))
    loss.backward()
    return loss, metrics, [t.grad for t in leaves], logits.detach()


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_grpo_loss_matches_policy_loss(name, kw):
    hidden, weight, bias, ids, mask, adv, old, ref = _batch()
    loss_ref, metrics_ref, _, logits = _expected(kw, hidden, weight, bias, ids, mask, adv, old, ref)
    x = logits.clone().requires_grad_()
    loss, metrics = gf.GRPOLoss(temperature=0.7, return_entropy=True, **kw)(x, ids, old, adv, mask, **_tensors(kw, ref))
    loss.backward()
    x_ref = logits.clone().requires_grad_()
    lp = gf.token_logprobs(x_ref, ids, temperature=0.7, backend="torch")
    gf.policy_loss(lp, old, adv, mask, **kw, **_tensors(kw, ref))[0].backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert metrics.keys() == metrics_ref.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], metrics_ref[key], rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_fused_linear_matches_policy_loss(name, kw, chunk_size):
    hidden, weight, bias, ids, mask, adv, old, ref = _batch()
    loss_ref, metrics_ref, grads_ref, _ = _expected(kw, hidden, weight, bias, ids, mask, adv, old, ref)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    module = gf.FusedLinearGRPOLoss(chunk_size=chunk_size, temperature=0.7, return_entropy=True, **kw)
    loss, metrics = module(leaves[0], leaves[1], ids, old, adv, mask, bias=leaves[2], **_tensors(kw, ref))
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(leaves, grads_ref):
        torch.testing.assert_close(got.grad, want, rtol=1e-5, atol=1e-6)
    assert metrics.keys() == metrics_ref.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], metrics_ref[key], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_fused_linear_without_bias():
    hidden, weight, _, ids, mask, adv, old, _ = _batch(1)
    w = weight.clone().requires_grad_()
    loss, metrics = gf.FusedLinearGRPOLoss(chunk_size=3, loss_type="grpo")(hidden, w, ids, old, adv, mask)
    loss.backward()
    w_ref = weight.clone().requires_grad_()
    loss_ref, _ = gf.policy_loss(gf.token_logprobs(hidden @ w_ref.T, ids), old, adv, mask, loss_type="grpo")
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(w.grad, w_ref.grad)
    assert "entropy" not in metrics


def test_bad_arguments():
    with pytest.raises(TypeError, match="unexpected keyword"):
        gf.GRPOLoss(loss_typ="dapo")
    with pytest.raises(ValueError, match="loss_type"):
        gf.GRPOLoss(loss_type="ppo")
    with pytest.raises(ValueError, match="chunk_size"):
        gf.FusedLinearGRPOLoss(chunk_size=0)
    hidden, weight, _, ids, mask, adv, old, _ = _batch()
    with pytest.raises(ValueError, match="weight must have shape"):
        gf.FusedLinearGRPOLoss()(hidden, weight.T, ids, old, adv, mask)
    with pytest.raises(ValueError, match="token_ids must have shape"):
        gf.FusedLinearGRPOLoss()(hidden, weight, ids[:, :2], old, adv, mask)
