"""token_logprobs on every fast backend's launchers (``backends.launchers(name, "logprobs")``) against the torch
reference: values, entropies and gradients, fp32 / bf16 / fp16, ragged vocab sizes across the backends' vocab
chunks or tiles, temperature, strided and flat inputs, int32 ids, -inf and NaN logits, zero-gradient rows,
the in-place backward, empty input and out-of-range ids. Backend-specific: the C++ float64-grade accuracy and
thread-count independence, Triton's compile-once specialisation, torch.compile and realistic GPU shapes."""
import functools

import pytest
import torch
from backend_checks import (
    INTERPRETER_NUMPY_WARNINGS,
    KernelRecorder,
    assert_close,
    assert_close_3way,
    compiled_variants,
)

import gfpo_fast as gf
from gfpo_fast.logprobs import apply_token_logprobs, token_logprobs_ref

import bad_token_ids

pytestmark = INTERPRETER_NUMPY_WARNINGS

B, T, V = 3, 5, 300  # V = 300 is three ragged 128-wide tiles under the interpreter


def fast_op(backend):
    """The backend's launchers under the one autograd layer, with the inplace option the public op does not expose."""
    return functools.partial(apply_token_logprobs, backend.launchers("logprobs"))


def model_logits(b, t, v, dtype, device, scale=3.0):
    """The ``[:, :-1]`` slice of a ``[b, t + 1, v]`` output: non-contiguous rows, as a causal LM gives them."""
    return (torch.randn(b, t + 1, v, device=device) * scale).to(dtype)[:, :-1]


def make(shape, device, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * scale).to(dtype)
    ids = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return logits.to(device), ids.to(device)


def run(fn, logits, ids, seed=1, **kwargs):
    """Forward with entropy, backward of sum(g1 logp + g2 entropy); returns (logp, entropy, dlogits)."""
    x = logits.detach().clone().requires_grad_()
    logp, ent = fn(x, ids, return_entropy=True, **kwargs)
    g = torch.Generator().manual_seed(seed)
    g1, g2 = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)
    (logp * g1.to(x.device) + ent * g2.to(x.device)).sum().backward()
    return logp.detach(), ent.detach(), x.grad


def reference_with_grads(logits, ids, temperature, g_logp, g_ent, dtype):
    """Reference values and logits gradient, computed from ``logits`` cast to ``dtype`` (leaf copy)."""
    x = logits.detach().to(dtype).requires_grad_()
    logp, ent = token_logprobs_ref(x, ids, temperature=temperature, return_entropy=True)
    loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if g_ent is not None else 0.0)
    loss.backward()
    return logp, ent, x.grad


