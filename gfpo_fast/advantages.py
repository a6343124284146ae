"""Group-relative advantages (GRPO) and the GFPO group filter.

Rows ``[g*G, (g+1)*G)`` form group ``g`` (``G = num_generations``). All statistics follow TRL
(docs/semantics.md section 3): NaN marks a missing reward, means are NaN-aware, the standard
deviation is the unbiased (Bessel) one and is used as ``std + 1e-4`` (additive, not a clamp),
and any NaN left at the end becomes an advantage of 0.

GFPO (arXiv 2508.09726, docs/semantics.md section 12): in each group keep the ``k`` rows with the
highest filter score (ties go to the lower row index), compute the mean and std over the kept
rows only, give the dropped rows advantage 0 and ``keep=False``. Unlike TRL v1.7.1 the groups
are the right rows (its filter saw a shifted window, docs/semantics.md section 15) and the kept rows stay
in their original order (TRL reorders them by score; nothing in the loss depends on order).

The ``*_ref`` functions are the float32 torch oracle; ``group_advantages`` and ``gfpo_filter``
validate, then dispatch (``gfpo_fast.backends``) to the torch reference or to the launchers
``group_advantages_forward`` / ``gfpo_filter_forward`` of ``kernels/advantages.py`` (Triton) or
``gfpo_fast/cpu/advantages.py`` (C++), which take the same arguments and are tested against the references.
"""
from __future__ import annotations

import torch

from . import backends
from ._checks import (
    require_choice,
    require_num_remains,
    require_positive_int,
    require_same_device,
    require_shape,
    require_tensor,
)
from .nanstats import STD_EPS, nanstd

SCALE_MODES = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def normalize_scale_rewards(scale_rewards) -> str:
    """Maps TRL's aliases (True -> "group", False -> "none") and validates the mode."""
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    require_choice("scale_rewards", scale_rewards, SCALE_MODES)
    return scale_rewards


def _check_rewards(rewards, num_generations: int, *, allow_2d: bool) -> torch.Tensor:
    require_tensor("rewards", rewards, ndim=(1, 2) if allow_2d else (1,))
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor (NaN marks a missing reward), got {rewards.dtype}")
    require_positive_int("num_generations", num_generations)
    if rewards.shape[0] == 0 or rewards.shape[0] % num_generations != 0:
        raise ValueError(
            f"rewards has {rewards.shape[0]} rows, which is not a positive multiple of "
            f"num_generations={num_generations}"
        )
    return rewards


def _weights(reward_weights, num_funcs: int, device) -> torch.Tensor:
    if reward_weights is None:
        return torch.ones(num_funcs, dtype=torch.float32, device=device)
    w = torch.as_tensor(reward_weights, dtype=torch.float32, device=device).reshape(-1)
    if w.numel() != num_funcs:
        raise ValueError(f"reward_weights has {w.numel()} entries but rewards has {num_funcs} reward functions "
                         "(columns)")
    return w


def weighted_rewards(rewards: torch.Tensor, reward_weights=None) -> torch.Tensor:
    """[N] or [N, F] rewards -> [N] float32: NaN-skipping weighted sum, NaN where every entry is NaN."""
    r = rewards.float() if rewards.dim() == 2 else rewards.float().unsqueeze(1)
    total = (r * _weights(reward_weights, r.shape[1], r.device)).nansum(dim=1)
    return torch.where(torch.isnan(r).all(dim=1), torch.nan, total)


