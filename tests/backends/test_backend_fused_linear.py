"""fused_linear_logprobs and fused_linear_policy_loss (gfpo_fast/fused_linear.py) on every fast backend's chunk
launchers, and on the torch reference per chunk, against the unchunked reference: values and gradients to hidden,
weight and bias, ragged chunks, entropy gradients, fp32 and bf16, the lm_head transform (temperature, scale,
softcap), every algorithm, loss type and importance-sampling level, on and off policy, with KL, delta and IS
ratios. Both loss paths (the gradient formed in the forward pass for token-separable losses, 6 N H V FLOPs; the
logits recomputed in backward otherwise, 8 N H V) are told apart by counted projections; fully masked chunks are
never projected. (That ``token_separable`` agrees with the reference's gradients: tests/test_policy_loss.py.)"""
import pytest
import torch
from backend_checks import INTERPRETER_NUMPY_WARNINGS, assert_close, assert_close_3way

import gfpo_fast as gf
from gfpo_fast.fused_linear import fused_linear_logprobs_ref, fused_linear_policy_loss_ref
from gfpo_fast.policy_loss import make_loss_config, token_separable

import fused_linear_cases as cases

pytestmark = [INTERPRETER_NUMPY_WARNINGS, cases.CONFIG_WARNINGS]

CPU = torch.device("cpu")
# The loss matrix (fused_linear_cases): 24 tokens in chunks [0, 8), [8, 16), [16, 24); the last one fully masked.
CHUNK = 8
ACTIVE_CHUNKS = 2
UPSTREAM = 1.7  # the gradients are of UPSTREAM * loss: the grad-in-forward backward scales what it stored
# What the Triton interpreter runs of the loss matrix: both paths, token- and sequence-level, GMPO, KL and IS
# ratios, on and off policy. The launchers see only the head transform and dlogp; the compiled backends run all.
INTERPRETER_SUBSET = {"dapo-token-off", "grpo-sequence-off", "gmpo-kl-off", "dapo-kl-rho-off", "grpo-sequence-on",
                      "gmpo-kl-on"}

# The small cases: 15 tokens in chunks of 4, 4, 4, 3.
B, T, H, V = 3, 5, 16, 300
SMALL_CHUNK = 4


def run_counted(backend, leaves, ids, mask, loss_args, kw):
    """The op's ``(loss, metrics, gradients of UPSTREAM * loss)`` and the rows projected in forward and backward."""
    with cases.counted_projections() as forward:
        loss, metrics = gf.fused_linear_policy_loss(leaves[0], leaves[1], ids, *loss_args, mask, bias=leaves[2],
                                                    chunk_size=CHUNK, backend=backend, return_entropy=True,
                                                    **cases.HEAD, **kw)
    with cases.counted_projections() as backward:
        grads = torch.autograd.grad(UPSTREAM * loss, leaves)
    return loss, metrics, grads, {"forward": forward, "backward": backward}


def check_both_paths(backend: str, device, kwargs, on_policy):
    """The loss matrix case on ``backend`` ("torch": the reference per chunk): the path token_separable names,
    and the unchunked reference's loss, metrics and gradients."""
    (hidden, weight, bias, ids, mask), tensors = cases.make_inputs()
    hidden, weight, bias, ids, mask = (x.to(device) for x in (hidden, weight, bias, ids, mask))
    tensors = {k: v.to(device) for k, v in tensors.items()}
    cfg, loss_args, kw, ref_kw = cases.split(kwargs, tensors, on_policy)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    loss, metrics, grads, projected = run_counted(backend, leaves, ids, mask, loss_args, kw)
    if token_separable(cfg, on_policy=on_policy):  # grad in forward: one projection per active chunk, none after
        assert projected == {"forward": [CHUNK] * ACTIVE_CHUNKS, "backward": []}
    else:  # recompute: the backward projects every active chunk again
        assert projected == {"forward": [CHUNK] * ACTIVE_CHUNKS, "backward": [CHUNK] * ACTIVE_CHUNKS}
    ref_leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    ref, ref_metrics = fused_linear_policy_loss_ref(cfg, ref_leaves[0], ref_leaves[1], ids, *loss_args, mask,
                                                    bias=ref_leaves[2], return_entropy=True, **cases.HEAD, **ref_kw)
    ref_grads = torch.autograd.grad(UPSTREAM * ref, ref_leaves)
    assert_close(loss, ref, atol=1e-6, rtol=1e-5, name="loss")
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert_close(metrics[key], ref_metrics[key], atol=1e-6, rtol=1e-5, name=key)
    for name, a, e in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, atol=1e-6 * max(1.0, e.abs().max().item()), rtol=1e-4, name=f"d{name}")
    assert torch.equal(grads[0][3], torch.zeros_like(grads[0][3]))  # the fully masked row


@pytest.mark.parametrize(("name", "kwargs", "on_policy"), cases.CONFIGS, ids=[c[0] for c in cases.CONFIGS])
def test_both_paths_match_reference(backend, name, kwargs, on_policy):
    if backend.interpreted and name not in INTERPRETER_SUBSET:
        pytest.skip("the Triton interpreter runs a subset of this matrix (the launchers know no loss type)")
    check_both_paths(backend.name, backend.device, kwargs, on_policy)


