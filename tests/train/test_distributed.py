"""Two CPU processes under ``accelerate launch`` (gloo): same parameters on both ranks after 2 steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


@pytest.mark.slow
def test_two_processes_stay_in_sync(tiny_model, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(HERE / "dist_run.py"), "--model_name_or_path", str(tiny_model), "--output_dir", str(out),
           "--max_steps", "2", "--num_generations", "4", "--num_remains_in_group", "2",
           "--per_device_train_batch_size", "4", "--max_completion_length", "6", "--temperature", "1.0",
           "--arithmetic_num_train", "40", "--do_eval", "false", "--reward_funcs", "reward_fns:id_parity",
           "--reward_weights", "1.0", "--learning_rate", "1e-3"]
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = torch.load(out / "params_rank0.pt"), torch.load(out / "params_rank1.pt")
    assert torch.equal(a, b)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["num_tokens"] > 0 and (out / "checkpoints" / "checkpoint-2" / "model").is_dir()
