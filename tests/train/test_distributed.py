"""Two CPU processes under ``accelerate launch`` (gloo): same parameters on both ranks after 2 steps."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from gfpo_fast.train.generation import _free_port

from trainer_runs import HERE, LAUNCH_ARGS, launch_env, read_jsonl


@pytest.mark.slow
def test_two_processes_stay_in_sync(tiny_model, tmp_path):
    """Both ranks end with the same parameters, and those moved away from the initial model (two ranks that never
    stepped would agree too). That DDP's averaged gradient equals one process's on the whole batch is tested on a
    fixed batch in test_fsdp2.py (fsdp_grad_run.py), which shares the trainer's gradient path."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port("127.0.0.1")),
           str(HERE / "dist_run.py"), "--model_name_or_path", str(tiny_model), "--output_dir", str(out),
           "--max_steps", "2", "--do_eval", "false", *LAUNCH_ARGS]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = torch.load(out / "params_rank0.pt"), torch.load(out / "params_rank1.pt")
    assert torch.equal(a, b)
    initial = torch.cat([p.detach().reshape(-1) for p in
                         AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).parameters()])
    assert initial.shape == a.shape and (a - initial).abs().max() > 1e-6
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["num_tokens"] > 0 and (out / "checkpoints" / "checkpoint-2" / "model").is_dir()
