"""NaN and inf in the logits follow one rule on every backend (docs/semantics.md section 2.4).

``-inf`` is probability 0 (finite results elsewhere, no NaN from it); a *bad row* (a NaN or ``+inf`` in
``z = logits / temperature``, or ``z`` all ``-inf``) has NaN log-prob and entropy and an exactly zero logits
gradient, whatever the upstream gradient. Good rows are checked against the math written out row by row
(softmax over the finite entries), not against the reference under test. Triton runs on CUDA where there is a
GPU, else under the interpreter (``tests/conftest.py``); the shapes are tiny.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import gfpo_fast as gf
from gfpo_fast import backends

pytestmark = pytest.mark.filterwarnings(  # the interpreter's numpy warns on the NaN / inf made on purpose
    "ignore:(invalid value|overflow|divide by zero) encountered")

INF, NAN = math.inf, math.nan
BACKENDS = ["torch", *backends.FAST_BACKENDS]  # the reference and every fast backend of the table


def _require(backend: str) -> torch.device:
    """The device ``backend`` runs these tests on here: its own (CUDA for Triton) where there is one, else the
    CPU (Triton's interpreter). Skips with the reason where it cannot run; fails instead under ``CI=true``
    (tests/conftest.py)."""
    if backend == "torch":
        return torch.device("cpu")
    entry = backends.FAST_BACKENDS[backend]
    device = torch.device(next((k for k in entry.devices if k == "cpu" or getattr(torch, k).is_available()), "cpu"))
    ok, why = backends._usable(backend, "fused_policy_loss", device)
    if ok:
        return device
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"CI must run these tests, but {why}", pytrace=False)
    pytest.skip(why)


def _row_math(z: torch.Tensor, y: int, g: float, h: float):
    """``(logp, entropy, dL/dz)`` of one good row ``z`` ``[V]`` in float64, the softmax taken over its finite
    entries (``-inf`` ones have p = 0), for upstream gradients ``g`` (log-prob) and ``h`` (entropy)."""
    z = z.double()
    finite = z > -INF
    p = torch.zeros_like(z)
    p[finite] = torch.softmax(z[finite], 0)
    log_p = torch.full_like(z, -INF)
    log_p[finite] = torch.log_softmax(z[finite], 0)
    entropy = -(p[finite] * log_p[finite]).sum()
    onehot = torch.zeros_like(z)
    onehot[y] = 1.0
    grad = g * (onehot - p) - h * torch.where(finite, p * (log_p + entropy), 0.0)
    return log_p[y], entropy, grad


def _logits_case():
    """Logits ``[8, 7]``, ids and the bad rows, with ``temperature = 0.5``: rows 0-3 and 7 are good (a banned
    non-target, a banned target, clean, a large finite logit), rows 4-6 bad (NaN, +inf, all -inf) and row 7
    bad only after the temperature (3e38 / 0.5 overflows to +inf)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 7, generator=gen) * 2
    ids = torch.tensor([1, 2, 3, 0, 4, 5, 6, 2])
    logits[0, 4] = -INF  # a banned token that is not the target
    logits[1, 2] = logits[1, 5] = -INF  # the target itself banned: logp = -inf
    logits[3, 0] = 80.0  # large but finite: no overflow in the kernels' running max
    logits[4, 0] = NAN
    logits[5, 6] = INF  # +inf at the target
    logits[6] = -INF
    logits[7, 3] = 3e38
    return logits, ids, [0, 1, 2, 3], [4, 5, 6, 7]


