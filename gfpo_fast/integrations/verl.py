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

**The GRPO family with TRL's semantics** (``actor_rollout_ref.actor.policy_loss.loss_mode=gfpo_fast_<name>``,
:data:`POLICY_LOSSES`): each registered loss is :func:`gfpo_fast.policy_loss` (its torch reference) on verl's
micro-batch, with TRL's normaliser of its loss type over verl's global batch -- ``P`` = ``dp_size``,
``num_items_in_batch`` = ``batch_num_tokens``, ``B * GA`` = ``global_batch_size / dp_size`` rows, dr_grpo's
``L_max`` = ``loss_scale_factor`` (else the padded response length) -- so verl's ``loss_agg_mode`` is not read:
the name says the normaliser. ``epsilon`` / ``epsilon_high`` are ``clip_ratio_low`` / ``clip_ratio_high`` (CISPO's
absolute cap is ``1 + clip_ratio_high``), SAPO's temperatures ``tau_pos`` / ``tau_neg``, VESPO's ``k`` / ``lambda``
TRL's defaults; verl's ``rollout_is_weights`` are TRL's vLLM importance-sampling ratio, 1 on padding where verl
writes 0 (VESPO sums its logarithm over the whole row; GMPO ignores it, as TRL's does). The KL and entropy terms
stay verl's (``use_kl_loss``, ``entropy_coeff``). Metrics: TRL's names under ``actor/``. Where verl's own loss has
the same math the values and gradients are equal (docs/verl.md has the table, and where they differ).

**GFPO** (``algorithm.adv_estimator=gfpo_fast_gfpo`` with ``+algorithm.gfpo.num_remains_in_group=K`` and
optionally ``+algorithm.gfpo.group_filter=length|token_efficiency|module:function`` and
``+algorithm.gfpo.adaptive_difficulty=true``): each ``uid`` group keeps its top k of G by the filter score, the
advantages come from the kept rows' statistics exactly as :func:`gfpo_fast.gfpo_filter` (the filters and adaptive
k are :class:`gfpo_fast.group_filter.GroupFilter`, as in the trainer). ``compute_gfpo_advantage`` is registered as the
estimator and zeroes the dropped rows' ``response_mask``; in verl's PPO trainer, where this module also wraps
``ray_trainer.compute_advantage`` (when the trainer imports), :func:`gfpo_filter_batch` removes the dropped rows
from the batch, so they add nothing to the loss or to any normaliser (``ppo_mini_batch_size * rollout.n`` must
divide ``train_batch_size * K``).
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

from verl import DataProto  # noqa: E402
from verl.models.transformers import monkey_patch  # noqa: E402
from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss  # noqa: E402
from verl.utils.experimental import torch_functional  # noqa: E402

from .._checks import require_num_remains  # noqa: E402
from ..fused_linear import fused_linear_logprobs  # noqa: E402
from ..group_filter import GroupFilter  # noqa: E402
from ..lm_head import config_transform  # noqa: E402
from ..policy_loss import (  # noqa: E402
    GLOBAL_TOKEN_LOSSES,
    LOSS_REGISTRY,
    SEQUENCE_TOKEN_LOSSES,
    make_loss_config,
    policy_loss_ref,
)

try:  # verl's PPO trainer needs more than verl's light install (torchdata, fastapi, ...): no trainer, no hook
    from verl.trainer.ppo import ray_trainer
except ImportError:  # pragma: no cover - exercised only by installs without the trainer's dependencies
    ray_trainer = None

__all__ = ["BACKEND", "GFPO_ESTIMATOR", "POLICY_LOSSES", "SUPPORTED_VERL", "FusedLinearLogprobsForPPO",
           "check_verl_version", "compute_gfpo_advantage", "gfpo_advantages", "gfpo_filter_batch"]

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


# ----------------------------------------------------------------------------- the GRPO family's losses
# Registered name -> gfpo-fast loss keywords (TRL's GRPOConfig fields); each name is prefixed "gfpo_fast_". Every
# loss type at the level TRL means it for (token, unless it says sequence), GSPO (sequence level) and GSPO-token
# with the PPO-clip normalisers that GSPO-token supports, and GMPO.
POLICY_LOSSES = {
    **{name: dict(loss_type=name, **({} if lt.meant_for_level in (None, "token") else
                                     dict(importance_sampling_level=lt.meant_for_level)))
       for name, lt in LOSS_REGISTRY.items()},
    **{f"gspo_{name}": dict(loss_type=name, importance_sampling_level="sequence") for name in SEQUENCE_TOKEN_LOSSES},
    **{f"gspo_token_{name}": dict(loss_type=name, importance_sampling_level="sequence_token")
       for name in SEQUENCE_TOKEN_LOSSES},
    "gmpo": dict(algorithm="gmpo"),
}


