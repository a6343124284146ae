"""The report's ratios and targets on synthetic results: fastest peer named, the oracle never a baseline, verdicts."""
from bench import report
from bench.harness import rank_against_peers

ENV = {"device_type": "cpu", "device": "test CPU", "date": "2026-12-01 00:00 UTC", "commit": "abc",
       "torch_threads": 2, "versions": {"trl": "1.16.0"}, "memory_method": "test"}
MEASURED = {"bandwidth_gb_s": 10.0, "bandwidth_buffer_mib": 256, "matmul_tflop_s": 0.1, "matmul_dtype": "float32",
            "matmul_n": 2048}


def _row(family, group, impl, role, ms, **shape):
    return {"family": family, "group": group, "x_name": "N", "x": shape.get("N"), "shape": shape, "impl": impl,
            "role": role, "status": "ok", "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "peak_mib": 400.0}


def _case(family, group, times, **shape):
    rows = [_row(family, group, impl, role, ms, **shape) for impl, role, ms in times]
    rank_against_peers(rows)
    return rows


def results():
    lp = dict(N=2048, V=49152, dtype="float32", mode="fwd+bwd")
    fl = dict(op="logprobs", H=576, V=49152, N=1024, dtype="float32", mode="fwd+bwd")
    return (_case("logprobs", "token_logprobs fwd+bwd", [
        ("torch reference (oracle)", "oracle", 50.0), ("gfpo-fast auto (cpp)", "ours", 100.0),
        ("torch eager (log_softmax + gather)", "peer", 400.0), ("torch.compile (log_softmax + gather)", "peer", 200.0),
    ], **lp) + _case("fused_linear", "fused-linear log-probs", [
        ("torch reference (oracle)", "oracle", 3000.0), ("gfpo-fast fused_linear_logprobs (auto)", "ours", 2000.0),
        ("TRL fused LM head (ChunkedLogProbFunction)", "peer", 2600.0),
    ], **fl))


def test_ratios_are_against_the_fastest_peer_never_the_oracle():
    rows = results()
    ours = next(r for r in rows if r["impl"] == "gfpo-fast auto (cpp)")
    assert ours["fastest_peer"] == "torch.compile (log_softmax + gather)"  # the faster oracle is not a peer
    assert ours["vs_peer"] == 2.0
    assert ours["speedup_vs_ref"] == 0.5  # kept in the JSON only
    head = report.headline(rows)
    assert [(h["fastest_peer"], h["vs_peer"]) for h in head] == [
        ("torch.compile (log_softmax + gather)", 2.0), ("TRL fused LM head (ChunkedLogProbFunction)", 1.3)]


def test_targets_met_and_not_met_with_the_figure():
    by_name = {t["target"]: t for t in report.targets(results(), ENV, MEASURED)}
    eager = next(t for name, t in by_name.items() if "vs idiomatic torch eager" in name)
    assert (eager["value"], eager["verdict"]) == (4.0, "met")
    compiled = by_name["same: speed-up vs torch.compile of it"]
    assert (compiled["value"], compiled["verdict"]) == (2.0, "met")
    trl = next(t for name, t in by_name.items() if name.startswith("fused-linear log-probs fwd+bwd H=576"))
    assert trl["verdict"] == "not met (13% short)"  # 1.3x against >= 1.5
    floor = next(t for name, t in by_name.items() if name.startswith("same: time / matmul floor") and "0.23" in name)
    # 8 N H V = 0.232 TFLOP at 0.1 TFLOP/s = 2319 ms; 2000 ms is 0.86 of it
    assert floor["verdict"] == "met" and abs(floor["value"] - 2000 / 2319.0) < 1e-3
    qwen = next(t for name, t in by_name.items() if "H=896" in name)
    assert qwen["verdict"] == "not measured"


def test_markdown_names_the_peer_and_labels_the_oracle():
    rows = results()
    run = {"command": "python -m bench", "size": "cpu", "env": ENV, "measured": MEASURED, "load": [1.0, 1.0],
           "results": rows, "empty_families": [], "targets": report.targets(rows, ENV, MEASURED), "elapsed_s": 60}
    text = report.markdown(run)
    assert "2.00x vs torch.compile (log_softmax + gather)" in text
    assert "| torch reference (oracle) |" in text and "1.00x (fastest peer)" in text
    assert "## Headline: gfpo-fast against the fastest peer" in text
