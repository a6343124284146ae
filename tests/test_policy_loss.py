"""gf.policy_loss against TRL's reference numbers (docs/semantics.md section 14), parity cases,
property tests on random inputs, float64 gradchecks and bad-input errors; ``token_separable`` (which path the
fused-linear loss takes) against the reference loss's gradients."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gfpo_fast as gf
from gfpo_fast.fused_linear import PolicyLoss
from gfpo_fast.policy_loss import (
    GLOBAL_TOKEN_LOSSES,
    LOSS_TYPES,
    SEQUENCE_TOKEN_LOSSES,
    high_entropy_mask,
    make_loss_config,
    token_separable,
)

import fused_linear_cases as cases
from spec_fixtures import ADVANTAGES, COMMON, HAND_TABLE, LOGP, LOSS_TABLE, MASK, OLD_LOGP, REF_LOGP


def run(old_logp=OLD_LOGP, mask=MASK, advantages=ADVANTAGES, **kwargs):
    lp = LOGP.clone().requires_grad_()
    loss, metrics = gf.policy_loss(lp, old_logp, advantages, mask, **{**COMMON, **kwargs})
    loss.backward()
    return loss.item(), lp.grad, {k: v.item() for k, v in metrics.items()}


@pytest.mark.parametrize("kwargs,loss,gradsum,expected", [row[1:] for row in LOSS_TABLE + HAND_TABLE],
                         ids=[r[0] for r in LOSS_TABLE + HAND_TABLE])
def test_reference_table(kwargs, loss, gradsum, expected):
    value, grad, metrics = run(**kwargs)
    assert value == pytest.approx(loss, abs=1e-6)
    assert grad.sum().item() == pytest.approx(gradsum, abs=1e-6)
    for name, ref in expected.items():
        assert metrics[name] == pytest.approx(ref, abs=1e-4), name


def test_token_gradients_rows():
    _, grad, _ = run(loss_type="grpo")
    torch.testing.assert_close(grad[0], torch.tensor([-0.056552, 0.0, -0.048675, -0.0625]), atol=1e-6, rtol=0)
    _, grad, _ = run(loss_type="dapo")
    torch.testing.assert_close(grad[0], torch.tensor([-0.090484, 0.0, -0.07788, -0.1]), atol=1e-6, rtol=0)


def test_on_policy_is_plain_policy_gradient():
    """Parity 8: no old log-probs -> ratio 1; grpo loss = -mean(A), gradient -A_i / |o_i| / B."""
    value, grad, _ = run(old_logp=None, loss_type="grpo")
    assert value == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(grad[0], torch.full((4,), -0.0625))
    torch.testing.assert_close(grad[1, :3], torch.full((3,), 0.5 / 3 / 4))
    value, grad, _ = run(old_logp=None, loss_type="dapo")
    assert value == pytest.approx(-0.25, abs=1e-6)
    assert grad.sum().item() == pytest.approx(-0.25, abs=1e-6)


def test_fully_masked_row():
    """Parity 19: a fully masked row counts in B with zero contribution; GMPO gives it -A_i, no gradient."""
    mask = MASK.clone()
    mask[3] = 0
    assert run(old_logp=None, mask=mask, loss_type="grpo", num_items_in_batch=9)[0] == pytest.approx(-0.25, abs=1e-6)
    loss = run(old_logp=None, mask=mask, loss_type="dapo", num_items_in_batch=9)[0]
    assert loss == pytest.approx(-0.388889, abs=1e-6)
    value, grad, _ = run(old_logp=None, mask=mask, algorithm="gmpo")
    assert value == pytest.approx(-(1.0 - 0.5 + 0.5 + (-1.0)) / 4, abs=1e-6)
    assert torch.all(grad[3] == 0)


@pytest.mark.parametrize("loss_type", [lt for lt in LOSS_TYPES if lt not in GLOBAL_TOKEN_LOSSES])
def test_grad_accum_divides_loss(loss_type):
    """Parity 10: grpo/bnpo/dr_grpo/sapo/luspo divide by GA; dapo/cispo/vespo use the global token count."""
    one, g1, _ = run(loss_type=loss_type)
    two, g2, _ = run(loss_type=loss_type, grad_accum_steps=2)
    assert two == pytest.approx(one / 2, abs=1e-7)
    torch.testing.assert_close(g2, g1 / 2)


@pytest.mark.parametrize("loss_type", GLOBAL_TOKEN_LOSSES)
def test_process_count_scales_token_normaliser(loss_type):
    one, _, _ = run(loss_type=loss_type, num_items_in_batch=20)
    two, _, _ = run(loss_type=loss_type, num_items_in_batch=20, num_processes=2)
    assert two == pytest.approx(2 * one, rel=1e-6)


def test_kl_is_added_after_clipping_and_rho():
    """Parity 14: beta * k3 is added to the per-token loss unaffected by clipping or the IS ratio."""
    base, _, _ = run(loss_type="dapo", epsilon=1e-3)
    with_kl, _, m = run(loss_type="dapo", epsilon=1e-3, beta=0.5, ref_logp=REF_LOGP)
    d = REF_LOGP - LOGP
    kl = ((torch.exp(d) - d - 1) * MASK).sum().item()
    assert with_kl - base == pytest.approx(0.5 * kl / 10, abs=1e-6)
    assert m["kl"] == pytest.approx(kl / 10, abs=1e-6)


def test_delta_caps_ratio_but_not_clipped_branch():
    """Parity 12: delta caps r inside the min, r_clipped uses the unclamped r."""
    lp = torch.tensor([[0.5]], requires_grad=True)
    old = torch.zeros(1, 1)
    mask = torch.ones(1, 1)
    loss, _ = gf.policy_loss(lp, old, torch.tensor([1.0]), mask, loss_type="bnpo", delta=1.3, epsilon_high=10.0)
    assert loss.item() == pytest.approx(-1.3, abs=1e-6)  # min(min(e^0.5, 1.3), clamp(e^0.5)) * 1
    # A < 0: without delta the loss is max(r, r_clipped) = e^0.5; delta caps it at 1.3 (> r_clipped = 1.2).
    loss, _ = gf.policy_loss(lp, old, torch.tensor([-1.0]), mask, loss_type="bnpo", epsilon_high=0.2)
    assert loss.item() == pytest.approx(math.exp(0.5), abs=1e-6)
    loss, _ = gf.policy_loss(lp, old, torch.tensor([-1.0]), mask, loss_type="bnpo", delta=1.3, epsilon_high=0.2)
    assert loss.item() == pytest.approx(1.3, abs=1e-6)


def test_cispo_cap_is_absolute():
    """Parity 13: cispo caps the ratio at epsilon_high itself (default epsilon = 0.2), no lower clip."""
    lp = torch.tensor([[-1.0]], requires_grad=True)
    old = torch.tensor([[-1.5]])
    loss, m = gf.policy_loss(lp, old, torch.tensor([2.0]), torch.ones(1, 1), loss_type="cispo")
    assert loss.item() == pytest.approx(-0.2 * 2.0 * -1.0, abs=1e-6)
    assert m["cispo_clip_ratio"].item() == 1.0
    loss.backward()
    assert lp.grad.item() == pytest.approx(-0.2 * 2.0, abs=1e-6)  # the capped ratio carries no gradient


def test_gpg_is_the_unclipped_policy_gradient():
    """GPG reads no old log-probs (no ratio, no clip): any old_logp gives the same loss and dL/dlp = -A_i M / N."""
    on_policy = run(old_logp=None, loss_type="gpg")
    far = run(old_logp=OLD_LOGP + 3.0, loss_type="gpg")
    assert on_policy[0] == far[0] == pytest.approx(0.2875, abs=1e-6)
    torch.testing.assert_close(far[1], -ADVANTAGES[:, None] * MASK / 10)
    torch.testing.assert_close(on_policy[1], far[1])


# ----------------------------------------------------------------------------- random inputs
def random_batch(seed, B=5, T=7, dtype=torch.float32, per_token_adv=False, spread=0.3, min_len=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=dtype) * 3 - 0.01
    old = lp + (torch.rand(B, T, generator=g, dtype=dtype) - 0.5) * 2 * spread
    ref = lp + (torch.rand(B, T, generator=g, dtype=dtype) - 0.5) * 2 * spread
    lengths = torch.randint(min_len, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T) < lengths[:, None]).to(dtype)
    adv_shape = (B, T) if per_token_adv else (B,)
    adv = torch.randn(adv_shape, generator=g, dtype=dtype)
    rho = (torch.rand(B, T, generator=g, dtype=dtype) * 1.5 + 0.25)
    return lp, old, ref, mask, adv, rho


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), loss_type=st.sampled_from(SEQUENCE_TOKEN_LOSSES),
       beta=st.sampled_from([0.0, 0.04]), delta=st.sampled_from([None, 1.15]))
def test_gspo_token_equals_gspo_for_sequence_advantages(seed, loss_type, beta, delta):
    lp, old, ref, mask, adv, _ = random_batch(seed)
    results = []
    for level in ("sequence", "sequence_token"):
        x = lp.clone().requires_grad_()
        loss, _ = gf.policy_loss(x, old, adv, mask, loss_type=loss_type, importance_sampling_level=level, beta=beta,
                                 ref_logp=ref, delta=delta, max_completion_length=7)
        loss.backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), beta=st.sampled_from([0.0, 0.04]))
def test_gmpo_equals_gspo_grpo_when_nothing_clips(seed, beta):
    # No fully masked rows: GMPO gives such a row -A_i (log W = 0), grpo gives it 0 (parity 19).
    lp, old, ref, mask, adv, _ = random_batch(seed, spread=0.05, min_len=1)
    outs = []
    for kw in (dict(algorithm="gmpo", epsilon=0.5),
               dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.5)):
        x = lp.clone().requires_grad_()
        loss, m = gf.policy_loss(x, old, adv, mask, beta=beta, ref_logp=ref, **kw)
        loss.backward()
        assert m["clip_ratio/region_mean"].item() == 0.0
        outs.append((loss.detach(), x.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-6, rtol=1e-5)


# cispo's capped ratio and vespo's phi are stop-gradients by definition (finite differences see them
# move): their gradients are checked against closed forms in test_cispo_* and test_vespo_*.
GRADCHECK_CASES = [dict(loss_type=lt) for lt in LOSS_TYPES if lt not in ("cispo", "vespo")] + [
    dict(loss_type=lt, importance_sampling_level=lvl)
    for lt in ("grpo", "dapo", "luspo") for lvl in ("sequence", "sequence_token")
] + [dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=True), dict(loss_type="grpo", delta=1.1, beta=0.1),
     dict(loss_type="dapo", rho=True), dict(loss_type="sapo", rho=True), dict(loss_type="grpo", rho=True),
     dict(algorithm="gmpo"), dict(algorithm="gmpo", epsilon=0.05, beta=0.1)]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_float64(case, seed):
    """The analytic gradient of every loss equals finite differences of a float64 evaluation."""
    case = dict(case)
    use_rho = case.pop("rho", False)
    lp, old, ref, mask, adv, rho = random_batch(seed, B=3, T=4, dtype=torch.float64, spread=0.4)
    if case.get("loss_type") == "luspo" and case.get("importance_sampling_level") == "sequence_token":
        pytest.skip("GSPO-token supports grpo/bnpo/dr_grpo/dapo only")

    def f(x):
        return gf.policy_loss(x, old, adv, mask, ref_logp=ref, max_completion_length=4,
                              importance_sampling_ratio=rho if use_rho else None, **case)[0]

    assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


def test_vespo_gradient_treats_phi_as_constant():
    lp, old, _, mask, adv, _ = random_batch(5)
    x = lp.clone().requires_grad_()
    loss, m = gf.policy_loss(x, old, adv, mask, loss_type="vespo")
    loss.backward()
    from gfpo_fast.policy_loss import make_loss_config, vespo_weights
    phi = vespo_weights(make_loss_config(loss_type="vespo"), adv[:, None], lp - old, mask)
    torch.testing.assert_close(x.grad, -phi * adv[:, None] * mask / mask.sum())
    torch.testing.assert_close(m["vespo/phi_seq_mean"], phi.mean())


def test_per_token_advantages_broadcast():
    lp, old, _, mask, adv, _ = random_batch(3, per_token_adv=True)
    x = lp.clone().requires_grad_()
    loss, _ = gf.policy_loss(x, old, adv, mask, loss_type="bnpo")
    r = torch.exp(x - old)
    expected = -(torch.min(r * adv, r.clamp(0.8, 1.2) * adv) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="ppo"), "loss_type"),
    (dict(algorithm="dpo"), "algorithm"),
    (dict(importance_sampling_level="tokens"), "importance_sampling_level"),
    (dict(loss_type="cispo", importance_sampling_level="sequence_token"), "sequence_token"),
    (dict(loss_type="gpg", importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
    (dict(epsilon=-0.1), "epsilon"),
    (dict(epsilon_high=-1.0), "epsilon_high"),
    (dict(delta=0.0), "delta"),
    (dict(beta=0.1), "ref_logp"),
    (dict(beta=-0.1), "beta"),
    (dict(loss_type="dr_grpo", max_completion_length=None), "max_completion_length"),
    (dict(grad_accum_steps=0), "grad_accum_steps"),
    (dict(loss_type="dapo", grad_accum_steps=2, num_items_in_batch=None), "num_items_in_batch"),
    (dict(algorithm="gmpo", importance_sampling_level="sequence"), "gmpo"),
    (dict(algorithm="gmpo", importance_sampling_ratio=torch.ones(4)), "importance_sampling_ratio"),
    (dict(loss_type="vespo", importance_sampling_ratio=torch.ones(4)), "vespo"),
    (dict(importance_sampling_ratio=torch.ones(3)), "importance_sampling_ratio"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gf.policy_loss(LOGP, OLD_LOGP, ADVANTAGES, MASK, **{**COMMON, **kwargs})


@pytest.mark.parametrize("args,match", [
    ((LOGP, OLD_LOGP, ADVANTAGES, MASK[:, :3]), "mask"),
    ((LOGP, OLD_LOGP[:3], ADVANTAGES, MASK), "old_logp"),
    ((LOGP, OLD_LOGP, ADVANTAGES[:3], MASK), "advantages"),
    ((LOGP[0], OLD_LOGP, ADVANTAGES, MASK), "logp"),
    ((LOGP, OLD_LOGP, torch.ones(4, 4), MASK), None),  # per-token advantages are valid
])
def test_bad_shapes(args, match):
    if match is None:
        gf.policy_loss(*args)
        return
    with pytest.raises(ValueError, match=match):
        gf.policy_loss(*args)


def test_gmpo_needs_sequence_advantages():
    with pytest.raises(ValueError, match="advantages"):
        gf.policy_loss(LOGP, OLD_LOGP, torch.ones(4, 4), MASK, algorithm="gmpo")


@pytest.mark.parametrize("kwargs", [dict(loss_type="dapo"),
                                    dict(loss_type="grpo", importance_sampling_level="sequence"),
                                    dict(algorithm="gmpo"), dict(loss_type="vespo")])
def test_masked_tokens_with_non_finite_logprobs_do_not_leak(kwargs):
    """Padding positions may hold -inf log-probs; masked entries contribute exactly 0 (TRL would give NaN)."""
    lp = LOGP.clone()
    lp[MASK == 0] = -float("inf")
    x = lp.clone().requires_grad_()
    loss, metrics = gf.policy_loss(x, OLD_LOGP, ADVANTAGES, MASK, **{**COMMON, **kwargs})
    loss.backward()
    y = LOGP.clone().requires_grad_()
    clean, _ = gf.policy_loss(y, OLD_LOGP, ADVANTAGES, MASK, **{**COMMON, **kwargs})
    clean.backward()
    torch.testing.assert_close(loss, clean)
    torch.testing.assert_close(x.grad, y.grad)


@cases.CONFIG_WARNINGS
@pytest.mark.parametrize(("kwargs", "on_policy"), [c[1:] for c in cases.CONFIGS], ids=[c[0] for c in cases.CONFIGS])
def test_token_separable_agrees_with_the_reference_gradient(kwargs, on_policy):
    """Perturbing the log-probs of every token outside ``S`` leaves the reference's gradient on ``S`` unchanged
    exactly when ``token_separable`` says so (on these inputs, where no clip or cap holds every ratio)."""
    B, T = cases.B, cases.T
    (hidden, weight, bias, ids, mask), tensors = cases.make_inputs()
    cfg, (old, adv), _, tensor_kw = cases.split(kwargs, tensors, on_policy)
    loss = PolicyLoss(cfg, old, adv, mask, tensor_kw)
    lp = tensors["ref_logp"] - 0.1
    inside = (torch.arange(B * T) % 3 == 0).view(B, T)
    moved = torch.where(inside, lp, lp + 0.5 * torch.randn(B, T, generator=torch.Generator().manual_seed(1)))
    same = torch.allclose(loss.dlogp(lp.reshape(-1))[inside.reshape(-1)],
                          loss.dlogp(moved.reshape(-1))[inside.reshape(-1)], atol=1e-7, rtol=1e-6)
    assert same == token_separable(cfg, on_policy=on_policy)


def test_documented_paths():
    """gfpo_fast/fused_linear.py's docstring examples: off-policy token-level losses and on-policy GSPO / GMPO form
    the gradient in forward; off-policy GSPO, GMPO and VESPO, and GSPO's bias-corrected KL, recompute."""
    def separable(on_policy, **kw):
        return token_separable(make_loss_config(**kw), on_policy=on_policy)

    assert separable(False, loss_type="dapo") and separable(False, loss_type="cispo", beta=0.1)
    assert separable(True, importance_sampling_level="sequence") and separable(True, algorithm="gmpo", beta=0.1)
    assert separable(True, loss_type="vespo")
    assert not separable(False, importance_sampling_level="sequence")
    assert not separable(False, algorithm="gmpo") and not separable(False, loss_type="vespo")
    assert not separable(True, importance_sampling_level="sequence", beta=0.1, use_bias_correction_kl=True)


