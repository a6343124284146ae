"""Run under ``torchrun --nproc_per_node 2``: the trainer's gradient on an FSDP2-sharded model against one process.

For the tiny model of ``argv[1]`` as saved (untied lm_head) and with its lm_head tied to the embeddings (as
SmolLM2), each rank builds the model twice, shards one copy with the trainer's ``fully_shard_model`` and runs
``accumulate_gradients`` (the policy forward, ``lm_head_of``'s DTensor weight through
``fused_linear_policy_loss``, the backward) on its half of a fixed batch; the other copy runs the whole batch
unsharded with the one-process loss normalisation. Then one clipped AdamW step each (``optimizer_step``).
Writes ``argv[2]/grad_rank<r>.json``: per variant, the largest gradient and parameter differences, the gradient
norms, the parameter classes of the sharded copy and whether its lm_head is still tied to the embeddings.
"""
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from gfpo_fast.fused_linear import gather_full
from gfpo_fast.train import TrainConfig
from gfpo_fast.train.distributed import fully_shard_model
from gfpo_fast.train.loop import Batch, accumulate_gradients, make_optimizer, optimizer_step
from gfpo_fast.train.reporting import StepTimer


def load(model_dir: str, tied: bool):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.train()


def fixed_batch(vocab_size: int, B: int = 8, P: int = 5, T: int = 6) -> Batch:
    """The same batch on every rank: groups of 2 rows share a prompt, left-padded prompts, ragged completions."""
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(4, vocab_size, (B // 2, P), generator=gen).repeat_interleave(2, 0)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[:2, :2] = 0
    completion_ids = torch.randint(4, vocab_size, (B, T), generator=gen)
    completion_mask = (torch.arange(T) < torch.randint(2, T + 1, (B, 1), generator=gen)).long()
    return Batch(prompt_ids, prompt_mask, completion_ids, completion_mask, torch.randn(B, generator=gen),
                 completion_mask.sum())


def compare(model_dir: str, tied: bool, accelerator) -> dict:
    rank, world = accelerator.process_index, accelerator.num_processes
    sharded, single = fully_shard_model(load(model_dir, tied)), load(model_dir, tied)
    batch = fixed_batch(single.config.vocab_size)
    mine = slice(rank * len(batch) // world, (rank + 1) * len(batch) // world)
    result = {"tied": sharded.lm_head.weight is sharded.model.embed_tokens.weight,  # the tie survived fully_shard
              "types": sorted({type(p).__name__ for p in sharded.parameters()})}
    for loss_type in ("dapo", "grpo"):
        cfg = TrainConfig(model_name_or_path=model_dir, loss_type=loss_type, temperature=0.7)
        accumulate_gradients(sharded, batch[mine], cfg, cfg.loss_kwargs(world), accelerator, False, StepTimer())
        accumulate_gradients(single, batch, cfg, cfg.loss_kwargs(1), accelerator, False, StepTimer())
        grads = {n: gather_full(p.grad) for n, p in sharded.named_parameters()}
        result[f"{loss_type}_grad_max_diff"] = max((grads[n] - p.grad).abs().max().item()
                                                   for n, p in single.named_parameters())
        result[f"{loss_type}_grad_max"] = max(p.grad.abs().max().item() for p in single.parameters())
        sharded.zero_grad(set_to_none=True)
        single.zero_grad(set_to_none=True)
    cfg = TrainConfig(model_name_or_path=model_dir, learning_rate=1e-3)
    result["grad_norm"] = []
    for model, processes, rows in ((sharded, world, mine), (single, 1, slice(None))):
        optimizer = make_optimizer(model, cfg)
        accumulate_gradients(model, batch[rows], cfg, cfg.loss_kwargs(processes), accelerator, False, StepTimer())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        result["grad_norm"].append(optimizer_step(model, optimizer, scheduler, 1.0, accelerator).item())
    stepped = {n: gather_full(p.detach()) for n, p in sharded.named_parameters()}
    result["param_max_diff"] = max((stepped[n] - p).abs().max().item() for n, p in single.named_parameters())
    result["param_max_change"] = max((stepped[n] - p).abs().max().item() for n, p in
                                     load(model_dir, tied).named_parameters())
    return result


if __name__ == "__main__":
    accelerator = Accelerator(cpu=True)
    results = {variant: compare(sys.argv[1], variant == "tied", accelerator) for variant in ("untied", "tied")}
    (Path(sys.argv[2]) / f"grad_rank{accelerator.process_index}.json").write_text(json.dumps(results))
