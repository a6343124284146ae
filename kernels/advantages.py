"""Group-relative advantages and the GFPO top-k filter: one Triton program per group.

Rows ``[g*G, (g+1)*G)`` are group ``g`` (``G = num_generations``). Each program loads its group's
``[G, F]`` rewards once and, in registers (docs/semantics.md sections 3 and 12):

* ``sum_then_normalize`` (TRL default): ``r = nansum_f(w_f R_f)`` (NaN when a row has no reward),
  ``A = (r - nanmean_g r) / (nanstd_g r + 1e-4)`` (Bessel std; ``scale_rewards="none"``: no division);
* GFPO (``gfpo_filter``): ``rank_i = #{j : s_j > s_i or (s_j == s_i and j < i)}`` over the group's
  scores, ``keep = rank < k`` (top-k, ties to the lower index), then the same statistics over the
  kept rows only; dropped rows get ``A = 0``;
* ``normalize_then_sum`` (GDPO): per reward function ``z_f = (R_f - mean_g R_f) / (std_g R_f + 1e-4)``,
  then ``total = nansum_f(w_f z_f)``.

NaN advantages become 0. ``scale_rewards="batch"`` and GDPO need the std of the whole batch, a
reduction across programs: the kernel writes the per-row value whose batch statistics are needed,
and the launcher finishes with O(N) torch ops (no host synchronisation, no second kernel).

Shapes and dtypes: ``rewards`` ``[N]`` or ``[N, F]`` (any float dtype, read as fp32), ``scores``
``[N]``, ``reward_weights`` ``[F]``; outputs fp32 ``advantages`` ``[N]`` and bool ``keep`` ``[N]``.
Memory traffic: each reward and score is read once and each output written once (O(N); the
point is one launch instead of the ~20 small torch kernels of the reference, not bandwidth).
``G``, ``F`` and ``k`` are run-time integers (fixed for a training run; the tile sizes are their
next powers of two), so the kernel compiles once per run. The GFPO rank is a ``[G, G]`` comparison
tile held by one program: meant for group sizes up to a few hundred (GFPO samples 8-32 per prompt).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gfpo_fast.nanstats import STD_EPS, nanstd

from ._launch import device_guard, eager_launch


@triton.jit
def _nan_mean_std(x, axis: tl.constexpr):
    """Mean and unbiased std of ``x`` along ``axis``, skipping NaN (NaN with < 1 / < 2 values)."""
    valid = x == x
    count = tl.sum(valid.to(tl.float32), axis=axis)
    mean = tl.sum(tl.where(valid, x, 0.0), axis=axis) / count
    centred = tl.where(valid, x - tl.expand_dims(mean, axis), 0.0)
    std = tl.sqrt(tl.sum(centred * centred, axis=axis) / (count - 1.0))
    return mean, std


@triton.jit
def _group_advantages_kernel(
    rewards_ptr, weights_ptr, scores_ptr, adv_ptr, value_ptr, keep_ptr,  # pointers; rewards [N, F] contiguous
    G, F, k,  # runtime sizes: group size, reward functions, rows kept per group (HAS_FILTER)
    std_eps,  # runtime fp32 scalar (TRL's additive 1e-4)
    BLOCK_G: tl.constexpr,
    BLOCK_F: tl.constexpr,
    HAS_FILTER: tl.constexpr,  # GFPO: top-k by score, statistics over the kept rows
    NORMALIZE_THEN_SUM: tl.constexpr,  # GDPO: per-function group z-scores, then the weighted sum
    SCALE_BY_GROUP_STD: tl.constexpr,  # scale_rewards == "group"
):
    group = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_f = tl.arange(0, BLOCK_F)
    in_group = offs_g < G
    rows = group * G + offs_g
    tile_mask = in_group[:, None] & (offs_f < F)[None, :]
    r = tl.load(rewards_ptr + rows[:, None] * F + offs_f[None, :], mask=tile_mask, other=float("nan"))
    w = tl.load(weights_ptr + offs_f, mask=offs_f < F, other=0.0)
    if NORMALIZE_THEN_SUM:
        mean_f, std_f = _nan_mean_std(r, 0)
        std_f = tl.where(G > 1, std_f, 0.0)  # TRL: a group of one has std 0, not NaN
        r = (r - mean_f[None, :]) / (std_f[None, :] + std_eps)
    # NaN-skipping weighted sum over the reward functions; NaN where a row has no reward at all.
    valid = r == r
    value = tl.sum(tl.where(valid, r * w[None, :], 0.0), axis=1)
    value = tl.where(tl.sum(valid.to(tl.int32), axis=1) > 0, value, float("nan"))
    if NORMALIZE_THEN_SUM:
        tl.store(value_ptr + rows, value, mask=in_group)  # the launcher takes the batch baseline and std
    else:
        if HAS_FILTER:
            s_i = tl.load(scores_ptr + rows, mask=in_group, other=float("-inf"))
            s_j = tl.load(scores_ptr + group * G + offs_g[None, :], mask=in_group[None, :], other=float("-inf"))
            # Row i is beaten by every j with a higher score, or an equal one at a lower index: a
            # stable descending sort, computed as a [G, G] comparison instead of a sort.
            beats = ((s_j > s_i[:, None]) | ((s_j == s_i[:, None]) & (offs_g[None, :] < offs_g[:, None])))
            rank = tl.sum((beats & in_group[None, :]).to(tl.int32), axis=1)
            keep = (rank < k) & in_group
            value = tl.where(keep, value, float("nan"))
            tl.store(keep_ptr + rows, keep.to(tl.int8), mask=in_group)
        mean, std = _nan_mean_std(value, 0)
        adv = value - mean
        if SCALE_BY_GROUP_STD:
            std = tl.where(G > 1, std, 0.0)
            adv = adv / (std + std_eps)
        adv = tl.where(adv == adv, adv, 0.0)
        tl.store(adv_ptr + rows, adv, mask=in_group)
        tl.store(value_ptr + rows, value, mask=in_group)


@eager_launch
def _launch(rewards, weights, scores, G, k, *, has_filter, normalize_then_sum, scale_by_group_std):
    """Runs the kernel over ``N / G`` groups of ``rewards`` (``[N]`` or ``[N, F]`` fp32 contiguous); returns
    ``[N]`` fp32 ``adv``, ``value`` and int8 ``keep`` (or None)."""
    r = rewards if rewards.dim() == 2 else rewards.unsqueeze(1)
    N, F = r.shape
    adv = torch.empty(N, dtype=torch.float32, device=r.device)
    value = torch.empty_like(adv)
    keep = torch.empty(N, dtype=torch.int8, device=r.device) if has_filter else None
    with device_guard(r):
        _group_advantages_kernel[(N // G,)](
            r, weights, scores if has_filter else adv, adv, value, keep if has_filter else adv,  # unused: adv
            G, F, k,
            STD_EPS,
            BLOCK_G=triton.next_power_of_2(G), BLOCK_F=triton.next_power_of_2(F),
            HAS_FILTER=has_filter, NORMALIZE_THEN_SUM=normalize_then_sum, SCALE_BY_GROUP_STD=scale_by_group_std,
        )
    return adv, value, keep


def _divide_by_batch_std(adv, value):
    """``nan_to_num(adv / (nanstd(value) + 1e-4))`` with TRL's std of 0 for a single row."""
    std = nanstd(value) if value.numel() > 1 else torch.zeros((), device=value.device)
    return torch.nan_to_num(adv / (std + STD_EPS), nan=0.0)


