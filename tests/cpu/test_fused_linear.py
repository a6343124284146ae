"""fused_linear_policy_loss's two paths (gfpo_fast/fused_linear.py) on the C++ launchers and the torch reference
per chunk: grad in forward (token-separable losses, 6 N H V FLOPs) and recompute (the rest, 8 N H V). For every
algorithm, loss type and importance-sampling level, on and off policy, with KL, delta and IS ratios: the loss,
metrics and gradients to hidden, weight and bias equal the unchunked reference, the path taken is the one
``token_separable`` names (counted projections: the grad-in-forward backward projects nothing), and
``token_separable`` itself agrees with the reference's gradients (perturbing the other tokens' log-probs moves
a token's gradient exactly when it says so)."""
import pytest
import torch
import torch.nn.functional as F

import gfpo_fast as gf
from gfpo_fast import fused_linear
from gfpo_fast.fused_linear import PolicyLoss, fused_linear_logprobs_ref, fused_linear_policy_loss_ref
from gfpo_fast.policy_loss import LOSS_KEYWORDS, LOSS_TYPES, SEQUENCE_TOKEN_LOSSES, make_loss_config, token_separable

B, T, H, V = 4, 6, 16, 257
CHUNK = 8  # 24 tokens: chunks [0, 8), [8, 16), [16, 24); the last one is fully masked
ACTIVE_CHUNKS = 2
HEAD = dict(temperature=0.9, scale=0.7, softcap=4.0)
UPSTREAM = 1.7  # the gradients are of UPSTREAM * loss: the grad-in-forward backward scales what it stored


