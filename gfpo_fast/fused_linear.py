"""Log-probs and the policy loss from hidden states and the lm_head weight, one chunk of tokens at a time.

``logits = hidden @ weight.T + bias`` is never held whole: each chunk of ``C = chunk_size`` tokens is
projected (one GEMM), reduced by a backend's forward log-prob launcher (:func:`gfpo_fast.logprobs.launchers`:
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

Shapes and dtypes: ``hidden`` ``[B, T, H]`` or ``[N, H]``, ``weight`` ``[V, H]`` and ``bias`` ``[V]`` in
the hidden dtype (fp32 / bf16 / fp16); ``token_ids`` ``[B, T]`` / ``[N]``; ``logp`` / ``entropy`` fp32
shaped like ``token_ids``; gradients in their inputs' dtypes.

Cost: 4 GEMMs of ``2 N V H`` FLOPs (forward, recomputed forward, two backward) instead of 3: the
recompute is the price of never storing ``[N, V]``. Peak extra memory: one ``[C, V]`` logits chunk,
the fp32 ``[V, H]`` weight-gradient accumulator (plus one ``[V, H]`` product in the weight dtype per
chunk when that is not fp32) and O(N). Memory traffic of the log-prob part per logit: 2 bytes read
forward, 2 read + 2 written backward, as in ``kernels/logprobs.py``, on a chunk that is still in L2 for
small chunks.

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

Backends: ``"triton"`` (CUDA, or the CPU interpreter) and ``"cpp"`` (CPU) run the same chunk loop over their
launchers; ``"torch"`` runs each chunk through the reference log-probs and, in backward, through autograd
(the forward recomputed), still one chunk at a time. Triton is imported only when its backend runs, so
``gfpo_fast`` imports without it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import backends
from ._checks import FLOAT_DTYPES, require_float, require_positive_int, require_same_device, require_tensor
from .logprobs import check_logits_and_ids, launchers, token_logprobs_ref
from .policy_loss import check_loss_inputs, loss_config_from, policy_loss_ref

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
def _chunks(n: int, chunk_size: int, active: torch.Tensor | None = None):
    """Token slices of at most ``chunk_size``; with ``active`` (bool ``[n]``) only those holding an active token."""
    chunks = [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    if active is None or not chunks:
        return chunks
    # One host synchronisation for all chunks: which hold any active token.
    padded = F.pad(active, (0, len(chunks) * chunk_size - n)).view(len(chunks), chunk_size)
    return [rows for rows, keep in zip(chunks, padded.any(1).tolist()) if keep]


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """Autograd over ``[N, H]`` hidden states; saves the inputs and the fp32 per-token ``lse`` / entropy only.

    ``fast``: a backend's log-prob launchers (:func:`gfpo_fast.logprobs.launchers`), or None for the torch
    reference per chunk (whose backward recomputes the chunk's forward through autograd). ``scale`` (float) and
    ``softcap`` (float or None): the head transform, applied by the launchers (or :func:`head_transform_ref`).

    ``active`` (bool ``[N]`` or None): chunks without an active token are skipped, forward (outputs 0) and
    backward (zero gradient, whatever ``dlogp`` says there); for a loss that ignores inactive tokens.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, temperature, scale, softcap, return_entropy, chunk_size, fast,
                active):
        N = hidden.shape[0]
        chunks = _chunks(N, chunk_size, active)
        skipping = sum(rows.stop - rows.start for rows in chunks) < N
        # zeros, not empty, when chunks are skipped: their outputs must be finite for the loss's masking
        alloc = torch.zeros if skipping else torch.empty
        logp = alloc(N, dtype=torch.float32, device=hidden.device)
        lse = None if fast is None else alloc(N, dtype=torch.float32, device=hidden.device)
        entropy = alloc(N, dtype=torch.float32, device=hidden.device) if return_entropy else None
        for rows in chunks:
            logits = F.linear(hidden[rows], weight, bias)  # [C, V], the only vocab-sized buffer
            if fast is not None:
                logp[rows], lse[rows], ent = fast.token_logprobs_forward(logits, token_ids[rows], temperature,
                                                                         return_entropy, scale=scale, softcap=softcap)
            else:
                out = token_logprobs_ref(head_transform_ref(logits, scale, softcap), token_ids[rows],
                                         temperature=temperature, return_entropy=return_entropy)
                logp[rows], ent = out if return_entropy else (out, None)
            if return_entropy:
                entropy[rows] = ent
        ctx.save_for_backward(hidden, weight, bias, token_ids, lse, entropy)
        ctx.temperature, ctx.scale, ctx.softcap = temperature, scale, softcap
        ctx.fast, ctx.chunks, ctx.skipping = fast, chunks, skipping
        ctx.set_materialize_grads(False)
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, dlogp, dentropy=None):
        hidden, weight, bias, token_ids, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if dlogp is None and dentropy is None:
            return (None,) * 11
        if dlogp is None:
            dlogp = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        # Skipped chunks' rows of the hidden gradient are never written: they start at zero.
        alloc_hidden = torch.zeros if ctx.skipping else torch.empty
        grad_hidden = alloc_hidden(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        for rows in ctx.chunks:
            h = hidden[rows]
            dlogits = _chunk_dlogits(ctx, F.linear(h, weight, bias), token_ids[rows], lse, entropy, dlogp, dentropy,
                                     rows)
            if need_hidden:
                torch.mm(dlogits, weight, out=grad_hidden[rows])
            if need_weight:
                if dlogits.dtype == torch.float32:
                    grad_weight.addmm_(dlogits.t(), h)
                else:  # the product in the low dtype (fp32 accumulation inside the GEMM), summed in fp32
                    grad_weight.add_(dlogits.t() @ h)
            if need_bias:
                grad_bias.add_(dlogits.sum(0, dtype=torch.float32))
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype)) + (None,) * 8


