"""Triton token log-probs (kernels/logprobs.py) against the torch reference: values, entropies and
gradients, fp32 / bf16 / fp16, strided and 2-D inputs, ragged vocab tiles, the in-place backward,
skipped rows, and no recompilation across batch shapes. CPU runs use the interpreter (conftest.py)."""
import functools

import pytest
import torch

import gfpo_fast as gf
from gfpo_fast.kernels import logprobs as lp_kernels
from gfpo_fast.logprobs import apply_token_logprobs, token_logprobs_ref

import bad_token_ids
from triton_helpers import (
    INTERPRETER_NUMPY_WARNINGS,
    KernelRecorder,
    assert_close,
    assert_close_3way,
    compiled_variants,
)

pytestmark = INTERPRETER_NUMPY_WARNINGS

# The Triton launchers under the one autograd layer, with the inplace option the public op does not expose.
token_logprobs_triton = functools.partial(apply_token_logprobs, lp_kernels)

B, T, V = 3, 5, 300  # V = 300 is three ragged 128-wide tiles under the interpreter


def model_logits(b, t, v, dtype, device, scale=3.0):
    """The ``[:, :-1]`` slice of a ``[b, t + 1, v]`` output: non-contiguous rows, as a causal LM gives them."""
    return (torch.randn(b, t + 1, v, device=device) * scale).to(dtype)[:, :-1]


def reference_with_grads(logits, ids, temperature, g_logp, g_ent, dtype):
    """Reference values and logits gradient, computed from ``logits`` cast to ``dtype`` (leaf copy)."""
    x = logits.detach().to(dtype).requires_grad_()
    logp, ent = token_logprobs_ref(x, ids, temperature=temperature, return_entropy=True)
    loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if g_ent is not None else 0.0)
    loss.backward()
    return logp, ent, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_matches_reference(device, dtype, temperature, entropy_grad):
    logits = model_logits(B, T, V, dtype, device)
    ids = torch.randint(0, V, (B, T), device=device)
    g_logp = torch.randn(B, T, device=device)
    g_ent = torch.randn(B, T, device=device) if entropy_grad else None

    x = logits.detach().requires_grad_()
    logp, ent = token_logprobs_triton(x, ids, temperature=temperature, return_entropy=True)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == (B, T)
    ((logp * g_logp).sum() + ((ent * g_ent).sum() if entropy_grad else 0.0)).backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape

    # The reference upcasts the logits first, so the forward is fp32 math in both: tight tolerance.
    ref_logp, ref_ent, ref_grad = reference_with_grads(logits, ids, temperature, g_logp, g_ent, dtype)
    assert_close(logp, ref_logp, atol=2e-5, rtol=1e-5, name="logp")
    assert_close(ent, ref_ent, atol=2e-5, rtol=1e-5, name="entropy")
    if dtype == torch.float32:
        assert_close(x.grad, ref_grad, atol=1e-5, rtol=1e-5, name="grad")
    else:  # both round an fp32 gradient once to the low dtype; judged against the exact fp32 gradient
        _, _, exact = reference_with_grads(logits.float(), ids, temperature, g_logp, g_ent, torch.float32)
        assert_close_3way(x.grad, exact, ref_grad, atol=1e-6, name="grad")


def check_logp_and_grad(logits, ids, temperature):
    """Kernel logp (no entropy) and its logits gradient for sum(logp) equal the reference."""
    x = logits.clone().requires_grad_()
    logp = token_logprobs_triton(x, ids, temperature=temperature, return_entropy=False)
    logp.sum().backward()
    x_ref = logits.clone().requires_grad_()
    ref = token_logprobs_ref(x_ref, ids, temperature=temperature)
    ref.sum().backward()
    assert_close(logp, ref, atol=1e-5, rtol=1e-5, name="logp")
    assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5, name="grad")


def test_flat_rows_int32_ids_and_logp_only(device):
    """[N, V] logits with int32 ids; without return_entropy only logp comes back."""
    logits = torch.randn(7, V, device=device) * 2
    ids = torch.randint(0, V, (7,), device=device, dtype=torch.int32)
    check_logp_and_grad(logits, ids, temperature=1.3)


