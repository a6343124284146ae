"""Launch helpers shared by the kernel families: the device guard and the vocab tile choice."""
from __future__ import annotations

import contextlib

import torch
import triton

# Vocab tile cap on a GPU: 4096 elements are 16 per thread at 8 warps, which keeps the fp32 tile
# (and the exp/where temporaries of the backward) in registers without spilling; larger tiles
# only lengthen each iteration of a loop that is memory-bound anyway.
MAX_BLOCK_V = 4096
# Under the CPU interpreter every tl op costs ~0.3 ms per program and tile, whatever its width
# (docs/design.md, "The Triton interpreter on a CPU"), so wide tiles make the tests fast; tests lower this to force
# several ragged tiles.
MAX_BLOCK_V_INTERPRETER = 16384


def eager_launch(launcher):
    """Marks a launcher that ``torch.compile`` must not trace: inside a compiled function it runs
    eagerly (a graph break around one large kernel). Then the temperature always reaches the kernel
    as a Python float, i.e. an fp32 run-time argument (Inductor would pass fp64, Liger PR #1366), and
    Dynamo never traces the CPU interpreter's numpy emulation (which it cannot)."""
    return torch.compiler.disable(launcher)


def device_guard(x: torch.Tensor):
    """Launches on ``x``'s GPU even when another device is current (a no-op on the CPU interpreter)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def vocab_tile(V: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row loop over ``V`` vocab entries on ``device``: a pure function.

    CPU tensors run under the interpreter and get its wide tiles; every other device takes the GPU tile,
    ``meta`` included, so ``python -m bench.compile_report`` records the launches a GPU would make.
    """
    cap = MAX_BLOCK_V_INTERPRETER if device.type == "cpu" else MAX_BLOCK_V
    block = min(triton.next_power_of_2(V), cap)
    return block, (8 if block >= 2048 else 4)
