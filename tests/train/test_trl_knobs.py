"""Three TRL knobs of the trainer on the tiny model: ``top_entropy_quantile`` (the loss mask of the high-entropy
tokens), ``sync_ref_model`` (the reference mixed toward the policy, checkpointed) and
``multi_objective_aggregation`` (``normalize_then_sum``), each against hand-computed numbers or the formula."""
from __future__ import annotations

import math
import types

import pytest
import torch
from safetensors.torch import load_file

import gfpo_fast as gf
from gfpo_fast.policy_loss import high_entropy_mask
from gfpo_fast.train import train
from gfpo_fast.train.config import parse_args

from trainer_runs import LAUNCH_ARGS, read_jsonl, train_rows


def test_the_knobs_are_checked_before_anything_loads(make_config):
    cases = [
        (dict(sync_ref_model=True), "sync_ref_model=True with beta=0.0"),
        (dict(sync_ref_model=True, beta=0.1, use_peft=True), "sync_ref_model=True with use_peft=True"),
        (dict(sync_ref_model=True, beta=0.1, ref_model_mixup_alpha=1.5), "ref_model_mixup_alpha must be in"),
        (dict(sync_ref_model=True, beta=0.1, ref_model_sync_steps=0), "ref_model_sync_steps must be an integer"),
        (dict(ref_model_sync_steps=4), "ref_model_sync_steps=4 only acts with sync_ref_model=True"),
        (dict(top_entropy_quantile=1.2), "top_entropy_quantile must be in"),
        (dict(top_entropy_quantile=math.nan), "top_entropy_quantile must be in"),
        (dict(multi_objective_aggregation="sum"), "multi_objective_aggregation must be one of"),
        (dict(multi_objective_aggregation="normalize_then_sum", algorithm="gfpo"), "sum_then_normalize' with it"),
    ]
    for overrides, match in cases:
        with pytest.raises(ValueError, match=match):
            make_config(**overrides)
    cfg = parse_args(["--top_entropy_quantile", "0.2", "--sync_ref_model", "true", "--beta", "0.1",
                      "--ref_model_mixup_alpha", "0.5", "--ref_model_sync_steps", "4",
                      "--multi_objective_aggregation", "normalize_then_sum"])
    assert (cfg.top_entropy_quantile, cfg.sync_ref_model, cfg.ref_model_mixup_alpha, cfg.ref_model_sync_steps,
            cfg.multi_objective_aggregation) == (0.2, True, 0.5, 4, "normalize_then_sum")


# ----------------------------------------------------------------------------- top_entropy_quantile
LINEAR = ("token_ids", "temperature", "return_entropy", "loss_mask", "chunk_size", "weight", "bias", "scale",
          "softcap", "old_logp", "advantages", "mask")


