"""``torch.nn.Module`` wrappers of the policy loss, for users of their own training loop.

* :class:`GRPOLoss` -- from logits ``[B, T, V]``: :func:`gfpo_fast.fused_policy_loss`.
* :class:`FusedLinearGRPOLoss` -- from the last hidden states ``[B, T, H]`` and the lm_head weight ``[V, H]``:
  :func:`gfpo_fast.fused_linear_policy_loss`, one chunk of logits at a time.

Both take the loss keywords of :func:`gfpo_fast.policy_loss` at construction (``algorithm``, ``loss_type``,
``epsilon``, ``beta``, ...) plus ``temperature``; ``forward`` takes the tensors and returns ``(loss, metrics)``.
"""
from __future__ import annotations

import torch

from ._checks import require_positive_int
from .fused_linear import DEFAULT_CHUNK_SIZE, fused_linear_policy_loss
from .fused_policy_loss import fused_policy_loss
from .policy_loss import loss_config_from


class _PolicyLossModule(torch.nn.Module):
    """Validates and stores the loss keywords once; subclasses supply ``forward``."""

    def __init__(self, *, temperature: float = 1.0, return_entropy: bool = False, backend: str = "auto", **loss_kwargs):
        super().__init__()
        loss_config_from(type(self).__name__, loss_kwargs)  # validates now; forward passes the keywords on
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
    token_ids [B, T], old_logp, advantages, mask, *, bias=None, scale=1.0, softcap=None, ref_logp=None,
    importance_sampling_ratio=None, num_items_in_batch=None)`` returns ``(loss, metrics)`` exactly as
    :func:`gfpo_fast.fused_linear_policy_loss`: equal to :func:`gfpo_fast.policy_loss` on the log-probs of the
    model's logits ``softcap * tanh(scale * (hidden @ weight.T + bias) / softcap)`` (``scale * (...)`` without a
    cap), with gradients to ``hidden``, ``weight`` and ``bias``; one ``[chunk_size, V]`` logits block exists at a
    time. A model's ``weight``, ``bias``, ``scale`` and ``softcap``: those of ``lm_head_of(model)``
    (:mod:`gfpo_fast.lm_head`).
    """

    def __init__(self, *, chunk_size: int = DEFAULT_CHUNK_SIZE, **kwargs):
        super().__init__(**kwargs)
        require_positive_int("chunk_size", chunk_size)
        self.chunk_size = chunk_size

    def forward(self, hidden, weight, token_ids, old_logp, advantages, mask, *, bias=None, scale=1.0, softcap=None,
                ref_logp=None, importance_sampling_ratio=None, num_items_in_batch=None):
        return fused_linear_policy_loss(
            hidden, weight, token_ids, old_logp, advantages, mask, bias=bias, scale=scale, softcap=softcap,
            temperature=self.temperature,
            ref_logp=ref_logp, importance_sampling_ratio=importance_sampling_ratio,
            num_items_in_batch=num_items_in_batch, return_entropy=self.return_entropy, chunk_size=self.chunk_size,
            backend=self.backend, **self.loss_kwargs,
        )