def _chunk_dlogits(ctx, logits, ids, lse, entropy, dlogp, dentropy, rows):
    """dL/dlogits of one chunk: from the saved ``lse`` and written over ``logits`` by a backend's launcher, or
    on the torch path through autograd over the reference (its forward recomputed)."""
    dent = None if dentropy is None else dentropy[rows]
    if ctx.fast is not None:
        return ctx.fast.token_logprobs_backward(logits, ids, lse[rows], dlogp[rows], ctx.temperature,
                                                entropy=None if dent is None else entropy[rows], dentropy=dent,
                                                inplace=True, scale=ctx.scale, softcap=ctx.softcap)
    with torch.enable_grad():
        z = logits.requires_grad_()
        out = token_logprobs_ref(head_transform_ref(z, ctx.scale, ctx.softcap), ids, temperature=ctx.temperature,
                                 return_entropy=dent is not None)
        outputs, grads = ((out[0], out[1]), (dlogp[rows], dent)) if dent is not None else ((out,), (dlogp[rows],))
        (dlogits,) = torch.autograd.grad(outputs, z, grads)
    return dlogits


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


def _linear_logprobs(hidden, weight, token_ids, bias, temperature, scale, softcap, return_entropy, chunk_size, backend,
                     active):
    """:func:`fused_linear_logprobs`, skipping the chunks without an active token when ``active``
    (bool, shaped like ``token_ids``) is given."""
    weight, bias = gather_full(weight), gather_full(bias)
    _check_linear_inputs(hidden, weight, bias, token_ids, temperature, scale, softcap, chunk_size)
    # The op is a chunk loop around token_logprobs: the backend is that of the per-chunk log-probs.
    impl = backends.select("token_logprobs", backend, hidden.device)
    fast = None if impl == "torch" else launchers(impl)  # None: the torch reference per chunk
    softcap = None if softcap is None else float(softcap)
    out = FusedLinearLogprobsFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, token_ids.reshape(-1),
                                            float(temperature), float(scale), softcap, bool(return_entropy),
                                            chunk_size, fast, None if active is None else active.reshape(-1))
    if return_entropy:
        return out[0].view(token_ids.shape), out[1].view(token_ids.shape)
    return out.view(token_ids.shape)


def fused_linear_policy_loss(hidden, weight, token_ids, old_logp, advantages, mask, *, bias=None, temperature=1.0,
                             scale=1.0, softcap=None, ref_logp=None, importance_sampling_ratio=None,
                             num_items_in_batch=None, return_entropy=False, chunk_size=DEFAULT_CHUNK_SIZE,
                             backend="auto", **loss_kwargs):
    """GRPO-family loss from hidden states ``[B, T, H]`` and the lm_head weight ``[V, H]``, logits never whole.

    Takes the tensors and keywords of :func:`gfpo_fast.policy_loss` (``old_logp``, ``advantages``, ``mask``,
    ``algorithm``, ``loss_type``, ``epsilon``, ``beta``, ``ref_logp``, ...) plus ``bias``, ``temperature``,
    ``scale``, ``softcap``, ``return_entropy`` (the ``entropy`` metric, from the same pass), ``chunk_size`` and
    ``backend`` of :func:`fused_linear_logprobs`. Returns ``(loss, metrics)`` with gradients to ``hidden``,
    ``weight`` and ``bias``, equal to :func:`gfpo_fast.fused_policy_loss` on the model's logits
    (``F.linear(hidden, weight, bias)`` through the head transform)
    (:func:`fused_linear_policy_loss_ref`). Chunks whose tokens are all masked are not computed (zero
    gradient to their hidden states).
    """
    cfg = loss_config_from("fused_linear_policy_loss", loss_kwargs)
    require_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=(3,))
    kwargs = dict(ref_logp=ref_logp, importance_sampling_ratio=importance_sampling_ratio,
                  num_items_in_batch=num_items_in_batch)
    check_loss_inputs(cfg, hidden[..., 0], old_logp, advantages, mask, source="hidden", **kwargs)
    # Masked tokens' log-probs never reach the loss (policy_loss_ref zeroes them with masked()), so chunks
    # made only of them are skipped.
    out = _linear_logprobs(hidden, weight, token_ids, bias, temperature, scale, softcap, return_entropy, chunk_size,
                           backend, mask != 0)
    logp, entropy = out if return_entropy else (out, None)
    # Masked tokens pass no gradient to the chunks: the reference's backward can be NaN there (a zero
    # gradient times an overflowed ratio), and must not reach dhidden / dweight (as in fused_policy_loss).
    logp = torch.where(mask != 0, logp, logp.detach())
    return policy_loss_ref(cfg, logp, old_logp, advantages, mask, entropy=entropy, **kwargs)
