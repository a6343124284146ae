"""C++ token_logprobs (csrc/logprobs.cpp) against the torch reference: forward and backward, fp32 / bf16 /
fp16, ragged vocab sizes across the 2048-wide chunks, temperature, entropy with gradient, strided views,
-inf and NaN logits, in-place backward and thread-count independence."""
import functools

import pytest
import torch

import gfpo_fast as gf
from gfpo_fast.cpu import logprobs as cpp_launchers
from gfpo_fast.cpu.logprobs import kernel_logits
from gfpo_fast.logprobs import apply_token_logprobs, token_logprobs_ref

# The C++ launchers under the one autograd layer, with the inplace option the public op does not expose.
token_logprobs_cpp = functools.partial(apply_token_logprobs, cpp_launchers)

# The reference's own float32 error grows with V (its entropy sums p z terms of both signs), so
# tolerances are absolute at the scale of the values; test_more_accurate_than_float32_reference pins
# the C++ error against float64.
FP32_TOL = dict(atol=5e-5, rtol=1e-5)


def make(shape, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * scale).to(dtype)
    ids = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return logits, ids


def run(fn, logits, ids, seed=1, **kwargs):
    """Forward with entropy, backward of sum(g1 logp + g2 entropy); returns (logp, entropy, dlogits)."""
    x = logits.clone().requires_grad_()
    logp, ent = fn(x, ids, return_entropy=True, **kwargs)
    g = torch.Generator().manual_seed(seed)
    g1, g2 = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)
    (logp * g1 + ent * g2).sum().backward()
    return logp.detach(), ent.detach(), x.grad


def assert_grads_close(grad, expected):
    assert grad.dtype == expected.dtype and grad.shape == expected.shape
    if grad.dtype == torch.float32:
        torch.testing.assert_close(grad, expected, **FP32_TOL)
    else:  # both rounded once from float32: at most one unit in the last place apart
        torch.testing.assert_close(grad.float(), expected.float(), atol=1e-5, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 37), (5, 1), (3, 5003), (2, 2, 2049), (1, 4096)],
                         ids=["BTV-37", "V1", "V5003", "V2049", "V4096"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference_forward_and_backward(dtype, shape, temperature):
    logits, ids = make(shape, dtype)
    logp, ent, grad = run(token_logprobs_cpp, logits, ids, temperature=temperature)
    logp_r, ent_r, grad_r = run(token_logprobs_ref, logits, ids, temperature=temperature)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ids.shape
    torch.testing.assert_close(logp, logp_r, **FP32_TOL)
    torch.testing.assert_close(ent, ent_r, **FP32_TOL)
    assert_grads_close(grad, grad_r)


def test_dispatch_and_logp_only():
    logits, ids = make((4, 3, 300))
    with gf.force_backend("cpp"):
        x = logits.clone().requires_grad_()
        out = gf.token_logprobs(x, ids)
    out.sum().backward()
    x_r = logits.clone().requires_grad_()
    token_logprobs_ref(x_r, ids).sum().backward()
    torch.testing.assert_close(out, token_logprobs_ref(logits, ids), **FP32_TOL)
    torch.testing.assert_close(x.grad, x_r.grad, **FP32_TOL)


def test_more_accurate_than_float32_reference():
    """At V = 49152 the C++ pass stays within ~1e-5 of a float64 computation in every output."""
    logits, ids = make((4, 49152), scale=3.0)
    logp, ent, grad = run(token_logprobs_cpp, logits, ids, temperature=0.7)
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


def test_entropy_only_and_unused_outputs():
    logits, ids = make((3, 4, 100))
    x = logits.clone().requires_grad_()
    _, ent = token_logprobs_cpp(x, ids, return_entropy=True)
    ent.sum().backward()
    x_r = logits.clone().requires_grad_()
    token_logprobs_ref(x_r, ids, return_entropy=True)[1].sum().backward()
    torch.testing.assert_close(x.grad, x_r.grad, **FP32_TOL)


def test_strided_views_float16_and_int32_ids():
    logits, ids = make((3, 6, 301))
    sliced = logits[:, :-1]  # TRL drops the last position: rows are strided, the vocab is not
    assert kernel_logits(sliced) is sliced  # read in place, no copy
    for x0, i in [(sliced, ids[:, :-1]), (logits.transpose(0, 1), ids.transpose(0, 1)),
                  (logits.reshape(-1, 301).t().contiguous().t(), ids.reshape(-1).int()),  # strided vocab: copied
                  (logits.half(), ids)]:
        logp, ent, grad = run(token_logprobs_cpp, x0, i)
        logp_r, ent_r, grad_r = run(token_logprobs_ref, x0, i)
        torch.testing.assert_close(logp, logp_r, **FP32_TOL)
        torch.testing.assert_close(ent, ent_r, **FP32_TOL)
        assert grad.dtype == x0.dtype and grad.shape == x0.shape
        torch.testing.assert_close(grad.float(), grad_r.float(), atol=1e-3 if x0.dtype == torch.half else 5e-5,
                                   rtol=1e-3)


def test_large_logits_and_masked_vocab():
    """Online logsumexp: a new maximum in every chunk, huge magnitudes, and -inf columns (banned tokens)."""
    V = 5000
    rising = torch.linspace(-400.0, 400.0, V)[None].repeat(2, 1)
    ids = torch.tensor([V - 1, V - 3])
    torch.testing.assert_close(token_logprobs_cpp(rising, ids), token_logprobs_ref(rising, ids), **FP32_TOL)

    logits, ids = make((3, V))
    logits[:, :2500] = -torch.inf  # the whole first chunk and part of the second
    logits[1, 3000:3100] = -torch.inf
    ids = torch.tensor([2600, 4000, 4999])
    x = logits.clone().requires_grad_()
    logp, ent = token_logprobs_cpp(x, ids, return_entropy=True)
    (logp + ent).sum().backward()
    # The expected values: each row's distribution over its finite columns only. (The reference itself
    # gives a NaN entropy here, from 0 * -inf in sum p z.)
    finite = torch.isfinite(logits)
    for row in range(3):
        z = logits[row][finite[row]].clone().requires_grad_()
        target = finite[row][: ids[row]].sum()  # the target's index among the finite columns
        lp_r, ent_r = token_logprobs_ref(z[None], target[None], return_entropy=True)
        (lp_r + ent_r).sum().backward()
        torch.testing.assert_close(logp[row], lp_r[0], **FP32_TOL)
        torch.testing.assert_close(ent[row], ent_r[0], **FP32_TOL)
        torch.testing.assert_close(x.grad[row][finite[row]], z.grad, **FP32_TOL)
        assert torch.all(x.grad[row][~finite[row]] == 0)


@pytest.mark.parametrize("column", [0, 5, 2047, 2500])
def test_nan_logit_poisons_only_its_row(column):
    logits, ids = make((3, 3000))
    logits[1, column] = torch.nan
    x = logits.clone().requires_grad_()
    logp, ent = token_logprobs_cpp(x, ids, return_entropy=True)
    assert torch.isnan(logp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(ent[[0, 2]]).all()
    (logp + ent).sum().backward()
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2]]).all()


