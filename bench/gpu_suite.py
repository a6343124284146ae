"""The one-shot GPU suite: everything a lent GPU should prove, in one call of at most 9 minutes.

    python -m bench.gpu_suite              # on a machine with one CUDA GPU
    python -m bench.gpu_suite --dry        # the same parts at tiny shapes on the CPU (CI runs this)

Parts, in order, each in its own process with its own time limit; each writes its log and the suite's
``summary.md`` / ``summary.json`` under ``bench/results/gpu-suite-<device>-<date>/`` as soon as it ends, so a run
cut short still leaves what it finished:

1. ``gpu_tests``: the ``gpu``-marked tests (realistic shapes);
2. ``kernel_bench``: ``python -m bench`` for log-probs, the fused loss and advantages at N = 16,384, V = 151,936,
   bf16, against every peer the harness knows (torch eager, torch.compile, TRL, Liger-Kernel);
3. ``fused_linear_bench``: the fused-linear family against the same peers;
4. ``long_sequence``: one sequence of 65,536 tokens through the log-prob and the fused loss kernels, then one
   of another length: it must run (no grid limit) and compile nothing the second time;
5. ``train``: 10 steps of the default trainer on the GPU, then ``train_liger``: the same 10 steps with
   ``--use_liger_kernel true`` (Liger's RMSNorm, RoPE and SwiGLU; skipped without liger-kernel and on the CPU, where
   the flag is refused): their ``time/step`` in ``metrics.jsonl`` side by side;
6. ``vllm``: 3 steps with ``--generation_backend vllm`` where vLLM is installed (skipped otherwise);
7. ``train_scale``: one training step of G = 8 completions of 4,096 and of 16,384 tokens on a Qwen2 of vocabulary
   151,936 (hidden 1,024, 4 layers), bf16: this trainer with and without gradient checkpointing, TRL's
   GRPOTrainer on the same batch, and the trainer at 72a2052 (full logits) where git can make that worktree
   (``python -m bench.bench_trainer_scale``; peak CUDA memory and step time).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PY = sys.executable


def parts(out: Path, dry: bool) -> list[tuple[str, list[str], float]]:  # GPU limits add up to 540 s
    """(name, command, time limit in s) of each part. ``dry`` shrinks every shape for the CPU, where the limits are
    4x as long: a dry run proves that each part runs, not how fast (the 2-core CPU may also be busy)."""
    bench = [PY, "-m", "bench", "--out", str(out / "bench")]
    bench += ["--device", "cpu", "--size", "test", "--budget", "0"] if dry else ["--device", "cuda", "--size", "gpu"]
    train = [PY, "-m", "gfpo_fast.train", "--do_eval", "false"]
    if dry:
        train += ["--num_generations", "4", "--num_remains_in_group", "2", "--max_completion_length", "8"]
    else:
        train += ["--bf16", "true"]
    scale = [PY, "-m", "bench.bench_trainer_scale", "--logits_tree", "auto", "--out", str(out / "train_scale")]
    if dry:
        scale += ["--configs", "2x16", "--vocab", "1000", "--hidden", "32", "--layers", "1", "--prompt", "4",
                  "--contenders", "head,trl,logits", "--max_gb", "4"]
    else:
        scale += ["--device", "cuda", "--configs", "8x4096,8x16384", "--hidden", "1024", "--layers", "4",
                  "--contenders", "head,head_ckpt,trl,trl_ckpt,logits"]
    slack = 4 if dry else 1
    return [(name, command, slack * limit) for name, command, limit in [
        ("gpu_tests", [PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], 60),
        ("kernel_bench", [*bench, "--families", "logprobs,fused_policy_loss,advantages"], 120),
        ("fused_linear_bench", [*bench, "--families", "fused_linear"], 120),
        ("long_sequence", [PY, "-m", "bench.gpu_suite", "--long-sequence", "--dry" if dry else "--no-dry"], 45),
        ("train", [*train, "--max_steps", "1" if dry else "10", "--output_dir", str(out / "train")], 45),
        ("train_liger", [*train, "--max_steps", "1" if dry else "10", "--use_liger_kernel", "true",
                         "--output_dir", str(out / "train_liger")], 45),
        ("vllm", [*train, "--max_steps", "1" if dry else "3", "--generation_backend", "vllm",
                  "--output_dir", str(out / "vllm")], 45),
        ("train_scale", scale, 60),
    ]]


def long_sequence(dry: bool) -> None:
    """One sequence of L tokens through ``token_logprobs`` and ``fused_policy_loss`` (forward and backward) on the
    Triton backend, then one of another length. Prints the compile count of each; the second must be 0."""
    import torch

    import gfpo_fast as gf
    from gfpo_fast import kernels

    device = "cpu" if dry else "cuda"
    lengths, V, dtype = ((300, 317), 1000, torch.float32) if dry else ((65536, 65519), 151936, torch.bfloat16)

    def compiled() -> int:  # compiled variants held by every JIT kernel of the package (0 under the interpreter)
        count = 0
        for module in vars(kernels).values():
            for obj in vars(module).values() if hasattr(module, "__dict__") else ():
                for caches in getattr(obj, "device_caches", {}).values():
                    count += len(caches[0])
        return count

    for i, L in enumerate(lengths):
        before = compiled()
        logits = torch.randn(1, L, V, device=device, dtype=dtype, requires_grad=True)
        ids = torch.randint(0, V, (1, L), device=device)
        start = time.perf_counter()
        logp = gf.token_logprobs(logits, ids, backend="triton")
        logp.sum().backward()
        loss, _ = gf.fused_policy_loss(logits, ids, None, torch.ones(1, device=device), torch.ones(1, L, device=device),
                                       backend="triton")
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        new = compiled() - before
        print(f"L={L} V={V} {str(dtype).removeprefix('torch.')}: {time.perf_counter() - start:.2f} s, "
              f"finite={bool(torch.isfinite(logits.grad).all())}, new compilations={new}", flush=True)
        if not torch.isfinite(logits.grad).all():
            raise SystemExit("non-finite gradient")
        if i > 0 and new:
            raise SystemExit(f"a new length recompiled {new} kernel(s)")


def device_slug(dry: bool) -> str:
    if dry:
        return "dry"
    import torch
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def write_summary(out: Path, rows: list[dict], header: str) -> None:
    lines = [header, "", "| part | status | seconds | limit | last line |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['status']} | {r['seconds']:.1f} | {r['limit']} | {r['last_line']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))


def run_suite(out: Path, dry: bool) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    header = (f"# GPU suite ({'dry run on the CPU' if dry else device_slug(dry)})\n\n`python -m bench.gpu_suite"
              f"{' --dry' if dry else ''}`, commit `{commit}`, {datetime.datetime.now():%Y-%m-%d %H:%M}.")
    env = dict(os.environ)
    if dry:
        env["TRITON_INTERPRET"] = "1"  # the Triton parts run on the CPU interpreter
    skip = {"vllm": "vllm is not installed" if importlib.util.find_spec("vllm") is None else None,
            "train_liger": "liger-kernel runs on CUDA only" if dry else
            "liger-kernel is not installed" if importlib.util.find_spec("liger_kernel") is None else None}
    rows = []
    for name, command, limit in parts(out, dry):
        if skip.get(name):
            rows.append({"part": name, "status": "skipped", "seconds": 0.0, "limit": limit, "last_line": skip[name]})
            write_summary(out, rows, header)
            continue
        print(f"[gpu_suite] {name}: {' '.join(command)} (limit {limit} s)", flush=True)
        start = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=limit).returncode
                status = "passed" if code == 0 else ("no tests" if name == "gpu_tests" and code == 5 else
                                                     f"failed (exit {code})")
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit} s"
        text = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()
        last = (text[-1] if text else "").replace("|", "/")[:160]
        rows.append({"part": name, "status": status, "seconds": time.perf_counter() - start, "limit": limit,
                     "last_line": last})
        write_summary(out, rows, header)
        print(f"[gpu_suite] {name}: {status} in {rows[-1]['seconds']:.1f} s", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.splitlines()[0])
    p.add_argument("--dry", action=argparse.BooleanOptionalAction, default=False,
                   help="tiny shapes on the CPU (Triton through its interpreter)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/gpu-suite-...)")
    p.add_argument("--long-sequence", action="store_true", help=argparse.SUPPRESS)  # part 4, in its own process
    args = p.parse_args(argv)
    if args.long_sequence:
        long_sequence(args.dry)
        return 0
    if not args.dry:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("python -m bench.gpu_suite needs a CUDA GPU; use --dry for the CPU smoke run")
    out = args.out or RESULTS / f"gpu-suite-{device_slug(args.dry)}-{datetime.date.today()}"
    rows = run_suite(out, args.dry)
    failed = [r["part"] for r in rows if r["status"] not in ("passed", "skipped", "no tests")]
    print(f"[gpu_suite] {len(rows) - len(failed)}/{len(rows)} parts passed or skipped; summary: {out / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
