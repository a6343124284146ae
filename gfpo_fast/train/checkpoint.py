"""Checkpoints: everything needed to continue a run exactly, written atomically.

Layout of ``<output_dir>/checkpoints/checkpoint-<step>/``:

* ``model/``: ``save_pretrained`` safetensors, config and tokenizer (``from_pretrained`` loads it);
* ``trainer_state.pt``: optimizer, scheduler, step, prompt-sampler position, GFPO filter history;
* ``rng_state_<rank>.pt``: Python, NumPy and torch (CPU and CUDA) generator states of each process;
* ``config.yaml``: the run's configuration, for reference.

A checkpoint is written into ``checkpoint-<step>.tmp`` and renamed into place only when complete, so a
crash or a second signal never leaves a half-written checkpoint under a final name, and an existing
checkpoint is replaced only by a complete one. Resuming with the same configuration on the same
device reproduces the uninterrupted run (bit-exact on the CPU).
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

PATTERN = re.compile(r"^checkpoint-(\d+)$")


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


def save_checkpoint(accelerator, output_dir: str, step: int, model, tokenizer, trainer_state: dict, config_yaml: str,
                    total_limit: int) -> Path:
    """Writes ``checkpoint-<step>`` on every process's behalf (collective: call it on all ranks)."""
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP / ZeRO-3
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
