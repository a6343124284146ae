"""Here, before a lent GPU is used: the wheels it lacks, the size of what travels, the device call, a rehearsal.

    python -m bench.gpu_suite --prepare    # .whl/: the cp312 wheels; checks the 64 MiB; prints the device call
    python -m bench.gpu_suite --rehearse   # the dry suite in a fresh venv holding only the lent machine's packages

The lent machine (the device tool's KINDS.md) runs Python 3.12 with torch 2.11, triton 3.6, transformers 5.17 and
accelerate 1.15 installed, and fetches nothing: what it lacks travels as wheels (``CARRIED``), at most 64 MiB
together with the working tree, and is installed there by ``--install`` (``gpu_suite.install_commands``).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import gpu_suite
from bench._git import git, short_head

ROOT = gpu_suite.ROOT
LOCK = ROOT / "constraints" / "main.txt"
WHEELS = ".whl"  # the carried wheels' folder, ignored by git (.gitignore)
TRAVEL_LIMIT = 64 * 2**20  # working tree (tracked and untracked-not-ignored files) plus carried paths
COMMAND_LIMIT = 2000  # characters of a device command
DEVICE_S = 900  # device time of a session, every start, idle wait and call counted
START_S = 120  # a machine's start, at worst (1 to 2 minutes)
IDLE_S = 30  # a machine stays warm this long after a call, counted
TRIES = 2
TIMEOUT_S = (DEVICE_S - TRIES * (START_S + IDLE_S)) // TRIES  # 300: two cold tries fit the 15 minutes
MARGIN_S = 25  # inside timeout_s and outside the suite's budget: Python's start, the last packing
INSTALL_S = 40  # the install step's share of the budget, about (estimate; the summary records it)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# What the lent machine lacks, one wheel each, installed there with --no-deps: name -> version (None: the lock's).
CARRIED = {
    "trl": None,  # peers: its fused LM head and selective_log_softmax; GRPOTrainer in train_scale
    "datasets": None, "dill": None, "multiprocess": None,  # TRL's trainer imports datasets, which imports these
    "liger-kernel": "0.8.5",  # peers; --use_liger_kernel
    # peer: verl/utils/kernel/linear_cross_entropy.py and what it imports (verl.utils.device, verl.plugin) need only
    # torch, triton and packaging when loaded under stub verl / verl.utils packages: verl's __init__ needs Ray
    "verl": "0.9.1",
    "setuptools": None, "pybind11": None,  # the build of _C (pyproject: setuptools>=77); the machine's are unread
}
# The lent machine's packages (KINDS.md's pip list, 2026-11) that the suite uses, for the rehearsal: name ->
# version, or None where KINDS.md names no version (then the lock's). Python is 3.12.3 there.
MACHINE = {
    "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "safetensors": "0.8.0", "numpy": "2.5.2",
    **dict.fromkeys(["peft", "pytest", "pytest-benchmark", "hypothesis", "pybind11", "setuptools", "matplotlib",
                     "pyyaml", "tqdm", "pandas", "pyarrow", "xxhash", "fsspec", "requests", "jinja2", "psutil",
                     "tensorboard", "packaging", "filelock", "regex"]),
}

# Where the machine's version has no build here: what the rehearsal takes instead of the lock's, and why.
INSTEAD = {"numpy": ("numpy<2.4", "Triton 3.6's interpreter, which runs the dry suite, calls int() on one-element "
                                  "arrays, an error since NumPy 2.4; the lent machine never interprets")}


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def lock_versions(lock: Path = LOCK) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of the lock (names normalised)."""
    pins = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[norm(name)] = version.strip()
    return pins


def carried_specs(lock: dict[str, str]) -> list[str]:
    """``name==version`` of each ``CARRIED`` wheel."""
    return [f"{name}=={version or lock[norm(name)]}" for name, version in CARRIED.items()]


def wheel_of(path: Path) -> tuple[str, str]:
    """``(normalised name, version)`` of a wheel file name."""
    name, version = path.name.split("-")[:2]
    return norm(name), version


