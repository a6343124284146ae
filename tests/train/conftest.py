"""Fixtures for the trainer tests: a tiny local model and a fast configuration (CPU, no downloads)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # reward_fns / tiny importable as modules, as users' module:function specs are
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny import make_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def make_config(tiny_model, tmp_path):
    """TrainConfig factory with test-sized defaults: 2 prompts x G=4, completions of <= 6 tokens."""
    from gfpo_fast.train import TrainConfig

    def make(**overrides):
        values = dict(model_name_or_path=str(tiny_model), output_dir=str(tmp_path / "run"), max_steps=2,
                      num_generations=4, num_remains_in_group=2, per_device_train_batch_size=8,
                      max_completion_length=6, temperature=1.0, arithmetic_num_train=40, eval_num_prompts=4,
                      eval_batch_size=4, do_eval=False, reward_funcs=["reward_fns:id_parity"], reward_weights=None,
                      learning_rate=1e-3, save_steps=100,
                      mask_truncated_completions=False)  # the tiny model rarely ends a completion
        values.update(overrides)
        return TrainConfig(**values)

    return make
