"""``python -m gfpo_fast.train``: a lean GRPO-family RL loop on accelerate and gfpo-fast's fused ops.

One step: sample prompts -> generate G completions each -> score them -> GFPO filter (dropped
completions are removed before the policy forward: compaction) -> group-relative advantages -> loss
with ``gfpo_fast.fused_policy_loss`` (Triton on CUDA, C++ or torch on the CPU) -> backward -> step.
It is on-policy by default (``num_iterations=1``): the ratio is 1 in value and the loss is the
clipped surrogate's plain policy gradient, exactly as TRL computes it without old log-probs. The G
completions of a prompt share its forward pass: each distinct prompt is prefilled once for generation
and run once in the policy forward and backward (``prefix.py``), with the same values and gradients.

The embedded default (no arguments) trains SmolLM2-135M-Instruct with GFPO (length filter, 6 of 8
kept) on single-digit arithmetic word problems: 40 steps of 2 prompts x 8 completions of at most 48
tokens at temperature 0.7, lr 1e-5 (3 warm-up steps, then linear decay), evaluating greedy and sampled
accuracy on 128 held-out problems before and after (a shorter run evaluates fewer: ``--eval_num_prompts``).
The base model is right 24% of the time sampled at T=0.7 and 31% greedy on those problems, so almost
every group carries a learning signal
(``bench/results/train/`` has the measured runs: step time, accuracy before and after).

    python -m gfpo_fast.train                                  # the embedded default
    python -m gfpo_fast.train --algorithm grpo --max_steps 2   # quick look (evals on 16 prompts)
    python -m gfpo_fast.train --config run.yaml --resume_from_checkpoint latest
    accelerate launch --num_processes 2 -m gfpo_fast.train ...  # DDP; FSDP / DeepSpeed via --config_file

FSDP and DeepSpeed come from ``accelerate config`` files (``examples/accelerate/``: ``accelerate launch
--config_file examples/accelerate/fsdp.yaml -m gfpo_fast.train``): the loop does its own gradient
accumulation (the loss is already normalised by TRL's rules), so DeepSpeed runs with
``gradient_accumulation_steps: 1`` in its config and in the trainer; checkpoints gather a full state dict.
"""
from __future__ import annotations

import json
import math
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

import gfpo_fast as gf
from gfpo_fast.advantages import weighted_rewards

from . import checkpoint as ckpt
from .config import TrainConfig, parse_args
from .data import PromptSampler, arithmetic_dataset, load_local_dataset, prompt_token_ids
from .evaluation import evaluate
from .filters import GroupFilter
from .generation import VLLMColocate, eos_token_ids, generate_transformers
from .models import load_model_and_tokenizer, resolve_model_path
from .prefix import cache_name, left_padded_positions, prompt_cache
from .reporting import Reporter, StepTimer, peak_memory_gb
from .rewards import RewardFunctionError, as_completions, build_reward_funcs, score


# ----------------------------------------------------------------------------- small helpers
def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel (one pass over all parameters; CPU and CUDA, fp32/bf16/fp16)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)


