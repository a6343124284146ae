"""Group advantages (``gf.group_advantages``) and the GFPO filter (``gf.gfpo_filter``), forward only.

Work is O(N) on N rewards, so these numbers are launch and dispatch costs more than bandwidth: no floor.
Implementations: the oracles ``group_advantages_ref`` / ``gfpo_filter_ref`` (NaN-aware references, checked
against, never a baseline); gfpo-fast (``backend="auto"`` and each other fast backend that runs here); the peers:
idiomatic torch eager, i.e. the few lines TRL's trainer runs inline (it has no function to call: group view,
``mean``, ``std``, ``(r - mean) / (std + 1e-4)``; for GFPO ``topk`` of the scores, then the same on the kept
rewards, scattered back), and ``torch.compile`` of those lines. Rewards hold no NaN: TRL sums its reward
functions with ``nansum`` before these lines, so that is the input they see.
"""
from __future__ import annotations

import torch

import gfpo_fast as gf
from gfpo_fast.advantages import gfpo_filter_ref, group_advantages_ref

from .harness import Case, Impl, compiled_impl, gf_impls, oracle

G, K = 16, 8  # group size, rows kept per group by GFPO
SIZES = {"test": [256], "cpu": [16384, 262144], "gpu": [1024, 16384, 262144]}


def make_inputs(N: int, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    rewards = torch.randn(N, generator=g, device=device)
    return {"rewards": rewards, "scores": torch.randn(N, generator=g, device=device)}


def idiomatic_group_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """TRL's inline advantage lines as a function: per-group mean and (unbiased) std, ``std + 1e-4``."""
    r = rewards.view(-1, num_generations)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)


def idiomatic_gfpo_filter(rewards: torch.Tensor, scores: torch.Tensor, num_generations: int, k: int):
    """GFPO in plain torch: the ``k`` best scores of each group (``topk``), advantages over the kept rewards of
    the group, 0 elsewhere; returns ``(advantages, keep)``."""
    idx = scores.view(-1, num_generations).topk(k, dim=1).indices
    r = rewards.view(-1, num_generations)
    kept = r.gather(1, idx)
    adv = (kept - kept.mean(1, keepdim=True)) / (kept.std(1, keepdim=True) + 1e-4)
    keep = torch.zeros_like(r, dtype=torch.bool).scatter_(1, idx, True)
    return torch.zeros_like(r).scatter_(1, idx, adv).view(-1), keep.view(-1)


def _group_advantages(fn):
    return lambda x: (fn(x["rewards"], G),)


def _gfpo_filter(fn):
    return lambda x: tuple(fn(x["rewards"], x["scores"], G, K))


def cases(device: torch.device, size: str, compile: bool) -> list[Case]:
    ops = {
        "group_advantages": (group_advantages_ref, gf.group_advantages, idiomatic_group_advantages, _group_advantages),
        "gfpo_filter": (gfpo_filter_ref, gf.gfpo_filter, idiomatic_gfpo_filter, _gfpo_filter),
    }
    out = []
    for op, (ref, public, idiomatic, wrap) in ops.items():
        impls = [oracle("torch reference", wrap(ref))]
        impls += gf_impls(op, device, lambda b, public=public, wrap=wrap: wrap(
            lambda *a: public(*a, backend=b)))
        impls.append(Impl("torch eager (TRL's inline lines)", wrap(idiomatic)))
        impls.append(compiled_impl("torch.compile (TRL's inline lines)", idiomatic, wrap, compile))
        for N in SIZES[size]:
            out.append(Case(family="advantages", group=f"{op}, G={G}" + (f" k={K}" if op == "gfpo_filter" else ""),
                            x_name="N", x=N, shape={"op": op, "N": N, "G": G, "k": K},
                            make_inputs=lambda N=N: make_inputs(N, device), impls=impls))
    return out
