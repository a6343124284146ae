"""python -m bench.bench_trainer runs TRL's GRPOTrainer on the default task and writes our trainer's figures."""
import json

import pytest

pytest.importorskip("trl")

from bench import bench_trainer  # noqa: E402
from gfpo_fast.train import compare  # noqa: E402


def test_bench_trainer_writes_comparable_metrics(tiny_model, tmp_path):
    out = tmp_path / "trl"
    assert bench_trainer.main(["--model_name_or_path", str(tiny_model), "--max_steps", "2",
                               "--output_dir", str(out)]) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert s["time/step"] > 0 and s["tokens_per_s"] > 0
        assert s["num_tokens"] == pytest.approx(16 * s["completions/mean_length"])  # 2 prompts x 8 completions
        assert s["tokens_per_s"] == pytest.approx(s["num_tokens"] / s["time/step"])
        assert 0 <= s["accuracy"] <= 1 and 0 <= s["completions/clipped_ratio"] <= 1
        assert s["prompts_match_ours"]  # TRL draws the prompts our trainer draws
    evals = json.loads((out / "eval.json").read_text())
    # as in our trainer, a 2-step run evaluates 16 of the 128 held-out prompts (TrainConfig.eval_split)
    assert set(evals) == {"before", "after"} and evals["before"]["eval/num_prompts"] == 16
    row = compare.summarize(out)  # readable by our comparison tool
    assert row["steps"] == 2 and row["s_per_step"] > 0
    summary = (out / "summary.md").read_text()
    assert "| trl grpo (natural run) |" in summary
    # the equal-work row: our trainer replayed TRL's completions, token for token
    assert "| gfpo-fast grpo on TRL's completions (equal work) |" in summary and "equal in 2/2 steps" in summary
