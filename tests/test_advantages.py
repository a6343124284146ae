"""gf.group_advantages / gf.gfpo_filter / gf.reward_metrics: TRL's fixtures (docs/semantics.md section 14),
the parity list (3-7, 21) and bad input. The fast backends are compared with the reference in
tests/backends; here every check runs on every available backend."""
import math

import pytest
import torch

import gfpo_fast as gf
from gfpo_fast import backends

nan = math.nan
AVAILABLE = ["torch"] + [b for b in ("cpp",) if backends.cpp_status()[0]]


@pytest.fixture(params=AVAILABLE)
def backend(request):
    return request.param


def adv(rewards, G, backend, **kw):
    return gf.group_advantages(torch.tensor(rewards, dtype=torch.float32), G, backend=backend, **kw)


def test_group_scaling_fixture(backend):
    r = [1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5]
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # Bessel std of (1,0,0,1) plus the additive 1e-4
    torch.testing.assert_close(adv(r, 4, backend), torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6, rtol=0)
    assert a == pytest.approx(0.865875, abs=1e-6)


@pytest.mark.parametrize("scale,expected", [("none", 0.5), (False, 0.5), ("batch", 1.322526), (True, 0.865875)])
def test_scale_modes(backend, scale, expected):
    out = adv([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5], 4, backend, scale_rewards=scale)
    torch.testing.assert_close(out, torch.tensor([1, -1, -1, 1, 0, 0, 0, 0.0]) * expected, atol=1e-6, rtol=0)


def test_missing_rewards_single_function(backend):
    out = adv([1, nan, 0, 1, nan, nan, nan, 2], 4, backend)
    torch.testing.assert_close(out, torch.tensor([0.577250, 0, -1.154501, 0.577250, 0, 0, 0, 0]), atol=1e-6, rtol=0)


def test_missing_rewards_two_functions(backend):
    r = torch.tensor([[1, nan], [0, 1], [nan, nan], [1, 0]])
    out = gf.group_advantages(r, 4, reward_weights=[0.7, 0.3], backend=backend)
    torch.testing.assert_close(out, torch.tensor([0.577100, -1.154201, 0, 0.577100]), atol=1e-6, rtol=0)
    m = gf.reward_metrics(r, 4, reward_weights=[0.7, 0.3])
    assert m["reward"].item() == pytest.approx(0.566667, abs=1e-6)


def test_normalize_then_sum(backend):
    R = torch.tensor([[1, 0], [0, 1], [0, 0], [1, 1], [1, 0], [1, 0], [0, 1], [0, 0]], dtype=torch.float32)
    expected = [0.476970, -0.476970, -1.430909, 1.430909, 0.678568, 0.678568, -0.127826, -1.229311]
    for scale in ("group", "none"):  # scale_rewards is ignored, as in TRL
        out = gf.group_advantages(R, 4, reward_weights=[1, 0.5], aggregation="normalize_then_sum",
                                  scale_rewards=scale, backend=backend)
        torch.testing.assert_close(out, torch.tensor(expected), atol=1e-6, rtol=0)


def test_two_generations(backend):
    torch.testing.assert_close(adv([3, 1], 2, backend), torch.tensor([0.707057, -0.707057]), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv([3, 1], 2, backend, scale_rewards="none"), torch.tensor([1.0, -1.0]))


def test_all_equal_group_matches_trl_float32_rounding():
    """Parity 7: TRL's float32 mean of seven 0.3 is 0.29999998, so A ~ 2.98e-4 (not 0); 0.1 x 3 gives 0."""
    out = adv([0.3] * 7, 7, "torch")
    torch.testing.assert_close(out, torch.full((7,), 2.98e-4), atol=2e-6, rtol=0)
    assert gf.reward_metrics(torch.full((7,), 0.3), 7)["frac_reward_zero_std"].item() == 0.0
    assert torch.all(adv([0.1] * 3, 3, "torch") == 0)


def test_all_equal_group_is_zero_on_fast_backends(backend):
    """Representable equal rewards give exactly 0 on every backend."""
    assert torch.all(adv([1.0] * 4 + [0.0] * 4, 4, backend) == 0)


def test_single_scored_row_and_unscorable_group(backend):
    out = adv([1, nan, nan, nan, nan, nan, nan, nan], 4, backend)
    assert torch.all(out == 0)