# ----------------------------------------------------------------------------- the registry of loss types
def test_unknown_loss_type_is_an_error_everywhere():
    """A name outside the registry is refused by the checks and by every function that reads the registry, even
    in a hand-built LossConfig that skipped make_loss_config (no branch falls through to another loss)."""
    import dataclasses

    from gfpo_fast.policy_loss import check_loss_inputs, policy_loss_ref, row_weights

    with pytest.raises(ValueError, match="loss_type"):
        make_loss_config(loss_type="ppo")
    cfg = dataclasses.replace(make_loss_config(), loss_type="ppo")
    for call in (lambda: policy_loss_ref(cfg, LOGP, OLD_LOGP, ADVANTAGES, MASK),
                 lambda: row_weights(cfg, MASK),
                 lambda: token_separable(cfg, on_policy=False),
                 lambda: check_loss_inputs(cfg, LOGP, OLD_LOGP, ADVANTAGES, MASK)):
        with pytest.raises(ValueError, match="loss_type must be one of"):
            call()


def test_loss_config_fields_come_from_the_registry():
    """LossConfig has one float field per registered hyperparameter, with its default, after the common fields;
    make_loss_config validates each as its entry says."""
    import dataclasses

    from gfpo_fast.policy_loss import LOSS_PARAMS, LOSS_REGISTRY, LossConfig

    fields = {f.name: f for f in dataclasses.fields(LossConfig)}
    assert list(fields)[-len(LOSS_PARAMS):] == [p.name for p in LOSS_PARAMS]
    assert {p.name for lt in LOSS_REGISTRY.values() for p in lt.params} == {p.name for p in LOSS_PARAMS}
    for p in LOSS_PARAMS:
        assert fields[p.name].default == p.default
        with pytest.raises(ValueError, match=p.name):
            make_loss_config(**{p.name: 0.0 if p.positive else float("nan")})


