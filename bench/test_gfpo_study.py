"""Fast tests of bench/gfpo_study.py's grouping, means and the study's verdict (no runs), and its prompt-style probe
on a tiny local model."""
import json
from pathlib import Path

import pytest

from bench import gfpo_study


def row(greedy, sampled, length):
    return {"s_per_step": 10.0, "greedy_accuracy_after": greedy, "sampled_accuracy_after": sampled,
            "greedy_mean_length_after": length, "sampled_mean_length_after": length, "length_per_step": [length],
            "accuracy_per_step": [sampled]}


ROWS = {"grpo seed 1": row(0.80, 0.50, 40.0), "grpo seed 2": row(0.70, 0.40, 44.0),
        "gfpo seed 1": row(0.78, 0.47, 30.0), "gfpo seed 2": row(0.70, 0.42, 30.0)}


def test_group_and_means():
    groups = gfpo_study.group(ROWS)
    assert list(groups) == ["grpo", "gfpo"] and [n for n, _ in groups["gfpo"]] == ["gfpo seed 1", "gfpo seed 2"]
    m = gfpo_study.means(ROWS)
    assert m["grpo"]["n"] == 2 and m["grpo"]["sampled_mean_length_after"] == pytest.approx(42.0)
    assert "length_per_step" not in m["gfpo"]  # lists are not averaged


def test_verdict_needs_both_targets():
    m = gfpo_study.means(ROWS)
    v = gfpo_study.verdict(m["gfpo"], m["grpo"])
    assert v["length_ratio"] == pytest.approx(30 / 42)
    assert v["d_greedy"] == pytest.approx(-0.01) and v["d_sampled"] == pytest.approx(-0.005)
    assert v["meets"]
    assert not gfpo_study.verdict(row(0.70, 0.45, 30.0), m["grpo"])["meets"]  # 5 points of greedy accuracy lost
    assert not gfpo_study.verdict(row(0.80, 0.50, 32.0), m["grpo"])["meets"]  # 0.76x is not short enough


def test_table_marks_means_and_ratio():
    text = gfpo_study.table(ROWS, "grpo")
    assert "| **gfpo mean of 2** |" in text and "0.71x" in text and "meets the targets" in text


def test_shortest_vs_rest_splits_each_group_by_length():
    lengths = [5, 1, 3, 3, 9, 2, 7, 4]  # two groups of 4; in the first, rows 2 and 3 tie (the lower row wins)
    correct = [0, 1, 1, 0, 0, 1, 0, 0]
    short, rest = gfpo_study.shortest_vs_rest(lengths, correct, G=4, keep=2)
    assert short == pytest.approx((1 + 1 + 1 + 0) / 4)  # rows 1, 2 | 5, 7
    assert rest == pytest.approx((0 + 0 + 0 + 0) / 4)  # rows 3, 0 | 6, 4


def test_styles_probe_runs_every_style(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "tests" / "train"))
    from tiny import make_model_dir

    rows = gfpo_study.run_styles(str(make_model_dir(tmp_path / "model")), num_prompts=2, G=2, keep=1,
                                 max_completion_length=4)
    assert [r["style"] for r in rows] == list(gfpo_study.PROMPT_STYLES)
    for r in rows:
        assert 0 < r["mean_length"] <= 4 and 0 <= r["accuracy"] <= 1 and isinstance(r["example"], str)


def test_table_command_writes_every_file(tmp_path):
    compare_json = tmp_path / "compare.json"
    compare_json.write_text(json.dumps(ROWS | {"grpo mean of 2": row(0.75, 0.45, 42.0)}))
    assert gfpo_study.main(["table", "--compare_json", str(compare_json), "--out", str(tmp_path / "t")]) == 0
    for name in ("t.md", "t.json", "t.png", "t-outcomes.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "grpo mean of 2" not in json.loads((tmp_path / "t.json").read_text())["runs"]