def assert_grad_matches(grad, logits, ids, expected, **run_kwargs):
    """fp32: close to the reference; low precision: the 3-way rule against the exact fp32 gradient."""
    assert grad.dtype == expected.dtype and grad.shape == expected.shape
    if grad.dtype == torch.float32:
        assert_close(grad, expected, atol=5e-5, rtol=1e-5, name="grad")
    else:
        _, _, exact = run(token_logprobs_ref, logits.float(), ids, **run_kwargs)
        assert_close_3way(grad, exact, expected, atol=1e-6, name="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_matches_reference(backend, dtype, temperature, entropy_grad):
    device = backend.device
    logits = model_logits(B, T, V, dtype, device)
    ids = torch.randint(0, V, (B, T), device=device)
    g_logp = torch.randn(B, T, device=device)
    g_ent = torch.randn(B, T, device=device) if entropy_grad else None

    x = logits.detach().requires_grad_()
    logp, ent = fast_op(backend)(x, ids, temperature=temperature, return_entropy=True)
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


# Vocab sizes around the C++ 2048-wide chunks (V = 2049: one column over) and one column; ragged 128 tiles for
# the interpreter too.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 37), (5, 1), (3, 5003), (2, 2, 2049), (1, 4096)],
                         ids=["BTV-37", "V1", "V5003", "V2049", "V4096"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_ragged_vocab_sizes(backend, dtype, shape, temperature):
    logits, ids = make(shape, backend.device, dtype)
    logp, ent, grad = run(fast_op(backend), logits, ids, temperature=temperature)
    logp_r, ent_r, grad_r = run(token_logprobs_ref, logits, ids, temperature=temperature)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ids.shape
    assert_close(logp, logp_r, atol=5e-5, rtol=1e-5, name="logp")
    assert_close(ent, ent_r, atol=5e-5, rtol=1e-5, name="entropy")
    assert_grad_matches(grad, logits, ids, grad_r, temperature=temperature)


def test_public_op_dispatches_to_the_backend(backend):
    """``backend=name`` and ``force_backend(name)`` with ``"auto"`` both reach the backend; logp only, with grad."""
    logits = torch.randn(B, T, V, device=backend.device)
    ids = torch.randint(0, V, (B, T), device=backend.device)
    x_r = logits.clone().requires_grad_()
    ref = token_logprobs_ref(x_r, ids, temperature=0.9)
    ref.sum().backward()
    x = logits.clone().requires_grad_()
    out = gf.token_logprobs(x, ids, temperature=0.9, backend=backend.name)
    assert not isinstance(out, tuple)
    out.sum().backward()
    assert_close(out, ref, atol=1e-5, rtol=1e-5, name="logp")
    assert_close(x.grad, x_r.grad, atol=1e-6, rtol=1e-5, name="grad")
    with gf.force_backend(backend.name):
        assert_close(gf.token_logprobs(logits, ids, temperature=0.9), ref, atol=1e-5, rtol=1e-5)


def check_logp_and_grad(backend, logits, ids, temperature):
    """Fast logp (no entropy) and its logits gradient for sum(logp) equal the reference."""
    x = logits.clone().requires_grad_()
    logp = fast_op(backend)(x, ids, temperature=temperature, return_entropy=False)
    logp.sum().backward()
    x_ref = logits.clone().requires_grad_()
    ref = token_logprobs_ref(x_ref, ids, temperature=temperature)
    ref.sum().backward()
    assert_close(logp, ref, atol=1e-5, rtol=1e-5, name="logp")
    assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5, name="grad")


def test_flat_rows_int32_ids_and_logp_only(backend):
    """[N, V] logits with int32 ids; without return_entropy only logp comes back."""
    logits = torch.randn(7, V, device=backend.device) * 2
    ids = torch.randint(0, V, (7,), device=backend.device, dtype=torch.int32)
    check_logp_and_grad(backend, logits, ids, temperature=1.3)


def test_entropy_alone_gets_a_gradient(backend):
    """Entropy is differentiable (TRL's entropy bonus); logp unused brings no logp gradient."""
    logits = torch.randn(B, T, V, device=backend.device)
    ids = torch.randint(0, V, (B, T), device=backend.device)
    x = logits.clone().requires_grad_()
    _, ent = fast_op(backend)(x, ids, temperature=1.0, return_entropy=True)
    ent.sum().backward()
    x_ref = logits.clone().requires_grad_()
    token_logprobs_ref(x_ref, ids, return_entropy=True)[1].sum().backward()
    assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5, name="grad")


def test_strided_views_float16_and_int32_ids(backend):
    logits, ids = make((3, 6, 301), backend.device)
    for x0, i in [(logits[:, :-1], ids[:, :-1]),  # TRL drops the last position: rows strided, the vocab not
                  (logits.transpose(0, 1), ids.transpose(0, 1)),
                  (logits.reshape(-1, 301).t().contiguous().t(), ids.reshape(-1).int()),  # strided vocab
                  (logits.half(), ids)]:
        logp, ent, grad = run(fast_op(backend), x0, i)
        logp_r, ent_r, grad_r = run(token_logprobs_ref, x0, i)
        assert_close(logp, logp_r, atol=5e-5, rtol=1e-5, name="logp")
        assert_close(ent, ent_r, atol=5e-5, rtol=1e-5, name="entropy")
        assert grad.dtype == x0.dtype and grad.shape == x0.shape
        assert_close(grad, grad_r, atol=1e-3 if x0.dtype == torch.half else 5e-5, rtol=1e-3, name="grad")


@pytest.mark.only_backends("cpp", reason="the C++ launchers promise to read strided rows in place (kernel_logits)")
def test_strided_rows_are_read_in_place(backend):
    logits, _ = make((3, 6, 301), backend.device)
    sliced = logits[:, :-1]
    assert backend.launchers("logprobs").kernel_logits(sliced) is sliced