def download_command(spec: str, dest: Path, python_version: str) -> list[str]:
    """``pip download`` of one binary wheel, no dependencies, for CPython ``python_version`` on x86-64 Linux."""
    command = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return [*command, spec]


def download(specs: list[str], dest: Path, python_version: str) -> list[Path]:
    """Makes ``dest`` hold exactly one wheel per spec: downloads the missing ones and deletes every other
    ``.whl`` (two versions of one name would stop the install). Returns the wheels, sorted."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {norm(s.split("==")[0]): s.split("==")[1] for s in specs}
    for wheel in dest.glob("*.whl"):
        name, version = wheel_of(wheel)
        if wanted.get(name) != version:
            wheel.unlink()
    have = {wheel_of(w)[0] for w in dest.glob("*.whl")}
    for spec in specs:
        if norm(spec.split("==")[0]) not in have:
            print(f"[prepare] downloading {spec} (cp{python_version.replace('.', '')})", flush=True)
            subprocess.run(download_command(spec, dest, python_version), check=True)
    return sorted(dest.glob("*.whl"))


def travel_files(root: Path = ROOT) -> list[Path]:
    """What a device call sends besides its carried paths: tracked and untracked-not-ignored files that exist,
    and ``shared/`` where the checkout has one."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = {root / f for f in listed if f}
    if (root / "shared").is_dir():
        files |= {f for f in (root / "shared").rglob("*")}
    return sorted(f for f in files if f.is_file() or f.is_symlink())


def travel_bytes(root: Path, carry: list[str]) -> int:
    """Bytes of :func:`travel_files` plus every file under the carried paths (a link counts as itself)."""
    total = sum(f.lstat().st_size for f in travel_files(root))
    for path in carry:
        p = root / path
        total += sum(f.lstat().st_size for f in ([p] if p.is_file() else p.rglob("*")) if not f.is_dir())
    return total


def commit_label(root: Path = ROOT) -> str:
    """The short HEAD commit, with ``+changes`` when the travelling tree differs from it."""
    return short_head(root) + ("+changes" if git("status", "--porcelain", cwd=root) else "")


def device_call(commit: str, only: list[str] | None = None) -> dict:
    """The device tool's ``run`` arguments: ``command`` (installs the carried wheels and this checkout from local
    files, runs the parts under ``TIMEOUT_S - MARGIN_S`` seconds, packs what it finished into ``$OUT``), ``carry``
    and ``timeout_s``."""
    work = "/tmp/gpu-suite"
    args = ["--install", WHEELS, "--budget", str(TIMEOUT_S - MARGIN_S), "--commit", commit, "--out", work]
    args += ["--parts", ",".join(only)] if only else []
    command = (f"export PYTHONUNBUFFERED=1; nvidia-smi -L; python3 -m bench.gpu_suite "
               f"{' '.join(shlex.quote(a) for a in args)} --pack \"$OUT\"")
    return {"command": command, "carry": [WHEELS], "timeout_s": TIMEOUT_S}


def plan(budget: float) -> list[tuple[str, float, int | None]]:
    """``(part, GPU limit, call)`` in order, when every part takes its full limit and each call of ``budget``
    seconds starts with the install (``INSTALL_S``): call 1, 2, ... holds the parts that fit after the earlier ones;
    None for a part that does not run there (no command, or it needs a module that is neither carried nor
    installed there: vLLM)."""
    carried = {norm(name).replace("-", "_") for name in CARRIED}
    rows, call, used = [], 1, float(INSTALL_S)
    for part in gpu_suite.parts(Path("/tmp/gpu-suite"), dry=False):
        if not part.command or set(part.needs) - carried:
            rows.append((part.name, part.limit, None))
            continue
        if used + part.limit > budget:
            call, used = call + 1, float(INSTALL_S)
        used += part.limit
        rows.append((part.name, part.limit, call))
    return rows


