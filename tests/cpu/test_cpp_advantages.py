"""C++ group_advantages and gfpo_filter (csrc/advantages.cpp, float64 statistics) against the float32 torch
references on fresh random inputs: NaN rewards (single rows, whole functions, whole groups), one and several
reward functions with weights, every scale mode, both aggregations, and scores full of ties."""
import functools

import pytest
import torch

import gfpo_fast as gf
from gfpo_fast.advantages import gfpo_filter_ref, group_advantages_ref

group_advantages_cpp = functools.partial(gf.group_advantages, backend="cpp")
gfpo_filter_cpp = functools.partial(gf.gfpo_filter, backend="cpp")

# Continuous random rewards keep group stds away from 0, where the float32 reference's rounding of an
# all-equal group (tests/test_advantages.py, parity 7) would be amplified by 1 / (std + 1e-4).
TOL = dict(atol=1e-5, rtol=1e-5)


def rewards_with_nans(n, f, seed, nan_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, f, generator=g) * 2 + 0.5
    r[torch.rand(n, f, generator=g) < nan_fraction] = torch.nan
    if n >= 8:
        r[4:8] = torch.nan  # a whole group of 4 without any reward
    return r if f > 1 else r[:, 0]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_funcs", [1, 3])
@pytest.mark.parametrize("group", [1, 2, 4, 7])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_group_advantages_matches_reference(seed, num_funcs, group, scale, aggregation):
    rewards = rewards_with_nans(group * 6, num_funcs, seed)
    weights = None if num_funcs == 1 else [1.0, -0.5, 2.0]
    kw = dict(reward_weights=weights, scale_rewards=scale, aggregation=aggregation)
    out = group_advantages_cpp(rewards, group, **kw)
    assert out.dtype == torch.float32 and out.shape == (group * 6,)
    torch.testing.assert_close(out, group_advantages_ref(rewards, group, **kw), **TOL)


def test_group_advantages_bf16_and_all_nan():
    rewards = rewards_with_nans(16, 2, seed=5).bfloat16()
    torch.testing.assert_close(group_advantages_cpp(rewards, 4), group_advantages_ref(rewards, 4), **TOL)
    assert torch.all(group_advantages_cpp(torch.full((8,), torch.nan), 4) == 0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("group,k", [(4, 2), (5, 3), (8, 6), (16, 2)])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_gfpo_filter_matches_reference_with_ties(seed, group, k, scale):
    g = torch.Generator().manual_seed(seed)
    n = group * 5
    rewards = torch.randn(n, generator=g)
    rewards[torch.rand(n, generator=g) < 0.15] = torch.nan
    scores = torch.randint(-2, 2, (n,), generator=g).float()  # four values: ties in every group
    adv, keep = gfpo_filter_cpp(rewards, scores, group, k, scale_rewards=scale)
    adv_r, keep_r = gfpo_filter_ref(rewards, scores, group, k, scale_rewards=scale)
    assert torch.equal(keep, keep_r)
    assert torch.all(keep.view(-1, group).sum(1) == k)
    torch.testing.assert_close(adv, adv_r, **TOL)
    assert torch.all(adv[~keep] == 0)
