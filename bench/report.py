"""Results of one run as markdown, JSON and one PNG figure, and the project's performance targets judged from them."""
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


def _verdict(value, goal: str) -> str:
    """``met`` / ``not met (by how much)`` for a goal written ``">= 3"`` or ``"<= 1.2"`` (words may follow)."""
    if value is None:
        return "not measured"
    op, bound = goal.split()[:2]
    bound = float(bound)
    if (value >= bound) if op == ">=" else (value <= bound):
        return "met"
    short = (1 - value / bound) if op == ">=" else (value / bound - 1)
    return f"not met ({100 * short:.0f}% {'short' if op == '>=' else 'over'})"


GF, EAGER, COMPILED, TRL_HEAD = "gfpo-fast", "torch eager", "torch.compile", "TRL fused LM head"
# The CPU targets' fused-linear heads: SmolLM2's and a Qwen-size one, N = 1,024..4,096.
CPU_HEADS = ((576, 49152), (896, 151936))


def targets(results: list[dict], env: dict, measured: dict) -> list[dict]:
    """The CPU targets (on the GPU: the bandwidth and Liger targets, plus TRL's fused LM head), the memory target,
    and the GMPO / GFPO cost ratios, judged for gfpo-fast's auto path against the named peers."""
    rows = []

    def add(name, value, goal, unit="x", verdict=None):
        rows.append({"target": name, "value": value, "goal": goal, "unit": unit,
                     "verdict": verdict or _verdict(value, goal)})

    def fused_linear_targets(H, V, N, vs_trl_goal, floor_goal):
        shape = dict(op="logprobs", H=H, V=V, N=N)
        ours, trl = _find(results, "fused_linear", GF, **shape), _find(results, "fused_linear", TRL_HEAD, **shape)
        head = f"fused-linear log-probs fwd+bwd H={H} V={V} N={N}" + (f" {ours['shape']['dtype']}" if ours else "")
        add(f"{head}: speed-up vs TRL's fused LM head", _ratio(trl, ours), vs_trl_goal)
        if floor_goal:
            floor_ms = 8 * N * H * V / measured["matmul_tflop_s"] / 1e9
            add(f"same: time / matmul floor (8NHV = {8 * N * H * V / 1e12:.2f} TFLOP at the measured "
                f"{measured['matmul_tflop_s']:.3g} TFLOP/s = {floor_ms:.0f} ms)",
                ours and ours["median_ms"] / floor_ms, floor_goal)

    def fused_linear_loss_paths():
        """The grad-in-forward target, per loss case: the op's time against the floor of its path (6NHV with the
        gradient in the forward pass, 8NHV with the recompute), and against the recompute composition at the same
        shape."""
        rate = measured["matmul_tflop_s"]
        for ours in [r for r in results if r["family"] == "fused_linear" and r["shape"].get("op") == "loss"
                     and r["impl"].startswith(GF + " fused_linear_policy_loss") and r["status"] == "ok"]:
            sh = ours["shape"]
            nhv = sh["N"] * sh["H"] * sh["V"]
            grad_in_forward = "grad in forward" in ours["impl"]
            head = (f"fused-linear loss {sh['variant']} fwd+bwd N={sh['N']} H={sh['H']} V={sh['V']} {sh['dtype']}, "
                    f"{'grad in forward' if grad_in_forward else 'recompute'}")
            for k in (6, 8):
                floor_ms = k * nhv / rate / 1e9
                goal = "<= 1 (beats the recompute design's floor)" if grad_in_forward and k == 8 else "none"
                add(f"{head}: time / {k}NHV floor ({floor_ms:.0f} ms at the measured {rate:.3g} TFLOP/s)",
                    ours["median_ms"] / floor_ms, goal, verdict=None if goal != "none" else "information")
            recompute = _find(results, "fused_linear", GF + " fused_linear_logprobs + loss", **sh)
            add(f"{head}: speed-up vs fused_linear_logprobs + loss (recompute) at that shape (ideal 8/6 = 1.33 "
                "with the gradient in the forward pass, 1 with the recompute)", _ratio(recompute, ours), "none",
                verdict="information")

    variants = {v: _find(results, "fused_policy_loss", GF, "fused loss fwd+bwd by variant", variant=v)
                for v in ("dapo", "grpo", "gmpo", "gfpo-half")}
    if env["device_type"] == "cpu":
        shape = dict(N=2048, V=49152, dtype="float32", mode="fwd+bwd")
        lp = _find(results, "logprobs", GF, **shape)
        add("token_logprobs fwd+bwd N=2048 V=49152 fp32: speed-up vs idiomatic torch eager (log_softmax + gather)",
            _ratio(_find(results, "logprobs", EAGER, **shape), lp), ">= 3")
        add("same: speed-up vs torch.compile of it", _ratio(_find(results, "logprobs", COMPILED, **shape), lp),
            ">= 1.5")
        grad_mib = 2048 * 49152 * 4 / 2**20
        add(f"same: peak memory / the fp32 gradient ({grad_mib:.0f} MiB; the memory target)",
            lp and lp["peak_mib"] / grad_mib,
            "<= 1.1 (no [N, V] temporaries beyond the gradient)")
        for H, V in CPU_HEADS:  # every N measured in 1,024..4,096, or N = 1,024 "not measured"
            ns = sorted({r["shape"]["N"] for r in results if r["family"] == "fused_linear"
                         and r["shape"].get("op") == "logprobs" and (r["shape"]["H"], r["shape"]["V"]) == (H, V)
                         and 1024 <= r["shape"]["N"] <= 4096})
            for N in ns or [1024]:
                fused_linear_targets(H, V, N, ">= 1.5", "<= 1.2")
    else:
        shape = dict(N=16384, V=151936, dtype="bfloat16")
        bw = measured["bandwidth_gb_s"]
        lp = _find(results, "logprobs", GF, mode="fwd", **shape)
        add("token_logprobs fwd N=16384 V=151936 bf16: fraction of measured bandwidth", lp and lp["gb_per_s"] / bw,
            ">= 0.80", "")
        fused = _find(results, "fused_policy_loss", GF, variant="dapo", **shape)
        add("fused loss dapo fwd+bwd, same shape: fraction of measured bandwidth (3-pass floor)",
            fused and fused["gb_per_s"] / bw, ">= 0.75", "")
        add("same: speed-up vs the torch reference (the GPU target, against the oracle)",
            _ratio(_find(results, "fused_policy_loss", "torch reference", variant="dapo", **shape), fused), ">= 8")
        add("same: speed-up vs Liger triton_grpo_loss",
            _ratio(_find(results, "fused_policy_loss", "Liger", variant="dapo", **shape), fused), ">= 1.3")
        logits_mib = 16384 * 151936 * 2 / 2**20
        add(f"same: peak memory / the bf16 logits ({logits_mib:.0f} MiB)", fused and fused["peak_mib"] / logits_mib,
            "<= 1.01 (logits + O(N))")
        fl = _find(results, "fused_linear", GF, op="loss", variant="dapo", N=16384, H=4096)
        liger = _find(results, "fused_linear", "Liger", op="loss", variant="dapo", N=16384, H=4096)
        add("fused-linear loss dapo N=16384 H=4096 V=151936 bf16: fraction of measured bf16 matmul rate",
            fl and fl["tflop_per_s"] / measured["matmul_tflop_s"], ">= 0.50", "")
        add("same: speed-up vs Liger LigerFusedLinearGRPOLoss", _ratio(liger, fl), ">= 2")
        add("same: peak memory / Liger's", _ratio(fl, liger, "peak_mib"), "<= 1")
        fused_linear_targets(4096, 151936, 16384, ">= 1.2", None)
    fused_linear_loss_paths()
    add("GMPO time / token-level GRPO time (fused loss)", _ratio(variants["gmpo"], variants["grpo"]), "<= 1.05")
    add("GFPO keeping half of each group: time / unfiltered dapo", _ratio(variants["gfpo-half"], variants["dapo"]),
        "<= 0.55")
    dapo = variants["dapo"]
    half = dapo and _find(results, "fused_policy_loss", GF, "fused loss dapo", variant="dapo",
                          N=dapo["shape"]["N"] // 2)
    add("for comparison: dapo on the kept half of the rows only (compacted) / unfiltered dapo", _ratio(half, dapo),
        "none", verdict="information")
    return rows


def headline(results: list[dict]) -> list[dict]:
    """Per table and shape: gfpo-fast's auto path against the fastest peer there, named (the README's ratios)."""
    rows, seen = [], set()
    for r in results:
        key = (r["group"], str(r["x"]))
        if r["role"] == "ours" and r["status"] == "ok" and key not in seen and r.get("fastest_peer"):
            seen.add(key)
            peer_ms = r["median_ms"] * r["vs_peer"]
            rows.append({"group": r["group"], "x_name": r["x_name"], "x": r["x"], "impl": r["impl"],
                         "median_ms": r["median_ms"], "fastest_peer": r["fastest_peer"], "peer_ms": peer_ms,
                         "vs_peer": r["vs_peer"]})
    return rows


def targets_markdown(rows: list[dict]) -> str:
    """The targets as a markdown table (printed at the end of ``python -m bench`` and written to the .md)."""
    lines = ["## Targets", "", "| target | measured | goal | verdict |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {_fmt(t['value'])}{t['unit'] if t['value'] is not None else ''} | {t['goal']} | "
              f"{t['verdict']} |" for t in rows]
    return "\n".join(lines)


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
    if run.get("elapsed_s"):
        lines.append(f"- Run time: {run['elapsed_s'] / 60:.1f} min")
    if env["device_type"] == "cpu":
        lines.append(f"- Load average (1 min) at start / end: {run['load'][0]:.1f} / {run['load'][1]:.1f}. "
                     "The CPU is shared with other processes: timings are noisy, compare implementations within one "
                     "run, not across runs.")
    lines += ["", "Every implementation is checked against the project's torch reference, the **oracle**, before "
              "it is timed (`wrong` = disagrees, not timed); the oracle is in the tables for that and is never a "
              "baseline. Peers are what a user could run instead: idiomatic torch eager, `torch.compile` of it "
              "(compile time in its own column, never in the timing), TRL, Liger-Kernel. Time: median over "
              "repeats, p20-p80 in brackets. `vs fastest peer`: the fastest peer's median at that shape over the "
              "row's, naming that peer (above 1: faster than every peer). Peak: memory added by one call (outputs "
              "and gradients included). GB/s and TFLOP/s are against the op's floor (bytes it must move, or useful "
              "FLOPs); `% meas.` divides them by the measured copy bandwidth or matmul rate above.", ""]
    lines += [targets_markdown(run["targets"])]
    lines += ["", "## Headline: gfpo-fast against the fastest peer", "",
              "| table | x | gfpo-fast ms | fastest peer | peer ms | speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {h['group']} | {h['x_name']}={h['x']} | {h['median_ms']:.4g} | {h['fastest_peer']} | "
              f"{h['peer_ms']:.4g} | {h['vs_peer']:.2f}x |" for h in headline(run["results"])]
    groups = defaultdict(list)
    for r in run["results"]:
        groups[r["group"]].append(r)
    for group, rows in groups.items():
        lines += ["", f"## {group}", "",
                  "| x | implementation | status | median ms [p20, p80] | vs fastest peer | peak MiB | GB/s | TFLOP/s "
                  "| % meas. | compile s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        skipped = {}
        for r in rows:
            if r["status"] == "skipped":
                skipped[r["impl"]] = r["detail"]
                continue
            frac = (r.get("gb_per_s", 0) / measured["bandwidth_gb_s"] if r.get("gb_per_s") else
                    r.get("tflop_per_s", 0) / measured["matmul_tflop_s"] if r.get("tflop_per_s") else None)
            timing = (f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}, {r['p80_ms']:.4g}]" if r["status"] == "ok"
                      else r.get("detail", ""))
            if r.get("fastest_peer") == r["impl"]:
                vs = "1.00x (fastest peer)"
            else:
                vs = f"{r['vs_peer']:.2f}x vs {r['fastest_peer']}" if r.get("vs_peer") else ""
            lines.append(f"| {r['x']} | {r['impl']} | {r['status']} | {timing} | {vs} "
                         f"| {_fmt(r.get('peak_mib'), '.0f')} | {_fmt(r.get('gb_per_s'), '.3g')} "
                         f"| {_fmt(r.get('tflop_per_s'), '.3g')} | {_fmt(frac and 100 * frac, '.0f')} "
                         f"| {_fmt(r.get('compile_s'), '.1f')} |")
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
