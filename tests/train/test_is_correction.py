"""vLLM's importance-sampling correction (TRL's four modes, both bounds), TRL's off-policy sequence mask, and their
flags: hand-computed numbers for the pure functions, the refusals before anything loads, and the mask reaching the
loss in a trainer run (the vLLM runs themselves are in test_vllm.py, on the vllm-cpu job)."""
from __future__ import annotations

import math

import pytest
import torch

import gfpo_fast as gf
from gfpo_fast.policy_loss import high_entropy_mask
from gfpo_fast.train import parse_args, train
from gfpo_fast.train.generation import IS_MODES, importance_ratio, off_policy_mask, sync_check

from trainer_runs import read_jsonl, train_rows

E = math.e
# per-token log-ratio train - sampling: row 0 (+0.1, -0.2, +0.3), row 1 (+2.0, 0, padding whose 9.0 is masked)
TRAIN = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
SAMPLING = TRAIN - torch.tensor([[0.1, -0.2, 0.3], [2.0, 0.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
TOKEN = [[E ** 0.1, E ** -0.2, E ** 0.3], [E ** 2, 1.0, 1.0]]  # padding: ratio exactly 1
SEQUENCE = [[E ** 0.2], [E ** 2]]


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("mode, expected, outside", [
    ("token_truncate", [[E ** 0.1, 0.9, E ** 0.3], [3.0, 1.0, 1.0]], [[0, 1, 0], [1, 0, 0]]),
    ("token_mask", [[E ** 0.1, 0.0, E ** 0.3], [0.0, 1.0, 1.0]], [[0, 1, 0], [1, 0, 0]]),
    ("sequence_truncate", [[E ** 0.2], [3.0]], [[0], [1]]),
    ("sequence_mask", [[E ** 0.2], [0.0]], [[0], [1]]),
])
def test_each_mode_by_hand_with_both_bounds(mode, expected, outside):
    ratio, out = importance_ratio(TRAIN, SAMPLING, MASK, mode=mode, clip_min=0.9, clip_max=3.0)
    assert ratio.dtype == torch.float32 and ratio.shape == (2, 3 if IS_MODES[mode].per_token else 1)
    close(ratio, expected)
    assert out.int().tolist() == outside


def test_unbounded_sides_and_the_lower_bound_alone():
    for mode, raw in (("token_mask", TOKEN), ("sequence_mask", SEQUENCE)):  # no bounds: the raw ratio
        ratio, out = importance_ratio(TRAIN, SAMPLING, MASK, mode=mode, clip_min=None, clip_max=None)
        close(ratio, raw)
        assert not out.any()
    ratio, _ = importance_ratio(TRAIN, SAMPLING, MASK, mode="sequence_mask", clip_min=1.5, clip_max=None)
    close(ratio, [[0.0], [E ** 2]])
    ratio, _ = importance_ratio(TRAIN, SAMPLING, MASK, mode="sequence_truncate", clip_min=1.5, clip_max=None)
    close(ratio, [[1.5], [E ** 2]])
    # as in TRL the bounds apply to padding too: a lower bound above 1 zeroes its ratio of 1 in a token mode
    ratio, _ = importance_ratio(TRAIN, SAMPLING, MASK, mode="token_mask", clip_min=1.05, clip_max=None)
    close(ratio, [[E ** 0.1, 0.0, E ** 0.3], [E ** 2, 0.0, 0.0]])


def test_a_token_the_engine_could_not_score_counts_as_ratio_one():
    sampling = SAMPLING.clone()
    sampling[0, 1] = float("nan")
    ratio, _ = importance_ratio(TRAIN, sampling, MASK, mode="token_truncate", clip_min=None, clip_max=3.0)
    close(ratio[0], [E ** 0.1, 1.0, E ** 0.3])
    check = sync_check(TRAIN, sampling, MASK, mode="sequence_mask")
    assert check.is_ratio[0].item() == pytest.approx(E ** 0.4, rel=1e-6) and math.isfinite(
        check.metrics["vllm/logp_gap_mean"])


def test_sync_check_metrics_per_mode_and_without_the_correction():
    tokens = sync_check(TRAIN, SAMPLING, MASK, mode="token_truncate", clip_min=0.9, clip_max=3.0)
    assert tokens.metrics["vllm/logp_gap_max"] == pytest.approx(2.0)
    assert tokens.metrics["vllm/logp_gap_mean"] == pytest.approx(2.6 / 5)  # over the 5 loss tokens
    assert tokens.metrics["vllm/is_ratio_min"] == pytest.approx(0.9)  # over loss tokens: padding's 1 left out
    assert tokens.metrics["vllm/is_ratio_max"] == pytest.approx(3.0)
    assert tokens.metrics["vllm/is_ratio_mean"] == pytest.approx((E ** 0.1 + 0.9 + E ** 0.3 + 3.0 + 1.0) / 5)
    assert tokens.metrics["vllm/is_ratio_outside"] == pytest.approx(2 / 5)
    rows = sync_check(TRAIN, SAMPLING, MASK, mode="sequence_mask", clip_min=0.9, clip_max=3.0)
    assert rows.metrics["vllm/is_ratio_min"] == 0.0 and rows.metrics["vllm/is_ratio_outside"] == 0.5
    assert rows.metrics["vllm/is_ratio_max"] == pytest.approx(E ** 0.2)
    off = sync_check(TRAIN, SAMPLING, MASK, mode=None)
    assert off.is_ratio is None and set(off.metrics) == {"vllm/logp_gap_max", "vllm/logp_gap_mean"}


def test_off_policy_mask_by_hand():
    logp = torch.zeros(4, 2)
    sampling = torch.tensor([[0.4, 0.8], [0.2, 0.2], [1.0, 1.0], [0.6, 99.0]])  # mean KL 0.6, 0.2, 1.0, 0.6
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]])  # row 3: the 99 is padding
    advantages = torch.tensor([-1.0, -1.0, 0.5, 0.0])
    keep = off_policy_mask(advantages, logp, sampling, mask, threshold=0.5)
    assert keep.dtype == torch.float32 and keep.tolist() == [[0.0], [1.0], [1.0], [1.0]]
    # far off but a positive (or zero) advantage: kept; negative and far off: dropped
    negative = torch.tensor([-1.0, -1.0, -0.5, -2.0])
    assert off_policy_mask(negative, logp, sampling, mask, threshold=0.5).tolist() == [[0.0], [1.0], [0.0], [0.0]]
    assert off_policy_mask(negative, logp, sampling, mask, threshold=1.0).tolist() == [[1.0]] * 4  # KL <= threshold


