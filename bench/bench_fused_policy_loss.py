"""The fused policy loss from logits (``gf.fused_policy_loss``), forward + backward, for each algorithm.

Variants (TRL's loss keywords): token-level ``dapo`` and ``grpo``; GSPO (``importance_sampling_level=
"sequence"``); GSPO-token (``"sequence_token"``); GMPO (``algorithm="gmpo"``); GFPO keeping half of each
group: the ``dapo`` loss on the same batch where ``gfpo_filter_ref`` dropped half the rows of every group
(mask 0 and advantage 0 there), to compare with the unfiltered ``dapo`` cost. Every token of a kept row
counts (no padding).

Implementations: the oracle ``fused_policy_loss_ref`` (the project's torch log-probs, then its loss; checked
against, never a baseline); gfpo-fast (``backend="auto"`` and each other fast backend that runs here); the
peers, each with the loss ``policy_loss_ref`` (TRL's loss math) on top of its log-probs: idiomatic torch eager
(``log_softmax(logits.float() / T).gather``, autograd) and ``torch.compile`` of the whole (log-probs and loss;
compile reported apart, never timed), TRL's ``selective_log_softmax`` (its torch code on the CPU, as in TRL
<= 1.14; its Triton kernel on CUDA), and Liger-Kernel's ``triton_grpo_loss`` (CUDA only; ``inplace=False`` so
that every implementation writes a fresh gradient buffer; it reads Liger's ``[B, T + 1, V]`` layout; no
GSPO-token, no GMPO). TRL 1.16's trainer itself takes its fused LM head, from hidden states: that peer is in
``bench_fused_linear.py``.

Bytes floor: two reads of the logits and one write of their gradient (``3 N V e``); with GFPO half the rows
are only written, as zeros (``2 N V e``).
"""
from __future__ import annotations

import functools

import torch

import gfpo_fast as gf
from gfpo_fast.advantages import gfpo_filter_ref
from gfpo_fast.fused_policy_loss import fused_policy_loss_ref
from gfpo_fast.logprobs import token_logprobs_ref
from gfpo_fast.policy_loss import make_loss_config, policy_loss_ref

from .harness import Case, Impl, compiled_impl, gf_impls, grads, idiomatic_logprobs, oracle, peer_impl, trl_logits_label

VARIANTS = {
    "dapo": dict(loss_type="dapo"),
    "grpo": dict(loss_type="grpo"),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "gspo-token": dict(loss_type="grpo", importance_sampling_level="sequence_token"),
    "gmpo": dict(algorithm="gmpo"),
    "gfpo-half": dict(loss_type="dapo"),
}
LIGER_MISSING = {"gspo-token": "Liger has no GSPO-token level", "gmpo": "Liger has no GMPO"}
# B rows in groups of G, completion length T, vocab V, logits dtype; dapo N sweep (rows) at the same T and V.
SIZES = {
    "test": dict(B=8, G=4, T=32, V=1000, dtype=torch.float32, sweep_B=[2]),
    "cpu": dict(B=8, G=8, T=256, V=49152, dtype=torch.float32, sweep_B=[4]),  # B=4: GFPO-half compacted
    "gpu": dict(B=16, G=8, T=1024, V=151936, dtype=torch.bfloat16, sweep_B=[4, 8]),
}
LIGER = "Liger triton_grpo_loss"
EAGER, COMPILED = "torch eager (log_softmax + gather + loss)", "torch.compile (log_softmax + gather + loss)"


def idiomatic_loss(cfg, logits, token_ids, old_logp, advantages, mask):
    """The idiomatic torch log-probs, then TRL's loss math (``policy_loss_ref``): what ``torch.compile`` compiles."""
    return policy_loss_ref(cfg, idiomatic_logprobs(logits, token_ids), old_logp, advantages, mask)


