"""``gf.token_logprobs`` forward and forward + backward, against what a user could run instead.

Implementations: the oracle ``token_logprobs_ref`` (the project's reference, checked against, not a baseline);
gfpo-fast (``backend="auto"`` and every other fast backend that runs here); the peers: idiomatic torch eager
(``torch.log_softmax(logits.float() / T, -1).gather(...)`` with autograd, :func:`bench.harness.idiomatic_logprobs`)
and ``torch.compile`` of it (on the CPU too; the compile is reported apart and never timed), TRL's
``selective_log_softmax`` with autograd (torch code on the CPU, as in TRL <= 1.14; TRL 1.16's Triton kernel on
CUDA), and Liger-Kernel's ``fused_selective_log_softmax`` (Triton, no autograd: forward only, CUDA only).
Logits are ``[B, T, V]`` as a trainer holds them (TRL's torch path loops over ``B``).

Bytes floor for GB/s, with ``e`` the logits' element size: forward reads the logits once (``N V e``);
forward + backward reads them twice and writes their gradient once (``3 N V e``).
"""
from __future__ import annotations

import functools

import torch

import gfpo_fast as gf
from gfpo_fast.logprobs import token_logprobs_ref

from .harness import Case, Impl, compiled_impl, gf_impls, grads, idiomatic_logprobs, oracle, peer_impl, trl_logits_label

# Logits dtype, completion length T, (N sweep at a fixed V), (V sweep at a fixed N), per machine size.
SIZES = {
    "test": dict(dtype=torch.float32, T=32, n_sweep=([64, 128], 4096), v_sweep=(64, [1000])),
    "cpu": dict(dtype=torch.float32, T=256, n_sweep=([512, 2048], 49152), v_sweep=(512, [8192, 151936])),
    "gpu": dict(dtype=torch.bfloat16, T=1024, n_sweep=([1024, 4096, 16384], 151936),
                v_sweep=(16384, [32768, 65536, 128256])),
}
MODES = ("fwd", "fwd+bwd")
LIGER = "Liger fused_selective_log_softmax"
EAGER, COMPILED = "torch eager (log_softmax + gather)", "torch.compile (log_softmax + gather)"


def make_inputs(B: int, T: int, V: int, dtype: torch.dtype, device: torch.device, backward: bool,
                liger: bool) -> dict:
    """Logits ``[B, T, V]``, ids, an upstream gradient, and Liger's ``[B, T + 1, V]`` copy when it runs."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g, device=device) * 2).to(dtype)
    x = {"logits": logits.requires_grad_(backward), "ids": torch.randint(0, V, (B, T), generator=g, device=device)}
    if backward:
        x["dlogp"] = torch.randn(B, T, generator=g, device=device)
    if liger:
        x["liger_logits"] = torch.cat([logits.detach(), logits.detach()[:, -1:]], dim=1)
    return x


def _wrap(fn, backward: bool):
    """``fn(logits, ids) -> logp`` as an implementation returning ``(logp,)`` or ``(logp, dlogits)``."""
    if backward:
        return lambda x: grads(fn(x["logits"], x["ids"]), [x["logits"]], x["dlogp"])

    def forward(x):
        with torch.no_grad():
            return (fn(x["logits"], x["ids"]),)

    return forward


def _liger(fn):
    return lambda x: (fn(x["liger_logits"], x["ids"], temperature=1.0),)


def implementations(device: torch.device, backward: bool, compile: bool) -> list[Impl]:
    impls = [oracle("torch reference", _wrap(token_logprobs_ref, backward))]
    impls += gf_impls("token_logprobs", device,
                      lambda b: _wrap(functools.partial(gf.token_logprobs, backend=b), backward))
    impls.append(Impl(EAGER, _wrap(idiomatic_logprobs, backward)))
    impls.append(compiled_impl(COMPILED, idiomatic_logprobs, lambda f: _wrap(f, backward), compile))
    impls.append(peer_impl(trl_logits_label(device), "trl.trainer.utils", "selective_log_softmax",
                           lambda f: _wrap(f, backward)))
    if backward:
        impls.append(Impl(LIGER, skip="no backward (a no-grad kernel)"))
    else:
        impls.append(peer_impl(LIGER, "liger_kernel.ops.grpo_loss", "fused_selective_log_softmax", _liger,
                               needs_triton=True, device=device))
    return impls


def cases(device: torch.device, size: str, compile: bool) -> list[Case]:
    cfg = SIZES[size]
    dtype, T, (ns, v_fixed), (n_fixed, vs) = cfg["dtype"], cfg["T"], cfg["n_sweep"], cfg["v_sweep"]
    dname = str(dtype).removeprefix("torch.")
    out = []
    for mode in MODES:
        backward = mode == "fwd+bwd"
        points = [(f"token_logprobs {mode}, V={v_fixed} {dname}", "N", N, v_fixed) for N in ns]
        points += [(f"token_logprobs {mode}, N={n_fixed} {dname}", "V", n_fixed, V) for V in vs]
        for group, axis, N, V in points:
            impls = implementations(device, backward, compile)
            liger = any(i.name == LIGER and i.fn for i in impls)
            out.append(Case(
                family="logprobs", group=group, x_name=axis, x=N if axis == "N" else V,
                shape={"N": N, "V": V, "B": N // T, "T": T, "dtype": dname, "mode": mode},
                make_inputs=lambda N=N, V=V, b=backward, lg=liger: make_inputs(N // T, T, V, dtype, device, b, lg),
                impls=impls, bytes_floor=(3 if backward else 1) * N * V * dtype.itemsize,
                low_precision=dtype != torch.float32,
            ))
    return out
