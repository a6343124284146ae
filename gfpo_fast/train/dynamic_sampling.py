"""DAPO's dynamic sampling: which groups of several generation rounds make up a batch of groups with reward variance.

A group whose ``G`` weighted rewards are all equal (or all missing) has zero advantage everywhere: it trains
nothing but the KL term. With ``--dynamic_sampling`` the trainer draws prompts again until every process holds
``need`` groups that vary (``enough``), at most ``dynamic_sampling_max_draws`` extra rounds, then ``pick_groups``
chooses, per process, its first ``need`` varying groups in the order drawn, topped up with equal-reward ones
only when the rounds ran out (so the batch keeps its size and every process the same number of rows). The
choice is made from the gathered rewards, the same on every process.
"""
from __future__ import annotations

import torch

from gfpo_fast.advantages import weighted_rewards


def varied_groups(rewards: torch.Tensor, num_generations: int, reward_weights: list[float] | None) -> torch.Tensor:
    """``(N / G,)`` bool: whether the weighted rewards of each group of ``rewards`` ``(N, F)`` (NaN: missing)
    take at least two values among the present ones."""
    total = weighted_rewards(rewards, reward_weights).view(-1, num_generations)  # (N / G, G)
    missing = torch.isnan(total)
    high = torch.where(missing, -torch.inf, total).amax(1)
    low = torch.where(missing, torch.inf, total).amin(1)
    return high > low


def enough(varied: list[torch.Tensor], num_processes: int, need: int) -> bool:
    """Whether every process has ``need`` varying groups among the rounds so far; ``varied``: one
    ``(num_processes * groups per process,)`` bool per round, process-major (``varied_groups`` of gathered rewards)."""
    per_process = sum(v.view(num_processes, -1).sum(1) for v in varied)  # (num_processes,)
    return bool((per_process >= need).all())


def pick_groups(varied: list[torch.Tensor], num_processes: int, need: int) -> tuple[list[list[tuple[int, int]]], int,
                                                                                       int]:
    """``(picks, dropped, filled)``: for each process, ``need`` ``(round, group)`` pairs (group: its index among
    that process's groups of the round), its varying groups first in the order drawn, then equal-reward ones if
    it has too few; ``dropped``: equal-reward groups left out, ``filled``: equal-reward groups kept (both over
    every process)."""
    picks, dropped, filled = [], 0, 0
    for rank in range(num_processes):
        rounds = [v.view(num_processes, -1)[rank].tolist() for v in varied]
        good = [(d, g) for d, row in enumerate(rounds) for g, ok in enumerate(row) if ok]
        flat = [(d, g) for d, row in enumerate(rounds) for g, ok in enumerate(row) if not ok]
        top_up = flat[:max(0, need - len(good))]
        picks.append(good[:need] + top_up)
        dropped += len(flat) - len(top_up)
        filled += len(top_up)
    return picks, dropped, filled
