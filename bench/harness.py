"""Shared benchmark machinery: cases, implementations, correctness before timing, time, peak memory, environment.

Protocol for one :class:`Case`. Its first implementation is the correctness oracle (the project's torch
reference, role ``"oracle"``); the others are gfpo-fast (role ``"ours"``) or what a user could pick instead
(role ``"peer"``: idiomatic torch, ``torch.compile`` of it, TRL, Liger-Kernel).

1. inputs are made once; implementations must not modify them;
2. every implementation runs once and each of its outputs (values and gradients) is compared with the
   oracle's element by element (:func:`check`): in fp32 ``|a - e| <= 1e-4 |e| + 1e-5 max|e|``; in bf16/fp16 the
   error against the oracle run on fp32 copies of the inputs at most twice the oracle's own error plus
   ``1e-5 max|e|`` (the kernel tests' rule). One that disagrees is reported ``wrong`` and not timed; one that raises
   is ``error``; one that cannot run here is ``skipped`` with the reason; a Triton kernel on the CPU (the
   interpreter, ``TRITON_INTERPRET=1``) is ``checked`` and never timed. This first call is timed on its own
   (``first_call_ms``): for ``torch.compile`` it holds the compile, reported as ``compile_s`` and never part
   of the timing;
3. peak memory added by one call (outputs and gradients included, inputs excluded): on CUDA
   ``max_memory_allocated`` minus ``memory_allocated`` before the call; on the CPU the resident set size,
   see :func:`peak_memory_mib`;
4. time: on CUDA ``triton.testing.do_bench`` (L2 flushed between calls, ~100 ms of repeats); on the CPU
   ``time.perf_counter`` around whole calls, repeated until a time budget is spent (at least 3 repeats), with
   torch's thread count as it is; the correctness call is the warm-up and the memory call the first repeat
   (its probe reads /proc before and after the call, outside the timed span), so that an expensive case
   costs 4 calls per implementation. Median and the 0.2 / 0.8 quantiles are reported;
5. every timed row gets ``vs_peer``: the median of the fastest peer at that shape over its own median, with
   that peer's name in ``fastest_peer`` (the oracle and gfpo-fast are never the baseline).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import gc
import importlib.metadata
import io
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gfpo_fast import backends

from . import verl_files
from ._git import git, short_head

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Per element: fp32 |a - e| <= rtol |e| + atol max|e|; low precision |a - x| <= 2 max|e - x| + atol max|x|, x the
# oracle's result from fp32 copies of the inputs (see check).
TOLERANCE = {"fp32": dict(rtol=1e-4, atol=1e-5), "low": dict(atol=1e-5)}
CPU_BUDGET_S = 2.0  # time budget for the repeats of one implementation on the CPU
CPU_MIN_REPS, CPU_MAX_REPS = 3, 50
SAMPLE_PERIOD_S = 5e-4  # RSS sampling period of the fallback memory probe


# ----------------------------------------------------------------------------- cases and implementations
ROLES = ("oracle", "ours", "peer")


@dataclass
class Impl:
    """One implementation of a case: ``fn(inputs) -> tuple of tensors`` or a reason it cannot run here.

    ``role``: ``"oracle"`` (the reference every other output is checked against), ``"ours"`` (gfpo-fast) or
    ``"peer"`` (what a user could run instead; the fastest one is the baseline of every ratio). ``triton``: a
    Triton kernel (on a CPU it runs only under ``TRITON_INTERPRET=1``, ~1000x slower: the tests run it once).
    """

    name: str
    fn: Callable[[dict], tuple] | None = None
    skip: str | None = None
    role: str = "peer"
    triton: bool = False


def oracle(name: str, fn: Callable[[dict], tuple]) -> Impl:
    """The case's correctness oracle (first in ``Case.impls``), labelled as such in every table."""
    return Impl(f"{name} (oracle)", fn, role="oracle")


