"""What a run reports: metrics JSON lines, the experiment trackers, the progress bar, the completion samples, the
no-signal warning and the PNG plot.

Only the main process writes or prints (``Reporter`` is inert elsewhere), so the loop has no rank checks.
``metrics.jsonl`` has one row per step, and one per eval (``{"step", "eval/...": ...}``); the trackers
(``report_to``, through accelerate) get the same names at the same steps. ``completions.jsonl`` (``log_completions``)
has one row per completion: the metrics file stays numeric and small.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import (
    gather_object,
    is_mlflow_available,
    is_tensorboard_available,
    is_trackio_available,
    is_wandb_available,
)
from tqdm.auto import tqdm

from gfpo_fast.advantages import weighted_rewards

from .config import TRACKERS

ZERO_STD_FRACTION = 0.5  # warn when more than this fraction of groups has identical rewards ...
ZERO_STD_PATIENCE = 5  # ... for this many consecutive steps
PLOT_KEYS = (("reward", "train reward"), ("accuracy", "train accuracy"),
             ("completions/mean_length", "completion length"))
INSTALLED = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "trackio": is_trackio_available,
             "mlflow": is_mlflow_available}  # accelerate's own checks: it silently drops a tracker they fail
COMPLETION_COLUMNS = ("step", "prompt", "completion", "reward", "advantage", "kept")


class StepTimer:
    """Wall-clock seconds per phase of one step: ``with timer("generate"): ...`` (a phase may be timed in parts)."""

    def __init__(self):
        self.start, self.seconds = time.perf_counter(), {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/step"] = time.perf_counter() - self.start
        return out


def peak_memory_gb(device) -> float:
    """Peak memory of this process so far: CUDA ``max_memory_allocated`` on a GPU, else the resident set's
    high-water mark (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def trackers(report_to: list[str]) -> list[str]:
    """The accelerate trackers (``Accelerator(log_with=...)``) of a validated ``report_to``; 'all': every installed one.

    A requested tracker that is not installed is a ``ValueError`` naming its package: accelerate would drop it
    with a debug message only, and the run would report nowhere.
    """
    if report_to == ["all"]:
        found = [name for name in TRACKERS if INSTALLED[name]()]
        if not found:
            raise ValueError(f"report_to='all': none of the trackers {list(TRACKERS)} is installed; "
                             "`pip install tensorboard` (or wandb, trackio, mlflow), or leave report_to unset")
        return found
    missing = [name for name in report_to if not INSTALLED[name]()]
    if missing:
        raise ValueError(f"report_to={report_to}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                         f"installed; `pip install {' '.join(missing)}`, or leave it out of report_to")
    return list(report_to)


class Reporter:
    """The run's outputs: ``metrics.jsonl``, the trackers of ``cfg.report_to`` (started here on the accelerator
    that ``make_accelerator`` built with them), ``completions.jsonl``, the progress bar and the plot.

    A resumed run (``start_step > 0``) drops the rows after the checkpoint's step from both files (they are redone).
    """

    def __init__(self, cfg, accelerator, start_step: int):
        self.dir, self.is_main, self.accelerator = Path(cfg.output_dir), accelerator.is_main_process, accelerator
        self.logging_steps, self.reward_weights = cfg.logging_steps, cfg.reward_weights
        self.log_completions_every = cfg.logging_steps if cfg.log_completions else None
        self.num_completions_to_print = cfg.num_completions_to_print
        self.metrics_path, self.plot_path = self.dir / "metrics.jsonl", self.dir / "metrics.png"
        self.completions_path = self.dir / "completions.jsonl"
        self.zero_std = deque(maxlen=ZERO_STD_PATIENCE)
        self.bar = None
        if not self.is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            self.metrics_path.write_text("")
            self.completions_path.unlink(missing_ok=True)
        for path in (self.metrics_path, self.completions_path):
            if start_step > 0 and path.exists():
                keep = [line for line in path.read_text().splitlines()
                        if line and json.loads(line).get("step", 0) <= start_step]
                path.write_text("".join(line + "\n" for line in keep))
        if accelerator.log_with:
            run_name = cfg.run_name or self.dir.resolve().name
            config = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)  # tensorboard's hparams
                      for k, v in cfg.to_dict().items()}
            accelerator.init_trackers(cfg.project, config=config, init_kwargs={
                "wandb": {"name": run_name}, "trackio": {"name": run_name}, "mlflow": {"run_name": run_name}})
            names = [str(t) for t in accelerator.log_with]
            where = f" (tensorboard --logdir {accelerator.logging_dir})" if "tensorboard" in names else ""
            print(f"reporting to {', '.join(names)}{where}")
        if cfg.log_completions:
            print(f"completions: {self.completions_path}")
        self.bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def print(self, text: str) -> None:
        if self.is_main:
            (tqdm.write if self.bar is not None else print)(text)

    def log_eval(self, tag: str, step: int, result: dict) -> dict:
        """Prints one eval (``eval before: greedy_accuracy 0.250, ...``) and logs it at ``step`` to metrics.jsonl
        and the trackers; returns ``result``."""
        self.print(f"eval {tag}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in result.items()))
        if self.is_main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps({"step": step, **result}) + "\n")
            self.accelerator.log(result, step=step)
        return result

    def log(self, metrics: dict) -> None:
        """Appends one step's metrics (plain floats) to metrics.jsonl and the trackers and refreshes the bar; warns
        when the signal is gone."""
        if not self.is_main:
            return
        step = metrics["step"]
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        self.bar.update(1)
        self.bar.set_postfix({"reward": f"{metrics['reward']:.3f}", "acc": f"{metrics.get('accuracy', math.nan):.2f}",
                              "len": f"{metrics['completions/mean_length']:.1f}",
                              "kept": f"{metrics['completions/kept_fraction']:.2f}", "loss": f"{metrics['loss']:.4f}",
                              "tok/s": f"{metrics['tokens_per_s']:.0f}"}, refresh=False)
        if step % self.logging_steps == 0:
            self.bar.refresh()
        if metrics["frac_reward_missing"] == 1.0:
            self.print(f"warning (step {step}): no reward function scored any completion (every reward None or NaN): "
                       "the step has nothing to learn from")
        self.zero_std.append(metrics["frac_reward_zero_std"])
        if len(self.zero_std) == ZERO_STD_PATIENCE and min(self.zero_std) > ZERO_STD_FRACTION:
            self.print(
                f"warning (step {step}): no learning signal: in each of the last {ZERO_STD_PATIENCE} steps more than "
                f"{ZERO_STD_FRACTION:.0%} of the groups had identical rewards (zero advantage, zero gradient; "
                f"truncated completions: {metrics['completions/clipped_ratio']:.0%}). Make the task easier, or raise "
                "num_generations, temperature or max_completion_length.")
            self.zero_std.clear()

    def log_completions(self, step: int, rows: list[dict], scores, keep: torch.Tensor, advantages: torch.Tensor,
                        reward_names: list[str]) -> None:
        """With ``log_completions``, every ``logging_steps`` steps: every completion of the step (all processes) to
        completions.jsonl and the trackers, and the first ``num_completions_to_print`` (the first group first, so
        kept and dropped rows of one group show side by side) as a table in the terminal.

        ``rows``: this process's dataset rows (one per completion); ``scores``: the step's gathered ``Scores``;
        ``keep`` ``(N,)``: the group filter's rows; ``advantages``: this process's kept rows' advantages (the
        dropped rows have none: they do not train). Called on every process (it gathers the texts).
        """
        if self.log_completions_every is None or step % self.log_completions_every:
            return
        prompts = gather_object([r["prompt"] for r in rows])
        completions = gather_object(list(scores.completions))
        kept_advantages = iter(gather_object(advantages.tolist()))  # host sync; every process's kept rows, in order
        if not self.is_main:
            return
        totals = weighted_rewards(scores.rewards, self.reward_weights).tolist()
        records = [{"step": step, "prompt": p, "completion": c, "reward": finite_or_none(t),
                    "rewards": {n: finite_or_none(v) for n, v in zip(reward_names, r)},
                    "advantage": next(kept_advantages) if k else None, "kept": k}
                   for p, c, t, r, k in zip(prompts, completions, totals, scores.rewards.tolist(), keep.tolist())]
        with self.completions_path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        table = [[step, plain(r["prompt"]), plain(r["completion"]), r["reward"], r["advantage"], r["kept"]]
                 for r in records]
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                tracker.log_table("completions", columns=list(COMPLETION_COLUMNS), data=table, step=step)
            elif tracker.name != "mlflow":  # mlflow logs numbers only
                tracker.log({"completions": markdown_table(table)}, step=step)
        shown = table[:self.num_completions_to_print]
        self.print(f"completions at step {step} ({len(shown)} of {len(table)}; {self.completions_path.name}):\n"
                   + text_table(shown))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finish(self) -> Path | None:
        """The end of the run: closes the trackers and writes the plot; returns its path (None off the main process).

        Each tracker's own ``finish``, not ``accelerator.end_training()``, which would also destroy the process
        group that the caller of ``train()`` may still use.
        """
        if not self.is_main:
            return None
        for tracker in self.accelerator.trackers:
            tracker.finish()
        return self.plot()

    def plot(self) -> Path | None:
        """PNG of train reward, accuracy and completion length per step (with a 5-step running mean)."""
        if not self.is_main:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]
        fig, axes = plt.subplots(1, len(PLOT_KEYS), figsize=(4.2 * len(PLOT_KEYS), 3.4))
        for ax, (key, title) in zip(axes, PLOT_KEYS):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, ".", alpha=0.5)
                smooth = [sum(ys[max(0, i - 4):i + 1]) / len(ys[max(0, i - 4):i + 1]) for i in range(len(ys))]
                ax.plot(xs, smooth, "-")
            ax.set_title(title)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=100)
        plt.close(fig)
        return self.plot_path


