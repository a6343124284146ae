"""Checkpoints: everything needed to continue a run exactly, on any number of processes, written atomically.

Layout of ``<output_dir>/checkpoints/checkpoint-<step>/``:

* ``model/``: ``save_pretrained`` safetensors, config and tokenizer (``from_pretrained`` loads it): the full state
  dict, gathered on rank 0 whatever the wrapping (DDP, FSDP2 DTensors, DeepSpeed ZeRO);
* ``optimizer/``: the optimizer state as a ``torch.distributed.checkpoint`` (DCP) directory, keyed by parameter
  name: each rank writes the part it holds (its shard under FSDP2; replicated state once), and loading
  reshards it to the loading run's processes and wrapping, so a run may resume on another process count or
  switch between single-process, DDP and FSDP2. Under DeepSpeed it is instead ``accelerator.save_state``'s
  directory (the engine's own ZeRO checkpoint; untested here, no GPU);
* ``ref_model/``: with ``sync_ref_model``, the reference model as last synced (same format as ``model/``): a
  resume continues from it, not from the initial model;
* ``trainer_state.pt``: scheduler, step, prompt-sampler position, GFPO filter history (the same on every rank);
* ``rng_state_<rank>.pt``: Python, NumPy and torch (CPU and CUDA) generator states of each process;
* ``config.yaml``: the run's configuration, for reference;
* ``checkpoint.json`` (``MANIFEST``, written last): the run id, the step, the algorithm and whether it is a LoRA
  adapter, and the size and SHA-256 of every other file. ``verify`` checks it before a resume, so a truncated,
  missing or altered file is named before anything loads, and ``resolve_resume('latest')`` skips a damaged
  checkpoint for the newest intact one, saying which and why. A manifest without checksums (an older gfpo-fast)
  is checked by size only, and the resume says so.

A checkpoint is written into ``checkpoint-<step>.tmp`` and renamed into place only when complete, so a
crash or a second signal never leaves a half-written checkpoint under a final name, and an existing
checkpoint is replaced only by a complete one; a ``.tmp`` left by a crash is removed by the next start
(``clean_partial``). Pruning (``save_total_limit``) removes only checkpoints whose manifest carries the
current run's id, never a ``keep`` checkpoint. Resuming with the same configuration on the same
device and process count reproduces the uninterrupted run (bit-exact on the CPU, FSDP2 included).
The promises of a run about its output_dir: ``docs/checkpoints.md``.
"""
from __future__ import annotations

import hashlib
import json
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
PARTIAL = re.compile(r"^checkpoint-(\d+)\.(tmp|old)$")
OPTIMIZER = "optimizer"  # the optimizer state's directory in a checkpoint
MANIFEST = "checkpoint.json"
REF_MODEL = "ref_model"  # the synced reference model's directory in a checkpoint (sync_ref_model only)
IDENTITY = ("algorithm", "use_peft")  # what a resume must keep: another value is another model or state layout


def checkpoints_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints of ``output_dir``, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def read_manifest(path: Path) -> dict | None:
    """The ``MANIFEST`` of checkpoint ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def sha256(file: Path) -> str:
    """The SHA-256 of ``file`` as hex, read in chunks (``hashlib.file_digest``): constant memory for any size;
    about 0.4 s per 500 MB on one CPU core, a fifth of the time it took to write it (docs/checkpoints.md)."""
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be resumed (naming the file), or None when it is intact: every file of its
    manifest is there with the size it was written with, then (when the manifest has checksums) with the same
    SHA-256. Sizes first: a missing or truncated file is named without reading the others."""
    manifest = read_manifest(path)
    if manifest is None:
        return (f"{path / MANIFEST} is missing or unreadable (a checkpoint of an older gfpo-fast, or a damaged one); "
                f"start a new run from its weights with --model_name_or_path {path / 'model'}")
    for name, size in manifest["files"].items():
        file = path / name
        found = file.stat().st_size if file.is_file() else None
        if found != size:
            return f"{file}: " + ("missing" if found is None else f"{found} bytes, written with {size}") + \
                " (truncated or damaged)"
    for name, digest in manifest.get("sha256", {}).items():
        found = sha256(path / name)
        if found != digest:
            return f"{path / name}: content changed since it was written (sha256 {found[:16]}..., written with " \
                f"{digest[:16]}...; damaged)"
    return None


