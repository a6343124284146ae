"""C++ group advantages and GFPO filter (``csrc/advantages.cpp``); tested against ``advantages.py``."""
from __future__ import annotations

import torch

from .. import _C
from ..advantages import normalize_scale_rewards

SCALE_CODES = {"group": 0, "batch": 1, "none": 2}  # csrc/advantages.h ScaleMode


def group_advantages_cpp(rewards, num_generations, *, reward_weights=None, scale_rewards="group",
                         aggregation="sum_then_normalize"):
    r = rewards.detach().float()
    r = (r if r.dim() == 2 else r.unsqueeze(1)).contiguous()
    n, f = r.shape
    w = torch.ones(f) if reward_weights is None else torch.as_tensor(reward_weights, dtype=torch.float32)
    w = w.reshape(-1).contiguous()
    out = torch.empty(n, dtype=torch.float32)
    _C.group_advantages(r.data_ptr(), n, f, w.data_ptr(), num_generations,
                        SCALE_CODES[normalize_scale_rewards(scale_rewards)],
                        aggregation == "normalize_then_sum", out.data_ptr())
    return out


def gfpo_filter_cpp(rewards, scores, num_generations, num_remains_in_group, *, scale_rewards="group"):
    r = rewards.detach().float().contiguous()
    s = scores.detach().float().contiguous()
    adv = torch.empty(r.shape[0], dtype=torch.float32)
    keep = torch.empty(r.shape[0], dtype=torch.bool)
    _C.gfpo_filter(r.data_ptr(), s.data_ptr(), r.shape[0], num_generations, num_remains_in_group,
                   SCALE_CODES[normalize_scale_rewards(scale_rewards)], adv.data_ptr(), keep.data_ptr())
    return adv, keep
