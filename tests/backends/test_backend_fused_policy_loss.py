"""fused_policy_loss on every fast backend's log-prob launchers against the torch reference composition
(``fused_policy_loss_ref``): loss, metrics and logits gradient for every algorithm, loss type and
importance-sampling level, KL (bias-corrected too), delta, vLLM IS ratios per token and per sequence, gradient
accumulation, token-level advantages, on policy, fully masked rows, GFPO keep masks, fp32 / bf16, the upstream
gradient, no-grad and in-place; masked tokens' logits are never read (NaN / inf there changes nothing).
Backend-specific: C++ thread-count independence; Triton's one specialisation, torch.compile and GPU shapes.
The launchers know no loss type, so the interpreter runs a subset of the bf16 and garbage-logits matrices."""
import functools

import pytest
import torch
from backend_checks import INTERPRETER_NUMPY_WARNINGS, KernelRecorder, assert_close, assert_close_3way

import gfpo_fast as gf
from gfpo_fast.fused_policy_loss import fused_policy_loss_fast, fused_policy_loss_ref
from gfpo_fast.logprobs import token_logprobs_ref
from gfpo_fast.policy_loss import LOSS_REGISTRY, make_loss_config

pytestmark = [INTERPRETER_NUMPY_WARNINGS, pytest.mark.filterwarnings("ignore:loss_type='(vespo|luspo)' is meant for")]

B, T, V = 4, 5, 300
TEMPERATURE = 0.9
GRAD_SCALE = 2.5  # upstream gradient of the loss: backward must scale by it on the device

CONFIGS = [
    *[(f"{lt}-{level}", dict(loss_type=lt, importance_sampling_level=level))
      for lt, spec in LOSS_REGISTRY.items() for level in spec.levels if (lt, level) != ("vespo", "sequence")],
    *[(f"{lt}-kl-rho", dict(loss_type=lt, beta=0.04, rho="token")) for lt in LOSS_REGISTRY],
    ("gmpo", dict(algorithm="gmpo")),
    ("gmpo-kl-eps", dict(algorithm="gmpo", beta=0.05, epsilon=0.1, epsilon_high=0.2)),
    ("grpo-delta", dict(loss_type="grpo", delta=1.1)),
    ("grpo-delta-eps", dict(loss_type="grpo", delta=1.2, epsilon=0.1, epsilon_high=0.28)),
    ("grpo-kl", dict(loss_type="grpo", beta=0.04)),
    ("dapo-kl-bias-corrected", dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=True)),
    ("dapo-kl-bias-seq-rho", dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=True,
                                  importance_sampling_level="sequence", rho="sequence")),
    ("grpo-sequence-kl", dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04)),
    ("dapo-token-rho", dict(loss_type="dapo", rho="token")),
    ("grpo-sequence-rho", dict(loss_type="grpo", importance_sampling_level="sequence", rho="sequence")),
    ("vespo-token-rho", dict(loss_type="vespo", rho="token")),
    ("cispo-eps_high5", dict(loss_type="cispo", epsilon_high=5.0)),
    ("cispo-cap5-ga2", dict(loss_type="cispo", epsilon_high=5.0, grad_accum_steps=2, num_items_in_batch=20)),
    ("dapo-ga2-p2", dict(loss_type="dapo", grad_accum_steps=2, num_processes=2, num_items_in_batch=40)),
    ("bnpo-ga2", dict(loss_type="bnpo", grad_accum_steps=2)),
    ("grpo-token-advantages", dict(loss_type="grpo", advantages="token")),
    ("dapo-on-policy", dict(loss_type="dapo", old_logp=None)),
    ("sequence_token-on-policy", dict(loss_type="grpo", importance_sampling_level="sequence_token", old_logp=None)),
]
# What the Triton interpreter runs of the bf16 and garbage-logits matrices: token- and sequence-level, GMPO, KL,
# IS ratios. The launchers see only dlogp; the whole matrix runs on the compiled backends.
INTERPRETER_SUBSET = {"dapo-token", "grpo-sequence", "grpo-sequence_token", "gmpo", "grpo-kl", "gmpo-kl-eps",
                      "dapo-token-rho"}


def subset_only_when_interpreted(backend, name):
    if backend.interpreted and name not in INTERPRETER_SUBSET:
        pytest.skip("the Triton interpreter runs a subset of this matrix (the launchers know no loss type)")


def fast_loss(backend):
    return functools.partial(fused_policy_loss_fast, backend.launchers("logprobs"))