def _batch_info(config, mask: torch.Tensor) -> tuple[int, float, float, int]:
    """``(dp_size, batch_num_tokens, global_batch_size, horizon)`` of one micro-batch from verl's
    ``config.global_batch_info``, what verl's engine sets before calling a loss (absent: this call is the whole
    batch); ``horizon``, dr_grpo's ``L_max``, is its ``loss_scale_factor`` (the actor's), else the padded response
    length, as in verl's ``seq-mean-token-sum-norm``."""
    info = config.global_batch_info
    dp = int(info.get("dp_size") or 1)
    tokens, rows = info.get("batch_num_tokens"), info.get("global_batch_size")
    if dp > 1 and (tokens is None or rows is None):
        raise ValueError("with dp_size > 1 verl must pass batch_num_tokens and global_batch_size in "
                         "config.global_batch_info")
    tokens = float(mask.sum()) if tokens is None else float(tokens)
    rows = float(mask.shape[0]) if rows is None else float(rows)
    horizon = info.get("loss_scale_factor") or mask.shape[-1]
    return dp, tokens, rows, int(horizon)


def _verl_policy_loss(loss_kwargs: dict):
    """A verl policy loss (``POLICY_LOSS_REGISTRY``'s signature) computing :func:`gfpo_fast.policy_loss_ref` with
    ``loss_kwargs`` and TRL's normaliser of the loss type, over verl's global batch (the module docstring)."""

    def loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
        B = log_prob.shape[0]
        dp, tokens, rows, horizon = _batch_info(config, response_mask)
        gmpo = loss_kwargs.get("algorithm") == "gmpo"
        cispo = loss_kwargs.get("loss_type") == "cispo"
        clip = dict(epsilon=config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio,
                    epsilon_high=config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio)
        if cispo:  # TRL's CISPO caps the ratio at epsilon_high; verl's upper bound is 1 + clip_ratio_high
            clip["epsilon_high"] = 1.0 + clip["epsilon_high"]
        extra = {} if gmpo else dict(max_completion_length=horizon, sapo_temperature_pos=config.tau_pos,
                                     sapo_temperature_neg=config.tau_neg)
        cfg = make_loss_config(**loss_kwargs, **clip, **extra, num_processes=dp)
        mask = response_mask.float()
        adv = advantages
        if gmpo or LOSS_REGISTRY[cfg.loss_type].sequence_advantage:  # verl's: the row's one value, on its tokens
            adv = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        rho = None
        if rollout_is_weights is not None and not gmpo:  # verl zeroes them on padding, where TRL's ratio is 1
            rho = torch.where(mask != 0, rollout_is_weights, 1.0)
        loss, metrics = policy_loss_ref(cfg, log_prob, old_log_prob, adv, mask, importance_sampling_ratio=rho,
                                        num_items_in_batch=tokens)
        if gmpo or cfg.loss_type not in GLOBAL_TOKEN_LOSSES:  # TRL's B * GA rows are verl's global rows / dp
            loss = loss * (B * dp / rows)
        return loss, {f"actor/{name}": value.item() for name, value in metrics.items()}

    return loss_fn


for _name, _kwargs in POLICY_LOSSES.items():
    register_policy_loss(f"gfpo_fast_{_name}")(_verl_policy_loss(_kwargs))


# ----------------------------------------------------------------------------- GFPO
GFPO_ESTIMATOR = "gfpo_fast_gfpo"  # the value of algorithm.adv_estimator
_group_filters: dict[tuple, GroupFilter] = {}  # one per setting, so that adaptive k keeps its reward history


def _group_filter(config, G: int) -> GroupFilter:
    """The :class:`gfpo_fast.group_filter.GroupFilter` of verl's ``algorithm`` config (``config.gfpo``)."""
    gfpo = config.get("gfpo") if config is not None else None
    if not gfpo or gfpo.get("num_remains_in_group") is None:
        raise ValueError(f"adv_estimator={GFPO_ESTIMATOR} needs algorithm.gfpo.num_remains_in_group, k with "
                         f"2 <= k < rollout.n (={G}): add +algorithm.gfpo.num_remains_in_group=K")
    k = int(gfpo.get("num_remains_in_group"))
    require_num_remains(k, G)
    scale = "group" if config.get("norm_adv_by_std_in_grpo", True) else "none"
    key = (str(gfpo.get("group_filter", "length")), G, k, bool(gfpo.get("adaptive_difficulty", False)), scale)
    if key not in _group_filters:
        _group_filters[key] = GroupFilter(key[0], G, k, adaptive=key[3], scale_rewards=scale)
    return _group_filters[key]


