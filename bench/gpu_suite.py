"""The one-shot GPU suite: everything a lent GPU should prove, in one call of at most 5 minutes (docs/gpu.md).

    python -m bench.gpu_suite --prepare    # here: the wheels the lent machine lacks, and the exact device call
    python -m bench.gpu_suite --rehearse   # here: the dry suite in a fresh venv holding only its packages
    python -m bench.gpu_suite --install .whl --budget 275 --out /tmp/gpu-suite --pack "$OUT"   # there
    python -m bench.gpu_suite --dry        # the same parts at tiny shapes on the CPU (CI runs this)

``--install WHEELS`` first installs, from local files only, the carried wheels and then this checkout (building
``_C``) into ``OUT/site``, which goes first on the path of every part, and records the versions it finds. Parts
then run in order of value, each in its own process under its own time limit and under what is left of
``--budget``; a part whose needs are missing is skipped with the reason, one that the budget no longer reaches
is listed as such (``--parts`` runs those next). After each part ``summary.md`` / ``summary.json`` are
rewritten and, with ``--pack``, copied beside one archive of the logs and tables, so a run cut short still
returns what it finished:

1. ``bench_logprobs``, ``bench_fused_policy_loss``, ``bench_fused_linear``, ``bench_advantages``: ``python -m
   bench`` per family at N up to 16,384, V = 151,936, bf16, against every peer the bench knows (torch eager,
   torch.compile, TRL, Liger-Kernel, verl), each family's tables written when it ends;
2. ``gpu_tests``: the ``gpu``-marked tests (realistic shapes);
3. ``long_sequence``: one sequence of 65,536 tokens through the log-prob and the fused loss kernels, then one
   of another length: it must run (no grid limit) and compile nothing the second time;
4. ``model``: a Qwen2-shaped model of 494M parameters (Qwen2.5-0.5B's shape, vocabulary 151,936) with random
   weights and a byte-level tokenizer, written with ``save_pretrained`` (the default model cannot travel);
5. ``train``: 6 steps of the trainer on that model, bf16, then ``train_liger``: the same with
   ``--use_liger_kernel true``: ``time/step`` and memory in their ``metrics.jsonl`` (learning is proven on the CPU);
6. ``vllm``: 3 steps with ``--generation_backend vllm`` where vLLM is installed (skipped otherwise);
7. ``train_scale``: one training step of G = 8 completions of 4,096 and of 16,384 tokens on a Qwen2 of vocabulary
   151,936 (hidden 1,024, 4 layers), bf16: this trainer with and without gradient checkpointing, TRL's
   GRPOTrainer on the same batch, and the last full-logits trainer where git can make that worktree
   (``python -m bench.bench_trainer_scale``; peak CUDA memory and step time);
8. ``verl_trainer``: reported as skipped: verl's trainer needs Ray and vLLM, which cannot travel.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench._git import short_head

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
SUMMARY = ("summary.md", "summary.json")
ARCHIVE = "gpu-suite-logs.tar.gz"
PACK_SUFFIXES = (".log", ".md", ".json", ".jsonl", ".csv", ".png", ".txt", ".yaml")
PACK_SKIP = {"site", "model", "checkpoints"}  # folders never archived: installs, weights, the trainer's checkpoints
PACK_FILE_LIMIT = 4 * 2**20  # a file above this is left out of the archive (no weights or checkpoints travel back)
OK = ("passed", "skipped", "no tests", "not reached (budget)")  # the statuses that are no failure
MIN_PART_S = 10  # a part is started only with at least this much of the budget left
# Distributions whose versions every summary records (the machine's own and the carried ones).
RECORDED = ("torch", "triton", "transformers", "accelerate", "huggingface-hub", "tokenizers", "safetensors", "numpy",
            "pyarrow", "pandas", "fsspec", "peft", "pytest", "hypothesis", "setuptools", "pybind11", "trl",
            "liger-kernel", "verl", "datasets", "dill", "multiprocess", "vllm", "ray", "gfpo-fast")
# Carried for some files only, whose needs are fewer than the distribution's: their requirements are not checked.
FILES_ONLY = {"verl": "the peers' files only (bench/verl_files.py loads them without verl's __init__)"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True)
class Part:
    """One part: its command (run from the repository root), time limit in seconds, and the import names it needs
    (``needs``; a missing one skips the part, ``why`` says why it may be missing). A part without a command is
    only reported, skipped with ``why``."""
    name: str
    command: tuple[str, ...]
    limit: float
    needs: tuple[str, ...] = ()
    why: str = ""


def parts(out: Path, dry: bool) -> list[Part]:  # GPU limits: two calls of the printed budget (gpu_prepare.plan)
    """The parts in order of value. ``dry`` shrinks every shape for the CPU, where the limits are 6x as long: a dry
    run proves that each part runs, not how fast (the 2-core CPU may also be busy: at a load of 9, the fused loss's
    dry bench took over 180 s, 105 to 118 s otherwise)."""
    bench = [PY, "-m", "bench", *(["--device", "cpu", "--size", "test", "--budget", "0"] if dry else
                                  ["--device", "cuda", "--size", "gpu"])]
    model = out / "model"
    train = [PY, "-m", "gfpo_fast.train", "--do_eval", "false", "--model_name_or_path", str(model)]
    steps = ["--max_steps", "1" if dry else "6"]
    train += ["--num_generations", "4", "--num_remains_in_group", "2", "--max_completion_length", "8"] if dry else \
        ["--bf16", "true"]
    scale = [PY, "-m", "bench.bench_trainer_scale", "--out", str(out / "train_scale")]
    # The full-logits contender needs a git worktree of its commit: a tree without .git (or git) skips it.
    logits = (ROOT / ".git").exists()
    scale += ["--logits_tree", "auto"] if logits else []
    if dry:
        scale += ["--configs", "2x16", "--vocab", "1000", "--hidden", "32", "--layers", "1", "--prompt", "4",
                  "--contenders", "head,trl" + (",logits" if logits else ""), "--max_gb", "4"]
    else:
        scale += ["--device", "cuda", "--configs", "8x4096,8x16384", "--hidden", "1024", "--layers", "4",
                  "--contenders", "head,head_ckpt,trl,trl_ckpt" + (",logits" if logits else "")]
    slack = 6 if dry else 1
    family = [(f"bench_{f}", [*bench, "--families", f, "--out", str(out / f"bench_{f}")], limit)
              for f, limit in [("logprobs", 90), ("fused_policy_loss", 60), ("fused_linear", 60), ("advantages", 20)]]
    plan = [
        *[Part(name, tuple(command), limit) for name, command, limit in family],
        Part("gpu_tests", (PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"), 40),
        Part("long_sequence", (PY, "-m", "bench.gpu_suite", "--long-sequence", "--dry" if dry else "--no-dry"), 30),
        Part("model", (PY, "-m", "bench.gpu_suite", "--make-model", str(model), "--dry" if dry else "--no-dry"), 30),
        Part("train", (*train, *steps, "--output_dir", str(out / "train")), 40),
        Part("train_liger", (*train, *steps, "--use_liger_kernel", "true", "--output_dir", str(out / "train_liger")),
             40, ("liger_kernel",), "liger-kernel travels as a wheel (--prepare)"),
        Part("vllm", (*train, "--max_steps", "1" if dry else "3", "--generation_backend", "vllm",
                      "--output_dir", str(out / "vllm")), 30, ("vllm",), "vLLM cannot travel (64 MiB a call)"),
        Part("train_scale", tuple(scale), 55),
        Part("verl_trainer", (), 0, (), "not run by this suite: verl's trainer needs Ray and a rollout engine (vLLM), "
             "which cannot travel; its Triton linear_cross_entropy is a peer in bench_fused_linear"),
    ]
    return [Part(p.name, p.command, slack * p.limit, p.needs, p.why) for p in plan]


def long_sequence(dry: bool) -> None:
    """One sequence of L tokens through ``token_logprobs`` and ``fused_policy_loss`` (forward and backward) on the
    Triton backend, then one of another length. Prints the compile count of each; the second must be 0."""
    import torch

    import gfpo_fast as gf
    from gfpo_fast import kernels

    device = "cpu" if dry else "cuda"
    lengths, V, dtype = ((300, 317), 1000, torch.float32) if dry else ((65536, 65519), 151936, torch.bfloat16)

    def compiled() -> int:  # compiled variants held by every JIT kernel of the package (0 under the interpreter)
        count = 0
        for module in vars(kernels).values():
            for obj in vars(module).values() if hasattr(module, "__dict__") else ():
                for caches in getattr(obj, "device_caches", {}).values():
                    count += len(caches[0])
        return count

    for i, L in enumerate(lengths):
        before = compiled()
        logits = torch.randn(1, L, V, device=device, dtype=dtype, requires_grad=True)
        ids = torch.randint(0, V, (1, L), device=device)
        start = time.perf_counter()
        logp = gf.token_logprobs(logits, ids, backend="triton")
        logp.sum().backward()
        loss, _ = gf.fused_policy_loss(logits, ids, None, torch.ones(1, device=device), torch.ones(1, L, device=device),
                                       backend="triton")
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        new = compiled() - before
        print(f"L={L} V={V} {str(dtype).removeprefix('torch.')}: {time.perf_counter() - start:.2f} s, "
              f"finite={bool(torch.isfinite(logits.grad).all())}, new compilations={new}", flush=True)
        if not torch.isfinite(logits.grad).all():
            raise SystemExit("non-finite gradient")
        if i > 0 and new:
            raise SystemExit(f"a new length recompiled {new} kernel(s)")


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of exactly ``vocab_size`` ids with a chat template: the 256 byte symbols (every
    text encodes, one token per byte), three specials (``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn) and
    filler tokens of two or three byte symbols up to ``vocab_size``, which no merge produces but every id decodes."""
    from itertools import product

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(symbols + specials)}
    fillers = (a + b for a, b in product(symbols, repeat=2))
    fillers3 = ("".join(t) for t in product(symbols, repeat=3))
    for token in (t for source in (fillers, fillers3) for t in source):
        if len(vocab) >= vocab_size:
            break
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=specials[0], eos_token=specials[2],
                                        additional_special_tokens=specials[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(path: Path, dry: bool) -> None:
    """Writes a random-weight Qwen2 and its tokenizer to ``path`` (``save_pretrained``, bf16): Qwen2.5-0.5B's shape
    (494M parameters, hidden 896, 24 layers, vocabulary 151,936), or with ``dry`` hidden 64, 2 layers, vocabulary
    1,000 in fp32. Built on the GPU where there is one (seed 0)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = 1000 if dry else 151936
    tokenizer = byte_tokenizer(vocab)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1) if dry else \
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2)
    config = Qwen2Config(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.float32 if dry else torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    print(f"{path}: Qwen2 of {params / 1e6:.1f}M parameters, vocabulary {vocab}, "
          f"{str(next(model.parameters()).dtype).removeprefix('torch.')}, in {time.perf_counter() - start:.1f} s")


def device_slug(dry: bool) -> str:
    if dry:
        return "dry"
    import torch
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


# ----------------------------------------------------------------------------- installing from carried files
def install_commands(wheels: Path, site: Path, repo: Path = ROOT, py: str = PY) -> list[list[str]]:
    """The two pip calls that install, from local files only (``--no-index``) and without their dependencies: every
    wheel in ``wheels`` into ``site``, then ``repo`` (building ``_C`` with the build tools already on the path,
    ``--no-build-isolation``). ``site`` must be first on ``PYTHONPATH`` for the second call."""
    pip = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--upgrade", "--target", str(site)]
    return [[*pip, *sorted(str(w) for w in wheels.glob("*.whl"))], [*pip, "--no-build-isolation", str(repo)]]


def child_env(site: Path | None, dry: bool) -> dict:
    """The parts' environment: offline Hugging Face, ``site`` first on ``PYTHONPATH``, the Triton interpreter when
    ``dry``."""
    env = {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1"}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    if dry:
        env["TRITON_INTERPRET"] = "1"  # the Triton parts run on the CPU interpreter
    return env


def install(wheels: Path, site: Path, log: Path) -> tuple[bool, str]:
    """Runs :func:`install_commands`, logging to ``log``; puts ``site`` first on this process's path.
    Returns ``(ok, last line of the log)``."""
    site.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(site))
    env = child_env(site, dry=False)
    ok = True
    with open(log, "w") as f:
        for command in install_commands(wheels, site):
            f.write("$ " + " ".join(command) + "\n")
            f.flush()
            start = time.perf_counter()
            code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
            f.write(f"exit {code} in {time.perf_counter() - start:.1f} s\n")
            f.flush()
            if code:
                ok = False
                break
    importlib.invalidate_caches()
    return ok, last_line(log)


def versions() -> dict:
    """The versions found on this path: Python, every ``RECORDED`` distribution (None: absent), CUDA and the
    GPU, and ``unmet``: each requirement of an installed distribution among ``RECORDED`` (less ``FILES_ONLY``) that
    the installed set does not satisfy (``--no-deps`` installs check none)."""
    from packaging.requirements import Requirement

    found = {}
    for name in RECORDED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    unmet = []
    for name, version in found.items():
        for spec in (importlib.metadata.requires(name) or []) if version and name not in FILES_ONLY else []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                have = None
            if have is None or not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{name} {version} needs {req}: {have or 'absent'}")
    info = {"python": sys.version.split()[0], "packages": found, "unmet": unmet}
    try:
        import torch

        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError as err:
        info["cuda"] = f"torch does not import: {err}"
    return info


# ----------------------------------------------------------------------------- summary and packing
def last_line(log: Path) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return (text[-1] if text else "").replace("|", "/")[:160]


def write_summary(out: Path, rows: list[dict], header: str, info: dict | None = None) -> None:
    lines = [header, "", "| part | status | seconds | limit | last line |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['status']} | {r['seconds']:.1f} | {r['limit']} | {r['last_line']} |")
    later = [r["part"] for r in rows if r["status"].startswith("not reached")]
    if later:
        lines += ["", f"Not reached within the budget: run them next with `--parts {','.join(later)}`."]
    if info:
        packages = ", ".join(f"{k} {v}" for k, v in info.get("packages", {}).items() if v)
        absent = ", ".join(k for k, v in info.get("packages", {}).items() if not v)
        lines += ["", f"Python {info.get('python')}, CUDA {info.get('cuda')}, GPU {info.get('gpu')}.", "",
                  f"Found: {packages}.", "", f"Absent: {absent or 'none'}."]
        lines += ["", "Unmet requirements (installed with --no-deps):", *[f"- {u}" for u in info["unmet"]]] \
            if info.get("unmet") else []
        partly = [f"{name}: {why}." for name, why in FILES_ONLY.items() if info["packages"].get(name)]
        lines += ["", *partly] if partly else []
    (out / SUMMARY[0]).write_text("\n".join(lines) + "\n")
    (out / SUMMARY[1]).write_text(json.dumps({"header": header, "parts": rows, "environment": info}, indent=1))


def pack(work: Path, dest: Path) -> list[Path]:
    """Copies the summary of ``work`` to ``dest`` beside ``ARCHIVE``: every log and table under ``work`` (suffix in
    ``PACK_SUFFIXES``, at most ``PACK_FILE_LIMIT`` bytes, in no ``PACK_SKIP`` folder). Three files, none in a
    folder; each replaced atomically, so a run killed meanwhile leaves the previous copy. Returns their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for f in sorted(work.rglob("*")):
            rel = f.relative_to(work)
            if (f.is_file() and not f.is_symlink() and f.suffix in PACK_SUFFIXES and not set(rel.parts) & PACK_SKIP
                    and f.stat().st_size <= PACK_FILE_LIMIT):
                tar.add(f, arcname=str(rel))
    written = []
    for name, data in [(ARCHIVE, buffer.getvalue()), *[(s, (work / s).read_bytes()) for s in SUMMARY
                                                        if (work / s).exists()]]:
        tmp = dest / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, dest / name)
        written.append(dest / name)
    return written