def test_reward_metrics_fixture():
    r = torch.tensor([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5])
    m = gf.reward_metrics(r, 4)
    assert m["reward_std"].item() == pytest.approx(0.377964, abs=1e-6)
    assert m["frac_reward_zero_std"].item() == 0.5
    assert gf.reward_metrics(r, 4, scale_rewards="none")["frac_reward_zero_std"].item() == 0.5
    assert gf.reward_metrics(r, 4, scale_rewards="batch")["frac_reward_zero_std"].item() == 0.0
    named = gf.reward_metrics(torch.stack([r, 2 * r], 1), 4, reward_names=["acc", "fmt"])
    assert named["rewards/fmt/mean"].item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- GFPO
def test_gfpo_fixture_uses_the_right_groups(backend):
    """docs/semantics.md section 12: TRL v1.7.1 kept rows 3, 1, 6, 4 (wrong window); the intended rows are
    3, 1, 6, 5."""
    lengths = torch.tensor([3, 1, 2, 0, 5, 2, 1, 4], dtype=torch.float32)
    rewards = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0], dtype=torch.float32)
    a, keep = gf.gfpo_filter(rewards, -lengths, 4, 2, backend=backend)
    assert keep.nonzero().flatten().tolist() == [1, 3, 5, 6]
    torch.testing.assert_close(a, torch.tensor([0, 0, 0, 0, 0, 0.707007, -0.707007, 0]), atol=1e-6, rtol=0)


def test_gfpo_statistics_over_kept_rows_only(backend):
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.0, 5.0])
    scores = torch.tensor([3.0, 2.0, 1.0, 0.0, 5.0, 4.0])
    a, keep = gf.gfpo_filter(rewards, scores, 6, 3, backend=backend)
    assert keep.tolist() == [True, False, False, False, True, True]
    kept = rewards[keep]
    expected = torch.zeros(6)
    expected[keep] = (kept - kept.mean()) / (kept.std() + 1e-4)
    torch.testing.assert_close(a, expected, atol=1e-6, rtol=0)


def test_gfpo_ties_prefer_lower_index(backend):
    a, keep = gf.gfpo_filter(torch.tensor([1.0, 0, 1, 0]), torch.zeros(4), 4, 2, backend=backend)
    assert keep.tolist() == [True, True, False, False]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_gfpo_matches_grpo_on_the_kept_rows(backend, scale):
    """Advantages of the kept rows equal group advantages computed on the compacted batch."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (24,), generator=g).float()
    scores = torch.randn(24, generator=g)
    a, keep = gf.gfpo_filter(rewards, scores, 6, 4, scale_rewards=scale, backend=backend)
    assert keep.view(4, 6).sum(1).tolist() == [4] * 4
    compact = gf.group_advantages(rewards[keep], 4, scale_rewards=scale, backend="torch")
    torch.testing.assert_close(a[keep], compact, atol=1e-5, rtol=1e-5)
    assert torch.all(a[~keep] == 0)


@pytest.mark.parametrize("k", [0, 1, 4, 5, 2.0, True])
def test_gfpo_k_out_of_range(k):
    with pytest.raises(ValueError, match="num_remains_in_group"):
        gf.gfpo_filter(torch.zeros(8), torch.zeros(8), 4, k)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,match", [
    (lambda: gf.group_advantages(torch.zeros(6), 4), "multiple of num_generations"),
    (lambda: gf.group_advantages(torch.zeros(8), 0), "num_generations"),
    (lambda: gf.group_advantages(torch.zeros(8, dtype=torch.long), 4), "floating-point"),
    (lambda: gf.group_advantages(torch.zeros(8, 2), 4, reward_weights=[1.0]), "reward_weights"),
    (lambda: gf.group_advantages(torch.zeros(8), 4, scale_rewards="groups"), "scale_rewards"),
    (lambda: gf.group_advantages(torch.zeros(8), 4, aggregation="sum"), "aggregation"),
    (lambda: gf.group_advantages(torch.zeros(8, 1, 1), 4), "dimensions"),
    (lambda: gf.gfpo_filter(torch.zeros(8), torch.zeros(7), 4, 2), "scores"),
    (lambda: gf.gfpo_filter(torch.zeros(8), torch.full((8,), nan), 4, 2), "NaN"),
    (lambda: gf.group_advantages(torch.zeros(8), 4, backend="gpu"), "backend"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
