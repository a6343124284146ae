"""From hidden states and the lm_head weight (never the whole logits), forward + backward: log-probs and the loss.

Two tables per run, gradients to ``hidden`` and ``weight`` (no bias), fp32 on the CPU, bf16 on CUDA:

* **log-probs** (``gf.fused_linear_logprobs``) at two heads, SmolLM2's (H = 576, V = 49,152) and a Qwen-size one
  (H = 896, V = 151,936) on the CPU, swept over the token count N, with a random upstream gradient;
* **the loss** (``gf.fused_linear_policy_loss``, and ``gf.FusedLinearGRPOLoss`` where it exists): token-level
  ``dapo`` and GSPO (sequence level), off policy, and GSPO on policy (``old_logp=None``). gfpo-fast's op forms the
  gradient in the forward pass for dapo and on-policy GSPO (``6 N H V`` FLOPs) and recomputes the logits in
  backward for off-policy GSPO (``8 N H V``; :func:`gfpo_fast.policy_loss.token_separable` decides, the row's
  name says which); the row "fused_linear_logprobs + loss (recompute)" is the recompute path on every variant
  (the op's log-probs, then the reference loss), for the side-by-side.

Implementations: the oracle (full logits ``hidden @ weight.T``, then the project's reference log-probs and loss;
checked against, never a baseline); gfpo-fast with ``backend="auto"``; the peers: idiomatic torch eager (full
logits, ``log_softmax(logits.float() / T).gather``, autograd) and ``torch.compile`` of it (on the CPU too;
compile reported apart, never timed); TRL's fused LM head (``trl.kernels.chunked_logprob.ChunkedLogProbFunction``,
called as TRL 1.16's GRPOTrainer calls it: torch tiles on the CPU, a Triton fold on CUDA; see
:func:`bench.harness.trl_fused_lm_head`); TRL's path up to 1.14 (full logits, then ``selective_log_softmax``;
on CUDA TRL 1.16 routes that function to its Triton kernel and the row says so); Liger-Kernel: for the loss its
``LigerFusedLinearGRPOLoss`` (chunked pure torch, so it runs on the CPU too; its loss math compiled on CUDA,
eager on the CPU), for log-probs its fused linear cross-entropy with ``reduction="none"`` (``-loss`` is the
log-prob; Triton, CUDA only); verl's torch backend (``verl.utils.experimental.torch_functional.FusedLinearForPPO``,
512-token chunks, recompute in backward; it always computes the entropy too), called as verl's fused forward
calls it, and verl's Triton kernel (``verl.utils.kernel.linear_cross_entropy``, what verl's fused forward calls
with ``impl_backend: triton``; fp32 log-probs and entropy; CUDA only). Where verl's package does not import (it
needs Ray), both load from verl's installed files (:mod:`bench.verl_files`). Every loss peer puts TRL's loss math
(``policy_loss_ref``) on its log-probs.

**log-probs + entropy** (the first head at its smallest N; upstream gradients on both outputs), what verl's actor
asks of its fused backend: gfpo-fast's op, gfpo-fast through verl's call path (the integration's backend
``gfpo_fast``, :mod:`gfpo_fast.integrations.verl`; it needs verl's package), verl's torch backend and its Triton
kernel. ``python -m bench.bench_fused_linear --verl`` times
the last two interleaved, with their peak memory (:func:`verl_comparison`).

FLOPs (TFLOP/s): ``6 N H V`` useful ones (the forward GEMM and the two backward GEMMs). The floor of the
recompute design that gfpo-fast's log-probs and TRL share is ``8 N H V`` (the backward recomputes the logits): the
targets compare the measured time with ``8 N H V`` at the matmul rate measured in the same run, and the loss's
time on each path with its own floor (``6 N H V`` for the gradient in the forward pass).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch
import torch.nn.functional as F

import gfpo_fast as gf
from gfpo_fast.fused_policy_loss import fused_policy_loss_ref
from gfpo_fast.logprobs import token_logprobs_ref
from gfpo_fast.policy_loss import make_loss_config, policy_loss_ref, token_separable

from . import verl_files
from .harness import (
    Case,
    Impl,
    compiled_impl,
    grads,
    idiomatic_logprobs,
    max_error,
    optional,
    oracle,
    peak_memory_mib,
    peer_impl,
    trl_fused_lm_head,
    trl_logits_label,
)

GSPO = dict(loss_type="grpo", importance_sampling_level="sequence")
# name: (loss keywords, on policy: old_logp None)
VARIANTS = {"dapo": (dict(loss_type="dapo"), False), "gspo": (GSPO, False), "gspo-on-policy": (GSPO, True)}
# Log-probs: (H, V, token counts N); loss: rows B, completion length T, vocab V and hidden sizes H; dtype.
SIZES = {
    "test": dict(dtype=torch.float32, heads=[(64, 1000, [64, 128])], B=2, T=32, V=1000, H=[64]),
    "cpu": dict(dtype=torch.float32, heads=[(576, 49152, [1024, 2048]), (896, 151936, [1024])],
                B=4, T=128, V=49152, H=[576]),
    # GPU: one log-prob case (the target's shape) keeps the GPU suite's fused-linear part short.
    "gpu": dict(dtype=torch.bfloat16, heads=[(4096, 151936, [16384])],
                B=16, T=1024, V=151936, H=[2048, 4096]),
}
EAGER, COMPILED = "torch eager (linear + log_softmax + gather)", "torch.compile (linear + log_softmax + gather)"
VERL_TORCH = "verl FusedLinearForPPO (torch backend)"
VERL_TRITON = "verl linear_cross_entropy (Triton)"
VERL_OURS = "gfpo-fast as verl's backend gfpo_fast (verl's call path)"
TRL_HEAD = "TRL fused LM head (ChunkedLogProbFunction)"
LIGER_LOSS, LIGER_CE = "Liger LigerFusedLinearGRPOLoss", "Liger fused linear cross-entropy (reduction=none)"


def linear_policy_loss_ref(cfg, hidden, weight, token_ids, old_logp, advantages, mask):
    """The oracle of the loss: full logits ``hidden @ weight.T``, then the reference fused loss."""
    return fused_policy_loss_ref(cfg, F.linear(hidden, weight), token_ids, old_logp, advantages, mask)


def linear_logprobs_ref(hidden, weight, token_ids):
    """The oracle of the log-probs: full logits, then ``token_logprobs_ref``."""
    return token_logprobs_ref(F.linear(hidden, weight), token_ids)


def idiomatic_linear_logprobs(hidden, weight, token_ids):
    return idiomatic_logprobs(F.linear(hidden, weight), token_ids)


def idiomatic_linear_loss(cfg, hidden, weight, token_ids, old_logp, advantages, mask):
    return policy_loss_ref(cfg, idiomatic_linear_logprobs(hidden, weight, token_ids), old_logp, advantages, mask)


def _weights(H, V, dtype, device, g):
    return (torch.randn(V, H, generator=g, device=device) * (2 / H**0.5)).to(dtype)


def make_inputs(B, T, H, V, dtype, device) -> dict:
    """The loss case: hidden ``[B, T, H]``, weight ``[V, H]``, ids, old log-probs near the current ones, ..."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, device=device).to(dtype)
    weight = _weights(H, V, dtype, device, g)
    ids = torch.randint(0, V, (B, T), generator=g, device=device)
    with torch.no_grad():
        old = token_logprobs_ref(F.linear(hidden, weight), ids) + 0.2 * torch.randn(B, T, generator=g, device=device)
    return {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(), "ids": ids, "old": old,
            "adv": torch.randn(B, generator=g, device=device), "mask": torch.ones(B, T, device=device)}


