"""End to end on the CPU with the tiny model: every algorithm trains, resume is exact, signals checkpoint."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from gfpo_fast.train import train

from trainer_runs import read_jsonl, train_rows


def params(path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(path).named_parameters()}



@pytest.mark.parametrize("overrides", [
    dict(algorithm="grpo"),
    dict(algorithm="gfpo"),
    dict(algorithm="gmpo"),
    dict(algorithm="gspo", loss_type="grpo"),
    dict(algorithm="gspo_token"),
    # accumulation (dapo needs the global token count), old log-probs (num_iterations > 1), a KL reference model
    dict(algorithm="grpo", gradient_accumulation_steps=2, per_device_train_batch_size=4, num_iterations=2, beta=0.04),
    dict(algorithm="gfpo", group_filter="token_efficiency", adaptive_difficulty=True, num_generations=8,
         num_remains_in_group=4),
    dict(algorithm="gfpo", group_filter="reward_fns:shortest_text", mask_truncated_completions=True),
], ids=["grpo", "gfpo", "gmpo", "gspo", "gspo_token", "grpo-ga2-mu2-kl", "gfpo-efficiency-adaptive", "gfpo-user"])
def test_two_steps_change_every_parameter(make_config, tiny_model, overrides):
    run = train(make_config(**overrides))
    before, after = params(tiny_model), params(run["model"])
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    rows = read_jsonl(run["metrics"])
    steps = [r["step"] for r in rows]  # one row per generation batch (num_iterations optimizer steps each)
    assert steps == sorted(steps) and steps[-1] == run["step"] == 2
    for key in ("loss", "reward", "frac_reward_zero_std", "completions/clipped_ratio", "tokens_per_s", "grad_norm",
                "memory/peak_gb", "time/generate", "time/reward", "time/advantages", "time/old_ref_logprobs",
                "time/policy_forward", "time/backward", "time/optimizer", "time/step"):
        assert all(key in r and r[key] == r[key] for r in rows), key
    if overrides["algorithm"] == "gfpo":
        assert all(r["completions/kept_fraction"] < 1 for r in rows)


def test_resume_equals_straight_run(make_config, tmp_path):
    common = dict(algorithm="gfpo", adaptive_difficulty=True, num_generations=8, num_remains_in_group=4,
                  max_steps=4, save_steps=2)
    straight = train(make_config(**common))
    resumed = train(make_config(**common, output_dir=str(tmp_path / "resumed"),
                                resume_from_checkpoint=str(tmp_path / "run" / "checkpoints" / "checkpoint-2")))
    a, b = params(straight["model"]), params(resumed["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    def machine_dependent(key):  # timings and memory differ between any two runs
        return key.startswith(("time/", "memory/")) or key == "tokens_per_s"

    assert read_jsonl(straight["metrics"])[2:] == [
        {k: v for k, v in r.items() if not machine_dependent(k)} | {k: s[k] for k in s if machine_dependent(k)}
        for r, s in zip(read_jsonl(resumed["metrics"]), read_jsonl(straight["metrics"])[2:])]


def test_resume_latest_continues_the_output_dir(make_config):
    train(make_config(max_steps=2, save_steps=1))
    run = train(make_config(max_steps=3, resume_from_checkpoint="latest"))
    assert run["step"] == 3 and [r["step"] for r in read_jsonl(run["metrics"])] == [1, 2, 3]


def test_sigterm_writes_a_checkpoint_and_stops(make_config, tmp_path):
    run = train(make_config(max_steps=5, reward_funcs=["reward_fns:sigterm_at_step_1"]))
    assert run["step"] == 2 and run["checkpoint"].endswith("checkpoint-2")
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.pt").is_file()


def test_embedded_task_with_evals_before_and_after(make_config):
    run = train(make_config(reward_funcs=["accuracy", "format"], reward_weights=[1.0, 0.1], do_eval=True,
                            max_steps=1))
    assert set(run["evals"]) == {"before", "after"}
    for ev in run["evals"].values():
        assert 0 <= ev["eval/greedy_accuracy"] <= 1 and 1 <= ev["eval/sampled_mean_length"] <= 6
    assert run["plot"].endswith(".png")
    rows = read_jsonl(run["metrics"])  # the evals are rows of their own, at steps 0 and 1
    assert [r["step"] for r in rows if "eval/greedy_accuracy" in r] == [0, 1]
    first = train_rows(rows)[0]
    assert "accuracy" in first and "rewards/format/mean" in first
