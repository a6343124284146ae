"""gfpo-fast: fused kernels and a lean trainer for the GRPO family of RL losses, with TRL's semantics.

Public ops (each dispatches to Triton on CUDA, C++ on CPU, or the torch reference):

* :func:`token_logprobs` -- per-token log-probs (and entropies) from logits.
* :func:`group_advantages`, :func:`gfpo_filter`, :func:`reward_metrics` -- group-relative advantages, GFPO top-k.
* :func:`policy_loss` -- the loss types of ``policy_loss.LOSS_REGISTRY`` (GRPO / DAPO / Dr. GRPO / BNPO / CISPO /
  SAPO / LUSPO / VESPO / GPG), GSPO, GSPO-token, GMPO.
* :func:`fused_policy_loss` -- log-probs and policy loss from logits in one op.
* :func:`fused_linear_logprobs`, :func:`fused_linear_policy_loss` -- the same from hidden states and the
  lm_head weight, one chunk of tokens at a time (the logits never exist whole).

Where each part lives, in import order (a module imports only from the layers above it):

0. ``_checkout.py``: in a source checkout, wires ``kernels/`` in as ``gfpo_fast.kernels`` and finds the built ``_C``.
1. ``_checks.py`` (argument validation, the bad-token-id rule), ``backends.py`` (backend selection);
   ``nanstats.py`` (TRL's NaN-aware std).
2. References, the torch oracle of every op: ``policy_loss.py`` (the loss math once: ``LossConfig``,
   ``policy_loss_ref``, and the torch-only public ``policy_loss``), and the ``*_ref`` functions of
   ``logprobs.py``, ``advantages.py``, ``fused_policy_loss.py`` and ``fused_linear.py``.
3. Backends, launchers only, never importing the public layer: ``kernels/`` (Triton kernels, installed as
   ``gfpo_fast.kernels``: ``logprobs.py``, ``advantages.py``) and ``cpu/`` (the same launcher signatures
   over the C++ extension ``_C`` built from ``csrc/``: ``logprobs.py``, ``advantages.py``).
4. Public ops, importing a backend lazily (``import gfpo_fast`` works without Triton): ``logprobs.py`` (with
   the one autograd layer over both backends' launchers), ``advantages.py``, ``fused_policy_loss.py``,
   ``fused_linear.py`` (the chunk loop), ``lm_head.py`` (a model's output layer as weight, bias, scale and
   soft-cap for the fused-linear ops), ``group_filter.py`` (GFPO's group filters, shared by the trainer
   and the integrations), ``user_functions.py`` (users' functions named ``module:function``), ``modules.py``
   (``nn.Module`` wrappers).
5. Applications: ``train/`` (``python -m gfpo_fast.train``) and ``integrations/`` (TRL, verl), side by side:
   an integration never imports the trainer.
"""
from . import _checkout  # noqa: F401  (first: in a source checkout, wires in kernels/ and the built _C)
from .advantages import gfpo_filter, group_advantages, reward_metrics
from .backends import force_backend
from .fused_linear import fused_linear_logprobs, fused_linear_policy_loss
from .fused_policy_loss import fused_policy_loss
from .logprobs import token_logprobs
from .modules import FusedLinearGRPOLoss, GRPOLoss
from .policy_loss import policy_loss

__version__ = "0.1.0"

__all__ = [
    "FusedLinearGRPOLoss",
    "GRPOLoss",
    "force_backend",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "fused_policy_loss",
    "gfpo_filter",
    "group_advantages",
    "policy_loss",
    "reward_metrics",
    "token_logprobs",
]