def make_inputs(B, G, T, V, dtype, device, *, gfpo: bool, liger: bool) -> dict:
    """Logits ``[B, T, V]`` (grad), ids, old log-probs near the current ones, advantages, mask."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g, device=device) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g, device=device)
    old = token_logprobs_ref(logits, ids) + 0.2 * torch.randn(B, T, generator=g, device=device)
    mask = torch.ones(B, T, device=device)
    adv = torch.randn(B, generator=g, device=device)
    if gfpo:
        rewards, scores = torch.randn(B, generator=g, device=device), torch.randn(B, generator=g, device=device)
        adv, keep = gfpo_filter_ref(rewards, scores, G, G // 2)
        mask = mask * keep[:, None]
    x = {"logits": logits.requires_grad_(), "ids": ids, "old": old, "adv": adv, "mask": mask}
    if liger:
        x["liger_logits"] = torch.cat([logits.detach(), logits.detach()[:, -1:]], dim=1).requires_grad_()
    return x


def _args(x):
    return x["logits"], x["ids"], x["old"], x["adv"], x["mask"]


def _liger(cfg, T: int):
    def make(triton_grpo_loss):
        def run(x):
            loss, _ = triton_grpo_loss(
                x["liger_logits"], x["old"], None, x["ids"], x["adv"], x["mask"], temperature=1.0, beta=cfg.beta,
                eps_low=cfg.epsilon, eps_high=cfg.epsilon_high, inplace=False, loss_type=cfg.loss_type,
                max_completion_length=T, importance_sampling_level=cfg.importance_sampling_level, reduce=True)
            out, dlogits = grads(loss, [x["liger_logits"]])
            return out, dlogits[:, :-1]
        return run
    return make


def implementations(variant: str, T: int, device: torch.device, compile: bool) -> list[Impl]:
    kw = VARIANTS[variant]
    cfg = make_loss_config(**kw)

    def ref_math(fn):
        return lambda x: grads(fn(cfg, *_args(x))[0], [x["logits"]])

    def trl_math(selective_log_softmax):
        def run(x):
            logits, ids, old, adv, mask = _args(x)
            return grads(policy_loss_ref(cfg, selective_log_softmax(logits, ids), old, adv, mask)[0], [logits])
        return run

    impls = [oracle("torch reference", ref_math(fused_policy_loss_ref))]
    impls += gf_impls("fused_policy_loss", device, lambda b: lambda x: grads(
        gf.fused_policy_loss(*_args(x), backend=b, **kw)[0], [x["logits"]]))
    impls.append(Impl(EAGER, ref_math(idiomatic_loss)))
    impls.append(compiled_impl(COMPILED, idiomatic_loss, ref_math, compile))
    impls.append(peer_impl(trl_logits_label(device) + " + loss", "trl.trainer.utils", "selective_log_softmax",
                           trl_math))
    if variant in LIGER_MISSING:
        impls.append(Impl(LIGER, skip=LIGER_MISSING[variant]))
    else:
        impls.append(peer_impl(LIGER, "liger_kernel.transformers.grpo_loss", "triton_grpo_loss", _liger(cfg, T),
                               needs_triton=True, device=device))
    return impls


def _case(group, x_name, x, variant, B, G, T, V, dtype, device, compile) -> Case:
    impls = implementations(variant, T, device, compile)
    gfpo = variant == "gfpo-half"
    dname = str(dtype).removeprefix("torch.")
    return Case(
        family="fused_policy_loss", group=group, x_name=x_name, x=x,
        shape={"variant": variant, "N": B * T, "B": B, "G": G, "T": T, "V": V, "dtype": dname, "mode": "fwd+bwd"},
        make_inputs=functools.partial(make_inputs, B, G, T, V, dtype, device, gfpo=gfpo,
                                      liger=any(i.name == LIGER and i.fn for i in impls)),
        impls=impls, bytes_floor=(2 if gfpo else 3) * B * T * V * dtype.itemsize,
        low_precision=dtype != torch.float32,
    )


def cases(device: torch.device, size: str, compile: bool) -> list[Case]:
    c = SIZES[size]
    B, G, T, V, dtype = c["B"], c["G"], c["T"], c["V"], c["dtype"]
    dname = str(dtype).removeprefix("torch.")
    by_variant = f"fused loss fwd+bwd by variant, N={B * T} V={V} {dname}"
    sweep = f"fused loss dapo fwd+bwd, T={T} V={V} {dname}"
    out = [_case(by_variant, "variant", v, v, B, G, T, V, dtype, device, compile) for v in VARIANTS]
    out += [_case(sweep, "N", b * T, "dapo", b, min(G, b), T, V, dtype, device, compile) for b in c["sweep_B"]]
    return out
