"""gfpo-fast for TRL users: GFPO, and TRL's GRPO / GSPO / GSPO-token / GMPO trainers on gfpo-fast's loss.

Supported TRL: ``>=1.13,!=1.15.*,<1.17`` (:data:`SUPPORTED_TRL`), the releases the tests ran against on the
CPU in fp32: 1.13.0 (also against its own GSPO-token trainer), 1.14.0 and 1.16.0 (the newest). TRL 1.15's
own log-prob kernel needs Triton on a GPU, so TRL cannot run on a CPU there and 1.15 is left out until it is
tested on a GPU. Importing this module with another TRL raises ``ImportError`` naming the range. Install
with ``pip install 'gfpo-fast[trl]'``.

Fast loss (``FastGRPOTrainer``, ``FastGMPOTrainer``, or ``patch(trainer)`` on an existing instance):
only ``_compute_loss`` changes. The policy forward is the model's own, through its DDP / PEFT wrappers (DDP
synchronises gradients only through its own forward, so the decoder is not called alone) and with its
gradient checkpointing, with ``output_hidden_states=True`` and ``logits_to_keep=1``, so the lm_head
projects one position per row; the last hidden states of the ``T`` completion positions and the output
layer as :func:`gfpo_fast.lm_head.lm_head_of` reads it -- the lm_head weight (tied or not, a peft LoRA head's
adapters merged, with gradients to them), its bias, and the config's logit scale and final-logit soft-cap
(Gemma 2/3, Granite, Cohere, ...) -- go to :func:`gfpo_fast.fused_linear_policy_loss`, which computes
log-probs, the loss and its gradient one chunk of tokens at a time: the ``[B, T, V]`` logits never exist
whole. Under FSDP2 the lm_head weight is a DTensor, which the op gathers (its gradient averaged back to the
shards, as FSDP2 averages its own). Under autocast the projection runs in the autocast dtype, as the model's
lm_head would. TRL's normalisers and metric names are kept (``entropy``, ``kl``, ``clip_ratio/*``, ``cispo_clip_ratio``,
``vespo/phi_seq_mean``, reduced over processes as TRL does). Generation, rewards, advantages, old /
reference log-probs and the optimizer are TRL's. GSPO-token, which TRL 1.14 dropped with
``trl.experimental.gspo_token``, is ``FastGRPOTrainer`` with ``GRPOConfig(importance_sampling_level=
"sequence_token")`` (loss types grpo, bnpo, dr_grpo, dapo).

Logits path (the fallback): where :func:`gfpo_fast.lm_head.lm_head_of` does not understand the output layer
(a quantized lm_head, a DoRA adapter, ...) or the config's logit transform (a transform field of a model type
it does not list), or, checked once on the first step, the model's logits at the last position differ from the
head's logits of its last hidden state -- or where the lm_head weight is sharded outside the forward in a form
the op cannot gather (FSDP1's flat parameters, DeepSpeed ZeRO-3), the trainer logs the reason once and uses the
model's own forward with ``logits_to_keep = T + 1`` and :func:`gfpo_fast.fused_policy_loss` on the ``[B, T, V]``
completion logits: the same objective, with the memory of full logits. In evaluation (no grad) the hidden-state
path briefly holds every layer's hidden states of the micro-batch (training keeps them for backward anyway).

Config fields that shape the loss are honoured: ``loss_type``, ``importance_sampling_level``, ``epsilon``,
``epsilon_high``, ``delta``, ``beta``, ``use_bias_correction_kl``, ``max_completion_length`` (dr_grpo),
``temperature``, ``sapo_*``, ``vespo_*``, ``num_iterations`` / ``steps_per_generation`` (old log-probs, the
dapo normaliser), the vLLM importance-sampling ratio, ``mask_truncated_completions`` and tool masks. Refused
at construction with a ``ValueError`` naming the field: ``top_entropy_quantile < 1``,
``off_policy_mask_threshold``, ``entropy_coef != 0`` / ``use_adaptive_entropy``, a MoE auxiliary loss
(``router_aux_loss_coef`` must be 0 for MoE models); for GMPO also the fields TRL's GMPO ignores
(``delta``, ``importance_sampling_level != "token"``, ``use_bias_correction_kl`` with ``beta != 0``, the vLLM
ratio). Vision-language batches are refused at the first step. The model must accept ``logits_to_keep`` and
``output_hidden_states`` (transformers' causal LMs do).

GFPO (``GFPOConfig``, ``GFPOTrainer``; API of TRL v1.7.1's removed experimental trainer, docs/semantics.md
section 12): after TRL scores a generation batch, ``group_filter_func`` scores every completion, the top
``num_remains_in_group`` of each group (rows ``[g*G, (g+1)*G)``) are kept, their advantages come from the
kept rows only (:func:`gfpo_fast.gfpo_filter`), and the rejected rows are removed from the batch, so they
never enter the policy forward or backward; ``num_items_in_batch`` is recounted over the kept rows.
Differences from v1.7.1: the filter sees the right groups (v1.7.1 passed shifted windows), ``2 <= k < G``
is enforced, kept rows keep their original order, ties go to the lower row, the scores are broadcast from
process 0 (a stochastic filter cannot disagree across processes), unscorable rows (every reward None) are
left out of the kept-row statistics, and TRL's reward metrics still describe every generated completion.
GFPOTrainer uses TRL's own loss; ``patch(GFPOTrainer(...))`` puts it on gfpo-fast's.
"""
from __future__ import annotations