def prepare(only: list[str] | None = None) -> int:
    """Downloads the cp312 wheels into ``WHEELS``, checks what travels, prints the device call (running the parts
    named in ``only``, or all). 0 when it fits."""
    ignored = subprocess.run(["git", "check-ignore", "-q", WHEELS + "/"], cwd=ROOT).returncode == 0
    if not ignored:
        print(f"[prepare] {WHEELS}/ is not ignored by git: add /{WHEELS}/ to .gitignore", file=sys.stderr)
        return 1
    wheels = download(carried_specs(lock_versions()), ROOT / WHEELS, "3.12")
    size = travel_bytes(ROOT, [WHEELS])
    wheel_bytes = sum(w.stat().st_size for w in wheels)
    call = device_call(commit_label(), only)
    print(f"[prepare] {len(wheels)} wheels, {wheel_bytes / 2**20:.1f} MiB: {', '.join(w.name for w in wheels)}")
    print(f"[prepare] travels: {size / 2**20:.1f} MiB of {TRAVEL_LIMIT // 2**20} MiB (working tree and {WHEELS}/)")
    print(f"[prepare] device time: {DEVICE_S} s = {TRIES} x (start {START_S} s + timeout_s {TIMEOUT_S} s + idle "
          f"{IDLE_S} s); the suite's budget is timeout_s - {MARGIN_S} s")
    print(f"[prepare] parts in order of value, GPU limits, and the call that reaches each if every part takes its "
          f"limit (each call installs first, ~{INSTALL_S} s):")
    for name, limit, n in plan(TIMEOUT_S - MARGIN_S):
        print(f"  {name:<24} {limit:>4.0f} s   " + (f"call {n}" if n else "not run there"))
    print("\nThe device call (the run tool's arguments):")
    print(f"  command:   {call['command']}")
    print(f"  carry:     {call['carry']}")
    print(f"  timeout_s: {call['timeout_s']}")
    print("Then commit $OUT's files under bench/results/gpu-suite-<device>-<date>/. If the summary lists parts not "
          "reached, `python -m bench.gpu_suite --prepare --parts <their names>` prints the second call.")
    problems = []
    if size > TRAVEL_LIMIT:
        problems.append(f"{size / 2**20:.1f} MiB travel, over {TRAVEL_LIMIT // 2**20} MiB")
    if len(call["command"]) > COMMAND_LIMIT:
        problems.append(f"the command has {len(call['command'])} characters, over {COMMAND_LIMIT}")
    for problem in problems:
        print(f"[prepare] does not fit: {problem}", file=sys.stderr)
    return 1 if problems else 0


# ----------------------------------------------------------------------------- the rehearsal
def machine_specs(lock: dict[str, str], wheelhouse: Path) -> tuple[list[str], list[str]]:
    """``(specs, unmatched)``: ``MACHINE``'s packages pinned to its versions where this Python and CPU can have
    that version from the configured indexes (probed by downloading into ``wheelhouse``), else to ``INSTEAD``'s
    range or the lock's version; ``unmatched`` says which could not be had and what was taken."""
    specs, unmatched = [], []
    for name, version in MACHINE.items():
        locked = lock.get(norm(name))
        if version is not None:
            # The CPU build: the index's plain torch of that version is a CUDA build, useless here.
            want = f"{name}=={version}+cpu" if name == "torch" else f"{name}=={version}"
            probe = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                                    "--no-deps", "--only-binary=:all:", "-d", str(wheelhouse), want],
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                specs.append(want)
                continue
            spec, why = INSTEAD.get(name, (f"{name}=={locked}" if locked else name, "the lock's"))
            unmatched.append(f"{name} {version}: no build for Python {sys.version_info[0]}.{sys.version_info[1]} on "
                             f"this CPU; {spec} instead ({why})")
            specs.append(spec)
            continue
        specs.append(f"{name}=={locked}" if locked else name)
    return specs, unmatched


