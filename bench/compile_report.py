"""Compile every Triton kernel of gfpo-fast for H100/H200, A100 and MI300 without a GPU, and report the cost.

    python -m bench.compile_report            # writes bench/results/compile-report.md (+ .json)
    python -m bench.compile_report --check    # exit 1 on a compile error, a spill or too much shared memory

Each launcher is called on ``meta`` tensors at the shapes that matter (N = 16,384 tokens, V = 151,936 and
49,152, bf16 and fp32, the fused-linear chunk, GFPO groups of 8 and 16), with the GPU launch configuration
(``kernels._launch.launch_on_gpu``). The kernel launch is recorded instead of run, bound by Triton's own
binder (so the signature, constexprs, divisibility hints and options are the ones the JIT would use on a
GPU), and compiled with ``triton.compile(..., target=GPUTarget(...))``: sm_90a and sm_80 cubins (registers
and spills from the wheel's ``ptxas -v``), a gfx942 hsaco (VGPRs, SGPRs and spills from its amdgcn).

Needs the compiled (not interpreted) kernels: run it without ``TRITON_INTERPRET=1``. No GPU, driver or
ROCm is needed. Estimated occupancy: resident warps per SM (CU SIMD for MI300) allowed by the register
count, over the device's maximum; it ignores shared memory, which these kernels barely use.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Before any kernel module is imported: compiled kernels, a fresh cache (a hit would skip the compile).
if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("bench.compile_report compiles the real kernels: run it without TRITON_INTERPRET=1")
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="gfpo-compile-"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from bench._git import short_head  # noqa: E402
from bench.compile_cases import Launch, record_launches  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Device:
    """A compile target and the limits its kernels must fit."""
    name: str
    target: GPUTarget
    shared_limit: int       # bytes of shared memory (LDS) one block may use
    max_warps: int          # resident warps (waves) per SM, or per SIMD on AMD
    regs_per_unit: int      # 32-bit registers per SM (NVIDIA), VGPRs per SIMD lane (AMD)


DEVICES = (
    Device("H100/H200 (sm_90a)", GPUTarget("cuda", 90, 32), 227 * 1024, 64, 65536),
    Device("A100 (sm_80)", GPUTarget("cuda", 80, 32), 163 * 1024, 64, 65536),
    Device("MI300 (gfx942)", GPUTarget("hip", "gfx942", 64), 64 * 1024, 8, 512),
)


def bind(launch: Launch, target: GPUTarget):
    """(signature, constexprs, attrs, options) exactly as Triton's JIT would derive them on ``target``."""
    backend = make_backend(target)
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, launch.kwargs, bound, specialization,
                                                                     options)
    return signature, constexprs, attrs, options


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and stack frame from the wheel's ptxas on ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        gpu = f"sm_{arch}{'a' if arch == 90 else ''}"
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr

    def total(pattern):
        return sum(int(v) for v in re.findall(pattern, log))
    return {"registers": max(int(v) for v in re.findall(r"Used (\d+) registers", log)),
            "spill_bytes": total(r"(\d+) bytes spill stores") + total(r"(\d+) bytes spill loads"),
            "stack_bytes": total(r"(\d+) bytes stack frame")}


def amdgcn_usage(asm: str) -> dict:
    """VGPRs, SGPRs and spill counts from the amdgcn text's metadata."""
    def field(name):
        return max((int(v) for v in re.findall(rf"\.{name}:\s+(\d+)", asm)), default=0)
    return {"registers": field("vgpr_count"), "sgprs": field("sgpr_count"),
            "spill_bytes": 4 * (field("vgpr_spill_count") + field("sgpr_spill_count")), "stack_bytes": 0}