def group_advantages_forward(rewards: torch.Tensor, weights: torch.Tensor, num_generations: int, *, scale: str,
                             normalize_then_sum: bool) -> torch.Tensor:
    """Launcher of :func:`gfpo_fast.group_advantages` (inputs validated there): ``[N]`` fp32 advantages.

    ``rewards`` ``[N, F]`` fp32 contiguous, ``weights`` ``[F]`` fp32 on the same device, ``scale`` one of
    "group", "batch", "none"; ``normalize_then_sum`` selects GDPO.
    """
    adv, value, _ = _launch(rewards, weights, None, num_generations, 0, has_filter=False,
                            normalize_then_sum=normalize_then_sum, scale_by_group_std=scale == "group")
    if normalize_then_sum:  # batch baseline and std of the summed z-scores (scale is ignored, as in TRL)
        return _divide_by_batch_std(value - torch.nanmean(value), value)
    if scale == "batch":
        return _divide_by_batch_std(adv, value)
    return adv


def gfpo_filter_forward(rewards: torch.Tensor, scores: torch.Tensor, num_generations: int, num_remains_in_group: int,
                        *, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher of :func:`gfpo_fast.gfpo_filter` (inputs validated there): ``([N] fp32 advantages, [N] bool keep)``.

    ``rewards`` and ``scores`` ``[N]`` fp32 contiguous; ``scale`` one of "group", "batch", "none".
    """
    w = torch.ones(1, dtype=torch.float32, device=rewards.device)
    adv, value, keep = _launch(rewards, w, scores, num_generations, num_remains_in_group,
                               has_filter=True, normalize_then_sum=False, scale_by_group_std=scale == "group")
    keep = keep.bool()
    if scale == "batch":  # std of every kept reward in the batch; dropped rows stay 0
        adv = torch.where(keep, _divide_by_batch_std(adv, value), 0.0)
    return adv, keep
