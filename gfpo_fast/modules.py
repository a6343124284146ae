"""``torch.nn.Module`` wrappers of the policy loss, for users of their own training loop.

* :class:`GRPOLoss` -- from logits ``[B, T, V]``: :func:`gfpo_fast.fused_policy_loss`.
* :class:`FusedLinearGRPOLoss` -- from the last hidden states ``[B, T, H]`` and the lm_head weight ``[V, H]``,
  never holding more than one chunk of logits: each chunk of ``chunk_size`` tokens is projected, reduced
  to per-token log-probs by :func:`gfpo_fast.token_logprobs` and dropped; the backward recomputes it
  (activation checkpointing). One :func:`gfpo_fast.policy_loss` then runs on the ``[B, T]`` log-probs, so
  every algorithm, including the sequence-level ones (GSPO, GSPO-token, GMPO, VESPO), is exact.

Both take the loss keywords of :func:`gfpo_fast.policy_loss` at construction (``algorithm``, ``loss_type``,
``epsilon``, ``beta``, ...) plus ``temperature``; ``forward`` takes the tensors and returns ``(loss, metrics)``.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ._checks import require_positive_int, require_tensor
from .fused_loss import LOSS_CONFIG_KEYS, fused_policy_loss
from .logprobs import token_logprobs
from .policy_loss import make_loss_config, policy_loss


class _PolicyLossModule(torch.nn.Module):
    """Validates and stores the loss keywords once; subclasses supply ``forward``."""

    def __init__(self, *, temperature: float = 1.0, return_entropy: bool = False, backend: str = "auto", **loss_kwargs):
        super().__init__()
        unknown = set(loss_kwargs) - set(LOSS_CONFIG_KEYS)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(unknown)}")
        make_loss_config(**loss_kwargs)
        self.loss_kwargs = loss_kwargs
        self.temperature = temperature
        self.return_entropy = return_entropy
        self.backend = backend

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {**self.loss_kwargs, "temperature": self.temperature}.items())


class GRPOLoss(_PolicyLossModule):
    """GRPO-family loss from logits, e.g. ``GRPOLoss(loss_type="dapo", epsilon_high=0.28)``.

    ``forward(logits [B, T, V], token_ids [B, T], old_logp [B, T] | None, advantages [B] | [B, T], mask [B, T],
    *, ref_logp=None, importance_sampling_ratio=None, num_items_in_batch=None)`` returns ``(loss, metrics)``
    exactly as :func:`gfpo_fast.fused_policy_loss` with the keywords given at construction.
    """

    def forward(self, logits, token_ids, old_logp, advantages, mask, *, ref_logp=None, importance_sampling_ratio=None,
                num_items_in_batch=None):
        return fused_policy_loss(
            logits, token_ids, old_logp, advantages, mask, temperature=self.temperature, ref_logp=ref_logp,
            importance_sampling_ratio=importance_sampling_ratio, num_items_in_batch=num_items_in_batch,
            return_entropy=self.return_entropy, backend=self.backend, **self.loss_kwargs,
        )


class FusedLinearGRPOLoss(_PolicyLossModule):
    """GRPO-family loss from hidden states and the lm_head weight, without the full ``[B, T, V]`` logits.

    ``FusedLinearGRPOLoss(chunk_size=1024, **policy_loss_keywords)``; ``forward(hidden [B, T, H], weight [V, H],
    token_ids [B, T], old_logp, advantages, mask, *, bias=None, ref_logp=None, importance_sampling_ratio=None,
    num_items_in_batch=None)`` returns ``(loss, metrics)`` equal to :func:`gfpo_fast.policy_loss` on
    ``token_logprobs(hidden @ weight.T + bias, token_ids)``, with gradients to ``hidden``, ``weight`` and ``bias``.
    Peak extra memory is one ``[chunk_size, V]`` float32 block; the backward recomputes each chunk's logits.
    """

    def __init__(self, *, chunk_size: int = 1024, **kwargs):
        super().__init__(**kwargs)
        require_positive_int("chunk_size", chunk_size)
        self.chunk_size = chunk_size

    def _chunks(self, hidden, token_ids):
        """(hidden [n, H], ids [n]) pieces of the flattened tokens, ``chunk_size`` at a time."""
        h, ids = hidden.reshape(-1, hidden.shape[-1]), token_ids.reshape(-1)
        return [(h[i:i + self.chunk_size], ids[i:i + self.chunk_size]) for i in range(0, ids.numel(), self.chunk_size)]

    def _chunk_logprobs(self, h, weight, bias, ids):
        logits = torch.nn.functional.linear(h, weight, bias)
        return token_logprobs(logits, ids, temperature=self.temperature, backend=self.backend)

    def _logprobs(self, hidden, weight, bias, token_ids):
        parts = [checkpoint(self._chunk_logprobs, h, weight, bias, ids, use_reentrant=False)
                 for h, ids in self._chunks(hidden, token_ids)]
        return torch.cat(parts).view(token_ids.shape)

    @torch.no_grad()
    def _entropy(self, hidden, weight, bias, token_ids):
        parts = [token_logprobs(torch.nn.functional.linear(h, weight, bias), ids, temperature=self.temperature,
                                return_entropy=True, backend=self.backend)[1]
                 for h, ids in self._chunks(hidden, token_ids)]
        return torch.cat(parts).view(token_ids.shape)

    def forward(self, hidden, weight, token_ids, old_logp, advantages, mask, *, bias=None, ref_logp=None,
                importance_sampling_ratio=None, num_items_in_batch=None):
        require_tensor("hidden", hidden, ndim=(3,))
        require_tensor("weight", weight, ndim=(2,))
        if weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) to match hidden {tuple(hidden.shape)}, "
                             f"got {tuple(weight.shape)}")
        if tuple(token_ids.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"token_ids must have shape {tuple(hidden.shape[:2])}, got {tuple(token_ids.shape)}")
        logp = self._logprobs(hidden, weight, bias, token_ids)
        entropy = self._entropy(hidden, weight, bias, token_ids) if self.return_entropy else None
        return policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp,
                           importance_sampling_ratio=importance_sampling_ratio, num_items_in_batch=num_items_in_batch,
                           entropy=entropy, **self.loss_kwargs)