def test_entropy_alone_gets_a_gradient(device):
    """Entropy is differentiable (TRL's entropy bonus); logp unused brings no logp gradient."""
    logits = torch.randn(B, T, V, device=device)
    ids = torch.randint(0, V, (B, T), device=device)
    x = logits.clone().requires_grad_()
    _, ent = token_logprobs_triton(x, ids, temperature=1.0, return_entropy=True)
    ent.sum().backward()
    x_ref = logits.clone().requires_grad_()
    token_logprobs_ref(x_ref, ids, return_entropy=True)[1].sum().backward()
    assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5, name="grad")


def test_inplace_backward_writes_into_the_logits(device):
    logits = torch.randn(B, T, V, device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, V, (B, T), device=device)
    g = torch.randn(B, T, device=device)
    _, _, expected = reference_with_grads(logits, ids, 0.8, g, None, torch.bfloat16)

    buffer = logits.clone()
    x = buffer.requires_grad_()
    logp = token_logprobs_triton(x, ids, temperature=0.8, return_entropy=False, inplace=True)
    (grad,) = torch.autograd.grad((logp * g).sum(), x)
    assert grad.data_ptr() == buffer.data_ptr()  # no [N, V] allocation
    assert_close(grad, expected, atol=1e-2, rtol=0, name="grad")  # at most one bf16 rounding apart
    assert_close(buffer, expected, atol=1e-2, rtol=0, name="buffer")


def test_rows_with_zero_gradient_are_skipped(device):
    """A zero upstream gradient writes zeros without reading the row: even a NaN row gets 0, not NaN."""
    logits = torch.randn(B, T, V, device=device)
    logits[1] = float("nan")
    ids = torch.randint(0, V, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[1] = False
    mask[2, 3:] = False
    x = logits.clone().requires_grad_()
    logp = token_logprobs_triton(x, ids, temperature=1.0, return_entropy=False)
    torch.where(mask, logp, 0.0).sum().backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    x_ref = logits.clone().requires_grad_()
    torch.where(mask, token_logprobs_ref(x_ref, ids), 0.0).sum().backward()
    assert_close(x.grad[mask], x_ref.grad[mask], atol=1e-6, rtol=1e-5, name="grad")


def test_masked_vocab_range(device):
    """-inf logits (a masked vocab range) covering whole leading tiles leave the other tokens' log-probs exact."""
    logits = torch.randn(B, T, V, device=device)
    logits[..., :200] = float("-inf")
    ids = torch.randint(200, V, (B, T), device=device)
    check_logp_and_grad(logits, ids, temperature=1.0)


def test_public_op_dispatches_to_triton(device):
    logits = torch.randn(B, T, V, device=device)
    ids = torch.randint(0, V, (B, T), device=device)
    ref = token_logprobs_ref(logits, ids, temperature=0.9)
    assert_close(gf.token_logprobs(logits, ids, temperature=0.9, backend="triton"), ref, atol=1e-5, rtol=1e-5)
    with gf.force_backend("triton"):
        assert_close(gf.token_logprobs(logits, ids, temperature=0.9), ref, atol=1e-5, rtol=1e-5)


def test_batch_shape_and_temperature_do_not_change_the_specialisation(device, monkeypatch):
    """Triton compiles one variant per (constexpr values, ==1 / %16 of specialised ints): across batch
    shapes and temperatures that key must not change, so the kernel compiles once per vocab size."""
    fwd = KernelRecorder(lp_kernels._token_logprobs_fwd_kernel)
    bwd = KernelRecorder(lp_kernels._token_logprobs_bwd_kernel)
    monkeypatch.setattr(lp_kernels, "_token_logprobs_fwd_kernel", fwd)
    monkeypatch.setattr(lp_kernels, "_token_logprobs_bwd_kernel", bwd)
    for b, t, temperature in [(1, 1, 1.0), (2, 3, 0.7), (3, 16, 1.0), (1, 17, 1.2), (4, 2, 0.5)]:
        x = model_logits(b, t, V, torch.float32, device).requires_grad_()
        ids = torch.randint(0, V, (b, t), device=device)
        token_logprobs_triton(x, ids, temperature=temperature, return_entropy=False).sum().backward()
    assert len(fwd.launches) == len(bwd.launches) == 5
    assert len(fwd.specialization_keys()) == 1
    assert len(bwd.specialization_keys()) == 1


def test_inside_torch_compile(device):
    """Inside a compiled function the launches run eagerly (``eager_launch``: Dynamo does not trace them) while
    Dynamo still captures the caller's own arithmetic, and the gradient is the reference's. The "eager" compile
    backend keeps this fast on CPU; Dynamo's capture is what is under test."""
    logits = torch.randn(B, T, V, device=device)
    ids = torch.randint(0, V, (B, T), device=device)

    def loss_fn(x, temperature, op=token_logprobs_triton):
        logp, ent = op(x, ids, temperature=temperature, return_entropy=True)
        return (logp * logp).sum() + ent.sum()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss_fn)(logits.clone().requires_grad_(), 0.7)
    assert explained.graph_count >= 1 and explained.op_count >= 2, explained  # the products and sums
    grads = []
    for fn in (torch.compile(loss_fn, backend="eager"), functools.partial(loss_fn, op=token_logprobs_ref)):
        x = logits.clone().requires_grad_()
        fn(x, 0.7).backward()
        grads.append(x.grad)
    assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5, name="grad")