import dataclasses
import logging
import types
import warnings

import torch

try:
    import trl
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
except ImportError as err:  # pragma: no cover - the module is only imported by TRL users
    raise ImportError("gfpo_fast.integrations.trl needs TRL: pip install 'gfpo-fast[trl]'") from err

SUPPORTED_TRL = ">=1.13,!=1.15.*,<1.17"
if Version(trl.__version__).base_version not in SpecifierSet(SUPPORTED_TRL):
    raise ImportError(
        f"gfpo_fast.integrations.trl supports trl{SUPPORTED_TRL}, found trl {trl.__version__}; "
        f"install a supported one with pip install 'trl{SUPPORTED_TRL}'"
    )

from accelerate.utils import broadcast, gather, gather_object  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import get_config_model_id, nanmax, nanmin  # noqa: E402

with warnings.catch_warnings():  # TRL warns on every import of an experimental module
    warnings.simplefilter("ignore")
    from trl.experimental.gmpo import GMPOTrainer  # noqa: E402

from .._checks import require_num_remains  # noqa: E402
from ..advantages import gfpo_filter, weighted_rewards  # noqa: E402
from ..fused_linear import fused_linear_policy_loss  # noqa: E402
from ..fused_policy_loss import fused_policy_loss  # noqa: E402
from ..group_filter import score_groups  # noqa: E402
from ..lm_head import lm_head_of  # noqa: E402
from ..policy_loss import LOSS_PARAMS, loss_type, make_loss_config  # noqa: E402

__all__ = ["SUPPORTED_TRL", "FastGMPOTrainer", "FastGRPOTrainer", "GFPOConfig", "GFPOTrainer", "patch"]

logger = logging.getLogger(__name__)

# Batch fields of vision-language models: the fast forward does not pass them to the model.
VISION_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
               "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
EXTREME_METRICS = ("clip_ratio/low_min", "clip_ratio/high_max")


