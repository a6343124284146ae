"""Results of one run as markdown, JSON and one PNG figure, and the issue targets judged from them."""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _find(results, family, impl_prefix, group_prefix="", **shape):
    """The first timed row of ``family`` whose implementation starts with ``impl_prefix`` at ``shape``."""
    for r in results:
        if (r["family"] == family and r["impl"].startswith(impl_prefix) and r["status"] == "ok"
                and r["group"].startswith(group_prefix) and all(r["shape"].get(k) == v for k, v in shape.items())):
            return r
    return None


def _ratio(a, b, key="median_ms"):
    """``a[key] / b[key]``, or None when either was not measured."""
    return a[key] / b[key] if a and b and a.get(key) and b.get(key) else None


def targets(results: list[dict], env: dict, measured: dict) -> list[dict]:
    """Issue 5 (CPU) or issue 3 (GPU) targets, plus the GMPO / GFPO cost ratios, for gfpo-fast's auto path."""
    gf, ref = "gfpo-fast", "torch reference"
    rows = []

    def add(name, value, goal, ok, unit="x"):
        rows.append({"target": name, "value": value, "goal": goal, "unit": unit,
                     "verdict": "not measured" if value is None else ("met" if ok(value) else "not met")})

    variants = {v: _find(results, "fused_policy_loss", gf, "fused loss fwd+bwd by variant", variant=v)
                for v in ("dapo", "grpo", "gmpo", "gfpo-half")}
    if env["device_type"] == "cpu":
        shape = dict(N=2048, V=49152, dtype="float32")
        lp = _find(results, "logprobs", gf, mode="fwd+bwd", **shape)
        add("token_logprobs fwd+bwd N=2048 V=49152 fp32: speed-up vs torch reference",
            _ratio(_find(results, "logprobs", ref, mode="fwd+bwd", **shape), lp), ">= 2", lambda v: v >= 2)
        add("same: speed-up vs TRL selective_log_softmax",
            _ratio(_find(results, "logprobs", "TRL", mode="fwd+bwd", **shape), lp), ">= 2", lambda v: v >= 2)
        grad_mib = 2048 * 49152 * 4 / 2**20
        add(f"same: peak memory / the fp32 gradient ({grad_mib:.0f} MiB)", lp and lp["peak_mib"] / grad_mib,
            "<= 1.1 (no [N, V] temporaries beyond the gradient)", lambda v: v <= 1.1)
        add("fused loss dapo fwd+bwd N=2048 V=49152 fp32: speed-up vs reference log-probs + reference loss",
            _ratio(_find(results, "fused_policy_loss", ref, variant="dapo", **shape),
                   _find(results, "fused_policy_loss", gf, variant="dapo", **shape)), ">= 2", lambda v: v >= 2)
    else:
        shape = dict(N=16384, V=151936, dtype="bfloat16")
        bw = measured["bandwidth_gb_s"]
        lp = _find(results, "logprobs", gf, mode="fwd", **shape)
        add("token_logprobs fwd N=16384 V=151936 bf16: fraction of measured bandwidth", lp and lp["gb_per_s"] / bw,
            ">= 0.80", lambda v: v >= 0.8, "")
        fused = _find(results, "fused_policy_loss", gf, variant="dapo", **shape)
        add("fused loss dapo fwd+bwd, same shape: fraction of measured bandwidth (3-pass floor)",
            fused and fused["gb_per_s"] / bw, ">= 0.75", lambda v: v >= 0.75, "")
        add("same: speed-up vs torch reference",
            _ratio(_find(results, "fused_policy_loss", ref, variant="dapo", **shape), fused), ">= 8", lambda v: v >= 8)
        add("same: speed-up vs Liger triton_grpo_loss",
            _ratio(_find(results, "fused_policy_loss", "Liger", variant="dapo", **shape), fused), ">= 1.3",
            lambda v: v >= 1.3)
        logits_mib = 16384 * 151936 * 2 / 2**20
        add(f"same: peak memory / the bf16 logits ({logits_mib:.0f} MiB)", fused and fused["peak_mib"] / logits_mib,
            "<= 1.01 (logits + O(N))", lambda v: v <= 1.01)
        fl = _find(results, "fused_linear", gf, variant="dapo", N=16384, H=4096)
        liger = _find(results, "fused_linear", "Liger", variant="dapo", N=16384, H=4096)
        add("fused-linear dapo N=16384 H=4096 V=151936 bf16: fraction of measured bf16 matmul rate",
            fl and fl["tflop_per_s"] / measured["matmul_tflop_s"], ">= 0.50", lambda v: v >= 0.5, "")
        add("same: speed-up vs Liger LigerFusedLinearGRPOLoss", _ratio(liger, fl), ">= 2", lambda v: v >= 2)
        add("same: peak memory / Liger's", _ratio(fl, liger, "peak_mib"), "<= 1", lambda v: v <= 1)
    add("GMPO time / token-level GRPO time (fused loss)", _ratio(variants["gmpo"], variants["grpo"]), "<= 1.05",
        lambda v: v <= 1.05)
    add("GFPO keeping half of each group: time / unfiltered dapo", _ratio(variants["gfpo-half"], variants["dapo"]),
        "<= 0.55", lambda v: v <= 0.55)
    dapo = variants["dapo"]
    half = dapo and _find(results, "fused_policy_loss", gf, "fused loss dapo", variant="dapo",
                          N=dapo["shape"]["N"] // 2)
    rows.append({"target": "for comparison: dapo on the kept half of the rows only (compacted) / unfiltered dapo",
                 "value": _ratio(half, dapo), "goal": "none", "unit": "x", "verdict": "information"})
    return rows


def _fmt(v, spec=".3g"):
    return "" if v is None else format(v, spec)


def markdown(run: dict) -> str:
    env, measured = run["env"], run["measured"]
    lines = [
        f"# gfpo-fast benchmarks: {env['device']}, {env['date']}",
        "",
        f"- Command: `{run['command']}` (size profile `{run['size']}`)",
        f"- Device: {env['device']}; torch threads: {env['torch_threads']}",
        f"- Commit: `{env['commit']}`",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
        + "; not installed: " + (", ".join(k for k, v in env["versions"].items() if not v) or "none"),
        f"- Measured on this device in this run: copy bandwidth {measured['bandwidth_gb_s']:.1f} GB/s "
        f"(read + write of a {measured['bandwidth_buffer_mib']} MiB buffer), {measured['matmul_dtype']} matmul "
        f"{measured['matmul_tflop_s']:.3g} TFLOP/s (n = {measured['matmul_n']})",
        f"- Peak memory: {env['memory_method']}",
    ]
    if env["device_type"] == "cpu":
        lines.append(f"- Load average (1 min) at start / end: {run['load'][0]:.1f} / {run['load'][1]:.1f}. "
                     "The CPU is shared with other processes: timings are noisy, compare implementations within one "
                     "run, not across runs.")
    lines += ["", "Every implementation is checked against the torch reference before it is timed "
              "(`wrong` = disagrees, not timed). Time: median over repeats, p20-p80 in brackets. "
              "`x ref`: speed-up over the torch reference. Peak: memory added by one call (outputs and gradients "
              "included). GB/s and TFLOP/s are against the op's floor (bytes it must move, or useful FLOPs); "
              "`% meas.` divides them by the measured copy bandwidth or matmul rate above.", ""]
    lines += ["## Targets", "", "| target | measured | goal | verdict |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {_fmt(t['value'])}{t['unit'] if t['value'] is not None else ''} | {t['goal']} | "
              f"{t['verdict']} |" for t in run["targets"]]
    groups = defaultdict(list)
    for r in run["results"]:
        groups[r["group"]].append(r)
    for group, rows in groups.items():
        lines += ["", f"## {group}", "",
                  "| x | implementation | status | median ms [p20, p80] | x ref | peak MiB | GB/s | TFLOP/s "
                  "| % meas. |",
                  "|---|---|---|---|---|---|---|---|---|"]
        skipped = {}
        for r in rows:
            if r["status"] == "skipped":
                skipped[r["impl"]] = r["detail"]
                continue
            frac = (r.get("gb_per_s", 0) / measured["bandwidth_gb_s"] if r.get("gb_per_s") else
                    r.get("tflop_per_s", 0) / measured["matmul_tflop_s"] if r.get("tflop_per_s") else None)
            timing = (f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}, {r['p80_ms']:.4g}]" if r["status"] == "ok"
                      else r.get("detail", ""))
            lines.append(f"| {r['x']} | {r['impl']} | {r['status']} | {timing} "
                         f"| {_fmt(r.get('speedup_vs_ref'), '.2f')} "
                         f"| {_fmt(r.get('peak_mib'), '.0f')} | {_fmt(r.get('gb_per_s'), '.3g')} "
                         f"| {_fmt(r.get('tflop_per_s'), '.3g')} | {_fmt(frac and 100 * frac, '.0f')} |")
        if skipped:
            lines += [""] + [f"Not run: {k}: {v}." for k, v in skipped.items()]
    if run["empty_families"]:
        lines += ["", "Families with no cases on this run: " + "; ".join(run["empty_families"]) + "."]
    return "\n".join(lines) + "\n"


