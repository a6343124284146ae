"""C++ launchers of the group advantages and the GFPO filter (``csrc/advantages.cpp``), with the signatures of
``kernels/advantages.py``; oracle: the references of :mod:`gfpo_fast.advantages`. Statistics run in float64."""
from __future__ import annotations

import torch

from .. import _C

SCALE_CODES = {"group": 0, "batch": 1, "none": 2}  # csrc/advantages.h ScaleMode


def group_advantages_forward(rewards: torch.Tensor, weights: torch.Tensor, num_generations: int, *, scale: str,
                             normalize_then_sum: bool) -> torch.Tensor:
    """``rewards`` ``[N, F]`` float32 contiguous, ``weights`` ``[F]`` float32 -> ``[N]`` float32 advantages.

    ``scale`` is one of "group", "batch", "none"; ``normalize_then_sum`` selects GDPO. Inputs validated by
    :func:`gfpo_fast.group_advantages`.
    """
    n, f = rewards.shape
    out = torch.empty(n, dtype=torch.float32)
    _C.group_advantages(rewards.data_ptr(), n, f, weights.data_ptr(), num_generations, SCALE_CODES[scale],
                        normalize_then_sum, out.data_ptr())
    return out


def gfpo_filter_forward(rewards: torch.Tensor, scores: torch.Tensor, num_generations: int, num_remains_in_group: int,
                        *, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``rewards``, ``scores`` ``[N]`` float32 contiguous -> ``([N] float32 advantages, [N] bool keep)``."""
    n = rewards.shape[0]
    adv = torch.empty(n, dtype=torch.float32)
    keep = torch.empty(n, dtype=torch.bool)
    _C.gfpo_filter(rewards.data_ptr(), scores.data_ptr(), n, num_generations, num_remains_in_group,
                   SCALE_CODES[scale], adv.data_ptr(), keep.data_ptr())
    return adv, keep