# ----------------------------------------------------------------------------- fast loss
def _loss_kwargs(args: GRPOConfig, algorithm: str) -> dict:
    """The gfpo-fast loss keywords of a TRL config; raises ValueError for a field the fast loss cannot honour."""
    refused = [
        ("top_entropy_quantile", args.top_entropy_quantile != 1.0, "the high-entropy token mask is not implemented; "
         "set top_entropy_quantile=1.0"),
        ("off_policy_mask_threshold", args.off_policy_mask_threshold is not None, "off-policy sequence masking is "
         "not implemented; set off_policy_mask_threshold=None"),
        ("entropy_coef", args.entropy_coef != 0.0 or args.use_adaptive_entropy, "the entropy bonus is not "
         "implemented; set entropy_coef=0.0 and use_adaptive_entropy=False"),
    ]
    bias_kl = args.use_bias_correction_kl and args.beta != 0.0  # TRL's default is True; it matters only with a KL
    if algorithm == "gmpo":
        ignored = "TRL's GMPOTrainer ignores it, so the objective would not be the one asked for"
        refused += [
            ("delta", args.delta is not None, f"{ignored}; set delta=None"),
            ("importance_sampling_level", args.importance_sampling_level != "token", f"{ignored}; leave it 'token'"),
            ("use_bias_correction_kl", bias_kl, f"{ignored} when beta != 0; set it to False"),
            ("vllm_importance_sampling_correction", args.use_vllm and args.vllm_importance_sampling_correction,
             f"{ignored} (GMPO never applies the vLLM ratio); set vllm_importance_sampling_correction=False"),
        ]
    for name, bad, why in refused:
        if bad:
            raise ValueError(f"{name}={getattr(args, name)!r} is not supported by gfpo-fast's {algorithm} loss: {why}")
    kwargs = dict(algorithm=algorithm, epsilon=args.epsilon, epsilon_high=args.epsilon_high, beta=args.beta)
    if algorithm == "grpo":
        kwargs.update(
            loss_type=args.loss_type, importance_sampling_level=args.importance_sampling_level, delta=args.delta,
            use_bias_correction_kl=bias_kl, max_completion_length=args.max_completion_length,
            # the loss types' hyperparameters: GRPOConfig's fields of the same name (one it lacks keeps its default)
            **{p.name: getattr(args, p.name) for p in LOSS_PARAMS if hasattr(args, p.name)},
        )
    make_loss_config(**kwargs)  # the field names match GRPOConfig's, so its errors name the field to change
    return kwargs


def _install(trainer: GRPOTrainer, algorithm: str) -> None:
    """Checks a constructed trainer and stores what the fast ``_compute_loss`` reads: the loss keywords and
    ``_gf_logits_reason``, why the loss must come from the logits (None: from the hidden states)."""
    kwargs = _loss_kwargs(trainer.args, algorithm)
    if trainer.aux_loss_enabled:
        raise ValueError(
            f"router_aux_loss_coef={trainer.router_aux_loss_coef} adds a MoE load-balancing loss, which gfpo-fast's "
            "loss does not compute; set router_aux_loss_coef=0.0 or use TRL's trainer"
        )
    trainer._gf_loss_kwargs = kwargs
    trainer._gf_head_verified = False
    trainer._gf_logits_reason = None
    reason = _static_logits_reason(trainer)
    if reason is not None:
        _use_logits_path(trainer, reason)


def _static_logits_reason(trainer) -> str | None:
    """Why, from the setup alone, the lm_head weight cannot stand for the model's output layer (None: it can)."""
    deepspeed = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    # FSDP2's DTensor weights are gathered by the fused-linear ops (gather_full); FSDP1's flat parameters and
    # ZeRO-3's partitions are not tensors the op can gather.
    if trainer.is_fsdp_enabled and not trainer.accelerator.is_fsdp2:
        return "FSDP1 flattens the lm_head weight into its FlatParameter outside the model's forward (use FSDP2)"
    if deepspeed is not None and deepspeed.zero_stage == 3:
        return "DeepSpeed ZeRO-3 partitions the lm_head weight outside the model's forward"
    try:
        with torch.no_grad():  # only whether it can be read (a LoRA head is merged again on every step)
            lm_head_of(trainer.model)
    except ValueError as err:  # a head or a logit transform the fused-linear path cannot reproduce
        return str(err)
    return None


def _use_logits_path(trainer, reason: str) -> None:
    trainer._gf_logits_reason = reason
    logger.warning("gfpo-fast computes the loss of this model from its full [B, T, V] completion logits, not from "
                   "its hidden states and lm_head weight: %s", reason)