def make_inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 2 / H**0.5).to(dtype)
    bias = (0.5 * torch.randn(V, generator=g)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        logp = fused_linear_logprobs_ref(hidden, weight, ids, bias=bias, **HEAD)
    mask = (torch.arange(T) < torch.tensor([6, 4, 1, 0])[:, None]).float()  # ragged, last row fully masked
    tensors = dict(
        old_logp=logp + 0.3 * torch.randn(B, T, generator=g),  # ratios on both sides of the clip range
        advantages=torch.tensor([1.0, -0.5, 0.7, -1.0]),
        ref_logp=logp + 0.2 * torch.randn(B, T, generator=g),
        token_rho=torch.rand(B, T, generator=g) * 2,
        seq_rho=torch.rand(B, generator=g) * 2,
    )
    tensors["token_adv"] = tensors["advantages"][:, None] * torch.linspace(0.5, 1.5, T)
    return (hidden, weight, bias, ids, mask), tensors


def configs():
    """(id, loss keywords with tensor names of make_inputs, on_policy) for every algorithm, level and loss type."""
    out = []
    for on_policy in (False, True):
        pol = "on" if on_policy else "off"
        out += [(f"gmpo-{pol}", dict(algorithm="gmpo"), on_policy),
                (f"gmpo-kl-{pol}", dict(algorithm="gmpo", beta=0.04, ref_logp="ref_logp"), on_policy)]
        for lt in LOSS_TYPES:
            # cispo's cap well above the ratios (TRL's recommended 5): at the default 0.2 it caps every ratio here
            base = dict(loss_type=lt, max_completion_length=8, **(dict(epsilon_high=5.0) if lt == "cispo" else {}))
            for level in ["token", "sequence"] + (["sequence_token"] if lt in SEQUENCE_TOKEN_LOSSES else []):
                out.append((f"{lt}-{level}-{pol}", dict(base, importance_sampling_level=level), on_policy))
            out.append((f"{lt}-kl-rho-{pol}", dict(base, beta=0.04, ref_logp="ref_logp",
                                                   importance_sampling_ratio="token_rho"), on_policy))
        out += [
            (f"grpo-delta-eps-token-adv-{pol}", dict(loss_type="grpo", delta=1.2, epsilon=0.1, epsilon_high=0.28,
                                                     advantages="token_adv"), on_policy),
            (f"dapo-kl-bias-token-{pol}", dict(loss_type="dapo", beta=0.1, ref_logp="ref_logp",
                                               use_bias_correction_kl=True), on_policy),
            (f"dapo-kl-bias-seq-rho-{pol}", dict(loss_type="dapo", beta=0.1, ref_logp="ref_logp",
                                                 use_bias_correction_kl=True, importance_sampling_level="sequence",
                                                 importance_sampling_ratio="seq_rho"), on_policy),
            (f"cispo-ga2-{pol}", dict(loss_type="cispo", epsilon_high=5.0, grad_accum_steps=2,
                                      num_items_in_batch=20), on_policy),
        ]
    return out


CONFIGS = configs()
pytestmark = pytest.mark.filterwarnings("ignore:loss_type='(vespo|luspo)' is meant for")


def split(kwargs, tensors, on_policy):
    """``(cfg, (old_logp, advantages), the op's keywords, the other tensors' keywords)`` of one config."""
    kw = dict(kwargs)
    adv = tensors[kw.pop("advantages", "advantages")]
    for name in ("ref_logp", "importance_sampling_ratio"):
        if name in kw:
            kw[name] = tensors[kw[name]]
    cfg = make_loss_config(**{k: v for k, v in kw.items() if k in LOSS_KEYWORDS})
    return cfg, (None if on_policy else tensors["old_logp"], adv), kw, {k: v for k, v in kw.items()
                                                                        if k not in LOSS_KEYWORDS}


def run_counted(backend, leaves, ids, mask, loss_args, kw, monkeypatch, upstream=UPSTREAM):
    """The op's ``(loss, metrics, gradients of upstream * loss)`` and the rows projected in forward and backward."""
    projected = {"forward": [], "backward": []}
    linear = F.linear
    phase = "forward"

    def counting_linear(x, *args):
        projected[phase].append(x.shape[0])
        return linear(x, *args)

    monkeypatch.setattr(fused_linear.F, "linear", counting_linear)
    try:
        loss, metrics = gf.fused_linear_policy_loss(leaves[0], leaves[1], ids, *loss_args, mask, bias=leaves[2],
                                                    chunk_size=CHUNK, backend=backend, return_entropy=True, **HEAD,
                                                    **kw)
        phase = "backward"
        grads = torch.autograd.grad(upstream * loss, leaves)
    finally:
        monkeypatch.setattr(fused_linear.F, "linear", linear)
    return loss, metrics, grads, projected


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize(("kwargs", "on_policy"), [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_both_paths_match_reference(backend, kwargs, on_policy, monkeypatch):
    (hidden, weight, bias, ids, mask), tensors = make_inputs()
    cfg, loss_args, kw, ref_kw = split(kwargs, tensors, on_policy)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    loss, metrics, grads, projected = run_counted(backend, leaves, ids, mask, loss_args, kw, monkeypatch)
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


@pytest.mark.parametrize(("kwargs", "on_policy"), [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_token_separable_agrees_with_the_reference_gradient(kwargs, on_policy):
    """Perturbing the log-probs of every token outside ``S`` leaves the reference's gradient on ``S`` unchanged
    exactly when ``token_separable`` says so (on these inputs, where no clip or cap holds every ratio)."""
    (hidden, weight, bias, ids, mask), tensors = make_inputs()
    cfg, (old, adv), _, tensor_kw = split(kwargs, tensors, on_policy)
    loss = PolicyLoss(cfg, old, adv, mask, tensor_kw)
    lp = tensors["ref_logp"] - 0.1
    inside = (torch.arange(B * T) % 3 == 0).view(B, T)
    moved = torch.where(inside, lp, lp + 0.5 * torch.randn(B, T, generator=torch.Generator().manual_seed(1)))
    same = torch.allclose(loss.dlogp(lp.reshape(-1))[inside.reshape(-1)],
                          loss.dlogp(moved.reshape(-1))[inside.reshape(-1)], atol=1e-7, rtol=1e-6)
    assert same == token_separable(cfg, on_policy=on_policy)


def test_documented_paths():
    """The module docstring's examples: off-policy token-level losses and on-policy GSPO / GMPO form the gradient
    in forward; off-policy GSPO, GMPO and VESPO, and GSPO's bias-corrected KL, recompute."""
    def separable(on_policy, **kw):
        return token_separable(make_loss_config(**kw), on_policy=on_policy)

    assert separable(False, loss_type="dapo") and separable(False, loss_type="cispo", beta=0.1)
    assert separable(True, importance_sampling_level="sequence") and separable(True, algorithm="gmpo", beta=0.1)
    assert separable(True, loss_type="vespo")
    assert not separable(False, importance_sampling_level="sequence")
    assert not separable(False, algorithm="gmpo") and not separable(False, loss_type="vespo")
    assert not separable(True, importance_sampling_level="sequence", beta=0.1, use_bias_correction_kl=True)


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
