"""The loop moves the policy the right way: the tiny model learns to emit 'a' (reward rises ~10x in 15 steps)."""
from __future__ import annotations

import json

import pytest

from gfpo_fast.train import train


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "gfpo"])
def test_reward_rises(make_config, algorithm):
    run = train(make_config(algorithm=algorithm, max_steps=15, num_generations=8, num_remains_in_group=6,
                            per_device_train_batch_size=32, max_completion_length=8, arithmetic_num_train=200,
                            reward_funcs=["reward_fns:count_a"], learning_rate=1e-2, lr_scheduler_type="constant"))
    rewards = [json.loads(line)["reward"] for line in open(run["metrics"])]
    assert sum(rewards[-3:]) / 3 > 3 * max(sum(rewards[:3]) / 3, 0.02), rewards