@pytest.mark.parametrize(("name", "kwargs", "on_policy"), cases.CONFIGS, ids=[c[0] for c in cases.CONFIGS])
def test_both_paths_match_reference_on_torch_chunks(name, kwargs, on_policy):
    check_both_paths("torch", CPU, kwargs, on_policy)


def make_small(device, dtype=torch.float32, b=B, t=T, h=H, v=V):
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


def check_logprobs(backend: str, device, entropy_grad):
    hidden, weight, bias, ids = make_small(device)
    upstream = (torch.randn(B, T, device=device), torch.randn(B, T, device=device) if entropy_grad else None)
    kw = dict(temperature=0.8, return_entropy=True)
    outs, grads = grads_of(lambda h, w, b: gf.fused_linear_logprobs(h, w, ids, bias=b, chunk_size=SMALL_CHUNK,
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


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_logprobs_match_reference(backend, entropy_grad):
    check_logprobs(backend.name, backend.device, entropy_grad)


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_logprobs_match_reference_on_torch_chunks(entropy_grad):
    check_logprobs("torch", CPU, entropy_grad)


def test_logprobs_bf16_flat_rows_without_bias(backend):
    device = backend.device
    hidden, weight, _, ids = make_small(device, torch.bfloat16)
    hidden, ids = hidden.reshape(-1, H), ids.reshape(-1)
    upstream = (torch.randn(B * T, device=device),)
    (logp,), grads = grads_of(lambda h, w: gf.fused_linear_logprobs(h, w, ids, chunk_size=SMALL_CHUNK,
                                                                    backend=backend.name),
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_in_forward_equals_recompute(backend, dtype):
    """On the same inputs the two paths give the same gradients (the recompute path taken because the
    advantages want a gradient), bf16 included: the same logits, dlogp and GEMMs, in another order."""
    (hidden, weight, bias, ids, mask), tensors = cases.make_inputs(dtype)
    hidden, weight, bias, ids, mask = (x.to(backend.device) for x in (hidden, weight, bias, ids, mask))
    out = []
    for adv_grad in (False, True):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        adv = tensors["advantages"].to(backend.device).clone().requires_grad_(adv_grad)
        loss, _ = gf.fused_linear_policy_loss(leaves[0], leaves[1], ids, tensors["old_logp"].to(backend.device),
                                              adv, mask, bias=leaves[2], chunk_size=CHUNK, backend=backend.name,
                                              **cases.HEAD)
        assert (loss.grad_fn.name() == "FusedLinearLossGradFunctionBackward") != adv_grad
        out.append((loss, torch.autograd.grad(loss, leaves)))
    (loss, grads), (rec_loss, rec_grads) = out
    torch.testing.assert_close(loss, rec_loss, atol=0, rtol=0)
    for a, e in zip(grads, rec_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), e.float(), atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-2)


def test_one_backward_per_forward_and_no_grad(backend):
    (hidden, weight, bias, ids, mask), tensors = cases.make_inputs()
    args = (ids, tensors["old_logp"], tensors["advantages"], mask)
    args = tuple(x.to(backend.device) for x in args)
    leaves = [x.to(backend.device).clone().requires_grad_() for x in (hidden, weight)]
    loss, _ = gf.fused_linear_policy_loss(*leaves, *args, chunk_size=CHUNK, backend=backend.name)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="run the forward again"):
        loss.backward()
    with torch.no_grad():
        value, _ = gf.fused_linear_policy_loss(*leaves, *args, chunk_size=CHUNK, backend=backend.name)
    assert value.grad_fn is None
    torch.testing.assert_close(value, loss.detach(), atol=0, rtol=0)


# (loss keywords, on policy): dapo off policy and the on-policy GSPO / GMPO form the gradient in the forward pass,
# off-policy GSPO and GMPO recompute the logits (gfpo_fast.policy_loss.token_separable)
POLICY_LOSS_SPECS = {
    "dapo": (dict(loss_type="dapo"), False),
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence"), False),
    "gmpo-kl": (dict(algorithm="gmpo", beta=0.05), False),
    "gspo-on-policy": (dict(loss_type="grpo", importance_sampling_level="sequence"), True),
    "gmpo-kl-on-policy": (dict(algorithm="gmpo", beta=0.05), True),
}


def check_policy_loss(backend: str, device, spec, on_policy):
    """Without the head transform, at ragged chunks of 4 and a vocab of three ragged interpreter tiles."""
    hidden, weight, bias, ids = make_small(device)
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
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    loss, metrics = gf.fused_linear_policy_loss(leaves[0], leaves[1], ids, *tensors.values(), bias=leaves[2],
                                                chunk_size=SMALL_CHUNK, backend=backend, **extra, **spec)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    ref_loss, ref_metrics = fused_linear_policy_loss_ref(cfg, ref_leaves[0], ref_leaves[1], ids, *tensors.values(),
                                                         bias=ref_leaves[2], **extra)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert_close(metrics[key], ref_metrics[key], atol=1e-5, rtol=1e-5, name=key)
    for name, a, e in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert_close(a, e, atol=1e-6, rtol=1e-4, name=f"d{name}")
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))  # the fully masked row


