"""C++ launchers of the per-token log-probs and entropies (``csrc/logprobs.cpp``), with the signatures of the
Triton launchers in ``kernels/logprobs.py``; the one autograd layer over both is
:class:`gfpo_fast.logprobs.TokenLogprobsFunction`. Oracle: :func:`gfpo_fast.logprobs.token_logprobs_ref`.

Forward: one pass over each logits row (online logsumexp) writes ``logp``, ``lse`` and optionally the
entropy, all float32 shaped like ``token_ids`` (the fused loss passes ``active`` so that masked tokens are
not read at all). Backward: one pass over each row writes ``dL/dlogits`` in the logits dtype, recomputing
the softmax from the saved ``lse``; no float32 ``[N, V]`` temporary exists besides the gradient itself (for
float32 logits), and not even that with ``inplace``. Rows whose incoming gradient is zero are only
zero-filled. An id outside ``[0, V)`` is never dereferenced: its log-prob and gradient row are NaN (the
public ops raise before they launch). Non-finite logits follow docs/semantics.md section 2.4 like the torch
reference: ``-inf`` is probability 0; a row with a NaN or ``+inf`` (after the temperature), or only ``-inf``,
has NaN ``logp`` and entropy, a non-finite ``lse`` and a zero gradient row (the backward tests ``lse`` per row).

Zero-copy: the kernels take the logits' row strides, so any ``[N, V]`` or ``[B, T, V]`` view whose vocab
dimension is contiguous is read in place (``logits[:, :-1]``, as TRL slices them, included). Copies are made
only for a strided vocab dimension and for float16 logits (upcast to float32: the kernels read float32 and
bfloat16); the backward then computes the gradient in the copy and returns it in the logits dtype.

The thread count is ``torch.get_num_threads()``; each row is reduced by one thread, so results are bitwise
the same for any thread count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _C
from .._checks import require_row_mask

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # csrc/logprobs.h LogitsDtype


def kernel_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as the kernels can read it (float32/bfloat16, vocab stride 1), copying only if needed."""
    if logits.dtype not in DTYPE_CODES:
        logits = logits.float()  # float16: no half kernels; a float32 copy
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits


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
    def of(cls, logits: torch.Tensor) -> LogitRows:
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


def _flat(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``[N]`` contiguous ``dtype`` view or copy of a per-row tensor (None stays None)."""
    return None if x is None else x.detach().reshape(-1).to(dtype).contiguous()


def _z_transform(temperature: float, scale: float, softcap: float | None) -> tuple[float, float]:
    """``(z_scale, z_cap)`` of the kernels: ``z = z_cap tanh(logits z_scale / z_cap)`` (``z_cap`` 0: ``z = logits
    z_scale``), i.e. ``softcap tanh(scale logits / softcap) / temperature``."""
    return scale / temperature, 0.0 if softcap is None else softcap / temperature


def token_logprobs_forward(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, return_entropy: bool,
                           active: torch.Tensor | None = None, *, scale: float = 1.0, softcap: float | None = None):
    """Returns float32 ``(logp, lse, entropy or None)`` shaped like ``token_ids``.

    The distribution is ``softmax(softcap * tanh(scale * logits / softcap) / temperature)`` (``softcap`` None:
    ``softmax(scale * logits / temperature)``): a model's logit scale and final-logit soft-capping, computed in
    float32 from the logits as read, and nothing transformed is stored (:mod:`gfpo_fast.fused_linear`).

    ``logits`` ``[B, T, V]`` / ``[N, V]`` float32, bfloat16 or float16 (no autograd); ``token_ids`` shaped
    ``logits.shape[:-1]``, int64 or int32. ``active``: optional bool tensor shaped like ``token_ids``; rows
    where it is False are not read (neither logits nor id) and get ``logp = lse = entropy = 0``.
    """
    rows = LogitRows.of(kernel_logits(logits))
    if active is not None:
        require_row_mask("active", active, token_ids.shape)
    logp = torch.empty(token_ids.shape, dtype=torch.float32)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else None
    # Copies made by _flat must outlive the call: hold them in names. A bool tensor is one byte per element,
    # 0 or 1: the kernel reads it as uint8.
    ids, active = _flat(token_ids, torch.int64), _flat(active, torch.bool)
    _C.logprobs_forward(*rows.args(), ids.data_ptr(), _address(active), *_z_transform(temperature, scale, softcap),
                        logp.data_ptr(), lse.data_ptr(), _address(entropy), torch.get_num_threads())
    return logp, lse, entropy


def token_logprobs_backward(logits, token_ids, lse, dlogp, temperature, *, entropy=None, dentropy=None,
                            inplace=False, scale=1.0, softcap=None) -> torch.Tensor:
    """dL/dlogits, shaped and typed like ``logits``, from ``dlogp`` / ``dentropy`` (float32 shaped like
    ``token_ids``; None counts as zeros) and the ``lse`` (and ``entropy``) of the forward, which took the same
    ``temperature``, ``scale`` and ``softcap`` (the chain rule through them is applied).

    ``inplace=True`` writes the gradient over ``logits`` (or over the copy made for float16 or a strided
    vocab) and returns it; each row is read before it is written, and the caller must not need the logits
    afterwards. Rows whose ``dlogp`` and ``dentropy`` are 0, and rows whose ``lse`` is not finite (the forward's
    bad rows), are only zero-filled.
    """
    rows = LogitRows.of(kernel_logits(logits.detach()))
    grad = rows.tensor if inplace else torch.empty(rows.tensor.shape, dtype=rows.tensor.dtype)
    out = LogitRows.of(grad)
    ids = _flat(token_ids, torch.int64)  # copies made by _flat must outlive the call: hold them in names
    lse, entropy, dlogp, dentropy = (_flat(x, torch.float32) for x in (lse, entropy, dlogp, dentropy))
    _C.logprobs_backward(*rows.args(), ids.data_ptr(), *_z_transform(temperature, scale, softcap), lse.data_ptr(),
                         _address(entropy), _address(dlogp), _address(dentropy), grad.data_ptr(), out.inner,
                         out.stride_outer, out.stride_inner, torch.get_num_threads())
    return grad.to(logits.dtype)