# ----------------------------------------------------------------------------- references
def group_advantages_ref(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    reward_weights=None,
    scale_rewards="group",
    aggregation: str = "sum_then_normalize",
) -> torch.Tensor:
    """Float32 torch reference of :func:`group_advantages` (TRL ``_generate_and_score_completions``)."""
    G = num_generations
    scale = normalize_scale_rewards(scale_rewards)
    r2 = rewards.float() if rewards.dim() == 2 else rewards.float().unsqueeze(1)
    if aggregation == "normalize_then_sum":
        # GDPO: z-score each reward function within its group, sum, then a batch-level baseline and std.
        grouped = r2.view(-1, G, r2.shape[1])
        mean = torch.nanmean(grouped, dim=1, keepdim=True)
        std = nanstd(grouped, dim=1, keepdim=True) if G > 1 else torch.zeros_like(mean)
        z = ((grouped - mean) / (std + STD_EPS)).view_as(r2)
        total = weighted_rewards(z, reward_weights)  # z is NaN where the reward was
        adv = (total - torch.nanmean(total)) / (nanstd(total) + STD_EPS)
        return torch.nan_to_num(adv, nan=0.0)
    return _normalize_groups(weighted_rewards(rewards, reward_weights).view(-1, G), scale)


def _normalize_groups(grouped: torch.Tensor, scale: str) -> torch.Tensor:
    """[groups, G] float32 rewards, NaN = not counted -> [N] advantages, NaN -> 0.

    A group of one scored row gets std NaN where TRL uses 0 for G = 1; both give advantage 0.
    """
    adv = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (nanstd(grouped, dim=1, keepdim=True) + STD_EPS)
    elif scale == "batch":
        adv = adv / (nanstd(grouped) + STD_EPS)
    return torch.nan_to_num(adv.reshape(-1), nan=0.0)


def gfpo_keep_mask(scores: torch.Tensor, num_generations: int, k: int) -> torch.Tensor:
    """[N] scores -> [N] bool: the ``k`` highest scores of each group (ties: lower index first)."""
    s = scores.float().view(-1, num_generations)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(s, dtype=torch.bool).scatter_(1, order, True).reshape(-1)


def gfpo_filter_ref(
    rewards: torch.Tensor, scores: torch.Tensor, num_generations: int, num_remains_in_group: int, *,
    scale_rewards="group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 torch reference of :func:`gfpo_filter`."""
    G = num_generations
    scale = normalize_scale_rewards(scale_rewards)
    keep = gfpo_keep_mask(scores, G, num_remains_in_group)
    kept = torch.where(keep, rewards.float(), torch.nan).view(-1, G)
    return torch.where(keep, _normalize_groups(kept, scale), 0.0), keep


# ----------------------------------------------------------------------------- public API
def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    reward_weights=None,
    scale_rewards="group",
    aggregation: str = "sum_then_normalize",
    backend: str = "auto",
) -> torch.Tensor:
    """Group-relative advantages, exactly as TRL's GRPOTrainer computes them.

    Args:
        rewards: ``[N]`` or ``[N, F]`` (one column per reward function), any float dtype; NaN marks a
            reward a function did not give. ``N`` must be a multiple of ``num_generations``.
        num_generations: ``G``, the group size; rows ``[g*G, (g+1)*G)`` are group ``g``.
        reward_weights: ``F`` weights (default all 1).
        scale_rewards: ``"group"`` (divide by the group std + 1e-4), ``"batch"`` (by the std of all
            rewards), ``"none"``; ``True``/``False`` mean ``"group"``/``"none"``.
        aggregation: ``"sum_then_normalize"`` (TRL default) or ``"normalize_then_sum"`` (GDPO: per-function
            group z-scores, summed, then a batch baseline and std; ``scale_rewards`` is ignored, as in TRL).
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[N]`` float32 advantages. Rows with no reward at all, and groups with fewer than two
        scored rows, get 0.
    """
    _check_rewards(rewards, num_generations, allow_2d=True)
    scale = normalize_scale_rewards(scale_rewards)
    require_choice("aggregation", aggregation, AGGREGATIONS)
    weights = _weights(reward_weights, rewards.shape[1] if rewards.dim() == 2 else 1, rewards.device)
    impl = backends.select("group_advantages", backend, rewards.device)
    if impl == "torch":
        return group_advantages_ref(rewards, num_generations, reward_weights=reward_weights, scale_rewards=scale,
                                    aggregation=aggregation)
    r = rewards.detach().float()
    r = (r if r.dim() == 2 else r.unsqueeze(1)).contiguous()
    fast = backends.launchers(impl, "advantages")
    return fast.group_advantages_forward(r, weights.contiguous(), num_generations, scale=scale,
                                         normalize_then_sum=aggregation == "normalize_then_sum")


