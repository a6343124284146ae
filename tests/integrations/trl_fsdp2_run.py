"""Run under ``torchrun --nproc_per_node 2``: the TRL drop-in's loss on an FSDP2-sharded policy against TRL's own.

``argv[1]``: a tiny model directory with its tokenizer; ``argv[2]``: where ``rank<r>.json`` goes. Each rank builds a
``GRPOTrainer`` (2 processes, gloo) and shards its policy with torch's ``fully_shard`` (each decoder layer, then the
root), as accelerate's FSDP2 does on GPUs (on the CPU accelerate runs MULTI_CPU and would not shard). On its half of
a fixed batch it then runs TRL's ``_compute_loss`` and the drop-in's (``patch``) with their backwards, for an
on-policy dapo step (the fused-linear loss's grad-in-forward path) and an off-policy GSPO step (its recompute path),
and records the losses, the largest difference of the full gradients, which loss path the drop-in took and the
parameter classes.
"""
import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

import gfpo_fast.integrations.trl as gf_trl
from gfpo_fast.fused_linear import gather_full
from gfpo_fast.train.distributed import fully_shard_model

CASES = {"dapo-on-policy": dict(loss_type="dapo"),
         "gspo-off-policy": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.02)}


def fixed_inputs(vocab_size: int, rank: int, world: int, off_policy: bool, B: int = 8, P: int = 4, T: int = 6):
    """This rank's rows of one batch (the same on every rank): ragged completions, left-padded prompts, TRL's keys."""
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(2, vocab_size, (B, P), generator=gen)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[:2, :1] = 0
    completion_ids = torch.randint(2, vocab_size, (B, T), generator=gen)
    completion_mask = (torch.arange(T) < torch.randint(2, T + 1, (B, 1), generator=gen)).long()
    advantages = torch.randn(B, generator=gen)
    old = -torch.rand(B, T, generator=gen) * 3 if off_policy else None
    rows = slice(rank * B // world, (rank + 1) * B // world)
    inputs = {"prompt_ids": prompt_ids[rows], "prompt_mask": prompt_mask[rows], "completion_ids": completion_ids[rows],
              "completion_mask": completion_mask[rows], "advantages": advantages[rows],
              "num_items_in_batch": completion_mask.sum(), "old_per_token_logps": None if old is None else old[rows]}
    return inputs


def loss_and_grads(trainer, compute_loss, inputs):
    loss = compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: gather_full(p.grad) for n, p in trainer.model.named_parameters()}
    trainer.model.zero_grad(set_to_none=True)
    return loss.item(), grads


def compare(model_dir: str, out: str, overrides: dict) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = GRPOConfig(output_dir=str(Path(out) / "trl"), use_cpu=True, report_to="none",
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=6, bf16=False, seed=0,
                      disable_dropout=True, steps_per_generation=1, **overrides)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a b"] * 8}), processing_class=tokenizer)
    fully_shard_model(trainer.model.train())
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this script does not run
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    inputs = fixed_inputs(trainer.model.config.vocab_size, rank, world, overrides.get("importance_sampling_level")
                          == "sequence")
    trl_loss, trl_grads = loss_and_grads(trainer, GRPOTrainer._compute_loss.__get__(trainer), inputs)
    calls, ops = {"hidden": 0, "logits": 0}, {"hidden": "fused_linear_policy_loss", "logits": "fused_policy_loss"}
    originals = {path: getattr(gf_trl, name) for path, name in ops.items()}

    def counted(path):
        def op(*args, **kwargs):
            calls[path] += 1
            return originals[path](*args, **kwargs)
        return op

    for path, name in ops.items():  # counts the drop-in's calls of each loss op
        setattr(gf_trl, name, counted(path))
    try:
        gf_trl.patch(trainer)
        fast_loss, fast_grads = loss_and_grads(trainer, trainer._compute_loss, inputs)
    finally:
        for path, name in ops.items():
            setattr(gf_trl, name, originals[path])
    return {"types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
            "logits_reason": trainer._gf_logits_reason, "calls": calls, "trl_loss": trl_loss, "fast_loss": fast_loss,
            "grad_max": max(g.abs().max().item() for g in trl_grads.values()),
            "grad_max_diff": max((fast_grads[n] - g).abs().max().item() for n, g in trl_grads.items())}


if __name__ == "__main__":
    results = {name: compare(sys.argv[1], sys.argv[2], overrides) for name, overrides in CASES.items()}
    rank = torch.distributed.get_rank()
    (Path(sys.argv[2]) / f"rank{rank}.json").write_text(json.dumps(results))