def test_off_policy_mask_is_trls():
    trl = pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    logp, sampling = -torch.rand(16, 7, generator=g) * 3, -torch.rand(16, 7, generator=g) * 3
    sampling[2, 1] = float("nan")  # unscored token: no divergence evidence
    mask = (torch.rand(16, 7, generator=g) > 0.2).float()
    advantages = torch.randn(16, generator=g)
    for threshold in (0.0, 0.3, 1.0):
        theirs = trl.GRPOTrainer.get_off_policy_mask(advantages[:, None], logp, sampling, mask, threshold)
        assert torch.equal(off_policy_mask(advantages, logp, sampling, mask, threshold), theirs)


@pytest.mark.parametrize("argv, message", [
    (["--generation_backend", "vllm", "--vllm_importance_sampling_mode", "token"], "must be one of"),
    (["--generation_backend", "vllm", "--vllm_importance_sampling_clip_max", "0"], "clip_max must be None or a finite"),
    (["--generation_backend", "vllm", "--vllm_importance_sampling_clip_min", "-1"], "clip_min must be None or"),
    (["--generation_backend", "vllm", "--vllm_importance_sampling_clip_min", "3.0"], r"clip_min \(3.0\) must be less"),
    (["--generation_backend", "vllm", "--vllm_importance_sampling_mode", "sequence_truncate",
      "--vllm_importance_sampling_clip_max", "None"], "set vllm_importance_sampling_clip_min or _clip_max"),
    (["--off_policy_mask_threshold", "-0.1"], "off_policy_mask_threshold must be None or a finite number >= 0"),
    (["--vllm_importance_sampling_mode", "token_mask"], "only applies with generation_backend='vllm'"),
    (["--vllm_importance_sampling_correction", "false"], "only applies with generation_backend='vllm'"),
    (["--vllm_importance_sampling_cap", "2"], "clip_max=2.0: .*only applies with generation_backend='vllm'"),
    (["--generation_backend", "vllm", "--loss_type", "vespo"], "vespo.*'token_truncate' or 'token_mask'"),
    (["--generation_backend", "vllm", "--algorithm", "gmpo"], "gmpo.*vllm_importance_sampling_correction=false"),
    (["--algorithm", "gmpo", "--off_policy_mask_threshold", "0.5"], "off_policy_mask_threshold with algorithm='gmpo'"),
    (["--generation_backend", "vllm", "--vllm_importance_sampling_cap", "2", "--vllm_importance_sampling_clip_max",
      "4"], "deprecated name"),
    (["--generation_backend", "vllm", "--generation_kwargs", '{"max_tokens": 4, "seed": 1}'],
     r"generation_kwargs \['max_tokens'\]: the trainer sets these itself"),
    (["--generation_kwargs", '{"max_new_tokens": 4}'], r"\['max_new_tokens'\]: the trainer sets"),
])
def test_bad_correction_flags_are_refused_before_anything_loads(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_the_deprecated_cap_sets_clip_max_and_a_token_mode_lets_vespo_run():
    cfg = parse_args(["--generation_backend", "vllm", "--vllm_importance_sampling_cap", "2"])
    assert cfg.vllm_importance_sampling_clip_max == 2.0 and cfg.vllm_importance_sampling_cap == 2.0  # as TRL
    assert parse_args(["--vllm_importance_sampling_cap", "3.0"]).vllm_importance_sampling_clip_max == 3.0
    cfg = parse_args(["--generation_backend", "vllm", "--loss_type", "vespo", "--vllm_importance_sampling_mode",
                      "token_mask"])
    assert cfg.vllm_importance_sampling_mode == "token_mask"
    parse_args(["--generation_backend", "vllm", "--algorithm", "gmpo", "--vllm_importance_sampling_correction",
                "false"])


def test_off_policy_mask_reaches_the_loss_on_off_policy_steps(make_config, monkeypatch):
    """transformers sampling, steps_per_generation=2: step 1 is on the old policy (nothing masked), step 2's loss
    mask is the off-policy mask recomputed from the moved policy, 0 exactly on the negative-advantage rows beyond the
    threshold; the importance-sampling ratio stays None (no vLLM)."""
    calls, original = [], gf.fused_linear_policy_loss

    def spy(hidden, **kwargs):
        head = {k: kwargs[k] for k in ("weight", "bias", "scale", "softcap") if k in kwargs}
        logp = gf.fused_linear_logprobs(hidden.detach(), token_ids=kwargs["token_ids"],
                                        temperature=kwargs["temperature"], **head)
        expected = off_policy_mask(kwargs["advantages"], logp, kwargs["old_logp"], kwargs["mask"], 1e-3)
        assert kwargs["importance_sampling_ratio"] is None
        calls.append((kwargs["loss_mask"], expected.expand(kwargs["mask"].shape), kwargs["advantages"]))
        return original(hidden, **kwargs)

    monkeypatch.setattr(gf, "fused_linear_policy_loss", spy)
    summary = train(make_config(steps_per_generation=2, max_steps=2, learning_rate=3e-2, algorithm="grpo",
                                loss_type="dapo", off_policy_mask_threshold=1e-3))
    (first, _, _), (second, expected, advantages) = calls
    assert torch.equal(first, torch.ones_like(first))
    assert torch.equal(second, expected)
    dropped = second[:, 0] == 0
    assert 0 < int(dropped.sum()) <= int((advantages < 0).sum()) and bool((advantages[dropped] < 0).all())
    (row,) = train_rows(read_jsonl(summary["metrics"]))
    assert row["off_policy/masked_fraction"] == pytest.approx(float(dropped.float().mean()))  # the last step's


def test_off_policy_mask_and_entropy_mask_multiply_under_vespo(make_config, monkeypatch):
    """With top_entropy_quantile as well, the loss mask is the product of both masks; under vespo too (TRL masks
    its policy term; the importance-sampling ratio, when there is one, stays inside vespo's weight)."""
    seen, original = [], gf.fused_linear_policy_loss

    def spy(hidden, **kwargs):
        head = {k: kwargs[k] for k in ("weight", "bias", "scale", "softcap") if k in kwargs}
        logp, entropy = gf.fused_linear_logprobs(hidden.detach(), token_ids=kwargs["token_ids"],
                                                 temperature=kwargs["temperature"], return_entropy=True, **head)
        keep = off_policy_mask(kwargs["advantages"], logp, kwargs["old_logp"], kwargs["mask"], 1e-3)
        seen.append((kwargs["loss_mask"], keep * high_entropy_mask(entropy, kwargs["mask"], 0.5), keep))
        return original(hidden, **kwargs)

    monkeypatch.setattr(gf, "fused_linear_policy_loss", spy)
    train(make_config(steps_per_generation=2, max_steps=2, learning_rate=3e-2, algorithm="grpo", loss_type="vespo",
                      off_policy_mask_threshold=1e-3, top_entropy_quantile=0.5))
    for loss_mask, expected, _ in seen:
        assert torch.equal(loss_mask, expected)
    assert bool((seen[-1][2] == 0).any())  # the off-policy mask dropped a row on step 2
