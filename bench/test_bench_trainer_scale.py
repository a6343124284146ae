"""The one-step trainer benchmark at tiny sizes: each contender CI can run goes through the driver and its fresh
worker processes, and all of them train on the same batch (same loss, same gradient norm)."""
import importlib.util
import json

import pytest

from bench import bench_trainer_scale as scale

TINY = ["--configs", "2x16", "--vocab", "1000", "--hidden", "32", "--layers", "1", "--prompt", "4", "--timeout", "300",
        "--max_gb", "6"]


def test_contenders_run_one_step_on_the_same_batch(tmp_path):
    contenders = ["head", "head_ckpt"] + (["trl"] if importlib.util.find_spec("trl") else [])
    out = tmp_path / "scale"
    assert scale.main([*TINY, "--contenders", ",".join(contenders), "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["contender"] for r in rows] == contenders
    for r in rows:
        assert "error" not in r, r
        assert r["step_s"][0] > 0 and r["baseline_rss_gb"] > 0
        # the worker ran under the driver's address-space limit: --max_gb plus the CPU worker's slack
        assert r["rlimit_as_gb"] == pytest.approx(6 + scale.VIRTUAL_SLACK_GB)
    for r in rows[1:]:
        assert r["grad_norm"] == pytest.approx(rows[0]["grad_norm"], rel=1e-4)  # the same work
    assert "no [B, T, V] logits" in rows[0]["path"]
    if "trl" in contenders:
        assert "fused LM head (ChunkedLogProbFunction" in rows[-1]["path"]
    assert "| 2 x 16 | gfpo-fast trainer (HEAD) |" in out.with_suffix(".md").read_text()


def test_a_logits_run_that_cannot_fit_is_not_run_and_says_what_it_needs(capsys, monkeypatch):
    assert scale.logits_bound_gb(8, 4096, 151936) == pytest.approx(39.83, abs=0.01)  # fp32 logits + gradient
    monkeypatch.setattr(scale, "run_worker", lambda *a, **k: pytest.fail("a run that cannot fit was started"))
    args = [*TINY, "--configs", "8x4096", "--vocab", "151936", "--contenders", "logits", "--logits_tree", ".",
            "--max_gb", "20"]
    assert scale.main(args) == 0
    out = capsys.readouterr().out
    assert "does not fit: needs >= 39.8 GB for the logits and their gradient, 20.0 GB allowed" in out
    assert scale.main([*TINY, "--contenders", "logits", "--logits_tree", "none"]) == 0
    assert f"no {scale.LOGITS_COMMIT} source tree" in capsys.readouterr().out
