"""The checkout's git facts that results record (no torch import: the GPU suite's driver uses it too)."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str, cwd: Path = ROOT) -> str:
    """``git ARGS``' stripped standard output, or ``""`` where git is missing or fails."""
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def short_head(cwd: Path = ROOT, length: int | None = None) -> str:
    """The abbreviated HEAD commit (``length`` hex digits, or git's default), or ``"unknown"`` outside a checkout."""
    return git("rev-parse", "--short" if length is None else f"--short={length}", "HEAD", cwd=cwd) or "unknown"
