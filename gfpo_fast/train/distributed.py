"""The policy's distributed wrapping: accelerate's (DDP, FSDP on GPUs, DeepSpeed), or FSDP2 by hand on the CPU.

``accelerate launch --config_file examples/accelerate/fsdp.yaml`` asks for FSDP through environment variables
(``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ...). On a machine without a GPU the trainer's Accelerator runs with
``cpu=True`` (see ``make_accelerator``), and accelerate 1.15 then comes up as ``MULTI_CPU``: it ignores its FSDP
plugin, wraps the model in DDP and leaves plain parameters, so a run that asked for sharding would silently
train unsharded. torch's own FSDP2 works on the CPU over gloo, so in that case :func:`prepare_policy` shards
the model itself with ``fully_shard`` (each decoder layer, then the root; the parameters become DTensors)
and says so. Everything after setup (the loss's lm_head gather, generation, checkpoints) is the same code for
accelerate's FSDP2 and this one.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from accelerate.utils import DistributedType, parse_flag_from_env


def fsdp2_on_cpu(accelerator) -> bool:
    """Whether the launch asked for FSDP and accelerate came up ``MULTI_CPU`` (it will not shard: this module
    does, with FSDP2). FSDP1 is refused there. Call it before loading any model: it turns accelerate's
    ``fsdp_cpu_ram_efficient_loading`` off, which would make transformers load the weights on rank 0 only (meta
    tensors elsewhere) for accelerate's FSDP prepare to broadcast; here every rank loads them and keeps its shard.
    """
    if accelerator.distributed_type != DistributedType.MULTI_CPU or not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError("FSDP on the CPU needs FSDP2 (torch's fully_shard): set fsdp_version: 2 in the accelerate "
                         "config (examples/accelerate/fsdp.yaml)")
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    return True


def fully_shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over the default process group: ``fully_shard`` on every module whose class is named in
    ``FSDP_TRANSFORMER_CLS_TO_WRAP`` (the accelerate config's ``fsdp_transformer_layer_cls_to_wrap``; default
    the model's ``_no_split_modules``, its decoder layers, as accelerate's TRANSFORMER_BASED_WRAP), then on the
    root, which takes the rest (embeddings, final norm, lm_head, tied or not). ``FSDP_RESHARD_AFTER_FORWARD``
    as in the config (default true). Returns ``model``, now an ``FSDPModule`` with DTensor parameters."""
    from torch.distributed.fsdp import fully_shard

    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or ",".join(getattr(model, "_no_split_modules", None) or [])
    classes = {n.strip() for n in names.split(",") if n.strip()}
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"FSDP: no module of {model.__class__.__name__} is of a class to wrap ({sorted(classes)}); "
                         "set fsdp_transformer_layer_cls_to_wrap in the accelerate config to the model's decoder "
                         "layer class")
    reshard = parse_flag_from_env("FSDP_RESHARD_AFTER_FORWARD", default=True)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return model


def prepare_policy(accelerator, model, make_optimizer: Callable, fsdp_cpu: bool, log: Callable = print):
    """``(model, optimizer)`` ready to train: ``accelerator.prepare`` (DDP, FSDP on GPUs, DeepSpeed), or with
    ``fsdp_cpu`` (:func:`fsdp2_on_cpu`) the model sharded by :func:`fully_shard_model` and only the optimizer
    prepared (a prepared model would be wrapped in DDP). ``make_optimizer(model)`` is called on the sharded
    model: FSDP2 replaces the parameters, and the optimizer must hold the new ones."""
    if not fsdp_cpu:
        return accelerator.prepare(model, make_optimizer(model))
    model = fully_shard_model(model)
    if accelerator.is_main_process:
        log(f"FSDP2 on the CPU: accelerate runs MULTI_CPU and would not shard, so the model is sharded with torch's "
            f"fully_shard over {accelerator.num_processes} processes (gloo)")
    return model, accelerator.prepare_optimizer(make_optimizer(model))


def prepare_reference(accelerator, model, fsdp_cpu: bool):
    """The frozen reference model, in eval mode without gradients, wrapped as the policy is: sharded too with
    ``fsdp_cpu``, else ``accelerator.prepare_model`` for evaluation (no DDP; FSDP / DeepSpeed shard it)."""
    model = model.eval().requires_grad_(False)
    return fully_shard_model(model) if fsdp_cpu else accelerator.prepare_model(model, evaluation_mode=True)