def resolve_resume(spec: str, output_dir: str, identity: dict) -> tuple[Path, dict, list[str]]:
    """``resume_from_checkpoint`` -> ``(checkpoint directory, its manifest, notes)``; 'latest' is the newest intact
    checkpoint of output_dir, and ``notes`` say which newer ones were skipped and why, and when the checkpoint's
    files could be checked by size only (no checksums in its manifest). A damaged checkpoint named
    by path, or one written with another ``IDENTITY`` value than ``identity`` has, is a ``ValueError``."""
    notes = []
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ValueError(f"resume_from_checkpoint='latest' but {checkpoints_dir(output_dir)} holds no checkpoint; "
                             "drop the flag to start a new run")
        path = None
        for candidate in reversed(found):
            problem = verify(candidate)
            if problem is None:
                path = candidate
                break
            notes.append(f"resume_from_checkpoint='latest': skipped {candidate.name}: {problem}")
        if path is None:
            raise ValueError(f"resume_from_checkpoint='latest': no intact checkpoint in {checkpoints_dir(output_dir)}:"
                             " " + "; ".join(notes))
    else:
        path = Path(spec).expanduser()
        if not (path / "trainer_state.pt").is_file() or not (path / "model").is_dir():
            raise ValueError(f"resume_from_checkpoint: {path} is not a checkpoint directory (expected model/ and "
                             "trainer_state.pt inside)")
        if not (path / OPTIMIZER).is_dir():
            raise ValueError(f"resume_from_checkpoint: {path} has no {OPTIMIZER}/ directory: it was written by an "
                             "older gfpo-fast (optimizer state of rank 0 only, inside trainer_state.pt); start a new "
                             f"run from its weights with --model_name_or_path {path / 'model'}")
        problem = verify(path)
        if problem is not None:
            raise ValueError(f"resume_from_checkpoint: {problem}")
    manifest = read_manifest(path)
    if "sha256" not in manifest:
        notes.append(f"resume_from_checkpoint: {path.name} has no checksums (written by an older gfpo-fast): its "
                     "files were checked by size only")
    changed = {k: (manifest[k], identity[k]) for k in IDENTITY if manifest[k] != identity[k]}
    if changed:
        diff = ", ".join(f"{k}={old!r} (this run: {new!r})" for k, (old, new) in changed.items())
        raise ValueError(f"resume_from_checkpoint: {path} was written with {diff}; resume with the checkpoint's "
                         f"values, or start a new run from its weights with --model_name_or_path {path / 'model'}")
    return path, manifest, notes


def clean_partial(output_dir: str) -> list[str]:
    """Tidies what an interrupted save left in output_dir's checkpoints (main process, before a run starts):
    a ``checkpoint-<step>.old`` whose replacement never landed goes back in place, every other ``.tmp`` / ``.old``
    is deleted. Returns a note per item."""
    root, notes = checkpoints_dir(output_dir), []
    if not root.is_dir():
        return notes
    for p in sorted(root.iterdir()):
        m = PARTIAL.match(p.name)
        if m is None:
            continue
        final = root / f"checkpoint-{m.group(1)}"
        if m.group(2) == "old" and not final.exists():
            os.replace(p, final)
            notes.append(f"restored {final.name} from {p.name}, left by an interrupted save")
        else:
            shutil.rmtree(p)
            notes.append(f"removed {p}, a partial checkpoint left by an interrupted save")
    return notes


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
        try:
            dcp.load(state, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
        except Exception as err:  # noqa: BLE001 - DCP wraps the reader's error; name the directory
            raise ValueError(f"resume_from_checkpoint: the optimizer state in {path} could not be read "
                             f"({type(err).__name__}: {str(err)[:300]})") from err
    set_optimizer_state_dict(model, _inner(optimizer), state["optimizer"])


def save_checkpoint(accelerator, output_dir: str, step: int, model, optimizer, tokenizer, trainer_state: dict,
                    config_yaml: str, total_limit: int, identity: dict, keep: Path | None = None,
                    ref_model=None) -> Path:
    """Writes ``checkpoint-<step>`` on every process's behalf (collective: call it on all ranks), then prunes the
    run's checkpoints to the newest ``total_limit``. ``identity``: ``run_id`` and the ``IDENTITY`` fields, into the
    manifest; ``keep``: a checkpoint pruning leaves alone (the last one before a non-finite step); ``ref_model``:
    the synced reference model, written to ``REF_MODEL`` with the tokenizer (None: not written)."""
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
        save_optimizer(accelerator, tmp / OPTIMIZER, model, optimizer)
        models = {"model": model, **({REF_MODEL: ref_model} if ref_model is not None else {})}
        for name, m in models.items():
            state_dict = full_model_state_dict(accelerator, m)
            if accelerator.is_main_process:
                accelerator.unwrap_model(m).save_pretrained(tmp / name, state_dict=state_dict)
                tokenizer.save_pretrained(tmp / name)
        if accelerator.is_main_process:
            torch.save(trainer_state, tmp / "trainer_state.pt")
            (tmp / "config.yaml").write_text(config_yaml)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            written = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in written}
            digests = {str(f.relative_to(tmp)): sha256(f) for f in written}
            (tmp / MANIFEST).write_text(json.dumps({**identity, "step": step, "files": files, "sha256": digests},
                                                   indent=1))
    except BaseException:  # a full disk, a second signal: no partial checkpoint stays behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():  # same step written twice (e.g. a signal right after a save): swap, then delete
            old = root / f"checkpoint-{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        mine = [c for c in list_checkpoints(output_dir)
                if c != keep and (read_manifest(c) or {}).get("run_id") == identity["run_id"]]
        for stale in mine[:-total_limit]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def _torch_load(file: Path):
    """``torch.load`` of a checkpoint file; a failure is a ``ValueError`` naming the file."""
    try:
        return torch.load(file, weights_only=False)
    except Exception as err:  # noqa: BLE001 - unpickling fails in many ways; each names the file
        raise ValueError(f"resume_from_checkpoint: {file} could not be read ({type(err).__name__}: {err})") from err


def load_checkpoint(path: Path, process_index: int) -> tuple[dict, dict | None]:
    """``(trainer_state, rng_state of this rank or None if the run had fewer ranks)``."""
    trainer_state = _torch_load(path / "trainer_state.pt")
    rng_file = path / f"rng_state_{process_index}.pt"
    rng = _torch_load(rng_file) if rng_file.is_file() else None
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
