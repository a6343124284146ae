"""The GPU suite without a GPU: its dry run, the device call --prepare prints, the offline install, the budget, and
the packing of what comes back, so that a lent GPU is never its first run."""
import json
import re
import shlex
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from bench import gpu_prepare, gpu_suite

NAMES = ["bench_logprobs", "bench_fused_policy_loss", "bench_fused_linear", "bench_advantages", "gpu_tests",
         "long_sequence", "model", "train", "train_liger", "vllm", "train_scale", "verl_trainer"]


DRY_TIMEOUT = 2700  # the dry run's, in seconds


@pytest.mark.slow
def test_gpu_suite_dry_run_passes_every_part(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--dry", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=DRY_TIMEOUT)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads((tmp_path / "summary.json").read_text())["parts"]
    assert [r["part"] for r in rows] == NAMES
    assert all(r["status"] in ("passed", "skipped", "no tests") for r in rows), rows
    assert (tmp_path / "summary.md").read_text().count("| passed |") >= 8


def test_parts_come_in_order_of_value_and_two_calls_hold_them(tmp_path):
    gpu, dry = gpu_suite.parts(tmp_path, dry=False), gpu_suite.parts(tmp_path, dry=True)
    assert [p.name for p in gpu] == [p.name for p in dry] == NAMES
    # the dry run is killed by its part limits before its own timeout (train_liger and vllm are skipped on a CPU)
    assert sum(p.limit for p in dry if p.name not in ("train_liger", "vllm")) < DRY_TIMEOUT
    budget = gpu_prepare.TIMEOUT_S - gpu_prepare.MARGIN_S
    calls = gpu_prepare.plan(budget)
    assert [name for name, _, _ in calls] == NAMES
    assert [name for name, _, call in calls if call is None] == ["vllm", "verl_trainer"]  # neither travels
    assert [name for name, _, call in calls if call == 1][:3] == NAMES[:3]  # the kernel benches come first
    assert max(call or 0 for _, _, call in calls) == 2  # a first call and one --parts call hold the rest
    for n in (1, 2):
        assert gpu_prepare.INSTALL_S + sum(limit for _, limit, call in calls if call == n) <= budget


def test_the_printed_device_call_fits_the_limits():
    call = gpu_prepare.device_call("0123abc+changes", only=NAMES)
    assert len(call["command"]) <= gpu_prepare.COMMAND_LIMIT
    assert call["carry"] == [gpu_prepare.WHEELS] and len(call["carry"]) <= 8
    assert 1 <= call["timeout_s"] <= 600
    start, idle = gpu_prepare.START_S, gpu_prepare.IDLE_S
    assert 2 * (max(start, 120) + call["timeout_s"] + idle) <= 15 * 60  # a second try fits the device time
    words = shlex.split(call["command"].split("python3 -m bench.gpu_suite", 1)[1].replace('"$OUT"', "/out"))
    args = dict(zip(words[::2], words[1::2]))
    assert args["--install"] == gpu_prepare.WHEELS and args["--pack"] == "/out"
    assert float(args["--budget"]) + gpu_prepare.MARGIN_S <= call["timeout_s"]
    assert args["--parts"].split(",") == NAMES  # every name is one the suite knows


def fake_repo(root: Path, tree_bytes: int) -> None:
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / ".gitignore").write_text("/.whl/\n/ignored/\n")
    (root / "tracked.bin").write_bytes(b"x" * tree_bytes)
    (root / "ignored").mkdir()
    (root / "ignored" / "big").write_bytes(b"x" * 4096)
    subprocess.run(["git", "add", ".gitignore", "tracked.bin"], cwd=root, check=True)
    (root / "untracked.txt").write_text("y" * 100)


def test_travel_counts_the_tree_and_the_carried_wheels_not_the_ignored(tmp_path):
    fake_repo(tmp_path, 1000)
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "a-1-py3-none-any.whl").write_bytes(b"w" * 500)
    names = {f.name for f in gpu_prepare.travel_files(tmp_path)}
    assert names == {".gitignore", "tracked.bin", "untracked.txt"}
    assert gpu_prepare.travel_bytes(tmp_path, [".whl"]) == 1000 + 100 + len("/.whl/\n/ignored/\n") + 500


