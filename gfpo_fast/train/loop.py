"""The training loop of ``python -m gfpo_fast.train``: a lean GRPO-family RL loop on accelerate and gfpo-fast's
fused ops (``__main__`` holds the command alone).

``train()`` takes the output_dir (``ownership``: a lock, no earlier run overwritten), checks what it can
before any model loads, sets up once, then loops over one generation batch per step, in phases that are plain
functions of this module, each timed under its name (``time/<name>`` in the metrics):

    weight_sync       vLLM only: the policy's weights into the engine
    generate          G completions per prompt                                -> Rollout
    reward            score them; gather every process's rewards               -> Scores (score_rollout)
                      (--dynamic_sampling: both again until enough groups vary: sample_groups)
    advantages        group-relative advantages; GFPO keeps k per group and
                      the dropped rows leave before any forward (compaction)   -> Batch (make_batch)
    old_ref_logprobs  no-grad old / reference log-probs and vLLM's IS ratio, when needed (old_and_ref_logprobs)
                      then, per optimizer step (steps_per_generation / gradient_accumulation_steps mini-batches
                      of the generation batch, num_iterations times over: mini_batches):
    policy_forward    the model and the loss forward, per micro-batch (with
                      an entropy or off-policy mask, one no-grad lm_head pass
                      first: loss_mask)                                        (accumulate_gradients)
    backward          their backward
    optimizer         clip, step (skipped when the loss or the gradient norm is
                      not finite: NonFiniteGuard stops the run after
                      max_nonfinite_steps in a row), schedule                  (optimizer_step)
    ref_sync          sync_ref_model, every ref_model_sync_steps optimizer
                      steps: the reference mixed toward the policy             (sync_ref_model)

then ``step_metrics`` (one host read) to ``reporting.Reporter`` (metrics.jsonl, the ``report_to`` trackers, the
``log_completions`` samples), a held-out eval every ``eval_steps`` and a checkpoint every ``save_steps``. No
``[B, T, V]`` logits are built: every model pass (policy, old, reference) returns its last hidden states, and the loss
(``gfpo_fast.fused_linear_policy_loss``: Triton on CUDA, C++ or torch on the CPU), the no-grad log-probs
(``gfpo_fast.fused_linear_logprobs``) and the entropy metric project them through the lm_head
(``gfpo_fast.lm_head.lm_head_of``: tied, biased, LoRA'd, scaled or soft-capped) one ``lm_head_chunk_size`` chunk
of tokens at a time; ``verify_lm_head`` checks at setup that the head reproduces the model's logits. It is
on-policy by default
(``num_iterations=1``): the ratio is 1 in value and the loss is the clipped surrogate's plain policy
gradient, exactly as TRL computes it without old log-probs. The G completions of a prompt share its
forward pass: each distinct prompt is prefilled once for generation and run once in the policy forward
and backward (``prefix.py``), with the same values and gradients, with or without gradient checkpointing.

The embedded default (no arguments) trains SmolLM2-135M-Instruct with GRPO (dapo loss; ``--algorithm gfpo``
adds the group filter: length, 6 of 8 kept) on single-digit arithmetic word problems: 40 steps of 2 prompts
x 8 completions of at most 48 tokens at temperature 0.7, lr 1e-5 (3 warm-up steps, then linear decay),
evaluating greedy and sampled accuracy on 128 held-out problems before and after (a shorter run evaluates
fewer: ``--eval_num_prompts``).
The base model is right 24% of the time sampled at T=0.7 and 31% greedy on those problems, so almost
every group carries a learning signal
(``bench/results/train/`` has the measured runs: step time, accuracy before and after).

FSDP2 and DeepSpeed come from ``accelerate config`` files (``examples/accelerate/``: ``accelerate launch
--config_file examples/accelerate/fsdp.yaml -m gfpo_fast.train``; on the CPU ``distributed.py`` shards with
``fully_shard`` where accelerate will not): the loop does its own gradient accumulation (the loss is already
normalised by TRL's rules), so DeepSpeed runs with ``gradient_accumulation_steps: 1`` in its config and in the
trainer; checkpoints hold a full state dict and the optimizer sharded (``checkpoint.py``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import uuid
import warnings
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, set_seed

import gfpo_fast as gf
from gfpo_fast.advantages import weighted_rewards
from gfpo_fast.fused_linear import gather_full
from gfpo_fast.group_filter import GroupFilter
from gfpo_fast.lm_head import lm_head_of
from gfpo_fast.policy_loss import high_entropy_mask

from . import checkpoint as ckpt
from . import distributed, lora
from .config import TrainConfig
from .data import PromptSampler, load_rows, screen_prompts
from .dynamic_sampling import enough, pick_groups, varied_groups
from .evaluation import evaluate
from .generation import (
    Rollout,
    VLLMColocate,
    check_fresh,
    concat_rollouts,
    engine_dtype,
    eos_token_ids,
    generate_transformers,
    off_policy_mask,
    sync_check,
)
from .models import load_model_and_tokenizer, resolve_model_path
from .ownership import own_output_dir
from .prefix import (
    allow_checkpointed_prefix,
    cache_name,
    can_share_under_checkpointing,
    left_padded_positions,
    prompt_cache,
    read_only,
)
from .reporting import Reporter, StepTimer, peak_memory_gb, trackers
from .rewards import accuracy_name, as_completions, build_reward_funcs, check_columns, score


class NonFiniteError(RuntimeError):
    """The run stopped after ``max_nonfinite_steps`` steps in a row with a non-finite loss or gradient norm."""


# ----------------------------------------------------------------------------- what flows through a step
@dataclass
class Scores:
    """The generation batch of every process, scored: ``N = B * num_processes`` rows, each group's ``G`` adjacent."""

    rewards: torch.Tensor  # (N, F) float32, one column per reward function; NaN where it returned None
    lengths: torch.Tensor  # (N,) long, completion tokens up to and including the first EOS
    truncated: torch.Tensor  # (N,) bool, no EOS within max_completion_length
    completions: list  # this process's B completions as the reward functions got them (text or messages)
    logged: dict[str, float]  # what the reward functions logged with log_metric (this process)