def _completion_hidden(trainer, model, input_ids, attention_mask, T: int):
    """``(hidden [B, T, H], head keywords)``: the hidden states and the :class:`gfpo_fast.lm_head.LMHead`'s
    ``weight``, ``bias`` (cast to the lm_head's compute dtype), ``scale`` and ``softcap``, from the model's own
    forward.

    The lm_head projects only the last position. On the first call the model's logits there are checked against
    the head's; if they differ, the trainer switches to the logits path and this returns None.
    """
    head = lm_head_of(trainer.accelerator.unwrap_model(model))  # a LoRA head merged here, with gradients
    with trainer.accelerator.autocast():
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, output_hidden_states=True,
                    use_cache=False)
        last = out.hidden_states[-1]
        hidden, head_kwargs = head.op_inputs(last[:, -(T + 1):-1])
        if not trainer._gf_head_verified:
            try:
                head.check(last[:, -1], out.logits[:, -1])  # one host read, once
            except ValueError as err:
                _use_logits_path(trainer, str(err))
                return None
            trainer._gf_head_verified = True
    return hidden, head_kwargs


def _fast_compute_loss(self, model, inputs):
    """``GRPOTrainer._compute_loss`` on gfpo-fast: the same loss value, gradient and metrics as TRL's."""
    vision = sorted(k for k in VISION_KEYS if inputs.get(k) is not None)
    if vision:
        raise ValueError(f"gfpo-fast's TRL loss does not support vision-language batches (got {vision}); "
                         "use TRL's own trainer for this model")
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    completion_mask = inputs["completion_mask"]
    mask = completion_mask if inputs.get("tool_mask") is None else completion_mask * inputs["tool_mask"]
    T = completion_ids.size(1)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)

    train = self.model.training
    kwargs = dict(self._gf_loss_kwargs, num_processes=self.accelerator.num_processes,
                  grad_accum_steps=self.current_gradient_accumulation_steps if train else 1)
    if self.beta != 0.0:
        kwargs["ref_logp"] = inputs["ref_per_token_logps"]
    if kwargs["algorithm"] == "grpo":
        n = inputs["num_items_in_batch"]  # tokens of the generation batch; TRL rescales it to one accumulation window
        kwargs["num_items_in_batch"] = n * kwargs["grad_accum_steps"] / self.args.steps_per_generation if train else n
        if loss_type(self.loss_type).token_is_ratio or (self.use_vllm and self.vllm_importance_sampling_correction):
            kwargs["importance_sampling_ratio"] = inputs.get("importance_sampling_ratio")
    loss_args = (completion_ids, inputs.get("old_per_token_logps"), inputs["advantages"], mask)
    kwargs.update(temperature=self.temperature, return_entropy=True)

    linear = None if self._gf_logits_reason else _completion_hidden(self, model, input_ids, attention_mask, T)
    if linear is not None:
        hidden, head = linear
        loss, metrics = fused_linear_policy_loss(hidden, head.pop("weight"), *loss_args, **head, **kwargs)
    else:
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=T + 1, use_cache=False)
        # (B, T, V): position t predicts completion token t
        loss, metrics = fused_policy_loss(out.logits[:, :-1], *loss_args, **kwargs)
    _log_loss_metrics(self, metrics, mask)
    return loss


def _log_loss_metrics(trainer, metrics: dict, mask: torch.Tensor) -> None:
    """Appends the loss metrics to ``trainer._metrics`` with TRL's cross-process weighting (one host sync).

    Means are weighted by the tokens of each process (by its rows for per-sequence quantities: sequence-level
    ratios and VESPO's weight); ``low_min`` / ``high_max`` are the NaN-aware extremes over processes.
    """
    kw = trainer._gf_loss_kwargs
    per_row = set()
    if kw["algorithm"] == "grpo":  # at level "sequence" every metric of the loss type is one value per sequence
        spec = loss_type(kw["loss_type"])
        per_row = set(spec.metrics if kw["importance_sampling_level"] == "sequence" else spec.row_metrics)
    means = [name for name in metrics if name not in EXTREME_METRICS]
    n_tok, n_row = mask.sum().float(), torch.tensor(float(mask.shape[0]), device=mask.device)
    counts = torch.stack([n_row if name in per_row else n_tok for name in means])
    values = torch.stack([metrics[name].to(mask.device) for name in means])
    totals = trainer.accelerator.reduce(torch.stack([values * counts, counts]), reduction="sum")
    reduced = list(totals[0] / totals[1].clamp(min=1.0))
    extremes = [name for name in EXTREME_METRICS if name in metrics]
    if extremes:
        gathered = trainer.accelerator.gather(torch.stack([metrics[name].to(mask.device) for name in extremes]))
        gathered = gathered.view(-1, len(extremes))
        reduced += [nanmin(gathered[:, i]) if name.endswith("min") else nanmax(gathered[:, i])
                    for i, name in enumerate(extremes)]
    mode = "train" if trainer.model.training else "eval"
    for name, value in zip(means + extremes, torch.stack(reduced).tolist()):  # host sync
        trainer._metrics[mode][name].append(value)


class FastGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` (same constructor) with the loss computed by gfpo-fast (module docstring).

    Also the GSPO (``importance_sampling_level="sequence"``) and GSPO-token (``"sequence_token"``) trainer.
    """

    def __init__(self, model, reward_funcs=None, args=None, *more, **kwargs):
        if args is not None:
            _loss_kwargs(args, "grpo")  # fail before the models are loaded
        super().__init__(model, reward_funcs, args, *more, **kwargs)
        _install(self, "grpo")

    _compute_loss = _fast_compute_loss


class FastGMPOTrainer(GMPOTrainer):
    """TRL's ``trl.experimental.gmpo.GMPOTrainer`` (same constructor) with the loss computed by gfpo-fast."""

    def __init__(self, model, reward_funcs, args=None, **kwargs):
        if args is not None:
            _loss_kwargs(args, "gmpo")
        super().__init__(model, reward_funcs, args=args, **kwargs)
        _install(self, "gmpo")

    _compute_loss = _fast_compute_loss


def patch(trainer: GRPOTrainer) -> GRPOTrainer:
    """Puts a constructed TRL ``GRPOTrainer`` or ``GMPOTrainer`` (or a subclass, e.g. ``GFPOTrainer``) on gfpo-fast's
    loss.

    Only this instance changes (its ``_compute_loss`` is rebound); nothing process-wide is patched. A trainer
    whose class overrides ``_compute_loss`` with another objective is refused. Returns the trainer.
    """
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"patch expects a trl GRPOTrainer (or subclass), got {type(trainer).__name__}")
    own = type(trainer)._compute_loss
    if own not in (GRPOTrainer._compute_loss, GMPOTrainer._compute_loss, _fast_compute_loss):
        raise ValueError(
            f"{type(trainer).__name__} overrides _compute_loss; patching it would replace that objective with "
            "GRPO's. Patch a GRPOTrainer, a GMPOTrainer or a subclass that keeps their loss"
        )
    _install(trainer, "gmpo" if isinstance(trainer, GMPOTrainer) else "grpo")
    trainer._compute_loss = types.MethodType(_fast_compute_loss, trainer)
    return trainer


# ----------------------------------------------------------------------------- GFPO
@dataclasses.dataclass
class GFPOConfig(GRPOConfig):
    """``GRPOConfig`` plus GFPO's ``num_remains_in_group`` (TRL v1.7.1's ``GFPOConfig``)."""

    num_remains_in_group: int | None = dataclasses.field(
        default=None,
        metadata={"help": "k, the completions kept per group by the group filter (2 <= k < num_generations); "
                          "None disables the filter (plain GRPO)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_remains_in_group is not None:
            require_num_remains(self.num_remains_in_group, self.num_generations)


# Per-row fields of TRL's generation batch, filtered with the rows; any other field is refused.
ROW_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "old_per_token_logps",
            "importance_sampling_ratio", "sampling_per_token_logps", "ref_per_token_logps", "tool_mask")


class GFPOTrainer(GRPOTrainer):
    """Group Filtered Policy Optimization (arXiv 2508.09726) on TRL's ``GRPOTrainer`` (module docstring).

    ``group_filter_func`` has TRL's contract (:mod:`gfpo_fast.group_filter` states it): it scores every
    completion of the global generation batch from its group's completions and weighted rewards (and token
    ids, if it takes ``group_completion_ids``), higher = kept: ``-len`` keeps the shortest, ``reward / len``
    the most token-efficient.
    Arguments after ``peft_config`` are passed to ``GRPOTrainer`` (``tools``, ``rollout_func``, ...).
    """

    def __init__(self, model, reward_funcs, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 reward_processing_classes=None, group_filter_func=None, callbacks=None, optimizers=(None, None),
                 peft_config=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = GFPOConfig(f"{name.split('/')[-1]}-GFPO")
        k = getattr(args, "num_remains_in_group", None)
        if k is not None:
            self._check_gfpo_args(args, k, group_filter_func)
        elif group_filter_func is not None:
            logger.warning("group_filter_func is inactive: num_remains_in_group is not set")
        super().__init__(model, reward_funcs, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, reward_processing_classes=reward_processing_classes,
                         callbacks=callbacks, optimizers=optimizers, peft_config=peft_config, **kwargs)
        self.group_filter_func = group_filter_func
        self.num_remains_in_group = k
        self._gfpo_pending = None

    @staticmethod
    def _check_gfpo_args(args, k, group_filter_func) -> None:
        if group_filter_func is None:
            raise ValueError(f"num_remains_in_group={k} needs a group_filter_func to rank the completions of a group")
        G = args.num_generations
        local_rows = args.per_device_train_batch_size * args.steps_per_generation
        if local_rows % G:
            raise ValueError(
                f"GFPO filters whole groups on each process: per_device_train_batch_size * steps_per_generation = "
                f"{local_rows} must be a multiple of num_generations={G}"
            )
        if (args.per_device_train_batch_size * k) % G:
            raise ValueError(
                f"after filtering, a micro-batch holds per_device_train_batch_size * num_remains_in_group / "
                f"num_generations = {args.per_device_train_batch_size} * {k} / {G} rows, which must be an integer "
                "(otherwise TRL's split would drop rows); change per_device_train_batch_size or num_remains_in_group"
            )
        if args.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("GFPO computes its advantages from the weighted reward sum: set "
                             "multi_objective_aggregation='sum_then_normalize'")

    def _filtering(self) -> bool:
        return self.num_remains_in_group is not None and self.model.training

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._filtering():  # kept for the filter, which runs on the scored batch
            self._gfpo_pending = (rewards_per_func, gather_object(completions), gather_object(completion_ids_list))
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if not self._filtering():
            return batch
        pending, self._gfpo_pending = self._gfpo_pending, None
        return self._filter_groups(batch, *pending)

    def _filter_groups(self, batch, rewards_per_func, completions, completion_ids):
        """Keeps the top-k rows of every group of ``batch``, with GFPO advantages and a recounted token total."""
        known = (*ROW_KEYS, "num_items_in_batch")
        unknown = sorted(key for key, v in batch.items() if v is not None and key not in known)
        if unknown:
            raise ValueError(f"GFPOTrainer cannot filter the batch fields {unknown} (vision-language inputs); "
                             "use GRPO for this model")
        G, k = self.num_generations, self.num_remains_in_group
        rewards = weighted_rewards(rewards_per_func, self.reward_weights)  # (N,)
        scores = score_groups(self.group_filter_func, completions, rewards, G, completion_ids=completion_ids)
        scores = broadcast(scores)  # every process keeps the rows process 0 chose
        advantages, keep = gfpo_filter(rewards, scores, G, k, scale_rewards=self.scale_rewards)

        n_local = batch["completion_ids"].shape[0]
        local = slice(self.accelerator.process_index * n_local, (self.accelerator.process_index + 1) * n_local)
        kept = keep[local]
        out = {key: (v[kept] if key in ROW_KEYS and v is not None else v) for key, v in batch.items()}
        out["advantages"] = advantages[local][kept]
        loss_mask = out["completion_mask"]
        if out.get("tool_mask") is not None:
            loss_mask = loss_mask * out["tool_mask"]
        out["num_items_in_batch"] = gather(loss_mask.sum()).sum()
        # The completions table shows the advantages that train (rejected rows: 0), not GRPO's.
        logged = self._logs["advantages"]
        for _ in range(min(len(logged), rewards.numel())):
            logged.pop()
        logged.extend(advantages.tolist())
        return out