@dataclass
class Case:
    """One op at one shape. ``group`` names the table/plot it belongs to, ``x`` its position there (``x_name``).

    ``bytes_floor``: the fewest bytes the op must move (GB/s); ``flops``: its useful FLOPs (TFLOP/s).
    """

    family: str
    group: str
    x_name: str
    x: Any
    shape: dict
    make_inputs: Callable[[], dict]
    impls: list[Impl]
    bytes_floor: int | None = None
    flops: int | None = None
    low_precision: bool = False


def gf_impls(op: str, device: torch.device, make: Callable[[str], Callable[[dict], tuple]]) -> list[Impl]:
    """gfpo-fast's ``backend="auto"``, plus every other fast backend that runs ``op`` here (or why not).

    ``make(backend)`` returns the implementation calling the public op with that backend.
    """
    auto = backends.select(op, "auto", device)
    out = [Impl(f"gfpo-fast auto ({auto})", make("auto"), role="ours")]
    for name in backends.FAST_BACKENDS:
        if name == auto:
            continue
        try:
            backends.select(op, name, device)
        except ValueError as err:
            out.append(Impl(f"gfpo-fast {name}", skip=str(err), role="ours"))
            continue
        out.append(Impl(f"gfpo-fast {name}", make(name), role="ours", triton=name == "triton"))
    return out


def optional(module: str, attr: str):
    """``(object, None)`` from an installed peer library, or ``(None, reason)``; its import chatter is muted. A
    module of verl loads from verl's files where verl's package needs what is not installed (Ray):
    :func:`bench.verl_files.import_module`."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            obj = getattr(verl_files.import_module(module), attr)
    except Exception as err:  # not installed, or broken on this platform
        return None, f"{module}.{attr} unavailable: {type(err).__name__}: {err}"
    return obj, None


def peer_impl(name: str, module: str, attr: str, make: Callable[[Any], Callable[[dict], tuple]],
              needs_triton: bool = False, device: torch.device | None = None) -> Impl:
    """An :class:`Impl` built from a lazily imported peer; ``needs_triton`` peers run only where Triton runs."""
    if needs_triton and not backends.triton_runs_on(device):
        return Impl(name, skip="Triton kernel: needs a CUDA device")
    obj, why = optional(module, attr)
    return Impl(name, skip=why) if obj is None else Impl(name, make(obj), triton=needs_triton)


def compiled_impl(name: str, fn: Callable, wrap: Callable[[Callable], Callable[[dict], tuple]], enabled: bool) -> Impl:
    """``torch.compile(fn)`` run through ``wrap`` (a peer); the compile happens in the correctness call, is reported
    as ``compile_s`` and is never timed."""
    if not enabled:
        return Impl(name, skip="torch.compile disabled (--no-compile)")
    # One compile per shape and mode; dynamo's default of 8 per function would fall back to eager silently.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return Impl(name, wrap(torch.compile(fn, dynamic=False)))


def idiomatic_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """What a torch user writes for per-token log-probs (the "torch eager" peer, and what "torch.compile" compiles):
    ``log_softmax`` of the fp32 logits over the temperature, then ``gather``. Autograd does the backward."""
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def trl_logits_label(device: torch.device) -> str:
    """TRL's ``selective_log_softmax`` row name. On the CPU it runs the torch code of TRL <= 1.14 (``logsumexp``
    per row, ``gather``); TRL 1.16 sends CUDA tensors to its Triton kernel (``trl.kernels.logprob_entropy``)."""
    if device.type == "cuda":
        return "TRL selective_log_softmax (its Triton kernel on CUDA)"
    return "TRL <= 1.14 selective_log_softmax"


def trl_fused_lm_head():
    """``(logprobs(hidden [N, H], weight [V, H], ids [N]) -> [N], None)`` through TRL's fused LM head
    (``trl.kernels.chunked_logprob.ChunkedLogProbFunction``, TRL >= 1.15) exactly as its GRPOTrainer calls it
    (vocab chunk ``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE``, no bias, softcap or scale), asking for the
    log-probs only, or ``(None, reason)``. GRPOTrainer asks for the entropy too on the policy (a metric)."""
    fn, why = optional("trl.kernels.chunked_logprob", "ChunkedLogProbFunction")
    if fn is None:
        return None, why
    chunk, _ = optional("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE")
    chunk = chunk or 32768  # TRL 1.16's value

    def logprobs(hidden, weight, token_ids, temperature=1.0):
        return fn.apply(hidden, weight, None, token_ids, temperature, chunk, None, 1.0, ("log_probs",))[0]

    return logprobs, None


def grads(out: torch.Tensor, wrt, grad_out: torch.Tensor | None = None) -> tuple:
    """``(out, *d(out)/d(wrt))`` without touching ``.grad`` (so repeats do not accumulate)."""
    wrt = tuple(wrt)
    return (out.detach(), *torch.autograd.grad(out, wrt, grad_out))


# ----------------------------------------------------------------------------- correctness
def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - e| / max|e|`` (NaN or shape mismatch -> inf)."""
    if tuple(actual.shape) != tuple(expected.shape):
        return float("inf")
    err = _abs_diff(actual, expected).max().item() / max(_largest(expected), 1e-30) if expected.numel() else 0.0
    return err if err == err else float("inf")


