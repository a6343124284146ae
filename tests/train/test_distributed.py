"""Two CPU processes under ``accelerate launch`` (gloo): same parameters on both ranks after 2 steps, and the same
as one process on the whole batch."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from gfpo_fast.train.generation import _free_port

from trainer_runs import HERE, LAUNCH_ARGS, launch_env, read_jsonl, train_rows


def run_dist(flags: list[str], out, processes: int = 2) -> None:
    """``dist_run.py`` with ``flags`` into ``out``: on 2 CPU processes under ``accelerate launch`` (DDP, gloo), or
    as one plain process."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port("127.0.0.1"))] if processes == 2 else [sys.executable]
    cmd = [*launch, str(HERE / "dist_run.py"), "--output_dir", str(out), *flags]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.slow
def test_two_processes_stay_in_sync(tiny_model, tmp_path):
    """Both ranks end with the same parameters, and those moved away from the initial model (two ranks that never
    stepped would agree too), with the trainer's own sampling; that they are one process's on the whole batch is
    the next test."""
    out = tmp_path / "run"
    run_dist(["--model_name_or_path", str(tiny_model), "--max_steps", "2", "--do_eval", "false", *LAUNCH_ARGS], out)
    a, b = torch.load(out / "params_rank0.pt"), torch.load(out / "params_rank1.pt")
    assert torch.equal(a, b)
    initial = flat_params(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32))
    assert initial.shape == a.shape and (a - initial).abs().max() > 1e-6
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["num_tokens"] > 0 and (out / "checkpoints" / "checkpoint-2" / "model").is_dir()


@pytest.mark.slow
def test_two_processes_train_as_one_process_on_the_whole_batch(tiny_model, tmp_path):
    """DDP's update equals one process's on the same global batch: 2 processes of 4 rows and 1 process of 8 rows,
    each with 2 micro-batches (gradient accumulation: DDP syncs on the last only), train on the same completions
    (``dist_run.forced_generate``: sampling would differ with the process count) for 2 steps. The loss and the
    gradient norm of every step agree, and so do the parameters, which moved: the loss normalisation across
    processes and the gradient all-reduce together give the whole batch's gradient, at its scale (the loss and
    the gradient norm show a wrong scale directly)."""
    flags = ["--model_name_or_path", str(tiny_model), "--max_steps", "2", "--do_eval", "false",
             "--gradient_accumulation_steps", "2", *LAUNCH_ARGS, "--forced_completions"]
    run_dist(flags, tmp_path / "two")
    run_dist([*flags, "--per_device_train_batch_size", "8"], tmp_path / "one", processes=1)
    two_rows, one_rows = (train_rows(read_jsonl(tmp_path / run / "metrics.jsonl")) for run in ("two", "one"))
    for a, b in zip(two_rows, one_rows, strict=True):
        assert a["num_tokens"] == b["num_tokens"] and a["reward"] == b["reward"]  # the same completions
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (a["step"], a["grad_norm"], b["grad_norm"])
    two, single = (torch.load(tmp_path / run / "params_rank0.pt") for run in ("two", "one"))
    initial = flat_params(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32))
    assert (single - initial).abs().max() > 1e-4
    assert (two - single).abs().max() < 1e-5, (two - single).abs().max()