def _token_logprobs(backend, device, logits, ids, g, h, temperature):
    """``(logp, entropy, dlogits)`` on the CPU, computed on ``device``."""
    x = logits.to(device, copy=True).requires_grad_()
    logp, entropy = gf.token_logprobs(x, ids.to(device), temperature=temperature, return_entropy=True,
                                      backend=backend)
    torch.autograd.backward((logp, entropy), (g.to(device), h.to(device)))
    return logp.detach().cpu(), entropy.detach().cpu(), x.grad.cpu()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_follow_the_rule(backend):
    device = _require(backend)
    logits, ids, good, bad = _logits_case()
    temperature = 0.5
    # upstream gradients: NaN and large ones at bad rows too, which must not matter
    g = torch.tensor([1.0, 0.5, -2.0, 1.5, NAN, 3.0, -1.0, 2.0])
    h = torch.tensor([0.3, -0.7, 0.2, 0.4, 1.0, NAN, 2.0, 0.5])
    logp, entropy, grad = _token_logprobs(backend, device, logits, ids, g, h, temperature)

    assert torch.isnan(logp[bad]).all() and torch.isnan(entropy[bad]).all(), (logp, entropy)
    assert torch.equal(grad[bad], torch.zeros_like(grad[bad])), grad[bad]  # exactly 0, not NaN
    assert logp[1].item() == -INF
    z = logits / temperature
    for n in good:
        want_logp, want_entropy, want_dz = _row_math(z[n], int(ids[n]), g[n].item(), h[n].item())
        torch.testing.assert_close(logp[n].double(), want_logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy[n].double(), want_entropy, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad[n].double(), want_dz / temperature, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_after_a_run_of_banned_tokens_is_not_lost(backend, monkeypatch):
    """Rows longer than a kernel's vocab chunk (C++: 2048 floats; Triton: tiles of 128 here): a NaN in a tile
    that is otherwise -inf, after -inf tiles, still makes the row bad; a row that is -inf but for its last
    logit is good (p = 1 there)."""
    device = _require(backend)
    if backend == "triton":
        from gfpo_fast.kernels import _launch
        monkeypatch.setattr(_launch, "MAX_BLOCK_V_INTERPRETER", 128)
    V = 2 * 2048 + 5
    logits = torch.full((4, V), -INF)
    logits[0, 2100] = NAN  # second chunk (and its Triton tile): -inf and the NaN only
    logits[0, 2 * 2048:] = 1.0  # finite logits in the last chunk
    logits[1, -1] = 2.0  # one finite logit, in the last chunk
    logits[2, :] = 0.0
    logits[2, -1] = INF
    logits[3, 0] = NAN  # first element, then finite ones
    logits[3, 1:] = 0.5
    ids = torch.tensor([V - 2, V - 1, 7, 9])
    ones = torch.ones(4)
    logp, entropy, grad = _token_logprobs(backend, device, logits, ids, ones, ones, 1.0)
    bad = [0, 2, 3]
    assert torch.isnan(logp[bad]).all() and torch.isnan(entropy[bad]).all(), (logp, entropy)
    assert torch.equal(grad[bad], torch.zeros_like(grad[bad]))
    assert logp[1].item() == 0.0 and entropy[1].item() == 0.0
    assert torch.equal(grad[1], torch.zeros(V))  # p = 1 on the target, 0 elsewhere: nothing to move


def _loss_inputs():
    gen = torch.Generator().manual_seed(1)
    B, T, V = 2, 4, 6
    logits = torch.randn(B, T, V, generator=gen)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    old_logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) + 0.1 * torch.randn(
        B, T, generator=gen)
    old_logp[mask == 0] = INF  # padding's old log-probs are arbitrary
    return logits, ids, old_logp, torch.tensor([1.0, -0.5]), mask


def _fused_loss(backend, device, logits, ids, old_logp, advantages, mask):
    """``(loss, entropy metric, dlogits)`` on the CPU, computed on ``device``."""
    x = logits.to(device, copy=True).requires_grad_()
    loss, metrics = gf.fused_policy_loss(x, *(t.to(device) for t in (ids, old_logp, advantages, mask)),
                                         backend=backend, return_entropy=True, temperature=0.7)
    loss.backward()
    return loss.detach().cpu(), metrics["entropy"].cpu(), x.grad.cpu()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_policy_loss_ignores_bad_rows_at_masked_positions(backend):
    device = _require(backend)
    logits, ids, old_logp, advantages, mask = _loss_inputs()
    clean = _fused_loss(backend, device, logits, ids, old_logp, advantages, mask)
    logits[0, 3, 2] = NAN  # masked positions
    logits[1, 2, 0] = INF
    logits[1, 3] = -INF
    loss, entropy, grad = _fused_loss(backend, device, logits, ids, old_logp, advantages, mask)
    assert torch.isfinite(loss) and torch.isfinite(entropy) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, clean[0], atol=0, rtol=0)
    torch.testing.assert_close(entropy, clean[1], atol=0, rtol=0)
    torch.testing.assert_close(grad, clean[2], atol=0, rtol=0)
    assert not grad[mask == 0].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_policy_loss_is_nan_with_a_bad_row_at_a_kept_position(backend):
    device = _require(backend)
    logits, ids, old_logp, advantages, mask = _loss_inputs()
    logits[0, 1, 3] = NAN
    logits[1, 0, 5] = INF
    loss, entropy, grad = _fused_loss(backend, device, logits, ids, old_logp, advantages, mask)
    assert torch.isnan(loss) and torch.isnan(entropy)
    assert torch.equal(grad[0, 1], torch.zeros(6)) and torch.equal(grad[1, 0], torch.zeros(6))
    assert not grad[mask == 0].any()
    if backend != "torch":  # every other entry as the reference's, NaN where it is NaN
        reference = _fused_loss("torch", torch.device("cpu"), logits, ids, old_logp, advantages, mask)[2]
        torch.testing.assert_close(grad, reference, atol=1e-6, rtol=1e-5, equal_nan=True)


