"""gfpo-fast for verl users: fused log-probs and entropy as a verl backend, the GRPO family's losses, and GFPO.

Supported verl: ``>=0.9.1,<0.10`` (:data:`SUPPORTED_VERL`; tested with 0.9.1 on the CPU). Importing this module
with another verl raises ``ImportError`` naming the range. Install with ``pip install 'gfpo-fast[verl]'``.

Importing the module is the whole installation, and changes nothing verl already does: it adds names. In verl's
trainer, import it in every worker with ``actor_rollout_ref.model.external_lib=gfpo_fast.integrations.verl`` (or
``VERL_USE_EXTERNAL_MODULES=gfpo_fast.integrations.verl`` in the environment of every process).

**Fused log-probs and entropy** (the one switch: ``actor_rollout_ref.model.use_fused_kernels=True`` and
``actor_rollout_ref.model.fused_kernel_options.impl_backend=gfpo_fast``, :data:`BACKEND`). verl's fused
forwards (``dense_common`` and the VL variants qwen2_vl, qwen3_vl, qwen3_5, glm4v, whose head is the same) call
``verl.utils.experimental.torch_functional.FusedLinearForPPO(impl_backend=model._verl_fused_kernels_backend)``
on the last hidden states, ``lm_head.weight``, the rolled labels and verl's temperature. With the backend
``gfpo_fast`` that call runs :func:`gfpo_fast.fused_linear_logprobs` (C++ on the CPU, Triton on CUDA, one chunk of
tokens at a time, the ``[N, V]`` logits never whole) and returns verl's ``(log_probs fp32, entropy in the hidden
dtype)``, with gradients to the hidden states and the lm_head weight. Two functions of verl are wrapped for that,
each passing every other backend name through untouched: ``monkey_patch.patch_forward_with_backends`` (for
``gfpo_fast`` it installs verl's own torch-backend forward and records the model's head) and
``torch_functional.FusedLinearForPPO`` (``torch`` and ``liger`` still build verl's module).

The head: verl's fused forwards pass ``lm_head.weight`` only. A model whose config transforms its logits (Gemma
2/3's final-logit soft-cap, Cohere's or Granite's logit scale: :func:`gfpo_fast.lm_head.config_transform`) gets
that transform applied inside the op, as the model's own logits have it (verl's own backends leave it out); a
config field of a model type the lm_head module does not know, or an lm_head with a bias (which verl's forward
drops), is refused with a ``ValueError`` naming it when the model is patched.
"""
from __future__ import annotations

import torch

try:
    import verl
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
except ImportError as err:  # pragma: no cover - the module is only imported by verl users
    raise ImportError("gfpo_fast.integrations.verl needs verl: pip install 'gfpo-fast[verl]'") from err

SUPPORTED_VERL = ">=0.9.1,<0.10"


def check_verl_version(version: str) -> None:
    """Raises ``ImportError`` naming :data:`SUPPORTED_VERL` when ``version`` is outside it."""
    if Version(version).base_version not in SpecifierSet(SUPPORTED_VERL):
        raise ImportError(f"gfpo_fast.integrations.verl supports verl{SUPPORTED_VERL}, found verl {version}; "
                          f"install a supported one with pip install 'verl{SUPPORTED_VERL}'")


check_verl_version(verl.__version__)

from verl.models.transformers import monkey_patch  # noqa: E402
from verl.utils.experimental import torch_functional  # noqa: E402

from ..fused_linear import fused_linear_logprobs  # noqa: E402
from ..lm_head import config_transform  # noqa: E402

__all__ = ["BACKEND", "SUPPORTED_VERL", "FusedLinearLogprobsForPPO", "check_verl_version"]

BACKEND = "gfpo_fast"  # the value of actor_rollout_ref.model.fused_kernel_options.impl_backend


# ----------------------------------------------------------------------------- fused log-probs and entropy
class HeadBackend(str):
    """The backend name :data:`BACKEND` as verl stores it on a patched model (``model._verl_fused_kernels_backend``,
    which verl's fused forward passes as ``impl_backend``), carrying that model's logit ``scale`` (float > 0) and
    ``softcap`` (float > 0 or None)."""

    def __new__(cls, scale: float = 1.0, softcap: float | None = None):
        self = super().__new__(cls, BACKEND)
        self.scale, self.softcap = scale, softcap
        return self


def head_backend_of(model: torch.nn.Module) -> HeadBackend:
    """The :class:`HeadBackend` of a transformers model that verl's fused forward will read as
    ``model.lm_head.weight``; ``ValueError`` naming what it cannot reproduce (an lm_head bias, or a logit transform
    of an unknown model type, :func:`gfpo_fast.lm_head.config_transform`)."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(model).__name__} has no torch.nn.Linear lm_head, which verl's fused forward reads; "
                         f"impl_backend={BACKEND!r} cannot stand for its output layer")
    if head.bias is not None:
        raise ValueError(f"{type(model).__name__}'s lm_head has a bias, which verl's fused forward does not pass to "
                         f"the backend (it reads lm_head.weight only); impl_backend={BACKEND!r} refuses this model")
    return HeadBackend(*config_transform(model.config.get_text_config()))


class FusedLinearLogprobsForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` interface on :func:`gfpo_fast.fused_linear_logprobs`.

    ``forward(hidden_states [B, T, H] or [N, H], vocab_weights [V, H], input_ids [B, T] / [N], temperature)``
    returns ``(log_probs, entropy)`` shaped like ``input_ids``: log-probs fp32, the entropy in the hidden dtype (as
    verl's torch backend returns them), both differentiable to ``hidden_states`` and ``vocab_weights``, under
    ``softmax(head(hidden @ vocab_weights.T) / temperature)`` with the ``head``'s scale and soft-cap.
    """

    def __init__(self, head: HeadBackend):
        super().__init__()
        self.head = head

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        logp, entropy = fused_linear_logprobs(hidden_states, vocab_weights, input_ids.long(),
                                              temperature=float(temperature), scale=self.head.scale,
                                              softcap=self.head.softcap, return_entropy=True)
        return logp, entropy.to(hidden_states.dtype)


_verl_fused_linear_for_ppo = torch_functional.FusedLinearForPPO
_verl_patch_forward_with_backends = monkey_patch.patch_forward_with_backends


def fused_linear_for_ppo(chunk_size: int = 512, impl_backend: str = "torch") -> torch.nn.Module:
    """Stands for ``torch_functional.FusedLinearForPPO``: :class:`FusedLinearLogprobsForPPO` for
    :data:`BACKEND` (gfpo-fast picks its own chunk size), verl's module for any other backend name."""
    if impl_backend == BACKEND:
        return FusedLinearLogprobsForPPO(impl_backend if isinstance(impl_backend, HeadBackend) else HeadBackend())
    return _verl_fused_linear_for_ppo(chunk_size=chunk_size, impl_backend=impl_backend)


def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str | None = None):
    """Stands for ``monkey_patch.patch_forward_with_backends``: for :data:`BACKEND`, verl's torch-backend forward
    of the model's class (the same per-model choice verl makes) with the model's :class:`HeadBackend` recorded as
    its backend; verl's function for any other backend name."""
    if not (use_fused_kernels and fused_kernels_backend == BACKEND):
        return _verl_patch_forward_with_backends(model, use_fused_kernels=use_fused_kernels,
                                                 fused_kernels_backend=fused_kernels_backend)
    head = head_backend_of(model)  # refuses before anything is patched
    _verl_patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    model._verl_fused_kernels_backend = head


torch_functional.FusedLinearForPPO = fused_linear_for_ppo
monkey_patch.patch_forward_with_backends = patch_forward_with_backends
