"""``python -m bench``: every op family against its peers on this machine; writes bench/results/<device>-<date>.*

Sizes itself to the device: ``cpu`` shapes fit a 2-core, 24 GiB machine in about 15 minutes; ``gpu`` shapes go
up to N = 16,384 tokens and V = 151,936 (bf16). ``--size test`` is a short smoke run. Every table puts gfpo-fast
next to the peers a user could pick (idiomatic torch, torch.compile, TRL, Liger-Kernel), each checked against the
project's reference (the oracle) before it is timed; ratios are against the fastest peer of each shape.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings

import torch

from . import bench_advantages, bench_fused_linear, bench_fused_policy_loss, bench_logprobs, harness, report

FAMILIES = {
    "logprobs": bench_logprobs,
    "fused_policy_loss": bench_fused_policy_loss,
    "fused_linear": bench_fused_linear,
    "advantages": bench_advantages,
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", choices=["auto", "test", "cpu", "gpu"], default="auto",
                   help="shape profile (auto: gpu on CUDA, cpu otherwise)")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="include the torch.compile peers (default on, on the CPU too: 2-20 s of compiling per shape, "
                        "reported apart and never timed)")
    p.add_argument("--budget", type=float, default=harness.CPU_BUDGET_S,
                   help="CPU seconds of repeats per implementation and shape (at least 3 repeats)")
    p.add_argument("--out", default=RESULTS, help="output folder")
    return p.parse_args(argv)


def measure_device(device: torch.device) -> dict:
    """The denominators of the '% of measured' columns: copy bandwidth and matmul rate, measured now."""
    cuda = device.type == "cuda"
    buffer_mib, n, dtype = (4096, 8192, torch.bfloat16) if cuda else (256, 2048, torch.float32)
    return {
        "bandwidth_gb_s": harness.measured_bandwidth_gbs(device, buffer_mib * 2**20),
        "bandwidth_buffer_mib": buffer_mib,
        "matmul_tflop_s": harness.measured_matmul_tflops(device, dtype, n),
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_n": n,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    size = args.size if args.size != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    compile = args.compile
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; choose from {list(FAMILIES)}")
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="gfpo_fast")  # "using the reference" notes
    env = harness.environment(device)
    load_start, t_start = os.getloadavg()[0], time.perf_counter()
    print(f"{env['device']} | commit {env['commit']} | size {size} | compile {compile}", flush=True)
    measured = measure_device(device)
    print(f"copy bandwidth {measured['bandwidth_gb_s']:.1f} GB/s, {measured['matmul_dtype']} matmul "
          f"{measured['matmul_tflop_s']:.3g} TFLOP/s", flush=True)
    results, empty = [], []
    for name in families:
        cases = FAMILIES[name].cases(device, size, compile)
        if not cases:
            empty.append(f"{name} (no such op in gfpo_fast at run time)")
        for case in cases:
            print(f"[{name}] {case.group} | {case.x_name}={case.x}", flush=True)
            results += harness.run_case(case, device, budget_s=args.budget, log=lambda s: print(s, flush=True))
    run = {
        "command": " ".join(["python -m bench", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "size": size, "compile": compile, "env": env, "measured": measured,
        "load": [load_start, os.getloadavg()[0]], "results": results, "empty_families": empty,
        "elapsed_s": time.perf_counter() - t_start,
    }
    run["targets"] = report.targets(results, env, measured)
    os.makedirs(args.out, exist_ok=True)
    base = report.write(run, args.out)
    print("\n" + report.targets_markdown(run["targets"]), flush=True)
    print(f"wrote {base}.md, .json, .png ({run['elapsed_s'] / 60:.1f} min) from `{run['command']}` at {env['commit']}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