def _group_order(index) -> tuple[torch.Tensor, int]:
    """``(order [N], G)``: a stable permutation that puts the rows of each ``uid`` of ``index`` (``N`` ids) next
    to each other, groups in order of first appearance, and the group size, which must be the same for all."""
    first: dict = {}
    group = torch.tensor([first.setdefault(uid, len(first)) for uid in index])
    counts = torch.bincount(group)
    if counts.min() != counts.max():
        raise ValueError(f"GFPO needs the same number of responses for every uid, got group sizes from "
                         f"{int(counts.min())} to {int(counts.max())}")
    return torch.sort(group, stable=True).indices, int(counts[0])


def gfpo_advantages(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index, config,
                    responses: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GFPO over verl's groups: ``(advantages [N, T] fp32, keep [N] bool)``.

    ``token_level_rewards`` ``[N, T]`` (a row's reward is its sum, as in verl's GRPO), ``response_mask`` ``[N, T]``,
    ``index`` the ``N`` uids (rows of a uid form a group of ``G``, anywhere in the batch), ``config`` verl's
    ``algorithm`` config: ``gfpo.num_remains_in_group`` (k), ``gfpo.group_filter`` (``length``, the default:
    the shortest kept; ``token_efficiency``: reward / length; ``module:function``: TRL's ``group_filter_func``
    contract, given each response's token ids as its completion, which needs ``responses`` ``[N, T]``),
    ``gfpo.adaptive_difficulty`` (k per group from its difficulty, as in the trainer:
    :class:`gfpo_fast.group_filter.GroupFilter`) and ``norm_adv_by_std_in_grpo`` (False: no std scaling). Each
    group keeps its top k by score; advantages are :func:`gfpo_fast.gfpo_filter`'s (the kept rows' mean and std,
    0 for dropped rows), on each row's response tokens."""
    order, G = _group_order(index)
    gfilter = _group_filter(config, G)
    rewards = token_level_rewards.sum(-1).float()
    lengths = response_mask.sum(-1)
    completions = None
    if gfilter.user_func is not None:
        if responses is None:
            raise ValueError("a module:function GFPO group filter scores the responses: call gfpo_filter_batch "
                             "(verl's trainer does) so that it gets their token ids")
        completions = [responses[i][response_mask[i].bool()].tolist() for i in order.tolist()]
    adv_grouped, keep_grouped = gfilter(rewards[order], lengths[order], completions)
    adv, keep = torch.empty_like(adv_grouped), torch.empty_like(keep_grouped)
    adv[order], keep[order] = adv_grouped, keep_grouped
    return adv[:, None] * response_mask.float(), keep


@register_adv_est(GFPO_ESTIMATOR)
def compute_gfpo_advantage(token_level_rewards, response_mask, index=None, config=None, **kwargs):
    """verl's estimator signature: ``(advantages, returns)``, both ``[N, T]`` (:func:`gfpo_advantages`). The
    dropped rows' ``response_mask`` is zeroed in place (it is the batch's own tensor), so that they add nothing to
    the loss or to the token counts verl normalises by. Within verl's trainer :func:`gfpo_filter_batch` runs
    instead and removes those rows."""
    if index is None:
        raise ValueError(f"adv_estimator={GFPO_ESTIMATOR} groups the responses by uid; verl passes it as index")
    advantages, keep = gfpo_advantages(token_level_rewards, response_mask, index, config)
    response_mask.mul_(keep[:, None].to(response_mask.dtype))
    return advantages, advantages


def gfpo_filter_batch(data: DataProto, config) -> DataProto:
    """GFPO on a verl batch: writes ``advantages`` and ``returns`` (:func:`gfpo_advantages`) and returns the kept
    rows only (``DataProto.select_idxs``), in their order, so that the dropped rows enter no forward, backward,
    loss or normaliser under any ``loss_agg_mode`` (verl recounts the tokens of each mini-batch, and its
    ``global_batch_size`` is the rows of a mini-batch, ``ppo_mini_batch_size * rollout.n``, which must then divide
    the kept rows). The trainer's step for ``adv_estimator=gfpo_fast_gfpo``."""
    if "response_mask" not in data.batch.keys():
        data.batch["response_mask"] = ray_trainer.compute_response_mask(data)
    advantages, keep = gfpo_advantages(data.batch["token_level_rewards"], data.batch["response_mask"],
                                       data.non_tensor_batch["uid"], config, responses=data.batch["responses"])
    data.batch["advantages"] = advantages
    data.batch["returns"] = advantages
    return data.select_idxs(keep)


if ray_trainer is not None:
    _verl_compute_advantage = ray_trainer.compute_advantage

    def compute_advantage(data: DataProto, adv_estimator, *args, **kwargs) -> DataProto:
        """Stands for ``ray_trainer.compute_advantage``: :func:`gfpo_filter_batch` for :data:`GFPO_ESTIMATOR`,
        verl's function for every other estimator."""
        if adv_estimator == GFPO_ESTIMATOR:
            return gfpo_filter_batch(data, kwargs.get("config"))
        return _verl_compute_advantage(data, adv_estimator, *args, **kwargs)

    ray_trainer.compute_advantage = compute_advantage