def bench_verdict(folder: Path) -> tuple[bool, str] | None:
    """``(ours failed, counts)`` from the table ``python -m bench`` wrote in ``folder``: an ``error`` or ``wrong``
    row of gfpo-fast fails the part (a peer's is only counted); None when no table was written."""
    tables = sorted(folder.glob("*.json"))
    if not tables:
        return None
    rows = json.loads(tables[-1].read_text())["results"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    bad = sorted({f"{r['impl']} {r['status']}" for r in rows if r["status"] in ("error", "wrong")})
    ours = any(r["role"] == "ours" and r["status"] in ("error", "wrong") for r in rows)
    text = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + (f" ({'; '.join(bad)})" if bad else "")
    return ours, text


# ----------------------------------------------------------------------------- the run
def missing_needs(part: Part) -> str | None:
    """Why ``part`` cannot run here (a module it needs is not importable, or it has no command), else None."""
    if not part.command:
        return part.why
    missing = [m for m in part.needs if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed: {part.why}" if missing else None


def run_suite(out: Path, dry: bool, *, wheels: Path | None = None, pack_to: Path | None = None,
              budget: float | None = None, only: list[str] | None = None, commit: str | None = None) -> list[dict]:
    """Runs the parts (those named in ``only``, or all) in order under ``budget`` seconds in all, the install
    included; returns the summary rows. Writes the summary after each part (and packs it to ``pack_to``)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    commit = commit or short_head()
    label = "dry run on the CPU" if dry else device_slug(dry)
    header = (f"# GPU suite ({label})\n\n`python -m bench.gpu_suite {' '.join(sys.argv[1:])}`, commit `{commit}`, "
              f"{datetime.datetime.now():%Y-%m-%d %H:%M}" + (f", budget {budget:.0f} s." if budget else "."))
    rows: list[dict] = []
    site = out / "site" if wheels else None
    info = None

    def record(row: dict) -> None:
        rows.append(row)
        write_summary(out, rows, header, info)
        if pack_to is not None:
            pack(out, pack_to)

    if wheels:
        begun = time.perf_counter()
        ok, last = install(wheels, site, out / "install.log")
        info = versions()
        record({"part": "install", "status": "passed" if ok else "failed", "seconds": time.perf_counter() - begun,
                "limit": 0, "last_line": last})
        if not ok:
            return rows
    env = child_env(site, dry)
    skip = {"train_liger": "liger-kernel runs on CUDA only"} if dry else {}
    for part in parts(out, dry):
        if only is not None and part.name not in only:
            continue
        left = None if budget is None else budget - (time.perf_counter() - start)
        why = skip.get(part.name) or missing_needs(part)
        if why or left is not None and left < min(part.limit, MIN_PART_S):
            status = "skipped" if why else "not reached (budget)"
            record({"part": part.name, "status": status, "seconds": 0.0, "limit": part.limit,
                    "last_line": why or f"{max(left, 0):.0f} s of the budget left"})
            continue
        limit = part.limit if left is None else min(part.limit, left)
        print(f"[gpu_suite] {part.name}: {' '.join(part.command)} (limit {limit:.0f} s)", flush=True)
        begun = time.perf_counter()
        log = out / f"{part.name}.log"
        with open(log, "w") as f:
            try:
                code = subprocess.run(part.command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                      timeout=limit).returncode
                status = "passed" if code == 0 else ("no tests" if part.name == "gpu_tests" and code == 5 else
                                                     f"failed (exit {code})")
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit:.0f} s" + (" (the budget)" if limit < part.limit else "")
        last = last_line(log)
        verdict = bench_verdict(out / part.name) if part.name.startswith("bench_") else None
        if verdict:
            ours_failed, last = verdict[0], "rows: " + verdict[1]
            status = "failed (gfpo-fast rows error or wrong)" if ours_failed and status == "passed" else status
        record({"part": part.name, "status": status, "seconds": time.perf_counter() - begun, "limit": part.limit,
                "last_line": last})
        print(f"[gpu_suite] {part.name}: {status} in {rows[-1]['seconds']:.1f} s", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.splitlines()[0])
    p.add_argument("--prepare", action="store_true", help="here: download the wheels and print the device call")
    p.add_argument("--rehearse", action="store_true", help="here: the dry suite with the lent machine's packages")
    p.add_argument("--dry", action=argparse.BooleanOptionalAction, default=False,
                   help="tiny shapes on the CPU (Triton through its interpreter)")
    p.add_argument("--out", type=Path, default=None, help="work folder (default bench/results/gpu-suite-...)")
    p.add_argument("--install", type=Path, default=None, metavar="WHEELS",
                   help="first install these wheels and this checkout into OUT/site, from local files only")
    p.add_argument("--pack", type=Path, default=None, metavar="DIR",
                   help=f"after each part, copy {', '.join(SUMMARY)} and {ARCHIVE} (logs, tables) to DIR")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run, install included")
    p.add_argument("--parts", default=None, help="comma-separated names of the parts to run (default all); with "
                   "--prepare, of the parts the printed call runs")
    p.add_argument("--commit", default=None, help="the commit to record (default: git's, where there is one)")
    p.add_argument("--long-sequence", action="store_true", help=argparse.SUPPRESS)  # a part, in its own process
    p.add_argument("--make-model", type=Path, default=None, help=argparse.SUPPRESS)  # likewise
    args = p.parse_args(argv)
    if args.long_sequence:
        long_sequence(args.dry)
        return 0
    if args.make_model:
        make_model(args.make_model, args.dry)
        return 0
    only = [s.strip() for s in args.parts.split(",")] if args.parts else None
    unknown = set(only or ()) - {part.name for part in parts(Path("."), args.dry)}
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}")
    if args.prepare or args.rehearse:
        from bench import gpu_prepare

        return gpu_prepare.prepare(only) if args.prepare else gpu_prepare.rehearse()
    if not args.dry:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("python -m bench.gpu_suite needs a CUDA GPU; use --dry for the CPU smoke run")
    out = args.out or RESULTS / f"gpu-suite-{device_slug(args.dry)}-{datetime.date.today()}"
    rows = run_suite(out, args.dry, wheels=args.install, pack_to=args.pack, budget=args.budget, only=only,
                     commit=args.commit)
    failed = [r["part"] for r in rows if r["status"] not in OK]
    print(f"[gpu_suite] {len(rows) - len(failed)}/{len(rows)} parts passed, skipped or not reached; "
          f"summary: {out / SUMMARY[0]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