def check(out: tuple, ref: tuple, exact: tuple | None = None) -> tuple[bool, float]:
    """(agrees, worst normalised error ``max|a - e| / max|e|``) of an implementation's outputs ``out`` against the
    oracle's ``ref``, element by element, with the rules of the project's tests:

    * fp32 (``exact`` None): ``|a - e| <= rtol |e| + atol max|e|`` (``torch.isclose``'s rule; ``atol`` in units of
      the output's largest entry, since the cases' outputs range from losses of order 1 to gradients of 1e-5);
    * low precision (``exact``: the oracle's outputs from fp32 copies of the inputs, :func:`exact_outputs`): the
      implementation's error against ``exact`` is at most twice the oracle's own low-precision error (its worst
      entry) plus ``atol`` (flash-attention's rule, the kernel tests' ``assert_close_3way``).

    Differences are taken in fp32 with one temporary of an output's size at a time (the GPU cases' logit gradients
    are 10 GB in fp32).
    """
    if len(out) != len(ref) or (exact is not None and len(exact) != len(ref)):
        return False, float("inf")
    worst, ok = 0.0, True
    for i, (a, e) in enumerate(zip(out, ref)):
        err = max_error(a, e)
        worst = max(worst, err)
        if err == float("inf"):
            ok = False
        elif exact is None:
            tol = TOLERANCE["fp32"]
            bound = e.detach().float().abs().mul_(tol["rtol"]).add_(tol["atol"] * _largest(e))
            ok &= bool((_abs_diff(a, e) <= bound).all())
        else:
            bound = 2 * _largest(_abs_diff(e, exact[i])) + TOLERANCE["low"]["atol"] * _largest(exact[i])
            ok &= bool((_abs_diff(a, exact[i]) <= bound).all())
    return ok, worst


def _abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.detach().float().sub(b.detach().float()).abs_()


def _largest(t: torch.Tensor) -> float:
    t = t.detach() if t.is_floating_point() else t.detach().float()  # bool and integer outputs too (masks, ranks)
    return t.abs().max().item() if t.numel() else 0.0


def exact_outputs(case: Case, inputs: dict) -> tuple | None:
    """The oracle's outputs on fp32 copies of a low-precision case's inputs (gradients kept where asked), else None."""
    if not (case.low_precision or any(v.dtype in LOW_PRECISION for v in inputs.values() if torch.is_tensor(v))):
        return None

    def fp32(v):
        if not torch.is_tensor(v) or v.dtype not in LOW_PRECISION:
            return v
        return v.detach().float().requires_grad_(v.requires_grad)

    return case.impls[0].fn({k: fp32(v) for k, v in inputs.items()})


