"""Unit tests of the trainer's parts: CLI/YAML config, rewards, data, generation masks (the GFPO group filter:
tests/test_group_filter.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from gfpo_fast.train import TrainConfig, parse_args
from gfpo_fast.train.data import PromptSampler, arithmetic_dataset, check_prompts, load_split
from gfpo_fast.train.generation import completion_masks
from gfpo_fast.train.rewards import accuracy_reward, final_answer, format_reward

ROOT = Path(__file__).resolve().parents[2]


def test_cli_overrides_yaml(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("algorithm: grpo\nlearning_rate: 3.0e-5\nreward_funcs: [accuracy]\nreward_weights: null\n")
    cfg = parse_args(["--config", str(cfg_file), "--learning_rate", "1e-4", "--bf16", "false", "--epsilon", "none"])
    assert (cfg.algorithm, cfg.learning_rate, cfg.reward_funcs, cfg.bf16, cfg.epsilon) == (
        "grpo", 1e-4, ["accuracy"], False, None)
    cfg_file.write_text("learning_rat: 1\n")
    with pytest.raises(ValueError, match="unknown fields \\['learning_rat'\\]"):
        parse_args(["--config", str(cfg_file)])


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse(path):
    """Every examples/*.yaml is a valid config (known fields, values the checks accept), taken as written."""
    cfg = parse_args(["--config", str(path)])
    written = yaml.safe_load(path.read_text())
    assert {k: getattr(cfg, k) for k in written} == written


@pytest.mark.parametrize("flags, split", [
    ([], (128, 128)),  # the embedded default evaluates all 128 held-out prompts
    (["--max_steps", "100"], (128, 128)),
    (["--max_steps", "20"], (128, 64)),  # shorter runs evaluate in proportion ...
    (["--max_steps", "2"], (128, 16)),  # ... and at least 16, from the same held-out split
    (["--max_steps", "2", "--eval_num_prompts", "128"], (128, 128)),  # an explicit count is exact
    (["--eval_num_prompts", "4"], (4, 4)),
])
def test_eval_split_scales_with_max_steps(flags, split):
    assert parse_args(flags).eval_split() == split


def test_eval_num_prompts_is_checked():
    with pytest.raises(ValueError, match="eval_num_prompts must be None or an integer >= 1"):
        parse_args(["--eval_num_prompts", "0"])


@pytest.mark.parametrize("text, answer", [
    ("5 + 2 = 7 pencils.", 7.0), ("The answer is \\boxed{1,204} (not 3)", 1204.0), ("no number", None),
    ("It is 12.0", 12.0), ("from 9 to -3", -3.0),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_accuracy_and_format_rewards():
    completions = [[{"role": "assistant", "content": "5 + 2 = 7"}], [{"role": "assistant", "content": "7 apples left"}]]
    assert accuracy_reward(completions, answer=["7", "7"]) == [1.0, 1.0]
    assert format_reward(completions) == [1.0, 0.0]


def test_arithmetic_split_is_disjoint_and_seeded():
    train, evals = arithmetic_dataset(200, 64)
    assert not {r["question"] for r in train} & {r["question"] for r in evals}
    assert arithmetic_dataset(200, 64)[1] == evals
    assert all(0 <= int(r["answer"]) <= 18 for r in train)


def test_local_formats(tmp_path):
    rows = [{"prompt": "2+2=", "answer": "4"}, {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "d.csv").write_text("prompt,answer\n2+2=,4\n")
    assert load_split(str(tmp_path / "d.jsonl")) == rows == load_split(str(tmp_path / "d.json"))
    assert load_split(str(tmp_path / "d.csv")) == [{"prompt": "2+2=", "answer": "4"}]
    with pytest.raises(ValueError, match="must be a string or a list of"):
        check_prompts([{"prompt": 3}], "x")


def test_sampler_resumes_mid_epoch():
    a = PromptSampler(5, seed=0)
    first = a.next(3)
    b = PromptSampler(5, seed=0)
    b.load_state_dict(a.state_dict())
    assert a.next(9) == b.next(9) and sorted(first + PromptSampler(5, 0).next(5)[3:]) == [0, 1, 2, 3, 4]


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [3, 9, 2, 0]])
    mask, truncated = completion_masks(ids, [2, 9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, True, False]
    assert not math.isnan(float(mask.sum()))


def test_no_signal_warning(tmp_path, capsys):
    from accelerate import Accelerator

    from gfpo_fast.train import TrainConfig
    from gfpo_fast.train.reporting import ZERO_STD_PATIENCE, Reporter

    rep = Reporter(TrainConfig(output_dir=str(tmp_path), max_steps=20), Accelerator(cpu=True), 0)
    base = {"reward": 0.0, "loss": 0.0, "completions/mean_length": 5.0, "completions/kept_fraction": 1.0,
            "tokens_per_s": 1.0, "completions/clipped_ratio": 0.5, "frac_reward_missing": 0.0}
    for step in range(1, ZERO_STD_PATIENCE + 1):
        rep.log({**base, "step": step, "frac_reward_zero_std": 0.9})
    rep.close()
    out = capsys.readouterr()
    assert "no learning signal" in out.out + out.err and "raise num_generations, temperature" in out.out + out.err
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == ZERO_STD_PATIENCE
    assert rep.plot().is_file()


def test_compare_seed_means_average_scalar_columns_only():
    from gfpo_fast.train.compare import seed_means

    rows = {f"grpo seed {s}": {"s_per_step": float(s), "length_per_step": [1.0, 2.0]} for s in (1, 3)}
    assert seed_means(rows, ["grpo"], [1, 3]) == {"grpo mean of 2 seeds": {"s_per_step": 2.0}}
    assert seed_means(rows, ["grpo"], [1]) == {}


def test_loss_flags_come_from_the_loss_registry():
    """--loss_type takes every registered loss type, each registered hyperparameter is a flag with the loss op's
    default that reaches the loss keywords, and a bad one stops the config before anything loads."""
    from gfpo_fast.policy_loss import LOSS_PARAMS, LOSS_TYPES

    assert LOSS_PARAMS and all(getattr(TrainConfig(), p.name) == p.default for p in LOSS_PARAMS)
    for name in LOSS_TYPES:
        assert parse_args(["--loss_type", name]).loss_kwargs(1)["loss_type"] == name
    first = LOSS_PARAMS[0].name
    assert parse_args([f"--{first}", "2.5"]).loss_kwargs(2)[first] == 2.5
    with pytest.raises(ValueError, match="loss_type"):
        parse_args(["--loss_type", "ppo"])
    with pytest.raises(ValueError, match="sapo_temperature_pos"):
        parse_args(["--sapo_temperature_pos", "0"])
    with pytest.raises(ValueError, match="importance_sampling_level='sequence'"):
        parse_args(["--loss_type", "gpg", "--algorithm", "gspo"])
