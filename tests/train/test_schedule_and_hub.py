"""The learning-rate schedule (transformers' get_scheduler names, the trainer's warm-up numbers) and push_to_hub's
refusal offline."""
from __future__ import annotations

import pytest
import torch

from gfpo_fast.train import TrainConfig
from gfpo_fast.train.config import LR_SCHEDULERS
from gfpo_fast.train.loop import make_scheduler


def lrs(cfg: TrainConfig) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, out = make_scheduler(optimizer, cfg), []
    for _ in range(cfg.max_steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_linear_keeps_the_trainers_warmup_and_transformers_decay():
    """Step s trains at (s + 1) / (W + 1) during the warm-up (never 0), then (N - s) / (N - W)."""
    W, N = 3, 10
    expected = [(s + 1) / (W + 1) if s < W else (N - s) / (N - W) for s in range(N)]
    assert lrs(TrainConfig(warmup_steps=W, max_steps=N, learning_rate=1.0)) == pytest.approx(expected, abs=1e-12)


def test_every_listed_name_is_a_transformers_scheduler_that_builds():
    from transformers import SchedulerType

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    kwargs = {"cosine_with_min_lr": {"min_lr_rate": 0.1}, "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
              "warmup_stable_decay": {"num_decay_steps": 2}}
    for name in LR_SCHEDULERS:
        first = lrs(TrainConfig(lr_scheduler_type=name, lr_scheduler_kwargs=kwargs.get(name), max_steps=6))[0]
        assert first > 0, name


def test_push_to_hub_is_refused_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="push_to_hub=True but Hugging Face offline mode is on"):
        TrainConfig(push_to_hub=True)