# ----------------------------------------------------------------------------- completion tables
def plain(value) -> str:
    """A prompt or completion as one line of text: a message list gives its last message's content."""
    if isinstance(value, list):
        value = value[-1]["content"] if value else ""
    return " ".join(str(value).split())


def cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters (an ellipsis marks the cut): one terminal line per completion."""
    return text if len(text) <= width else text[:width - 1] + "…"


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: a reward function's ``None`` (NaN here) stays ``null`` in completions.jsonl."""
    return None if math.isnan(x) else x


def number(x: float | None, spec: str) -> str:
    """A table cell: ``-`` for no value (a dropped row's advantage, a reward function's ``None``)."""
    return "-" if x is None else format(x, spec)


def markdown_table(table: list[list]) -> str:
    """Completion rows (``COMPLETION_COLUMNS``) as a Markdown table, for the trackers that take text (tensorboard)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(COMPLETION_COLUMNS) + " |", "|" + "---|" * len(COMPLETION_COLUMNS)]
    lines += [f"| {s} | {cell(p)} | {cell(c)} | {number(r, '.3f')} | {number(a, '.3f')} | {k} |"
              for s, p, c, r, a, k in table]
    return "\n".join(lines)


def text_table(table: list[list], prompt_width: int = 32, completion_width: int = 56) -> str:
    """Completion rows as a plain fixed-width table for the terminal, the texts cut to one line each."""
    lines = [f"  {'prompt':<{prompt_width}} | {'completion':<{completion_width}} | reward |    adv | kept"]
    lines += [f"  {cut(p, prompt_width):<{prompt_width}} | {cut(c, completion_width):<{completion_width}} | "
              f"{number(r, '6.3f'):>6} | {number(a, '6.3f'):>6} | {'yes' if k else 'no'}"
              for _, p, c, r, a, k in table]
    return "\n".join(lines)
