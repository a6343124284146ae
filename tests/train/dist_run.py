"""Run under ``accelerate launch``: trains with the CLI arguments, then writes this rank's full parameters
(``params_rank<r>.pt``, DTensors gathered), the parameters' classes and how many elements this rank holds
(``param_types_rank<r>.json``).

With ``--forced_completions`` (this script's flag, not the trainer's) the trainer's ``generate`` is
:func:`forced_generate`: every completion is a function of its prompt and its place in the group, so a run on any
number of processes trains on the same completions as one process on the whole batch. Also runs as a plain
``python`` process (rank 0 of 1)."""
import json
import sys
from pathlib import Path

import torch

from gfpo_fast.fused_linear import gather_full
from gfpo_fast.train import loop, parse_args, train
from gfpo_fast.train.generation import Rollout, completion_masks, left_pad


def forced_generate(model, tokenizer, vllm, prompts: list[list[int]], cfg, eos_ids: list[int], device) -> Rollout:
    """Stands for ``loop.generate``: completion ``j`` of a group (rows ``[g*G, (g+1)*G)`` repeat one prompt) is drawn
    from a generator seeded by the prompt's ids and ``j`` only; ``max_completion_length`` tokens, an EOS at a drawn
    position (or none: truncated), pad after it. Neither the process count nor the batch changes it."""
    G, T, rows = cfg.num_generations, cfg.max_completion_length, []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(hash((tuple(prompt), i % G)) % 2 ** 31)  # ints hash the same everywhere
        ids = torch.randint(4, model.config.vocab_size, (T,), generator=gen)
        end = int(torch.randint(1, T + 2, (), generator=gen))  # T + 1: no EOS
        if end <= T:
            ids[end - 1] = eos_ids[0]
        rows.append(ids)
    completion_ids = torch.stack(rows)
    mask, truncated = completion_masks(completion_ids, eos_ids)
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    return Rollout(prompt_ids, prompt_mask, completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id).to(device),
                   mask.to(device), truncated.to(device))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    args = sys.argv[1:]
    if "--forced_completions" in args:
        args.remove("--forced_completions")
        loop.generate = forced_generate
    cfg = parse_args(args)
    run = train(cfg)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    params = list(run["policy"].parameters())
    flat = torch.cat([gather_full(p.detach()).reshape(-1) for p in params])  # collective for DTensors
    torch.save(flat, Path(cfg.output_dir) / f"params_rank{rank}.pt")
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
    sharding = {"types": sorted({type(p).__name__ for p in params}), "local_numel": local, "numel": flat.numel()}
    (Path(cfg.output_dir) / f"param_types_rank{rank}.json").write_text(json.dumps(sharding))
