"""The GRPO-family policy loss on per-token log-probs, exactly as TRL computes it.

Notation: ``B`` rows (completions), ``T`` padded completion length, ``M`` the [B, T] loss mask,
``lp`` / ``lp_old`` / ``lp_ref`` per-token log-probs of the policy, the sampling policy and the
reference model, ``A`` advantages, ``l = lp - lp_old`` the log-ratio. Section numbers refer to
docs/semantics.md (TRL 1.16).

* ``algorithm="grpo"`` (TRL ``GRPOTrainer._compute_loss``, sections 5-9): importance weight per token
  (``"token"``), per sequence as the masked mean log-ratio (``"sequence"``, GSPO, arXiv 2507.18071)
  or the sequence weight carried by every token (``"sequence_token"``, GSPO-token, section 10);
  per-token loss by ``loss_type`` (section 8); times the vLLM importance-sampling ratio when given; plus
  ``beta`` times the k3 KL; normalised by ``loss_type`` (section 9). An optional ``loss_mask`` (TRL's entropy
  mask, :func:`high_entropy_mask`) multiplies the policy term of each token, not its KL nor the normaliser.
  Each loss type is one entry of :data:`LOSS_REGISTRY` (:class:`LossType`: its per-token loss, normaliser,
  metrics, hyperparameters and the properties the checks and fast paths read); a name not in it is a
  ``ValueError`` everywhere.
* ``algorithm="gmpo"`` (TRL ``GMPOTrainer``, section 11, arXiv 2507.20673): the geometric mean of
  sign-aware log-space-clipped token ratios per sequence, ``L_i = -exp(mean_t clip(l)) * A_i``,
  averaged over sequences. ``loss_type`` is ignored, as in TRL. A ``loss_mask`` narrows the tokens of the
  geometric mean (the KL keeps ``M``).

Every normalisation is written as one per-row weight ``w_i`` with ``loss = sum_{i,t} M l_{i,t} w_i``
(:func:`row_weights`); the fused backends use the same function, so the normalisers exist once.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import backends
from ._checks import (
    require_choice,
    require_float,
    require_positive_int,
    require_same_device,
    require_shape,
    require_tensor,
)

ALGORITHMS = ("grpo", "gmpo")
IS_LEVELS = ("token", "sequence", "sequence_token")
DEFAULT_EPSILON = {"grpo": 0.2, "gmpo": 0.4}  # GMPOConfig's epsilon is 0.4, in log space


# ----------------------------------------------------------------------------- the registry of loss types
@dataclass(frozen=True)
class LossParam:
    """A float hyperparameter of one loss type. It becomes a field of :class:`LossConfig` (so a keyword of every
    loss op) and of the trainer's config (a ``--flag``), with this default and help; ``positive``: it must be
    > 0, else any number but NaN."""

    name: str
    default: float
    help: str
    positive: bool = False


@dataclass(frozen=True)
class Normaliser:
    """How a loss type turns its masked per-token losses into one number (docs/semantics.md section 9).

    ``weights(cfg, M, num_items_in_batch)`` -> ``w`` [B, 1], float32 (float64 for a float64 ``M``, except the
    constant ``FIXED_HORIZON`` and ``ROW_SUM``, which stay float32) with
    ``loss = sum_{i,t} M_{i,t} l_{i,t} w_i``; it reads the mask only, never the log-probs. ``global_tokens``: it
    divides by the token count of the whole generation batch (``num_items_in_batch``), not by ``GA``, so that
    count is required under accumulation or several processes. ``needs_max_completion_length``: it divides by
    ``max_completion_length``, which must then be given.
    """

    weights: Callable
    global_tokens: bool = False
    needs_max_completion_length: bool = False


@dataclass(frozen=True)
class LossType:
    """One ``loss_type`` of ``algorithm="grpo"``: everything the reference, the checks, the fast paths, the
    trainer and the integrations know about it.

    ``per_token(cfg, r, lp, A, log_ratio, M, rho) -> (loss_tok, metrics)``: ``r`` the importance weight at the
    configured level ([B, T] or [B, 1], with gradient), ``lp`` the [B, T] log-probs, ``A`` advantages [B, 1] or
    [B, T], ``log_ratio`` the token log-ratio [B, T], ``M`` the [B, T] mask, ``rho`` the vLLM IS ratio
    ([B, T] or [B, 1]) or None; returns the per-token loss (broadcastable to [B, T], before ``rho``, the KL and the
    mask) and a dict of detached 0-dim metrics named exactly ``metrics``.

    ``token_separable``: off policy at level ``"token"``, ``dL/dlp[b, t]`` depends on no other token's log-prob
    (:func:`token_separable`). ``token_is_ratio``: the loss folds a [B, T] vLLM ratio into its own weight (it is
    required at that shape, always passed by the TRL integration, and not multiplied afterwards).
    ``sequence_advantage``: it needs one advantage per sequence. ``levels``: the ``importance_sampling_level``
    values it accepts (``"sequence_token"`` where TRL's GSPO-token supported it). ``meant_for_level``: the level
    TRL warns it is meant for (None: no warning). ``row_metrics``: the metrics that hold one value per sequence at
    every level (at level ``"sequence"`` every metric does); processes weight them by rows, not tokens.
    """

    per_token: Callable
    normaliser: Normaliser
    metrics: tuple[str, ...] = ()
    row_metrics: tuple[str, ...] = ()
    token_separable: bool = True
    token_is_ratio: bool = False
    sequence_advantage: bool = False
    levels: tuple[str, ...] = ("token", "sequence")
    meant_for_level: str | None = None
    params: tuple[LossParam, ...] = ()


def _row_token_mean(cfg, M, n):
    return 1.0 / (M.sum(-1, keepdim=True).clamp(min=1.0) * max(M.shape[0], 1) * cfg.grad_accum_steps)


def _call_token_mean(cfg, M, n):
    return (1.0 / (M.sum().clamp(min=1.0) * cfg.grad_accum_steps)).expand(M.shape[0], 1)


def _fixed_horizon(cfg, M, n):
    rows_ga = max(M.shape[0], 1) * cfg.grad_accum_steps
    return torch.full((M.shape[0], 1), 1.0 / (rows_ga * cfg.max_completion_length), device=M.device)


def _batch_token_mean(cfg, M, n):
    n = M.sum() if n is None else torch.as_tensor(n, dtype=M.dtype, device=M.device)
    return (cfg.num_processes / n.clamp(min=1.0)).expand(M.shape[0], 1)


def _row_sum(cfg, M, n):
    return torch.full((M.shape[0], 1), 1.0 / (max(M.shape[0], 1) * cfg.grad_accum_steps), device=M.device)


ROW_TOKEN_MEAN = Normaliser(_row_token_mean)  # 1 / (max(|o_i|, 1) B GA): each row's token mean, mean over rows
CALL_TOKEN_MEAN = Normaliser(_call_token_mean)  # 1 / (max(sum M, 1) GA): token mean over this call's rows
FIXED_HORIZON = Normaliser(_fixed_horizon, needs_max_completion_length=True)  # 1 / (B L_max GA)
BATCH_TOKEN_MEAN = Normaliser(_batch_token_mean, global_tokens=True)  # P / max(N, 1), N = num_items_in_batch
ROW_SUM = Normaliser(_row_sum)  # 1 / (B GA): row sums, mean over rows


def _ppo_clip(cfg, r, lp, A, log_ratio, M, rho):
    r_clipped = torch.clamp(r, 1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high)
    if cfg.delta is not None:
        r = torch.clamp(r, max=cfg.delta)  # INTELLECT-2 upper cap inside the min; metrics see it too
    rd = r.detach()
    return -torch.min(r * A, r_clipped * A), clip_metrics((rd < 1 - cfg.epsilon) & (A < 0),
                                                          (rd > 1 + cfg.epsilon_high) & (A > 0), M)


def _cispo(cfg, r, lp, A, log_ratio, M, rho):
    loss_tok = -torch.clamp(r, max=cfg.epsilon_high).detach() * A * lp  # epsilon_high is an absolute cap
    return loss_tok, {"cispo_clip_ratio": masked_mean(((r.detach() > cfg.epsilon_high) & (A > 0)).float(), M)}


def _sapo(cfg, r, lp, A, log_ratio, M, rho):
    tau = torch.where(A > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
    return -torch.sigmoid(tau * (r - 1.0)) * (4.0 / tau) * A, {}


def _vespo(cfg, r, lp, A, log_ratio, M, rho):
    phi = vespo_weights(cfg, A, log_ratio, M, rho)
    return -phi * A * lp, {"vespo/phi_seq_mean": masked_mean(phi, M)}


def _policy_gradient(cfg, r, lp, A, log_ratio, M, rho):
    return -A * lp, {}  # GPG: no ratio, no clip; the old log-probs are not read


_CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_mean", "clip_ratio/high_max",
                 "clip_ratio/region_mean")
_PPO = dict(per_token=_ppo_clip, metrics=_CLIP_METRICS)

LOSS_REGISTRY: dict[str, LossType] = {
    "grpo": LossType(normaliser=ROW_TOKEN_MEAN, levels=IS_LEVELS, **_PPO),
    "bnpo": LossType(normaliser=CALL_TOKEN_MEAN, levels=IS_LEVELS, **_PPO),
    "dr_grpo": LossType(normaliser=FIXED_HORIZON, levels=IS_LEVELS, **_PPO),
    "dapo": LossType(normaliser=BATCH_TOKEN_MEAN, levels=IS_LEVELS, **_PPO),
    "cispo": LossType(_cispo, BATCH_TOKEN_MEAN, metrics=("cispo_clip_ratio",)),
    "sapo": LossType(_sapo, ROW_TOKEN_MEAN, params=(
        LossParam("sapo_temperature_pos", 1.0, "sapo: gate temperature where A > 0", positive=True),
        LossParam("sapo_temperature_neg", 1.05, "sapo: gate temperature where A <= 0", positive=True))),
    "luspo": LossType(normaliser=ROW_SUM, meant_for_level="sequence", **_PPO),
    "vespo": LossType(_vespo, BATCH_TOKEN_MEAN, metrics=("vespo/phi_seq_mean",), row_metrics=("vespo/phi_seq_mean",),
                      token_separable=False, token_is_ratio=True, sequence_advantage=True, meant_for_level="token",
                      params=(LossParam("vespo_k_pos", 2.0, "vespo: shape k of the weight where A >= 0"),
                              LossParam("vespo_lambda_pos", 3.0, "vespo: rate lambda of the weight where A >= 0"),
                              LossParam("vespo_k_neg", 3.0, "vespo: shape k of the weight where A < 0"),
                              LossParam("vespo_lambda_neg", 2.0, "vespo: rate lambda of the weight where A < 0"))),
    "gpg": LossType(_policy_gradient, BATCH_TOKEN_MEAN, levels=("token",)),  # verl's "gpg", arXiv 2504.02546
}
LOSS_TYPES = tuple(LOSS_REGISTRY)
LOSS_PARAMS = tuple(p for lt in LOSS_REGISTRY.values() for p in lt.params)
GLOBAL_TOKEN_LOSSES = tuple(n for n, lt in LOSS_REGISTRY.items() if lt.normaliser.global_tokens)
SEQUENCE_TOKEN_LOSSES = tuple(n for n, lt in LOSS_REGISTRY.items() if "sequence_token" in lt.levels)  # GSPO-token


def loss_type(name: str) -> LossType:
    """The registry entry of ``name``; a ``ValueError`` listing :data:`LOSS_TYPES` for any other name."""
    require_choice("loss_type", name, LOSS_TYPES)
    return LOSS_REGISTRY[name]


def add_loss_param_fields(cls):
    """Class decorator, before ``@dataclass``: adds one float field per :data:`LOSS_PARAMS` entry (its default,
    and its help as ``metadata["help"]``) after the fields ``cls`` declares."""
    for p in LOSS_PARAMS:
        cls.__annotations__[p.name] = float
        setattr(cls, p.name, dataclasses.field(default=p.default, metadata={"help": p.help}))
    return cls


@dataclass(frozen=True)
@add_loss_param_fields
class LossConfig:
    """The scalar hyperparameters of one policy-loss call: the loss keywords of every public op.

    The field names are the keywords of :func:`policy_loss`, :func:`gfpo_fast.fused_policy_loss`,
    :func:`gfpo_fast.fused_linear_policy_loss` and the loss modules, and the field defaults are theirs:
    this class is their one source. The fields after ``num_processes`` are the hyperparameters of the loss
    types (:data:`LOSS_PARAMS`, e.g. ``sapo_temperature_pos``), added from the registry. Build it with
    :func:`make_loss_config` (by keyword; it validates and resolves ``epsilon`` / ``epsilon_high``); every
    backend reads the result.
    """

    algorithm: str = "grpo"
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon: float | None = None  # None: TRL's default of the algorithm (DEFAULT_EPSILON)
    epsilon_high: float | None = None  # None: epsilon
    delta: float | None = None
    beta: float = 0.0
    use_bias_correction_kl: bool = False
    max_completion_length: int | None = None
    grad_accum_steps: int = 1
    num_processes: int = 1


LOSS_KEYWORDS = frozenset(f.name for f in dataclasses.fields(LossConfig))


def token_separable(cfg: LossConfig, *, on_policy: bool) -> bool:
    """Whether ``dL/dlogp[b, t]`` of :func:`policy_loss_ref` depends on no log-prob but ``logp[b, t]`` itself
    (and on the mask, advantages, old / ref log-probs and IS ratio, which are inputs), so that it is known for a
    token as soon as that token's log-prob is: the condition of the fused-linear loss's grad-in-forward path.

    ``on_policy``: ``old_logp`` is None. Then the log-ratio is ``lp - lp.detach()``, exactly 0 in value for any
    finite ``lp``, so every importance weight (token, GSPO's sequence mean, GSPO-token's, GMPO's clipped
    geometric mean), clip, VESPO weight and normaliser has a value and a gradient that do not depend on the
    log-probs; what is left is the k3 KL, per token, which stays separable unless it is multiplied by GSPO's
    sequence weight (``use_bias_correction_kl`` at ``importance_sampling_level="sequence"``: the weight's
    gradient to one token carries the KL of every token of its row). Off policy, only per-token importance
    weights are separable: ``algorithm="grpo"`` at level ``"token"``, with a loss type registered
    ``token_separable`` (all but ``vespo``, whose weight sums the log-ratios of a row). The normalisers
    (:func:`row_weights`) depend on the mask only.
    """
    if on_policy:
        return not (cfg.beta != 0.0 and cfg.use_bias_correction_kl and cfg.importance_sampling_level == "sequence")
    return (cfg.algorithm == "grpo" and cfg.importance_sampling_level == "token"
            and loss_type(cfg.loss_type).token_separable)


def loss_config_from(caller: str, loss_kwargs: dict) -> LossConfig:
    """:func:`make_loss_config` for the ``**loss_kwargs`` of the public op ``caller``; an unknown keyword
    is a ``TypeError`` naming ``caller``, as for a plain Python signature."""
    unknown = set(loss_kwargs) - LOSS_KEYWORDS
    if unknown:
        raise TypeError(f"{caller} got unexpected keyword arguments {sorted(unknown)}")
    return make_loss_config(**loss_kwargs)


def make_loss_config(**loss_kwargs) -> LossConfig:
    """Validates the loss keywords (the fields of :class:`LossConfig`) and resolves the defaults.

    ``epsilon=None`` means TRL's default for the algorithm (0.2 for grpo, 0.4 in log space for
    gmpo); ``epsilon_high=None`` means ``epsilon``. The returned config has every float as a float.
    """
    c = LossConfig(**loss_kwargs)
    require_choice("algorithm", c.algorithm, ALGORITHMS)
    spec = loss_type(c.loss_type)
    require_choice("importance_sampling_level", c.importance_sampling_level, IS_LEVELS)
    eps = DEFAULT_EPSILON[c.algorithm] if c.epsilon is None else c.epsilon
    require_float("epsilon", eps, minimum=0.0)
    eps_high = eps if c.epsilon_high is None else c.epsilon_high
    require_float("epsilon_high", eps_high, minimum=0.0)
    require_float("delta", c.delta, minimum=0.0, exclusive=True, allow_none=True)
    require_float("beta", c.beta, minimum=0.0)
    require_positive_int("grad_accum_steps", c.grad_accum_steps)
    require_positive_int("num_processes", c.num_processes)
    for p in LOSS_PARAMS:
        require_float(p.name, getattr(c, p.name), minimum=0.0 if p.positive else None, exclusive=p.positive)
    if c.max_completion_length is not None:
        require_positive_int("max_completion_length", c.max_completion_length)
    if c.algorithm == "grpo" and spec.normaliser.needs_max_completion_length and c.max_completion_length is None:
        raise ValueError(f"loss_type={c.loss_type!r} divides by max_completion_length; pass it (an integer >= 1)")
    if c.importance_sampling_level not in spec.levels:
        supported = tuple(n for n, lt in LOSS_REGISTRY.items() if c.importance_sampling_level in lt.levels)
        raise ValueError(f"importance_sampling_level={c.importance_sampling_level!r} supports loss_type in "
                         f"{supported}, got {c.loss_type!r}")
    if c.importance_sampling_level == "sequence_token" and c.use_bias_correction_kl:
        raise ValueError("use_bias_correction_kl is not defined for importance_sampling_level='sequence_token'")
    if c.algorithm == "gmpo":
        for name, default in [("importance_sampling_level", "token"), ("delta", None),
                              ("use_bias_correction_kl", False)]:
            if getattr(c, name) != default:
                raise ValueError(f"algorithm='gmpo' does not use {name} (TRL's GMPO ignores it); "
                                 f"got {getattr(c, name)!r}")
    elif spec.meant_for_level not in (None, c.importance_sampling_level):
        warnings.warn(f"loss_type={c.loss_type!r} is meant for importance_sampling_level={spec.meant_for_level!r} "
                      "(TRL warns too)", stacklevel=3)
    floats = {name: float(getattr(c, name)) for name in ("beta", *(p.name for p in LOSS_PARAMS))}
    return dataclasses.replace(c, epsilon=float(eps), epsilon_high=float(eps_high),
                               delta=None if c.delta is None else float(c.delta),
                               use_bias_correction_kl=bool(c.use_bias_correction_kl), **floats)


def check_loss_inputs(cfg: LossConfig, logp, old_logp, advantages, mask, *, ref_logp=None,
                      importance_sampling_ratio=None, num_items_in_batch=None, entropy=None, loss_mask=None,
                      source: str = "logp") -> None:
    """Shape, dtype and device checks for the tensors of one policy-loss call (no host sync).

    ``logp`` is ``[B, T]``; the fused losses pass a ``[B, T]`` slice of their logits or hidden states
    and name it in ``source``, so that errors say "same [B, T] as logits" rather than "logp".
    """
    spec = loss_type(cfg.loss_type)
    require_tensor(source, logp, ndim=(2,))
    if not logp.is_floating_point():
        raise ValueError(f"{source} must be a float tensor, got {logp.dtype}")
    B, T = logp.shape
    same = "same as logp" if source == "logp" else f"[B, T] of {source}"
    require_tensor("mask", mask, ndim=(2,))
    require_shape("mask", mask, (B, T), same)
    require_tensor("advantages", advantages, ndim=(1, 2))
    if advantages.dim() == 1 or advantages.shape[1] == 1:
        if advantages.shape[0] != B:
            raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}), got {tuple(advantages.shape)}")
    else:
        require_shape("advantages", advantages, (B, T), f"({B},) per sequence or ({B}, {T}) per token")
        if cfg.algorithm == "gmpo" or spec.sequence_advantage:
            name = "algorithm='gmpo'" if cfg.algorithm == "gmpo" else f"loss_type={cfg.loss_type!r}"
            raise ValueError(f"{name} needs one advantage per sequence: advantages of shape ({B},), "
                             f"got {tuple(advantages.shape)}")
    for name, x in [("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy), ("loss_mask", loss_mask)]:
        if x is not None:
            require_tensor(name, x, ndim=(2,))
            require_shape(name, x, (B, T), same)
    if cfg.beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={cfg.beta} adds a KL term to the reference model: pass ref_logp of shape ({B}, {T})")
    rho = importance_sampling_ratio
    if rho is not None:
        if cfg.algorithm == "gmpo":
            raise ValueError("algorithm='gmpo' does not apply importance_sampling_ratio (TRL's GMPO ignores it); "
                             "pass None")
        require_tensor("importance_sampling_ratio", rho, ndim=(1, 2))
        if tuple(rho.shape) not in ((B,), (B, 1), (B, T)):
            raise ValueError(f"importance_sampling_ratio must have shape ({B}, {T}), ({B}, 1) or ({B},), "
                             f"got {tuple(rho.shape)}")
        if spec.token_is_ratio and tuple(rho.shape) != (B, T):
            raise ValueError(f"loss_type={cfg.loss_type!r} folds a token-level importance_sampling_ratio into its "
                             f"weight: shape ({B}, {T}) (TRL refuses sequence-level modes with vespo)")
    if num_items_in_batch is None and cfg.algorithm == "grpo" and spec.normaliser.global_tokens and (
        cfg.grad_accum_steps > 1 or cfg.num_processes > 1
    ):
        raise ValueError(
            f"loss_type={cfg.loss_type!r} divides by the token count of the whole generation batch: pass "
            "num_items_in_batch when grad_accum_steps > 1 or num_processes > 1"
        )
    require_same_device("logp", logp, mask=mask, advantages=advantages, old_logp=old_logp, ref_logp=ref_logp,
                        importance_sampling_ratio=rho, entropy=entropy, loss_mask=loss_mask)


# ----------------------------------------------------------------------------- shared pieces
def row_weights(cfg: LossConfig, mask: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """[B, 1] ``w`` such that the loss is ``sum_{i,t} M_{i,t} l_{i,t} w_i`` (dtype: :class:`Normaliser`):
    the normaliser of ``cfg.loss_type`` (docs/semantics.md section 9). GMPO's plain mean over sequences
    has no token weight (see gmpo_loss_ref). An empty batch (B = 0) gets an empty ``w`` (the loss is then 0,
    never 0 / 0).
    """
    M = mask.float() if mask.dtype != torch.float64 else mask
    return loss_type(cfg.loss_type).normaliser.weights(cfg, M, num_items_in_batch)


def masked(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``x * M`` with masked entries exactly 0, even where ``x`` is inf or NaN (padding log-probs
    can be anything; TRL's plain product turns them into NaN)."""
    return torch.where(M != 0, x * M, 0.0)


