"""The fused GRPO-family policy loss from logits on the CPU; oracle: ``gfpo_fast.fused_loss.fused_policy_loss_ref``.

``loss = policy_loss(token_logprobs(logits / temperature, token_ids), old_logp, advantages, mask, ...)``
for every algorithm, loss type and importance-sampling level of :mod:`gfpo_fast.policy_loss`:

1. forward (``csrc/logprobs.cpp``): one read of the ``[B, T, V]`` logits gives float32 ``logp``,
   ``lse`` (and the entropy for the metric), ``[B, T]``. Masked tokens (padding, GFPO's dropped rows)
   are skipped: their logits are not read and their ``logp`` / entropy are 0, values the loss and its
   metrics never see (the reference zeroes masked entries with ``masked()``);
2. the loss, its metrics and ``dL/dlogp`` come from the torch reference
   (:func:`gfpo_fast.policy_loss.policy_loss_ref`) with autograd on the ``[B, T]`` log-probs, so the
   clipping, ratios, per-sequence reductions (GSPO, GSPO-token, GMPO, VESPO) and normalisers exist in
   one place only; this part is O(B T) and small next to the O(B T V) passes;
3. backward (``csrc/logprobs.cpp``): ``dL/dlogits = g dL/dlogp (onehot - softmax) / temperature``, one
   pass per row from the saved ``lse``, ``g`` being the upstream gradient of the loss. Masked tokens
   (and GFPO's dropped rows) have ``dL/dlogp = 0`` and are only zero-filled. So the logits of masked
   tokens are never read, and the cost follows the kept tokens: for an fp32 logit, 4 bytes read forward and
   4 read + 4 written backward when kept, 4 written (zeros) when masked.

Shapes and dtypes: ``logits`` ``[B, T, V]`` float32 / bfloat16 (float16 is upcast, a copy), any row
strides with a contiguous vocab; the other inputs as in :func:`gfpo_fast.policy_loss`. The loss is a
0-dim float32 tensor with autograd to ``logits`` only (the other inputs are data, as in TRL); the
logits gradient has the logits' dtype. Saved for backward: ``lse``, ``dL/dlogp`` and the ids ([B, T]).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..fused_loss import loss_and_logp_grad
from ..policy_loss import LossConfig
from .logprobs import LogitRows, kernel_logits, rows_backward, rows_forward, token_ids_flat


class FusedPolicyLossFunction(torch.autograd.Function):
    """Attaches ``dL/dlogits`` to a loss value computed in forward.

    ``dlogp`` ([B, T] float32) is ``dL/dlogp`` for an upstream gradient of 1; backward scales it by the
    real upstream gradient and runs the C++ backward pass once.
    """

    @staticmethod
    def forward(ctx, logits, ids, loss, lse, dlogp, inv_temperature, inplace):
        ctx.save_for_backward(logits, ids, lse, dlogp)
        ctx.inv_temperature, ctx.inplace = inv_temperature, inplace
        return loss.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        logits, ids, lse, dlogp = ctx.saved_tensors
        grad = rows_backward(LogitRows.of(logits), ids, ctx.inv_temperature, lse, grad_logp=dlogp * grad_loss,
                             inplace=ctx.inplace)
        return grad, None, None, None, None, None, None


def fused_policy_loss_cpp(cfg: LossConfig, logits, token_ids, old_logp, advantages, mask, *, temperature=1.0,
                          return_entropy=False, ref_logp=None, importance_sampling_ratio=None,
                          num_items_in_batch=None, inplace=False):
    """GRPO-family loss from logits with the C++ log-prob passes; inputs already validated by the caller.

    Args:
        cfg: the validated hyperparameters (:func:`gfpo_fast.policy_loss.make_loss_config`).
        logits: ``[B, T, V]`` float32 / bfloat16 / float16; ``logits[b, t]`` predicts ``token_ids[b, t]``.
        token_ids, old_logp, advantages, mask, ref_logp, importance_sampling_ratio, num_items_in_batch:
            as in :func:`gfpo_fast.policy_loss` (``[B, T]`` tensors; advantages ``[B]`` or ``[B, T]``).
        temperature: > 0, the logits are divided by it.
        return_entropy: add the ``entropy`` metric (computed in the same forward pass, no gradient).
        inplace: backward writes the logits gradient over ``logits`` instead of a new buffer.

    Returns:
        ``(loss, metrics)`` as :func:`gfpo_fast.fused_loss.fused_policy_loss_ref`: a 0-dim float32 loss with
        autograd to ``logits`` and detached 0-dim float32 metrics.
    """
    x = kernel_logits(logits)
    ids = token_ids_flat(token_ids, x.shape[-1])
    inv_t = 1.0 / temperature
    active = (mask != 0).reshape(-1).contiguous()
    logp, lse, entropy = rows_forward(LogitRows.of(x.detach()), ids, inv_t, return_entropy, active)
    shape = token_ids.shape
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    loss, metrics, dlogp = loss_and_logp_grad(cfg, logp.view(shape), old_logp, advantages, mask,
                                              needs_grad=needs_grad,
                                              entropy=None if entropy is None else entropy.view(shape),
                                              ref_logp=ref_logp, importance_sampling_ratio=importance_sampling_ratio,
                                              num_items_in_batch=num_items_in_batch)
    if not needs_grad:
        return loss, metrics
    loss = FusedPolicyLossFunction.apply(x, ids, loss, lse, dlogp.reshape(-1), inv_t, bool(inplace))
    return loss, metrics