@pytest.mark.parametrize("op,bad,where", bad_token_ids.CASES)
def test_out_of_range_ids_are_a_value_error(device, op, bad, where):
    bad_token_ids.check_rejected("triton", device, op, bad, where)


def test_launchers_never_dereference_an_out_of_range_id(device):
    """Below the public check, an id outside [0, V) gives a NaN log-prob (its load is masked off) and a NaN
    gradient row (not a gradient silently missing its one-hot term)."""
    logits = torch.randn(4, V, device=device)
    ids = torch.randint(0, V, (4,), device=device)
    ids[1], ids[2] = -100, V
    logp, lse, _ = lp_kernels.token_logprobs_forward(logits, ids, 1.0, False)
    assert torch.isnan(logp[1:3]).all() and torch.isfinite(logp[[0, 3]]).all() and torch.isfinite(lse).all()
    grad = lp_kernels.token_logprobs_backward(logits, ids, lse, torch.ones(4, device=device), 1.0)
    assert torch.isnan(grad[1:3]).all() and torch.isfinite(grad[[0, 3]]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestRealisticShapes:
    """On a GPU: a Qwen-sized vocab, long sequences, more rows than a 65,535 grid dimension, one compile."""

    def test_qwen_vocab_bf16(self):
        b, t, v = 4, 512, 151_936
        logits = model_logits(b, t, v, torch.bfloat16, "cuda", scale=4.0)
        ids = torch.randint(0, v, (b, t), device="cuda")
        g = torch.randn(b, t, device="cuda")
        x = logits.detach().requires_grad_()
        logp, ent = token_logprobs_triton(x, ids, temperature=0.7, return_entropy=True)
        (logp * g).sum().backward()
        ref_logp, ref_ent, ref_grad = reference_with_grads(logits, ids, 0.7, g, None, torch.bfloat16)
        assert_close(logp, ref_logp, atol=1e-4, rtol=1e-5, name="logp")
        assert_close(ent, ref_ent, atol=1e-4, rtol=1e-5, name="entropy")
        _, _, exact = reference_with_grads(logits.float(), ids, 0.7, g, None, torch.float32)
        assert_close_3way(x.grad, exact, ref_grad, atol=1e-6, name="grad")

    def test_more_rows_than_a_grid_dimension(self):
        n, v = 70_000, 1000
        logits = torch.randn(1, n, v, device="cuda", dtype=torch.bfloat16)
        ids = torch.randint(0, v, (1, n), device="cuda")
        assert_close(token_logprobs_triton(logits, ids, return_entropy=False), token_logprobs_ref(logits, ids),
                     atol=1e-4, rtol=1e-5)

    def test_one_compile_across_shapes(self):
        v = 32_000
        for b, t, temperature in [(2, 100, 1.0), (2, 128, 0.7), (3, 77, 1.0), (1, 1, 1.3), (8, 513, 0.9)]:
            x = model_logits(b, t, v, torch.bfloat16, "cuda").requires_grad_()
            ids = torch.randint(0, v, (b, t), device="cuda")
            token_logprobs_triton(x, ids, temperature=temperature, return_entropy=False).sum().backward()
            if b == 2 and t == 100:
                before = (compiled_variants(lp_kernels._token_logprobs_fwd_kernel),
                          compiled_variants(lp_kernels._token_logprobs_bwd_kernel))
        after = (compiled_variants(lp_kernels._token_logprobs_fwd_kernel),
                 compiled_variants(lp_kernels._token_logprobs_bwd_kernel))
        assert after[0] <= before[0] + 1 and after[1] <= before[1] + 1