def make_inputs(device, dtype=torch.float32, b=B, t=T, v=V, spec=None):
    """Logits (a non-contiguous ``[:, :-1]`` slice), ids, and loss tensors around the current policy:
    old / ref log-probs within ~0.3 of it, so ratios fall on both sides of the clip range; row 1 fully masked."""
    spec = dict(spec or {})
    logits = (torch.randn(b, t + 1, v, device=device) * 2).to(dtype)[:, :-1]
    ids = torch.randint(0, v, (b, t), device=device)
    logp = token_logprobs_ref(logits, ids, temperature=TEMPERATURE)
    mask = torch.ones(b, t, device=device)
    mask[1] = 0  # a fully masked row
    mask[2, 3:] = 0
    inputs = dict(
        old_logp=logp + 0.3 * torch.randn(b, t, device=device),
        advantages=torch.randn(b, t, device=device) if spec.pop("advantages", None) == "token"
        else torch.randn(b, device=device),
        mask=mask,
    )
    if spec.pop("old_logp", "given") is None:
        inputs["old_logp"] = None
    if spec.get("beta", 0.0) != 0.0:
        inputs["ref_logp"] = logp + 0.3 * torch.randn(b, t, device=device)
    rho = spec.pop("rho", None)
    if rho == "token":
        inputs["importance_sampling_ratio"] = torch.rand(b, t, device=device) * 2
    elif rho == "sequence":
        inputs["importance_sampling_ratio"] = torch.rand(b, device=device) * 2
    if "num_items_in_batch" in spec:
        inputs["num_items_in_batch"] = spec.pop("num_items_in_batch")
    cfg = make_loss_config(max_completion_length=8, **spec)
    return cfg, logits, ids, inputs


def run(fn, cfg, logits, ids, inputs, *, return_entropy=True, **kwargs):
    """(loss, metrics, d(GRAD_SCALE loss)/dlogits) of one implementation, on a fresh leaf copy of the logits."""
    x = logits.detach().clone().requires_grad_()
    loss, metrics = fn(cfg, x, ids, inputs["old_logp"], inputs["advantages"], inputs["mask"],
                       temperature=TEMPERATURE, return_entropy=return_entropy, ref_logp=inputs.get("ref_logp"),
                       importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
                       num_items_in_batch=inputs.get("num_items_in_batch"), **kwargs)
    (grad,) = torch.autograd.grad(loss * GRAD_SCALE, x)
    return loss, metrics, grad


