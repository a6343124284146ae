"""gf.fused_policy_loss on each fast backend equals the reference composition: token_logprobs_ref followed by
policy_loss (on the torch backend, fused_policy_loss is that composition itself)."""
import pytest
import torch

import gfpo_fast as gf
from gfpo_fast import backends
from gfpo_fast.logprobs import token_logprobs_ref


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_equals_composition(backend):
    ok, why = backends._usable(backend, "fused_policy_loss", torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 6, 50
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T) < torch.tensor([6, 3, 1, 0])[:, None]).float()
    adv = torch.randn(B, generator=g)
    old = gf.token_logprobs(logits, ids, temperature=0.9) + 0.1 * torch.randn(B, T, generator=g)
    kw = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, ref_logp=old - 0.05)
    x1 = logits.clone().requires_grad_()
    loss1, m1 = gf.fused_policy_loss(x1, ids, old, adv, mask, temperature=0.9, return_entropy=True, backend=backend,
                                     **kw)
    loss1.backward()
    x2 = logits.clone().requires_grad_()
    lp, ent = token_logprobs_ref(x2, ids, temperature=0.9, return_entropy=True)
    loss2, m2 = gf.policy_loss(lp, old, adv, mask, entropy=ent, **kw)
    loss2.backward()
    torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert m1.keys() == m2.keys() and "entropy" in m1


def test_rejects_unknown_keywords_and_flat_logits():
    logits = torch.zeros(2, 3, 5)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="losstype"):
        gf.fused_policy_loss(logits, ids, None, torch.zeros(2), torch.ones(2, 3), losstype="grpo")
    with pytest.raises(ValueError, match="logits must be"):
        gf.fused_policy_loss(logits[0], ids[0], None, torch.zeros(2), torch.ones(2, 3))
