"""``python -m gfpo_fast.train.compare``: GRPO versus GFPO (length and token-efficiency filters), side by side.

Runs ``python -m gfpo_fast.train`` once per variant and seed with the same budget (every other flag
is passed through unchanged), one run at a time, then writes ``compare.md`` (a table), ``compare.json``
and ``compare.png`` (completion length and train accuracy per step) to ``--output_dir``, with the
machine, commit and date. A finished run is reused, not repeated
(a run is finished when its ``eval.json`` holds the eval after training), so an interrupted
comparison resumes where it stopped.

    python -m gfpo_fast.train.compare                                   # grpo, gfpo, gfpo_te; seed 42
    python -m gfpo_fast.train.compare --seeds 0 1 2 --output_dir runs/cmp --max_steps 25
    python -m gfpo_fast.train.compare --trl_run runs/bench-trainer-trl   # adds TRL's GRPOTrainer as a row

``--trl_run`` takes the output directory of ``python -m bench.bench_trainer`` (TRL's GRPOTrainer on the
same task and config, from a checkout: ``bench/`` is not installed); it is summarised like the others.

Columns: seconds per step and completion tokens per second (means over steps), the fraction of steps
whose gradient was nonzero, held-out greedy and sampled accuracy and mean completion length before and
after training (from the trainer's own evals).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "grpo": ["--algorithm", "grpo"],
    "gfpo": ["--algorithm", "gfpo", "--group_filter", "length"],
    "gfpo_te": ["--algorithm", "gfpo", "--group_filter", "token_efficiency"],
}
EVAL_KEYS = ("greedy_accuracy", "sampled_accuracy", "greedy_mean_length", "sampled_mean_length")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def run_one(out: Path, flags: list[str]) -> None:
    done = out / "eval.json"
    if done.exists() and "after" in json.loads(done.read_text()):  # finished, with its final eval
        print(f"reusing {out}", flush=True)
        return
    # an unfinished run there (no final eval) is started over, as a whole
    cmd = [sys.executable, "-m", "gfpo_fast.train", "--output_dir", str(out), "--overwrite_output_dir", "true", *flags]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def summarize(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in rows if "loss" in r]  # the eval rows carry only the step and eval/ metrics
    evals = json.loads((out / "eval.json").read_text())
    row = {
        "steps": len(steps),
        "s_per_step": statistics.mean(s["time/step"] for s in steps),
        "tokens_per_s": statistics.mean(s["tokens_per_s"] for s in steps),
        "frac_nonzero_grad": sum(s["grad_norm"] > 0 for s in steps) / max(len(steps), 1),
        "length_per_step": [s["completions/mean_length"] for s in steps],
        "accuracy_per_step": [s.get("accuracy", float("nan")) for s in steps],
    }
    for when in ("before", "after"):
        for key in EVAL_KEYS:
            row[f"{key}_{when}"] = evals.get(when, {}).get(f"eval/{key}", float("nan"))
    return row


def seed_means(rows: dict[str, dict], variants: list[str], seeds: list[int]) -> dict[str, dict]:
    """One row per variant with the mean of every scalar column over the seeds (only with two seeds or more)."""
    if len(seeds) < 2:
        return {}
    out = {}
    for variant in variants:
        runs = [rows[f"{variant} seed {seed}"] for seed in seeds]
        out[f"{variant} mean of {len(seeds)} seeds"] = {
            k: statistics.mean(r[k] for r in runs) for k, v in runs[0].items() if not isinstance(v, list)}
    return out


def table(rows: dict[str, dict]) -> str:
    head = ("| run | s/step | tok/s | steps with grad | greedy acc before -> after | sampled acc before -> after | "
            "greedy len before -> after | sampled len before -> after |")
    lines = [head, "|" + "---|" * 8]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['s_per_step']:.1f} | {r['tokens_per_s']:.1f} | {r['frac_nonzero_grad']:.0%} | "
            f"{r['greedy_accuracy_before']:.3f} -> {r['greedy_accuracy_after']:.3f} | "
            f"{r['sampled_accuracy_before']:.3f} -> {r['sampled_accuracy_after']:.3f} | "
            f"{r['greedy_mean_length_before']:.1f} -> {r['greedy_mean_length_after']:.1f} | "
            f"{r['sampled_mean_length_before']:.1f} -> {r['sampled_mean_length_after']:.1f} |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path) -> None:
    """Train completion length and accuracy per step: one colour per variant, each seed a thin line and,
    with several seeds, their mean a thick one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_variant: dict[str, list[dict]] = {}
    for name, r in rows.items():
        if "length_per_step" in r:  # not a mean-over-seeds row
            per_variant.setdefault(name.split(" seed ")[0], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (variant, runs) in enumerate(per_variant.items()):
        color = f"C{i}"
        for ax, key in zip(axes, ("length_per_step", "accuracy_per_step")):
            steps = min(len(r[key]) for r in runs)
            for r in runs:
                ax.plot(range(1, len(r[key]) + 1), r[key], color=color, lw=0.7, alpha=0.45 if len(runs) > 1 else 1.0,
                        label=None if len(runs) > 1 else variant)
            if len(runs) > 1:
                mean = [statistics.mean(r[key][t] for r in runs) for t in range(steps)]
                ax.plot(range(1, steps + 1), mean, color=color, lw=2.2, label=f"{variant} (mean of {len(runs)})")
    for ax, title in zip(axes, ("train completion length (tokens)", "train accuracy")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--output_dir", default="runs/compare")
    parser.add_argument("--trl_run", default=None, help="a finished `python -m bench.bench_trainer` output directory")
    args, passthrough = parser.parse_known_args(argv)
    out = Path(args.output_dir)
    rows = {}
    for seed in args.seeds:
        for variant in args.variants:
            run_dir = out / f"{variant}-seed{seed}"
            run_one(run_dir, [*VARIANTS[variant], "--seed", str(seed), *passthrough])
            rows[f"{variant} seed {seed}"] = summarize(run_dir)
    rows.update(seed_means(rows, args.variants, args.seeds))
    if args.trl_run:
        rows["trl grpo"] = summarize(Path(args.trl_run))
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    header = (f"# GRPO vs GFPO, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
              f"- Machine: {machine()}\n"
              f"- Commit: `{commit}`\n- Trainer flags: `{' '.join(passthrough) or '(defaults)'}`\n\n")
    (out / "compare.md").write_text(header + table(rows) + "\n")
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "compare.png")
    print(header + table(rows))
    print(f"\nwrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")


if __name__ == "__main__":
    main()