def assert_matches(got, expected, logits=None, exact=None):
    """Loss and metrics to fp32 rounding; fp32 gradients close, low-precision ones by the 3-way rule."""
    (loss, metrics, grad), (ref_loss, ref_metrics, ref_grad) = got, expected
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert metrics.keys() == ref_metrics.keys()
    for name in metrics:
        assert_close(metrics[name], ref_metrics[name], atol=1e-5, rtol=1e-5, name=name)
    assert grad.dtype == ref_grad.dtype
    if exact is None:
        assert_close(grad, ref_grad, atol=1e-7, rtol=1e-4, name="grad")
    else:
        assert_close_3way(grad, exact, ref_grad, atol=1e-7, name="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,spec", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_reference(backend, name, spec, dtype):
    if dtype != torch.float32:
        subset_only_when_interpreted(backend, name)
    cfg, logits, ids, inputs = make_inputs(backend.device, dtype, spec=spec)
    got = run(fast_loss(backend), cfg, logits, ids, inputs)
    expected = run(fused_policy_loss_ref, cfg, logits, ids, inputs)
    # Both compute the log-probs of low-precision logits in fp32: the forward agrees to fp32 rounding.
    exact = None if dtype == torch.float32 else run(fused_policy_loss_ref, cfg, logits.float(), ids, inputs)[2]
    assert_matches(got, expected, exact=exact)
    assert got[2].dtype == dtype
    assert torch.equal(got[2][1], torch.zeros_like(got[2][1]))  # the fully masked row
    assert torch.equal(got[2][2, 3:], torch.zeros_like(got[2][2, 3:]))


def with_garbage_on_masked_tokens(logits, mask):
    """A copy of ``logits`` with NaN, +inf and -inf on every masked token (cycling along the vocab)."""
    garbage = torch.tensor([float("nan"), float("inf"), float("-inf")], device=logits.device, dtype=logits.dtype)
    out = logits.detach().clone()
    out[mask == 0] = garbage[torch.arange(logits.shape[-1], device=logits.device) % 3]
    return out


@pytest.mark.parametrize("name,spec", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_masked_tokens_logits_are_not_read(backend, name, spec):
    """Garbage logits on masked tokens (a fully masked row, a ragged tail, a GFPO-dropped row): loss,
    metrics (entropy included) and gradient equal the reference on clean logits, masked tokens get
    exactly zero gradient: nothing NaN leaks from skipped rows."""
    subset_only_when_interpreted(backend, name)
    cfg, logits, ids, inputs = make_inputs(backend.device, spec=spec)
    inputs["mask"][3] = 0  # as GFPO drops a row: mask 0 and advantage 0
    inputs["advantages"][3] = 0.0
    got = run(fast_loss(backend), cfg, with_garbage_on_masked_tokens(logits, inputs["mask"]), ids, inputs)
    assert_matches(got, run(fused_policy_loss_ref, cfg, logits, ids, inputs))
    masked = inputs["mask"] == 0
    assert torch.equal(got[2][masked], torch.zeros_like(got[2][masked]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_skips_inactive_rows(backend, dtype):
    """The forward launcher with ``active``: inactive rows get exactly 0 for logp, lse and entropy whatever
    their logits (NaN / inf, which any read would propagate); active rows are bitwise unchanged."""
    forward = backend.launchers("logprobs").token_logprobs_forward
    _, logits, ids, inputs = make_inputs(backend.device, dtype)
    active = inputs["mask"] != 0
    skipped = forward(with_garbage_on_masked_tokens(logits, inputs["mask"]), ids, TEMPERATURE, True, active)
    full = forward(logits, ids, TEMPERATURE, True)
    for got, expected in zip(skipped, full):
        assert torch.equal(got[~active], torch.zeros_like(got[~active]))
        assert torch.equal(got[active], expected[active])


def test_gfpo_keep_mask_drops_rows(backend):
    """GFPO end to end on one backend: filter, then a loss whose dropped rows get zero gradient."""
    G, groups, k = 4, 2, 2
    b = G * groups
    cfg, logits, ids, inputs = make_inputs(backend.device, b=b, spec=dict(loss_type="dapo"))
    rewards = torch.randn(b, device=backend.device)
    lengths = inputs["mask"].sum(-1)
    advantages, keep = gf.gfpo_filter(rewards, -lengths - 0.01 * torch.arange(b, device=backend.device), G, k,
                                      backend=backend.name)
    assert keep.view(groups, G).sum(-1).tolist() == [k] * groups
    inputs.update(advantages=advantages, mask=inputs["mask"] * keep[:, None])
    loss, _, grad = run(fast_loss(backend), cfg, logits, ids, inputs)
    ref_loss, _, ref_grad = run(fused_policy_loss_ref, cfg, logits, ids, inputs)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(grad, ref_grad, atol=1e-7, rtol=1e-4, name="grad")
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))


def test_inplace_and_no_grad(backend):
    """In place, the gradient is written over the logits (a strided bf16 view included: the buffer then holds its
    own gradient); under no_grad there is no graph."""
    cfg, logits, ids, inputs = make_inputs(backend.device, spec=dict(loss_type="grpo"))
    _, _, ref_grad = run(fused_policy_loss_ref, cfg, logits, ids, inputs)
    buffer = logits.detach().clone()
    x = buffer.requires_grad_()
    loss, _ = fast_loss(backend)(cfg, x, ids, inputs["old_logp"], inputs["advantages"], inputs["mask"],
                                 temperature=TEMPERATURE, inplace=True)
    (grad,) = torch.autograd.grad(loss * GRAD_SCALE, x)
    assert grad.data_ptr() == buffer.data_ptr()
    assert_close(grad, ref_grad, atol=1e-7, rtol=1e-4, name="grad")

    cfg, logits, ids, inputs = make_inputs(backend.device, torch.bfloat16, spec=dict(loss_type="dapo"))
    x = logits.detach().clone().requires_grad_()  # TRL's logits[:, :-1]: strided rows, read and written in place
    loss, _ = fast_loss(backend)(cfg, x, ids, inputs["old_logp"], inputs["advantages"], inputs["mask"],
                                 temperature=TEMPERATURE, inplace=True)
    (loss * GRAD_SCALE).backward()
    torch.testing.assert_close(x.detach(), x.grad, atol=0, rtol=0)  # x now holds its own gradient
    _, _, ref_grad = run(fused_policy_loss_ref, cfg, logits, ids, inputs)
    _, _, exact = run(fused_policy_loss_ref, cfg, logits.float(), ids, inputs)
    assert_close_3way(x.grad, exact, ref_grad, atol=1e-7, name="grad")

    with torch.no_grad():
        loss, _ = fast_loss(backend)(cfg, logits.detach().requires_grad_(), ids, inputs["old_logp"],
                                     inputs["advantages"], inputs["mask"], temperature=TEMPERATURE)
    assert loss.grad_fn is None


def test_public_op_dispatches_to_the_backend(backend):
    """``backend=name`` and ``force_backend(name)`` reach the backend, whose gradient scales with the upstream
    one (-3 here); under no_grad the value is the same."""
    _, logits, ids, inputs = make_inputs(backend.device)
    kwargs = dict(temperature=TEMPERATURE, loss_type="grpo", importance_sampling_level="sequence_token",
                  return_entropy=True)
    args = (ids, inputs["old_logp"], inputs["advantages"], inputs["mask"])
    x_r = logits.detach().clone().requires_grad_()
    ref_loss, ref_metrics = gf.fused_policy_loss(x_r, *args, backend="torch", **kwargs)
    (-3.0 * ref_loss).backward()
    x = logits.detach().clone().requires_grad_()
    loss, metrics = gf.fused_policy_loss(x, *args, backend=backend.name, **kwargs)
    (-3.0 * loss).backward()
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(metrics["entropy"], ref_metrics["entropy"], atol=1e-5, rtol=1e-5, name="entropy")
    assert_close(x.grad, x_r.grad, atol=1e-7, rtol=1e-4, name="grad")
    with gf.force_backend(backend.name), torch.no_grad():
        loss, _ = gf.fused_policy_loss(logits, *args, **kwargs)
    assert loss.grad_fn is None
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")


@pytest.mark.only_backends("cpp", reason="torch's thread count drives the C++ kernels' parallel loop only")
def test_thread_count_independence(backend, threads):
    cfg, logits, ids, inputs = make_inputs(backend.device, spec=dict(algorithm="gmpo", beta=0.04))
    results = []
    for n in (1, 2):
        threads(n)
        results.append(run(fast_loss(backend), cfg, logits, ids, inputs))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][2], results[1][2])