def test_large_logits_and_masked_vocab(backend):
    """Online logsumexp: a new maximum in every chunk, huge magnitudes, and -inf columns (banned tokens)."""
    device = backend.device
    n = 5000
    rising = torch.linspace(-400.0, 400.0, n, device=device)[None].repeat(2, 1)
    ids = torch.tensor([n - 1, n - 3], device=device)
    assert_close(fast_op(backend)(rising, ids), token_logprobs_ref(rising, ids), atol=5e-5, rtol=1e-5)

    logits, ids = make((3, n), device)
    logits[:, :2500] = -torch.inf  # the whole first chunk (tiles) and part of the next
    logits[1, 3000:3100] = -torch.inf
    ids = torch.tensor([2600, 4000, 4999], device=device)
    x = logits.clone().requires_grad_()
    logp, ent = fast_op(backend)(x, ids, return_entropy=True)
    (logp + ent).sum().backward()
    # The expected values: each row's distribution over its finite columns only. (The reference itself
    # gives a NaN entropy here, from 0 * -inf in sum p z.)
    finite = torch.isfinite(logits)
    for row in range(3):
        z = logits[row][finite[row]].clone().requires_grad_()
        target = finite[row][: ids[row]].sum()  # the target's index among the finite columns
        lp_r, ent_r = token_logprobs_ref(z[None], target[None], return_entropy=True)
        (lp_r + ent_r).sum().backward()
        assert_close(logp[row], lp_r[0], atol=5e-5, rtol=1e-5, name="logp")
        assert_close(ent[row], ent_r[0], atol=5e-5, rtol=1e-5, name="entropy")
        assert_close(x.grad[row][finite[row]], z.grad, atol=5e-5, rtol=1e-5, name="grad")
        assert torch.all(x.grad[row][~finite[row]] == 0)


def test_masked_vocab_range(backend):
    """-inf logits (a masked vocab range) covering whole leading tiles leave the other tokens' log-probs exact."""
    logits = torch.randn(B, T, V, device=backend.device)
    logits[..., :200] = float("-inf")
    ids = torch.randint(200, V, (B, T), device=backend.device)
    check_logp_and_grad(backend, logits, ids, temperature=1.0)


