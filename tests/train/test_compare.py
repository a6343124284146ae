"""python -m gfpo_fast.train.compare runs each variant once per seed and tabulates the runs."""
import json

import pytest

from gfpo_fast.train import compare

pytestmark = pytest.mark.slow  # two subprocess trainer runs (~30 s)


def test_compare_runs_variants_and_reuses_finished_runs(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(compare.Path(__file__).parent))  # reward_fns for the subprocesses
    out = tmp_path / "cmp"
    flags = ["--model_name_or_path", str(tiny_model), "--max_steps", "1", "--num_generations", "4",
             "--num_remains_in_group", "2", "--per_device_train_batch_size", "8", "--max_completion_length", "6",
             "--temperature", "1.0", "--arithmetic_num_train", "40", "--eval_num_prompts", "4",
             "--eval_batch_size", "4", "--reward_funcs", "reward_fns:id_parity", "--reward_weights", "1.0",
             "--save_steps", "100"]
    compare.main(["--variants", "grpo", "gfpo", "--seeds", "3", "--output_dir", str(out), *flags])
    rows = json.loads((out / "compare.json").read_text())
    assert set(rows) == {"grpo seed 3", "gfpo seed 3"}
    assert all(r["steps"] == 1 and r["s_per_step"] > 0 for r in rows.values())
    assert "| grpo seed 3 |" in (out / "compare.md").read_text() and (out / "compare.png").exists()
    capsys.readouterr()
    compare.main(["--variants", "grpo", "--seeds", "3", "--output_dir", str(out), *flags])
    assert "reusing" in capsys.readouterr().out