POLICY_LOSS_CASES = pytest.mark.parametrize(("spec", "on_policy"), POLICY_LOSS_SPECS.values(),
                                            ids=POLICY_LOSS_SPECS.keys())


@POLICY_LOSS_CASES
def test_policy_loss_matches_reference(backend, spec, on_policy):
    check_policy_loss(backend.name, backend.device, spec, on_policy)


@POLICY_LOSS_CASES
def test_policy_loss_matches_reference_on_torch_chunks(spec, on_policy):
    check_policy_loss("torch", CPU, spec, on_policy)


def check_skips_fully_masked_chunks(backend: str, device, spec, passes):
    hidden, weight, bias, ids = make_small(device)
    mask = torch.ones(B, T, device=device)
    mask[1, 3:] = 0
    mask[2] = 0  # tokens 8..14 masked: chunks [8, 12) and [12, 15) are skipped, [4, 8) is partly masked
    tensors = dict(old_logp=torch.randn(B, T, device=device) - 6.0, advantages=torch.randn(B, device=device),
                   mask=mask)
    garbage = hidden.clone()
    garbage.view(-1, H)[8:] = float("nan")
    leaves = [x.clone().requires_grad_() for x in (garbage, weight, bias)]
    with cases.counted_projections() as projected:
        loss, metrics = gf.fused_linear_policy_loss(*leaves[:2], ids, *tensors.values(), bias=leaves[2],
                                                    chunk_size=SMALL_CHUNK, backend=backend, temperature=0.8,
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


SKIP_SPECS = pytest.mark.parametrize(("spec", "passes"), [(dict(loss_type="dapo"), 1),
                                                          (dict(importance_sampling_level="sequence"), 2)],
                                     ids=["dapo-grad-in-forward", "gspo-recompute"])


@SKIP_SPECS
def test_policy_loss_skips_fully_masked_chunks(backend, spec, passes):
    """Chunks with no unmasked token are neither projected nor differentiated: NaN hidden states there
    change nothing, their hidden gradient is exactly 0, and only the other chunks reach F.linear: once for
    a token-level loss (its gradient formed in the forward pass), twice for off-policy GSPO (the backward
    recomputes the logits)."""
    check_skips_fully_masked_chunks(backend.name, backend.device, spec, passes)


@SKIP_SPECS
def test_policy_loss_skips_fully_masked_chunks_on_torch_chunks(spec, passes):
    check_skips_fully_masked_chunks("torch", CPU, spec, passes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.only_backends("triton", reason="the GPU backend at GPU sizes")
class TestRealisticShapes:
    """On a GPU: 4 x 512 tokens, H = 2048, Qwen-sized vocab, bf16; logits never whole."""

    def test_gspo_bf16(self, backend):
        b, t, h, v = 4, 512, 2048, 151_936
        hidden, weight, _, ids = make_small("cuda", torch.bfloat16, b, t, h, v)
        spec = dict(loss_type="grpo", importance_sampling_level="sequence")
        with torch.no_grad():
            old = fused_linear_logprobs_ref(hidden, weight, ids) + 0.2 * torch.randn(b, t, device="cuda")
        tensors = (old, torch.randn(b, device="cuda"), torch.ones(b, t, device="cuda"))
        leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
        loss, _ = gf.fused_linear_policy_loss(*leaves, ids, *tensors, chunk_size=1024, backend=backend.name, **spec)
        grads = torch.autograd.grad(loss, leaves)
        ref_leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
        ref_loss, _ = fused_linear_policy_loss_ref(make_loss_config(**spec), *ref_leaves, ids, *tensors)
        ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
        assert_close(loss, ref_loss, atol=1e-4, rtol=1e-3, name="loss")
        for name, a, e in zip(["hidden", "weight"], grads, ref_grads):
            rel = (a.float() - e.float()).norm() / e.float().norm()
            assert rel < 2e-2, f"d{name}: relative error {rel:.3g}"


def test_bad_inputs_raise():
    hidden, weight, bias, ids = make_small(CPU)
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


def test_masked_tokens_with_overflowing_ratio_give_finite_gradients():
    """A masked token whose ratio overflows (old_logp = -1e30) must not put NaN into dhidden / dweight."""
    b, t, h, v = 2, 3, 8, 11
    hidden = torch.randn(b, t, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    ids = torch.randint(0, v, (b, t))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    old = torch.full((b, t), -1.0)
    old[mask == 0] = -1e30
    loss, _ = gf.fused_linear_policy_loss(hidden, weight, ids, old, torch.tensor([1.0, -1.0]), mask, chunk_size=2,
                                          backend="torch", loss_type="grpo")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert torch.all(hidden.grad[mask == 0] == 0)