@pytest.mark.parametrize("wheel_mib, fits", [(1, True), (64, False)])
def test_prepare_checks_the_64_mib(tmp_path, monkeypatch, capsys, wheel_mib, fits):
    fake_repo(tmp_path, 1000)

    def fake_download(specs, dest, python_version):  # no network: one sparse wheel of the size asked
        assert python_version == "3.12" and {s.split("==")[0] for s in specs} == set(gpu_prepare.CARRIED)
        dest.mkdir(parents=True, exist_ok=True)
        with open(dest / "big-1-py3-none-any.whl", "wb") as f:
            f.truncate(wheel_mib * 2**20)
        return sorted(dest.glob("*.whl"))

    monkeypatch.setattr(gpu_prepare, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_prepare, "download", fake_download)
    assert gpu_suite.main(["--prepare", "--parts", "train,train_scale"]) == (0 if fits else 1)
    out = capsys.readouterr()
    assert "timeout_s: 300" in out.out and '--parts train,train_scale --pack "$OUT"' in out.out
    assert ("does not fit" in out.err) is not fits


def test_download_keeps_one_version_of_each_name(tmp_path, monkeypatch):
    (tmp_path / "trl-1.15.0-py3-none-any.whl").write_text("old")
    (tmp_path / "dill-0.4.1-py3-none-any.whl").write_text("kept")
    fetched = []

    def fake_run(command, check):
        fetched.append(command[-1])
        name, version = command[-1].split("==")
        (tmp_path / f"{name}-{version}-py3-none-any.whl").write_text("new")

    monkeypatch.setattr(gpu_prepare.subprocess, "run", fake_run)
    wheels = gpu_prepare.download(["trl==1.16.0", "dill==0.4.1"], tmp_path, "3.12")
    assert fetched == ["trl==1.16.0"]
    assert [w.name for w in wheels] == ["dill-0.4.1-py3-none-any.whl", "trl-1.16.0-py3-none-any.whl"]


def test_install_commands_use_local_files_only(tmp_path):
    for name in ("b-1-py3-none-any.whl", "a-1-py3-none-any.whl"):
        (tmp_path / name).write_text("")
    wheels, project = gpu_suite.install_commands(tmp_path, Path("/site"), Path("/repo"), py="python3")
    for command in (wheels, project):
        assert command[:4] == ["python3", "-m", "pip", "install"]
        assert {"--no-index", "--no-deps"} <= set(command)
        assert command[command.index("--target") + 1] == "/site"
    assert wheels[-2:] == [str(tmp_path / "a-1-py3-none-any.whl"), str(tmp_path / "b-1-py3-none-any.whl")]
    assert "--no-build-isolation" in project and project[-1] == "/repo"


def tiny_wheel(folder: Path) -> Path:
    """A pure wheel of one module, ``tinypkg``, made here: no index is needed to install it."""
    path = folder / "tinypkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("tinypkg.py", "VALUE = 7\n")
        z.writestr("tinypkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n"
                   "Requires-Dist: torch>=99\n")
        z.writestr("tinypkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr("tinypkg-1.0.dist-info/RECORD", "")
    return path


def test_the_wheel_install_runs_offline_and_versions_report_unmet_needs(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    tiny_wheel(wheels)
    command = gpu_suite.install_commands(wheels, tmp_path / "site")[0]
    run = subprocess.run(command, capture_output=True, text=True, env={**gpu_suite.child_env(None, False),
                                                                       "PIP_CONFIG_FILE": "/dev/null"})
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "site" / "tinypkg.py").exists()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(gpu_suite, "RECORDED", ("tinypkg", "torch", "no-such-dist"))
    info = gpu_suite.versions()
    assert info["packages"]["tinypkg"] == "1.0" and info["packages"]["no-such-dist"] is None
    assert any(u.startswith("tinypkg 1.0 needs torch>=99") for u in info["unmet"]), info["unmet"]


def test_pack_returns_at_most_8_files_no_weights(tmp_path):
    work, dest = tmp_path / "work", tmp_path / "out"
    for rel, size in [("bench_logprobs.log", 10), ("bench_logprobs/cpu-x.md", 10), ("train/metrics.jsonl", 10),
                      ("train/checkpoints/checkpoint-6/model/tokenizer.json", 10), ("site/trl/x.json", 10),
                      ("model/config.json", 10),
                      ("train/huge.json", gpu_suite.PACK_FILE_LIMIT + 1)]:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(b"x" * size)
    gpu_suite.write_summary(work, [{"part": "p", "status": "passed", "seconds": 1.0, "limit": 5, "last_line": ""}],
                            "# h")
    written = gpu_suite.pack(work, dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in written)
    assert len(written) <= 8 and all(p.is_file() and p.parent == dest for p in written)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in written)
    with tarfile.open(dest / gpu_suite.ARCHIVE) as tar:
        names = set(tar.getnames())
    assert {"bench_logprobs.log", "bench_logprobs/cpu-x.md", "train/metrics.jsonl", "summary.md"} <= names
    assert not any(n.startswith(("site/", "model/", "train/checkpoints/")) or n.endswith("huge.json") for n in names)