@pytest.mark.parametrize("column", [0, 5, 2047, 2500])
def test_nan_logit_poisons_only_its_row(backend, column):
    """docs/semantics.md section 2.4: a NaN logit makes its row's log-prob and entropy NaN and its gradient row
    zero; the other rows are untouched (the full non-finite rule: tests/test_nonfinite_logits.py)."""
    logits, ids = make((3, 3000), backend.device)
    logits[1, column] = torch.nan
    x = logits.clone().requires_grad_()
    logp, ent = fast_op(backend)(x, ids, return_entropy=True)
    assert torch.isnan(logp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(ent[[0, 2]]).all()
    (logp + ent).sum().backward()
    assert torch.all(x.grad[1] == 0) and torch.isfinite(x.grad[[0, 2]]).all()


def test_rows_with_zero_gradient_are_skipped(backend):
    """A zero upstream gradient writes zeros without reading the row: even a NaN row gets 0, not NaN."""
    device = backend.device
    logits = torch.randn(B, T, V, device=device)
    logits[1] = float("nan")
    ids = torch.randint(0, V, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[1] = False
    mask[2, 3:] = False
    x = logits.clone().requires_grad_()
    logp = fast_op(backend)(x, ids, temperature=1.0, return_entropy=False)
    torch.where(mask, logp, 0.0).sum().backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    x_ref = logits.clone().requires_grad_()
    torch.where(mask, token_logprobs_ref(x_ref, ids), 0.0).sum().backward()
    assert_close(x.grad[mask], x_ref.grad[mask], atol=1e-6, rtol=1e-5, name="grad")


def test_zero_gradient_weights_and_empty_input(backend):
    logits, ids = make((6, 700), backend.device)
    x = logits.clone().requires_grad_()
    weights = torch.tensor([1.0, 0.0, -2.0, 0.0, 0.0, 0.5], device=backend.device)
    (fast_op(backend)(x, ids) * weights).sum().backward()
    x_r = logits.clone().requires_grad_()
    (token_logprobs_ref(x_r, ids) * weights).sum().backward()
    assert torch.all(x.grad[weights == 0] == 0)
    assert_close(x.grad, x_r.grad, atol=5e-5, rtol=1e-5, name="grad")

    empty = torch.zeros(0, 4, 50, device=backend.device, requires_grad=True)
    out = fast_op(backend)(empty, torch.zeros(0, 4, dtype=torch.long, device=backend.device))
    out.sum().backward()
    assert out.shape == (0, 4) and empty.grad.shape == empty.shape


def test_inplace_backward_overwrites_logits_with_the_gradient(backend):
    """In place, backward writes the gradient where the rows are (a strided view included), bit-identical to
    the allocating backward, and leaves rows outside the view alone; a contiguous input gets no new buffer."""
    logits, ids = make((2, 5, 333), backend.device, torch.bfloat16)
    _, _, expected = run(fast_op(backend), logits, ids, temperature=0.8)
    buffer = logits.clone()
    x = buffer[:, :4].requires_grad_()  # strided rows, written in place where they are
    logp, ent = fast_op(backend)(x, ids[:, :4], temperature=0.8, return_entropy=True, inplace=True)
    g = torch.Generator().manual_seed(1)
    g1, g2 = (torch.randn(ids.shape, generator=g).to(backend.device) for _ in range(2))
    (logp * g1[:, :4] + ent * g2[:, :4]).sum().backward()
    torch.testing.assert_close(buffer[:, :4], expected[:, :4], atol=0, rtol=0)  # written where the rows are
    torch.testing.assert_close(x.grad, expected[:, :4], atol=0, rtol=0)
    torch.testing.assert_close(buffer[:, 4], logits[:, 4], atol=0, rtol=0)  # rows outside the view untouched

    whole = logits.clone().requires_grad_()
    logp = fast_op(backend)(whole, ids, temperature=0.8, return_entropy=False, inplace=True)
    (grad,) = torch.autograd.grad((logp * g1).sum(), whole)
    assert grad.data_ptr() == whole.data_ptr()  # no [N, V] allocation


@pytest.mark.parametrize("op,bad,where", bad_token_ids.CASES)
def test_out_of_range_ids_are_a_value_error(backend, op, bad, where):
    bad_token_ids.check_rejected(backend.name, backend.device, op, bad, where)


def test_launchers_never_dereference_an_out_of_range_id(backend):
    """Below the public check, an id outside [0, V) gives a NaN log-prob (nothing read) and a NaN gradient row
    (not a gradient silently missing its one-hot term)."""
    launchers = backend.launchers("logprobs")
    logits = torch.randn(4, V, device=backend.device)
    ids = torch.randint(0, V, (4,), device=backend.device)
    ids[1], ids[2] = -100, V
    logp, lse, _ = launchers.token_logprobs_forward(logits, ids, 1.0, False)
    assert torch.isnan(logp[1:3]).all() and torch.isfinite(logp[[0, 3]]).all() and torch.isfinite(lse).all()
    grad = launchers.token_logprobs_backward(logits, ids, lse, torch.ones(4, device=backend.device), 1.0)
    assert torch.isnan(grad[1:3]).all() and torch.isfinite(grad[[0, 3]]).all()


@pytest.mark.only_backends("cpp", reason="the C++ pass accumulates each row in float64 (chunked online logsumexp); "
                                         "Triton's fp32 tiles are held to the float32 reference")
def test_more_accurate_than_float32_reference(backend):
    """At V = 49152 the C++ pass stays within ~1e-5 of a float64 computation in every output."""
    logits, ids = make((4, 49152), backend.device, scale=3.0)
    logp, ent, grad = run(fast_op(backend), logits, ids, temperature=0.7)
    x = logits.double().requires_grad_()
    z = x / 0.7
    lse = torch.logsumexp(z, -1)
    logp64 = z.gather(-1, ids[:, None]).squeeze(-1) - lse
    ent64 = lse - (torch.softmax(z, -1) * z).sum(-1)
    g = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)
    (logp64 * g1 + ent64 * g2).sum().backward()
    torch.testing.assert_close(logp.double(), logp64, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ent64, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad.double(), x.grad, atol=1e-5, rtol=0)


@pytest.mark.only_backends("cpp", reason="torch's thread count drives the C++ kernels' parallel loop only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_count_independence(backend, dtype, threads):
    logits, ids = make((8, 5, 2500), backend.device, dtype)
    results = []
    for n in (1, 2):
        threads(n)
        results.append(run(fast_op(backend), logits, ids, temperature=0.9))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.only_backends("triton", reason="Triton compiles one kernel variant per specialisation key")
def test_batch_shape_and_temperature_do_not_change_the_specialisation(backend, monkeypatch):
    """Triton compiles one variant per (constexpr values, ==1 / %16 of specialised ints): across batch
    shapes and temperatures that key must not change, so the kernel compiles once per vocab size."""
    launchers = backend.launchers("logprobs")
    fwd = KernelRecorder(launchers._token_logprobs_fwd_kernel)
    bwd = KernelRecorder(launchers._token_logprobs_bwd_kernel)
    monkeypatch.setattr(launchers, "_token_logprobs_fwd_kernel", fwd)
    monkeypatch.setattr(launchers, "_token_logprobs_bwd_kernel", bwd)
    for b, t, temperature in [(1, 1, 1.0), (2, 3, 0.7), (3, 16, 1.0), (1, 17, 1.2), (4, 2, 0.5)]:
        x = model_logits(b, t, V, torch.float32, backend.device).requires_grad_()
        ids = torch.randint(0, V, (b, t), device=backend.device)
        fast_op(backend)(x, ids, temperature=temperature, return_entropy=False).sum().backward()
    assert len(fwd.launches) == len(bwd.launches) == 5
    assert len(fwd.specialization_keys()) == 1
    assert len(bwd.specialization_keys()) == 1


@pytest.mark.only_backends("triton", reason="the Triton launches run eagerly inside torch.compile (eager_launch)")
def test_inside_torch_compile(backend):
    """Inside a compiled function the launches run eagerly (``eager_launch``: Dynamo does not trace them) while
    Dynamo still captures the caller's own arithmetic, and the gradient is the reference's. The "eager" compile
    backend keeps this fast on CPU; Dynamo's capture is what is under test."""
    logits = torch.randn(B, T, V, device=backend.device)
    ids = torch.randint(0, V, (B, T), device=backend.device)

    fast = fast_op(backend)

    def loss_fn(x, temperature, op=fast):
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.only_backends("triton", reason="the GPU backend at GPU sizes")
class TestRealisticShapes:
    """On a GPU: a Qwen-sized vocab, long sequences, more rows than a 65,535 grid dimension, one compile."""

    def test_qwen_vocab_bf16(self, backend):
        b, t, v = 4, 512, 151_936
        logits = model_logits(b, t, v, torch.bfloat16, "cuda", scale=4.0)
        ids = torch.randint(0, v, (b, t), device="cuda")
        g = torch.randn(b, t, device="cuda")
        x = logits.detach().requires_grad_()
        logp, ent = fast_op(backend)(x, ids, temperature=0.7, return_entropy=True)
        (logp * g).sum().backward()
        ref_logp, ref_ent, ref_grad = reference_with_grads(logits, ids, 0.7, g, None, torch.bfloat16)
        assert_close(logp, ref_logp, atol=1e-4, rtol=1e-5, name="logp")
        assert_close(ent, ref_ent, atol=1e-4, rtol=1e-5, name="entropy")
        _, _, exact = reference_with_grads(logits.float(), ids, 0.7, g, None, torch.float32)
        assert_close_3way(x.grad, exact, ref_grad, atol=1e-6, name="grad")

    def test_more_rows_than_a_grid_dimension(self, backend):
        n, v = 70_000, 1000
        logits = torch.randn(1, n, v, device="cuda", dtype=torch.bfloat16)
        ids = torch.randint(0, v, (1, n), device="cuda")
        assert_close(fast_op(backend)(logits, ids, return_entropy=False), token_logprobs_ref(logits, ids),
                     atol=1e-4, rtol=1e-5)

    def test_one_compile_across_shapes(self, backend):
        launchers = backend.launchers("logprobs")
        v = 32_000
        for b, t, temperature in [(2, 100, 1.0), (2, 128, 0.7), (3, 77, 1.0), (1, 1, 1.3), (8, 513, 0.9)]:
            x = model_logits(b, t, v, torch.bfloat16, "cuda").requires_grad_()
            ids = torch.randint(0, v, (b, t), device="cuda")
            fast_op(backend)(x, ids, temperature=temperature, return_entropy=False).sum().backward()
            if b == 2 and t == 100:
                before = (compiled_variants(launchers._token_logprobs_fwd_kernel),
                          compiled_variants(launchers._token_logprobs_bwd_kernel))
        after = (compiled_variants(launchers._token_logprobs_fwd_kernel),
                 compiled_variants(launchers._token_logprobs_bwd_kernel))
        assert after[0] <= before[0] + 1 and after[1] <= before[1] + 1