def make_logprob_inputs(N, H, V, dtype, device) -> dict:
    """The log-prob case: hidden ``[N, H]`` (flattened tokens, as TRL's head takes them), weight, ids, ``dlogp``."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, generator=g, device=device).to(dtype)
    weight = _weights(H, V, dtype, device, g)
    return {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(),
            "ids": torch.randint(0, V, (N,), generator=g, device=device),
            "dlogp": torch.randn(N, generator=g, device=device), "dentropy": torch.randn(N, generator=g, device=device)}


def _with_grads(loss_fn):
    """``loss_fn(x) -> (loss, metrics)`` as an implementation returning ``(loss, dhidden, dweight)``."""
    return lambda x: grads(loss_fn(x)[0], [x["hidden"], x["weight"]])


def _logprob_grads(fn):
    """``fn(hidden, weight, ids) -> logp`` as an implementation returning ``(logp, dhidden, dweight)``."""
    return lambda x: grads(fn(x["hidden"], x["weight"], x["ids"]), [x["hidden"], x["weight"]], x["dlogp"])


def _entropy_grads(fn):
    """``fn(hidden, weight, ids) -> (logp, entropy)`` as an implementation returning ``(logp, entropy, dhidden,
    dweight)`` under the random upstream gradients ``dlogp`` and ``dentropy``."""
    def run(x):
        logp, entropy = fn(x["hidden"], x["weight"], x["ids"])
        dh, dw = torch.autograd.grad((logp, entropy), (x["hidden"], x["weight"]), (x["dlogp"], x["dentropy"]))
        return logp.detach(), entropy.detach(), dh, dw
    return run


def verl_call(module):
    """How verl's fused forward calls its backend module: ``forward(hidden_states=, vocab_weights=, input_ids=,
    temperature=)`` -> ``(log_probs, entropy)``."""
    return lambda h, w, ids: module.forward(hidden_states=h, vocab_weights=w, input_ids=ids, temperature=1.0)


def verl_torch_impl(name: str, wrap) -> Impl:
    """verl's torch backend, ``FusedLinearForPPO(impl_backend="torch")``, through ``wrap`` (or why it is skipped)."""
    return peer_impl(name, "verl.utils.experimental.torch_functional", "FusedLinearForPPO",
                     lambda cls: wrap(verl_call(cls(impl_backend="torch"))))


