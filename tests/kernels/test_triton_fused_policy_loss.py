"""fused_policy_loss on the Triton launchers (kernels/logprobs.py) against the torch reference composition
(``fused_policy_loss_ref``): loss, metrics and logits gradient for every algorithm, loss type and
importance-sampling level, KL, delta, vLLM IS ratios, fully masked rows, GFPO keep masks, bf16; masked
tokens' logits are never read (NaN / inf there changes nothing) and the skip adds no per-shape compile.
CPU runs use the interpreter (conftest.py)."""
import functools

import pytest
import torch

import gfpo_fast as gf
from gfpo_fast.fused_policy_loss import fused_policy_loss_fast, fused_policy_loss_ref
from gfpo_fast.kernels import logprobs as lp_kernels
from gfpo_fast.kernels.logprobs import token_logprobs_forward
from gfpo_fast.logprobs import token_logprobs_ref
from gfpo_fast.policy_loss import LOSS_REGISTRY, make_loss_config

from triton_helpers import INTERPRETER_NUMPY_WARNINGS, KernelRecorder, assert_close, assert_close_3way

pytestmark = [INTERPRETER_NUMPY_WARNINGS, pytest.mark.filterwarnings("ignore:loss_type='(vespo|luspo)' is meant for")]

fused_policy_loss_triton = functools.partial(fused_policy_loss_fast, lp_kernels)

B, T, V = 4, 5, 300
TEMPERATURE = 0.9
GRAD_SCALE = 2.5  # upstream gradient of the loss: backward must scale by it on the device

CONFIGS = [
    *[(f"{lt}-{level}", dict(loss_type=lt, importance_sampling_level=level))
      for lt, spec in LOSS_REGISTRY.items() for level in spec.levels if (lt, level) != ("vespo", "sequence")],
    ("gmpo", dict(algorithm="gmpo")),
    ("gmpo-kl-eps", dict(algorithm="gmpo", beta=0.05, epsilon=0.1, epsilon_high=0.2)),
    ("grpo-delta", dict(loss_type="grpo", delta=1.1)),
    ("grpo-kl", dict(loss_type="grpo", beta=0.04)),
    ("dapo-kl-bias-corrected", dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=True)),
    ("grpo-sequence-kl", dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04)),
    ("dapo-token-rho", dict(loss_type="dapo", rho="token")),
    ("grpo-sequence-rho", dict(loss_type="grpo", importance_sampling_level="sequence", rho="sequence")),
    ("vespo-token-rho", dict(loss_type="vespo", rho="token")),
    ("cispo-eps_high5", dict(loss_type="cispo", epsilon_high=5.0)),
    ("dapo-ga2-p2", dict(loss_type="dapo", grad_accum_steps=2, num_processes=2, num_items_in_batch=40)),
    ("bnpo-ga2", dict(loss_type="bnpo", grad_accum_steps=2)),
    ("grpo-token-advantages", dict(loss_type="grpo", advantages="token")),
    ("dapo-on-policy", dict(loss_type="dapo", old_logp=None)),
    ("sequence_token-on-policy", dict(loss_type="grpo", importance_sampling_level="sequence_token", old_logp=None)),
]


def make_inputs(device, dtype=torch.float32, b=B, t=T, v=V, spec=None):
    """Logits (a non-contiguous ``[:, :-1]`` slice), ids, and loss tensors around the current policy:
    old / ref log-probs within ~0.3 of it, so ratios fall on both sides of the clip range."""
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
    """(loss, metrics, dloss/dlogits) of one implementation, on a fresh leaf copy of the logits."""
    x = logits.detach().clone().requires_grad_()
    loss, metrics = fn(cfg, x, ids, inputs["old_logp"], inputs["advantages"], inputs["mask"],
                       temperature=TEMPERATURE, return_entropy=return_entropy, ref_logp=inputs.get("ref_logp"),
                       importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
                       num_items_in_batch=inputs.get("num_items_in_batch"), **kwargs)
    (grad,) = torch.autograd.grad(loss * GRAD_SCALE, x)
    return loss, metrics, grad


