"""A run owns its output_dir: one run at a time (a lock file), never on top of an earlier run's files.

``own_output_dir`` is entered before anything is written there, and before any model loads:

* ``LOCK`` (``output_dir/.lock``, "<host> <pid>") is created exclusively; a second run in the folder stops
  with a message naming the holder. A lock whose process is gone (same host, dead pid: a run that was killed)
  is reclaimed, and said so. The lock goes when the run ends, however it ends.
* A folder holding an earlier run (any of ``USED_BY``) is refused unless the run resumes
  (``resume_from_checkpoint``) or ``overwrite_output_dir`` is set; overwriting deletes that run's files
  (``RUN_FILES``) first, its checkpoints included, so no old checkpoint can be pruned for, or resumed as, the new
  run's.
* A partial checkpoint of an interrupted save is tidied (``checkpoint.clean_partial``).

Rank 0 does all of it; its verdict is broadcast, so every process stops with the same message. The promises this
makes are written out in ``docs/checkpoints.md``.
"""
from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from accelerate.utils import broadcast_object_list

from . import checkpoint as ckpt

LOCK = ".lock"
USED_BY = ("checkpoints", "metrics.jsonl", "config.yaml")  # any of these: an earlier run wrote here
RUN_FILES = ("checkpoints", "metrics.jsonl", "completions.jsonl", "config.yaml", "eval.json", "metrics.png",
             "merged", "tensorboard")  # what a run writes into output_dir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def acquire_lock(out_dir: Path) -> tuple[Path, list[str]]:
    """Creates ``out_dir/LOCK`` for this process: ``(lock path, notes)``, a note when a stale lock was reclaimed.
    A live holder is a ``ValueError`` naming it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock, host, notes = out_dir / LOCK, socket.gethostname(), []
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = lock.read_text().split() if lock.is_file() else []
            owner_host, pid = (holder[0], int(holder[1])) if len(holder) == 2 and holder[1].isdigit() else ("?", None)
            if owner_host == host and pid is not None and not _alive(pid):
                lock.unlink(missing_ok=True)
                notes.append(f"output_dir: reclaimed {lock}, left by process {pid}, which is gone")
                continue
            raise ValueError(f"output_dir {out_dir} is in use by another run (process {pid} on {owner_host}, lock "
                             f"file {lock}); wait for it to end, or choose another output_dir. If no run is alive "
                             f"there, delete {lock}") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{host} {os.getpid()}\n")
        return lock, notes


def claim(out_dir: Path, resuming: bool, overwrite: bool) -> list[str]:
    """Refuses ``out_dir`` when an earlier run's files are there, unless ``resuming`` or ``overwrite`` (which
    deletes them); then tidies partial checkpoints. Returns notes of what it did. Holds the lock already."""
    used = [name for name in USED_BY if (out_dir / name).exists()]
    notes = []
    if used and not resuming:
        if not overwrite:
            raise ValueError(f"output_dir {out_dir} holds an earlier run ({', '.join(used)}); a new run there would "
                             "mix with it. Resume it with --resume_from_checkpoint latest, start over with "
                             "--overwrite_output_dir true (deletes its checkpoints and metrics), or choose another "
                             "output_dir")
        for name in RUN_FILES:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        notes.append(f"overwrite_output_dir: deleted the earlier run's {', '.join(used)} in {out_dir}")
    return notes + ckpt.clean_partial(str(out_dir))


@contextmanager
def own_output_dir(output_dir: str, accelerator, *, resuming: bool, overwrite: bool) -> Iterator[None]:
    """Holds ``output_dir`` for the run (see the module docstring); collective: enter it on every process."""
    out_dir, lock, error = Path(output_dir), None, None
    if accelerator.is_main_process:
        try:
            lock, notes = acquire_lock(out_dir)
            for note in notes + claim(out_dir, resuming, overwrite):
                print(note)
        except (ValueError, OSError) as err:
            error = f"{err}" if isinstance(err, ValueError) else f"output_dir {out_dir}: {err}"
            if lock is not None:
                lock.unlink(missing_ok=True)
    [error] = broadcast_object_list([error])
    if error is not None:
        raise ValueError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
