"""Faults and bad input against the trainer on the tiny model: every scenario ends with a clear message or a defined
result, and no checkpoint written before it is lost (the promises of docs/checkpoints.md)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gfpo_fast.train import checkpoint as ckpt
from gfpo_fast.train import parse_args, train
from gfpo_fast.train.__main__ import main
from gfpo_fast.train.loop import NonFiniteError
from gfpo_fast.train.ownership import LOCK

from trainer_runs import read_jsonl, train_rows


def names(run: Path) -> list[str]:
    return sorted((p.name for p in (run / "checkpoints").iterdir()), key=lambda n: (len(n), n))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model" / "model.safetensors")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


# ----------------------------------------------------------------------------- a run owns its output_dir
def test_a_used_output_dir_is_refused_and_keeps_the_earlier_run(make_config, run_dir):
    train(make_config(max_steps=2, save_steps=1))
    before = {n: weights(run_dir / "checkpoints" / n) for n in names(run_dir)}
    metrics = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="holds an earlier run .*--resume_from_checkpoint latest.*"
                                         "--overwrite_output_dir true"):
        train(make_config(max_steps=4, save_steps=1, seed=7))
    assert names(run_dir) == ["checkpoint-1", "checkpoint-2"]
    for n, w in before.items():
        assert all(torch.equal(w[k], v) for k, v in weights(run_dir / "checkpoints" / n).items())
    assert (run_dir / "metrics.jsonl").read_text() == metrics and not (run_dir / LOCK).exists()


def test_overwrite_output_dir_deletes_the_earlier_run_first(make_config, run_dir, capsys):
    train(make_config(max_steps=6, save_steps=2, save_total_limit=2))
    assert names(run_dir) == ["checkpoint-4", "checkpoint-6"]
    summary = train(make_config(max_steps=3, save_steps=1, save_total_limit=2, seed=7, overwrite_output_dir=True))
    assert "deleted the earlier run's checkpoints" in capsys.readouterr().out
    assert names(run_dir) == ["checkpoint-2", "checkpoint-3"]  # the new run's own, none pruned for old ones
    assert Path(summary["checkpoint"]).is_dir()
    assert [r["step"] for r in train_rows(read_jsonl(run_dir / "metrics.jsonl"))] == [1, 2, 3]


def test_pruning_removes_only_this_runs_checkpoints(make_config, run_dir):
    train(make_config(max_steps=2, save_steps=1, save_total_limit=5))
    foreign = run_dir / "checkpoints" / "checkpoint-1"
    manifest = json.loads((foreign / ckpt.MANIFEST).read_text())
    (foreign / ckpt.MANIFEST).write_text(json.dumps({**manifest, "run_id": "another-run"}))
    train(make_config(max_steps=4, save_steps=1, save_total_limit=1, resume_from_checkpoint="latest"))
    assert names(run_dir) == ["checkpoint-1", "checkpoint-4"]


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_holds_it(make_config, run_dir):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir.mkdir()
        (run_dir / LOCK).write_text(f"{os.uname().nodename} {holder.pid}\n")
        with pytest.raises(ValueError, match=f"is in use by another run \\(process {holder.pid}"):
            train(make_config())
        assert (run_dir / LOCK).exists() and not (run_dir / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    train(make_config())  # the holder is gone: its lock is stale and reclaimed
    assert not (run_dir / LOCK).exists()


def test_two_runs_at_once_one_is_refused(tiny_model, run_dir):
    flags = ["--model_name_or_path", str(tiny_model), "--output_dir", str(run_dir), "--max_steps", "3",
             "--num_generations", "4", "--per_device_train_batch_size", "8", "--max_completion_length", "6",
             "--arithmetic_num_train", "40", "--do_eval", "false", "--reward_funcs", "reward_fns:id_parity",
             "--reward_weights", "1.0"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent.parent),
                                                       str(Path(__file__).parent)]), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "gfpo_fast.train", *flags], env=env, stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    assert any("is in use by another run" in err for _, err in results)
    assert [r["step"] for r in train_rows(read_jsonl(run_dir / "metrics.jsonl"))] == [1, 2, 3]


# ----------------------------------------------------------------------------- nothing non-finite is applied or saved
def test_a_nan_gradient_is_skipped_and_stops_the_run_keeping_the_last_good_checkpoint(make_config, run_dir):
    with pytest.raises(NonFiniteError, match="NaN or inf for 2 steps in a row .*checkpoint-1"):
        train(make_config(max_steps=8, save_steps=1, save_total_limit=1, learning_rate=1e6, max_nonfinite_steps=2))
    rows = train_rows(read_jsonl(run_dir / "metrics.jsonl"))
    skipped = [r["step"] for r in rows if r["update_skipped"]]
    assert skipped and skipped == list(range(skipped[0], rows[-1]["step"] + 1)) and len(skipped) == 2
    assert all(math.isfinite(r["grad_norm"]) for r in rows if not r["update_skipped"])
    last_good = f"checkpoint-{skipped[0] - 1}"
    assert last_good in names(run_dir)  # never pruned, although save_total_limit is 1
    for n in names(run_dir):
        assert all(torch.isfinite(v).all() for v in weights(run_dir / "checkpoints" / n).values())


def test_a_non_finite_loss_skips_the_update(make_config, run_dir, monkeypatch):
    """The loss is NaN from the second step on while its gradients stay finite: the loss alone decides."""
    import gfpo_fast.train.loop as loop

    original, calls = loop.accumulate_gradients, []

    def nan_loss_from_step_2(*args, **kwargs):
        loss, metrics = original(*args, **kwargs)
        calls.append(1)
        return (loss * math.nan if len(calls) >= 2 else loss), metrics

    monkeypatch.setattr(loop, "accumulate_gradients", nan_loss_from_step_2)
    with pytest.raises(NonFiniteError, match="3 steps in a row"):
        train(make_config(max_steps=6, save_steps=1))
    rows = train_rows(read_jsonl(run_dir / "metrics.jsonl"))
    assert [r["update_skipped"] for r in rows] == [0, 1, 1, 1]
    assert all(math.isfinite(r["grad_norm"]) for r in rows)
    # checkpoint-1 is protected; the later one holds the same weights: no update was applied after step 1
    first = weights(run_dir / "checkpoints" / "checkpoint-1")
    later = weights(run_dir / "checkpoints" / names(run_dir)[-1])
    assert names(run_dir)[-1] == "checkpoint-3"
    assert all(torch.equal(first[k], v) for k, v in later.items())


def test_rewards_that_are_all_none_are_reported_and_count_as_no_signal(make_config, run_dir, capsys):
    train(make_config(max_steps=2, reward_funcs=["reward_fns:all_none"]))
    for r in train_rows(read_jsonl(run_dir / "metrics.jsonl")):
        assert r["frac_reward_missing"] == 1.0 and r["frac_reward_zero_std"] == 1.0
        assert math.isnan(r["reward"]) and r["loss"] == 0.0
    assert "no reward function scored any completion" in capsys.readouterr().out


# ----------------------------------------------------------------------------- config parsed strictly, checked early
def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_yaml_goes_through_the_command_line_parser(tmp_path):
    cfg = parse_args(["--config", write(tmp_path / "a.yaml", 'mask_truncated_completions: "false"\n'
                                                              "learning_rate: 1e-4\nreward_weights: [1, '2e-1']\n"
                                                              "reward_funcs: [accuracy, format]\n")])
    assert cfg.mask_truncated_completions is False and cfg.learning_rate == 1e-4
    assert cfg.reward_weights == [1.0, 0.2]
    with pytest.raises(ValueError, match="b.yaml: mask_truncated_completions: cannot read 'maybe'"):
        parse_args(["--config", write(tmp_path / "b.yaml", "mask_truncated_completions: maybe\n")])
    with pytest.raises(ValueError, match="(?s)c.yaml: not valid YAML.*in .*c.yaml\", line 1"):
        parse_args(["--config", write(tmp_path / "c.yaml", "max_steps: [1\n")])
    with pytest.raises(ValueError, match="max_steps must be an integer, got True"):
        parse_args(["--config", write(tmp_path / "d.yaml", "max_steps: true\n")])


@pytest.mark.parametrize("flags, message", [
    (["--loss_type", "ppo"], "loss_type must be one of"),
    (["--importance_sampling_level", "seq"], "importance_sampling_level must be one of"),
    (["--epsilon=-0.2"], "epsilon must be >= 0"),
    (["--top_k=-5"], "top_k must be an integer >= 0"),
    (["--warmup_steps=-1"], "warmup_steps must be an integer >= 0"),
    (["--max_grad_norm=-1"], "max_grad_norm must be a finite number >= 0"),
    (["--output_dir", ""], "output_dir must be a non-empty path"),
    (["--top_p", "0"], "top_p must be in \\(0, 1\\]"),
    (["--overwrite_output_dir", "true", "--resume_from_checkpoint", "latest"], "choose one"),
])
def test_out_of_range_values_are_refused_when_parsed(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_args(flags)


@pytest.mark.parametrize("overrides, message", [
    (dict(reward_funcs=["accuracy"]), "reward function 'accuracy' needs the column 'answer' in every row of the "
                                      "train rows"),
    (dict(reward_funcs=["reward_fns:needs_difficulty"]), "'needs_difficulty' needs the column 'difficulty'"),
    (dict(lr_scheduler_kwargs={"nope": 1}), "lr_scheduler_kwargs=\\{'nope': 1\\} do not fit"),
])
def test_data_and_schedule_checks_run_before_the_model_loads(make_config, tmp_path, monkeypatch, overrides, message):
    import gfpo_fast.train.loop as loop

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the check")

    monkeypatch.setattr(loop, "load_policy", no_model)
    data = write(tmp_path / "d.jsonl", "".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(4)))
    with pytest.raises(ValueError, match=message):
        train(make_config(dataset_name=data, reward_weights=None, **overrides))


# ----------------------------------------------------------------------------- data checked before step 1
def prompts_file(tmp_path: Path, prompts: list[str]) -> str:
    return write(tmp_path / "p.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


@pytest.mark.parametrize("bad, found", [("", "1 empty \\(first: row 2\\)"),
                                        ("x" * 600, "1 longer than 506 tokens, the model's context of 512")])
def test_bad_prompts_are_refused_or_handled_before_step_1(make_config, tmp_path, run_dir, capsys, bad, found):
    data = prompts_file(tmp_path, ["2+2=", "3+1=", bad, "1+1="])
    with pytest.raises(ValueError, match=f"train prompts: {found}.*; fix the data, or pass --invalid_prompts drop"):
        train(make_config(dataset_name=data))
    assert not (run_dir / "metrics.jsonl").exists()
    action = "drop" if bad == "" else "truncate"
    train(make_config(dataset_name=data, invalid_prompts=action, overwrite_output_dir=True))
    assert ("(3 of 4 kept)" if action == "drop" else "(4 of 4 kept)") in capsys.readouterr().out
    assert len(train_rows(read_jsonl(run_dir / "metrics.jsonl"))) == 2


def test_a_malformed_jsonl_line_is_named(make_config, tmp_path):
    data = write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="bad.jsonl:4: not a JSON object"):
        train(make_config(dataset_name=data))


# ----------------------------------------------------------------------------- checkpoints fail over
def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])


def flip_a_byte(file: Path) -> None:
    """Inverts one byte in the middle of ``file``: the same size, other content (in model.safetensors: a weight)."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged, damage, message", [
    ("model/model.safetensors", truncate, ": .* bytes, written with .*truncated or damaged"),
    ("trainer_state.pt", truncate, ": .* bytes, written with .*truncated or damaged"),
    ("optimizer/__0_0.distcp", truncate, ": .* bytes, written with .*truncated or damaged"),
    ("model/model.safetensors", flip_a_byte, ": content changed since it was written \\(sha256 .*damaged\\)"),
    ("trainer_state.pt", flip_a_byte, ": content changed since it was written \\(sha256 .*damaged\\)"),
], ids=["truncated-model", "truncated-state", "truncated-optimizer", "flipped-model", "flipped-state"])
def test_latest_skips_a_damaged_checkpoint_and_names_the_file(make_config, run_dir, capsys, damaged, damage, message):
    train(make_config(max_steps=2, save_steps=1))
    newest = run_dir / "checkpoints" / "checkpoint-2"
    file = newest / damaged
    size = file.stat().st_size
    damage(file)
    assert damage is truncate or file.stat().st_size == size
    with pytest.raises(ValueError, match=f"{file}{message}"):
        train(make_config(max_steps=3, resume_from_checkpoint=str(newest)))
    summary = train(make_config(max_steps=3, save_steps=1, resume_from_checkpoint="latest"))
    out = capsys.readouterr().out
    assert f"skipped checkpoint-2: {file}" in out
    assert summary["step"] == 3 and [r["step"] for r in train_rows(read_jsonl(run_dir / "metrics.jsonl"))] == [1, 2, 3]
    assert names(run_dir) == ["checkpoint-2", "checkpoint-3"]  # the damaged one replaced by an intact one
    assert all(ckpt.verify(run_dir / "checkpoints" / n) is None for n in names(run_dir))