@pytest.mark.parametrize("spec", [c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_matches_reference_fp32(device, spec):
    cfg, logits, ids, inputs = make_inputs(device, spec=spec)
    loss, metrics, grad = run(fused_policy_loss_triton, cfg, logits, ids, inputs)
    ref_loss, ref_metrics, ref_grad = run(fused_policy_loss_ref, cfg, logits, ids, inputs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert metrics.keys() == ref_metrics.keys()
    for name in metrics:
        assert_close(metrics[name], ref_metrics[name], atol=1e-5, rtol=1e-5, name=name)
    assert_close(grad, ref_grad, atol=1e-7, rtol=1e-4, name="grad")
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))  # the fully masked row


@pytest.mark.parametrize("name", ["dapo-token", "grpo-sequence", "gmpo", "grpo-kl"])
def test_matches_reference_bf16(device, name):
    spec = dict(CONFIGS)[name]
    cfg, logits, ids, inputs = make_inputs(device, torch.bfloat16, spec=spec)
    loss, metrics, grad = run(fused_policy_loss_triton, cfg, logits, ids, inputs)
    assert grad.dtype == torch.bfloat16
    ref_loss, ref_metrics, ref_grad = run(fused_policy_loss_ref, cfg, logits, ids, inputs)
    # Both compute the log-probs of the bf16 logits in fp32: the forward agrees to fp32 rounding.
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    for key in metrics:
        assert_close(metrics[key], ref_metrics[key], atol=1e-5, rtol=1e-5, name=key)
    _, _, exact = run(fused_policy_loss_ref, cfg, logits.float(), ids, inputs)
    assert_close_3way(grad, exact, ref_grad, atol=1e-7, name="grad")


def test_gfpo_keep_mask_drops_rows(device):
    """GFPO end to end on the triton backend: filter, then a loss whose dropped rows get zero gradient."""
    G, groups, k = 4, 2, 2
    b = G * groups
    cfg, logits, ids, inputs = make_inputs(device, b=b, spec=dict(loss_type="dapo"))
    rewards = torch.randn(b, device=device)
    lengths = inputs["mask"].sum(-1)
    advantages, keep = gf.gfpo_filter(rewards, -lengths - 0.01 * torch.arange(b, device=device), G, k,
                                      backend="triton")
    assert keep.view(groups, G).sum(-1).tolist() == [k] * groups
    inputs.update(advantages=advantages, mask=inputs["mask"] * keep[:, None])
    loss, _, grad = run(fused_policy_loss_triton, cfg, logits, ids, inputs)
    ref_loss, _, ref_grad = run(fused_policy_loss_ref, cfg, logits, ids, inputs)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(grad, ref_grad, atol=1e-7, rtol=1e-4, name="grad")
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))


def with_garbage_on_masked_tokens(logits, mask):
    """A copy of ``logits`` with NaN, +inf and -inf on every masked token (cycling along the vocab)."""
    garbage = torch.tensor([float("nan"), float("inf"), float("-inf")], device=logits.device, dtype=logits.dtype)
    out = logits.detach().clone()
    out[mask == 0] = garbage[torch.arange(logits.shape[-1], device=logits.device) % 3]
    return out


@pytest.mark.parametrize("name", ["dapo-token", "grpo-sequence", "grpo-sequence_token", "gmpo-kl-eps",
                                  "dapo-token-rho"])
def test_masked_tokens_logits_are_not_read(device, name):
    """Garbage logits on masked tokens (a fully masked row, a ragged tail, a GFPO-dropped row): loss,
    metrics (entropy included) and gradient equal the reference on clean logits, masked tokens get
    exactly zero gradient."""
    cfg, logits, ids, inputs = make_inputs(device, spec=dict(CONFIGS)[name])
    inputs["mask"][3] = 0  # as GFPO drops a row: mask 0 and advantage 0
    inputs["advantages"][3] = 0.0
    loss, metrics, grad = run(fused_policy_loss_triton, cfg, with_garbage_on_masked_tokens(logits, inputs["mask"]),
                              ids, inputs)
    ref_loss, ref_metrics, ref_grad = run(fused_policy_loss_ref, cfg, logits, ids, inputs)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert_close(metrics[key], ref_metrics[key], atol=1e-5, rtol=1e-5, name=key)
    assert_close(grad, ref_grad, atol=1e-7, rtol=1e-4, name="grad")
    masked = inputs["mask"] == 0
    assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_skips_inactive_rows(device, dtype):
    """The forward kernel with ``active``: inactive rows get exactly 0 for logp, lse and entropy whatever
    their logits (NaN / inf, which any read would propagate); active rows are bitwise unchanged."""
    _, logits, ids, inputs = make_inputs(device, dtype)
    active = inputs["mask"] != 0
    skipped = token_logprobs_forward(with_garbage_on_masked_tokens(logits, inputs["mask"]), ids, TEMPERATURE, True,
                                     active)
    full = token_logprobs_forward(logits, ids, TEMPERATURE, True)
    for got, expected in zip(skipped, full):
        assert torch.equal(got[~active], torch.zeros_like(got[~active]))
        assert torch.equal(got[active], expected[active])


