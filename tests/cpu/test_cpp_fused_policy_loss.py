"""fused_policy_loss on the C++ launchers (gfpo_fast/cpu/logprobs.py) against the reference composition
(fused_policy_loss_ref): every algorithm, loss type and importance-sampling level, KL, delta, the vLLM
IS ratio, masked and fully masked rows, fp32 / bf16, upstream-gradient scaling, no-grad, in-place and
thread-count independence; masked tokens' logits are never read (NaN / inf there changes nothing)."""
import warnings

import pytest
import torch

import gfpo_fast as gf
from gfpo_fast.policy_loss import LOSS_REGISTRY

B, T, V = 4, 6, 257


def make_inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    mask = (torch.arange(T) < torch.tensor([6, 4, 1, 0])[:, None]).float()  # ragged, last row fully masked
    return dict(
        logits=logits, token_ids=ids, mask=mask,
        old_logp=logp + 0.3 * torch.randn(B, T, generator=g),  # ratios on both sides of the clip range
        advantages=torch.tensor([1.0, -0.5, 0.7, -1.0]),
        ref_logp=logp + 0.2 * torch.randn(B, T, generator=g),
        token_rho=torch.rand(B, T, generator=g) * 2,
        seq_rho=torch.rand(B, generator=g) * 2,
    )


def configs():
    """(id, fused_policy_loss keywords using the names of make_inputs for tensors)."""
    out = [("gmpo", dict(algorithm="gmpo")), ("gmpo-kl", dict(algorithm="gmpo", beta=0.04, ref_logp="ref_logp"))]
    for lt, spec in LOSS_REGISTRY.items():
        for level in spec.levels:
            kw = dict(loss_type=lt, importance_sampling_level=level, max_completion_length=8)
            out.append((f"{lt}-{level}", kw))
        out.append((f"{lt}-kl-rho", dict(loss_type=lt, max_completion_length=8, beta=0.04, ref_logp="ref_logp",
                                         importance_sampling_ratio="token_rho")))
    out += [
        ("grpo-delta-eps", dict(loss_type="grpo", delta=1.2, epsilon=0.1, epsilon_high=0.28)),
        ("dapo-kl-bias-seq-rho", dict(loss_type="dapo", beta=0.1, ref_logp="ref_logp", use_bias_correction_kl=True,
                                      importance_sampling_level="sequence", importance_sampling_ratio="seq_rho")),
        ("cispo-cap5-ga2", dict(loss_type="cispo", epsilon_high=5.0, grad_accum_steps=2, num_items_in_batch=20)),
        ("dapo-on-policy", dict(loss_type="dapo", old_logp=None)),
        ("grpo-token-adv", dict(loss_type="grpo", advantages="token_adv")),
    ]
    return out


CONFIGS = configs()


def call(backend, inputs, kwargs, *, grad_scale=1.0, temperature=0.9, **extra):
    kw = dict(kwargs)
    tensors = {**inputs, "token_adv": inputs["advantages"][:, None] * torch.linspace(0.5, 1.5, T)}
    old = tensors["old_logp"] if "old_logp" not in kw else kw.pop("old_logp")
    adv = tensors[kw.pop("advantages", "advantages")]
    for name in ("ref_logp", "importance_sampling_ratio"):
        if name in kw:
            kw[name] = tensors[kw[name]]
    x = inputs["logits"].clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's warnings for unusual loss/level pairs
        loss, metrics = gf.fused_policy_loss(x, inputs["token_ids"], old, adv, inputs["mask"], temperature=temperature,
                                             return_entropy=True, backend=backend, **kw, **extra)
    (loss * grad_scale).backward()
    return loss.detach(), metrics, x.grad


def assert_same(got, expected):
    loss, metrics, grad = got
    loss_r, metrics_r, grad_r = expected
    torch.testing.assert_close(loss, loss_r, atol=2e-6, rtol=2e-5)
    assert metrics.keys() == metrics_r.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], metrics_r[name], atol=2e-5, rtol=1e-5, msg=name)
    assert grad.dtype == grad_r.dtype
    if grad.dtype == torch.float32:
        torch.testing.assert_close(grad, grad_r, atol=2e-7, rtol=1e-4)
    else:
        torch.testing.assert_close(grad.float(), grad_r.float(), atol=1e-7, rtol=2 ** -7)


