"""The kernel launches that :mod:`bench.compile_report` compiles: each launcher called on ``meta`` tensors.

Shapes that matter on a GPU: N = 16,384 tokens at V = 151,936 (Qwen) and 49,152 (SmolLM2), bf16 and fp32
logits, with and without entropy and the active-row mask; the fused-linear chunk (its launches are the same
kernels at N = chunk, also soft-capped); GFPO groups of G = 8 and 16. ``meta`` tensors carry shapes, strides
and dtypes but no data, so a launcher that read a value on the host would fail here (the launchers never
synchronise).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pkgutil

import torch

from gfpo_fast import kernels as kernel_package
from gfpo_fast.kernels import advantages as adv_kernels
from gfpo_fast.kernels import logprobs as lp_kernels

META = torch.device("meta")
FUSED_LINEAR_CHUNK = 1024  # gfpo_fast.fused_linear.DEFAULT_CHUNK_SIZE: the N of the fused-linear chunk launches


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the kernel, its case label, and the arguments it was called with."""
    kernel: object
    case: str
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recording(kernels, case: str, into: list):
    """Within the block, launching any of ``kernels`` appends a :class:`Launch` instead of running it."""
    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            into.append(Launch(kernel, case, args, kwargs))
        return run
    for k in kernels:
        k.run = recorder(k)
    try:
        yield
    finally:
        for k in kernels:
            del k.run  # the class's run again


def shipped_kernels() -> list:
    """Every ``@triton.jit`` kernel named ``_*_kernel`` in any module of ``gfpo_fast.kernels`` (helpers such as
    ``_nan_mean_std`` are inlined into them)."""
    modules = [importlib.import_module(f"{kernel_package.__name__}.{m.name}")
               for m in pkgutil.iter_modules(kernel_package.__path__)]
    return [obj for module in modules for name, obj in vars(module).items()
            if name.startswith("_") and name.endswith("_kernel") and hasattr(obj, "params")]


def _logprob_cases(tiny: bool):
    Ns = [(64, 1000)] if tiny else [(16384, 151936), (16384, 49152), (FUSED_LINEAR_CHUNK, 151936)]
    dtypes = [torch.bfloat16] if tiny else [torch.bfloat16, torch.float32]
    for (N, V) in Ns:
        for dtype in dtypes:
            yield N, V, dtype


def record_launches(tiny: bool = False) -> list:
    """Every launch of every shipped Triton kernel at the shapes above, recorded on the GPU code path (``meta``
    tensors take the GPU tile). Raises if a shipped kernel was never launched: a new kernel adds its cases here."""
    launches: list[Launch] = []
    kernels = shipped_kernels()
    for N, V, dtype in _logprob_cases(tiny):
        name = str(dtype).removeprefix("torch.")
        logits = torch.empty(N, V, dtype=dtype, device=META)
        ids = torch.empty(N, dtype=torch.int64, device=META)
        # Soft-capped logits (Gemma's final_logit_softcapping) come only through the fused-linear chunk.
        for softcap in (None, 30.0) if tiny or N == FUSED_LINEAR_CHUNK else (None,):
            cap = "" if softcap is None else " softcap"
            for entropy in (False, True):
                for active in (None, torch.empty(N, dtype=torch.bool, device=META)):
                    case = (f"N={N} V={V} {name}" + (" entropy" if entropy else "")
                            + (" active" if active is not None else "") + cap)
                    with recording(kernels, f"fwd {case}", launches):
                        lp_kernels.token_logprobs_forward(logits, ids, 1.0, entropy, active, softcap=softcap)
            lse = torch.empty(N, dtype=torch.float32, device=META)
            for dentropy in (None, lse):
                case = f"bwd N={N} V={V} {name}" + (" dentropy" if dentropy is not None else "") + cap
                with recording(kernels, case, launches):
                    lp_kernels.token_logprobs_backward(logits, ids, lse, lse, 1.0, entropy=dentropy,
                                                       dentropy=dentropy, softcap=softcap)
    for G in ((8,) if tiny else (8, 16)):
        rewards = torch.empty(64 * G, dtype=torch.float32, device=META)
        for F in (1, 3):
            with recording(kernels, f"group advantages G={G} F={F}", launches):
                adv_kernels.group_advantages_forward(rewards.view(-1, 1).expand(-1, F).contiguous(),
                                                     torch.empty(F, device=META), G, scale="group",
                                                     normalize_then_sum=False)
        with recording(kernels, f"gfpo filter G={G} k={G // 2}", launches):
            adv_kernels.gfpo_filter_forward(rewards, rewards, G, G // 2, scale="group")
    missing = {k.__name__ for k in kernels} - {launch.kernel.__name__ for launch in launches}
    if missing:
        raise RuntimeError(f"kernels with no compile case in bench/compile_cases.py: {sorted(missing)}")
    return launches