def make_scheduler(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then linear decay to 0, cosine decay to 0, or constant (TRL's default is linear)."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trim_padding(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Drops prompt columns that are padding in every row (left) and completion columns likewise (right).

    After GFPO keeps the shortest completions, this shrinks the policy forward. Host sync.
    """
    p0 = int(prompt_mask.any(0).int().argmax())
    t1 = max(int(completion_mask.sum(1).max()), 1)
    return prompt_ids[:, p0:], prompt_mask[:, p0:], completion_ids[:, :t1], completion_mask[:, :t1]


def completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts: bool = False):
    """Policy logits for the completion tokens: ``(B, T, V)``, position t predicts ``completion_ids[:, t]``.

    With ``share_prompts`` each distinct prompt runs once (``prefix.prompt_cache``) and the rows continue
    from its KV cache; same values and gradients, without G copies of the prompt's work.
    """
    P, T = prompt_ids.shape[1], completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], 1)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)  # (B, P + T)
    position_ids = left_padded_positions(attention_mask)  # (B, P + T)
    cache = prompt_cache(model, prompt_ids, prompt_mask) if share_prompts else None
    if cache is not None:  # feed the last prompt token and the completion but its last token: T positions
        return model(input_ids=input_ids[:, P - 1:-1], attention_mask=attention_mask[:, :-1],
                     position_ids=position_ids[:, P - 1:-1], use_cache=True, **{cache_name(model): cache}).logits
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=T + 1, use_cache=False)
    return out.logits[:, :-1]  # (B, T, V)


def micro_batches(n: int, parts: int) -> list[slice]:
    size = math.ceil(n / parts)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def batch_logprobs(model, batch: dict, cfg: TrainConfig, share_prompts: bool) -> torch.Tensor:
    """No-grad per-token log-probs ``(B, T)`` of ``batch`` under ``model`` (old or reference policy)."""
    out = []
    for s in micro_batches(batch["completion_ids"].shape[0], cfg.gradient_accumulation_steps):
        logits = completion_logits(model, batch["prompt_ids"][s], batch["prompt_mask"][s], batch["completion_ids"][s],
                                   batch["completion_mask"][s], share_prompts)
        out.append(gf.token_logprobs(logits, batch["completion_ids"][s], temperature=cfg.temperature))
    return torch.cat(out)


# ----------------------------------------------------------------------------- the run
def train(cfg: TrainConfig) -> dict:
    """Runs training as configured; returns a summary: file paths, eval results and the trained ``policy``."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed
    from transformers import TrainerState

    # Decided before the Accelerator exists (mixed precision is fixed at construction). Without a GPU the
    # Accelerator is told cpu=True: otherwise `accelerate launch --num_processes 2` on a CPU machine starts two
    # unconnected single-process runs (DistributedType.NO, each one "main") instead of one gloo group.
    on_gpu = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else on_gpu
    if bf16 and not on_gpu:
        raise ValueError("bf16=True on the CPU: without AVX512-BF16/AMX it is ~20x slower than float32; "
                         "leave bf16 unset (or false) here")
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not on_gpu)
    if accelerator.distributed_type.value == "DEEPSPEED" and cfg.gradient_accumulation_steps > 1:
        raise ValueError("gradient_accumulation_steps > 1 under DeepSpeed: its engine steps the optimizer on every "
                         "backward, so the micro-batches would each take a step; use gradient_accumulation_steps=1 "
                         "with a larger per_device_train_batch_size, or DDP / FSDP")
    rank, world, G = accelerator.process_index, accelerator.num_processes, cfg.num_generations
    device = accelerator.device
    set_seed(cfg.seed)

    # ---- data
    held_out, num_eval = cfg.eval_split()
    if cfg.dataset_name == "arithmetic":
        train_rows, eval_rows = arithmetic_dataset(cfg.arithmetic_num_train, held_out,
                                                   max_operand=cfg.arithmetic_max_operand, ops=cfg.arithmetic_ops)
    else:
        train_rows = load_local_dataset(cfg.dataset_name)
        eval_rows = load_local_dataset(cfg.eval_dataset_name) if cfg.eval_dataset_name else []
    eval_rows = eval_rows[:num_eval]
    reward_names, reward_funcs = build_reward_funcs(cfg.reward_funcs, cfg.max_completion_length)
    group_filter = GroupFilter(cfg.group_filter, G, cfg.num_remains_in_group, adaptive=cfg.adaptive_difficulty,
                               scale_rewards=cfg.scale_rewards) if cfg.algorithm == "gfpo" else None

    # ---- model, optimizer, resume state
    resume = ckpt.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir) if cfg.resume_from_checkpoint else None
    model, tokenizer = load_model_and_tokenizer(str(resume / "model") if resume else cfg.model_name_or_path,
                                                cfg.dtype, cfg.gradient_checkpointing)
    ref_model = None
    if cfg.beta != 0.0:
        ref_model, _ = load_model_and_tokenizer(cfg.model_name_or_path, cfg.dtype)
        ref_model = accelerator.prepare_model(ref_model.eval().requires_grad_(False), evaluation_mode=True)
    eos_ids = eos_token_ids(model, tokenizer)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, cfg))
    # One prompt pass per group (prefix.py) needs a KV cache in the training forward: not with gradient
    # checkpointing (transformers then runs without a cache); single process or DDP only (FSDP, DeepSpeed: untested).
    dist = accelerator.distributed_type.value
    share_prompts = not cfg.gradient_checkpointing and (dist == "NO" or dist.startswith("MULTI_"))
    scheduler = make_scheduler(optimizer, cfg)  # not prepared: accelerate would step it once per process
    sampler = PromptSampler(len(train_rows), cfg.seed)
    step, rng = 0, None
    if resume:
        state, rng = ckpt.load_checkpoint(resume, rank)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        if group_filter is not None:
            group_filter.load_state_dict(state["group_filter"])
        step = state["step"]
    if rng is not None:
        ckpt.set_rng_state(rng)
    else:  # a new run, or a resume on more ranks than the checkpoint had
        set_seed(cfg.seed + rank + step)  # different sampling on every rank; the prompt order is seeded apart

    out_dir = Path(cfg.output_dir)
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config_yaml)
    train_prompts = [prompt_token_ids(tokenizer, r["prompt"]) for r in train_rows]
    eval_prompts = [prompt_token_ids(tokenizer, r["prompt"]) for r in eval_rows]
    vllm = None
    if cfg.generation_backend == "vllm":
        vllm = VLLMColocate(resolve_model_path(cfg.model_name_or_path)[0], seed=cfg.seed, process_index=rank,
                            max_model_len=max(map(len, train_prompts)) + cfg.max_completion_length,
                            max_num_seqs=cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
                            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
        accelerator.wait_for_everyone()
    loss_kwargs = cfg.loss_kwargs(world)
    trainer_state = TrainerState(global_step=step, max_steps=cfg.max_steps)
    reporter = Reporter(cfg.output_dir, accelerator.is_main_process, step, cfg.max_steps, cfg.logging_steps)
    evals = {}

    def run_eval(tag: str) -> None:
        if cfg.do_eval and eval_rows:
            result = evaluate(model, tokenizer, eval_rows, eval_prompts, cfg, accelerator, reward_names, reward_funcs,
                              eos_ids)
            evals[tag] = result
            reporter.print(f"eval {tag}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in result.items()))

    def save() -> Path:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                 "sampler": sampler.state_dict(),
                 "group_filter": group_filter.state_dict() if group_filter is not None else None}
        return ckpt.save_checkpoint(accelerator, cfg.output_dir, step, model, tokenizer, state, config_yaml,
                                    cfg.save_total_limit)

    stop = {"requested": False}

    def on_signal(signum, frame):
        stop["requested"] = True
        signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once (the last checkpoint stays intact)
        reporter.print(f"{signal.Signals(signum).name}: writing a checkpoint after this step (again to abort)")

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    if step == 0:
        run_eval("before")
    prompts_per_rank = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps // G
    last_saved = None
    try:
        while step < cfg.max_steps:
            timer = StepTimer()
            metrics: dict = {}
            # ---- 1. prompts: the global order is the same on every rank; each rank takes whole groups
            order = sampler.next(prompts_per_rank * world)[rank * prompts_per_rank:(rank + 1) * prompts_per_rank]
            rows = [train_rows[i] for i in order for _ in range(G)]  # B = prompts_per_rank * G rows
            # ---- 2. generate G completions per prompt
            with timer("generation"):
                gen_kwargs = dict(max_new_tokens=cfg.max_completion_length, do_sample=True,
                                  temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, eos_ids=eos_ids)
                prompts = [train_prompts[i] for i in order for _ in range(G)]
                if vllm is not None:
                    vllm.sync_weights(accelerator.unwrap_model(model), step)
                    ro = vllm.generate(prompts, pad_id=tokenizer.pad_token_id, device=device, **gen_kwargs)
                else:
                    ro = generate_transformers(accelerator.unwrap_model(model), tokenizer, prompts, **gen_kwargs)
            # ---- 3. score locally, then gather: every rank sees the global (N, F) reward matrix
            with timer("scoring"):
                completion_ids = ro.completion_lists()  # host sync
                completions = as_completions(tokenizer.batch_decode(completion_ids, skip_special_tokens=True), rows)
                trainer_state.global_step = step
                rewards = score(reward_funcs, reward_names, rows, completions, completion_ids, trainer_state, metrics)
                rewards = accelerator.gather(rewards.to(device))  # (N, F), N = B * world
                lengths = accelerator.gather(ro.completion_mask.sum(1))  # (N,)
                truncated = accelerator.gather(ro.truncated)  # (N,)
                # ---- 4. advantages; GFPO keeps k completions per group and drops the rest (compaction)
                if group_filter is not None:
                    texts = gather_object(completions) if group_filter.user_func is not None else []
                    advantages, keep = group_filter(weighted_rewards(rewards, cfg.reward_weights), lengths, texts)
                else:
                    advantages = gf.group_advantages(rewards, G, reward_weights=cfg.reward_weights,
                                                     scale_rewards=cfg.scale_rewards)  # (N,)
                    keep = torch.ones_like(advantages, dtype=torch.bool)
                mine = slice(rank * len(rows), (rank + 1) * len(rows))
                kept = keep[mine].nonzero().squeeze(1)  # host sync; (B_kept,) local row indices
                completion_mask = ro.completion_mask
                if cfg.mask_truncated_completions:
                    completion_mask = completion_mask * ~ro.truncated[:, None]
                p_ids, p_mask, c_ids, c_mask = trim_padding(ro.prompt_ids[kept], ro.prompt_mask[kept],
                                                            ro.completion_ids[kept], completion_mask[kept])
                batch = {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "completion_mask": c_mask,
                         "advantages": advantages[mine][kept]}  # (B_kept, P), (B_kept, T), ..., (B_kept,)
                num_items = accelerator.gather(c_mask.sum()).sum()  # global loss-token count (dapo/cispo/vespo)
            # ---- 5. old / reference / sampling log-probs (only when needed)
            with timer("logprobs"):
                needs_old = cfg.num_iterations > 1 or vllm is not None
                old_logp = batch_logprobs(model, batch, cfg, share_prompts) if needs_old else None
                ref_logp = batch_logprobs(ref_model, batch, cfg, share_prompts) if ref_model is not None else None
                is_ratio = None
                if vllm is not None:  # TRL's default "sequence_mask": drop sequences far off the trainer's policy
                    delta = ((old_logp - ro.sampling_logp[kept][:, :c_ids.shape[1]]) * c_mask).sum(1)  # (B_kept,)
                    is_ratio = torch.exp(delta)
                    is_ratio = torch.where(is_ratio > cfg.vllm_importance_sampling_cap, 0.0, is_ratio)
                    if cfg.num_iterations == 1:
                        old_logp = None  # on-policy: the ratio is 1 in value, as without vLLM
            # ---- 6. loss, backward, optimizer step (num_iterations steps on this batch)
            for _ in range(cfg.num_iterations):  # metrics below are those of the last iteration
                if step >= cfg.max_steps:
                    break
                parts = micro_batches(c_ids.shape[0], cfg.gradient_accumulation_steps)
                loss_sum, loss_metrics = torch.zeros((), device=device), {}
                for j, s in enumerate(parts):
                    # The loss is normalised by TRL's rules already (GA and process count included), so no
                    # accelerate accumulation: skip the gradient all-reduce until the last micro-batch.
                    with accelerator.no_sync(model) if j < len(parts) - 1 else nullcontext():
                        with timer("logprobs"):
                            with accelerator.autocast():
                                logits = completion_logits(model, p_ids[s], p_mask[s], c_ids[s], c_mask[s],
                                                           share_prompts)  # (b, T, V)
                        with timer("loss"):
                            loss, m = gf.fused_policy_loss(
                                logits, c_ids[s], None if old_logp is None else old_logp[s], batch["advantages"][s],
                                c_mask[s], temperature=cfg.temperature,
                                ref_logp=None if ref_logp is None else ref_logp[s],
                                importance_sampling_ratio=None if is_ratio is None else is_ratio[s],
                                num_items_in_batch=num_items, **loss_kwargs)
                            accelerator.backward(loss)
                    loss_sum += loss.detach()
                    for k, v in m.items():
                        loss_metrics[k] = loss_metrics.get(k, 0.0) + v.detach() / len(parts)
                with timer("optimizer"):
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) \
                        if cfg.max_grad_norm > 0 else torch.zeros((), device=device)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step += 1
            # ---- 7. metrics (one gathered read per step) and checkpoints
            metrics.update({k: float(v) for k, v in gf.reward_metrics(
                rewards, G, reward_weights=cfg.reward_weights, scale_rewards=cfg.scale_rewards,
                reward_names=reward_names).items()})  # host sync
            if "accuracy" in reward_names:
                metrics["accuracy"] = metrics["rewards/accuracy/mean"]
            reduced = accelerator.reduce(torch.stack([loss_sum, grad_norm.float(), *[
                v.float() for v in loss_metrics.values()]]), reduction="mean").tolist()  # host sync
            tokens = int(lengths.sum())
            metrics.update({
                "step": step, "lr": scheduler.get_last_lr()[0], "loss": reduced[0], "grad_norm": reduced[1],
                **dict(zip(loss_metrics, reduced[2:])),
                "completions/mean_length": float(lengths.float().mean()),
                "completions/max_length": int(lengths.max()),
                "completions/clipped_ratio": float(truncated.float().mean()),
                "completions/kept_fraction": float(keep.float().mean()),
                "completions/kept_mean_length": float(lengths[keep].float().mean()),
                "num_tokens": tokens,
            })
            metrics.update(timer.metrics())
            metrics["tokens_per_s"] = tokens / metrics["time/step"]
            metrics["memory/peak_gb"] = peak_memory_gb(device)
            reporter.log(metrics)
            stop_now = accelerator.reduce(torch.tensor(float(stop["requested"]), device=device), "max").item()
            if step % cfg.save_steps == 0 or step >= cfg.max_steps or stop_now:
                last_saved = save()
                if stop_now:
                    reporter.print(f"stopped by signal at step {step}; resume with --resume_from_checkpoint {last_saved}")
                    break
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        reporter.close()
    if step >= cfg.max_steps:
        run_eval("after")
    plot = reporter.plot()
    summary = {"step": step, "metrics": str(reporter.metrics_path), "plot": str(plot), "checkpoint": str(last_saved),
               "model": str(last_saved / "model") if last_saved else None, "evals": evals,
               "policy": accelerator.unwrap_model(model)}
    if accelerator.is_main_process:
        (out_dir / "eval.json").write_text(json.dumps(evals, indent=2))
        summary["eval"] = str(out_dir / "eval.json")
        print("\nfiles:")
        for key in ("metrics", "plot", "eval", "checkpoint", "model"):
            print(f"  {key:<10} {summary[key]}")
    accelerator.wait_for_everyone()
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        train(cfg)
    except (ValueError, RewardFunctionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
