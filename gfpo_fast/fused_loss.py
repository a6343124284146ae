"""The policy loss straight from logits: log-probs, ratios, clipping, loss and dL/dlogits in one op.

``fused_policy_loss(logits, token_ids, ...)`` equals ``policy_loss(token_logprobs(logits, token_ids),
...)``; the fast backends never materialise the [N, V] float32 log-softmax and write the logits
gradient in one pass (Triton on CUDA, C++ on CPU). The reference is that composition.
"""
from __future__ import annotations

import torch

from . import backends
from .logprobs import check_logits_and_ids, token_logprobs_ref
from .policy_loss import check_loss_inputs, make_loss_config, policy_loss_ref

LOSS_CONFIG_KEYS = (
    "algorithm", "loss_type", "importance_sampling_level", "epsilon", "epsilon_high", "delta", "beta",
    "use_bias_correction_kl", "max_completion_length", "grad_accum_steps", "num_processes",
    "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
    "vespo_lambda_neg",
)


def loss_and_logp_grad(cfg, logp, old_logp, advantages, mask, *, needs_grad, entropy=None, ref_logp=None,
                       importance_sampling_ratio=None, num_items_in_batch=None):
    """The ``[B, T]`` half of every fast backend: the reference loss on the backend's log-probs.

    Takes float32 ``logp`` / ``entropy`` ``[B, T]`` (no autograd) from a backend's forward pass and returns
    ``(loss, metrics, dlogp)``: the detached loss and metrics of :func:`policy_loss_ref`, and ``dL/dlogp``
    ``[B, T]`` for an upstream gradient of 1 (``None`` unless ``needs_grad``), which the backend's backward
    pass turns into ``dL/dlogits``. So clipping, ratios, per-sequence reductions and normalisers exist once.
    Masked tokens get exactly zero: the backends skip them (their log-sum-exp was never computed), and a
    ratio against meaningless old log-probs of padding (inf times a zero mask is NaN) cannot leak.
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
    """GRPO-family loss from logits ``[B, T, V]`` and completion ids ``[B, T]``.

    Takes the keywords of :func:`gfpo_fast.policy_loss` plus ``temperature`` (logits are divided by it)
    and ``return_entropy`` (adds the ``entropy`` metric). Returns ``(loss, metrics)`` with autograd to
    ``logits``; the values equal the composition of :func:`token_logprobs` and :func:`policy_loss`.
    """
    unknown = set(loss_kwargs) - set(LOSS_CONFIG_KEYS)
    if unknown:
        raise TypeError(f"fused_policy_loss got unexpected keyword arguments {sorted(unknown)}")
    cfg = make_loss_config(**loss_kwargs)
    check_logits_and_ids(logits, token_ids, temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V] for a policy loss, got shape {tuple(logits.shape)}")
    kwargs = dict(ref_logp=ref_logp, importance_sampling_ratio=importance_sampling_ratio,
                  num_items_in_batch=num_items_in_batch)
    check_loss_inputs(cfg, logits[..., 0], old_logp, advantages, mask, source="logits", **kwargs)
    impl = backends.select("fused_policy_loss", backend, logits.device)
    if impl == "triton":
        from .kernels.policy_loss import fused_policy_loss_triton as fast
    elif impl == "cpp":
        from .cpu.policy_loss import fused_policy_loss_cpp as fast
    else:
        fast = fused_policy_loss_ref
    return fast(cfg, logits, token_ids, old_logp, advantages, mask, temperature=temperature,
                return_entropy=return_entropy, **kwargs)
