"""Per-token log-probs (and entropies) of chosen tokens from logits.

``logp[n] = z[n, y_n] - logsumexp(z[n, :])`` and ``H[n] = logsumexp(z[n]) - sum_v softmax(z[n])_v z[n, v]``
with ``z = logits / temperature`` (TRL divides the logits by the sampling temperature before
both, docs/semantics.md section 2). Results are float32 whatever the logits dtype: unlike TRL's
``selective_log_softmax``, bf16 logits do not give bf16 log-probs (TRL's ``cast_lm_head_to_fp32``
behaviour, without the fp32 logits copy in the fast paths).

Layers: :func:`token_logprobs_ref` (the oracle), then the launchers of a fast backend (Triton in
``kernels/logprobs.py``, C++ in ``gfpo_fast/cpu/logprobs.py``, same signatures), then the one autograd
layer over them (:class:`TokenLogprobsFunction`), used by :func:`token_logprobs`, the fused policy loss and
the fused-linear chunk loop.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import backends
from ._checks import FLOAT_DTYPES, require_float, require_same_device, require_tensor, require_token_ids_in_range


def token_logprobs_ref(logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0,
                       return_entropy: bool = False):
    """Float32 torch reference: ``log_softmax(logits.float() / temperature).gather(-1, token_ids)``, shaped like
    ``token_ids`` (and the entropy), with the non-finite rule of docs/semantics.md section 2.4.

    ``-inf`` logits are probability 0 (``0 log 0 = 0`` in the entropy). A *bad row*, whose ``z`` holds a NaN or a
    ``+inf`` or is all ``-inf``, gets NaN log-prob and entropy and an exactly zero gradient: it is computed on a
    copy with the bad rows zeroed and NaN is selected back, so autograd never multiplies through a NaN there.
    """
    z = logits.float() / temperature
    bad = ~torch.isfinite(z.amax(-1))  # amax propagates NaN; +inf, and -inf when the whole row is -inf
    z = torch.where(bad.unsqueeze(-1), 0.0, z)
    lse = torch.logsumexp(z, dim=-1)
    logp = torch.where(bad, torch.nan, z.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1) - lse)
    if not return_entropy:
        return logp
    z_finite = torch.where(z == -torch.inf, 0.0, z)  # p = 0 there: the term is 0, not 0 * -inf = NaN
    entropy = lse - (torch.softmax(z, dim=-1) * z_finite).sum(-1)
    return logp, torch.where(bad, torch.nan, entropy)


def check_logits_and_ids(logits, token_ids, temperature, vocab_of: str = "logits") -> None:
    """Dtype, shape and device checks of a log-prob call, and the one bad-id rule of every backend: an id
    outside ``[0, V)`` is a ``ValueError`` (one host read, see :func:`require_token_ids_in_range`)."""
    require_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    require_tensor("token_ids", token_ids, ndim=(1, 2))
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_ids must be int64 or int32, got {token_ids.dtype}")
    if tuple(token_ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"token_ids must have shape {tuple(logits.shape[:-1])} (logits {tuple(logits.shape)} without the vocab "
            f"dimension), got {tuple(token_ids.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocab dimension")
    require_float("temperature", temperature, minimum=0.0, exclusive=True)
    require_same_device("logits", logits, token_ids=token_ids)
    require_token_ids_in_range(token_ids, logits.shape[-1], vocab_of)


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd over a backend's launchers: ``(logits, token_ids, launchers, temperature, return_entropy,
    inplace) -> logp`` or ``(logp, entropy)``, float32 shaped like ``token_ids``.

    Saves the logits, the ids and the float32 per-token ``lse`` (and entropy), nothing ``[N, V]``; backward
    recomputes the softmax from ``lse`` in one launch. The entropy carries a gradient, as in the reference
    (TRL's entropy bonus needs it); an unused output costs nothing in backward.
    """

    @staticmethod
    def forward(ctx, logits, token_ids, fast, temperature, return_entropy, inplace):
        logp, lse, entropy = fast.token_logprobs_forward(logits, token_ids, temperature, return_entropy)
        ctx.save_for_backward(logits, token_ids, lse, entropy)
        ctx.fast, ctx.temperature, ctx.inplace = fast, temperature, inplace
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None and costs nothing
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, dlogp, dentropy=None):
        logits, token_ids, lse, entropy = ctx.saved_tensors
        if dlogp is None and dentropy is None:
            return (None,) * 6
        grad = ctx.fast.token_logprobs_backward(logits, token_ids, lse, dlogp, ctx.temperature, entropy=entropy,
                                                dentropy=dentropy, inplace=ctx.inplace)
        return grad, None, None, None, None, None


def apply_token_logprobs(fast, logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0,
                         return_entropy: bool = False, inplace: bool = False):
    """:func:`token_logprobs` on the log-prob launchers ``fast`` (``backends.launchers(name, "logprobs")``: every
    backend's module defines ``token_logprobs_forward(logits, token_ids, temperature, return_entropy, active=None)
    -> (logp, lse, entropy or None)`` and ``token_logprobs_backward(logits, token_ids, lse, dlogp, temperature, *,
    entropy=None, dentropy=None, inplace=False) -> dlogits``), inputs already validated.

    ``inplace``: backward writes the gradient over ``logits`` (or over the copy a backend made of them)
    instead of allocating one; only when nothing needs the logits after backward (e.g. an lm_head output).
    """
    return TokenLogprobsFunction.apply(logits, token_ids, fast, float(temperature), bool(return_entropy),
                                       bool(inplace))


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, backend: str = "auto"):
    """Log-probs of ``token_ids`` under ``softmax(logits / temperature)``, differentiable w.r.t. logits.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]``, float32, bfloat16 or float16, any row strides.
        token_ids: ``[B, T]`` or ``[N]`` int64/int32 ids in ``[0, V)``; any other id is a ``ValueError``
            on every backend (checked before any launch: one host read).
        temperature: > 0; the logits are divided by it (TRL's generation temperature).
        return_entropy: also return the entropy of each token's distribution (differentiable).
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        float32 log-probs shaped like ``token_ids``; with ``return_entropy`` a tuple
        ``(logp, entropy)`` of that shape. Equivalent to :func:`token_logprobs_ref`.
    """
    check_logits_and_ids(logits, token_ids, temperature)
    impl = backends.select("token_logprobs", backend, logits.device)
    if impl == "torch":
        return token_logprobs_ref(logits, token_ids, temperature=temperature, return_entropy=return_entropy)
    return apply_token_logprobs(backends.launchers(impl, "logprobs"), logits, token_ids, temperature=temperature,
                                return_entropy=return_entropy)
