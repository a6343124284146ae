"""Run under ``accelerate launch``: trains with the CLI arguments, then writes this rank's full parameters
(``params_rank<r>.pt``, DTensors gathered), the parameters' classes and how many elements this rank holds
(``param_types_rank<r>.json``)."""
import json
import sys
from pathlib import Path

import torch

from gfpo_fast.fused_linear import gather_full
from gfpo_fast.train import parse_args, train

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    cfg = parse_args(sys.argv[1:])
    run = train(cfg)
    rank = torch.distributed.get_rank()
    params = list(run["policy"].parameters())
    flat = torch.cat([gather_full(p.detach()).reshape(-1) for p in params])  # collective for DTensors
    torch.save(flat, Path(cfg.output_dir) / f"params_rank{rank}.pt")
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
    sharding = {"types": sorted({type(p).__name__ for p in params}), "local_numel": local, "numel": flat.numel()}
    (Path(cfg.output_dir) / f"param_types_rank{rank}.json").write_text(json.dumps(sharding))
