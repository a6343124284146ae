"""Our trainer and TRL's ``GRPOTrainer`` on the same data give equal losses and parameters, step by step, when a
generation batch is split into several optimizer steps (``steps_per_generation``).

Our trainer runs first (the tiny model of ``tiny.py`` with EOS made likely, fp32, CPU) and its completions are
recorded at ``model.generate`` (``bench.bench_trainer.recorded_generation``); TRL 1.16's ``GRPOTrainer`` then runs
on the same model, rows and reward function with every ``generate`` call forced to emit those completions, its
prompts checked to be ours (``forced_generation``; ``check_same_inputs`` checks the prompt ids and the EOS set), its
config taken from ours (``trl_config``). Two generation batches of 3 prompts x 4 completions, each split into 2
optimizer steps of 6 rows (a group straddles the two steps), for grpo and dapo (per-sequence and token-count
normalisers), gspo (sequence-level ratio), dapo with ``num_iterations=2`` (two passes over each batch), and grpo
and dapo with each step as 2 accumulated micro-batches of 3 rows (``gradient_accumulation_steps=2``,
``steps_per_generation=4``). Every step after a batch's first is off-policy (the old log-probs come from before
the first), and the second clips.
TRL shuffles the rows of a generation batch before splitting it (``shuffle_sequence_dict``, from the global torch
RNG); ours takes consecutive rows (docs/training.md), so the test makes TRL's shuffle the identity.
"""
import inspect

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl.trainer import grpo_trainer  # noqa: E402

from bench import bench_trainer  # noqa: E402
from gfpo_fast.train import loop, train  # noqa: E402
from gfpo_fast.train.data import load_rows  # noqa: E402
from gfpo_fast.train.generation import eos_token_ids  # noqa: E402
from gfpo_fast.train.models import load_model_and_tokenizer  # noqa: E402
from gfpo_fast.train.rewards import build_reward_funcs  # noqa: E402


@pytest.fixture(scope="module")
def ending_model(tiny_model, tmp_path_factory):
    """The tiny model with its EOS row of the lm_head scaled 20x: the EOS logit swings by nats from
    position to position, so completions end at many lengths (the per-sequence and token-count normalisers
    differ) where the plain tiny model runs every completion to the length limit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 20
    path = tmp_path_factory.mktemp("ending") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# 2 generation batches of 3 prompts x G=4, each 2 optimizer steps of 6 rows (num_iterations times over);
# epsilon 0.02 so that the second, off-policy step of a batch clips
SETUP = dict(max_steps=4, per_device_train_batch_size=6, steps_per_generation=2, num_generations=4,
             learning_rate=1e-3, warmup_steps=0, epsilon=0.02)
# (id, config overrides): per-sequence (grpo) and token-count (dapo) normalisers, GSPO's sequence-level ratio, two
# passes over each batch, and each optimizer step as 2 accumulated micro-batches of 3 rows
CASES = [
    ("grpo", dict(loss_type="grpo")),
    ("dapo", dict(loss_type="dapo")),
    ("gspo", dict(algorithm="gspo", loss_type="grpo")),
    ("dapo-2-iterations", dict(loss_type="dapo", num_iterations=2, max_steps=8)),
    ("grpo-accumulated", dict(loss_type="grpo", per_device_train_batch_size=3, steps_per_generation=4,
                              gradient_accumulation_steps=2)),
    ("dapo-accumulated", dict(loss_type="dapo", per_device_train_batch_size=3, steps_per_generation=4,
                              gradient_accumulation_steps=2)),
]


def our_run(cfg, monkeypatch):
    """(per-step (loss, grad_norm), final parameters, the recorded generate calls) of our trainer."""
    steps, optimizer_step = [], loop.optimizer_step

    def recorded(*args, **kwargs):  # the step's loss (summed over its micro-batches) and its gradient norm
        grad_norm = optimizer_step(*args, **kwargs)
        loss = inspect.signature(optimizer_step).bind(*args, **kwargs).arguments["loss"]
        steps.append((loss.item(), grad_norm.item()))
        return grad_norm

    monkeypatch.setattr(loop, "optimizer_step", recorded)
    with bench_trainer.recorded_generation() as generations:
        policy = train(cfg)["policy"]
    return steps, {n: p.detach().clone() for n, p in policy.named_parameters()}, generations


def trl_run(cfg, generations, output_dir, monkeypatch):
    """(per-step (loss, grad_norm), final parameters, generation batches shuffled) of TRL on our completions."""
    shuffled = []

    def unshuffled(batch):  # TRL's shuffle of the generation batch, as the identity (see the module docstring)
        shuffled.append(len(batch["completion_ids"]))
        return batch

    monkeypatch.setattr(grpo_trainer, "shuffle_sequence_dict", unshuffled)
    train_rows, _ = load_rows(cfg)
    _, funcs = build_reward_funcs(cfg.reward_funcs, cfg.max_completion_length)
    model, tokenizer = load_model_and_tokenizer(cfg.model_name_or_path, cfg.dtype, cfg.gradient_checkpointing)
    args = bench_trainer.trl_config(cfg, on_gpu=False)
    args.output_dir = str(output_dir)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=args, reward_funcs=funcs,
                          train_dataset=Dataset.from_list(train_rows))
    bench_trainer.check_same_inputs(trainer, tokenizer, train_rows[:1], eos_token_ids(trainer.model, tokenizer))
    with bench_trainer.forced_generation(generations):
        trainer.train()
    steps = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
    return steps, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, shuffled, trainer


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_trl_trains_like_ours_over_two_generation_batches(make_config, ending_model, tmp_path, monkeypatch, overrides):
    """Per optimizer step the loss and the gradient norm, and the parameters at the end, are TRL's. Tolerances: the
    same fp32 formula summed in other orders (our chunked fused loss, TRL's log-softmax), measured <= 3e-7 relative
    apart (losses near 0 are sums of O(0.1) terms that cancel: 1e-6 absolute); the parameters within 1e-5 = 1% of
    the learning rate, since AdamW divides by sqrt(v) and an element whose gradient is near rounding noise moves by
    a fraction of lr either way (measured <= 5e-7 in the grpo, dapo and gspo cases). AdamW and the gradient
    clipping (max_grad_norm 1) hide a wrong scale of the loss from the parameters: the losses and gradient norms
    catch it (a wrong normaliser, the old log-probs taken per step)."""
    cfg = make_config(model_name_or_path=str(ending_model), **{**SETUP, **overrides})
    ours, our_params, generations = our_run(cfg, monkeypatch)
    assert [len(g["completion_ids"]) for g in generations] == [12, 12]
    assert len({len(c) for c in generations[0]["completion_ids"]}) > 1  # grpo's and dapo's normalisers differ
    theirs, their_params, shuffled, trainer = trl_run(cfg, generations, tmp_path / "trl", monkeypatch)
    assert shuffled == [12, 12]  # the identity replaced TRL's shuffle of both generation batches

    assert len(ours) == len(theirs) == cfg.max_steps
    for step, ((loss, grad_norm), (trl_loss, trl_grad_norm)) in enumerate(zip(ours, theirs), 1):
        assert loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-6), f"step {step}: loss {loss} != TRL's {trl_loss}"
        assert grad_norm == pytest.approx(trl_grad_norm, rel=1e-5), f"step {step}: grad_norm"
    for name, p in their_params.items():
        torch.testing.assert_close(our_params[name], p, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    clipped = [h["clip_ratio/region_mean"] for h in trainer.state.log_history if "loss" in h]
    assert clipped[1] > 0  # the first batch's second step is off-policy and clips
