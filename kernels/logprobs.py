"""Per-token log-probs (and entropies) of chosen tokens, straight from the logits, in Triton.

For each of the ``N = B*T`` rows, with ``z = logits * scale / temperature`` (TRL divides by the sampling
temperature, docs/semantics.md section 2; ``scale`` is a model's logit scale, 1 for most), or, with
final-logit soft-capping (Gemma 2/3), ``z = softcap * tanh(scale * logits / softcap) / temperature``::

    lse[n]     = log sum_v exp(z[n, v])                      (online max / sum over vocab tiles, fp32)
    logp[n]    = z[n, y_n] - lse[n]
    entropy[n] = lse[n] - sum_v softmax(z[n])_v z[n, v]
    dlogits[n, v] = ( dlogp[n] (1[v = y_n] - p_v) - dentropy[n] p_v (z_v - lse + entropy) ) * dz_v/dlogits_v
    dz_v/dlogits_v = scale / temperature   (soft-capped: times 1 - tanh^2(scale * logits_v / softcap))

The kernels take ``z_scale = scale / temperature`` and ``z_cap = softcap / temperature``, so that
``z = z_cap * tanh(logits * z_scale / z_cap)``; the soft-cap is recomputed from the logits in both passes (one
exponential per logit, :func:`_softcap`), so nothing transformed is ever stored.

Non-finite ``z`` follow docs/semantics.md section 2.4, as the torch reference: ``-inf`` is probability 0 (no NaN
from it, in the entropy either); a row with a NaN or ``+inf`` ``z``, or only ``-inf`` ones, gets NaN ``logp`` and
entropy and a non-finite ``lse`` from the forward's own arithmetic, and the backward, which tests ``lse`` once
per row, writes it a zero gradient row.

Shapes and dtypes: ``logits`` ``[B, T, V]`` or ``[N, V]``, fp32 / bf16 / fp16, any row strides (for
example the ``[:, :-1]`` slice of a model's output), vocab stride 1 (otherwise one copy is made);
``token_ids`` ``[B, T]`` / ``[N]`` int64 or int32, any strides; ``logp``, ``entropy`` and the saved
``lse`` are fp32 and shaped like ``token_ids``; the logits gradient has the logits' dtype and shape.

Memory traffic per logit (bf16, 2 bytes): the torch reference reads the logits and writes and reads
fp32 copies of them several times (``.float()``, ``/ temperature``, ``logsumexp``, and in backward
softmax, the gather's scatter, the sum and the cast back): about 60 bytes forward + backward. These
kernels read each logit once in forward (2 bytes) and read it once and write its gradient once in
backward (4 bytes): 6 bytes, a ~10x smaller floor; per-row extras (lse, logp, entropy) are O(N).
Rows the caller marks inactive (the fused loss's masked tokens: padding, GFPO's dropped rows) are not
read in forward, and rows with a zero incoming gradient are not read in backward, only zero-filled:
2 bytes written per logit.
Nothing of size [N, V] is allocated except the gradient itself, and not even that with ``inplace``.

Soft-capping adds compute, not traffic: one more exponential and a division per logit in each pass (the
bytes above are unchanged).

Run-time arguments, never constants: N, T, V, the row strides, the temperature, the scale and the cap, so a
new batch shape, temperature or model reuses the compiled kernel; only soft-capping on or off is a
compile-time flag (``HAS_SOFTCAP``). Sizes that change every step are excluded from Triton's integer
specialisation with ``do_not_specialize``. The grid is 1-D over rows, so any
number of rows (> 65,535) works, and row offsets are computed in int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gfpo_fast._checks import require_row_mask

from ._launch import device_guard, eager_launch, vocab_tile

# Sizes that change with the batch shape every step: T, and the batch strides that are multiples
# of T. Triton would otherwise specialise them on "== 1" and "divisible by 16", i.e. compile up to
# three variants as T changes. The vocab-sized strides stay specialised: they are fixed per model
# and their alignment lets the compiler vectorise the tile loads.
_RUNTIME_SIZES = ["stride_lb", "stride_ib", "T"]
_LOWEST = tl.constexpr(-3.4028234663852886e38)  # the most negative float32: stands in for -inf where 0 * -inf is NaN


@triton.jit
def _softcap(y, cap):
    """``cap * tanh(y / cap)`` and its derivative ``1 - tanh^2(y / cap)``, fp32, from one exponential
    ``e = exp(-2 |y| / cap)``: ``tanh = sign(y) (1 - e) / (1 + e)`` and ``1 - tanh^2 = 4 e / (1 + e)^2``
    (portable: no libdevice tanh, so it also runs on AMD and the interpreter). Absolute error of the value
    about ``cap * 2^-23`` (``1 - e`` cancels for small ``|y|``); ``+-inf`` gives ``+-cap``, as torch.tanh does."""
    e = tl.exp(-2.0 * tl.abs(y) / cap)
    inv = 1.0 / (1.0 + e)
    t = (1.0 - e) * inv
    return tl.where(y < 0, -t, t) * cap, 4.0 * e * inv * inv


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _token_logprobs_fwd_kernel(
    logits_ptr, ids_ptr, active_ptr, logp_ptr, lse_ptr, entropy_ptr,  # pointers; active, outputs contiguous [N]
    stride_lb, stride_lt, stride_ib, stride_it,  # strides (elements) of logits / token_ids over (b, t)
    T, V,  # runtime sizes: completion length (row r is (r // T, r % T)), vocab
    z_scale, z_cap,  # runtime fp32 scalars (scale / temperature, softcap / temperature): no recompile per value
    BLOCK_V: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,  # read active_ptr (uint8 [N]); rows where it is 0 are skipped
    HAS_SOFTCAP: tl.constexpr,  # z = z_cap * tanh(logits * z_scale / z_cap); z_cap is not read otherwise
):
    row = tl.program_id(0).to(tl.int64)  # int64 so that b * stride_lb cannot overflow past 2^31 elements
    if HAS_ACTIVE:
        if tl.load(active_ptr + row) == 0:
            # A masked token (padding, a GFPO-dropped row): its log-prob is never used, so neither its
            # logits nor its id are read; zeros keep the outputs finite.
            tl.store(logp_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if HAS_ENTROPY:
                tl.store(entropy_ptr + row, 0.0)
            return
    b = row // T
    t = row - b * T
    x_row = logits_ptr + b * stride_lb + t * stride_lt
    target = tl.load(ids_ptr + b * stride_ib + t * stride_it).to(tl.int64)
    # An id outside [0, V) is never dereferenced: its log-prob is NaN (the public ops reject such ids first).
    target_ok = (target >= 0) & (target < V)

    # Online softmax (Milakov & Gimelshein 2018): m = running max of z, d = sum exp(z - m), and for
    # the entropy s = sum exp(z - m) z; each tile rescales the running sums by exp(m_old - m_new).
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_vocab = offs < V
        z = tl.load(x_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32) * z_scale
        if HAS_SOFTCAP:
            z = tl.where(in_vocab, _softcap(z, z_cap)[0], float("-inf"))  # the lanes past V stay -inf, not -cap
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # A finite shift while every logit so far is -inf (a masked vocab range), else -inf - -inf = NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - shift)
        e = tl.exp(z - shift)  # 0 on the lanes past V
        d = d * scale + tl.sum(e, axis=0)
        if HAS_ENTROPY:
            # -inf (banned tokens, the lanes past V) as the most negative float: e = 0 there, and 0 * -inf = NaN
            s = s * scale + tl.sum(e * tl.maximum(z, _LOWEST), axis=0)
        m = m_new
    # Bad rows (docs/semantics.md 2.4) need no test here: a NaN or +inf z makes d, so lse, logp and the entropy
    # NaN (e = exp(NaN) even where tl.max drops a NaN), and a row of -inf gives d = 0, lse = -inf and NaN logp and
    # entropy (-inf - -inf, 0 / 0). So lse is finite exactly on the good rows, which is the backward's test.
    lse = m + tl.log(d)
    z_target = tl.load(x_row + target, mask=target_ok, other=float("nan")).to(tl.float32) * z_scale
    if HAS_SOFTCAP:
        z_target = _softcap(z_target, z_cap)[0]
    tl.store(logp_ptr + row, z_target - lse)
    tl.store(lse_ptr + row, lse)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, lse - s / d)


@triton.jit(do_not_specialize=["stride_gb"] + _RUNTIME_SIZES)
def _token_logprobs_bwd_kernel(
    grad_ptr, logits_ptr, ids_ptr, lse_ptr, dlogp_ptr, entropy_ptr, dentropy_ptr,  # pointers; per-row ones [N] fp32
    stride_gb, stride_gt, stride_lb, stride_lt, stride_ib, stride_it,  # strides of grad / logits / token_ids
    T, V,  # runtime sizes
    z_scale, z_cap,  # runtime fp32 scalars, as in the forward
    BLOCK_V: tl.constexpr,
    HAS_DENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    x_row = logits_ptr + b * stride_lb + t * stride_lt
    g_row = grad_ptr + b * stride_gb + t * stride_gt
    g = tl.load(dlogp_ptr + row)
    lse = tl.load(lse_ptr + row)
    skip = g == 0.0
    if HAS_DENTROPY:
        gh = tl.load(dentropy_ptr + row)
        # dH/dz_v = -p_v (log p_v + H) = -p_v (z_v + c) with c = H - lse
        c = tl.load(entropy_ptr + row) - lse
        skip = skip & (gh == 0.0)
    # A bad row of the forward (lse not finite, docs/semantics.md 2.4) gets a zero gradient whatever g and gh are.
    skip = skip | ~(tl.abs(lse) < float("inf"))
    if skip:
        # Masked tokens, GFPO's dropped rows, bad rows: no read of the logits, only zeros written.
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            tl.store(g_row + offs, tl.zeros((BLOCK_V,), tl.float32).to(grad_ptr.dtype.element_ty), mask=offs < V)
    else:
        target = tl.load(ids_ptr + b * stride_ib + t * stride_it).to(tl.int64)
        # An id outside [0, V) has no one-hot lane: its row gets NaN rather than a silently wrong gradient.
        onehot_off = tl.where((target >= 0) & (target < V), 0.0, float("nan"))
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_vocab = offs < V
            z = tl.load(x_row + offs, mask=in_vocab, other=0.0).to(tl.float32) * z_scale
            if HAS_SOFTCAP:
                z, slope = _softcap(z, z_cap)  # slope = dz / d(logits * z_scale)
            p = tl.exp(z - lse)  # softmax recomputed from the saved lse: nothing [N, V] was kept
            # (onehot - p) in fp32: for the target lane 1 - p stays exact enough even when p -> 1.
            dz = g * (tl.where(offs == target, 1.0, onehot_off) - p)
            if HAS_DENTROPY:
                dz -= gh * p * tl.maximum(z + c, _LOWEST)  # a -inf logit: p = 0, and 0 * -inf = NaN
            # Each tile is read before it is written, so grad_ptr may alias logits_ptr (inplace).
            dx = dz * z_scale
            if HAS_SOFTCAP:
                dx *= slope
            tl.store(g_row + offs, dx.to(grad_ptr.dtype.element_ty), mask=in_vocab)


def _z_transform(temperature: float, scale: float, softcap: float | None) -> tuple[float, float]:
    """The kernels' ``(z_scale, z_cap)``; ``z_cap`` is a stand-in 1.0 (never read) without soft-capping."""
    return scale / temperature, 1.0 if softcap is None else softcap / temperature