# ----------------------------------------------------------------------------- time and memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, budget_s: float = CPU_BUDGET_S,
            first_ms: float | None = None) -> dict:
    """Median and 0.2 / 0.8 quantiles of one call, in ms (see the module docstring). ``first_ms``: on the CPU, a
    call already timed after a warm-up (the first repeat; no warm-up call then)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "reps": None}
    if first_ms is None:
        fn()
    times = [] if first_ms is None else [first_ms]
    end = time.perf_counter() + budget_s
    while len(times) < CPU_MAX_REPS and (len(times) < CPU_MIN_REPS or time.perf_counter() < end):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return {"median_ms": q[0].item(), "p20_ms": q[1].item(), "p80_ms": q[2].item(), "reps": len(times)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    """Resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Returns freed heap memory to the OS (glibc), so that the baseline RSS holds no reusable free blocks."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _RssSampler(threading.Thread):
    """Reads /proc/self/statm every SAMPLE_PERIOD_S and keeps the maximum (the fallback CPU probe)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _rss_bytes()
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(SAMPLE_PERIOD_S)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, _rss_bytes())


def cpu_memory_method() -> str:
    """How :func:`peak_memory_mib` measures on this CPU machine (recorded with the results)."""
    if _reset_hwm():
        return "peak RSS: VmHWM of /proc/self/status after resetting it via /proc/self/clear_refs (exact, per page)"
    return f"peak RSS: a thread sampling /proc/self/statm every {SAMPLE_PERIOD_S * 1e3:g} ms (misses shorter peaks)"


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Memory one call adds at its peak, in MiB, its outputs included (see :func:`peak_memory_and_time`)."""
    return peak_memory_and_time(fn, device)[0]


