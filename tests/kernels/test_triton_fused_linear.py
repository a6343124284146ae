"""Fused-linear log-probs and policy loss (gfpo_fast/fused_linear.py) against the unchunked reference:
values and gradients for hidden, weight and bias, ragged chunks, entropy gradients, fp32 and bf16,
per-token and per-sequence algorithms, on and off policy, so both loss paths (the gradient formed in the forward
pass, and the logits recomputed in backward; counted projections tell them apart); the Triton chunk path
(interpreter on CPU) and the torch one."""
import pytest
import torch

import gfpo_fast as gf
from gfpo_fast.fused_linear import fused_linear_logprobs_ref, fused_linear_policy_loss_ref
from gfpo_fast.policy_loss import make_loss_config

from fused_linear_cases import counted_projections
from triton_helpers import INTERPRETER_NUMPY_WARNINGS, assert_close, assert_close_3way

pytestmark = INTERPRETER_NUMPY_WARNINGS

B, T, H, V = 3, 5, 16, 300
CHUNK = 4  # 15 tokens: chunks of 4, 4, 4, 3
BACKENDS = ["triton", "torch"]


def make_inputs(device, dtype=torch.float32, b=B, t=T, h=H, v=V):
    hidden = torch.randn(b, t, h, device=device).to(dtype)
    weight = (torch.randn(v, h, device=device) * 2 / h**0.5).to(dtype)
    bias = (0.5 * torch.randn(v, device=device)).to(dtype)
    ids = torch.randint(0, v, (b, t), device=device)
    return hidden, weight, bias, ids


def grads_of(fn, tensors, upstream):
    """Value(s) of ``fn(*tensors)`` and the gradients of ``sum(out * upstream)`` to each tensor (fresh leaves)."""
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    total = sum((o * u).sum() for o, u in zip(outs, upstream) if u is not None)
    return outs, torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_logprobs_match_reference(device, backend, entropy_grad):
    hidden, weight, bias, ids = make_inputs(device)
    upstream = (torch.randn(B, T, device=device), torch.randn(B, T, device=device) if entropy_grad else None)
    kw = dict(temperature=0.8, return_entropy=True)
    outs, grads = grads_of(lambda h, w, b: gf.fused_linear_logprobs(h, w, ids, bias=b, chunk_size=CHUNK,
                                                                    backend=backend, **kw),
                           (hidden, weight, bias), upstream)
    ref_outs, ref_grads = grads_of(lambda h, w, b: fused_linear_logprobs_ref(h, w, ids, bias=b, **kw),
                                   (hidden, weight, bias), upstream)
    for name, a, e in zip(["logp", "entropy"], outs, ref_outs):
        assert a.dtype == torch.float32 and a.shape == (B, T)
        assert_close(a, e, atol=2e-5, rtol=1e-5, name=name)
    for name, a, e in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, atol=1e-5, rtol=1e-4, name=f"d{name}")


def test_logprobs_bf16_flat_rows_without_bias(device):
    hidden, weight, _, ids = make_inputs(device, torch.bfloat16)
    hidden, ids = hidden.reshape(-1, H), ids.reshape(-1)
    upstream = (torch.randn(B * T, device=device),)
    (logp,), grads = grads_of(lambda h, w: gf.fused_linear_logprobs(h, w, ids, chunk_size=CHUNK, backend="triton"),
                              (hidden, weight), upstream)

    def ref(h, w):
        return fused_linear_logprobs_ref(h, w, ids)

    (ref_logp,), ref_grads = grads_of(ref, (hidden, weight), upstream)
    (exact_logp,), exact = grads_of(ref, (hidden.float(), weight.float()), upstream)
    # Both project in bf16 (the logits differ only by GEMM summation order), then fp32 log-probs.
    assert_close_3way(logp, exact_logp, ref_logp, atol=1e-3, name="logp")
    for name, a, e, x in zip(["hidden", "weight"], grads, ref_grads, exact):
        assert a.dtype == torch.bfloat16
        assert_close_3way(a, x, e, atol=1e-3, name=f"d{name}")


# (loss keywords, on policy): dapo off policy and the on-policy GSPO / GMPO form the gradient in the forward pass,
# off-policy GSPO and GMPO recompute the logits (gfpo_fast.policy_loss.token_separable)
POLICY_LOSS_SPECS = {
    "dapo": (dict(loss_type="dapo"), False),
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence"), False),
    "gmpo-kl": (dict(algorithm="gmpo", beta=0.05), False),
    "gspo-on-policy": (dict(loss_type="grpo", importance_sampling_level="sequence"), True),
    "gmpo-kl-on-policy": (dict(algorithm="gmpo", beta=0.05), True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("spec", "on_policy"), POLICY_LOSS_SPECS.values(), ids=POLICY_LOSS_SPECS.keys())
def test_policy_loss_matches_reference(device, backend, spec, on_policy):
    hidden, weight, bias, ids = make_inputs(device)
    with torch.no_grad():
        logp = fused_linear_logprobs_ref(hidden, weight, ids, bias=bias, temperature=0.8)
    mask = torch.ones(B, T, device=device)
    mask[1] = 0
    mask[2, 2:] = 0
    tensors = dict(old_logp=None if on_policy else logp + 0.3 * torch.randn(B, T, device=device),
                   advantages=torch.randn(B, device=device), mask=mask)
    extra = dict(temperature=0.8, return_entropy=True,
                 ref_logp=logp + 0.3 * torch.randn(B, T, device=device) if spec.get("beta") else None)
    cfg = make_loss_config(**spec)

    def fused(h, w, b):
        return gf.fused_linear_policy_loss(h, w, ids, *tensors.values(), bias=b, chunk_size=CHUNK, backend=backend,
                                           **extra, **spec)

    def reference(h, w, b):
        return fused_linear_policy_loss_ref(cfg, h, w, ids, *tensors.values(), bias=b, **extra)

    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    loss, metrics = fused(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    ref_loss, ref_metrics = reference(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert_close(metrics[key], ref_metrics[key], atol=1e-5, rtol=1e-5, name=key)
    for name, a, e in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert_close(a, e, atol=1e-6, rtol=1e-4, name=f"d{name}")
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))  # the fully masked row


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("spec", "passes"), [(dict(loss_type="dapo"), 1),
                                              (dict(importance_sampling_level="sequence"), 2)],
                         ids=["dapo-grad-in-forward", "gspo-recompute"])