def figure(run: dict, path: str) -> None:
    """One subplot per group: time against N, V or H (log-log), or bars per variant."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in run["results"]:
        if r["status"] == "ok":
            groups[r["group"]][r["impl"]].append(r)
    if not groups:
        return
    ncols = 2
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 4.2 * nrows), squeeze=False)
    for ax, (group, impls) in zip(axes.flat, groups.items()):
        numeric = all(isinstance(r["x"], (int, float)) for rows in impls.values() for r in rows)
        if numeric:
            for impl, rows in impls.items():
                xs = [r["x"] for r in rows]
                med = [r["median_ms"] for r in rows]
                err = [[r["median_ms"] - r["p20_ms"] for r in rows], [r["p80_ms"] - r["median_ms"] for r in rows]]
                ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=impl)
            ax.set_xscale("log")
        else:
            cats = list(dict.fromkeys(r["x"] for rows in impls.values() for r in rows))
            width = 0.8 / len(impls)
            for i, (impl, rows) in enumerate(impls.items()):
                pos = {r["x"]: r["median_ms"] for r in rows}
                ax.bar([c + i * width for c in range(len(cats)) if cats[c] in pos],
                       [pos[c] for c in cats if c in pos], width, label=impl)
            ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cats))], cats)
        ax.set_xlabel(next(iter(impls.values()))[0]["x_name"])
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(group, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    fig.suptitle(f"gfpo-fast benchmarks: {run['env']['device']}, {run['env']['date']}, {run['env']['commit']}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / nrows))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(run: dict, out_dir: str) -> str:
    """Writes ``<device>-<date>.{md,png,json}`` under ``out_dir``; returns the path without the extension."""
    device = run["env"]["device"] if run["env"]["device_type"] == "cuda" else "cpu " + run["env"]["device"]
    base = f"{out_dir}/{slug(device)}-{run['env']['date'][:10]}"
    with open(base + ".json", "w") as f:
        json.dump(run, f, indent=1, default=str)
    with open(base + ".md", "w") as f:
        f.write(markdown(run))
    figure(run, base + ".png")
    return base
