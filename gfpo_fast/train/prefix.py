"""Shared prompts: the G completions of a group share one prompt, so the prompt goes through the model once.

A row-by-row forward computes the same prompt keys and values G times; on the embedded default the prompt
(about 65 tokens) is longer than the completion, so that is most of the work of generation's prefill and
of the policy forward and backward. ``prompt_cache`` runs each distinct prompt once with a KV cache and
indexes the cache out to its rows. Attention then sees exactly what a full per-row forward sees, so
log-probs and gradients equal the unshared ones up to float rounding; in the backward the gradient of a
shared prompt is the sum over its rows (the indexing's backward), as in the per-row computation.
"""
from __future__ import annotations

import functools
import inspect

import torch


def cache_name(model) -> str:
    """The KV-cache keyword and output of ``model`` (through a DDP wrapper): transformers 5.24 renamed
    ``past_key_values`` to ``cache``."""
    return _cache_name(type(getattr(model, "module", model)))


@functools.cache
def _cache_name(model_class) -> str:  # one signature lookup per model class, not per forward
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``(B, L)`` of left-padded rows, as ``generate`` numbers them: 0 at the first real token
    (padding gets 0; it is masked)."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """The KV cache of ``prompt_ids[:, :-1]`` for every row, computed once per distinct prompt, or None.

    prompt_ids, prompt_mask: ``(B, P)``, left-padded (so column ``P - 1`` is a real token of every row).
    Returns a transformers cache of length ``P - 1`` and batch ``B`` (differentiable when grad is enabled),
    or None when no two rows share a prompt or ``P < 2`` (nothing to share: the caller runs rows in full).
    The caller feeds column ``P - 1`` onwards with the full ``(B, P + ...)`` attention mask.
    """
    if prompt_ids.shape[1] < 2:
        return None
    key = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], 1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)  # (U, 2P), (B,)
    if distinct.shape[0] == prompt_ids.shape[0]:
        return None
    P = prompt_ids.shape[1]
    ids, mask = distinct[:, :P - 1], distinct[:, P:2 * P - 1]
    name = cache_name(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask), use_cache=True,
                logits_to_keep=1)
    cache = out[name]
    cache.batch_select_indices(inverse)
    return cache