def peak_memory_and_time(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Memory one call adds at its peak, in MiB, its outputs included, and the call's wall time in ms.

    CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before (tensors of the caching allocator).
    CPU: the process's resident set size minus its value before the call, after ``malloc_trim(0)``.
    The peak is the kernel's exact high-water mark (VmHWM, reset through /proc/self/clear_refs) where that
    can be reset, else a thread sampling /proc/self/statm (see :func:`cpu_memory_method`). RSS counts
    touched pages only, and heap blocks below glibc's mmap threshold (<= 32 MiB) that the process kept
    from earlier calls are reused without showing: small temporaries can be under-counted, [N, V]-sized
    ones cannot.
    """
    gc.collect()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak / 2**20, elapsed * 1e3
    _trim_heap()
    if _reset_hwm():
        base = _rss_bytes()
        t0 = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t0
        peak = _hwm_bytes() - base
    else:
        sampler = _RssSampler()
        base = sampler.peak
        sampler.start()
        t0 = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t0
        peak = sampler.stop() - base
    del out
    return max(peak, 0) / 2**20, elapsed * 1e3


# ----------------------------------------------------------------------------- running
def run_case(case: Case, device: torch.device, *, budget_s: float = CPU_BUDGET_S, log=print) -> list[dict]:
    """Checks, measures and times every implementation of ``case``; one result dict per implementation."""
    results = _run_impls(case, case.make_inputs(), device, budget_s, log)  # the inputs are freed on return
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next case starts from an empty caching allocator
    rank_against_peers(results)
    return results


def rank_against_peers(results: list[dict]) -> None:
    """``vs_peer`` (fastest peer's median / the row's) and ``fastest_peer`` on every timed row of one case;
    ``speedup_vs_ref`` (the oracle's median / the row's) stays in the JSON only, never in a table."""
    timed = [r for r in results if r.get("median_ms")]
    peers = [r for r in timed if r["role"] == "peer"]
    best = min(peers, key=lambda r: r["median_ms"], default=None)
    oracle_ms = next((r["median_ms"] for r in timed if r["role"] == "oracle"), None)
    for row in timed:
        if best:
            row["fastest_peer"], row["vs_peer"] = best["impl"], best["median_ms"] / row["median_ms"]
        if oracle_ms:
            row["speedup_vs_ref"] = oracle_ms / row["median_ms"]


def _run_impls(case: Case, inputs: dict, device: torch.device, budget_s: float, log) -> list[dict]:
    ref_impl, results, ref_out, exact = case.impls[0], [], None, None
    for impl in case.impls:
        row = {"family": case.family, "group": case.group, "x_name": case.x_name, "x": case.x, "shape": case.shape,
               "impl": impl.name, "role": impl.role, "reference": ref_impl.name}
        results.append(row)
        if impl.skip or (ref_out is None and impl is not ref_impl):
            row.update(status="skipped", detail=impl.skip or "the oracle did not run, nothing to check against")
            continue
        try:
            _sync(device)
            t0 = time.perf_counter()
            out = impl.fn(inputs)
            _sync(device)
            row["first_call_ms"] = (time.perf_counter() - t0) * 1e3
        except Exception as err:  # a broken implementation is a result, not a crash of the run
            row.update(status="error", detail=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            log(f"  {impl.name:<44} error: {row['detail']}")
            continue
        ok, err = (True, 0.0) if ref_out is None else check(out, ref_out, exact)
        if ref_out is None:
            ref_out, exact = out, exact_outputs(case, inputs)
        del out
        row["max_error"] = err
        if not ok:
            row.update(status="wrong", detail=f"disagrees with the oracle (normalised max error {err:.3g})")
            log(f"  {impl.name:<44} WRONG ({row['detail']})")
            continue
        if impl.triton and device.type == "cpu":  # the Triton interpreter: its times would mean nothing
            row.update(status="checked", detail=f"agrees with the oracle ({err:.2g}); Triton interpreter, not timed")
            log(f"  {impl.name:<44} {row['detail']}")
            continue
        call = functools.partial(impl.fn, inputs)
        peak, ms = peak_memory_and_time(call, device)  # on the CPU also the first repeat of the timing
        row.update(status="ok", **time_ms(call, device, budget_s, first_ms=ms if device.type == "cpu" else None),
                   peak_mib=peak)
        if impl.name.startswith("torch.compile"):
            row["compile_s"] = max(row["first_call_ms"] - row["median_ms"], 0.0) / 1e3
        if case.bytes_floor:
            row["gb_per_s"] = case.bytes_floor / row["median_ms"] / 1e6
        if case.flops:
            row["tflop_per_s"] = case.flops / row["median_ms"] / 1e9
        compiled = f"  (compile {row['compile_s']:.1f} s, not timed)" if "compile_s" in row else ""
        log(f"  {impl.name:<44} {row['median_ms']:10.3f} ms  [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}]  "
            f"peak +{row['peak_mib']:.0f} MiB{compiled}")
    return results


# ----------------------------------------------------------------------------- the machine
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} logical CPUs"


def environment(device: torch.device) -> dict:
    """Device, commit, library versions and date of a run."""
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "gfpo_fast", "kernels", "csrc", "bench")
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "device_type": device.type,
        "commit": short_head(length=12) + (" (with uncommitted changes)" if dirty else ""),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "versions": {d: _version(d) for d in ("gfpo-fast", "torch", "triton", "trl", "liger-kernel", "transformers")},
        "memory_method": cpu_memory_method() if device.type == "cpu" else "torch.cuda.max_memory_allocated delta",
    }
    if device.type == "cuda":
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def measured_bandwidth_gbs(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy rate of one ``nbytes`` buffer (read + write counted), GB/s, median of repeats."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, budget_s=1.0)["median_ms"]
    return 2 * nbytes / t / 1e6


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Rate of one ``n x n @ n x n`` matmul in ``dtype``, TFLOP/s, median of repeats."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_ms(lambda: a @ b, device, budget_s=1.0)["median_ms"]
    return 2 * n**3 / t / 1e9