def verl_triton_impl(wrap, device: torch.device) -> Impl:
    """verl's Triton kernel as verl's fused forward calls it (``linear_cross_entropy(hidden, weight, labels,
    temperature, "none") -> (log_probs, entropy)``, both fp32), through ``wrap`` (or why it is skipped). CUDA only:
    it opens ``torch.cuda.nvtx`` ranges and asks the CUDA device for its capability."""
    if device.type != "cuda":
        return Impl(VERL_TRITON, skip="verl's Triton kernel runs on CUDA only")
    return peer_impl(VERL_TRITON, "verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy",
                     lambda fn: wrap(lambda h, w, ids: fn(h, w, ids, 1.0, "none")), needs_triton=True, device=device)


def verl_ours_impl(wrap) -> Impl:
    """gfpo-fast as verl's backend ``gfpo_fast``: the module verl's fused forward builds once the integration is
    imported (or why it is skipped: it needs verl's package, which the peers' modules do not)."""
    why = verl_files.stubbed()
    if why:
        return Impl(VERL_OURS, skip=f"verl's package does not import here ({why}); its peers' modules loaded from "
                                    "its files", role="ours")
    integration, why = optional("gfpo_fast.integrations.verl", "fused_linear_for_ppo")
    if integration is None:
        return Impl(VERL_OURS, skip=why, role="ours")
    return Impl(VERL_OURS, wrap(verl_call(integration(impl_backend="gfpo_fast"))), role="ours")


def entropy_implementations(device: torch.device) -> list[Impl]:
    def oracle_fn(h, w, ids):
        return token_logprobs_ref(F.linear(h, w), ids, return_entropy=True)

    return [oracle("torch reference", _entropy_grads(oracle_fn)),
            Impl("gfpo-fast fused_linear_logprobs (auto, return_entropy)",
                 _entropy_grads(functools.partial(gf.fused_linear_logprobs, return_entropy=True)), role="ours"),
            verl_ours_impl(_entropy_grads),
            verl_torch_impl(VERL_TORCH, _entropy_grads),
            verl_triton_impl(_entropy_grads, device)]


def gf_ops() -> dict:
    """The fused-linear loss entry points gfpo-fast has right now, by name."""
    names = ("fused_linear_policy_loss", "FusedLinearGRPOLoss")
    return {name: getattr(gf, name) for name in names if hasattr(gf, name)}


def _trl_head_impl(name: str, make) -> Impl:
    head, why = trl_fused_lm_head()
    return Impl(name, skip=why) if head is None else Impl(name, make(head))


