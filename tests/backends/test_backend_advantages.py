"""group_advantages and gfpo_filter on every fast backend (through the public ops) against the float32 torch
references on fresh random inputs: NaN rewards (single entries, whole rows, whole groups), one and several reward
functions with weights, every scale mode and its boolean spellings, both aggregations, G = 1 and 2, bf16 and
float64 rewards, and GFPO scores full of ties (the lower index wins; a group where every score ties)."""
import functools

import pytest
import torch
from backend_checks import INTERPRETER_NUMPY_WARNINGS, assert_close

import gfpo_fast as gf
from gfpo_fast.advantages import gfpo_filter_ref, gfpo_keep_mask, group_advantages_ref

pytestmark = INTERPRETER_NUMPY_WARNINGS

# Continuous random rewards keep group stds away from 0, where the float32 reference's rounding of an
# all-equal group (tests/test_advantages.py, parity 7) would be amplified by 1 / (std + 1e-4).
TOL = dict(atol=1e-5, rtol=1e-5)


def ops(backend):
    return (functools.partial(gf.group_advantages, backend=backend.name),
            functools.partial(gf.gfpo_filter, backend=backend.name))


def rewards_with_nans(n, f, seed, device, nan_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, f, generator=g) * 2 + 0.5
    r[torch.rand(n, f, generator=g) < nan_fraction] = torch.nan
    r[1] = torch.nan  # a row with no reward at all
    if n >= 8:
        r[4:8] = torch.nan  # a whole group of 4 without any reward
    return (r if f > 1 else r[:, 0]).to(device)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_funcs", [1, 3])
@pytest.mark.parametrize("group", [1, 2, 4, 7])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_group_advantages_matches_reference(backend, seed, num_funcs, group, scale, aggregation):
    rewards = rewards_with_nans(group * 6, num_funcs, seed, backend.device)
    weights = None if num_funcs == 1 else [1.0, -0.5, 2.0]
    kw = dict(reward_weights=weights, scale_rewards=scale, aggregation=aggregation)
    out = ops(backend)[0](rewards, group, **kw)
    assert out.dtype == torch.float32 and out.shape == (group * 6,)
    assert_close(out, group_advantages_ref(rewards, group, **kw), **TOL, name="advantages")


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_boolean_scale_rewards(backend, scale, aggregation):
    rewards = rewards_with_nans(24, 3, 0, backend.device)
    kw = dict(reward_weights=[1.0, 0.5, 2.0], scale_rewards=scale, aggregation=aggregation)
    assert_close(ops(backend)[0](rewards, 6, **kw), group_advantages_ref(rewards, 6, **kw), **TOL)


def test_low_and_high_precision_rewards_and_missing_groups(backend):
    group_advantages = ops(backend)[0]
    rewards = rewards_with_nans(16, 2, 5, backend.device).bfloat16()
    assert_close(group_advantages(rewards, 4), group_advantages_ref(rewards, 4), **TOL)
    assert torch.all(group_advantages(torch.full((8,), torch.nan, device=backend.device), 4) == 0)

    r = torch.randn(12, device=backend.device, dtype=torch.float64)
    r[4:8] = float("nan")  # group 1 has no reward: advantages 0
    r[9] = float("nan")
    out = group_advantages(r, 4)
    assert_close(out, group_advantages_ref(r, 4), **TOL)
    assert torch.equal(out[4:8], torch.zeros(4, device=backend.device))


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("group,k", [(3, 2), (4, 2), (5, 3), (8, 6), (16, 2), (16, 15)])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_gfpo_filter_matches_reference_with_ties(backend, seed, group, k, scale):
    g = torch.Generator().manual_seed(seed)
    n = group * 5
    rewards = torch.randn(n, generator=g)
    rewards[torch.rand(n, generator=g) < 0.15] = torch.nan
    scores = torch.randint(-2, 2, (n,), generator=g).float()  # four values: ties in every group
    scores[group: 2 * group] = float("-inf")  # a group where every score ties
    rewards, scores = rewards.to(backend.device), scores.to(backend.device)
    adv, keep = ops(backend)[1](rewards, scores, group, k, scale_rewards=scale)
    adv_r, keep_r = gfpo_filter_ref(rewards, scores, group, k, scale_rewards=scale)
    assert keep.dtype == torch.bool and torch.equal(keep, keep_r)
    assert torch.equal(keep[group: 2 * group], torch.arange(group, device=backend.device) < k)
    assert torch.all(keep.view(-1, group).sum(1) == k)
    assert_close(adv, adv_r, **TOL, name="advantages")
    assert torch.all(adv[~keep] == 0)


def test_gfpo_keep_mask_is_a_stable_descending_sort(backend):
    scores = torch.tensor([0.5, 2.0, 2.0, -1.0, 2.0, 0.5], device=backend.device)
    _, keep = ops(backend)[1](torch.zeros(6, device=backend.device), scores, 6, 3)
    assert keep.tolist() == [False, True, True, False, True, False]
    assert torch.equal(keep, gfpo_keep_mask(scores, 6, 3))


def test_public_ops_dispatch_to_the_backend(backend):
    r = rewards_with_nans(16, 2, 0, backend.device)
    scores = torch.randn(16, device=backend.device)
    with gf.force_backend(backend.name):
        assert_close(gf.group_advantages(r, 4), group_advantages_ref(r, 4), **TOL)
        adv, keep = gf.gfpo_filter(r[:, 0], scores, 4, 2)
    ref_adv, ref_keep = gfpo_filter_ref(r[:, 0], scores, 4, 2)
    assert torch.equal(keep, ref_keep)
    assert_close(adv, ref_adv, **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.only_backends("triton", reason="the GPU backend at GPU sizes")
class TestRealisticShapes:
    """On a GPU: 1,024 prompts x 16 generations, 4 reward functions; GFPO keeping 8 of 16."""

    def test_large_batch(self, backend):
        group_advantages, gfpo_filter = ops(backend)
        r = rewards_with_nans(1024 * 16, 4, 0, "cuda", nan_fraction=0.05)
        for scale in ("group", "batch"):
            assert_close(group_advantages(r, 16, scale_rewards=scale),
                         group_advantages_ref(r, 16, scale_rewards=scale), atol=1e-4, rtol=1e-4)
        scores = torch.randn(1024 * 16, device="cuda")
        adv, keep = gfpo_filter(r[:, 0], scores, 16, 8)
        ref_adv, ref_keep = gfpo_filter_ref(r[:, 0], scores, 16, 8)
        assert torch.equal(keep, ref_keep)
        assert_close(adv, ref_adv, atol=1e-4, rtol=1e-4)
