"""``python -m gfpo_fast.train``: the command. The loop, its phases and ``train()`` are in :mod:`.loop`.

    python -m gfpo_fast.train                                  # the embedded default
    python -m gfpo_fast.train --algorithm gfpo --max_steps 2   # quick look (evals on 16 prompts)
    python -m gfpo_fast.train --config run.yaml --resume_from_checkpoint latest
    accelerate launch --num_processes 2 -m gfpo_fast.train ...  # DDP; FSDP / DeepSpeed via --config_file
"""
from __future__ import annotations

import sys

from .config import parse_args
from .loop import NonFiniteError, train
from .rewards import RewardFunctionError


def main(argv: list[str] | None = None) -> int:
    """The command: 0 for a finished run, 128 + the signal's number for one stopped by a signal (checkpointed),
    2 with an ``error:`` line for a run that could not start or had to stop."""
    try:
        cfg = parse_args(argv)
        summary = train(cfg)
    except (ValueError, RewardFunctionError, NonFiniteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if summary["signal"] is None else 128 + summary["signal"]


if __name__ == "__main__":
    sys.exit(main())
