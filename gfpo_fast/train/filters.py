"""GFPO group filters: which ``k`` completions of each group of ``G`` enter the loss.

A filter gives every completion a score; :func:`gfpo_fast.gfpo_filter` keeps the ``k`` highest of each
group, computes the advantages over the kept ones only and gives the others ``keep=False``. The trainer
then drops those rows before the policy forward (compaction), so they cost no forward or backward.

* ``length``: score ``-length`` (keeps the shortest; the paper's length filter).
* ``token_efficiency``: score ``reward / length`` (the paper's token-efficiency filter).
* ``module:function``: TRL's ``group_filter_func`` contract (:mod:`gfpo_fast.group_filter`, without
  ``group_completion_ids``): scores of shape ``(groups, G)``, higher kept.

Adaptive difficulty (``adaptive_difficulty=True``, arXiv 2508.09726 section "Adaptive Difficulty GFPO"):
harder prompts keep more completions. A group's difficulty is the quartile of its mean reward among
the last :data:`HISTORY` group means seen in training (current step included; lowest quartile =
hardest). With ``k0 = num_remains_in_group`` the kept count is, from the hardest quartile to the
easiest, ``k0 + 2``, ``k0 + 1``, ``k0``, ``k0 - 1``, clipped to ``[2, G - 1]``. The paper's exact
bucket-to-k values are not public in a form we could verify; this mapping keeps the mean k near ``k0``.
"""
from __future__ import annotations

from collections import deque

import torch

import gfpo_fast as gf
from gfpo_fast.group_filter import score_groups

from .rewards import load_function

HISTORY = 512
ADAPTIVE_OFFSETS = (2, 1, 0, -1)  # kept-count offsets from the hardest quartile to the easiest


class GroupFilter:
    """Scores completions and applies the GFPO top-k per group (optionally with adaptive k)."""

    def __init__(self, name: str, num_generations: int, k: int, *, adaptive: bool, scale_rewards: str):
        self.name, self.G, self.k, self.adaptive, self.scale_rewards = name, num_generations, k, adaptive, scale_rewards
        self.user_func = None if name in ("length", "token_efficiency") else load_function(name, "group_filter")
        self.history: deque[float] = deque(maxlen=HISTORY)

    def scores(self, rewards: torch.Tensor, lengths: torch.Tensor, completions: list) -> torch.Tensor:
        """``[N]`` float32 scores from ``rewards [N]`` (weighted, NaN = missing) and ``lengths [N]``."""
        if self.name == "length":
            return -lengths.float()
        if self.name == "token_efficiency":
            return torch.nan_to_num(rewards, nan=0.0) / lengths.float().clamp(min=1.0)
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
        """``(advantages [N], keep [N] bool)`` for weighted rewards ``[N]`` and completion lengths ``[N]``."""
        scores = self.scores(rewards, lengths, completions)
        ks = self.group_ks(rewards)
        if len(set(ks)) == 1:
            return gf.gfpo_filter(rewards, scores, self.G, ks[0], scale_rewards=self.scale_rewards)
        adv = torch.zeros_like(rewards, dtype=torch.float32)
        keep = torch.zeros_like(rewards, dtype=torch.bool)
        group_k = torch.tensor(ks, device=rewards.device).repeat_interleave(self.G)  # (N,)
        for k in sorted(set(ks)):
            rows = group_k == k
            adv[rows], keep[rows] = gf.gfpo_filter(rewards[rows], scores[rows], self.G, k,
                                                   scale_rewards=self.scale_rewards)
        return adv, keep

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=HISTORY)
