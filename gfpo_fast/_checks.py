"""Argument validation shared by the public entry points.

Every public function checks its inputs here and raises ``ValueError`` (or ``TypeError``)
with a message that names the argument, what was expected and what was received. These
checks never synchronise with a device: they read shapes, dtypes and devices only, except
:func:`require_token_ids_in_range`, which reads two integers (see there).
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def require_tensor(name: str, x, *, dtypes=None, ndim=None) -> torch.Tensor:
    """Checks that ``x`` is a tensor, optionally of one of ``dtypes`` and with ``ndim`` in a tuple."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if ndim is not None and x.dim() not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {tuple(x.shape)}")
    return x


def require_shape(name: str, x: torch.Tensor, shape: tuple, hint: str = "") -> None:
    if tuple(x.shape) != tuple(shape):
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{extra}, got {tuple(x.shape)}")


def require_same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def require_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def require_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def require_float(name: str, value, *, minimum=None, exclusive=False, allow_none=False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value != value:  # NaN
        raise ValueError(f"{name} must not be NaN")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        op = ">" if exclusive else ">="
        raise ValueError(f"{name} must be {op} {minimum}, got {value!r}")


def require_num_remains(num_remains_in_group, num_generations: int) -> None:
    """GFPO's ``k``: an integer with ``2 <= k < G`` (``k = 1`` has no group std; ``k = G`` is plain GRPO)."""
    k = num_remains_in_group
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k < num_generations:
        raise ValueError(f"num_remains_in_group must be an integer with 2 <= k < num_generations={num_generations} "
                         f"(k = 1 has no group std; k = num_generations is plain GRPO), got {k!r}")


def require_row_mask(name: str, x: torch.Tensor, shape) -> None:
    """A bool tensor of ``shape`` (one entry per token row), as the log-prob launchers take ``active``."""
    if x.dtype != torch.bool or tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must be a bool tensor of shape {tuple(shape)}")


def require_token_ids_in_range(token_ids: torch.Tensor, vocab: int, vocab_of: str = "logits") -> None:
    """Every id (masked positions included) lies in ``[0, vocab)``, else a ``ValueError`` before any launch.

    One ``aminmax`` pass and one host read of two integers: on a CUDA tensor this is a synchronisation,
    the price of an error that names the argument instead of a device-side fault or a silently wrong loss
    (the kernels never dereference such an id either way: they give NaN).
    """
    if token_ids.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(token_ids.detach())).tolist()
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token_ids must lie in [0, {vocab}) (the vocab size of {vocab_of}), "
                         f"got values in [{lo}, {hi}]")
