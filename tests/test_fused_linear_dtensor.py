"""An FSDP2-sharded lm_head (weight and bias DTensors, ``Shard(0)`` over 2 CPU processes, gloo) in the
fused-linear op: each rank's log-probs equal the reference on the full weight, and the gradients come back as
DTensors with the parameters' placements, equal to the mean over ranks of each rank's full gradient (what FSDP2's
reduce-scatter gives its other parameters). Run as a script by the test (2 spawned processes)."""
import os
import subprocess
import sys
import tempfile

import pytest
import torch

V, H, N, WORLD = 30, 8, 6, 2
SOFTCAP = 3.0


def _worker(rank: int, init_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    import gfpo_fast as gf
    from gfpo_fast.fused_linear import fused_linear_logprobs_ref

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)  # the same full tensors on every rank
    weight, bias = torch.randn(V, H), torch.randn(V)
    hidden, ids = torch.randn(WORLD, N, H), torch.randint(0, V, (WORLD, N))  # one batch per rank
    mesh = init_device_mesh("cpu", (WORLD,))
    sharded_w = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    sharded_b = torch.nn.Parameter(distribute_tensor(bias, mesh, [Shard(0)]))
    logp = gf.fused_linear_logprobs(hidden[rank], sharded_w, ids[rank], bias=sharded_b, softcap=SOFTCAP, chunk_size=4,
                                    backend="cpp")
    logp.sum().backward()

    full_w, full_b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    ref = [fused_linear_logprobs_ref(hidden[r], full_w, ids[r], bias=full_b, softcap=SOFTCAP) for r in range(WORLD)]
    (sum(x.sum() for x in ref) / WORLD).backward()
    torch.testing.assert_close(logp, ref[rank].detach(), atol=2e-6, rtol=1e-5)
    for grad, param, expected in ((sharded_w.grad, sharded_w, full_w.grad), (sharded_b.grad, sharded_b, full_b.grad)):
        assert isinstance(grad, DTensor) and grad.placements == param.placements, (type(grad), grad.placements)
        torch.testing.assert_close(grad.full_tensor(), expected, atol=2e-6, rtol=1e-5)
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_sharded_lm_head_gathered_with_averaged_dtensor_gradients():
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


if __name__ == "__main__":
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"),), nprocs=WORLD)
