"""Observability: trackers (report_to), completion samples (log_completions), evals during training (eval_steps)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gfpo_fast.train import train
from gfpo_fast.train.__main__ import main

from trainer_runs import read_jsonl, train_rows


def test_tensorboard_gets_the_jsonl_metric_names(make_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(make_config(report_to=["tensorboard"], do_eval=True, eval_steps=1, max_steps=2, run_name="tb"))
    events = Path(run["metrics"]).parent / "tensorboard" / "gfpo-fast"
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    rows = read_jsonl(run["metrics"])
    names = {k for r in rows for k in r if k != "step"}
    assert names <= scalars, names - scalars
    steps = train_rows(rows)
    assert [e.step for e in acc.Scalars("reward")] == [r["step"] for r in steps] == [1, 2]
    assert [e.value for e in acc.Scalars("reward")] == pytest.approx([r["reward"] for r in steps])
    assert [e.step for e in acc.Scalars("eval/greedy_accuracy")] == [0, 1, 2]  # before, step 1, after


def test_log_completions_rows_and_terminal_table(make_config, capsys):
    run = train(make_config(log_completions=True, num_completions_to_print=3, algorithm="gfpo", max_steps=2))
    rows = read_jsonl(Path(run["metrics"]).with_name("completions.jsonl"))
    assert [r["step"] for r in rows] == [1] * 8 + [2] * 8  # 2 prompts x G=4 per step, every logging step
    assert set(rows[0]) == {"step", "prompt", "completion", "reward", "rewards", "advantage", "kept"}
    assert set(rows[0]["rewards"]) == {"id_parity"}
    for group in (rows[i:i + 4] for i in range(0, len(rows), 4)):
        assert sum(r["kept"] for r in group) == 2  # num_remains_in_group
        assert all((r["advantage"] is None) != r["kept"] for r in group)  # dropped rows do not train
    out = capsys.readouterr()
    text = out.out + out.err
    assert "completions at step 1 (3 of 8; completions.jsonl)" in text and "| kept" in text
    table = text.split("completions at step 2")[1].splitlines()[1:5]
    assert table[0].split() == ["prompt", "|", "completion", "|", "reward", "|", "adv", "|", "kept"]
    assert sum(line.rstrip().endswith(("yes", "no")) for line in table) == 3


def test_resume_drops_the_completions_after_the_checkpoint(make_config, tmp_path):
    train(make_config(log_completions=True, max_steps=2, save_steps=1))
    run = train(make_config(log_completions=True, max_steps=2,
                            resume_from_checkpoint=str(tmp_path / "run" / "checkpoints" / "checkpoint-1")))
    assert [r["step"] for r in read_jsonl(Path(run["metrics"]).with_name("completions.jsonl"))] == [1] * 8 + [2] * 8


def test_eval_steps_runs_evals_at_those_steps(make_config):
    run = train(make_config(do_eval=True, eval_steps=2, max_steps=5))
    assert list(run["evals"]) == ["before", "step_2", "step_4", "after"]
    evals = [r for r in read_jsonl(run["metrics"]) if "eval/greedy_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    assert json.loads(Path(run["eval"]).read_text()).keys() == run["evals"].keys()


@pytest.mark.parametrize("report_to", [["tensorboard"], ["all"]])
def test_missing_tracker_package_names_it(make_config, monkeypatch, capsys, report_to):
    for module in ("tensorboard", "tensorboardX", "wandb", "trackio", "mlflow"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: find_spec finds nothing
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train(make_config(report_to=report_to))
    assert main(["--report_to", *report_to, "--max_steps", "1"]) == 2
    assert "tensorboard" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (dict(report_to=["comet"]), "report_to must be 'none', 'all' or a list of"),
    (dict(report_to=["all", "wandb"]), "report_to must be 'none', 'all'"),
    (dict(eval_steps=0, do_eval=True), "eval_steps must be None or an integer >= 1, got 0"),
    (dict(eval_steps=2), "eval_steps=2 with do_eval=false"),
    (dict(eval_steps=3, do_eval=True, num_iterations=2), "eval_steps must be a multiple of num_iterations=2 "),
    (dict(num_completions_to_print=0), "num_completions_to_print must be None or an integer >= 1"),
    (dict(project=""), "project must be a non-empty string"),
])
def test_bad_observability_settings(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_report_to_none_and_a_single_string(make_config):
    assert make_config(report_to=["none"]).report_to == []
    assert make_config(report_to="tensorboard").report_to == ["tensorboard"]