def test_a_checkpoint_without_checksums_loads_checked_by_size(make_config, run_dir, capsys):
    """A manifest of an older gfpo-fast has sizes only: the resume goes on, and says once that it checked sizes."""
    train(make_config(max_steps=1, save_steps=1))
    old = run_dir / "checkpoints" / "checkpoint-1"
    manifest = json.loads((old / ckpt.MANIFEST).read_text())
    assert set(manifest["sha256"]) == set(manifest["files"])  # every file has its checksum
    del manifest["sha256"]
    (old / ckpt.MANIFEST).write_text(json.dumps(manifest))
    summary = train(make_config(max_steps=2, resume_from_checkpoint="latest"))
    assert summary["step"] == 2
    assert capsys.readouterr().out.count("checkpoint-1 has no checksums (written by an older gfpo-fast): its files "
                                         "were checked by size only") == 1


def test_an_algorithm_change_on_resume_is_refused(make_config):
    train(make_config(max_steps=1))
    with pytest.raises(ValueError, match="written with algorithm='grpo' \\(this run: 'gfpo'\\)"):
        train(make_config(max_steps=2, algorithm="gfpo", resume_from_checkpoint="latest"))


def test_a_partial_checkpoint_is_cleaned_up_on_the_next_start(make_config, run_dir, monkeypatch, capsys):
    import gfpo_fast.train.checkpoint as module

    original = module.torch.save

    def disk_full_at_step_2(obj, path, *args, **kwargs):
        if "checkpoint-2.tmp" in str(path) and "trainer_state" in str(path):
            raise OSError(28, "No space left on device")
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(module.torch, "save", disk_full_at_step_2)
    with pytest.raises(OSError, match="No space left"):
        train(make_config(max_steps=3, save_steps=1))
    assert names(run_dir) == ["checkpoint-1"]  # the failed save left nothing behind
    monkeypatch.undo()
    shutil.copytree(run_dir / "checkpoints" / "checkpoint-1", run_dir / "checkpoints" / "checkpoint-2.tmp")
    summary = train(make_config(max_steps=3, save_steps=1, resume_from_checkpoint="latest"))
    assert "removed" in capsys.readouterr().out and summary["step"] == 3
    assert names(run_dir) == ["checkpoint-2", "checkpoint-3"]


# ----------------------------------------------------------------------------- the command
def test_sigint_saves_and_exits_non_zero(tiny_model, run_dir, capsys):
    rc = main(["--model_name_or_path", str(tiny_model), "--output_dir", str(run_dir), "--max_steps", "5",
               "--num_generations", "4", "--per_device_train_batch_size", "8", "--max_completion_length", "6",
               "--arithmetic_num_train", "40", "--do_eval", "false", "--reward_funcs", "reward_fns:sigint_at_step_1",
               "--reward_weights", "1.0"])
    assert rc == 130 and "resume with --resume_from_checkpoint" in capsys.readouterr().out
    assert names(run_dir) == ["checkpoint-2"]


def test_a_model_folder_without_a_tokenizer_says_so(make_config, tiny_model, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*", "chat_template*"))
    with pytest.raises(ValueError, match="could not load a tokenizer from .*bare: it has no tokenizer files"):
        train(make_config(model_name_or_path=str(bare)))
