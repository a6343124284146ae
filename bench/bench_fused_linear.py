"""The fused-linear policy loss (hidden states and lm_head weight in, never the whole logits), forward + backward.

Runs only when gfpo-fast has a fused-linear op at run time: ``gf.fused_linear_policy_loss`` (issue 3's
functional) and/or ``gf.FusedLinearGRPOLoss`` (the module); otherwise it has no cases.

Implementations: the reference ``hidden @ weight.T`` followed by ``fused_policy_loss_ref`` (eager and under
``torch.compile``), gfpo-fast's fused-linear op(s) with ``backend="auto"``, TRL's ``selective_log_softmax``
on the full logits followed by ``policy_loss_ref``, and Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (chunked
pure torch; its loss math is compiled on CUDA, eager on the CPU where compiling takes ~20 s). Gradients go to
``hidden`` and ``weight``; no bias. The loss is token-level ``dapo`` and GSPO (sequence level).

FLOPs (TFLOP/s): ``6 N H V``, the forward GEMM and the two backward GEMMs; recomputing the logits in the
backward, as chunked implementations do, is extra work that is not counted.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import gfpo_fast as gf
from gfpo_fast.fused_policy_loss import fused_policy_loss_ref
from gfpo_fast.logprobs import token_logprobs_ref
from gfpo_fast.policy_loss import make_loss_config, policy_loss_ref

from .harness import Case, Impl, compiled_impl, grads, peer_impl

VARIANTS = {"dapo": dict(loss_type="dapo"), "gspo": dict(loss_type="grpo", importance_sampling_level="sequence")}
# rows B, completion length T, vocab V, dtype, hidden sizes H swept.
SIZES = {
    "test": dict(B=2, T=32, V=1000, dtype=torch.float32, H=[64]),
    "cpu": dict(B=4, T=128, V=49152, dtype=torch.float32, H=[256, 576]),
    "gpu": dict(B=16, T=1024, V=151936, dtype=torch.bfloat16, H=[2048, 4096]),
}


def linear_policy_loss_ref(cfg, hidden, weight, token_ids, old_logp, advantages, mask):
    """The reference: full logits ``hidden @ weight.T``, then the reference fused loss."""
    return fused_policy_loss_ref(cfg, F.linear(hidden, weight), token_ids, old_logp, advantages, mask)


def make_inputs(B, T, H, V, dtype, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, device=device).to(dtype)
    weight = (torch.randn(V, H, generator=g, device=device) * (2 / H**0.5)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g, device=device)
    with torch.no_grad():
        old = token_logprobs_ref(F.linear(hidden, weight), ids) + 0.2 * torch.randn(B, T, generator=g, device=device)
    return {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(), "ids": ids, "old": old,
            "adv": torch.randn(B, generator=g, device=device), "mask": torch.ones(B, T, device=device)}


def _args(x):
    return x["hidden"], x["weight"], x["ids"], x["old"], x["adv"], x["mask"]


def _with_grads(loss_fn):
    """``loss_fn(x) -> (loss, metrics)`` as an implementation returning ``(loss, dhidden, dweight)``."""
    return lambda x: grads(loss_fn(x)[0], [x["hidden"], x["weight"]])


def gf_ops() -> dict:
    """The fused-linear entry points gfpo-fast has right now, by name."""
    names = ("fused_linear_policy_loss", "FusedLinearGRPOLoss")
    return {name: getattr(gf, name) for name in names if hasattr(gf, name)}


def implementations(variant: str, T: int, device: torch.device, compile: bool) -> list[Impl]:
    kw = VARIANTS[variant]
    cfg = make_loss_config(**kw)
    impls = [Impl("torch reference", _with_grads(lambda x: linear_policy_loss_ref(cfg, *_args(x))))]
    for name, op in gf_ops().items():
        call = op(**kw) if isinstance(op, type) else functools.partial(op, **kw)
        impls.append(Impl(f"gfpo-fast {name} (auto)", _with_grads(lambda x, call=call: call(*_args(x)))))
    impls.append(compiled_impl("torch.compile reference", linear_policy_loss_ref,
                               lambda f: _with_grads(lambda x: f(cfg, *_args(x))), compile))

    def trl(selective_log_softmax):
        def loss(x):
            hidden, weight, ids, old, adv, mask = _args(x)
            return policy_loss_ref(cfg, selective_log_softmax(F.linear(hidden, weight), ids), old, adv, mask)
        return _with_grads(loss)

    def liger(cls):
        module = cls(beta=0.0, use_ref_model=False, compiled=device.type == "cuda", loss_type=cfg.loss_type,
                     importance_sampling_level=cfg.importance_sampling_level, epsilon_low=cfg.epsilon,
                     epsilon_high=cfg.epsilon_high, temperature=1.0, max_completion_length=T)
        return _with_grads(lambda x: module(x["hidden"], x["weight"], x["ids"], x["mask"], x["adv"],
                                            old_per_token_logps=x["old"]))

    impls.append(peer_impl("TRL selective_log_softmax + ref loss", "trl.trainer.utils", "selective_log_softmax", trl))
    impls.append(peer_impl("Liger LigerFusedLinearGRPOLoss", "liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss",
                           liger))
    return impls


def cases(device: torch.device, size: str, compile: bool) -> list[Case]:
    if not gf_ops():
        return []
    c = SIZES[size]
    B, T, V, dtype = c["B"], c["T"], c["V"], c["dtype"]
    dname = str(dtype).removeprefix("torch.")
    return [
        Case(family="fused_linear", group=f"fused-linear {variant} fwd+bwd, N={B * T} V={V} {dname}", x_name="H", x=H,
             shape={"variant": variant, "N": B * T, "B": B, "T": T, "H": H, "V": V, "dtype": dname, "mode": "fwd+bwd"},
             make_inputs=functools.partial(make_inputs, B, T, H, V, dtype, device),
             impls=implementations(variant, T, device, compile), flops=6 * B * T * H * V,
             low_precision=dtype != torch.float32)
        for variant in VARIANTS for H in c["H"]
    ]