@pytest.mark.parametrize("name", LOSS_TYPES)
def test_metric_names_are_the_registered_ones(name):
    """Each loss type logs exactly its registered metrics (besides kl and entropy), at every level it allows."""
    from gfpo_fast.policy_loss import LOSS_REGISTRY

    spec = LOSS_REGISTRY[name]
    assert set(spec.row_metrics) <= set(spec.metrics)
    for level in spec.levels:
        kw = dict(loss_type=name, importance_sampling_level=level, beta=0.1, ref_logp=REF_LOGP)
        if spec.meant_for_level not in (None, level):
            with pytest.warns(UserWarning, match="meant for"):
                metrics = run(**kw)[2]
        else:
            metrics = run(**kw)[2]
        assert list(metrics) == ["kl", *spec.metrics]


# ----------------------------------------------------------------------------- the entropy mask (top_entropy_quantile)
ENTROPY = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.7, 0.2, 9.0, 9.0]])
ENTROPY_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # the 9.0 are padding: never counted, never kept


@pytest.mark.parametrize("quantile,gathered,expected", [
    # loss-token entropies sorted: 0.1 0.2 0.3 0.5 0.7 0.9; the threshold is their (1 - quantile) quantile
    (0.5, None, [[0, 1, 1, 0], [1, 0, 0, 0]]),  # position 0.5 * 5 = 2.5: (0.3 + 0.5) / 2 = 0.4
    (1 / 3, None, [[0, 0, 1, 0], [1, 0, 0, 0]]),  # position 10/3: 0.5 + (0.7 - 0.5) / 3 = 0.567
    (0.0, None, [[0, 0, 1, 0], [0, 0, 0, 0]]),  # the highest entropy only
    (1.0, None, [[1, 1, 1, 1], [1, 1, 0, 0]]),  # every loss token
    (0.5, [5.0, 6.0], [[0, 0, 1, 0], [1, 0, 0, 0]]),  # another process's 5 and 6: position 3.5, (0.5 + 0.7) / 2
])
def test_high_entropy_mask_by_hand(quantile, gathered, expected):
    gather = None if gathered is None else (lambda v: torch.cat([v, torch.tensor(gathered)]))
    mask = high_entropy_mask(ENTROPY, ENTROPY_MASK, quantile, gather=gather)
    assert mask.dtype == torch.bool and mask.tolist() == torch.tensor(expected, dtype=torch.bool).tolist()


