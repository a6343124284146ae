"""Triton group kernel (kernels/advantages.py, through the public ops) against the torch references: group advantages
(every scale mode, both aggregations, NaN rewards, G = 1 and 2) and the GFPO filter (top-k with ties
to the lower index, statistics over kept rows, batch scaling). CPU runs use the interpreter."""
import functools

import pytest
import torch

import gfpo_fast as gf
from gfpo_fast.advantages import gfpo_filter_ref, gfpo_keep_mask, group_advantages_ref

from triton_helpers import INTERPRETER_NUMPY_WARNINGS, assert_close

pytestmark = INTERPRETER_NUMPY_WARNINGS

group_advantages_triton = functools.partial(gf.group_advantages, backend="triton")
gfpo_filter_triton = functools.partial(gf.gfpo_filter, backend="triton")


def rewards_with_gaps(n, f, device, nan_fraction=0.2):
    r = torch.randn(n, f, device=device)
    r[torch.rand(n, f, device=device) < nan_fraction] = float("nan")
    r[1] = float("nan")  # a row with no reward at all
    return r


@pytest.mark.parametrize("G", [1, 2, 6])
@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_group_advantages_match_reference(device, G, scale, aggregation):
    r = rewards_with_gaps(4 * G, 3, device)
    kwargs = dict(reward_weights=[1.0, 0.5, 2.0], scale_rewards=scale, aggregation=aggregation)
    out = group_advantages_triton(r, G, **kwargs)
    assert out.dtype == torch.float32 and out.shape == (4 * G,)
    assert_close(out, group_advantages_ref(r, G, **kwargs), atol=1e-5, rtol=1e-5, name="advantages")


def test_single_reward_column_and_fully_missing_group(device):
    r = torch.randn(12, device=device, dtype=torch.float64)
    r[4:8] = float("nan")  # group 1 has no reward: advantages 0
    r[9] = float("nan")
    out = group_advantages_triton(r, 4)
    assert_close(out, group_advantages_ref(r, 4), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[4:8], torch.zeros(4, device=device))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G,k", [(3, 2), (8, 3), (16, 15)])
def test_gfpo_filter_matches_reference(device, scale, G, k):
    n = 3 * G
    rewards = torch.randn(n, device=device)
    rewards[2] = float("nan")
    scores = torch.randint(0, 4, (n,), device=device).float()  # many ties: lower index wins
    scores[G: 2 * G] = float("-inf")  # a group where every score ties
    adv, keep = gfpo_filter_triton(rewards, scores, G, k, scale_rewards=scale)
    ref_adv, ref_keep = gfpo_filter_ref(rewards, scores, G, k, scale_rewards=scale)
    assert keep.dtype == torch.bool and torch.equal(keep, ref_keep)
    assert torch.equal(keep[G: 2 * G], torch.arange(G, device=device) < k)
    assert keep.view(-1, G).sum(-1).tolist() == [k] * 3
    assert_close(adv, ref_adv, atol=1e-5, rtol=1e-5, name="advantages")
    assert torch.equal(adv[~keep], torch.zeros_like(adv[~keep]))


def test_gfpo_keep_mask_is_a_stable_descending_sort(device):
    scores = torch.tensor([0.5, 2.0, 2.0, -1.0, 2.0, 0.5], device=device)
    _, keep = gfpo_filter_triton(torch.zeros(6, device=device), scores, 6, 3)
    assert keep.tolist() == [False, True, True, False, True, False]
    assert torch.equal(keep, gfpo_keep_mask(scores, 6, 3))


def test_public_ops_dispatch_to_triton(device):
    r = rewards_with_gaps(16, 2, device)
    assert_close(gf.group_advantages(r, 4, backend="triton"), group_advantages_ref(r, 4), atol=1e-5, rtol=1e-5)
    scores = torch.randn(16, device=device)
    with gf.force_backend("triton"):
        adv, keep = gf.gfpo_filter(r[:, 0], scores, 4, 2)
    ref_adv, ref_keep = gfpo_filter_ref(r[:, 0], scores, 4, 2)
    assert torch.equal(keep, ref_keep)
    assert_close(adv, ref_adv, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestRealisticShapes:
    """On a GPU: 1,024 prompts x 16 generations, 4 reward functions; GFPO keeping 8 of 16."""

    def test_large_batch(self):
        r = rewards_with_gaps(1024 * 16, 4, "cuda", nan_fraction=0.05)
        for scale in ("group", "batch"):
            assert_close(group_advantages_triton(r, 16, scale_rewards=scale),
                         group_advantages_ref(r, 16, scale_rewards=scale), atol=1e-4, rtol=1e-4)
        scores = torch.randn(1024 * 16, device="cuda")
        adv, keep = gfpo_filter_triton(r[:, 0], scores, 16, 8)
        ref_adv, ref_keep = gfpo_filter_ref(r[:, 0], scores, 16, 8)
        assert torch.equal(keep, ref_keep)
        assert_close(adv, ref_adv, atol=1e-4, rtol=1e-4)
