"""Tolerance checks and the Triton kernel-cache probes shared by the backend contract tests."""
import inspect

import pytest
import torch

# The interpreter runs tl ops as numpy ops, which warn on the NaN / inf that the kernels produce on
# purpose (masked lanes, 0/0 = NaN for an empty group's mean).
INTERPRETER_NUMPY_WARNINGS = pytest.mark.filterwarnings(
    "ignore:(invalid value|overflow|divide by zero|All-NaN slice) encountered")


def assert_close(actual, expected, *, atol, rtol=0.0, name="value"):
    """``torch.testing.assert_close`` that also names the worst entries (indices and both values)."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        pairs = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} mismatched (atol={atol}, rtol={rtol}); "
                             f"first (index, actual, expected): {pairs}")


def assert_close_3way(actual, exact, low_precision, *, atol, name="value"):
    """Low-precision rule (flash-attention style): the kernel's error against the fp32 result ``exact``
    is at most twice plain torch's error in the same low dtype (``low_precision``), plus ``atol``.

    Under the CPU interpreter each element may be off by one more low-precision ulp: the interpreter
    emulates an fp32 -> bf16 cast by truncating the mantissa (even with ``fp_downcast_rounding="rtne"``;
    triton 3.9), where the compiled kernel and torch round to nearest.
    """
    exact = exact.detach().float()
    err = (actual.detach().float() - exact).abs()
    torch_err = (low_precision.detach().float() - exact).abs().max().item()
    bound = 2 * torch_err + atol
    if not actual.is_cuda:
        bound = bound + torch.finfo(actual.dtype).eps * exact.abs()
    bad = err > bound
    assert not bad.any(), (f"{name}: kernel error {err.max().item():.3g} vs torch low-precision error "
                           f"{torch_err:.3g} at {int(bad.sum())} of {bad.numel()} entries")


class KernelRecorder:
    """Stands in for a ``@triton.jit`` kernel, records each launch's arguments by name, then launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = inspect.signature(kernel.fn).parameters
        self.names = list(params)
        self.constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({**dict(zip(self.names, args)), **kwargs})
            return self.kernel[grid](*args, **kwargs)

        return launch

    def not_specialized(self):
        """Argument names excluded from Triton's integer specialisation (interpreter or JIT kernel)."""
        kernel = self.kernel
        if hasattr(kernel, "params"):
            return {p.name for p in kernel.params if p.do_not_specialize}
        return {n if isinstance(n, str) else self.names[n] for n in kernel.kwargs.get("do_not_specialize", ())}

    def specialization_keys(self):
        """Per launch, what Triton keys a compiled variant on for the specialised integers:
        ``== 1`` and ``% 16 == 0`` (plus the constexpr values)."""
        skip = self.not_specialized()
        keys = set()
        for args in self.launches:
            key = []
            for name, v in args.items():
                if name in self.constexprs or isinstance(v, bool):
                    key.append((name, v))
                elif isinstance(v, int) and name not in skip:
                    key.append((name, v == 1, v % 16 == 0))
            keys.add(tuple(key))
        return keys


def compiled_variants(kernel) -> int:
    """Number of compiled variants in a JIT kernel's cache (GPU only)."""
    return sum(len(cache[0]) for cache in kernel.device_caches.values())
