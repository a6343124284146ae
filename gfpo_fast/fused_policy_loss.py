"""The policy loss straight from logits: log-probs, ratios, clipping, loss and dL/dlogits in one op.

``fused_policy_loss(logits, token_ids, ...)`` equals ``policy_loss(token_logprobs(logits, token_ids), ...)``
for every algorithm, loss type and importance-sampling level of :mod:`gfpo_fast.policy_loss`. The reference
is that composition (:func:`fused_policy_loss_ref`). The fast backends (Triton on CUDA, C++ on CPU) run
through one autograd layer, :class:`FusedPolicyLossFunction`, over the log-prob launchers of
:mod:`gfpo_fast.logprobs`:

1. forward launcher: one read of the ``[B, T, V]`` logits gives float32 ``logp``, ``lse`` (and the
   entropy for the metric), ``[B, T]``. Masked tokens (padding, GFPO's dropped rows) are skipped: their
   logits are not read and their ``logp`` / entropy are 0, values the loss and its metrics never see (the
   reference zeroes masked entries with ``masked()``);
2. the loss, its metrics and ``dL/dlogp`` ``[B, T]`` come from the torch reference
   (:func:`gfpo_fast.policy_loss.policy_loss_ref`) run with autograd on the ``[B, T]`` log-probs
   (:func:`loss_and_logp_grad`), so clipping, ratios, per-sequence reductions (GSPO, GSPO-token, GMPO's
   geometric mean, VESPO's weights) and the normalisers exist in one place only. These are O(B*T) ops with
   no host synchronisation;
3. backward launcher: ``dlogits = g * dlogp * (onehot - softmax) / temperature`` in one pass per row from the
   saved ``lse``, ``g`` being the incoming gradient of the loss. Masked tokens read nothing and get a zero
   gradient.

Memory traffic per logit (bf16): 2 bytes forward, 2 read + 2 written backward for a kept token, 2 written
(zeros) for a masked one, so GFPO costs in proportion to its kept tokens plus the zero-fill. Saved for
backward: ``lse`` and ``dL/dlogp`` (float32 ``[B, T]``) besides the logits the caller holds anyway. Peak
extra memory is the logits gradient (none with ``inplace``) plus O(B*T).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import backends
from .logprobs import check_logits_and_ids, token_logprobs_ref
from .policy_loss import LossConfig, check_loss_inputs, loss_config_from, policy_loss_ref


def loss_and_logp_grad(cfg, logp, old_logp, advantages, mask, *, needs_grad, entropy=None, ref_logp=None,
                       importance_sampling_ratio=None, num_items_in_batch=None):
    """The ``[B, T]`` half of every fast path: the reference loss on the backend's log-probs.

    Takes float32 ``logp`` / ``entropy`` ``[B, T]`` (no autograd) from a forward launcher and returns
    ``(loss, metrics, dlogp)``: the detached loss and metrics of :func:`policy_loss_ref`, and ``dL/dlogp``
    ``[B, T]`` for an upstream gradient of 1 (``None`` unless ``needs_grad``), which the backward launcher
    turns into ``dL/dlogits``. Masked tokens get exactly zero: the launchers skip them (their log-sum-exp was
    never computed), and a ratio against meaningless old log-probs of padding (inf times a zero mask is NaN)
    cannot leak.
    """
    with torch.enable_grad():
        lp = logp.requires_grad_(needs_grad)
        loss, metrics = policy_loss_ref(cfg, lp, old_logp, advantages, mask, ref_logp=ref_logp, entropy=entropy,
                                        importance_sampling_ratio=importance_sampling_ratio,
                                        num_items_in_batch=num_items_in_batch)
    if not needs_grad:
        return loss.detach(), metrics, None
    (dlogp,) = torch.autograd.grad(loss, lp)
    return loss.detach(), metrics, torch.where(mask != 0, dlogp, 0.0)


class FusedPolicyLossFunction(torch.autograd.Function):
    """Attaches ``dL/dlogits`` to a loss value computed in forward, for either fast backend.

    ``(logits, token_ids, loss, lse, dlogp, launchers, temperature, inplace) -> loss``: ``dlogp`` (float32
    ``[B, T]``, zero on masked tokens) is ``dL/dlogp`` for an upstream gradient of 1; backward scales it by
    the real upstream gradient on the device and runs the backward launcher once.
    """

    @staticmethod
    def forward(ctx, logits, token_ids, loss, lse, dlogp, fast, temperature, inplace):
        ctx.save_for_backward(logits, token_ids, lse, dlogp)
        ctx.fast, ctx.temperature, ctx.inplace = fast, temperature, inplace
        return loss.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        logits, token_ids, lse, dlogp = ctx.saved_tensors
        grad = ctx.fast.token_logprobs_backward(logits, token_ids, lse, dlogp * grad_loss, ctx.temperature,
                                                inplace=ctx.inplace)
        return grad, None, None, None, None, None, None, None


def fused_policy_loss_fast(fast, cfg: LossConfig, logits, token_ids, old_logp, advantages, mask, *, temperature=1.0,
                           return_entropy=False, ref_logp=None, importance_sampling_ratio=None,
                           num_items_in_batch=None, inplace=False):
    """The fused loss on the log-prob launchers ``fast`` (``backends.launchers(name, "logprobs")``); inputs validated.

    ``inplace``: backward writes the logits gradient over ``logits`` (or over a backend's copy of them)
    instead of a new buffer. Returns ``(loss, metrics)`` exactly as :func:`fused_policy_loss_ref`.
    """
    logp, lse, entropy = fast.token_logprobs_forward(logits.detach(), token_ids, temperature, return_entropy,
                                                     mask != 0)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, metrics, dlogp = loss_and_logp_grad(cfg, logp, old_logp, advantages, mask, needs_grad=needs_grad,
                                              entropy=entropy, ref_logp=ref_logp,
                                              importance_sampling_ratio=importance_sampling_ratio,
                                              num_items_in_batch=num_items_in_batch)
    if not needs_grad:
        return loss, metrics
    loss = FusedPolicyLossFunction.apply(logits, token_ids, loss, lse, dlogp, fast, float(temperature), bool(inplace))
    return loss, metrics


def fused_policy_loss_ref(cfg, logits, token_ids, old_logp, advantages, mask, *, temperature=1.0, ref_logp=None,
                          importance_sampling_ratio=None, num_items_in_batch=None, return_entropy=False):
    """Reference: torch log-probs (float32) followed by the reference policy loss."""
    out = token_logprobs_ref(logits, token_ids, temperature=temperature, return_entropy=return_entropy)
    logp, entropy = out if return_entropy else (out, None)
    return policy_loss_ref(cfg, logp, old_logp, advantages, mask, ref_logp=ref_logp,
                           importance_sampling_ratio=importance_sampling_ratio,
                           num_items_in_batch=num_items_in_batch, entropy=entropy)


def fused_policy_loss(logits, token_ids, old_logp, advantages, mask, *, temperature=1.0, ref_logp=None,
                      importance_sampling_ratio=None, num_items_in_batch=None, return_entropy=False,
                      backend="auto", **loss_kwargs):
    """GRPO-family loss from logits ``[B, T, V]`` (float32 / bfloat16 / float16, any row strides) and
    completion ids ``[B, T]`` (int64/int32 in ``[0, V)``, masked positions included; else a ``ValueError``).

    Takes the keywords of :func:`gfpo_fast.policy_loss` (the fields of
    :class:`gfpo_fast.policy_loss.LossConfig`) plus ``temperature`` (logits are divided by it) and
    ``return_entropy`` (adds the ``entropy`` metric). Returns ``(loss, metrics)``: a 0-dim float32 loss with
    autograd to ``logits`` (gradient in the logits dtype) and detached 0-dim float32 metrics; the values
    equal the composition of :func:`token_logprobs` and :func:`policy_loss`.
    """
    cfg = loss_config_from("fused_policy_loss", loss_kwargs)
    check_logits_and_ids(logits, token_ids, temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V] for a policy loss, got shape {tuple(logits.shape)}")
    kwargs = dict(ref_logp=ref_logp, importance_sampling_ratio=importance_sampling_ratio,
                  num_items_in_batch=num_items_in_batch)
    check_loss_inputs(cfg, logits[..., 0], old_logp, advantages, mask, source="logits", **kwargs)
    impl = backends.select("fused_policy_loss", backend, logits.device)
    if impl == "torch":
        return fused_policy_loss_ref(cfg, logits, token_ids, old_logp, advantages, mask, temperature=temperature,
                                     return_entropy=return_entropy, **kwargs)
    return fused_policy_loss_fast(backends.launchers(impl, "logprobs"), cfg, logits, token_ids, old_logp, advantages,
                                  mask, temperature=temperature, return_entropy=return_entropy, **kwargs)
