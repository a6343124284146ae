"""GFPO's group-filter call (TRL's ``group_filter_func`` contract), shared by the trainer and the TRL integration.

A group filter gives each of the ``G`` completions of every group a score, higher = kept;
:func:`gfpo_fast.gfpo_filter` then keeps the top ``k`` of each group. A filter is called as

    f(group_completions=[[c, ...] * G] * groups, group_rewards=[[r, ...] * G] * groups)

with the groups of the whole generation batch (rows ``[g*G, (g+1)*G)``), the completions as the reward
functions got them, and the weighted rewards (:func:`gfpo_fast.advantages.weighted_rewards`, a missing reward
counts 0). A filter whose signature has ``group_completion_ids`` (or ``**kwargs``) also gets the completion
token ids, grouped alike, where the caller has them. It returns ``groups`` lists of ``G`` floats. The ``k``
check is :func:`gfpo_fast._checks.require_num_remains`.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch


def takes_completion_ids(group_filter_func: Callable) -> bool:
    """Whether ``group_filter_func`` accepts ``group_completion_ids`` (by name, or through ``**kwargs``)."""
    params = inspect.signature(group_filter_func).parameters.values()
    return any(p.kind is p.VAR_KEYWORD or p.name == "group_completion_ids" for p in params)


def score_groups(group_filter_func: Callable, completions: list, rewards: torch.Tensor, num_generations: int, *,
                 completion_ids: list[list[int]] | None = None, name: str = "group_filter_func") -> torch.Tensor:
    """Calls ``group_filter_func`` on the groups of a generation batch; returns its scores ``(N,)`` float32.

    Args:
        completions: the ``N`` completions (text or messages), each group's ``G`` adjacent.
        rewards: ``(N,)`` weighted rewards, NaN where missing (passed to the filter as 0).
        num_generations: ``G``; ``N`` must be a multiple of it.
        completion_ids: the ``N`` completions' token id lists; passed as ``group_completion_ids`` when the filter
            takes them (:func:`takes_completion_ids`).
        name: how error messages name the filter.

    Returns:
        ``(N,)`` float32 on ``rewards.device``, row ``g*G + j`` the score of completion ``j`` of group ``g``.

    Raises:
        ValueError: the filter did not return ``N / G`` lists of ``G`` scores.
    """
    G = num_generations
    groups = len(completions) // G
    extra = {}
    if completion_ids is not None and takes_completion_ids(group_filter_func):
        extra["group_completion_ids"] = [completion_ids[g * G:(g + 1) * G] for g in range(groups)]
    out = group_filter_func(group_completions=[completions[g * G:(g + 1) * G] for g in range(groups)],
                            group_rewards=torch.nan_to_num(rewards, nan=0.0).view(groups, G).tolist(), **extra)
    scores = torch.as_tensor(out, dtype=torch.float32)
    if tuple(scores.shape) != (groups, G):
        raise ValueError(f"{name} must return scores of shape ({groups}, {G}) (one list of {G} floats per group), "
                         f"got shape {tuple(scores.shape)}")
    return scores.reshape(-1).to(rewards.device)
