"""Held-out evaluation: greedy and sampled accuracy and completion length, before and after training."""
from __future__ import annotations

import torch

from gfpo_fast.advantages import weighted_rewards

from .generation import generate_transformers
from .rewards import accuracy_name, as_completions, score


@torch.no_grad()
def evaluate(model, tokenizer, rows, prompts, cfg, accelerator, reward_names, reward_funcs, eos_ids) -> dict:
    """Held-out accuracy (mean accuracy reward, ``rewards.accuracy_name``; weighted reward if there is no accuracy
    reward) and mean completion length, greedy and sampled (one sample per prompt, seeded: the same draws before and
    after)."""
    accuracy = accuracy_name(reward_names)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(rows), world))
    out = {}
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        for mode in ("greedy", "sampled"):
            sums = torch.zeros(4, device=accelerator.device)  # [score, length, truncated, count]
            for i in range(0, len(mine), cfg.eval_batch_size):
                chunk = mine[i:i + cfg.eval_batch_size]
                ro = generate_transformers(accelerator.unwrap_model(model), tokenizer, [prompts[j] for j in chunk],
                                           max_new_tokens=cfg.max_completion_length, do_sample=mode == "sampled",
                                           temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                           eos_ids=eos_ids)
                ids = ro.completion_lists()  # host sync
                chunk_rows = [rows[j] for j in chunk]
                comps = as_completions(tokenizer.batch_decode(ids, skip_special_tokens=True), chunk_rows)
                r = score(reward_funcs, reward_names, chunk_rows, comps, ids, None, {})  # (n, F)
                if accuracy is not None:
                    s = r[:, reward_names.index(accuracy)]
                else:
                    s = weighted_rewards(r, cfg.reward_weights)
                sums += torch.tensor([float(torch.nan_to_num(s).sum()), sum(map(len, ids)),
                                      float(ro.truncated.sum()), len(chunk)], device=sums.device)
            total = accelerator.reduce(sums, reduction="sum").tolist()  # host sync
            out[f"eval/{mode}_accuracy"] = total[0] / max(total[3], 1)
            out[f"eval/{mode}_mean_length"] = total[1] / max(total[3], 1)
            out[f"eval/{mode}_truncated"] = total[2] / max(total[3], 1)
    out["eval/num_prompts"] = len(rows)
    return out