def test_skip_mask_does_not_change_the_specialisation(device, monkeypatch):
    """The fused loss always launches the forward with its mask (HAS_ACTIVE): one compiled variant across
    batch shapes, masks and temperatures."""
    fwd = KernelRecorder(lp_kernels._token_logprobs_fwd_kernel)
    monkeypatch.setattr(lp_kernels, "_token_logprobs_fwd_kernel", fwd)
    for b, t in [(3, 3), (4, 16), (5, 17)]:
        cfg, logits, ids, inputs = make_inputs(device, b=b, t=t, v=130, spec=dict(loss_type="dapo"))
        fused_policy_loss_triton(cfg, logits, ids, inputs["old_logp"], inputs["advantages"], inputs["mask"],
                                 temperature=0.5 * t)
    assert len(fwd.launches) == 3
    assert all(launch["HAS_ACTIVE"] for launch in fwd.launches)
    assert len(fwd.specialization_keys()) == 1


def test_inplace_and_no_grad(device):
    cfg, logits, ids, inputs = make_inputs(device, spec=dict(loss_type="grpo"))
    _, _, ref_grad = run(fused_policy_loss_ref, cfg, logits, ids, inputs)
    buffer = logits.detach().clone()
    x = buffer.requires_grad_()
    loss, _ = fused_policy_loss_triton(cfg, x, ids, inputs["old_logp"], inputs["advantages"], inputs["mask"],
                                       temperature=TEMPERATURE, inplace=True)
    (grad,) = torch.autograd.grad(loss * GRAD_SCALE, x)
    assert grad.data_ptr() == buffer.data_ptr()
    assert_close(grad, ref_grad, atol=1e-7, rtol=1e-4, name="grad")
    with torch.no_grad():
        loss, _ = fused_policy_loss_triton(cfg, logits.detach().requires_grad_(), ids, inputs["old_logp"],
                                           inputs["advantages"], inputs["mask"], temperature=TEMPERATURE)
    assert loss.grad_fn is None


def test_public_op_dispatches_to_triton(device):
    _, logits, ids, inputs = make_inputs(device)
    kwargs = dict(temperature=TEMPERATURE, loss_type="bnpo", return_entropy=True)
    args = (ids, inputs["old_logp"], inputs["advantages"], inputs["mask"])
    ref_loss, ref_metrics = gf.fused_policy_loss(logits, *args, backend="torch", **kwargs)
    loss, metrics = gf.fused_policy_loss(logits, *args, backend="triton", **kwargs)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(metrics["entropy"], ref_metrics["entropy"], atol=1e-5, rtol=1e-5, name="entropy")
    with gf.force_backend("triton"):
        loss, _ = gf.fused_policy_loss(logits, *args, **kwargs)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")


def test_inside_torch_compile(device):
    """Compiled, the fused loss runs its launches eagerly (graph breaks) and gives the reference's loss and gradient."""
    cfg, logits, ids, inputs = make_inputs(device, spec=dict(algorithm="gmpo"))
    torch._dynamo.reset()
    compiled = torch.compile(fused_policy_loss_triton, backend="eager")
    loss, _, grad = run(compiled, cfg, logits, ids, inputs)
    ref_loss, _, ref_grad = run(fused_policy_loss_ref, cfg, logits, ids, inputs)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(grad, ref_grad, atol=1e-7, rtol=1e-5, name="grad")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestRealisticShapes:
    """On a GPU: Qwen-sized vocab, 4 x 1024 tokens, bf16, token-level and per-sequence algorithms."""

    @pytest.mark.parametrize("name", ["dapo-token", "grpo-sequence", "grpo-sequence_token", "gmpo"])
    def test_qwen_vocab_bf16(self, name):
        cfg, logits, ids, inputs = make_inputs("cuda", torch.bfloat16, b=4, t=1024, v=151_936,
                                               spec=dict(CONFIGS)[name])
        loss, _, grad = run(fused_policy_loss_triton, cfg, logits, ids, inputs)
        ref_loss, _, ref_grad = run(fused_policy_loss_ref, cfg, logits, ids, inputs)
        assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4, name="loss")
        _, _, exact = run(fused_policy_loss_ref, cfg, logits.float(), ids, inputs)
        assert_close_3way(grad, exact, ref_grad, atol=1e-8, name="grad")
