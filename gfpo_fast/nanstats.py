"""NaN-aware group statistics with TRL's conventions, shared by the advantage references
(:mod:`gfpo_fast.advantages`) and the Triton launchers' batch-level finish (``kernels/advantages.py``).

NaN marks a missing reward; the standard deviation is the unbiased (Bessel) one and enters as
``std + STD_EPS`` (additive, not a clamp), as in TRL's ``_generate_and_score_completions``.
"""
from __future__ import annotations

import torch

STD_EPS = 1e-4  # TRL adds this to the std (A = (r - mean) / (std + 1e-4))


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std ignoring NaN (TRL ``nanstd``): NaN when fewer than two values are finite."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=keepdim)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=keepdim)
    return torch.sqrt(var * count / (count - 1))