def logprob_implementations(device: torch.device, compile: bool) -> list[Impl]:
    impls = [oracle("torch reference", _logprob_grads(linear_logprobs_ref))]
    if hasattr(gf, "fused_linear_logprobs"):
        impls.append(Impl("gfpo-fast fused_linear_logprobs (auto)", _logprob_grads(gf.fused_linear_logprobs),
                          role="ours"))
    impls.append(Impl(EAGER, _logprob_grads(idiomatic_linear_logprobs)))
    impls.append(compiled_impl(COMPILED, idiomatic_linear_logprobs, _logprob_grads, compile))
    impls.append(_trl_head_impl(TRL_HEAD, _logprob_grads))
    impls.append(peer_impl(trl_logits_label(device), "trl.trainer.utils", "selective_log_softmax",
                           lambda f: _logprob_grads(lambda h, w, ids: f(F.linear(h, w), ids))))

    def liger_ce(cls):
        module = cls(reduction="none")
        return _logprob_grads(lambda h, w, ids: -module(w, h, ids))

    impls.append(peer_impl(LIGER_CE, "liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss", liger_ce,
                           needs_triton=True, device=device))
    impls.append(verl_torch_impl(VERL_TORCH, lambda f: _logprob_grads(lambda h, w, ids: f(h, w, ids)[0])))
    impls.append(verl_triton_impl(lambda f: _logprob_grads(lambda h, w, ids: f(h, w, ids)[0]), device))
    return impls


def path_label(cfg, on_policy: bool) -> str:
    """The path gfpo-fast's loss takes for this config, as the rows name it."""
    return "grad in forward" if token_separable(cfg, on_policy=on_policy) else "recompute"


def loss_implementations(variant: str, T: int, device: torch.device, compile: bool,
                         peers: bool = True) -> list[Impl]:
    """The loss rows of ``variant``. ``peers=False``: only gfpo-fast's ``fused_linear_policy_loss`` (its auto
    path) and the recompute composition, the two that :func:`interleaved_paths` times."""
    kw, on_policy = VARIANTS[variant]
    cfg = make_loss_config(**kw)

    def args(x):
        return x["hidden"], x["weight"], x["ids"], None if on_policy else x["old"], x["adv"], x["mask"]

    def on_logprobs(logprobs):
        """Log-probs ``logprobs(hidden [N, H], weight, ids [N]) -> [N]``, then TRL's loss math."""
        def loss(x):
            hidden, weight, ids, old, adv, mask = args(x)
            logp = logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, ids.reshape(-1)).view(ids.shape)
            return policy_loss_ref(cfg, logp, old, adv, mask)
        return _with_grads(loss)

    impls = [oracle("torch reference", _with_grads(lambda x: linear_policy_loss_ref(cfg, *args(x))))] if peers else []
    ops = gf_ops() if peers else {"fused_linear_policy_loss": gf.fused_linear_policy_loss}
    for name, op in ops.items():
        call = op(**kw) if isinstance(op, type) else functools.partial(op, **kw)
        impls.append(Impl(f"gfpo-fast {name} (auto: {path_label(cfg, on_policy)})",
                          _with_grads(lambda x, call=call: call(*args(x))), role="ours"))
    impls.append(Impl("gfpo-fast fused_linear_logprobs + loss (recompute)", on_logprobs(gf.fused_linear_logprobs),
                      role="ours"))
    if not peers:
        return impls
    impls.append(Impl(EAGER + " + loss", _with_grads(lambda x: idiomatic_linear_loss(cfg, *args(x)))))
    impls.append(compiled_impl(COMPILED + " + loss", idiomatic_linear_loss,
                               lambda f: _with_grads(lambda x: f(cfg, *args(x))), compile))
    impls.append(_trl_head_impl(TRL_HEAD + " + loss", on_logprobs))
    impls.append(peer_impl(trl_logits_label(device) + " + loss", "trl.trainer.utils", "selective_log_softmax",
                           lambda f: on_logprobs(lambda h, w, ids: f(F.linear(h, w), ids))))

    def liger(cls):
        module = cls(beta=0.0, use_ref_model=False, compiled=device.type == "cuda", loss_type=cfg.loss_type,
                     importance_sampling_level=cfg.importance_sampling_level, epsilon_low=cfg.epsilon,
                     epsilon_high=cfg.epsilon_high, temperature=1.0, max_completion_length=T)
        return _with_grads(lambda x: module(x["hidden"], x["weight"], x["ids"], x["mask"], x["adv"],
                                            old_per_token_logps=None if on_policy else x["old"]))

    impls.append(peer_impl(LIGER_LOSS, "liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss", liger))
    return impls


