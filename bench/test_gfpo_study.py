"""Fast tests of bench/gfpo_study.py's grouping, means and the issue-20 verdict (no model, no runs)."""
import pytest

from bench import gfpo_study


def row(greedy, sampled, length):
    return {"s_per_step": 10.0, "greedy_accuracy_after": greedy, "sampled_accuracy_after": sampled,
            "greedy_mean_length_after": length, "sampled_mean_length_after": length, "length_per_step": [length]}


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