def masked_mean(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """TRL's metric mean: a [B, 1] tensor is averaged over rows, a [B, T] one over the mask."""
    if x.shape[1] == 1:
        return x.mean()
    return masked(x, M).sum() / M.sum().clamp(min=1.0)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float,
                      gather: Callable | None = None) -> torch.Tensor:
    """TRL's entropy mask (``top_entropy_quantile``, arXiv 2506.01939): the tokens of ``mask`` whose entropy is at
    least the ``1 - top_entropy_quantile`` quantile (``torch.quantile``, linear interpolation) of the entropies of
    every token of ``mask``; with ``gather`` (1-D tensor -> the concatenation of every process's), of every
    process's tokens, as TRL gathers them.

    ``entropy`` and ``mask`` ``[B, T]``; returns ``[B, T]`` bool, False wherever ``mask`` is 0, all False when no
    token is in ``mask`` anywhere. ``top_entropy_quantile`` 1 keeps every token, 0 only those at the highest
    entropy (ties are kept: the comparison is ``>=``). The mask carries no gradient.
    """
    require_float("top_entropy_quantile", top_entropy_quantile, minimum=0.0)
    if top_entropy_quantile > 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
    require_shape("entropy", entropy, tuple(mask.shape), "same [B, T] as mask")
    keep = mask != 0
    values = entropy.detach()[keep].float()
    if gather is not None:
        values = gather(values)
    if values.numel() == 0:
        return torch.zeros_like(keep)
    threshold = torch.quantile(values, 1.0 - float(top_entropy_quantile))
    return (entropy.detach() >= threshold) & keep