def test_zero_gradient_rows_are_zero_and_empty_input():
    logits, ids = make((6, 700))
    x = logits.clone().requires_grad_()
    weights = torch.tensor([1.0, 0.0, -2.0, 0.0, 0.0, 0.5])
    (token_logprobs_cpp(x, ids) * weights).sum().backward()
    x_r = logits.clone().requires_grad_()
    (token_logprobs_ref(x_r, ids) * weights).sum().backward()
    assert torch.all(x.grad[weights == 0] == 0)
    torch.testing.assert_close(x.grad, x_r.grad, **FP32_TOL)

    empty = torch.zeros(0, 4, 50, requires_grad=True)
    out = token_logprobs_cpp(empty, torch.zeros(0, 4, dtype=torch.long))
    out.sum().backward()
    assert out.shape == (0, 4) and empty.grad.shape == empty.shape


def test_inplace_backward_overwrites_logits_with_the_gradient():
    logits, ids = make((2, 5, 333), torch.bfloat16)
    _, _, expected = run(token_logprobs_cpp, logits, ids, temperature=0.8)
    buffer = logits.clone()
    x = buffer[:, :4].requires_grad_()  # strided rows, written in place where they are
    logp, ent = token_logprobs_cpp(x, ids[:, :4], temperature=0.8, return_entropy=True, inplace=True)
    g = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)
    (logp * g1[:, :4] + ent * g2[:, :4]).sum().backward()
    torch.testing.assert_close(buffer[:, :4], expected[:, :4], atol=0, rtol=0)  # written where the rows are
    torch.testing.assert_close(x.grad, expected[:, :4], atol=0, rtol=0)
    torch.testing.assert_close(buffer[:, 4], logits[:, 4], atol=0, rtol=0)  # rows outside the view untouched


def test_out_of_range_ids_are_rejected():
    logits, ids = make((2, 10))
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 10\)"):
        gf.token_logprobs(logits, ids + 10, backend="cpp")


def test_launchers_never_dereference_an_out_of_range_id():
    """Below the public check, an id outside [0, V) gives a NaN log-prob and a NaN gradient row, nothing read."""
    logits, ids = make((4, 10))
    ids[1], ids[2] = -100, 10
    logp, lse, _ = cpp_launchers.token_logprobs_forward(logits, ids, 1.0, False)
    assert torch.isnan(logp[1:3]).all() and torch.isfinite(logp[[0, 3]]).all() and torch.isfinite(lse).all()
    grad = cpp_launchers.token_logprobs_backward(logits, ids, lse, torch.ones(4), 1.0)
    assert torch.isnan(grad[1:3]).all() and torch.isfinite(grad[[0, 3]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_count_independence(dtype, threads):
    logits, ids = make((8, 5, 2500), dtype)
    results = []
    for n in (1, 2):
        threads(n)
        results.append(run(token_logprobs_cpp, logits, ids, temperature=0.9))
    for a, b in zip(*results):
        assert torch.equal(a, b)
