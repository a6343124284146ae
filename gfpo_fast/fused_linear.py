"""Log-probs and the policy loss from hidden states and the lm_head weight, one chunk of tokens at a time.

``logits = hidden @ weight.T + bias`` is never held whole: each chunk of ``C = chunk_size`` tokens is
projected (one GEMM), reduced by a backend's forward log-prob launcher (``backends.launchers(name, "logprobs")``:
Triton or C++) to fp32 ``logp``, ``lse`` (and ``entropy``) and dropped. Backward, per chunk: the logits are
projected again, the backward launcher overwrites them with ``dlogits`` from the saved ``lse`` (in place,
no second ``[C, V]`` buffer), then
``dhidden_c = dlogits @ weight``, ``dweight += dlogits.T @ hidden_c`` into an fp32 accumulator and
``dbias += sum_c dlogits``. The policy loss runs once on the ``[B, T]`` log-probs with the torch
reference (:func:`gfpo_fast.policy_loss.policy_loss_ref`), so every algorithm, including the
per-sequence ones (GSPO, GSPO-token, GMPO, VESPO), is exact, and its ``dL/dlogp`` feeds the chunks.
In the loss, a chunk whose tokens are all masked (padding, GFPO's dropped rows) is skipped, forward
and backward: no GEMM, no kernel, ``logp`` / ``entropy`` 0 (never seen by the loss) and a zero
gradient; finding those chunks costs one host synchronisation per forward.

The gradient in the forward pass (:func:`fused_linear_policy_loss` only): when a token's ``dL/dlogp`` needs no
other token's log-prob (:func:`gfpo_fast.policy_loss.token_separable`: off-policy token-level losses, and every
on-policy loss, GSPO and GMPO included, since their ratios are 1 in value there), it is known as soon as the
chunk's log-probs are, so the chunk's logits become ``dlogits`` right away and ``dhidden`` / ``dweight`` /
``dbias`` are summed in the forward; the backward only scales them by the upstream gradient
(:class:`FusedLinearLossGradFunction`). ``dL/dlogp`` comes from the reference loss's own autograd on the
``[B, T]`` log-probs known so far (one ``O(B T)`` evaluation per chunk), never from a second copy of the loss.
Every other loss (off-policy GSPO, GSPO-token, GMPO, VESPO: a token's gradient needs its whole row) keeps the
recompute path.

Shapes and dtypes: ``hidden`` ``[B, T, H]`` or ``[N, H]``, ``weight`` ``[V, H]`` and ``bias`` ``[V]`` in
the hidden dtype (fp32 / bf16 / fp16); ``token_ids`` ``[B, T]`` / ``[N]``; ``logp`` / ``entropy`` fp32
shaped like ``token_ids``; gradients in their inputs' dtypes.

Cost: with the recompute, 4 GEMMs of ``2 N V H`` FLOPs (forward, recomputed forward, two backward), the
price of never storing ``[N, V]``; with the gradient in the forward pass, 3 (``6 N H V``, the GEMM floor of
any implementation). Peak extra memory: one ``[C, V]`` logits chunk, the fp32 ``[V, H]`` weight-gradient
accumulator (plus one ``[V, H]`` product in the weight dtype per chunk when that is not fp32) and O(N); on the
grad-in-forward path the accumulator, the ``[N, H]`` hidden gradient and the fp32 ``[V]`` bias gradient exist
from the forward to the backward instead of during the backward only. Memory traffic of the log-prob part per
logit: 2 bytes read forward, 2 read + 2 written backward, as in ``kernels/logprobs.py``, on a chunk that is
still in L2 for small chunks.

The head's transform: ``scale`` (a model's logit scale: Cohere's ``logit_scale``, Granite's ``1 /
logits_scaling``, ...) and ``softcap`` (final-logit soft-capping, Gemma 2/3's ``final_logit_softcapping``)
give the distribution ``softmax(softcap * tanh(scale * logits / softcap) / temperature)`` (without ``softcap``:
``softmax(scale * logits / temperature)``); :mod:`gfpo_fast.lm_head` reads them off a model. Design choice:
both are applied inside the backends' log-prob passes (``kernels/logprobs.py``, ``csrc/logprobs.cpp``), in
float32 registers as each logit is read, and the backward recomputes the cap from the same logits and
multiplies by its derivative ``scale / temperature * (1 - tanh^2)``: no transformed copy, no second ``[C, V]``
buffer, no extra pass over the chunk (an elementwise transform of the chunk in torch would need a second buffer
in backward, or a third GEMM, to keep the capped values for the chain rule). The chunk loop is one code path
for both backends.

An FSDP2-sharded (DTensor) ``weight`` / ``bias`` is gathered once per call (``full_tensor``, one all-gather),
and its gradient goes back as a DTensor with the parameter's own placements through a reduce-scatter that
averages over the ranks of its mesh (``Partial("avg")``): each rank's loss gradient is one partial term, as
FSDP2 averages its data-parallel gradients. An lm_head that FSDP2 has already unsharded for the model's
forward (the root module's, after its forward) is a plain tensor, and FSDP2 reduces its gradient itself.

Backends: ``"triton"`` (CUDA, or the CPU interpreter) and ``"cpp"`` (CPU) run the same chunk loops (both paths)
over their launchers (:class:`ChunkHead`); ``"torch"`` runs each chunk through the reference log-probs and gets
its ``dlogits`` through autograd over them (the chunk's softmax recomputed from its logits, not its GEMM), in
backward or, on the grad-in-forward path, in the forward, still one chunk at a time. Triton is imported only
when its backend runs, so ``gfpo_fast`` imports without it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import backends
from ._checks import FLOAT_DTYPES, require_float, require_positive_int, require_same_device, require_tensor
from .logprobs import check_logits_and_ids, token_logprobs_ref
from .policy_loss import LossConfig, check_loss_inputs, loss_config_from, policy_loss_ref, token_separable

DEFAULT_CHUNK_SIZE = 1024  # tokens: a [1024, 151936] bf16 chunk is 311 MB, enough rows to keep the GEMM efficient


# ----------------------------------------------------------------------------- references
def head_transform_ref(logits: torch.Tensor, scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """A model's logits from its lm_head output, in float32: ``softcap * tanh(scale * logits / softcap)``, or
    ``scale * logits`` without ``softcap`` (the order of transformers' models: scale, then cap)."""
    z = logits.float() * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def fused_linear_logprobs_ref(hidden, weight, token_ids, *, bias=None, temperature=1.0, scale=1.0, softcap=None,
                              return_entropy=False):
    """Reference: the whole logits ``F.linear(hidden, weight, bias)`` through :func:`head_transform_ref`, then
    :func:`token_logprobs_ref`."""
    return token_logprobs_ref(head_transform_ref(F.linear(hidden, weight, bias), scale, softcap), token_ids,
                              temperature=temperature, return_entropy=return_entropy)


def fused_linear_policy_loss_ref(cfg, hidden, weight, token_ids, old_logp, advantages, mask, *, bias=None,
                                 temperature=1.0, scale=1.0, softcap=None, ref_logp=None,
                                 importance_sampling_ratio=None, num_items_in_batch=None, return_entropy=False):
    """Reference: :func:`fused_linear_logprobs_ref` followed by the reference policy loss."""
    out = fused_linear_logprobs_ref(hidden, weight, token_ids, bias=bias, temperature=temperature, scale=scale,
                                    softcap=softcap, return_entropy=return_entropy)
    logp, entropy = out if return_entropy else (out, None)
    return policy_loss_ref(cfg, logp, old_logp, advantages, mask, ref_logp=ref_logp,
                           importance_sampling_ratio=importance_sampling_ratio,
                           num_items_in_batch=num_items_in_batch, entropy=entropy)


# ----------------------------------------------------------------------------- chunk loop
def _chunks(n: int, chunk_size: int, active: torch.Tensor | None = None) -> tuple[list[slice], bool]:
    """``(chunks, skipping)``: token slices of at most ``chunk_size``, with ``active`` (bool ``[n]``) only those
    holding an active token, and whether some tokens are in no chunk (their outputs and gradients must start at 0)."""
    chunks = [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    if active is None or not chunks:
        return chunks, False
    # One host synchronisation for all chunks: which hold any active token.
    padded = F.pad(active, (0, len(chunks) * chunk_size - n)).view(len(chunks), chunk_size)
    kept = [rows for rows, keep in zip(chunks, padded.any(1).tolist()) if keep]
    return kept, len(kept) < len(chunks)


@dataclass(frozen=True)
class ChunkHead:
    """The log-prob part of one chunk: a backend's launchers (``fast``, ``backends.launchers(name, "logprobs")``), or
    None for the torch reference, and the head transform (``temperature``, ``scale``, ``softcap``: floats, softcap
    possibly None), applied by the launchers or by :func:`head_transform_ref`."""

    fast: Any
    temperature: float
    scale: float
    softcap: float | None

    def logprobs(self, logits, ids, return_entropy):
        """fp32 ``(logp, lse, entropy)`` of a ``[C, V]`` chunk, each ``[C]``; ``lse`` None on the torch path and
        ``entropy`` None without ``return_entropy``."""
        if self.fast is not None:
            return self.fast.token_logprobs_forward(logits, ids, self.temperature, return_entropy, scale=self.scale,
                                                    softcap=self.softcap)
        out = token_logprobs_ref(head_transform_ref(logits, self.scale, self.softcap), ids,
                                 temperature=self.temperature, return_entropy=return_entropy)
        return (out[0], None, out[1]) if return_entropy else (out, None, None)

    def dlogits(self, logits, ids, lse, dlogp, entropy=None, dentropy=None):
        """dL/dlogits ``[C, V]`` of a chunk from fp32 ``[C]`` ``dlogp`` (and ``dentropy`` with its ``entropy``):
        written over ``logits`` by a backend's launcher from the saved ``lse``, or on the torch path through
        autograd over the reference (the softmax recomputed from ``logits``; no GEMM either way)."""
        if self.fast is not None:
            return self.fast.token_logprobs_backward(logits, ids, lse, dlogp, self.temperature, entropy=entropy,
                                                     dentropy=dentropy, inplace=True, scale=self.scale,
                                                     softcap=self.softcap)
        with torch.enable_grad():
            z = logits.requires_grad_()
            out = token_logprobs_ref(head_transform_ref(z, self.scale, self.softcap), ids,
                                     temperature=self.temperature, return_entropy=dentropy is not None)
            outputs, grads = ((out[0], out[1]), (dlogp, dentropy)) if dentropy is not None else ((out,), (dlogp,))
            (dlogits,) = torch.autograd.grad(outputs, z, grads)
        return dlogits


class LinearGrads:
    """Gradients of ``F.linear(hidden, weight, bias)`` summed chunk by chunk: ``dhidden`` ``[N, H]`` in the
    hidden dtype, ``dweight`` ``[V, H]`` and ``dbias`` ``[V]`` accumulated in fp32; None where ``need`` (three
    bools: hidden, weight, bias) says no. ``skipping``: some chunks are never added, so ``dhidden`` starts at 0."""

    def __init__(self, hidden, weight, need, skipping):
        self.hidden_dtype, self.weight_dtype = hidden.dtype, weight.dtype
        alloc = torch.zeros if skipping else torch.empty
        self.hidden = alloc(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need[0] else None
        self.weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
        self.bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need[2] else None

    def add(self, dlogits, h, weight, rows):
        """Adds chunk ``rows``: ``dlogits`` ``[C, V]`` (the weight dtype), ``h = hidden[rows]`` ``[C, H]``."""
        if self.hidden is not None:
            torch.mm(dlogits, weight, out=self.hidden[rows])
        if self.weight is not None:
            if dlogits.dtype == torch.float32:
                self.weight.addmm_(dlogits.t(), h)
            else:  # the product in the low dtype (fp32 accumulation inside the GEMM), summed in fp32
                self.weight.add_(dlogits.t() @ h)
        if self.bias is not None:
            self.bias.add_(dlogits.sum(0, dtype=torch.float32))

    def result(self, upstream=None):
        """``(dhidden, dweight, dbias)`` in the inputs' dtypes, each scaled in place by the 0-dim ``upstream``
        when given (the buffers are consumed)."""
        out = []
        for grad, dtype in ((self.hidden, self.hidden_dtype), (self.weight, self.weight_dtype),
                            (self.bias, self.weight_dtype)):
            if grad is not None and upstream is not None:
                grad.mul_(upstream)
            out.append(None if grad is None else grad.to(dtype))
        return tuple(out)


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """Autograd over ``[N, H]`` hidden states; saves the inputs and the fp32 per-token ``lse`` / entropy only.

    ``head``: a :class:`ChunkHead`; on the torch path (``head.fast`` None) the backward recomputes the chunk's
    log-probs through autograd over the reference. ``active`` (bool ``[N]`` or None): chunks without an active
    token are skipped, forward (outputs 0) and backward (zero gradient, whatever ``dlogp`` says there); for a
    loss that ignores inactive tokens.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, head, return_entropy, chunk_size, active):
        N = hidden.shape[0]
        chunks, skipping = _chunks(N, chunk_size, active)
        # zeros, not empty, when chunks are skipped: their outputs must be finite for the loss's masking
        alloc = torch.zeros if skipping else torch.empty
        logp = alloc(N, dtype=torch.float32, device=hidden.device)
        lse = None if head.fast is None else alloc(N, dtype=torch.float32, device=hidden.device)
        entropy = alloc(N, dtype=torch.float32, device=hidden.device) if return_entropy else None
        for rows in chunks:
            logits = F.linear(hidden[rows], weight, bias)  # [C, V], the only vocab-sized buffer
            logp[rows], lse_c, ent = head.logprobs(logits, token_ids[rows], return_entropy)
            if lse is not None:
                lse[rows] = lse_c
            if return_entropy:
                entropy[rows] = ent
        ctx.save_for_backward(hidden, weight, bias, token_ids, lse, entropy)
        ctx.head, ctx.chunks, ctx.skipping = head, chunks, skipping
        ctx.set_materialize_grads(False)
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, dlogp, dentropy=None):
        hidden, weight, bias, token_ids, lse, entropy = ctx.saved_tensors
        if dlogp is None and dentropy is None:
            return (None,) * 8
        if dlogp is None:
            dlogp = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grads = LinearGrads(hidden, weight, ctx.needs_input_grad[:3], ctx.skipping)
        for rows in ctx.chunks:
            h = hidden[rows]
            dent = None if dentropy is None else dentropy[rows]
            dlogits = ctx.head.dlogits(F.linear(h, weight, bias), token_ids[rows], None if lse is None else lse[rows],
                                       dlogp[rows], None if dent is None else entropy[rows], dent)
            grads.add(dlogits, h, weight, rows)
        return grads.result() + (None,) * 5


class FusedLinearLossGradFunction(torch.autograd.Function):
    """The loss of :func:`fused_linear_policy_loss` with its gradient formed in the forward pass, for a
    token-separable loss (:func:`gfpo_fast.policy_loss.token_separable`): ``6 N H V`` FLOPs, no recompute.

    Per chunk of the forward: project (one GEMM), log-probs and ``lse`` from a backend's launcher, then
    ``dL/dlogp`` of the chunk's tokens from ``loss.dlogp`` (autograd of the reference loss on the ``[B, T]``
    log-probs known so far: exact, since a token's gradient needs only its own log-prob), the backward launcher
    writes ``dlogits`` over the chunk's logits, and two GEMMs add ``dhidden`` / ``dweight`` (and ``dbias``) into
    a :class:`LinearGrads`. After the loop ``loss(logp, entropy)`` gives the value and the metrics, returned as
    ``(loss, metrics)`` (the dict carries no gradient). Backward only scales the stored gradients by the
    upstream gradient, in place: one backward per forward (a second one raises).

    ``loss``: a :class:`PolicyLoss`; ``head``, ``chunk_size``, ``active`` as in
    :class:`FusedLinearLogprobsFunction`. The entropy is a metric here, without gradient (the loss never reads
    it). Gradients reach ``hidden``, ``weight`` and ``bias`` only (the loss's other tensors must not require
    gradients).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, head, return_entropy, chunk_size, active, loss):
        N = hidden.shape[0]
        chunks, skipping = _chunks(N, chunk_size, active)
        # zeros: the loss reads every log-prob to form a chunk's gradient, and skipped or later chunks' must be finite
        logp = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(N, dtype=torch.float32, device=hidden.device) if return_entropy else None
        grads = LinearGrads(hidden, weight, ctx.needs_input_grad[:3], skipping)
        for rows in chunks:
            h, ids = hidden[rows], token_ids[rows]
            logits = F.linear(h, weight, bias)  # [C, V], the only vocab-sized buffer, becomes dlogits in place
            logp[rows], lse, ent = head.logprobs(logits, ids, return_entropy)
            if return_entropy:
                entropy[rows] = ent
            grads.add(head.dlogits(logits, ids, lse, loss.dlogp(logp)[rows]), h, weight, rows)
        value, metrics = loss(logp, entropy)
        ctx.grads = grads
        return value, metrics

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss, dmetrics=None):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_policy_loss formed its gradient in the forward pass and it was used by "
                               "a first backward: run the forward again for a second one")
        grads, ctx.grads = ctx.grads, None
        return grads.result(dloss) + (None,) * 6


