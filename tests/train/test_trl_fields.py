"""Every field of the installed TRL's GRPOConfig is a trainer flag of the same name, or a row of
trl_fields.NOT_FLAGS with its reason; a refused one stops the command line and a YAML config with that reason."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from gfpo_fast.train import TrainConfig, parse_args
from gfpo_fast.train.trl_fields import NOT_FLAGS

trl = pytest.importorskip("trl")
DOCS = Path(__file__).parent.parent.parent / "docs" / "training.md"


def defaults(cls) -> dict:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


def test_every_grpo_config_field_is_a_flag_or_a_listed_refusal():
    trl_fields, flags = defaults(trl.GRPOConfig), {f.name for f in dataclasses.fields(TrainConfig)}
    unaccounted = sorted(set(trl_fields) - flags - set(NOT_FLAGS))
    assert not unaccounted, f"TRL {trl.__version__}'s GRPOConfig fields neither flags nor in trl_fields.NOT_FLAGS"
    assert not set(NOT_FLAGS) - set(trl_fields), "trl_fields.NOT_FLAGS lists fields this TRL does not have"
    assert all(reason for reason, _ in NOT_FLAGS.values())


def test_defaults_that_differ_from_trl_are_listed_in_the_docs():
    trl_defaults, ours = defaults(trl.GRPOConfig), defaults(TrainConfig)
    differ = {n for n in trl_defaults if n in ours and ours[n] != trl_defaults[n]}
    section = DOCS.read_text().split("### Defaults that differ from TRL's", 1)[1].split("\n#", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", section, re.M))
    assert differ and differ == listed


def test_a_refused_field_stops_the_command_line_and_the_yaml_with_its_reason(tmp_path):
    with pytest.raises(ValueError, match="use_vllm=True: .*use --generation_backend vllm"):
        parse_args(["--use_vllm", "true"])
    with pytest.raises(ValueError, match=r"adam_beta1=0.8: .*fused AdamW .*only 0.9"):
        parse_args(["--adam_beta1=0.8"])
    config = tmp_path / "trl.yaml"
    config.write_text("learning_rate: 1.0e-6\nvllm_mode: server\n")
    with pytest.raises(ValueError, match="vllm_mode='server': .*colocated only"):
        parse_args(["--config", str(config)])


def test_a_trl_value_that_describes_this_trainer_is_accepted(tmp_path):
    config = tmp_path / "trl.yaml"
    config.write_text("learning_rate: 1.0e-6\nshuffle_dataset: true\nadam_epsilon: 1.0e-8\n")
    cfg = parse_args(["--config", str(config), "--optim", "adamw_torch_fused", "--use_transformers_paged", "false"])
    assert cfg.learning_rate == 1e-6
    with pytest.raises(SystemExit):  # a name TRL does not have either: argparse's own error
        parse_args(["--adam_beta9", "0.9"])