def _as_rows(logits: torch.Tensor, token_ids: torch.Tensor):
    """[B, T, V] / [B, T] views of the inputs (a 2-D [N, V] input becomes B = 1), vocab stride 1."""
    if logits.dim() == 2:
        logits, token_ids = logits.unsqueeze(0), token_ids.unsqueeze(0)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits, token_ids


@eager_launch
def token_logprobs_forward(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, return_entropy: bool,
                           active: torch.Tensor | None = None, *, scale: float = 1.0, softcap: float | None = None):
    """Launches the forward kernel. Returns fp32 ``(logp, lse, entropy or None)`` shaped like ``token_ids``.

    The launcher contract shared with the C++ backend (``gfpo_fast/cpu/logprobs.py``), driven by
    :class:`gfpo_fast.logprobs.TokenLogprobsFunction`: ``logits`` ``[B, T, V]`` / ``[N, V]`` (no autograd),
    ``token_ids`` shaped ``logits.shape[:-1]``; an id outside ``[0, V)`` is never dereferenced and gives a
    NaN log-prob (the public ops raise before they launch). ``active``: optional bool tensor shaped like
    ``token_ids``; rows where it is False read nothing (neither logits nor id) and get
    ``logp = lse = entropy = 0`` (for a loss that ignores them). None: every row is computed. ``scale`` and
    ``softcap`` (> 0, or None): the distribution is ``softmax(softcap * tanh(scale * logits / softcap) /
    temperature)``, or ``softmax(scale * logits / temperature)`` without a cap (a model's logit transform).
    """
    x, ids = _as_rows(logits, token_ids)
    if active is not None:
        require_row_mask("active", active, token_ids.shape)
        active = active.contiguous().view(torch.uint8)  # one byte per row, 0 or 1, indexed by row
    B, T, V = x.shape
    logp = torch.empty(token_ids.shape, dtype=torch.float32, device=x.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else None
    block_v, num_warps = vocab_tile(V, x.device)
    if B * T > 0:
        with device_guard(x):
            _token_logprobs_fwd_kernel[(B * T,)](
                # unused pointers (no active mask, no entropy) are stand-ins the kernel never reads
                x, ids, ids if active is None else active, logp, lse, entropy if return_entropy else logp,
                x.stride(0), x.stride(1), ids.stride(0), ids.stride(1),
                T, V,
                *_z_transform(temperature, scale, softcap),
                BLOCK_V=block_v, HAS_ENTROPY=return_entropy, HAS_ACTIVE=active is not None,
                HAS_SOFTCAP=softcap is not None, num_warps=num_warps,
            )
    return logp, lse, entropy


@eager_launch
def token_logprobs_backward(logits, token_ids, lse, dlogp, temperature, *, entropy=None, dentropy=None,
                            inplace=False, scale=1.0, softcap=None) -> torch.Tensor:
    """dL/dlogits from ``dlogp`` (and ``dentropy``), fp32 shaped like ``token_ids`` (None counts as zeros),
    with the ``lse`` (and ``entropy``) of the forward launcher, which took the same ``temperature``, ``scale``
    and ``softcap`` (their chain-rule factor is applied); shared contract with the C++ backend.

    ``inplace=True`` writes the gradient over ``logits`` and returns it (the caller must not need
    the logits afterwards; a strided vocab is first copied, and the copy is written); otherwise a new
    tensor of the logits' shape and dtype is returned. Rows whose ``dlogp`` (and ``dentropy``) is 0, and rows
    whose ``lse`` is not finite (the forward's bad rows), get a zero gradient without reading their logits or
    id; any other row with an id outside ``[0, V)`` gets NaN.
    """
    x, ids = _as_rows(logits, token_ids)
    B, T, V = x.shape
    grad = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    has_dentropy = dentropy is not None
    dlogp = torch.zeros_like(lse) if dlogp is None else dlogp.float().contiguous()
    if has_dentropy:
        dentropy = dentropy.float().contiguous()
    block_v, num_warps = vocab_tile(V, x.device)
    if B * T > 0:
        with device_guard(x):
            _token_logprobs_bwd_kernel[(B * T,)](
                grad, x, ids, lse, dlogp, entropy if has_dentropy else lse, dentropy if has_dentropy else dlogp,
                grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), ids.stride(0), ids.stride(1),
                T, V,
                *_z_transform(temperature, scale, softcap),
                BLOCK_V=block_v, HAS_DENTROPY=has_dentropy, HAS_SOFTCAP=softcap is not None, num_warps=num_warps,
            )
    return grad.view(logits.shape) if logits.dim() == 2 else grad
