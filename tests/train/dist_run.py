"""Run under ``accelerate launch``: trains with the CLI arguments, then writes this rank's parameters."""
import sys
from pathlib import Path

import torch

from gfpo_fast.train import parse_args, train

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    cfg = parse_args(sys.argv[1:])
    run = train(cfg)
    rank = torch.distributed.get_rank()
    flat = torch.cat([p.detach().reshape(-1) for p in run["policy"].parameters()])
    torch.save(flat, Path(cfg.output_dir) / f"params_rank{rank}.pt")