def test_top_entropy_quantile_trains_the_top_fifth_of_the_tokens(make_config, monkeypatch):
    """--top_entropy_quantile 0.2: the loss mask is the top 20% of each micro-batch's loss tokens by entropy (the
    entropies recomputed here by the torch reference), only those tokens carry gradient, and the loss equals the
    reference loss with that mask (its normaliser still counts every loss token)."""
    calls, original = [], gf.fused_linear_policy_loss

    def spy(hidden, **kwargs):
        loss, metrics = original(hidden, **kwargs)
        head = {k: kwargs[k] for k in ("weight", "bias", "scale", "softcap") if k in kwargs}
        logp, entropy = gf.fused_linear_logprobs(hidden.detach().float(), token_ids=kwargs["token_ids"],
                                                 temperature=kwargs["temperature"], return_entropy=True,
                                                 backend="torch", **{k: v.float() if torch.is_tensor(v) else v
                                                                     for k, v in head.items()})
        mask = kwargs["mask"]
        expected = high_entropy_mask(entropy, mask, 0.2)
        logp.requires_grad_()
        want, _ = gf.policy_loss(logp, kwargs["old_logp"], kwargs["advantages"], mask, loss_mask=expected,
                                 **{k: v for k, v in kwargs.items() if k not in LINEAR})
        (grad,) = torch.autograd.grad(want, logp)
        calls.append(types.SimpleNamespace(got=kwargs["loss_mask"], expected=expected, mask=mask, grad=grad,
                                           entropy=entropy,
                                           loss=loss.detach(), want=want.detach()))
        return loss, metrics

    monkeypatch.setattr(gf, "fused_linear_policy_loss", spy)
    train(make_config(top_entropy_quantile=0.2, gradient_accumulation_steps=2))
    assert len(calls) == 4  # 2 steps x 2 micro-batches of 8 rows, each masked on its own
    for c in calls:
        assert torch.equal(c.got, c.expected)
        kept = c.got.sum().item() / c.mask.sum().item()
        assert 0.15 <= kept <= 0.35, kept  # 20%, and the ties at the threshold (the G rows' shared first token)
        assert c.entropy[c.got].min() > c.entropy[(c.mask != 0) & ~c.got].max()
        assert not (c.grad[~c.got] != 0).any() and (c.grad[c.got] != 0).any()
        torch.testing.assert_close(c.loss, c.want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_entropy_threshold_spans_every_process(tiny_model, tmp_path):
    """2 processes of 4 rows and 1 process of 8 rows train on the same completions with --top_entropy_quantile 0.2
    (one micro-batch a step): the threshold is the quantile over both processes' loss tokens, gathered as TRL
    does, so the losses, gradient norms and parameters are one process's on the whole batch."""
    from test_distributed import run_dist

    flags = ["--model_name_or_path", str(tiny_model), "--max_steps", "2", "--do_eval", "false", *LAUNCH_ARGS,
             "--top_entropy_quantile", "0.2", "--forced_completions"]
    run_dist(flags, tmp_path / "two")
    run_dist([*flags, "--per_device_train_batch_size", "8"], tmp_path / "one", processes=1)
    two_rows, one_rows = (train_rows(read_jsonl(tmp_path / run / "metrics.jsonl")) for run in ("two", "one"))
    for a, b in zip(two_rows, one_rows, strict=True):
        assert a["num_tokens"] == b["num_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (a["step"], a["grad_norm"], b["grad_norm"])
    two, one = (torch.load(tmp_path / run / "params_rank0.pt") for run in ("two", "one"))
    assert (two - one).abs().max() < 1e-5, (two - one).abs().max()


# ----------------------------------------------------------------------------- sync_ref_model
def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_sync_ref_model_mixes_the_reference_and_resumes_it_bit_exactly(make_config, tiny_model, tmp_path):
    """Every 2 steps the reference becomes 0.3 * policy + 0.7 * reference (TRL's in-place formula), from the
    initial model, and not in between; the checkpoints hold it, and a run resumed at step 2 ends with the same
    reference and policy. A checkpoint without a reference cannot continue a synced one."""
    common = dict(beta=0.5, sync_ref_model=True, ref_model_mixup_alpha=0.3, ref_model_sync_steps=2, max_steps=3,
                  save_steps=1, save_total_limit=3, learning_rate=1e-2)
    train(make_config(**common))
    ckpts = tmp_path / "run" / "checkpoints"
    initial = weights(tiny_model)
    policy = {step: weights(ckpts / f"checkpoint-{step}" / "model") for step in (1, 2, 3)}
    ref = {step: weights(ckpts / f"checkpoint-{step}" / "ref_model") for step in (1, 2, 3)}
    assert set(ref[2]) == set(policy[2]) == set(initial)
    for name, w in initial.items():
        assert torch.equal(ref[1][name], w) and torch.equal(ref[3][name], ref[2][name])  # no sync at steps 1, 3
        assert torch.equal(ref[2][name], w.mul(0.7).add(policy[2][name], alpha=0.3)), name
    assert any(not torch.equal(ref[2][k], initial[k]) for k in initial)
    train(make_config(**common, output_dir=str(tmp_path / "resumed"),
                      resume_from_checkpoint=str(ckpts / "checkpoint-2")))
    again = tmp_path / "resumed" / "checkpoints" / "checkpoint-3"
    for a, b in ((weights(again / "ref_model"), ref[3]), (weights(again / "model"), policy[3])):
        assert all(torch.equal(a[k], b[k]) for k in b)
    train(make_config(max_steps=1, output_dir=str(tmp_path / "plain")))  # beta 0: no reference in its checkpoint
    with pytest.raises(ValueError, match="holds no ref_model/"):
        train(make_config(**common, output_dir=str(tmp_path / "plain-resume"),
                          resume_from_checkpoint=str(tmp_path / "plain" / "checkpoints" / "checkpoint-1")))


# ----------------------------------------------------------------------------- multi_objective_aggregation
def test_normalize_then_sum_reaches_the_advantages(make_config, monkeypatch):
    """Two reward functions, weights (1, 0.5), G = 2. Per function and group, z = (R - mean) / (std + 1e-4) with
    the unbiased std: a pair (a, b), a != b, gives z = +-s, s = 0.5 / (1/sqrt(2) + 1e-4), an equal pair 0.
    Group 1: R = (1, 0), (0, 1) -> sums s - s/2 = s/2, -s + s/2 = -s/2; group 2: R = (1, 1), (1, 0) -> s/2, -s/2.
    Then the batch baseline 0 and std (s/2) * sqrt(4/3): A = +-(s/2) / ((s/2) sqrt(4/3) + 1e-4)."""
    import gfpo_fast.train.loop as loop

    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    s = 0.5 / (1 / math.sqrt(2) + 1e-4)
    a = (s / 2) / ((s / 2) * math.sqrt(4 / 3) + 1e-4)
    scores = loop.Scores(rewards=rewards, lengths=torch.full((4,), 3), truncated=torch.zeros(4, dtype=torch.bool),
                         completions=["x"] * 4, logged={})
    ro = types.SimpleNamespace(prompt_ids=torch.ones(4, 2, dtype=torch.long), prompt_mask=torch.ones(4, 2),
                               completion_ids=torch.ones(4, 3, dtype=torch.long), completion_mask=torch.ones(4, 3),
                               truncated=torch.zeros(4, dtype=torch.bool), sampling_logp=None)
    accelerator = types.SimpleNamespace(process_index=0, gather=lambda x: x)
    common = dict(reward_funcs=["reward_fns:id_parity", "format"], reward_weights=[1.0, 0.5], num_generations=2,
                  per_device_train_batch_size=4)
    for aggregation, expected in (("normalize_then_sum", [a, -a, a, -a]),
                                  # the weighted sums 1, 0.5 | 1.5, 1: +-0.25 / (0.25 sqrt(2) + 1e-4) per group
                                  ("sum_then_normalize", [0.25 / (0.25 * math.sqrt(2) + 1e-4)] * 4)):
        cfg = make_config(multi_objective_aggregation=aggregation, **common)
        batch, _ = loop.make_batch(ro, scores, None, cfg, accelerator)
        signs = torch.tensor([1.0, -1.0, 1.0, -1.0]) if aggregation == "sum_then_normalize" else 1.0
        torch.testing.assert_close(batch.advantages, torch.tensor(expected) * signs, atol=1e-6, rtol=0)
    assert a == pytest.approx(math.sqrt(3) / 2, abs=1e-3)  # the hand value: about 0.866 against 0.707 summed first