def occupancy(device: Device, registers: int, num_warps: int) -> float:
    """Resident warps allowed by the register count, as a fraction of the device's maximum."""
    if device.target.backend == "hip":  # waves per SIMD: VGPRs per lane / VGPRs per wave, at most 8
        return min(device.max_warps, device.regs_per_unit // max(registers, 1)) / device.max_warps
    per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated in units of 256 registers per warp
    blocks = device.regs_per_unit // (per_warp * num_warps)
    return min(device.max_warps, blocks * num_warps) / device.max_warps


def compile_one(launch: Launch, device: Device) -> dict:
    """Compiles one launch for one device and returns a row of the report."""
    signature, constexprs, attrs, options = bind(launch, device.target)
    src = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    row = {"kernel": launch.kernel.__name__, "case": launch.case, "device": device.name,
           "constexprs": {launch.kernel.arg_names[path[0]]: value for path, value in constexprs.items()},
           "num_warps": options.num_warps, "num_stages": options.num_stages}
    try:
        compiled = triton.compile(src, target=device.target, options=options.__dict__)
    except Exception as err:  # a compile error is a finding, reported in the table and by --check
        return {**row, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    usage = (ptxas_usage(compiled.asm["ptx"], device.target.arch) if device.target.backend == "cuda"
             else amdgcn_usage(compiled.asm["amdgcn"]))
    shared = compiled.metadata.shared
    return {**row, **usage, "shared_bytes": shared, "shared_limit": device.shared_limit,
            "occupancy": occupancy(device, usage["registers"], options.num_warps), "error": None}


def problems(row: dict) -> list[str]:
    """What makes a row fail ``--check``: a compile error, a spill, shared memory over the device's limit."""
    if row["error"]:
        return [f"compile error: {row['error']}"]
    out = []
    if row["spill_bytes"]:
        out.append(f"{row['spill_bytes']} bytes spilled")
    if row["shared_bytes"] > row["shared_limit"]:
        out.append(f"shared memory {row['shared_bytes']} B > {row['shared_limit']} B")
    return out


def compile_all(launches: list[Launch], devices=DEVICES) -> list[dict]:
    """Compiles each distinct specialisation once per device; every case that shares it is listed on its row."""
    rows, seen = [], {}
    for launch in launches:
        for device in devices:
            signature, constexprs, attrs, options = bind(launch, device.target)
            key = (launch.kernel.__name__, device.name, repr(signature), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), options.num_warps, options.num_stages)
            if key in seen:
                seen[key]["case"] += f"; {launch.case}"
                continue
            seen[key] = compile_one(launch, device)
            rows.append(seen[key])
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| kernel | cases | device | constexprs | warps / stages | registers | spills (B) | "
             "shared (B) | est. occupancy | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cx = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['case']} | {r['device']} | {cx} | {r['num_warps']} / "
                         f"{r['num_stages']} | | | | | {r['error']} |")
            continue
        regs = f"{r['registers']}" + (f" (+{r['sgprs']} SGPR)" if "sgprs" in r else "")
        status = "; ".join(problems(r)) or "ok"
        lines.append(f"| {r['kernel']} | {r['case']} | {r['device']} | {cx} | {r['num_warps']} / {r['num_stages']} "
                     f"| {regs} | {r['spill_bytes']} | {r['shared_bytes']} | {r['occupancy']:.0%} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a compile error, spill or shared overflow")
    parser.add_argument("--out", type=Path, default=RESULTS / "compile-report.md", help="the markdown table")
    parser.add_argument("--tiny", action="store_true", help="one shape per kernel (a quick smoke run)")
    args = parser.parse_args(argv)

    launches = record_launches(tiny=args.tiny)
    rows = compile_all(launches)
    commit = short_head()
    header = (f"# Triton kernels compiled without a GPU\n\n`python -m bench.compile_report`, commit `{commit}`, "
              f"{datetime.date.today()}, triton {triton.__version__}, torch {torch.__version__}, on a CPU-only "
              f"machine. One row per distinct specialisation and device; `cases` lists the launches that share it.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, header))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    bad = [(r["kernel"], r["device"], p) for r in rows for p in problems(r)]
    print(f"{len(launches)} launches, {len(rows)} compiles, {len(bad)} problems; table: {args.out}")
    for kernel, device, problem in bad:
        print(f"  {kernel} on {device}: {problem}", file=sys.stderr)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