@pytest.mark.only_backends("triton", reason="Triton compiles one kernel variant per specialisation key")
def test_skip_mask_does_not_change_the_specialisation(backend, monkeypatch):
    """The fused loss always launches the forward with its mask (HAS_ACTIVE): one compiled variant across
    batch shapes, masks and temperatures."""
    launchers = backend.launchers("logprobs")
    fwd = KernelRecorder(launchers._token_logprobs_fwd_kernel)
    monkeypatch.setattr(launchers, "_token_logprobs_fwd_kernel", fwd)
    for b, t in [(3, 3), (4, 16), (5, 17)]:
        cfg, logits, ids, inputs = make_inputs(backend.device, b=b, t=t, v=130, spec=dict(loss_type="dapo"))
        fast_loss(backend)(cfg, logits, ids, inputs["old_logp"], inputs["advantages"], inputs["mask"],
                           temperature=0.5 * t)
    assert len(fwd.launches) == 3
    assert all(launch["HAS_ACTIVE"] for launch in fwd.launches)
    assert len(fwd.specialization_keys()) == 1


@pytest.mark.only_backends("triton", reason="the Triton launches run eagerly inside torch.compile (eager_launch)")
def test_inside_torch_compile(backend):
    """Compiled, the fused loss runs its launches eagerly (graph breaks) and gives the reference's loss and gradient."""
    cfg, logits, ids, inputs = make_inputs(backend.device, spec=dict(algorithm="gmpo"))
    torch._dynamo.reset()
    compiled = torch.compile(fast_loss(backend), backend="eager")
    loss, _, grad = run(compiled, cfg, logits, ids, inputs)
    ref_loss, _, ref_grad = run(fused_policy_loss_ref, cfg, logits, ids, inputs)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(grad, ref_grad, atol=1e-7, rtol=1e-5, name="grad")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.only_backends("triton", reason="the GPU backend at GPU sizes")
class TestRealisticShapes:
    """On a GPU: Qwen-sized vocab, 4 x 1024 tokens, bf16, token-level and per-sequence algorithms."""

    @pytest.mark.parametrize("name", ["dapo-token", "grpo-sequence", "grpo-sequence_token", "gmpo"])
    def test_qwen_vocab_bf16(self, backend, name):
        cfg, logits, ids, inputs = make_inputs("cuda", torch.bfloat16, b=4, t=1024, v=151_936,
                                               spec=dict(CONFIGS)[name])
        loss, _, grad = run(fast_loss(backend), cfg, logits, ids, inputs)
        ref_loss, _, ref_grad = run(fused_policy_loss_ref, cfg, logits, ids, inputs)
        assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4, name="loss")
        _, _, exact = run(fused_policy_loss_ref, cfg, logits.float(), ids, inputs)
        assert_close_3way(grad, exact, ref_grad, atol=1e-8, name="grad")
