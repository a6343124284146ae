"""Shared prompts: the G completions of a group share one prompt, so the prompt goes through the model once.

A row-by-row forward computes the same prompt keys and values G times; on the embedded default the prompt
(about 65 tokens) is longer than the completion, so that is most of the work of generation's prefill and
of the policy forward and backward. ``prompt_cache`` runs each distinct prompt once with a KV cache and
indexes the cache out to its rows. Attention then sees exactly what a full per-row forward sees, so
log-probs and gradients equal the unshared ones up to float rounding; in the backward the gradient of a
shared prompt is the sum over its rows (the indexing's backward), as in the per-row computation.

With gradient checkpointing (transformers' ``GradientCheckpointingLayer``), a layer's forward is replayed in
the backward, and transformers drops a layer's cache under checkpointing because a replay would append to it
a second time. The training forward therefore continues from :func:`read_only` prompt caches, which return the
prompt's keys and values joined to the new ones without storing anything, so a replay reads the same prefix;
:func:`allow_checkpointed_prefix` tells the model's layers so (``_can_checkpoint_with_cache``, transformers >=
5.24; :func:`can_share_under_checkpointing` says whether the installed transformers has it). The prompt pass
itself writes the cache and runs with checkpointing paused (:func:`checkpointing_paused`): it keeps its
activations for one row per distinct prompt, ``1/G`` of the batch's prompt rows.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def cache_name(model) -> str:
    """The KV-cache keyword and output of ``model`` (through a DDP and a peft wrapper, which pass it on):
    transformers 5.24 renamed ``past_key_values`` to ``cache``."""
    model = getattr(model, "module", model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_name(type(model))


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
    with checkpointing_paused(model):  # the pass writes the cache: a replay would write it twice
        out = model(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask), use_cache=True,
                    logits_to_keep=1)
    cache = out[name]
    cache.batch_select_indices(inverse)
    return cache


def _checkpointing_layers(model) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def can_share_under_checkpointing() -> bool:
    """Whether this transformers lets a checkpointed layer keep a (read-only) cache: 5.24's
    ``GradientCheckpointingLayer._can_checkpoint_with_cache``; older versions drop it (then no sharing)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False
    return hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


def allow_checkpointed_prefix(model) -> None:
    """Marks ``model``'s checkpointed layers as keeping their cache under checkpointing. Sound because every cache
    the training forward passes with gradients is :func:`read_only`, and the one pass that writes a cache with
    gradients (:func:`prompt_cache`) runs with checkpointing paused; generation runs without gradients, where
    transformers never checkpoints."""
    for layer in _checkpointing_layers(model):
        layer._can_checkpoint_with_cache = True


@contextmanager
def checkpointing_paused(model) -> Iterator[None]:
    """Gradient checkpointing off for ``model`` while open (restored on exit): its layers' and its decoder's flag
    (with it on, the decoder turns ``use_cache`` off and returns no cache)."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


def read_only(cache):
    """``cache`` (a transformers cache of dynamic layers), changed in place so that ``update`` returns the cached
    keys and values joined to the new ones and leaves the layer as it was. Returns ``cache``."""
    for layer in cache.layers:
        layer.__class__ = _read_only_class(type(layer))
    return cache


@functools.cache
def _read_only_class(layer_class: type) -> type:
    def update(self, *args, **kwargs):
        state = dict(self.__dict__)  # dynamic layers rebind their tensors (torch.cat), never write into them
        try:
            return layer_class.update(self, *args, **kwargs)
        finally:
            self.__dict__.clear()
            self.__dict__.update(state)

    return type(f"ReadOnly{layer_class.__name__}", (layer_class,), {"update": update})