@dataclass(frozen=True)
class PolicyLoss:
    """:func:`gfpo_fast.policy_loss.policy_loss_ref` with one call's tensors bound: ``cfg``, ``old_logp``,
    ``advantages``, ``mask`` (``[B, T]``) and ``kwargs`` (``ref_logp``, ``importance_sampling_ratio``,
    ``num_items_in_batch``, ``loss_mask``). Masked tokens pass no gradient to their log-probs: the reference's
    backward can be NaN there (a zero gradient times an overflowed ratio) and must not reach the chunks (as in
    ``fused_policy_loss``)."""

    cfg: LossConfig
    old_logp: torch.Tensor | None
    advantages: torch.Tensor
    mask: torch.Tensor
    kwargs: dict

    def __call__(self, logp, entropy=None):
        """``(loss, metrics)`` from ``logp`` (and ``entropy``), ``[B, T]`` or flat ``[B * T]`` fp32."""
        logp = logp.view(self.mask.shape)
        logp = torch.where(self.mask != 0, logp, logp.detach())
        entropy = None if entropy is None else entropy.view(self.mask.shape)
        return policy_loss_ref(self.cfg, logp, self.old_logp, self.advantages, self.mask, entropy=entropy,
                               **self.kwargs)

    def dlogp(self, logp):
        """fp32 ``dL/dlogp`` at ``logp`` (``[B * T]``), flat: the reference's own autograd."""
        with torch.enable_grad():
            probe = logp.detach().requires_grad_()
            (grad,) = torch.autograd.grad(self(probe)[0], probe)
        return grad


