"""GFPO's group filters: the user-filter call (TRL's ``group_filter_func`` contract), shared by the trainer and the TRL
integration, and :class:`GroupFilter`, the filter step of the trainer and the verl integration.

A group filter gives each of the ``G`` completions of every group a score, higher = kept;
:func:`gfpo_fast.gfpo_filter` then keeps the top ``k`` of each group. A filter is called as

    f(group_completions=[[c, ...] * G] * groups, group_rewards=[[r, ...] * G] * groups)

with the groups of the whole generation batch (rows ``[g*G, (g+1)*G)``), the completions as the reward
functions got them, and the weighted rewards (:func:`gfpo_fast.advantages.weighted_rewards`, a missing reward
counts 0). A filter whose signature has ``group_completion_ids`` (or ``**kwargs``) also gets the completion
token ids, grouped alike, where the caller has them. It returns ``groups`` lists of ``G`` floats. The ``k``
check is :func:`gfpo_fast._checks.require_num_remains`.

:class:`GroupFilter` is the whole GFPO step the trainer and the verl integration run: a score per completion,
then :func:`gfpo_fast.gfpo_filter`'s top ``k`` per group and the advantages over the kept ones (the others get
``keep=False``; the trainer drops them before the policy forward, so they cost no forward or backward). Scores:

* ``length``: ``-length`` (keeps the shortest; the paper's length filter).
* ``token_efficiency``: ``reward / length`` (the paper's token-efficiency filter).
* ``module:function``: a user's filter with the contract above.

``SCORES`` is the registry of the built-ins: adding one is one entry.

Adaptive difficulty (``adaptive=True``, arXiv 2508.09726 section "Adaptive Difficulty GFPO"): harder prompts keep
more completions. A group's difficulty is the quartile of its mean reward among the last :data:`HISTORY` group
means seen (current call included; lowest quartile = hardest). With ``k0 = k`` the kept count is, from the hardest
quartile to the easiest, ``k0 + 2``, ``k0 + 1``, ``k0``, ``k0 - 1``, clipped to ``[2, G - 1]``. The paper's exact
bucket-to-k values are not public in a form we could verify; this mapping keeps the mean k near ``k0``.
"""
from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable

import torch

from .advantages import gfpo_filter
from .user_functions import load_function

HISTORY = 512  # group means that adaptive difficulty ranks a group among
ADAPTIVE_OFFSETS = (2, 1, 0, -1)  # kept-count offsets from the hardest quartile to the easiest


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


SCORES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # name -> scores [N] float32 from the weighted rewards [N] (NaN = missing) and the lengths [N]; higher kept
    "length": lambda rewards, lengths: -lengths.float(),
    "token_efficiency": lambda rewards, lengths: torch.nan_to_num(rewards, nan=0.0) / lengths.float().clamp(min=1.0),
}


class GroupFilter:
    """Scores completions and applies the GFPO top-k per group, optionally with adaptive k (module docstring).

    ``name``: a key of :data:`SCORES` or ``module:function`` / ``file.py:function`` (loaded here: a bad name is a
    ``ValueError`` before any generation); ``num_generations``: ``G``; ``k``: completions kept per group;
    ``scale_rewards``: :func:`gfpo_fast.gfpo_filter`'s. Adaptive k keeps a reward history: one instance per run,
    saved with :meth:`state_dict` so that a resumed run ranks difficulty as the uninterrupted one.
    """

    def __init__(self, name: str, num_generations: int, k: int, *, adaptive: bool, scale_rewards: str):
        self.name, self.G, self.k, self.adaptive, self.scale_rewards = name, num_generations, k, adaptive, scale_rewards
        self.user_func = None if name in SCORES else load_function(name, "group_filter")
        self.history: deque[float] = deque(maxlen=HISTORY)

    def scores(self, rewards: torch.Tensor, lengths: torch.Tensor, completions: list) -> torch.Tensor:
        """``[N]`` float32 scores from ``rewards [N]`` (weighted, NaN = missing), ``lengths [N]`` and the ``N``
        completions (for a user's filter)."""
        if self.user_func is None:
            return SCORES[self.name](rewards, lengths)
        return score_groups(self.user_func, completions, rewards, self.G, name=f"group_filter {self.name!r}")

    def group_ks(self, rewards: torch.Tensor) -> list[int]:
        """Kept count per group: ``k`` everywhere, or the adaptive-difficulty mapping."""
        groups = rewards.numel() // self.G
        if not self.adaptive:
            return [self.k] * groups
        means = torch.nan_to_num(rewards.view(groups, self.G), nan=0.0).mean(1).tolist()  # host sync
        self.history.extend(means)
        past = torch.tensor(list(self.history))
        q = torch.quantile(past, torch.tensor([0.25, 0.5, 0.75]))
        quartile = torch.bucketize(torch.tensor(means), q, right=True).tolist()  # 0 = hardest (lowest reward)
        return [min(self.G - 1, max(2, self.k + ADAPTIVE_OFFSETS[b])) for b in quartile]

    def __call__(self, rewards: torch.Tensor, lengths: torch.Tensor, completions: list):
        """``(advantages [N] float32, keep [N] bool)`` for weighted rewards ``[N]`` and completion lengths ``[N]``."""
        scores = self.scores(rewards, lengths, completions)
        ks = self.group_ks(rewards)
        if len(set(ks)) == 1:
            return gfpo_filter(rewards, scores, self.G, ks[0], scale_rewards=self.scale_rewards)
        adv = torch.zeros_like(rewards, dtype=torch.float32)
        keep = torch.zeros_like(rewards, dtype=torch.bool)
        group_k = torch.tensor(ks, device=rewards.device).repeat_interleave(self.G)  # (N,)
        for k in sorted(set(ks)):
            rows = group_k == k
            adv[rows], keep[rows] = gfpo_filter(rewards[rows], scores[rows], self.G, k,
                                                scale_rewards=self.scale_rewards)
        return adv, keep

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=HISTORY)