def fake_parts(out, dry):
    py = sys.executable
    first = out / "packed" / "summary.json"
    return [
        gpu_suite.Part("first", (py, "-c", "print('one')"), 30),
        # sees the first part's row already packed: a run killed now still returns it
        gpu_suite.Part("second", (py, "-c", f"import json; print(json.load(open({str(first)!r}))['parts'][-1]"
                                            f"['part'])"), 30),
        gpu_suite.Part("needs", (py, "-c", "pass"), 30, ("no_such_module_here",), "it cannot travel"),
        gpu_suite.Part("slow", (py, "-c", "import time; time.sleep(30)"), 30),
        gpu_suite.Part("late", (py, "-c", "pass"), 30),
    ]


def test_budget_cuts_parts_and_what_finished_is_packed_after_each(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "parts", fake_parts)
    monkeypatch.setattr(gpu_suite, "MIN_PART_S", 1.5)
    rows = gpu_suite.run_suite(tmp_path, dry=True, pack_to=tmp_path / "packed", budget=4, commit="abc")
    status = {r["part"]: r["status"] for r in rows}
    assert status["first"] == status["second"] == "passed"
    assert rows[1]["last_line"] == "first"
    assert status["needs"] == "skipped"
    assert rows[2]["last_line"] == "no_such_module_here not installed: it cannot travel"
    assert status["slow"].startswith("timed out after") and status["slow"].endswith("(the budget)")
    assert status["late"] == "not reached (budget)"
    packed = json.loads((tmp_path / "packed" / "summary.json").read_text())
    assert [r["part"] for r in packed["parts"]] == ["first", "second", "needs", "slow", "late"]
    assert "`--parts late`" in (tmp_path / "packed" / "summary.md").read_text()
    only = gpu_suite.run_suite(tmp_path / "again", dry=True, only=["late"], commit="abc")
    assert [r["part"] for r in only] == ["late"]


def test_byte_tokenizer_has_the_vocabulary_and_a_chat_template():
    tok = gpu_suite.byte_tokenizer(1000)
    assert len(tok) == 1000
    text = "Maya has 7 apples. Ünïcode ✓"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert isinstance(tok.decode(list(range(1000))), str)  # every id decodes
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id


def test_the_random_model_loads_through_the_trainer(tmp_path):
    from gfpo_fast.train.models import load_model_and_tokenizer

    gpu_suite.make_model(tmp_path / "m", dry=True)
    model, tok = load_model_and_tokenizer(str(tmp_path / "m"))
    assert model.config.vocab_size == len(tok) == 1000 and model.config.model_type == "qwen2"
    assert model.config.eos_token_id == tok.eos_token_id


def test_a_bench_part_fails_on_an_error_row_of_ours_only(tmp_path):
    assert gpu_suite.bench_verdict(tmp_path) is None  # no table written (a part cut short)
    rows = [{"impl": "torch eager", "role": "peer", "status": "ok"},
            {"impl": "Liger x", "role": "peer", "status": "error"}]
    (tmp_path / "cpu-2026.json").write_text(json.dumps({"results": rows}))
    assert gpu_suite.bench_verdict(tmp_path) == (False, "1 error, 1 ok (Liger x error)")
    rows.append({"impl": "gfpo-fast triton", "role": "ours", "status": "wrong"})
    (tmp_path / "cpu-2026.json").write_text(json.dumps({"results": rows}))
    assert gpu_suite.bench_verdict(tmp_path)[0] is True