@dataclass
class Batch:
    """The rows of one step that enter the loss on this process (GFPO's dropped rows are gone).

    ``B`` kept rows, ``P`` prompt columns (left-padded), ``T`` completion columns (right-padded); columns
    that are padding in every row are trimmed. ``batch[s]`` is the micro-batch of rows ``s`` (a slice):
    every per-row field is sliced, ``None`` fields stay ``None``, ``num_items`` is the step's.
    """

    prompt_ids: torch.Tensor  # (B, P) long
    prompt_mask: torch.Tensor  # (B, P) long, 1 on prompt tokens
    completion_ids: torch.Tensor  # (B, T) long
    completion_mask: torch.Tensor  # (B, T) long, 1 on loss tokens (0 on truncated rows with mask_truncated_completions)
    advantages: torch.Tensor  # (B,) float32
    num_items: torch.Tensor  # () loss tokens over every process: the dapo / cispo / vespo normaliser
    sampling_logp: torch.Tensor | None = None  # (B, T) float32, the vLLM engine's log-probs of the sampled tokens
    old_logp: torch.Tensor | None = None  # (B, T) float32, the policy before this step's updates (old_and_ref_logprobs)
    ref_logp: torch.Tensor | None = None  # (B, T) float32, the reference model (beta != 0)
    is_ratio: torch.Tensor | None = None  # (B, T) token modes, (B, 1) sequence modes: vLLM's IS ratio

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def __getitem__(self, rows: slice) -> Batch:
        per_row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "num_items"}
        return dataclasses.replace(self, **{k: None if v is None else v[rows] for k, v in per_row.items()})


# ----------------------------------------------------------------------------- setup helpers
def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator: bf16 mixed precision on a GPU unless ``cfg.bf16`` says otherwise; ``cpu=True`` without one;
    the trackers of ``cfg.report_to`` (started by ``Reporter``), tensorboard's under ``output_dir/tensorboard``.

    Decided before the Accelerator exists (mixed precision is fixed at construction). Without a GPU the
    Accelerator is told cpu=True: otherwise ``accelerate launch --num_processes 2`` on a CPU machine starts two
    unconnected single-process runs (DistributedType.NO, each one "main") instead of one gloo group.
    """
    on_gpu = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else on_gpu
    if bf16 and not on_gpu:
        raise ValueError("bf16=True on the CPU: without AVX512-BF16/AMX it is ~20x slower than float32; "
                         "leave bf16 unset (or false) here")
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "tensorboard"))
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not on_gpu,
                              log_with=trackers(cfg.report_to) or None, project_config=project)
    if accelerator.distributed_type.value == "DEEPSPEED" and cfg.gradient_accumulation_steps > 1:
        raise ValueError("gradient_accumulation_steps > 1 under DeepSpeed: its engine steps the optimizer on every "
                         "backward, so the micro-batches would each take a step; use gradient_accumulation_steps=1 "
                         "with a larger per_device_train_batch_size, or DDP / FSDP")
    return accelerator


def load_policy(cfg: TrainConfig, resume: Path | None):
    """``(model, tokenizer)`` to train: the model of ``cfg`` (or of the checkpoint ``resume``); with ``use_peft`` the
    base model of ``cfg`` (quantized with ``load_in_4bit`` / ``8bit``) under a new LoRA adapter or the checkpoint's."""
    if not cfg.use_peft:
        return load_model_and_tokenizer(str(resume / "model") if resume else cfg.model_name_or_path, cfg.dtype,
                                        cfg.gradient_checkpointing)
    lora.require_peft()
    model, tokenizer = load_model_and_tokenizer(cfg.model_name_or_path, cfg.dtype, cfg.gradient_checkpointing,
                                                lora.quantization_config(cfg))
    return lora.add_adapter(model, cfg, resume / "model" if resume else None), tokenizer


def apply_liger_kernel(model) -> None:
    """Liger-Kernel's RMSNorm, RoPE and SwiGLU kernels in ``model``, as TRL's ``use_liger_kernel`` does, without its
    fused linear cross-entropy (the loss stays gfpo-fast's fused-linear one). CUDA only: a ``ValueError`` on the
    CPU, without liger-kernel, or for a model type Liger does not patch (it would otherwise change nothing)."""
    if not torch.cuda.is_available():
        raise ValueError("use_liger_kernel=True needs CUDA: Liger-Kernel's kernels are Triton GPU kernels; leave "
                         "use_liger_kernel false on the CPU")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as err:
        raise ValueError("use_liger_kernel=True needs liger-kernel: `pip install liger-kernel`") from err
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model.config.model_type)
    if apply is None:
        raise ValueError(f"use_liger_kernel=True: Liger-Kernel has no kernels for model_type "
                         f"{model.config.model_type!r} (it patches {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))})")
    apply(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel (one pass over all parameters; CPU and CUDA, fp32/bf16/fp16)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)