@pytest.mark.parametrize("kwargs", [c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(kwargs, dtype):
    inputs = make_inputs(dtype)
    got = call("cpp", inputs, kwargs)
    assert_same(got, call("torch", inputs, kwargs))
    assert torch.all(got[2][3] == 0)  # the fully masked row gets no gradient
    assert torch.all(got[2][1, 4:] == 0)


def test_auto_dispatch_upstream_gradient_and_no_grad():
    inputs = make_inputs()
    kw = dict(loss_type="grpo", importance_sampling_level="sequence_token")
    with gf.force_backend("cpp"):
        got = call("auto", inputs, kw, grad_scale=-3.0)
    assert_same(got, call("torch", inputs, kw, grad_scale=-3.0))
    with torch.no_grad():
        loss, metrics = gf.fused_policy_loss(inputs["logits"], inputs["token_ids"], inputs["old_logp"],
                                             inputs["advantages"], inputs["mask"], backend="cpp", **kw)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, call("torch", inputs, kw, temperature=1.0)[0], atol=2e-6, rtol=2e-5)


def test_strided_logits_and_inplace():
    inputs = make_inputs(torch.bfloat16)
    kw = dict(loss_type="dapo", beta=0.04, ref_logp="ref_logp")
    expected = call("torch", inputs, kw)
    padded = torch.cat([inputs["logits"], torch.zeros(B, 1, V, dtype=torch.bfloat16)], dim=1)
    got = call("cpp", {**inputs, "logits": padded[:, :-1]}, kw)  # TRL's logits[:, :-1], read in place
    assert_same(got, expected)
    from gfpo_fast.cpu import logprobs as cpp_launchers
    from gfpo_fast.fused_policy_loss import fused_policy_loss_fast
    from gfpo_fast.policy_loss import make_loss_config

    x = inputs["logits"].clone().requires_grad_()
    loss, _ = fused_policy_loss_fast(cpp_launchers, make_loss_config(loss_type="dapo"), x, inputs["token_ids"],
                                     inputs["old_logp"],
                                    inputs["advantages"], inputs["mask"], temperature=0.9, inplace=True)
    loss.backward()
    torch.testing.assert_close(x.detach(), x.grad, atol=0, rtol=0)  # x now holds its own gradient
    torch.testing.assert_close(x.grad.float(), call("torch", inputs, dict(loss_type="dapo"))[2].float(),
                               atol=1e-7, rtol=2 ** -7)


def test_thread_count_independence(threads):
    inputs = make_inputs()
    kw = dict(algorithm="gmpo", beta=0.04, ref_logp="ref_logp")
    results = []
    for n in (1, 2):
        threads(n)
        results.append(call("cpp", inputs, kw))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][2], results[1][2])


def garbage_in_masked_tokens(inputs):
    """The inputs with NaN, +inf and -inf logits on every masked token (and their ids left as they are)."""
    logits = inputs["logits"].clone()
    masked = inputs["mask"] == 0
    garbage = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=logits.dtype)
    logits[masked] = garbage[torch.arange(V) % 3]
    return {**inputs, "logits": logits}


@pytest.mark.parametrize("kwargs", [c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_masked_tokens_logits_are_not_read(kwargs):
    """Garbage logits on masked tokens: loss, metrics (entropy included) and gradient equal the reference
    on clean logits, and the masked tokens' gradient is exactly 0: nothing NaN leaks from skipped rows."""
    inputs = make_inputs()
    got = call("cpp", garbage_in_masked_tokens(inputs), kwargs)
    assert_same(got, call("torch", inputs, kwargs))
    assert torch.all(got[2][inputs["mask"] == 0] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_skips_inactive_rows(dtype):
    """The forward launcher with ``active``: inactive rows get exactly 0 for logp, lse and entropy whatever
    their logits (NaN here, which any read would propagate); active rows are unchanged."""
    from gfpo_fast.cpu.logprobs import token_logprobs_forward

    inputs = make_inputs(dtype)
    active = inputs["mask"] != 0
    ids = inputs["token_ids"]
    skipped = token_logprobs_forward(garbage_in_masked_tokens(inputs)["logits"], ids, 0.9, True, active)
    full = token_logprobs_forward(inputs["logits"], ids, 0.9, True)
    for got, expected in zip(skipped, full):
        assert torch.equal(got[~active], torch.zeros_like(got[~active]))
        assert torch.equal(got[active], expected[active])