# ----------------------------------------------------------------------------- public API
def _check_linear_inputs(hidden, weight, bias, token_ids, temperature, scale, softcap, chunk_size) -> None:
    require_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    for name, value in (("scale", scale), ("softcap", softcap)):
        require_float(name, value, minimum=0.0, exclusive=True, allow_none=name == "softcap")
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    require_tensor("weight", weight, dtypes=(hidden.dtype,), ndim=(2,))
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) to match hidden {tuple(hidden.shape)}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        require_tensor("bias", bias, dtypes=(hidden.dtype,), ndim=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (one per vocab row of weight), "
                             f"got {tuple(bias.shape)}")
    require_positive_int("chunk_size", chunk_size)
    require_same_device("hidden", hidden, weight=weight, bias=bias)
    # token_ids, temperature and the vocab size, as for logits [..., V] (a zero-stride stand-in: no allocation)
    check_logits_and_ids(hidden[..., :1].expand(*hidden.shape[:-1], weight.shape[0]), token_ids, temperature,
                         vocab_of="weight")


def fused_linear_logprobs(hidden, weight, token_ids, *, bias=None, temperature=1.0, scale=1.0, softcap=None,
                          return_entropy=False, chunk_size=DEFAULT_CHUNK_SIZE, backend="auto"):
    """Per-token log-probs of ``token_ids`` under ``softmax(head(hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[B, T, H]`` or ``[N, H]`` last hidden states (fp32 / bf16 / fp16), the policy's output
            aligned with ``token_ids`` (position ``t`` predicts token ``t``).
        weight: ``[V, H]`` lm_head weight, same dtype (the effective one of a wrapped head, e.g. LoRA merged:
            :func:`gfpo_fast.lm_head.lm_head_of`); a DTensor is gathered; bias: optional ``[V]``.
        token_ids: ``[B, T]`` / ``[N]`` int64/int32 ids in ``[0, V)``.
        temperature: > 0; the model's logits are divided by it.
        scale: > 0, the model's logit scale (``head(l) = scale * l``); softcap: None or > 0, final-logit
            soft-capping (``head(l) = softcap * tanh(scale * l / softcap)``), both in float32.
        return_entropy: also return the (differentiable) entropies.
        chunk_size: tokens projected at a time; the peak extra memory is one ``[chunk_size, V]`` block.
        backend: of the per-chunk log-probs, as in :func:`gfpo_fast.token_logprobs` (``"auto"``: Triton on CUDA).

    Returns:
        fp32 ``logp`` shaped like ``token_ids`` (or ``(logp, entropy)``), with autograd to ``hidden``, ``weight``
        and ``bias``. Equivalent to ``token_logprobs(head_transform_ref(F.linear(hidden, weight, bias), scale,
        softcap), token_ids, ...)`` (:func:`fused_linear_logprobs_ref`) without the ``[N, V]`` logits.
    """
    return _linear_logprobs(hidden, weight, token_ids, bias, temperature, scale, softcap, return_entropy, chunk_size,
                            backend, None)


