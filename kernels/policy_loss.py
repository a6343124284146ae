"""The GRPO-family policy loss straight from logits: one Triton pass forward, one backward.

``loss = policy_loss(token_logprobs(logits / temperature, token_ids), old_logp, advantages, mask, ...)``
for every algorithm, loss type and importance-sampling level of :mod:`gfpo_fast.policy_loss`.

How the work is split:

1. forward kernel (:mod:`.logprobs`): one read of the ``[B, T, V]`` logits gives fp32 ``logp``,
   ``lse`` (and ``entropy``) ``[B, T]``. Masked tokens (padding, GFPO's dropped rows) are skipped:
   their logits are not read and their ``logp`` / entropy are 0, values the loss and its metrics never
   see (the reference zeroes masked entries with ``masked()``);
2. the loss, its metrics and ``dL/dlogp`` ``[B, T]`` come from the torch reference
   (:func:`gfpo_fast.policy_loss.policy_loss_ref`) run on the ``[B, T]`` log-probs with autograd:
   clipping, ratios, per-sequence reductions (GSPO, GSPO-token, GMPO's geometric mean, VESPO's
   weights) and the normalisers exist in that one place only. These are O(B*T) element-wise ops
   and a few row sums, launched back to back on the device with no host synchronisation;
3. backward kernel (:mod:`.logprobs`): ``dlogits = g * dlogp * (onehot - softmax) / temperature``
   in one pass per row, ``g`` being the incoming gradient of the loss. Masked tokens (and GFPO's
   dropped rows, whose mask is 0) read nothing and get a zero gradient.

Shapes and dtypes: ``logits`` ``[B, T, V]`` fp32 / bf16 / fp16, any row strides; ``token_ids``
``[B, T]`` int64/int32; ``old_logp``, ``ref_logp`` ``[B, T]``; ``advantages`` ``[B]`` or ``[B, T]``;
``mask`` ``[B, T]``; ``importance_sampling_ratio`` ``[B, T]``, ``[B, 1]`` or ``[B]``. The loss is a
0-dim fp32 tensor; the logits gradient has the logits' dtype.

Memory traffic per logit (bf16): 2 bytes forward, 2 read + 2 written backward (the bandwidth floor
of issue 3: two reads and one write of the logits) for a kept token, 2 written (zeros) for a masked
one, so GFPO costs in proportion to its kept tokens plus the zero-fill; the [B, T] part is O(N). Saved for backward:
``lse`` and ``dL/dlogp`` (fp32 [B, T]) besides the logits the caller holds anyway. Peak extra memory
is the logits gradient (none with ``inplace=True``) plus O(N).
"""
from __future__ import annotations

import torch

from gfpo_fast.fused_loss import loss_and_logp_grad
from gfpo_fast.policy_loss import LossConfig

from .logprobs import token_logprobs_backward, token_logprobs_forward


class FusedPolicyLossFunction(torch.autograd.Function):
    """Attaches ``dL/dlogits`` to an already computed loss value.

    ``dlogp`` (fp32 ``[B, T]``, zero on masked tokens) was computed in forward for an upstream
    gradient of 1; backward scales it by the real upstream gradient on the device and runs the
    backward kernel once.
    """

    @staticmethod
    def forward(ctx, logits, token_ids, loss, lse, dlogp, temperature, inplace):
        ctx.save_for_backward(logits, token_ids, lse, dlogp)
        ctx.temperature, ctx.inplace = temperature, inplace
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, token_ids, lse, dlogp = ctx.saved_tensors
        grad = token_logprobs_backward(logits, token_ids, lse, dlogp * grad_loss, ctx.temperature,
                                       inplace=ctx.inplace)
        return grad, None, None, None, None, None, None


def fused_policy_loss_triton(cfg: LossConfig, logits, token_ids, old_logp, advantages, mask, *, temperature=1.0,
                             return_entropy=False, ref_logp=None, importance_sampling_ratio=None,
                             num_items_in_batch=None, inplace=False):
    """GRPO-family loss from logits with the Triton log-prob kernels; inputs already validated.

    Args:
        cfg: the validated hyperparameters (:func:`gfpo_fast.policy_loss.make_loss_config`).
        logits: ``[B, T, V]`` fp32 / bf16 / fp16; token ``t`` of row ``b`` is predicted by ``logits[b, t]``.
        token_ids, old_logp, advantages, mask, ref_logp, importance_sampling_ratio, num_items_in_batch:
            as in :func:`gfpo_fast.policy_loss` (``[B, T]``-shaped tensors, advantages ``[B]`` or ``[B, T]``).
        temperature: > 0, logits are divided by it (run-time scalar in the kernels).
        return_entropy: add the ``entropy`` metric (computed in the same forward pass).
        inplace: backward writes the logits gradient over ``logits`` instead of a new buffer.

    Returns:
        ``(loss, metrics)`` exactly as :func:`gfpo_fast.fused_loss.fused_policy_loss_ref` (0-dim fp32 loss
        with autograd to ``logits``; detached 0-dim fp32 metrics).
    """
    active = mask != 0
    logp, lse, entropy = token_logprobs_forward(logits.detach(), token_ids, temperature, return_entropy, active)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, metrics, dlogp = loss_and_logp_grad(cfg, logp, old_logp, advantages, mask, needs_grad=needs_grad,
                                              entropy=entropy, ref_logp=ref_logp,
                                              importance_sampling_ratio=importance_sampling_ratio,
                                              num_items_in_batch=num_items_in_batch)
    if not needs_grad:
        return loss, metrics
    loss = FusedPolicyLossFunction.apply(logits, token_ids, loss, lse, dlogp, float(temperature),
                                         bool(inplace))
    return loss, metrics
