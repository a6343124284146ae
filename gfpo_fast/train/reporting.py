"""What a run reports: metrics JSON lines, the progress bar, the no-signal warning and the PNG plot.

Only the main process writes or prints (``Reporter`` is inert elsewhere), so the loop has no rank checks.
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
from tqdm.auto import tqdm

ZERO_STD_FRACTION = 0.5  # warn when more than this fraction of groups has identical rewards ...
ZERO_STD_PATIENCE = 5  # ... for this many consecutive steps
PLOT_KEYS = (("reward", "train reward"), ("accuracy", "train accuracy"),
             ("completions/mean_length", "completion length"))


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


class Reporter:
    def __init__(self, output_dir: str, is_main: bool, start_step: int, max_steps: int, logging_steps: int):
        self.dir, self.is_main, self.logging_steps = Path(output_dir), is_main, logging_steps
        self.metrics_path, self.plot_path = self.dir / "metrics.jsonl", self.dir / "metrics.png"
        self.zero_std = deque(maxlen=ZERO_STD_PATIENCE)
        self.bar = None
        if not is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            self.metrics_path.write_text("")
        elif self.metrics_path.exists():  # resumed: forget steps after the checkpoint (they will be redone)
            keep = [line for line in self.metrics_path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= start_step]
            self.metrics_path.write_text("".join(line + "\n" for line in keep))
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def print(self, text: str) -> None:
        if self.is_main:
            (tqdm.write if self.bar is not None else print)(text)

    def print_eval(self, tag: str, result: dict) -> dict:
        """Prints one eval (``eval before: greedy_accuracy 0.250, ...``); returns ``result``."""
        self.print(f"eval {tag}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in result.items()))
        return result

    def log(self, metrics: dict) -> None:
        """Appends one step's metrics (plain floats) and refreshes the bar; warns when the signal is gone."""
        if not self.is_main:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.bar.update(1)
        self.bar.set_postfix({"reward": f"{metrics['reward']:.3f}", "acc": f"{metrics.get('accuracy', math.nan):.2f}",
                              "len": f"{metrics['completions/mean_length']:.1f}", "loss": f"{metrics['loss']:.4f}",
                              "tok/s": f"{metrics['tokens_per_s']:.0f}"}, refresh=False)
        step = metrics["step"]
        if step % self.logging_steps == 0:
            self.bar.refresh()
        self.zero_std.append(metrics["frac_reward_zero_std"])
        if len(self.zero_std) == ZERO_STD_PATIENCE and min(self.zero_std) > ZERO_STD_FRACTION:
            self.print(
                f"warning (step {step}): no learning signal: in each of the last {ZERO_STD_PATIENCE} steps more than "
                f"{ZERO_STD_FRACTION:.0%} of the groups had identical rewards (zero advantage, zero gradient; "
                f"truncated completions: {metrics['completions/clipped_ratio']:.0%}). Make the task easier, or raise "
                "num_generations, temperature or max_completion_length.")
            self.zero_std.clear()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

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