def make_scheduler(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' ``get_scheduler(lr_scheduler_type)``, as TRL builds it, one step in, so that the first step
    already trains: ``warmup_steps`` W and ``max_steps`` N are given as W + 1 and N + 1 and the schedule is stepped
    once, and step s (from 0) gets transformers' factor of step s + 1. For "linear" that is ``(s + 1) / (W + 1)``
    during the warm-up, then ``(N - s) / (N - W)``: transformers' own decay, and the warm-up this trainer always
    had; called plainly, transformers' warm-up would give the first step learning rate 0 (a whole generation
    batch for nothing)."""
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps + 1,
                              num_training_steps=cfg.max_steps + 1, scheduler_specific_kwargs=cfg.lr_scheduler_kwargs)
    with warnings.catch_warnings():  # stepped before any optimizer step on purpose
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
        scheduler.step()
    return scheduler


def check_scheduler(cfg: TrainConfig) -> None:
    """Builds ``cfg``'s schedule on a throwaway parameter, so that ``lr_scheduler_kwargs`` it does not take are a
    ``ValueError`` naming them before any model loads."""
    try:
        make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"lr_scheduler_kwargs={cfg.lr_scheduler_kwargs!r} do not fit lr_scheduler_type="
                         f"{cfg.lr_scheduler_type!r}: {err}") from err


def checkpoint_state(step: int, scheduler, sampler: PromptSampler, group_filter: GroupFilter | None) -> dict:
    """What a checkpoint holds besides the model, the optimizer and the RNG states (``restore`` reads it back)."""
    return {"scheduler": scheduler.state_dict(), "step": step,
            "sampler": sampler.state_dict(),
            "group_filter": None if group_filter is None else group_filter.state_dict()}


def restore(checkpoint: Path | None, accelerator, seed: int, model, optimizer, scheduler, sampler: PromptSampler,
            group_filter: GroupFilter | None) -> int:
    """Loads ``checkpoint``'s optimizer state (resharded to this run), trainer state and this process's RNG state;
    returns the step to start from. Collective: call it on all ranks.

    A new run (``checkpoint`` None), or a resume on more processes than the checkpoint had, seeds every
    process apart instead (``seed + rank + step``): different sampling on every rank; the prompt order is
    seeded apart (``PromptSampler``).
    """
    step, rng, rank = 0, None, accelerator.process_index
    if checkpoint is not None:
        state, rng = ckpt.load_checkpoint(checkpoint, rank)
        ckpt.load_optimizer(accelerator, checkpoint / ckpt.OPTIMIZER, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        if group_filter is not None:
            group_filter.load_state_dict(state["group_filter"])
        step = state["step"]
    if rng is not None:
        ckpt.set_rng_state(rng)
    else:
        set_seed(seed + rank + step)
    return step


@dataclass
class StopRequest:
    """What ``stop_on_signal`` yields: ``signum`` is the first SIGINT / SIGTERM received, None until then."""

    signum: int | None = None


@contextmanager
def stop_on_signal(reporter: Reporter) -> Iterator[StopRequest]:
    """While open, SIGINT / SIGTERM set the yielded request (the loop checkpoints after the step and stops; the
    command exits with 128 + the signal's number); a second signal stops at once (the last checkpoint stays
    intact). The old handlers come back on exit."""
    requested = StopRequest()

    def on_signal(signum, frame):
        requested.signum = signum
        signal.signal(signum, signal.SIG_DFL)
        reporter.print(f"{signal.Signals(signum).name}: writing a checkpoint after this step (again to abort)")

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- model calls
def trim_padding(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Drops prompt columns that are padding in every row (left) and completion columns likewise (right).

    After GFPO keeps the shortest completions, this shrinks the policy forward. Host sync.
    """
    p0 = int(prompt_mask.any(0).int().argmax())
    t1 = max(int(completion_mask.sum(1).max()), 1)
    return prompt_ids[:, p0:], prompt_mask[:, p0:], completion_ids[:, :t1], completion_mask[:, :t1]


def completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts: bool = False):
    """The policy's last hidden states at the completion tokens: ``(B, T, H)``, position t predicts
    ``completion_ids[:, t]`` through the lm_head (:func:`gfpo_fast.lm_head.lm_head_of`); the lm_head itself
    projects one position per row (``logits_to_keep=1``), so no ``(B, T, V)`` logits are built.

    The model's own forward (through DDP and its gradient checkpointing) with ``output_hidden_states``: it also
    returns every layer's hidden states, which a training forward keeps for its backward anyway. With
    ``share_prompts`` each distinct prompt runs once (``prefix.prompt_cache``) and the rows continue from its
    read-only KV cache; same values and gradients, without G copies of the prompt's work.
    """
    P = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], 1)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)  # (B, P + T)
    position_ids = left_padded_positions(attention_mask)  # (B, P + T)
    cache = prompt_cache(model, prompt_ids, prompt_mask) if share_prompts else None
    if cache is not None:  # feed the last prompt token and the completion but its last token: T positions
        out = model(input_ids=input_ids[:, P - 1:-1], attention_mask=attention_mask[:, :-1],
                    position_ids=position_ids[:, P - 1:-1], use_cache=True, output_hidden_states=True,
                    logits_to_keep=1, **{cache_name(model): read_only(cache)})
        return out.hidden_states[-1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1,
                output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][:, P - 1:-1]  # (B, T, H)


