"""Checkpoints: everything needed to continue a run exactly, on any number of processes, written atomically.

Layout of ``<output_dir>/checkpoints/checkpoint-<step>/``:

* ``model/``: ``save_pretrained`` safetensors, config and tokenizer (``from_pretrained`` loads it): the full state
  dict, gathered on rank 0 whatever the wrapping (DDP, FSDP2 DTensors, DeepSpeed ZeRO);
* ``optimizer/``: the optimizer state as a ``torch.distributed.checkpoint`` (DCP) directory, keyed by parameter
  name: each rank writes the part it holds (its shard under FSDP2; replicated state once), and loading
  reshards it to the loading run's processes and wrapping, so a run may resume on another process count or
  switch between single-process, DDP and FSDP2. Under DeepSpeed it is instead ``accelerator.save_state``'s
  directory (the engine's own ZeRO checkpoint; untested here, no GPU);
* ``trainer_state.pt``: scheduler, step, prompt-sampler position, GFPO filter history (the same on every rank);
* ``rng_state_<rank>.pt``: Python, NumPy and torch (CPU and CUDA) generator states of each process;
* ``config.yaml``: the run's configuration, for reference.

A checkpoint is written into ``checkpoint-<step>.tmp`` and renamed into place only when complete, so a
crash or a second signal never leaves a half-written checkpoint under a final name, and an existing
checkpoint is replaced only by a complete one. Resuming with the same configuration on the same
device and process count reproduces the uninterrupted run (bit-exact on the CPU, FSDP2 included).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

PATTERN = re.compile(r"^checkpoint-(\d+)$")
OPTIMIZER = "optimizer"  # the optimizer state's directory in a checkpoint


def checkpoints_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints of ``output_dir``, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(spec: str, output_dir: str) -> Path:
    """``resume_from_checkpoint`` -> a checkpoint directory ('latest' = newest in output_dir)."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ValueError(f"resume_from_checkpoint='latest' but {checkpoints_dir(output_dir)} holds no checkpoint; "
                             "drop the flag to start a new run")
        return found[-1]
    path = Path(spec).expanduser()
    if not (path / "trainer_state.pt").is_file() or not (path / "model").is_dir():
        raise ValueError(f"resume_from_checkpoint: {path} is not a checkpoint directory (expected model/ and "
                         "trainer_state.pt inside)")
    if not (path / OPTIMIZER).is_dir():
        raise ValueError(f"resume_from_checkpoint: {path} has no {OPTIMIZER}/ directory: it was written by an older "
                         "gfpo-fast (optimizer state of rank 0 only, inside trainer_state.pt); start a new run from "
                         f"its weights with --model_name_or_path {path / 'model'}")
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_model_state_dict(accelerator, model) -> dict:
    """The model's full state dict on rank 0, on the CPU (other ranks: empty or partial; collective: call it on
    all ranks). torch's ``get_model_state_dict`` gathers DTensors (FSDP2, accelerate's or ours) and strips DDP's
    ``module.`` prefix; DeepSpeed's engine gathers its own (``accelerator.get_state_dict``)."""
    if accelerator.distributed_type.value == "DEEPSPEED":
        return accelerator.get_state_dict(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _inner(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


@contextmanager
def _single_process_ok() -> Iterator[None]:
    """Silences DCP's warning that it saves or loads "in a single process": without a process group that is the
    intent (a single-process run), said on every checkpoint otherwise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_optimizer(accelerator, path: Path, model, optimizer) -> None:
    """Writes the optimizer state into ``path`` (see the module docstring; collective)."""
    if accelerator.distributed_type.value == "DEEPSPEED":
        accelerator.save_state(str(path))
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    with _single_process_ok():
        dcp.save({"optimizer": get_optimizer_state_dict(model, _inner(optimizer))}, checkpoint_id=path,
                 no_dist=not torch.distributed.is_initialized())


def load_optimizer(accelerator, path: Path, model, optimizer) -> None:
    """Loads ``path``'s optimizer state (:func:`save_optimizer`) into ``optimizer``, resharded to this run (collective).

    DCP loads into the tensors of a state dict of the same structure: ``get_optimizer_state_dict`` builds it, first
    giving a fresh optimizer its state with one zero-gradient, zero-learning-rate step (torch's own initialisation,
    the parameters do not change)."""
    if accelerator.distributed_type.value == "DEEPSPEED":
        accelerator.load_state(str(path))
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    state = {"optimizer": get_optimizer_state_dict(model, _inner(optimizer))}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
    set_optimizer_state_dict(model, _inner(optimizer), state["optimizer"])


def save_checkpoint(accelerator, output_dir: str, step: int, model, optimizer, tokenizer, trainer_state: dict,
                    config_yaml: str, total_limit: int) -> Path:
    """Writes ``checkpoint-<step>`` on every process's behalf (collective: call it on all ranks)."""
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    save_optimizer(accelerator, tmp / OPTIMIZER, model, optimizer)
    state_dict = full_model_state_dict(accelerator, model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp / "model", state_dict=state_dict)
        tokenizer.save_pretrained(tmp / "model")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # same step written twice (e.g. a signal right after a save): swap, then delete
            old = root / f"checkpoint-{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        for stale in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, process_index: int) -> tuple[dict, dict | None]:
    """``(trainer_state, rng_state of this rank or None if the run had fewer ranks)``."""
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    rng_file = path / f"rng_state_{process_index}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    return trainer_state, rng


def push_to_hub(model_dir: Path, repo_id: str) -> str:
    """Uploads ``model_dir`` (a checkpoint's ``model/``) to the Hub repository ``repo_id`` (created if missing) and
    returns a line saying where it went, or, when the upload fails (no network, no token, no rights), a line
    saying why and how to upload it later: the trained run stays on disk either way."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=url.repo_id, folder_path=model_dir,
                          commit_message=f"gfpo-fast: {model_dir.parent.name}")
    except Exception as err:  # noqa: BLE001 - any failure of the upload is reported, the run's files are kept
        return (f"push_to_hub: could not upload {model_dir} to {repo_id} ({type(err).__name__}: {err}); without a "
                f"network or a token (`hf auth login`) upload it later with `hf upload {repo_id} {model_dir}`")
    return f"push_to_hub: {model_dir} uploaded to {url}"