def test_policy_loss_skips_fully_masked_chunks(device, backend, spec, passes):
    """Chunks with no unmasked token are neither projected nor differentiated: NaN hidden states there
    change nothing, their hidden gradient is exactly 0, and only the other chunks reach F.linear: once for
    a token-level loss (its gradient formed in the forward pass), twice for off-policy GSPO (the backward
    recomputes the logits)."""
    hidden, weight, bias, ids = make_inputs(device)
    mask = torch.ones(B, T, device=device)
    mask[1, 3:] = 0
    mask[2] = 0  # tokens 8..14 masked: chunks [8, 12) and [12, 15) are skipped, [4, 8) is partly masked
    tensors = dict(old_logp=torch.randn(B, T, device=device) - 6.0, advantages=torch.randn(B, device=device),
                   mask=mask)
    garbage = hidden.clone()
    garbage.view(-1, H)[8:] = float("nan")
    leaves = [x.clone().requires_grad_() for x in (garbage, weight, bias)]
    with counted_projections() as projected:
        loss, metrics = gf.fused_linear_policy_loss(*leaves[:2], ids, *tensors.values(), bias=leaves[2],
                                                    chunk_size=CHUNK, backend=backend, temperature=0.8,
                                                    return_entropy=True, **spec)
        assert projected == [4, 4]  # forward: chunks [0, 4) and [4, 8) only
        grads = torch.autograd.grad(loss, leaves)
        assert projected == [4, 4] * passes  # the recompute path projects them again in backward
    ref_leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    ref_loss, ref_metrics = fused_linear_policy_loss_ref(make_loss_config(**spec), *ref_leaves[:2], ids,
                                                         *tensors.values(), bias=ref_leaves[2], temperature=0.8,
                                                         return_entropy=True)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    for key in metrics:
        assert_close(metrics[key], ref_metrics[key], atol=1e-5, rtol=1e-5, name=key)
    for name, a, e in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert_close(a, e, atol=1e-6, rtol=1e-4, name=f"d{name}")
    assert torch.equal(grads[0].view(-1, H)[8:], torch.zeros_like(grads[0].view(-1, H)[8:]))


def test_bad_inputs_raise(device):
    hidden, weight, bias, ids = make_inputs(device)
    with pytest.raises(ValueError, match="weight must have shape"):
        gf.fused_linear_logprobs(hidden, weight.T, ids)
    with pytest.raises(ValueError, match="bias must have shape"):
        gf.fused_linear_logprobs(hidden, weight, ids, bias=bias[:-1])
    with pytest.raises(ValueError, match="token_ids must have shape"):
        gf.fused_linear_logprobs(hidden, weight, ids[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        gf.fused_linear_logprobs(hidden, weight, ids, chunk_size=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        gf.fused_linear_policy_loss(hidden, weight, ids, None, torch.randn(B), torch.ones(B, T), loss_typ="dapo")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestRealisticShapes:
    """On a GPU: 4 x 512 tokens, H = 2048, Qwen-sized vocab, bf16; logits never whole."""

    def test_gspo_bf16(self):
        b, t, h, v = 4, 512, 2048, 151_936
        hidden, weight, _, ids = make_inputs("cuda", torch.bfloat16, b, t, h, v)
        spec = dict(loss_type="grpo", importance_sampling_level="sequence")
        with torch.no_grad():
            old = fused_linear_logprobs_ref(hidden, weight, ids) + 0.2 * torch.randn(b, t, device="cuda")
        tensors = (old, torch.randn(b, device="cuda"), torch.ones(b, t, device="cuda"))
        leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
        loss, _ = gf.fused_linear_policy_loss(*leaves, ids, *tensors, chunk_size=1024, **spec)
        grads = torch.autograd.grad(loss, leaves)
        ref_leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
        ref_loss, _ = fused_linear_policy_loss_ref(make_loss_config(**spec), *ref_leaves, ids, *tensors)
        ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
        assert_close(loss, ref_loss, atol=1e-4, rtol=1e-3, name="loss")
        for name, a, e in zip(["hidden", "weight"], grads, ref_grads):
            rel = (a.float() - e.float()).norm() / e.float().norm()
            assert rel < 2e-2, f"d{name}: relative error {rel:.3g}"


def test_masked_tokens_with_overflowing_ratio_give_finite_gradients():
    """A masked token whose ratio overflows (old_logp = -1e30) must not put NaN into dhidden / dweight."""
    torch.manual_seed(0)
    B, T, H, V = 2, 3, 8, 11
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    old = torch.full((B, T), -1.0)
    old[mask == 0] = -1e30
    loss, _ = gf.fused_linear_policy_loss(hidden, weight, ids, old, torch.tensor([1.0, -1.0]), mask, chunk_size=2,
                                          backend="torch", loss_type="grpo")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert torch.all(hidden.grad[mask == 0] == 0)