def cases(device: torch.device, size: str, compile: bool) -> list[Case]:
    c = SIZES[size]
    dtype = c["dtype"]
    dname = str(dtype).removeprefix("torch.")
    low = dtype != torch.float32
    out = [
        Case(family="fused_linear", group=f"fused-linear log-probs fwd+bwd, H={H} V={V} {dname}", x_name="N", x=N,
             shape={"op": "logprobs", "N": N, "H": H, "V": V, "dtype": dname, "mode": "fwd+bwd"},
             make_inputs=functools.partial(make_logprob_inputs, N, H, V, dtype, device),
             impls=logprob_implementations(device, compile), flops=6 * N * H * V, low_precision=low)
        for H, V, ns in c["heads"] for N in ns
    ]
    H, V, ns = c["heads"][0]  # what verl's actor asks of its fused backend, at the first head's smallest N
    out.append(Case(family="fused_linear", group=f"fused-linear log-probs + entropy fwd+bwd, H={H} V={V} {dname}",
                    x_name="N", x=ns[0],
                    shape={"op": "logprobs+entropy", "N": ns[0], "H": H, "V": V, "dtype": dname, "mode": "fwd+bwd"},
                    make_inputs=functools.partial(make_logprob_inputs, ns[0], H, V, dtype, device),
                    impls=entropy_implementations(device), flops=6 * ns[0] * H * V, low_precision=low))
    if not gf_ops():
        return out
    B, T, V = c["B"], c["T"], c["V"]
    out += [
        Case(family="fused_linear", group=f"fused-linear loss {variant} fwd+bwd, N={B * T} V={V} {dname}",
             x_name="H", x=H,
             shape={"op": "loss", "variant": variant, "N": B * T, "B": B, "T": T, "H": H, "V": V, "dtype": dname,
                    "mode": "fwd+bwd"},
             make_inputs=functools.partial(make_inputs, B, T, H, V, dtype, device),
             impls=loss_implementations(variant, T, device, compile), flops=6 * B * T * H * V, low_precision=low)
        for variant in VARIANTS for H in c["H"]
    ]
    return out


def interleaved_paths(size: str = "cpu", rounds: int = 10) -> str:
    """The loss's two paths side by side on a shared machine: for each variant, ``rounds`` rounds of one call of
    gfpo-fast's op (its auto path), one of the recompute composition and one forward GEMM ``hidden @ weight.T``
    of the whole ``[N, H] x [H, V]`` (``2 N H V``), in alternating order, so that load drifts hit all three alike.
    The floors are 3 and 4 of those GEMMs (``6 N H V``, ``8 N H V``) measured in the same rounds. Returns a
    markdown table: medians in ms, and the medians of the per-round ratios."""
    c, device = SIZES[size], torch.device("cpu")
    B, T, V, H = c["B"], c["T"], c["V"], c["H"][0]
    lines = [f"N = {B * T}, H = {H}, V = {V}, {str(c['dtype']).removeprefix('torch.')}, {rounds} rounds, "
             f"torch threads {torch.get_num_threads()}, load average at start {os.getloadavg()[0]:.1f}", "",
             "| variant | path | op ms | recompute ms | GEMM ms | op / 6NHV floor | op / 8NHV floor | recompute / 8NHV "
             "floor | speed-up vs recompute |", "|---|---|---|---|---|---|---|---|---|"]
    for variant, (kw, on_policy) in VARIANTS.items():
        auto, recompute = loss_implementations(variant, T, device, compile=False, peers=False)
        x = make_inputs(B, T, H, V, c["dtype"], device)
        gemm_args = x["hidden"].detach().reshape(-1, H), x["weight"].detach()  # outside the timed call
        calls = [auto.fn, recompute.fn, lambda x, gemm_args=gemm_args: F.linear(*gemm_args)]
        times = [[], [], []]
        for round_ in range(rounds + 1):  # round 0 warms up
            for k in (range(3) if round_ % 2 else reversed(range(3))):
                t0 = time.perf_counter()
                calls[k](x)
                if round_:
                    times[k].append((time.perf_counter() - t0) * 1e3)
        op, rec, gemm = (statistics.median(t) for t in times)
        ratio = [statistics.median(a / (k * g) for a, g in zip(times[i], times[2])) for i, k in ((0, 3), (0, 4),
                                                                                                 (1, 4))]
        speedup = statistics.median(r / o for r, o in zip(times[1], times[0]))
        path = path_label(make_loss_config(**kw), on_policy)
        lines.append(f"| {variant} | {path} | {op:.0f} | {rec:.0f} | {gemm:.0f} | "
                     f"{ratio[0]:.2f} | {ratio[1]:.2f} | {ratio[2]:.2f} | {speedup:.2f}x |")
    lines.append(f"\nload average at end {os.getloadavg()[0]:.1f}")
    return "\n".join(lines)


