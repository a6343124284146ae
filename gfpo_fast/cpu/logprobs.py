"""C++ per-token log-probs and entropies (``csrc/logprobs.cpp``) with autograd; oracle: ``gfpo_fast.logprobs``.

Forward: one pass over each logits row (online logsumexp) writes ``logp``, ``lse`` and optionally the
entropy, all ``[N]`` float32 (the fused loss passes its mask so that masked tokens are not read at all).
Backward: one pass over each row writes ``dL/dlogits`` in the logits
dtype, recomputing the softmax from the saved ``lse``; no float32 ``[N, V]`` temporary exists besides
the gradient itself (for float32 logits), and not even that with ``inplace``. Rows whose incoming
gradient is zero are only zero-filled.

Zero-copy: the kernels take the logits' row strides, so any ``[N, V]`` or ``[B, T, V]`` view whose vocab
dimension is contiguous is read in place (``logits[:, :-1]``, as TRL slices them, included). Copies
are made, through autograd, only for a strided vocab dimension (``.contiguous()``) and for float16
logits (upcast to float32: the kernels read float32 and bfloat16).

The entropy carries a gradient, as in the torch reference (TRL's entropy bonus needs it):
``dH/dz_v = -p_v (log p_v + H)``. The thread count is ``torch.get_num_threads()``; each row is reduced
by one thread, so results are bitwise the same for any thread count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .. import _C

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # csrc/logprobs.h LogitsDtype


def kernel_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as the kernels can read it (float32/bfloat16, vocab stride 1), copying only if needed.

    Differentiable: a copy made here sends its gradient back to ``logits`` through autograd.
    """
    if logits.dtype not in DTYPE_CODES:
        logits = logits.float()  # float16: no half kernels; a float32 copy
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits


def token_ids_flat(token_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, T] or [N] ids -> [N] contiguous int64; raises if an id is outside [0, vocab) (the kernel would read out of bounds)."""
    ids = token_ids.detach().reshape(-1).to(torch.int64).contiguous()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"token_ids must lie in [0, {vocab}) (the vocab size of logits), "
                         f"got values in [{int(ids.min())}, {int(ids.max())}]")
    return ids


@dataclass(frozen=True)
class LogitRows:
    """Logits ``[N, V]`` or ``[B, T, V]`` (from :func:`kernel_logits`) as the C++ row layout.

    Row ``n`` starts at element ``(n // inner) * stride_outer + (n % inner) * stride_inner``.
    """

    tensor: torch.Tensor
    n_rows: int
    inner: int
    stride_outer: int
    stride_inner: int
    vocab: int

    @classmethod
    def of(cls, logits: torch.Tensor) -> "LogitRows":
        if logits.dim() == 3:
            B, T, V = logits.shape
            return cls(logits, B * T, T, logits.stride(0), logits.stride(1), V)
        N, V = logits.shape
        return cls(logits, N, 1, logits.stride(0), 0, V)

    def args(self) -> tuple:
        return (self.tensor.data_ptr(), DTYPE_CODES[self.tensor.dtype], self.n_rows, self.inner, self.stride_outer,
                self.stride_inner, self.vocab)


def _address(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def rows_forward(rows: LogitRows, ids: torch.Tensor, inv_temperature: float, with_entropy: bool,
                 active: torch.Tensor | None = None):
    """-> ``(logp, lse, entropy or None)``, each ``[N]`` float32.

    ``active``: optional ``[N]`` contiguous bool; rows where it is False are not read (neither logits nor
    id) and get ``logp = lse = entropy = 0``. None: every row is computed.
    """
    logp = torch.empty(rows.n_rows, dtype=torch.float32)
    lse = torch.empty(rows.n_rows, dtype=torch.float32)
    entropy = torch.empty(rows.n_rows, dtype=torch.float32) if with_entropy else None
    if active is not None and (active.dtype != torch.bool or active.numel() != rows.n_rows
                               or not active.is_contiguous()):
        raise ValueError(f"active must be a contiguous bool tensor of {rows.n_rows} elements")
    # A bool tensor is one byte per element, 0 or 1: the kernel reads it as uint8.
    _C.logprobs_forward(*rows.args(), ids.data_ptr(), _address(active), inv_temperature, logp.data_ptr(),
                        lse.data_ptr(), _address(entropy), torch.get_num_threads())
    return logp, lse, entropy


def rows_backward(rows: LogitRows, ids, inv_temperature: float, lse, entropy=None, grad_logp=None,
                  grad_entropy=None, *, inplace: bool = False) -> torch.Tensor:
    """dL/dlogits shaped and typed like ``rows.tensor``, from ``[N]`` grads (None = zero).

    A new contiguous tensor, or with ``inplace`` ``rows.tensor`` itself, overwritten (each row is read
    before it is written; the caller must not need the logits afterwards).
    """
    grad_logp = None if grad_logp is None else grad_logp.detach().float().reshape(-1).contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.detach().float().reshape(-1).contiguous()
    grad = rows.tensor if inplace else torch.empty(rows.tensor.shape, dtype=rows.tensor.dtype)
    out = LogitRows.of(grad)
    _C.logprobs_backward(*rows.args(), ids.data_ptr(), inv_temperature, lse.data_ptr(), _address(entropy),
                         _address(grad_logp), _address(grad_entropy), grad.data_ptr(), out.inner, out.stride_outer,
                         out.stride_inner, torch.get_num_threads())
    return grad


class TokenLogprobsFunction(torch.autograd.Function):
    """``(logits, ids [N] int64, 1/temperature, return_entropy, inplace) -> logp`` or ``(logp, entropy)``,
    shaped ``logits.shape[:-1]``."""

    @staticmethod
    def forward(ctx, logits, ids, inv_temperature, return_entropy, inplace):
        rows = LogitRows.of(logits)
        logp, lse, entropy = rows_forward(rows, ids, inv_temperature, return_entropy)
        ctx.save_for_backward(logits, ids, lse, entropy)
        ctx.inv_temperature, ctx.inplace = inv_temperature, inplace
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None and costs nothing
        shape = logits.shape[:-1]
        return (logp.view(shape), entropy.view(shape)) if return_entropy else logp.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, ids, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        grad = rows_backward(LogitRows.of(logits), ids, ctx.inv_temperature, lse, entropy, grad_logp, grad_entropy,
                             inplace=ctx.inplace)
        return grad, None, None, None, None


def token_logprobs_cpp(logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0,
                       return_entropy: bool = False, inplace: bool = False):
    """C++ :func:`gfpo_fast.token_logprobs` for CPU tensors (inputs already validated by it).

    Args:
        logits: ``[B, T, V]`` or ``[N, V]`` float32, bfloat16 or float16 (float16 is upcast, a copy).
        token_ids: ``logits.shape[:-1]`` int64/int32 ids in ``[0, V)``.
        temperature: > 0; the kernels multiply by ``1 / temperature``.
        return_entropy: also return the entropies (with gradient).
        inplace: backward writes the gradient over ``logits`` (or over the copy made for float16 or a
            strided vocab) instead of allocating it; only when nothing needs the logits after backward.

    Returns:
        float32 ``logp`` shaped like ``token_ids``, or ``(logp, entropy)``; differentiable w.r.t. ``logits``.
    """
    x = kernel_logits(logits)
    ids = token_ids_flat(token_ids, x.shape[-1])
    return TokenLogprobsFunction.apply(x, ids, 1.0 / temperature, bool(return_entropy), bool(inplace))