def _linear(backend, device, hidden, weight, ids):
    """``(logp, entropy, dhidden, dweight)`` on the CPU, computed on ``device``."""
    h, w = hidden.to(device, copy=True).requires_grad_(), weight.to(device, copy=True).requires_grad_()
    logp, entropy = gf.fused_linear_logprobs(h, w, ids.to(device), return_entropy=True, chunk_size=2,
                                             backend=backend)
    torch.autograd.backward((logp, entropy), (torch.ones_like(logp), torch.ones_like(entropy)))
    return logp.detach().cpu(), entropy.detach().cpu(), h.grad.cpu(), w.grad.cpu()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_hidden_state_is_a_bad_row(backend):
    """From hidden states: the NaN row's log-prob and entropy are NaN and its hidden gradient 0; the other rows
    are those of the same call without it; the weight gradient multiplies the NaN row by 0 (a GEMM), so it is
    NaN on every backend, the reference included (docs/semantics.md 2.4)."""
    device = _require(backend)
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(5, 3, generator=gen), torch.randn(6, 3, generator=gen)
    ids = torch.tensor([0, 1, 2, 3, 4])
    hidden[2, 1] = NAN
    keep = [0, 1, 3, 4]
    clean = _linear(backend, device, hidden[keep], weight, ids[keep])
    logp, entropy, dh, dw = _linear(backend, device, hidden, weight, ids)
    assert torch.isnan(logp[2]) and torch.isnan(entropy[2])
    assert torch.equal(dh[2], torch.zeros(3))
    torch.testing.assert_close(logp[keep], clean[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(entropy[keep], clean[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dh[keep], clean[2], atol=1e-6, rtol=1e-6)
    assert torch.isnan(dw).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_policy_loss_with_a_nan_hidden_state(backend):
    """A NaN hidden row at a masked position of a computed chunk: loss and hidden gradient as with a finite row
    there (that row's gradient 0), the weight gradient NaN (2.4); at a kept position: a NaN loss."""
    device = _require(backend)
    gen = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 3, 4, 6
    hidden, weight = torch.randn(B, T, H, generator=gen), torch.randn(V, H, generator=gen)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    inputs = dict(old_logp=None, advantages=torch.tensor([1.0, -1.0], device=device), mask=mask.to(device))

    def run(h):
        leaves = h.to(device, copy=True).requires_grad_(), weight.to(device, copy=True).requires_grad_()
        loss, _ = gf.fused_linear_policy_loss(*leaves, ids.to(device), **inputs, chunk_size=4, backend=backend)
        loss.backward()
        return loss.detach().cpu(), leaves[0].grad.cpu(), leaves[1].grad.cpu()

    clean = run(hidden)
    hidden[0, 2, 1] = NAN  # masked, in the chunk of rows 0-3 with kept tokens
    loss, dh, dw = run(hidden)
    torch.testing.assert_close(loss, clean[0], atol=0, rtol=0)
    torch.testing.assert_close(dh, clean[1], atol=0, rtol=0)
    assert torch.equal(dh[0, 2], torch.zeros(H)) and torch.isnan(dw).any()
    hidden[0, 2, 1] = 0.0
    hidden[1, 0, 3] = NAN  # kept
    loss, dh, _ = run(hidden)
    assert torch.isnan(loss) and torch.equal(dh[1, 0], torch.zeros(H))