def verl_comparison(size: str = "cpu", rounds: int = 10, head: int = 0) -> str:
    """gfpo-fast against verl's torch backend on verl's own call path (``forward(hidden_states=, vocab_weights=,
    input_ids=, temperature=)``), log-probs and entropy forward + backward with random upstream gradients on both,
    at head number ``head`` of ``size`` and its smallest N: ``rounds`` rounds of one call each, alternating the order,
    after a check of both against the reference; then each one's peak memory (:func:`bench.harness.peak_memory_mib`,
    outputs and gradients included). Returns a markdown table: medians in ms and the median per-round ratio."""
    verl_torch = optional("verl.utils.experimental.torch_functional", "FusedLinearForPPO")[0]
    ours = optional("gfpo_fast.integrations.verl", "fused_linear_for_ppo")[0]
    if verl_torch is None or ours is None:
        return "verl is not installed: nothing to compare (bash .ci/verl.sh --setup-only builds an environment)"
    c, device = SIZES[size], torch.device("cpu")
    H, V, ns = c["heads"][head]
    N = ns[0]
    x = make_logprob_inputs(N, H, V, c["dtype"], device)
    impls = entropy_implementations(device)
    calls = {VERL_OURS: next(i for i in impls if i.name == VERL_OURS).fn,
             VERL_TORCH: next(i for i in impls if i.name == VERL_TORCH).fn}
    ref = impls[0].fn(x)
    errors = {name: max(max_error(a, e) for a, e in zip(fn(x), ref)) for name, fn in calls.items()}
    times = {name: [] for name in calls}
    for round_ in range(rounds):
        for name in (calls if round_ % 2 else reversed(list(calls))):
            t0 = time.perf_counter()
            calls[name](x)
            times[name].append((time.perf_counter() - t0) * 1e3)
    memory = {name: peak_memory_mib(lambda fn=fn: fn(x), device) for name, fn in calls.items()}
    ratio = statistics.median(v / o for v, o in zip(times[VERL_TORCH], times[VERL_OURS]))
    lines = [f"N = {N}, H = {H}, V = {V}, {str(c['dtype']).removeprefix('torch.')}, log-probs + entropy fwd+bwd, "
             f"{rounds} rounds, torch threads {torch.get_num_threads()}, load average at start "
             f"{os.getloadavg()[0]:.1f}", "",
             "| implementation | median ms | peak MiB | max error vs reference |", "|---|---|---|---|"]
    for name in calls:
        lines.append(f"| {name} | {statistics.median(times[name]):.0f} | {memory[name]:.0f} | {errors[name]:.1e} |")
    lines.append(f"\nverl torch / gfpo-fast, median of the per-round ratios: {ratio:.2f}x; "
                 f"load average at end {os.getloadavg()[0]:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bench_fused_linear",
                                     description=interleaved_paths.__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--verl", action="store_true", help=verl_comparison.__doc__.splitlines()[0])
    parser.add_argument("--head", type=int, default=0, help="with --verl: which head of --size (0: SmolLM2's)")
    args = parser.parse_args()
    if args.verl:
        print(verl_comparison(args.size, args.rounds, args.head))
    else:
        print(interleaved_paths(args.size, args.rounds))