def copy_travelling_tree(dest: Path) -> None:
    """``dest`` := what a device call sends (:func:`travel_files`), without ``.git``."""
    shutil.rmtree(dest, ignore_errors=True)
    for f in travel_files(ROOT):
        target = dest / f.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target, follow_symlinks=False)


def rehearsal_env(home: Path, venv: Path) -> dict:
    """An environment like the lent machine's: no pip configuration or ``PIP_*`` settings (its pip has no index to
    reach), empty Hugging Face and gfpo-fast caches, the venv's ``bin`` first on ``PATH``, no ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON", "HF_",
                                                                    "TRANSFORMERS_", "GFPO_"))}
    env.update(PIP_CONFIG_FILE=os.devnull, HF_HOME=str(home / "hf"), GFPO_FAST_CACHE=str(home / "gfpo"),
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv))
    return env


def rehearse(where: Path | None = None) -> int:
    """The dry suite as the lent machine would run it, on this CPU: a fresh venv with only ``MACHINE``'s packages
    (installed with ``--no-index`` from a local wheel folder), a copy of the travelling tree without ``.git``, the
    carried wheels built for this Python, and the printed call's ``--install`` flow, offline. Returns its exit
    status; writes ``rehearsal.md`` in ``where`` (default ``$TMPDIR/gfpo-fast-rehearse``)."""
    where = where or Path(tempfile.gettempdir()) / "gfpo-fast-rehearse"
    start = time.perf_counter()
    lock = lock_versions()
    wheelhouse, venv, tree = where / "wheelhouse", where / "venv", where / "tree"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    py_version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    specs, unmatched = machine_specs(lock, wheelhouse)
    pinned = {norm(re.split(r"[<>=!~]", s)[0]) for s in specs}
    constraints = where / "constraints.txt"  # the lock, less what the machine pins: its other packages' versions
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in lock.items() if n not in pinned))
    print(f"[rehearse] the lent machine's packages for Python {py_version}: {' '.join(specs)}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--prefer-binary",
                    "-c", str(constraints), "-d", str(wheelhouse), *specs], check=True)
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    env = rehearsal_env(where, venv)
    shutil.rmtree(where / "hf", ignore_errors=True)
    shutil.rmtree(where / "gfpo", ignore_errors=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-index", "--find-links", str(wheelhouse), *specs], check=True, env=env)
    copy_travelling_tree(tree)
    download(carried_specs(lock), tree / WHEELS, py_version)
    ready = time.perf_counter()
    print(f"[rehearse] venv and tree ready in {ready - start:.0f} s; the dry suite, offline:", flush=True)
    work = where / "work"
    shutil.rmtree(work, ignore_errors=True)
    out = where / "out"
    shutil.rmtree(out, ignore_errors=True)
    env.update(gpu_suite.OFFLINE)
    command = [str(venv / "bin" / "python"), "-m", "bench.gpu_suite", "--dry", "--install", WHEELS, "--commit",
               commit_label(), "--out", str(work), "--pack", str(out)]
    code = subprocess.run(command, cwd=tree, env=env).returncode
    end = time.perf_counter()
    summary = (out / gpu_suite.SUMMARY[0]).read_text() if (out / gpu_suite.SUMMARY[0]).exists() else "(no summary)\n"
    report = [f"# Rehearsal of the GPU suite ({time.strftime('%Y-%m-%d %H:%M %Z')}, commit {commit_label()})", "",
              f"`python -m bench.gpu_suite --rehearse`: exit {code}; {end - start:.0f} s in all, of which the dry "
              f"suite {end - ready:.0f} s. Python {py_version} here, 3.12 there: compiled packages are this "
              f"Python's builds, and the carried wheels were downloaded for it.", "",
              "Not matched: " + ("; ".join(unmatched) or "none") + ".", "", summary]
    (where / "rehearsal.md").write_text("\n".join(report))
    print("\n".join(report))
    print(f"[rehearse] written: {where / 'rehearsal.md'} ({', '.join(p.name for p in sorted(out.glob('*')))} "
          f"in {out})")
    return code
