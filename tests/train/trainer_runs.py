"""Shared by the tests that run the trainer: a run's JSON-lines files, and the test-sized flags and the
environment of the runs launched as separate processes (test_distributed.py, test_fsdp2.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
# 2 prompts x G=4 per step, completions of <= 6 tokens, the tiny model's parity reward
LAUNCH_ARGS = ["--num_generations", "4", "--per_device_train_batch_size", "4", "--max_completion_length", "6",
               "--temperature", "1.0", "--arithmetic_num_train", "40", "--reward_funcs", "reward_fns:id_parity",
               "--reward_weights", "1.0", "--learning_rate", "1e-3"]


def launch_env() -> dict:
    """The environment of a launched run: the checkout and this folder (reward_fns) importable, one thread per
    process, no GPU, no Hub downloads."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")


def read_jsonl(path) -> list[dict]:
    """The rows of a JSON-lines file (metrics.jsonl, completions.jsonl)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def train_rows(rows: list[dict]) -> list[dict]:
    """The train rows of metrics.jsonl: each eval is a row of its own, without ``loss``."""
    return [r for r in rows if "loss" in r]