def test_high_entropy_mask_without_loss_tokens_and_bad_quantiles():
    assert not high_entropy_mask(ENTROPY, torch.zeros_like(ENTROPY_MASK), 0.2).any()
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="top_entropy_quantile"):
            high_entropy_mask(ENTROPY, ENTROPY_MASK, bad)
    with pytest.raises(ValueError, match="entropy must have shape"):
        high_entropy_mask(ENTROPY[:, :3], ENTROPY_MASK, 0.2)


LM_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
LM_E = torch.tensor([[True, False, True], [False, True, True]])  # [1, 2] is padding: the loss mask cannot add it


def test_loss_mask_multiplies_the_policy_term_not_the_normaliser():
    """dapo on policy: each token's term is -A_i, so sum(M E (-A)) / sum(M) = (-(1 + 1) + 0.5) / 5 = -0.3 (the
    normaliser still counts all 5 loss tokens); the gradient is -A_i E / 5 and 0 off the entropy mask."""
    lp = torch.full((2, 3), -1.0, requires_grad=True)
    loss, _ = gf.policy_loss(lp, None, torch.tensor([1.0, -0.5]), LM_MASK, loss_type="dapo", loss_mask=LM_E)
    loss.backward()
    assert loss.item() == pytest.approx(-0.3, abs=1e-7)
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.2, 0.0, -0.2], [0.0, 0.1, 0.0]]))