def verify_lm_head(model, prompt: list[int]) -> None:
    """Raises ``ValueError`` unless ``model``'s logits are its lm_head's (:func:`gfpo_fast.lm_head.lm_head_of`) of
    its last hidden states, on one prompt: the loss is computed from the hidden states, so a model that transforms
    its logits in a way the head does not know must stop the run, not train a different objective."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt], device=next(model.parameters()).device), logits_to_keep=1,
                    output_hidden_states=True, use_cache=False)
        lm_head_of(model).check(out.hidden_states[-1][:, -1], out.logits[:, -1])


def micro_batches(n: int, parts: int) -> list[slice]:
    """``parts`` consecutive slices covering ``range(n)`` (the last may be shorter)."""
    size = math.ceil(n / parts)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def mini_batches(batch: Batch, steps: int) -> list[Batch]:
    """``batch`` (a generation batch) split into exactly ``steps`` consecutive mini-batches, one per optimizer step,
    row counts differing by at most one; each carries ``num_items / steps`` as its token count, as TRL scales the
    dapo / cispo / vespo normaliser (the generation batch's tokens) to one step."""
    n = len(batch)
    return [dataclasses.replace(batch[i * n // steps:(i + 1) * n // steps], num_items=batch.num_items / steps)
            for i in range(steps)]


@torch.no_grad()
def batch_logprobs(model, batch: Batch, cfg: TrainConfig, share_prompts: bool, accelerator,
                   parts: int) -> torch.Tensor:
    """No-grad per-token log-probs ``(B, T)`` of ``batch`` under ``model`` (old or reference policy), in ``parts``
    micro-batches, from its hidden states one ``lm_head_chunk_size`` chunk of tokens at a time
    (``gf.fused_linear_logprobs``)."""
    head, out = lm_head_of(accelerator.unwrap_model(model)), []
    for s in micro_batches(len(batch), parts):
        mb = batch[s]
        with accelerator.autocast():
            hidden = completion_hidden(model, mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask,
                                       share_prompts)
            hidden, head_kwargs = head.op_inputs(hidden)
            out.append(gf.fused_linear_logprobs(hidden, token_ids=mb.completion_ids, temperature=cfg.temperature,
                                                chunk_size=cfg.lm_head_chunk_size, **head_kwargs))
    return torch.cat(out)


# ----------------------------------------------------------------------------- the phases of a step
def generate(model, tokenizer, vllm: VLLMColocate | None, prompts: list[list[int]], cfg: TrainConfig,
             eos_ids: list[int], device) -> Rollout:
    """One sampled completion per prompt id list (the caller repeats each prompt G times), from transformers'
    ``generate`` on the unwrapped policy or from the vLLM engine (synced with the policy by the caller)."""
    kwargs = dict(max_new_tokens=cfg.max_completion_length, do_sample=True, temperature=cfg.temperature,
                  top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty,
                  generation_kwargs=cfg.generation_kwargs, eos_ids=eos_ids)
    if vllm is None:
        return generate_transformers(model, tokenizer, prompts, **kwargs)
    return vllm.generate(prompts, pad_id=tokenizer.pad_token_id, device=device, **kwargs)


def score_rollout(ro: Rollout, rows: list[dict], tokenizer, reward_names: list[str], reward_funcs: list,
                  trainer_state, accelerator) -> Scores:
    """Scores this process's completions (``rows``: the dataset row of each) with every reward function, then
    gathers rewards, lengths and truncation flags: every process sees the whole generation batch."""
    completion_ids = ro.completion_lists()  # host sync
    completions = as_completions(tokenizer.batch_decode(completion_ids, skip_special_tokens=True), rows)
    logged = {}
    rewards = score(reward_funcs, reward_names, rows, completions, completion_ids, trainer_state, logged)  # (B, F)
    return Scores(rewards=accelerator.gather(rewards.to(accelerator.device)),
                  lengths=accelerator.gather(ro.completion_mask.sum(1)), truncated=accelerator.gather(ro.truncated),
                  completions=completions, logged=logged)


def sample_groups(draw_round, cfg: TrainConfig, prompts_per_rank: int, accelerator,
                  pad_id: int) -> tuple[list[dict], Rollout, Scores, dict[str, int]]:
    """``(rows, rollout, scores, metrics)`` of this step's generation batch: one round of ``draw_round()`` (which
    draws ``prompts_per_rank`` prompts per process, generates and scores them: ``(rows, Rollout, Scores)``).

    With ``dynamic_sampling``, more rounds until every process holds ``prompts_per_rank`` groups with reward
    variance (at most ``dynamic_sampling_max_draws`` more), then the batch is made of those groups
    (``dynamic_sampling.pick_groups``: equal-reward ones only to fill a process that is still short), the same
    size as one round; ``metrics``: ``dynamic_sampling/draws`` (rounds), ``dynamic_sampling/dropped_groups``
    (equal-reward groups left out) and ``dynamic_sampling/filled_groups`` (kept), over every process.
    """
    rounds = [draw_round()]
    if not cfg.dynamic_sampling:
        return (*rounds[0], {})
    G, world, rank = cfg.num_generations, accelerator.num_processes, accelerator.process_index
    varied = [varied_groups(rounds[0][2].rewards, G, cfg.reward_weights)]
    while len(rounds) <= cfg.dynamic_sampling_max_draws and not enough(varied, world, prompts_per_rank):
        rounds.append(draw_round())
        varied.append(varied_groups(rounds[-1][2].rewards, G, cfg.reward_weights))
    picks, dropped, filled = pick_groups(varied, world, prompts_per_rank)
    B = prompts_per_rank * G  # rows per process and round
    mine = [slice(g * G, (g + 1) * G) for _, g in picks[rank]]
    rows = [row for (d, _), s in zip(picks[rank], mine) for row in rounds[d][0][s]]
    ro = concat_rollouts([rounds[d][1][s] for (d, _), s in zip(picks[rank], mine)], pad_id)
    everyone = [(d, slice(r * B + g * G, r * B + (g + 1) * G)) for r, p in enumerate(picks) for d, g in p]

    def gathered(name: str) -> torch.Tensor:
        return torch.cat([getattr(rounds[d][2], name)[s] for d, s in everyone])

    scores = Scores(rewards=gathered("rewards"), lengths=gathered("lengths"), truncated=gathered("truncated"),
                    completions=[c for (d, _), s in zip(picks[rank], mine) for c in rounds[d][2].completions[s]],
                    logged={k: v for r in rounds for k, v in r[2].logged.items()})
    return rows, ro, scores, {"dynamic_sampling/draws": len(rounds), "dynamic_sampling/dropped_groups": dropped,
                              "dynamic_sampling/filled_groups": filled}


def make_batch(ro: Rollout, scores: Scores, group_filter: GroupFilter | None, cfg: TrainConfig,
               accelerator) -> tuple[Batch, torch.Tensor]:
    """Group-relative advantages of the whole generation batch, and this process's ``Batch`` of the rows that train.

    Without a group filter every row trains. With GFPO the filter keeps ``k`` rows per group, their advantages
    come from the kept rows only, and the dropped rows leave the batch here (compaction), before any forward.
    Returns the batch and ``keep`` ``(N,)`` bool over every process's rows. Host syncs: the kept rows, the trim.
    """
    if group_filter is not None:
        texts = gather_object(scores.completions) if group_filter.user_func is not None else []
        advantages, keep = group_filter(weighted_rewards(scores.rewards, cfg.reward_weights), scores.lengths, texts)
    else:
        advantages = gf.group_advantages(scores.rewards, cfg.num_generations, reward_weights=cfg.reward_weights,
                                         scale_rewards=cfg.scale_rewards,
                                         aggregation=cfg.multi_objective_aggregation)  # (N,)
        keep = torch.ones_like(advantages, dtype=torch.bool)
    B, rank = len(scores.completions), accelerator.process_index
    mine = slice(rank * B, (rank + 1) * B)
    kept = keep[mine].nonzero().squeeze(1)  # host sync; (B_kept,) local row indices
    completion_mask = ro.completion_mask
    if cfg.mask_truncated_completions:
        completion_mask = completion_mask * ~ro.truncated[:, None]
    p_ids, p_mask, c_ids, c_mask = trim_padding(ro.prompt_ids[kept], ro.prompt_mask[kept], ro.completion_ids[kept],
                                                completion_mask[kept])
    sampling_logp = None if ro.sampling_logp is None else ro.sampling_logp[kept][:, :c_ids.shape[1]]
    num_items = accelerator.gather(c_mask.sum()).sum()
    batch = Batch(p_ids, p_mask, c_ids, c_mask, advantages[mine][kept], num_items, sampling_logp=sampling_logp)
    return batch, keep


def old_and_ref_logprobs(model, ref_model, batch: Batch, cfg: TrainConfig, share_prompts: bool, accelerator,
                         steps: int, parts: int) -> tuple[Batch, dict[str, float]]:
    """``batch`` (the generation batch, ``steps`` optimizer steps of ``parts`` micro-batches in all) with the no-grad
    inputs of the loss that the configuration needs, each computed only then, once before the first step, and the
    vLLM sync check's metrics (``generation.sync_check``; empty without vLLM).

    * ``old_logp`` ``(B, T)``: the policy before this batch's updates, when it takes several optimizer steps
      (``num_iterations > 1`` or ``steps > 1``), and for the vLLM ratio below (on-policy, one step, it is dropped
      again: the ratio is 1 in value).
    * ``ref_logp`` ``(B, T)``: the reference model, for ``beta != 0``.
    * ``is_ratio`` ``(B, T)`` (token modes) or ``(B, 1)`` (sequence modes): with vLLM sampling and
      ``vllm_importance_sampling_correction``, the ratio of ``old_logp`` to the engine's log-probs, clamped or masked
      into ``[clip_min, clip_max]`` (``generation.importance_ratio``, TRL's ``vllm_importance_sampling_mode``).
      The batch was sampled right after a weight sync, so the engine's log-probs must match ``old_logp``: a clearly
      stale engine raises ``generation.StaleEngineError`` (``vllm_max_logp_gap``; with the correction off and that
      check off, no ``old_logp`` pass is made for vLLM, as in TRL).
    """
    correct = batch.sampling_logp is not None and cfg.vllm_importance_sampling_correction
    vllm = batch.sampling_logp is not None and (correct or cfg.vllm_max_logp_gap > 0)
    off_policy = cfg.num_iterations > 1 or steps > 1
    old_logp = batch_logprobs(model, batch, cfg, share_prompts, accelerator, parts) if off_policy or vllm else None
    ref_logp = None
    if ref_model is not None:
        with lora.adapters_disabled(accelerator.unwrap_model(ref_model)):  # a LoRA policy as its own base
            ref_logp = batch_logprobs(ref_model, batch, cfg, share_prompts, accelerator, parts)
    is_ratio, sync_metrics = None, {}
    if vllm:
        check = sync_check(old_logp, batch.sampling_logp, batch.completion_mask,
                           mode=cfg.vllm_importance_sampling_mode if correct else None,
                           clip_min=cfg.vllm_importance_sampling_clip_min,
                           clip_max=cfg.vllm_importance_sampling_clip_max, reduce=accelerator.reduce)  # host sync
        check_fresh(check.metrics, cfg.vllm_max_logp_gap)
        is_ratio, sync_metrics = check.is_ratio, check.metrics
        if not off_policy:
            old_logp = None
    return dataclasses.replace(batch, old_logp=old_logp, ref_logp=ref_logp, is_ratio=is_ratio), sync_metrics


def gather_tokens(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Every process's 1-D ``values`` (of any lengths), concatenated in rank order (collective)."""
    if accelerator.num_processes == 1:
        return values
    padded = accelerator.pad_across_processes(values, dim=0, pad_index=-math.inf)  # no entropy is -inf
    gathered = accelerator.gather(padded)
    return gathered[gathered != -math.inf]


def loss_mask(mb: Batch, hidden: torch.Tensor, head_kwargs: dict, cfg: TrainConfig,
              accelerator) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The loss mask of micro-batch ``mb``, or None: the product of TRL's two token masks, which multiply the
    per-token policy loss and not the KL, as in TRL.

    * With ``top_entropy_quantile`` < 1, the entropy mask (``high_entropy_mask``: the top quantile of the loss
      tokens of every process's micro-batch), ``(b, T)`` bool.
    * With ``off_policy_mask_threshold``, TRL's off-policy sequence mask (``generation.off_policy_mask``,
      ``(b, 1)``), which compares the sampler's log-probs (vLLM's, else ``old_logp``) with the current policy's. On
      policy with transformers the sampler is the current policy and the mask keeps every row, as in TRL.

    Both come from one no-grad pass of the lm_head over ``hidden`` (``(b, T, H)``, the loss's own input; no model
    forward), made only when a mask is on: the loss needs the mask before its first chunk. Returns the mask
    (``(b, T)``, bool for the entropy mask alone, else float32) and the metric ``off_policy/masked_fraction``
    (0-dim, rows masked; off-policy mask on)."""
    sampling = mb.sampling_logp if mb.sampling_logp is not None else mb.old_logp
    by_entropy = cfg.top_entropy_quantile < 1.0
    off_policy = cfg.off_policy_mask_threshold is not None and sampling is not None
    if not (by_entropy or off_policy):
        return None, {}
    with torch.no_grad():
        out = gf.fused_linear_logprobs(hidden.detach(), token_ids=mb.completion_ids, temperature=cfg.temperature,
                                       return_entropy=by_entropy, chunk_size=cfg.lm_head_chunk_size, **head_kwargs)
    logp, entropy = out if by_entropy else (out, None)
    mask = None if not by_entropy else high_entropy_mask(entropy, mb.completion_mask, cfg.top_entropy_quantile,
                                                         gather=functools.partial(gather_tokens, accelerator))
    if not off_policy:
        return mask, {}
    keep = off_policy_mask(mb.advantages, logp, sampling, mb.completion_mask, cfg.off_policy_mask_threshold)
    mask = keep.expand(mb.completion_mask.shape).contiguous() if mask is None else keep * mask
    return mask, {"off_policy/masked_fraction": 1.0 - keep.mean()}


def accumulate_gradients(model, batch: Batch, cfg: TrainConfig, loss_kwargs: dict, accelerator, share_prompts: bool,
                         timer: StepTimer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of the loss on ``gradient_accumulation_steps`` micro-batches; gradients add up in ``.grad``.

    Returns the summed loss (0-dim) and the loss metrics averaged over the micro-batches (0-dim; no host sync).
    Times ``policy_forward`` (the model and the loss's forward) and ``backward`` on ``timer``.
    """
    parts = micro_batches(len(batch), cfg.gradient_accumulation_steps)
    loss_sum, metrics = torch.zeros((), device=accelerator.device), {}
    for j, s in enumerate(parts):
        mb = batch[s]
        # The loss is normalised by TRL's rules already (GA and process count included), so no accelerate
        # accumulation: skip the gradient all-reduce until the last micro-batch.
        with accelerator.no_sync(model) if j < len(parts) - 1 else nullcontext():
            with timer("policy_forward"):
                head = lm_head_of(accelerator.unwrap_model(model))  # per micro-batch: a LoRA head merges with grad
                with accelerator.autocast():
                    hidden = completion_hidden(model, mb.prompt_ids, mb.prompt_mask, mb.completion_ids,
                                               mb.completion_mask, share_prompts)  # (b, T, H)
                    hidden, head_kwargs = head.op_inputs(hidden)
                    mask, mask_metrics = loss_mask(mb, hidden, head_kwargs, cfg, accelerator)
                    loss, m = gf.fused_linear_policy_loss(
                        hidden, token_ids=mb.completion_ids, old_logp=mb.old_logp, advantages=mb.advantages,
                        mask=mb.completion_mask, temperature=cfg.temperature, ref_logp=mb.ref_logp,
                        importance_sampling_ratio=mb.is_ratio, num_items_in_batch=mb.num_items, return_entropy=True,
                        loss_mask=mask, chunk_size=cfg.lm_head_chunk_size, **head_kwargs, **loss_kwargs)
                    m = {**m, **mask_metrics}
            with timer("backward"):
                accelerator.backward(loss)
        loss_sum += loss.detach()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v.detach() / len(parts)
    return loss_sum, metrics


@torch.no_grad()
def sync_ref_model(model, ref_model, alpha: float, accelerator) -> None:
    """TRL's ``SyncRefModelCallback`` (TR-DPO): every weight of the reference becomes ``alpha * policy + (1 - alpha)
    * reference``, in place, as TRL computes it (``ref.mul_(1 - alpha).add_(policy, alpha=alpha)``). Both models
    are wrapped alike (``distributed.prepare_reference``), so under FSDP2 each process mixes its own shards."""
    policy, ref = accelerator.unwrap_model(model), accelerator.unwrap_model(ref_model)
    for r, p in zip(ref.parameters(), policy.parameters(), strict=True):
        r.mul_(1.0 - alpha).add_(p, alpha=alpha)


def finite_everywhere(accelerator, *values: torch.Tensor) -> bool:
    """Whether every 0-dim ``value`` is finite on every process (one reduce, one host read)."""
    finite = torch.stack([torch.isfinite(v.float()) for v in values]).all().float()
    return bool(accelerator.reduce(finite, reduction="sum") == accelerator.num_processes)


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float, accelerator,
                   loss: torch.Tensor | None = None) -> torch.Tensor:
    """Clips the gradient norm (``max_grad_norm`` 0: measured, not clipped), steps the optimizer unless the norm or
    ``loss`` (0-dim) is NaN or inf on some process (``finite_everywhere``: the update is skipped, nothing non-finite
    reaches the weights), steps the schedule, clears the gradients. Returns the norm before clipping (0-dim; a plain
    tensor under FSDP2 too)."""
    grad_norm = gather_full(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf))
    if finite_everywhere(accelerator, grad_norm, *([] if loss is None else [loss])):
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class NonFiniteGuard:
    """Consecutive skipped updates (``optimizer_step``'s non-finite steps), and ``keep``: the last checkpoint
    written before the first of them in this run, which pruning must leave alone (it is the last known good)."""

    def __init__(self, limit: int):
        self.limit, self.streak, self.keep, self.seen = limit, 0, None, False

    def update(self, applied: bool, step: int, last_saved: Path | None) -> str | None:
        """Records ``step``; returns a warning to print when its update was skipped."""
        if applied:
            self.streak = 0
            return None
        if not self.seen:
            self.seen, self.keep = True, last_saved
        self.streak += 1
        return (f"warning (step {step}): the loss or the gradient norm is NaN or inf; the update was skipped "
                f"({self.streak} in a row; max_nonfinite_steps={self.limit} stops the run)")

    @property
    def exhausted(self) -> bool:
        return self.streak >= self.limit

    def error(self, step: int) -> NonFiniteError:
        kept = f"the last checkpoint before the first one is {self.keep}" if self.keep else "no checkpoint was " \
            "written before the first one"
        return NonFiniteError(f"stopped at step {step}: the loss or the gradient norm was NaN or inf for "
                              f"{self.streak} steps in a row (max_nonfinite_steps={self.limit}), no update applied; "
                              f"{kept}. Lower learning_rate, set max_grad_norm, or check the rewards and the data")


def step_metrics(scores: Scores, keep: torch.Tensor, loss: torch.Tensor, grad_norm: torch.Tensor,
                 loss_metrics: dict[str, torch.Tensor], stop_requested: bool, applied: bool, *, step: int, lr: float,
                 reward_names: list[str], cfg: TrainConfig, accelerator, timer: StepTimer) -> tuple[dict, bool]:
    """The step's metrics row (plain numbers, the JSONL schema), and whether any process asked to stop.

    The per-process values (loss, gradient norm, loss metrics, the stop request) are averaged over processes
    in one reduce; the reward and length statistics come from the gathered ``scores``, the same everywhere.
    Then one host read for all of them. ``frac_reward_missing``: rows that no reward function scored (all None or
    NaN); a group with no reward at all counts in ``frac_reward_zero_std`` (it has no signal). ``update_skipped``:
    1 when ``optimizer_step`` skipped a non-finite update.
    """
    lengths = scores.lengths.float()  # (N,)
    rewards = gf.reward_metrics(scores.rewards, cfg.num_generations, reward_weights=cfg.reward_weights,
                                scale_rewards=cfg.scale_rewards, reward_names=reward_names)
    missing = torch.isnan(weighted_rewards(scores.rewards, cfg.reward_weights))  # (N,)
    rewards["frac_reward_zero_std"] = rewards["frac_reward_zero_std"] + \
        missing.view(-1, cfg.num_generations).all(1).float().mean()
    rewards["frac_reward_missing"] = missing.float().mean()
    completions = {"completions/mean_length": lengths.mean(), "completions/max_length": lengths.max(),
                   "completions/clipped_ratio": scores.truncated.float().mean(),
                   "completions/kept_fraction": keep.float().mean(),
                   "completions/kept_mean_length": (lengths * keep).sum() / keep.sum(), "num_tokens": lengths.sum()}
    per_process = {"loss": loss, "grad_norm": grad_norm, **loss_metrics,
                   "stop": torch.tensor(float(stop_requested), device=accelerator.device)}
    reduced = accelerator.reduce(torch.stack([v.float() for v in per_process.values()]), reduction="mean")
    same = torch.stack([v.float() for v in (*rewards.values(), *completions.values())])
    values = iter(torch.cat([reduced, same]).tolist())  # host sync
    per_process = {k: next(values) for k in per_process}
    rewards, completions = {k: next(values) for k in rewards}, {k: next(values) for k in completions}
    stop = per_process.pop("stop") > 0
    metrics = {**scores.logged, **rewards}
    accuracy = accuracy_name(reward_names)
    if accuracy is not None:
        metrics["accuracy"] = metrics[f"rewards/{accuracy}/mean"]
    metrics.update({"step": step, "lr": lr, **per_process, **completions, "update_skipped": int(not applied)})
    metrics["completions/max_length"] = int(metrics["completions/max_length"])
    metrics["num_tokens"] = int(metrics["num_tokens"])
    metrics.update(timer.metrics())
    metrics["tokens_per_s"] = metrics["num_tokens"] / metrics["time/step"]
    metrics["memory/peak_gb"] = peak_memory_gb(accelerator.device)
    return metrics, stop


# ----------------------------------------------------------------------------- the run
def train(cfg: TrainConfig) -> dict:
    """Runs training as configured, holding ``cfg.output_dir`` for the run (``ownership``); returns a summary: file
    paths, eval results, the trained ``policy``, and ``signal``, the number of a signal that stopped it (or None).

    Raises ``ValueError`` for a configuration, dataset, output_dir or checkpoint that cannot work (before any model
    loads, where knowing it needs no model), ``RewardFunctionError``, and ``NonFiniteError``."""
    accelerator = make_accelerator(cfg)
    with own_output_dir(cfg.output_dir, accelerator, resuming=cfg.resume_from_checkpoint is not None,
                        overwrite=cfg.overwrite_output_dir):
        return run(cfg, accelerator)


def run(cfg: TrainConfig, accelerator: Accelerator) -> dict:
    """The run of :func:`train` in its output_dir: setup, the loop, the files."""
    from transformers import TrainerState

    # ---- checks that need no model: data, rewards and the columns they read, the schedule, the resume checkpoint
    fsdp_cpu = distributed.fsdp2_on_cpu(accelerator)  # FSDP asked for, accelerate MULTI_CPU: shard by hand
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    G = cfg.num_generations
    set_seed(cfg.seed)
    micro = cfg.steps_per_generation_for(world)  # micro-batches of per_device_train_batch_size per generation
    train_rows, eval_rows = load_rows(cfg)
    reward_names, reward_funcs = build_reward_funcs(cfg.reward_funcs, cfg.max_completion_length,
                                                    cfg.reward_processing_classes, cfg.chat_template_kwargs, device)
    check_columns(reward_names, reward_funcs, train_rows, "the train rows")
    check_columns(reward_names, reward_funcs, eval_rows, "the eval rows")
    check_scheduler(cfg)
    group_filter = GroupFilter(cfg.group_filter, G, cfg.num_remains_in_group, adaptive=cfg.adaptive_difficulty,
                               scale_rewards=cfg.scale_rewards) if cfg.algorithm == "gfpo" else None
    identity, resume = {"run_id": uuid.uuid4().hex, **{k: getattr(cfg, k) for k in ckpt.IDENTITY}}, None
    if cfg.sync_ref_model and accelerator.distributed_type.value == "DEEPSPEED" and \
            accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise ValueError("sync_ref_model=True under DeepSpeed ZeRO-3: the partitioned weights cannot be mixed "
                         "here; use ZeRO-1/2, FSDP2 or DDP")
    if cfg.resume_from_checkpoint:
        resume, manifest, notes = ckpt.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir, identity)
        if cfg.sync_ref_model and not (resume / ckpt.REF_MODEL).is_dir():
            raise ValueError(f"resume_from_checkpoint: {resume} holds no {ckpt.REF_MODEL}/ (written by a run without "
                             "sync_ref_model), so the synced reference model cannot continue; resume with "
                             "sync_ref_model=False or start a new run")
        identity["run_id"] = manifest["run_id"]  # the resumed run goes on owning (and pruning) its checkpoints
        for note in notes:
            accelerator.print(note)

    # ---- setup: the policy, prompts screened against its context, reference, optimizer, resume, engine, reporting
    model, tokenizer = load_policy(cfg, resume)
    train_rows, train_prompts, notes = screen_prompts(train_rows, tokenizer, model.config, cfg, "train")
    eval_rows, eval_prompts, eval_notes = screen_prompts(eval_rows, tokenizer, model.config, cfg, "eval")
    for note in notes + eval_notes:
        accelerator.print(note)
    ref_model = None
    if cfg.beta != 0.0 and not cfg.use_peft:  # a LoRA policy's reference is its base: adapters disabled
        # a checkpoint of a sync_ref_model run holds the reference as it was synced; it goes on from there
        synced = resume is not None and (resume / ckpt.REF_MODEL).is_dir()
        ref_model, _ = load_model_and_tokenizer(str(resume / ckpt.REF_MODEL) if synced else cfg.model_name_or_path,
                                                cfg.dtype)
        ref_model = distributed.prepare_reference(accelerator, ref_model, fsdp_cpu)
    if cfg.use_liger_kernel:
        apply_liger_kernel(model)
    eos_ids = eos_token_ids(model, tokenizer)
    # One prompt pass per group (prefix.py) continues from a read-only KV cache in the training forward; with
    # gradient checkpointing it needs transformers >= 5.24; single process or DDP only. Not under FSDP2: the prompt
    # pass's keys and values reach the loss through the cache, a side channel that FSDP2's per-layer backward hooks
    # do not see, so their backward runs on resharded (freed) weights (measured: "setStorage ... out of bounds for
    # storage of size 0"). DeepSpeed: untested.
    dist = accelerator.distributed_type.value
    share_prompts = (dist == "NO" or dist.startswith("MULTI_")) and not fsdp_cpu and \
        (not cfg.gradient_checkpointing or can_share_under_checkpointing())
    if share_prompts and cfg.gradient_checkpointing:
        allow_checkpointed_prefix(model)
    model, optimizer = distributed.prepare_policy(accelerator, model, functools.partial(make_optimizer, cfg=cfg),
                                                  fsdp_cpu)
    if cfg.beta != 0.0 and cfg.use_peft:
        ref_model = model
    scheduler = make_scheduler(optimizer, cfg)  # not prepared: accelerate would step it once per process
    sampler = PromptSampler(len(train_rows), cfg.seed)
    step = restore(resume, accelerator, cfg.seed, model, optimizer, scheduler, sampler, group_filter)

    out_dir = Path(cfg.output_dir)
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config_yaml)
    verify_lm_head(accelerator.unwrap_model(model), train_prompts[0])
    vllm = None
    if cfg.generation_backend == "vllm":
        vllm = VLLMColocate(resolve_model_path(cfg.model_name_or_path)[0],
                            max_model_len=max(map(len, train_prompts)) + cfg.max_completion_length,
                            max_num_seqs=cfg.per_device_train_batch_size * micro,
                            dtype=engine_dtype(cfg.vllm_dtype, next(model.parameters()).dtype,
                                               accelerator.mixed_precision),
                            seed=cfg.seed, process_index=rank, local_process_index=accelerator.local_process_index,
                            num_processes=world, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                            enforce_eager=cfg.vllm_enforce_eager)
        accelerator.wait_for_everyone()
    loss_kwargs = cfg.loss_kwargs(world)
    trainer_state = TrainerState(global_step=step, max_steps=cfg.max_steps)  # the reward functions' trainer_state
    reporter = Reporter(cfg, accelerator, step)
    evaluate_policy = functools.partial(evaluate, model, tokenizer, eval_rows, eval_prompts, cfg, accelerator,
                                        reward_names, reward_funcs, eos_ids)
    do_eval = cfg.do_eval and bool(eval_rows)
    evals, last_saved, guard = {}, None, NonFiniteGuard(cfg.max_nonfinite_steps)
    prompts_per_rank = cfg.per_device_train_batch_size * micro // G
    steps_per_generation = micro // cfg.gradient_accumulation_steps  # optimizer steps per pass over a generation

    def draw_round() -> tuple[list[dict], Rollout, Scores]:
        """Draws prompts (the global order is the same on every rank; each rank takes whole groups, B = its
        prompts * G), generates and scores them."""
        order = sampler.next(prompts_per_rank * world)[rank * prompts_per_rank:(rank + 1) * prompts_per_rank]
        rows = [train_rows[i] for i in order for _ in range(G)]
        prompts = [train_prompts[i] for i in order for _ in range(G)]
        with timer("generate"):
            ro = generate(accelerator.unwrap_model(model), tokenizer, vllm, prompts, cfg, eos_ids, device)
        with timer("reward"):
            scores = score_rollout(ro, rows, tokenizer, reward_names, reward_funcs, trainer_state, accelerator)
        return rows, ro, scores

    # ---- the loop: one generation batch per iteration (num_iterations passes of steps_per_generation optimizer
    # steps over it)
    with closing(reporter), stop_on_signal(reporter) as stop:
        if do_eval and step == 0:
            evals["before"] = reporter.log_eval("before", step, evaluate_policy())
        while step < cfg.max_steps:
            timer, first_step = StepTimer(), step
            trainer_state.global_step = step
            if vllm is not None:  # the policy changed since the engine last saw it (or the run resumed)
                with timer("weight_sync"):
                    vllm.sync(accelerator.unwrap_model(model))
            rows, ro, scores, draw_metrics = sample_groups(draw_round, cfg, prompts_per_rank, accelerator,
                                                           tokenizer.pad_token_id)
            with timer("advantages"):
                batch, keep = make_batch(ro, scores, group_filter, cfg, accelerator)
            with timer("old_ref_logprobs"):
                batch, sync_metrics = old_and_ref_logprobs(model, ref_model, batch, cfg, share_prompts, accelerator,
                                                           steps_per_generation, micro)
            passes = [mb for _ in range(cfg.num_iterations) for mb in mini_batches(batch, steps_per_generation)]
            for mini in passes:  # the metrics are those of the last optimizer step
                if step >= cfg.max_steps or guard.exhausted:
                    break
                loss, loss_metrics = accumulate_gradients(model, mini, cfg, loss_kwargs, accelerator, share_prompts,
                                                          timer)
                with timer("optimizer"):
                    grad_norm = optimizer_step(model, optimizer, scheduler, cfg.max_grad_norm, accelerator, loss)
                    applied = finite_everywhere(accelerator, grad_norm, loss)  # optimizer_step's own test
                step += 1
                if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:  # TRL: after every step, applied or not
                    with timer("ref_sync"):
                        sync_ref_model(model, ref_model, cfg.ref_model_mixup_alpha, accelerator)
                warning = guard.update(applied, step, last_saved)
                if warning:
                    reporter.print(warning)
            metrics, stop_now = step_metrics(scores, keep, loss, grad_norm, loss_metrics, stop.signum is not None,
                                             applied, step=step, lr=scheduler.get_last_lr()[0],
                                             reward_names=reward_names, cfg=cfg, accelerator=accelerator, timer=timer)
            reporter.log({**metrics, **sync_metrics, **draw_metrics})
            reporter.log_completions(step, rows, scores, keep, batch.advantages, reward_names)
            if guard.exhausted:  # no checkpoint of this state: the last good one stays the newest kept
                raise guard.error(step)
            if do_eval and cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:
                evals[f"step_{step}"] = reporter.log_eval(f"step {step}", step, evaluate_policy())
            # checkpoints fall between generation batches: after the batch whose steps reach a save_steps multiple
            if step // cfg.save_steps > first_step // cfg.save_steps or step >= cfg.max_steps or stop_now:
                last_saved = ckpt.save_checkpoint(accelerator, cfg.output_dir, step, model, optimizer, tokenizer,
                                                  checkpoint_state(step, scheduler, sampler, group_filter),
                                                  config_yaml, cfg.save_total_limit, identity, keep=guard.keep,
                                                  ref_model=ref_model if cfg.sync_ref_model else None)
            if stop_now:
                reporter.print(f"stopped by signal at step {step}; resume with --resume_from_checkpoint {last_saved}")
                break
    if do_eval and step >= cfg.max_steps:
        evals["after"] = reporter.log_eval("after", step, evaluate_policy())
    if cfg.push_to_hub and step >= cfg.max_steps and accelerator.is_main_process:  # a finished run only
        print(ckpt.push_to_hub(last_saved / "model", cfg.hub_model_id or Path(cfg.output_dir).resolve().name))

    # ---- files
    plot = reporter.finish()
    summary = {"step": step, "metrics": str(reporter.metrics_path), "plot": str(plot), "checkpoint": str(last_saved),
               "model": str(last_saved / "model") if last_saved else None, "evals": evals,
               "policy": accelerator.unwrap_model(model), "signal": stop.signum}
    if accelerator.is_main_process:
        (out_dir / "eval.json").write_text(json.dumps(evals, indent=2))
        summary["eval"] = str(out_dir / "eval.json")
        if cfg.save_merged_model:
            summary["merged"] = str(lora.save_merged(summary["policy"], tokenizer, out_dir / "merged"))
        print("\nfiles:")
        for key in ("metrics", "plot", "eval", "checkpoint", "model", "merged"):
            if key in summary:
                print(f"  {key:<10} {summary[key]}")
    accelerator.wait_for_everyone()
    return summary