def gather_full(x: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor (an FSDP2-sharded parameter) gathered whole, its gradient reduce-scattered back averaged over
    the mesh (see the module docstring); any other tensor as it is."""
    if x is None or not torch.distributed.is_available():
        return x
    from torch.distributed.tensor import DTensor, Partial
    if not isinstance(x, DTensor):
        return x
    return x.full_tensor(grad_placements=[Partial("avg")] * len(x.placements))


def _prepare(hidden, weight, bias, token_ids, temperature, scale, softcap, chunk_size, backend):
    """Gathers a DTensor weight / bias, validates, and picks the per-chunk log-prob backend: ``(weight, bias,
    head)`` with ``head`` a :class:`ChunkHead`."""
    weight, bias = gather_full(weight), gather_full(bias)
    _check_linear_inputs(hidden, weight, bias, token_ids, temperature, scale, softcap, chunk_size)
    # The op is a chunk loop around token_logprobs: the backend is that of the per-chunk log-probs.
    impl = backends.select("token_logprobs", backend, hidden.device)
    fast = None if impl == "torch" else backends.launchers(impl, "logprobs")  # None: the torch reference per chunk
    return weight, bias, ChunkHead(fast, float(temperature), float(scale), None if softcap is None else float(softcap))


def _linear_logprobs(hidden, weight, token_ids, bias, temperature, scale, softcap, return_entropy, chunk_size, backend,
                     active):
    """:func:`fused_linear_logprobs`, skipping the chunks without an active token when ``active``
    (bool, shaped like ``token_ids``) is given."""
    weight, bias, head = _prepare(hidden, weight, bias, token_ids, temperature, scale, softcap, chunk_size, backend)
    out = FusedLinearLogprobsFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, token_ids.reshape(-1),
                                            head, bool(return_entropy), chunk_size,
                                            None if active is None else active.reshape(-1))
    if return_entropy:
        return out[0].view(token_ids.shape), out[1].view(token_ids.shape)
    return out.view(token_ids.shape)


def _requires_grad(*xs) -> bool:
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


def fused_linear_policy_loss(hidden, weight, token_ids, old_logp, advantages, mask, *, bias=None, temperature=1.0,
                             scale=1.0, softcap=None, ref_logp=None, importance_sampling_ratio=None,
                             num_items_in_batch=None, return_entropy=False, loss_mask=None,
                             chunk_size=DEFAULT_CHUNK_SIZE, backend="auto", **loss_kwargs):
    """GRPO-family loss from hidden states ``[B, T, H]`` and the lm_head weight ``[V, H]``, logits never whole.

    Takes the tensors and keywords of :func:`gfpo_fast.policy_loss` (``old_logp``, ``advantages``, ``mask``,
    ``algorithm``, ``loss_type``, ``epsilon``, ``beta``, ``ref_logp``, ...) plus ``bias``, ``temperature``,
    ``scale``, ``softcap``, ``return_entropy`` (the ``entropy`` metric, from the same pass), ``loss_mask`` (TRL's
    entropy mask, as in :func:`gfpo_fast.policy_loss`: a fixed ``[B, T]`` factor, so both paths stay exact),
    ``chunk_size`` and ``backend`` of :func:`fused_linear_logprobs`. Returns ``(loss, metrics)`` with gradients
    to ``hidden``, ``weight`` and ``bias``, equal to :func:`gfpo_fast.fused_policy_loss` on the model's logits
    (``F.linear(hidden, weight, bias)`` through the head transform)
    (:func:`fused_linear_policy_loss_ref`). Chunks whose tokens are all masked are not computed (zero
    gradient to their hidden states).

    Two paths, same values and gradients (module docstring):

    * **grad in forward** (``6 N H V`` FLOPs, no logits recompute) when the loss is token-separable
      (:func:`gfpo_fast.policy_loss.token_separable`): with ``old_logp`` (off policy) ``algorithm="grpo"`` at
      ``importance_sampling_level="token"`` with a loss type registered ``token_separable`` (all but ``vespo``); on
      policy (``old_logp=None``) every algorithm, level and loss type (GRPO, DAPO, ..., GSPO, GSPO-token, GMPO,
      VESPO), with or without the KL, except GSPO with ``beta > 0`` and ``use_bias_correction_kl``. It also needs
      autograd on (grad mode, and ``hidden``, ``weight`` or ``bias`` requiring gradients) and no gradient wanted by
      the loss's other tensors.
      The fp32 ``[V, H]`` weight gradient, the ``[N, H]`` hidden gradient and the fp32 ``[V]`` bias gradient
      are held from the forward to the backward, which scales them in place: one backward per forward.
    * **recompute** (``8 N H V``) otherwise: off-policy GSPO, GSPO-token, GMPO and VESPO, GSPO's bias-corrected
      KL, and any call without gradients to the hidden states or the head.
    """
    cfg = loss_config_from("fused_linear_policy_loss", loss_kwargs)
    require_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=(3,))
    kwargs = dict(ref_logp=ref_logp, importance_sampling_ratio=importance_sampling_ratio,
                  num_items_in_batch=num_items_in_batch, loss_mask=loss_mask)
    check_loss_inputs(cfg, hidden[..., 0], old_logp, advantages, mask, source="hidden", **kwargs)
    loss = PolicyLoss(cfg, old_logp, advantages, mask, kwargs)
    # Masked tokens' log-probs never reach the loss (policy_loss_ref zeroes them with masked()), so chunks
    # made only of them are skipped.
    active = mask != 0
    if (torch.is_grad_enabled() and token_separable(cfg, on_policy=old_logp is None)
            and _requires_grad(hidden, weight, bias)
            and not _requires_grad(old_logp, advantages, mask, *kwargs.values())):
        weight, bias, head = _prepare(hidden, weight, bias, token_ids, temperature, scale, softcap, chunk_size,
                                      backend)
        return FusedLinearLossGradFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                                 token_ids.reshape(-1), head, bool(return_entropy), chunk_size,
                                                 active.reshape(-1), loss)
    out = _linear_logprobs(hidden, weight, token_ids, bias, temperature, scale, softcap, return_entropy, chunk_size,
                           backend, active)
    logp, entropy = out if return_entropy else (out, None)
    return loss(logp, entropy)