def test_loss_mask_leaves_the_kl_on_every_token():
    """TRL adds beta * KL after the entropy mask: the KL part of the loss does not depend on it."""
    g = torch.Generator().manual_seed(0)
    lp, old, ref = (-torch.rand(2, 3, generator=g) for _ in range(3))
    A = torch.tensor([0.7, -1.2])

    def value(beta, loss_mask):
        return gf.policy_loss(lp, old, A, LM_MASK, loss_type="grpo", beta=beta, ref_logp=ref,
                              loss_mask=loss_mask)[0].item()

    kl_part = value(0.1, None) - value(0.0, None)
    assert kl_part > 1e-4
    assert value(0.1, LM_E) - value(0.0, LM_E) == pytest.approx(kl_part, abs=1e-7)
    assert value(0.0, LM_E) != pytest.approx(value(0.0, None), abs=1e-4)


def test_gmpo_loss_mask_narrows_the_geometric_mean():
    """TRL's GMPO takes the geometric mean over mask * entropy_mask: with beta 0 that is the loss on that mask."""
    g = torch.Generator().manual_seed(1)
    lp, old = (-torch.rand(2, 3, generator=g) for _ in range(2))
    A = torch.tensor([0.7, -1.2])
    masked, _ = gf.policy_loss(lp, old, A, LM_MASK, algorithm="gmpo", loss_mask=LM_E)
    narrowed, _ = gf.policy_loss(lp, old, A, LM_MASK * LM_E, algorithm="gmpo")
    assert masked.item() == pytest.approx(narrowed.item(), abs=1e-7)
    assert masked.item() != pytest.approx(gf.policy_loss(lp, old, A, LM_MASK, algorithm="gmpo")[0].item(), abs=1e-4)