def gfpo_filter(
    rewards: torch.Tensor,
    scores: torch.Tensor,
    num_generations: int,
    num_remains_in_group: int,
    *,
    scale_rewards="group",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GFPO: keep the top-``k`` rows of each group by ``scores``; advantages from the kept rows only.

    Args:
        rewards: ``[N]`` weighted rewards (NaN = missing, skipped in the statistics).
        scores: ``[N]`` filter scores, higher is kept (``-length`` keeps the shortest, ``reward/length``
            the most token-efficient). Must not contain NaN.
        num_generations: ``G``; ``N`` must be a multiple of it.
        num_remains_in_group: ``k`` with ``2 <= k < G`` (``k = 1`` has no std; ``k = G`` is plain GRPO).
        scale_rewards: as in :func:`group_advantages`; ``"batch"`` uses the std of all kept rewards.

    Returns:
        ``(advantages [N] float32, keep [N] bool)``: dropped rows have advantage 0 and ``keep=False``;
        exactly ``k`` rows of every group are kept.
    """
    _check_rewards(rewards, num_generations, allow_2d=False)
    require_tensor("scores", scores, ndim=(1,))
    require_shape("scores", scores, tuple(rewards.shape), "one score per row of rewards")
    require_same_device("rewards", rewards, scores=scores)
    require_num_remains(num_remains_in_group, num_generations)
    if torch.isnan(scores.float()).any():  # one small host read; a NaN score has no rank
        raise ValueError("scores contains NaN; a GFPO filter score must be a number for every row")
    scale = normalize_scale_rewards(scale_rewards)
    impl = backends.select("gfpo_filter", backend, rewards.device)
    if impl == "torch":
        return gfpo_filter_ref(rewards, scores, num_generations, num_remains_in_group, scale_rewards=scale)
    fast = backends.launchers(impl, "advantages")
    return fast.gfpo_filter_forward(rewards.detach().float().contiguous(), scores.detach().float().contiguous(),
                                    num_generations, num_remains_in_group, scale=scale)


def reward_metrics(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    reward_weights=None,
    scale_rewards="group",
    reward_names=None,
) -> dict[str, torch.Tensor]:
    """TRL's reward metrics for one generation batch, as 0-dim float32 tensors (no host sync).

    ``reward`` / ``reward_std``: NaN-aware mean / std of the weighted rewards over the batch;
    ``frac_reward_zero_std``: fraction of rows whose group std (batch std for ``"batch"``) is ~0;
    ``rewards/{name}/mean`` and ``/std`` per reward function (names default to ``func{i}``).
    """
    _check_rewards(rewards, num_generations, allow_2d=True)
    scale = normalize_scale_rewards(scale_rewards)
    r2 = rewards.float() if rewards.dim() == 2 else rewards.float().unsqueeze(1)
    names = list(reward_names) if reward_names is not None else [f"func{i}" for i in range(r2.shape[1])]
    if len(names) != r2.shape[1]:
        raise ValueError(f"reward_names has {len(names)} names but rewards has {r2.shape[1]} columns")
    r = weighted_rewards(rewards, reward_weights)
    if scale == "batch":
        std = nanstd(r) if r.numel() > 1 else torch.zeros((), device=r.device)
        zero_std = torch.isclose(std, torch.zeros_like(std)).float().expand(r.shape)
    else:
        grouped = r.view(-1, num_generations)
        std = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped[:, :1])
        zero_std = torch.isclose(std, torch.zeros_like(std)).float().expand_as(grouped)
    out = {"reward": torch.nanmean(r), "reward_std": nanstd(r), "frac_reward_zero_std": zero_std.mean()}
    for i, name in enumerate(names):
        out[f"rewards/{name}/mean"] = torch.nanmean(r2[:, i])
        out[f"rewards/{name}/std"] = nanstd(r2[:, i])
    return out
