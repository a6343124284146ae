"""Per-token log-probs (and entropies) of chosen tokens from logits.

``logp[n] = z[n, y_n] - logsumexp(z[n, :])`` and ``H[n] = logsumexp(z[n]) - sum_v softmax(z[n])_v z[n, v]``
with ``z = logits / temperature`` (TRL divides the logits by the sampling temperature before
both, section 2.3). Results are float32 whatever the logits dtype: unlike TRL's
``selective_log_softmax``, bf16 logits do not give bf16 log-probs (TRL's ``cast_lm_head_to_fp32``
behaviour, without the fp32 logits copy in the fast paths).
"""
from __future__ import annotations

import torch

from . import backends
from ._checks import FLOAT_DTYPES, require_float, require_same_device, require_tensor


def token_logprobs_ref(logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0,
                       return_entropy: bool = False):
    """Float32 torch reference: ``log_softmax(logits.float() / temperature).gather(-1, token_ids)``."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1) - lse
    if not return_entropy:
        return logp
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, entropy


def check_logits_and_ids(logits, token_ids, temperature) -> None:
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


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, backend: str = "auto"):
    """Log-probs of ``token_ids`` under ``softmax(logits / temperature)``, differentiable w.r.t. logits.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]``, float32, bfloat16 or float16.
        token_ids: ``[B, T]`` or ``[N]`` int64/int32 ids in ``[0, V)``.
        temperature: > 0; the logits are divided by it (TRL's generation temperature).
        return_entropy: also return the entropy of each token's distribution.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        float32 log-probs shaped like ``token_ids``; with ``return_entropy`` a tuple
        ``(logp, entropy)`` of that shape. Equivalent to :func:`token_logprobs_ref`.
    """
    check_logits_and_ids(logits, token_ids, temperature)
    impl = backends.select("token_logprobs", backend, logits.device)
    kwargs = dict(temperature=temperature, return_entropy=return_entropy)
    if impl == "triton":
        from .kernels.logprobs import token_logprobs_triton

        return token_logprobs_triton(logits, token_ids, **kwargs)
    if impl == "cpp":
        from .cpu.logprobs import token_logprobs_cpp

        return token_logprobs_cpp(logits, token_ids, **kwargs)
    return token_logprobs_ref(logits, token_ids, **kwargs)