@pytest.mark.parametrize("kwargs", [dict(loss_type="dapo"), dict(loss_type="grpo", beta=0.1),
                                    dict(importance_sampling_level="sequence", loss_type="grpo")],
                         ids=["dapo", "grpo-kl", "gspo"])
@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "off-policy"])
def test_fused_linear_loss_mask_matches_the_reference(kwargs, off_policy):
    """Both paths of fused_linear_policy_loss (grad in forward, recompute) take the loss mask exactly."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g)
    ids = torch.randint(0, 11, (2, 3), generator=g)
    old = -torch.rand(2, 3, generator=g) - 2.0 if off_policy else None
    ref = -torch.rand(2, 3, generator=g) - 2.0
    A = torch.tensor([0.7, -1.2])
    extra = dict(ref_logp=ref) if kwargs.get("beta") else {}
    loss, _ = gf.fused_linear_policy_loss(hidden, weight, ids, old, A, LM_MASK, loss_mask=LM_E, backend="torch",
                                          **extra, **kwargs)
    (grad,) = torch.autograd.grad(loss, hidden)
    h = hidden.detach().clone().requires_grad_()
    logp = torch.log_softmax(h @ weight.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    want, _ = gf.policy_loss(logp, old, A, LM_MASK, loss_mask=LM_E, **extra, **kwargs)
    (want_grad,) = torch.autograd.grad(want, h)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    unmasked, _ = gf.policy_loss(logp, old, A, LM_MASK, **extra, **kwargs)
    assert abs(unmasked.item() - want.item()) > 1e-4
