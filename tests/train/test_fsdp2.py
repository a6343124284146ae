"""FSDP2 on the CPU over gloo, 2 processes, through the README's launch command (``accelerate launch --config_file
examples/accelerate/fsdp.yaml --num_processes 2``): accelerate 1.15 comes up MULTI_CPU there and would train as
DDP with plain parameters, so these tests assert that the parameters really are DTensors (sharded by the
trainer's ``fully_shard``), not only that the run finishes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gfpo_fast.train.generation import _free_port

from trainer_runs import HERE, LAUNCH_ARGS, ROOT, launch_env, read_jsonl, train_rows


def launch_fsdp(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--main_process_port",
           str(_free_port("127.0.0.1")), str(HERE / "dist_run.py"), *args]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_fsdp2_trains_checkpoints_and_resumes_to_identical_parameters(tiny_model, tmp_path):
    """3 steps uninterrupted (a checkpoint at step 2; evals before and after, generation on the sharded model),
    and a second run resumed from that checkpoint for the third step: the same parameters, bit for bit, on
    both ranks of both runs, and the same step-3 metrics."""
    common = ["--model_name_or_path", str(tiny_model), "--max_steps", "3", "--save_steps", "2", "--do_eval", "true",
              "--eval_num_prompts", "4", "--eval_batch_size", "4", *LAUNCH_ARGS]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    proc = launch_fsdp(*common, "--output_dir", str(full))
    assert "sharded with torch's fully_shard over 2 processes" in proc.stdout + proc.stderr
    checkpoint = full / "checkpoints" / "checkpoint-2"
    assert {p.name for p in (checkpoint / "optimizer").iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    launch_fsdp(*common, "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoint))

    for run in (full, resumed):
        for rank in (0, 1):
            sharding = json.loads((run / f"param_types_rank{rank}.json").read_text())
            assert sharding["types"] == ["DTensor"], sharding  # really sharded, not DDP's plain Parameters
            assert sharding["local_numel"] < sharding["numel"], sharding
    params = [torch.load(run / f"params_rank{rank}.pt") for run in (full, resumed) for rank in (0, 1)]
    assert all(torch.equal(params[0], p) for p in params[1:])
    rows = {run: train_rows(read_jsonl(run / "metrics.jsonl")) for run in (full, resumed)}
    assert [r["step"] for r in rows[full]] == [1, 2, 3] and [r["step"] for r in rows[resumed]] == [3]
    assert all(rows[resumed][0][k] == rows[full][2][k] for k in ("loss", "grad_norm", "lr", "reward", "num_tokens"))
    assert rows[full][0]["num_tokens"] > 0 and rows[full][0]["grad_norm"] > 0
    from transformers import AutoModelForCausalLM  # the export loads in transformers, with the trained weights

    exported = AutoModelForCausalLM.from_pretrained(full / "checkpoints" / "checkpoint-3" / "model")
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in exported.parameters()]), params[0])


@pytest.mark.slow
def test_fsdp2_gradient_equals_one_process(tiny_model, tmp_path):
    """The trainer's forward, fused-linear loss (DTensor lm_head gathered by gather_full) and backward on an
    FSDP2-sharded model over 2 ranks give one process's gradient on the whole batch, untied and tied lm_head,
    dapo and grpo normalisation; one clipped AdamW step later the parameters agree too."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port("127.0.0.1")), str(HERE / "fsdp_grad_run.py"), str(tiny_model), str(tmp_path)]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        results = json.loads((tmp_path / f"grad_rank{rank}.json").read_text())
        assert results["untied"]["tied"] is False and results["tied"]["tied"] is True
        for r in results.values():
            assert r["types"] == ["DTensor"]
            for loss_type in ("dapo", "grpo"):
                assert r[f"{loss_type}_grad_max_diff"] <= 1e-6 * max(1.0, r[f"{loss_type}_grad_max"]), r
            assert r["grad_norm"][0] == pytest.approx(r["grad_norm"][1], rel=1e-5)
            assert r["param_max_change"] > 1e-4 and r["param_max_diff"] < 1e-5, r  # moved, and to the same place