def _row_fraction(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    return x.squeeze(1) if x.shape[1] == 1 else masked(x, M).sum(-1) / M.sum(-1)  # NaN for empty rows


def _nan_extreme(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """The largest (smallest) non-NaN entry of ``x`` (B,); NaN when there is none, an empty batch included."""
    if x.numel() == 0:
        return torch.full((), torch.nan, device=x.device)
    fill = -math.inf if largest else math.inf
    finite = torch.where(torch.isnan(x), fill, x)
    value = finite.max() if largest else finite.min()
    return torch.where(torch.isnan(x).all(), torch.nan, value)


def clip_metrics(low: torch.Tensor, high: torch.Tensor, M: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's ``clip_ratio/*`` metrics from boolean indicators of shape [B, 1] or [B, T]."""
    low, high = low.float(), high.float()
    region = torch.maximum(low, high)
    return {
        "clip_ratio/low_mean": masked_mean(low, M),
        "clip_ratio/low_min": _nan_extreme(_row_fraction(low, M), largest=False),
        "clip_ratio/high_mean": masked_mean(high, M),
        "clip_ratio/high_max": _nan_extreme(_row_fraction(high, M), largest=True),
        "clip_ratio/region_mean": masked_mean(region, M),
    }


def k3_kl(lp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator exp(lp_ref - lp) - (lp_ref - lp) - 1 (>= 0; gradient through lp)."""
    d = ref_logp.to(lp.dtype) - lp
    return torch.exp(d) - d - 1.0


def vespo_weights(cfg: LossConfig, A: torch.Tensor, log_ratio: torch.Tensor, M: torch.Tensor, rho=None) -> torch.Tensor:
    """VESPO's per-sequence weight phi_i, [B, 1], no gradient (TRL ``get_gamma_weights``)."""
    log_ratio = log_ratio.detach()
    s = masked(log_ratio.clamp(-20.0, 20.0), M).sum(-1, keepdim=True)
    if rho is not None:  # unmasked, as in TRL: padding has rho = 1, i.e. contributes 0
        s = s + torch.log(rho).clamp(math.log(1e-8), 20.0).sum(-1, keepdim=True)
    log_w = s.clamp(math.log(1e-8), 20.0)
    pos = A >= 0
    k = torch.where(pos, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lam = torch.where(pos, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.where(torch.isfinite(phi), phi, 0.0)


# ----------------------------------------------------------------------------- references
def grpo_loss_ref(cfg, lp, old_logp, A, M, *, ref_logp=None, importance_sampling_ratio=None,
                  num_items_in_batch=None, loss_mask=None):
    """Float32 reference for ``algorithm="grpo"``. Returns (loss, metrics without entropy). ``loss_mask``
    ``[B, T]`` or None multiplies the policy term of each token (TRL's entropy mask), not the KL."""
    lp_old = lp.detach() if old_logp is None else old_logp.to(lp.dtype)
    log_ratio = lp - lp_old  # (B, T)
    level = cfg.importance_sampling_level
    if level == "token":
        log_w = log_ratio
    else:
        seq = masked(log_ratio, M).sum(-1, keepdim=True) / M.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1)
        log_w = seq if level == "sequence" else lp - lp.detach() + seq.detach()
    r = torch.exp(log_w)
    metrics = {}
    kl = None
    if cfg.beta != 0.0:
        kl = k3_kl(lp, ref_logp)
        if cfg.use_bias_correction_kl:
            kl = kl * r
        metrics["kl"] = masked_mean(kl.detach(), M)
    rho = importance_sampling_ratio
    if rho is not None:
        rho = rho.to(lp.dtype).reshape(rho.shape[0], -1)
    spec = loss_type(cfg.loss_type)
    loss_tok, loss_metrics = spec.per_token(cfg, r, lp, A, log_ratio, M, rho)
    metrics.update(loss_metrics)
    if loss_mask is not None:
        loss_tok = masked(loss_tok, loss_mask.to(lp.dtype))
    if rho is not None and not spec.token_is_ratio:
        loss_tok = loss_tok * rho
    if kl is not None:
        loss_tok = loss_tok + cfg.beta * kl
    loss = (masked(loss_tok, M) * row_weights(cfg, M, num_items_in_batch)).sum()
    return loss, metrics


def gmpo_loss_ref(cfg, lp, old_logp, A, M, *, ref_logp=None, loss_mask=None):
    """Float32 reference for ``algorithm="gmpo"`` (TRL ``GMPOTrainer._compute_loss``); the geometric mean runs
    over the tokens of ``M * loss_mask`` (TRL's entropy mask), the KL over those of ``M``."""
    lp_old = lp.detach() if old_logp is None else old_logp.to(lp.dtype)
    log_ratio = lp - lp_old
    c = torch.clamp(log_ratio, -cfg.epsilon, cfg.epsilon_high)
    # Sign-aware one-sided clip in log space: only the upper side clips for A > 0, only the lower for A <= 0.
    clipped = torch.where(A > 0, torch.minimum(log_ratio, c), torch.maximum(log_ratio, c))
    count = M.sum(-1, keepdim=True).clamp(min=1.0)
    seq_mask = M if loss_mask is None else M * loss_mask.to(M.dtype)
    log_w = masked(clipped, seq_mask).sum(-1, keepdim=True) / seq_mask.sum(-1, keepdim=True).clamp(min=1.0)
    per_seq = -torch.exp(log_w) * A
    metrics = {}
    if cfg.beta != 0.0:
        kl = k3_kl(lp, ref_logp)
        per_seq = per_seq + cfg.beta * masked(kl, M).sum(-1, keepdim=True) / count
        metrics["kl"] = masked_mean(kl.detach(), M)
    loss = per_seq.sum() / (max(per_seq.shape[0], 1) * cfg.grad_accum_steps)  # 0 for an empty batch
    ld = log_ratio.detach()
    metrics.update(clip_metrics((ld < -cfg.epsilon) & (A < 0), (ld > cfg.epsilon_high) & (A > 0), M))
    return loss, metrics


def policy_loss_ref(cfg: LossConfig, logp, old_logp, advantages, mask, *, ref_logp=None,
                    importance_sampling_ratio=None, num_items_in_batch=None, entropy=None, loss_mask=None):
    """The torch oracle of :func:`policy_loss` for a validated ``cfg``.

    The math runs in float32 (float64 inputs stay float64, for gradcheck); metrics are float32.
    """
    lp = logp if logp.dtype == torch.float64 else logp.float()
    A = advantages.to(lp.dtype)
    A = A.unsqueeze(1) if A.dim() == 1 else A  # (B, 1) or (B, T)
    M = mask.to(lp.dtype)
    if cfg.algorithm == "gmpo":
        loss, metrics = gmpo_loss_ref(cfg, lp, old_logp, A, M, ref_logp=ref_logp, loss_mask=loss_mask)
    else:
        loss, metrics = grpo_loss_ref(cfg, lp, old_logp, A, M, ref_logp=ref_logp,
                                      importance_sampling_ratio=importance_sampling_ratio,
                                      num_items_in_batch=num_items_in_batch, loss_mask=loss_mask)
    if entropy is not None:
        metrics = {"entropy": masked_mean(entropy.detach().to(lp.dtype), M), **metrics}
    return loss, {k: v.detach().float() for k, v in metrics.items()}


# ----------------------------------------------------------------------------- public API
def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, importance_sampling_ratio=None,
                num_items_in_batch=None, entropy=None, loss_mask=None, backend="auto", **loss_kwargs):
    """GRPO-family loss from per-token log-probs, with TRL's semantics and metric names.

    Args:
        logp: ``[B, T]`` float log-probs of the completion tokens under the policy (carries the gradient).
        old_logp: ``[B, T]`` log-probs under the sampling policy, or ``None`` for on-policy
            (ratio 1 in value, plain policy gradient), as in TRL.
        advantages: ``[B]`` per sequence, or ``[B, T]`` per token.
        mask: ``[B, T]`` loss mask (bool, int or float; 1 = the token counts).
        algorithm: ``"grpo"`` (the GRPO family of loss types) or ``"gmpo"`` (geometric mean, log-space clip).
        loss_type: a name of :data:`LOSS_TYPES` (grpo, bnpo, dr_grpo, dapo (TRL default), cispo, sapo, luspo,
            vespo, gpg; docs/semantics.md sections 8 and 9).
        importance_sampling_level: ``"token"``, ``"sequence"`` (GSPO) or ``"sequence_token"`` (GSPO-token).
        epsilon / epsilon_high: lower / upper clip range; ``None`` means TRL's defaults (0.2, and 0.4 in log
            space for gmpo; ``epsilon_high`` defaults to ``epsilon``). For cispo ``epsilon_high`` is an absolute cap.
        delta: upper cap on the ratio inside the min (two-sided clipping), or ``None``.
        beta: coefficient of the k3 KL to ``ref_logp`` (``[B, T]``, required when ``beta != 0``).
        use_bias_correction_kl: multiply the KL by the importance ratio.
        importance_sampling_ratio: vLLM's truncated/masked IS ratio, ``[B, T]`` or ``[B]``/``[B, 1]``, no grad.
        num_items_in_batch: token count of the whole generation batch over all processes (the loss types of
            :data:`GLOBAL_TOKEN_LOSSES`: dapo, cispo, vespo, gpg); default: ``mask.sum()``, allowed only with one
            process and no accumulation.
        max_completion_length: ``L_max`` of dr_grpo.
        grad_accum_steps, num_processes: TRL's GA and P (docs/semantics.md section 9).
        entropy: optional ``[B, T]`` token entropies, only for the ``entropy`` metric.
        loss_mask: optional ``[B, T]`` (bool or float, no gradient): TRL's entropy mask (:func:`high_entropy_mask`).
            It multiplies each token's policy term (gmpo: narrows the geometric mean's tokens); the KL, the
            normaliser and the metrics still count every token of ``mask``, as in TRL.
        sapo_* / vespo_*: the loss types' own hyperparameters (:data:`LOSS_PARAMS`; TRL's names and defaults).

        The hyperparameter keywords (``algorithm`` ... and every :data:`LOSS_PARAMS` name) are the fields of
        :class:`LossConfig`, which holds their defaults; any other keyword is a ``TypeError``.
        backend: ``"auto"`` or ``"torch"``; the fused fast paths start from logits (``fused_policy_loss``).

    Returns:
        ``(loss, metrics)``: a 0-dim float32 loss with autograd to ``logp``, and a dict of detached 0-dim
        float32 tensors with TRL's names (``kl``, ``entropy``, ``clip_ratio/*``, ``cispo_clip_ratio``,
        ``vespo/phi_seq_mean``) computed on this call's rows (reduce over processes yourself).
    """
    cfg = loss_config_from("policy_loss", loss_kwargs)
    kwargs = dict(ref_logp=ref_logp, importance_sampling_ratio=importance_sampling_ratio,
                  num_items_in_batch=num_items_in_batch, entropy=entropy, loss_mask=loss_mask)
    check_loss_inputs(cfg, logp, old_logp, advantages, mask, **kwargs)
    backends.select("policy_loss", backend, logp.device)  # validates the name; the torch math is the op
    return policy_loss_ref(cfg, logp, old_logp, advantages, mask, **kwargs)
