"""Group advantages (``gf.group_advantages``) and the GFPO filter (``gf.gfpo_filter``), forward only.

Work is O(N) on N rewards, so these numbers are launch and dispatch costs more than bandwidth: no floor.
Implementations: the references ``group_advantages_ref`` / ``gfpo_filter_ref`` (eager and under
``torch.compile``) and gfpo-fast (``backend="auto"`` and each other fast backend that runs here). TRL
computes advantages inline in its trainer, with no function to call, so it is not a peer here.
"""
from __future__ import annotations

import torch

import gfpo_fast as gf
from gfpo_fast.advantages import gfpo_filter_ref, group_advantages_ref

from .harness import Case, Impl, compiled_impl, gf_impls

G, K = 16, 8  # group size, rows kept per group by GFPO
SIZES = {"test": [256], "cpu": [1024, 16384, 262144], "gpu": [1024, 16384, 262144]}


def make_inputs(N: int, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    rewards = torch.randn(N, generator=g, device=device)
    rewards[::7] = float("nan")  # missing rewards are skipped in the statistics
    return {"rewards": rewards, "scores": torch.randn(N, generator=g, device=device)}


def _group_advantages(fn):
    return lambda x: (fn(x["rewards"], G),)


def _gfpo_filter(fn):
    return lambda x: tuple(fn(x["rewards"], x["scores"], G, K))


def cases(device: torch.device, size: str, compile: bool) -> list[Case]:
    ops = {
        "group_advantages": (group_advantages_ref, gf.group_advantages, _group_advantages),
        "gfpo_filter": (gfpo_filter_ref, gf.gfpo_filter, _gfpo_filter),
    }
    out = []
    for op, (ref, public, wrap) in ops.items():
        impls = [Impl("torch reference", wrap(ref))]
        impls += gf_impls(op, device, lambda b, public=public, wrap=wrap: wrap(
            lambda *a: public(*a, backend=b)))
        impls.append(compiled_impl("torch.compile reference", ref, wrap, compile))
        for N in SIZES[size]:
            out.append(Case(family="advantages", group=f"{op}, G={G}" + (f" k={K}" if op == "gfpo_filter" else ""),
                            x_name="N", x=N, shape={"op": op, "N": N, "G": G, "k": K},
                            make_inputs=lambda N=N: make_inputs(N, device), impls=impls))
    return out
