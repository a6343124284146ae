"""gfpo_fast.integrations.trl against the real TRL on the CPU (skipped when trl is not installed).

A 2-layer Llama (hidden 16) built from a config (and a Phi with tied embeddings and an lm_head bias), a
word-level tokenizer made here and an 8-prompt dataset: nothing comes from the Hub. Two runs with the same
seed generate the same completions, so after two optimizer steps (``num_iterations=2``: the second step is
off-policy and clips; TRL's default gradient checkpointing is on) the logged losses, metrics and parameters of
the fast path must equal TRL's own path (fp32, 1e-5). :class:`LossPaths` checks which path the fast loss took:
from the hidden states (the lm_head never projects more than one position) or from the full logits.
"""
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.experimental.gmpo import GMPOConfig, GMPOTrainer  # noqa: E402

import gfpo_fast as gf  # noqa: E402
import gfpo_fast.integrations.trl as gf_trl  # noqa: E402
from gfpo_fast.integrations.trl import (  # noqa: E402
    SUPPORTED_TRL,
    FastGMPOTrainer,
    FastGRPOTrainer,
    GFPOConfig,
    GFPOTrainer,
    patch,
)
from gfpo_fast.train.generation import _free_port  # noqa: E402

pytestmark = pytest.mark.slow
WORDS = "abcdefghijklmnop"
NOT_COMPARED = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}


def tokenizer_and_sizes():
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    sizes = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=64, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    return tokenizer, sizes


def save_tiny(tmp_path_factory, model_cls, config):
    """(model directory, tokenizer): a seeded tiny model saved locally, and the word-level tokenizer."""
    tokenizer, _ = tokenizer_and_sizes()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(model_cls.__name__)
    model_cls(config).save_pretrained(path)
    return str(path), tokenizer


OUTPUT_DIR = "trl-output"  # relative: conftest.py runs each test in its own tmp_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama (untied lm_head without bias)."""
    return save_tiny(tmp_path_factory, LlamaForCausalLM, LlamaConfig(**tokenizer_and_sizes()[1], num_key_value_heads=1))


@pytest.fixture(scope="module")
def tiny_phi(tmp_path_factory):
    """A 2-layer Phi whose lm_head has a bias and shares its weight with the input embeddings."""
    model = save_tiny(tmp_path_factory, PhiForCausalLM, PhiConfig(**tokenizer_and_sizes()[1], tie_word_embeddings=True))
    loaded = PhiForCausalLM.from_pretrained(model[0])
    assert loaded.lm_head.bias is not None and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    return model


def dataset():
    return Dataset.from_dict({"prompt": ["a b c", "d e f", "g h", "i j k l", "m n", "o p a", "b", "c d"]})


def length_reward(completions, **kwargs):
    return [float(len(c) % 3) for c in completions]


def train(tiny, trainer_cls, config_cls=GRPOConfig, *, after_init=None, trainer_kwargs=None, **overrides):
    """Trains 2 steps; returns (logged step dicts, parameters, trainer)."""
    path, tokenizer = tiny
    cfg = dict(output_dir=OUTPUT_DIR, use_cpu=True, report_to="none", max_steps=2,
               per_device_train_batch_size=4, num_generations=4, max_completion_length=8, learning_rate=1e-2,
               logging_steps=1, save_strategy="no", bf16=False, seed=0, disable_dropout=True, num_iterations=2)
    cfg.update(overrides)
    trainer = trainer_cls(model=path, reward_funcs=length_reward, args=config_cls(**cfg), train_dataset=dataset(),
                          processing_class=tokenizer, **(trainer_kwargs or {}))
    if after_init is not None:
        after_init(trainer)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    return steps, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, trainer


def assert_same_training(trl_run, fast_run, compare_metrics=True):
    (steps_a, params_a, _), (steps_b, params_b, _) = trl_run, fast_run
    assert len(steps_a) == len(steps_b) == 2
    for a, b in zip(steps_a, steps_b):
        keys = [k for k in a if k not in NOT_COMPARED] if compare_metrics else ["loss"]
        for key in keys:
            assert key in b, f"metric {key} is not logged by the fast path"
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-5), (key, a[key], b[key])
    for name, p in params_a.items():
        torch.testing.assert_close(params_b[name], p, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


class LossPaths:
    """Counts the fast loss's calls of each op and the most positions the lm_head projected in one call."""

    def __init__(self, monkeypatch):
        self.calls = {"hidden": 0, "logits": 0}
        self.lm_head_positions = 0
        for path, name in (("hidden", "fused_linear_policy_loss"), ("logits", "fused_policy_loss")):
            monkeypatch.setattr(gf_trl, name, self._counted(path, getattr(gf_trl, name)))

    def _counted(self, path, fn):
        def op(*args, **kwargs):
            self.calls[path] += 1
            return fn(*args, **kwargs)
        return op

    def watch(self, trainer):
        def record(module, args, output):
            self.lm_head_positions = max(self.lm_head_positions, args[0].shape[-2])
        trainer.model.get_output_embeddings().register_forward_hook(record)

    def assert_hidden_path(self, micro_batches):
        assert self.calls == {"hidden": micro_batches, "logits": 0}
        assert self.lm_head_positions == 1  # generation and the loss's forward: the last position only


@pytest.fixture
def loss_paths(monkeypatch):
    return LossPaths(monkeypatch)


# (id, TRL trainer, TRL config, fast trainer or "patch", config overrides, compare metrics)
PARITY = [
    ("grpo-dapo", GRPOTrainer, GRPOConfig, FastGRPOTrainer, dict(loss_type="dapo"), True),
    ("grpo-grpo", GRPOTrainer, GRPOConfig, FastGRPOTrainer, dict(loss_type="grpo"), True),
    ("grpo-dapo-ga2-kl", GRPOTrainer, GRPOConfig, FastGRPOTrainer,
     dict(loss_type="dapo", per_device_train_batch_size=2, gradient_accumulation_steps=2, beta=0.04), True),
    ("gspo-sequence", GRPOTrainer, GRPOConfig, FastGRPOTrainer,
     dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.02), True),
    ("gmpo", GMPOTrainer, GMPOConfig, FastGMPOTrainer, dict(epsilon=0.05), True),
    ("patch-bnpo", GRPOTrainer, GRPOConfig, "patch", dict(loss_type="bnpo", epsilon_high=0.28), True),
]


@pytest.mark.parametrize("name,trl_cls,config_cls,fast_cls,overrides,metrics", PARITY, ids=[p[0] for p in PARITY])
def test_fast_path_trains_like_trl(tiny, loss_paths, name, trl_cls, config_cls, fast_cls, overrides, metrics):
    reference = train(tiny, trl_cls, config_cls, **overrides)
    if fast_cls == "patch":
        fast = train(tiny, trl_cls, config_cls, after_init=lambda t: loss_paths.watch(patch(t)), **overrides)
    else:
        fast = train(tiny, fast_cls, config_cls, after_init=loss_paths.watch, **overrides)
    assert_same_training(reference, fast, compare_metrics=metrics)
    assert any(step.get("clip_ratio/region_mean", 0) > 0 for step in reference[0]) or name == "gspo-sequence"
    loss_paths.assert_hidden_path(micro_batches=2 * overrides.get("gradient_accumulation_steps", 1))


def test_fast_path_with_tied_embeddings_and_lm_head_bias_trains_like_trl(tiny_phi, loss_paths):
    overrides = dict(loss_type="dapo", beta=0.04)
    reference = train(tiny_phi, GRPOTrainer, **overrides)
    fast = train(tiny_phi, FastGRPOTrainer, after_init=loss_paths.watch, **overrides)
    assert_same_training(reference, fast)
    loss_paths.assert_hidden_path(micro_batches=2)


def test_fast_path_with_lora_trains_like_trl(tiny, loss_paths):
    """PEFT-wrapped policy (LoRA on the attention; TRL refuses an adapter on the lm_head): the hidden-state path."""
    peft = pytest.importorskip("peft")
    overrides = dict(loss_type="dapo", trainer_kwargs={"peft_config": peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)})
    reference = train(tiny, GRPOTrainer, **overrides)
    fast = train(tiny, FastGRPOTrainer, after_init=loss_paths.watch, **overrides)
    assert_same_training(reference, fast)
    loss_paths.assert_hidden_path(micro_batches=2)


class SubclassedHead(torch.nn.Linear):
    """An lm_head that is not a plain torch.nn.Linear (as a LoRA-adapted or quantized one), same math."""


def subclass_head(trainer):
    trainer.model.get_output_embeddings().__class__ = SubclassedHead


def softcap_config(trainer):
    trainer.model.config.final_logit_softcapping = 30.0  # Llama ignores it: a stand-in for Gemma 2's config


def scale_logits(trainer):  # a logit transform the config does not name: found by the first step's check
    trainer.model.get_output_embeddings().register_forward_hook(lambda module, args, logits: 2 * logits)


@pytest.mark.parametrize("setup,reason", [
    (subclass_head, "SubclassedHead, not a plain torch.nn.Linear"),
    (softcap_config, "final_logit_softcapping=30.0"),
    (scale_logits, "logits differ from its lm_head's"),
])
def test_logits_path_when_the_lm_head_is_not_a_plain_linear(tiny, loss_paths, caplog, setup, reason):
    def after_init(trainer):
        setup(trainer)
        loss_paths.watch(patch(trainer))

    with caplog.at_level("WARNING", logger=gf_trl.__name__):
        fast = train(tiny, GRPOTrainer, loss_type="dapo", after_init=after_init)
    said = [r.getMessage() for r in caplog.records if "full [B, T, V] completion logits" in r.getMessage()]
    assert len(said) == 1 and reason in said[0]  # said once
    assert loss_paths.calls == {"hidden": 0, "logits": 2} and loss_paths.lm_head_positions > 1  # T + 1
    if setup is subclass_head:  # the same objective as TRL's: the logits path keeps parity
        assert_same_training(train(tiny, GRPOTrainer, loss_type="dapo"), fast)
    assert all(math.isfinite(step["loss"]) for step in fast[0])


def test_fsdp2_policy_takes_the_hidden_path_with_trl_gradients(tiny, tmp_path):
    """On an FSDP2-sharded policy (2 processes over gloo, DTensor parameters) the drop-in computes the loss from the
    hidden states (the lm_head weight gathered by the op) and gets TRL's own loss and full gradients, on the
    grad-in-forward path (on-policy dapo) and the recompute path (off-policy GSPO); trl_fsdp2_run.py."""
    path, tokenizer = tiny
    model_dir = tmp_path / "model"
    shutil.copytree(path, model_dir)
    tokenizer.save_pretrained(model_dir)
    here = Path(__file__).parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port("127.0.0.1")), str(here / "trl_fsdp2_run.py"), str(model_dir), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               TRL_EXPERIMENTAL_SILENCE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=here.parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(results) == {"dapo-on-policy", "gspo-off-policy"}
        for r in results.values():
            assert r["types"] == ["DTensor"] and r["logits_reason"] is None
            assert r["calls"] == {"hidden": 1, "logits": 0}
            assert r["fast_loss"] == pytest.approx(r["trl_loss"], rel=1e-5)
            assert r["grad_max"] > 0 and r["grad_max_diff"] <= 1e-5 * r["grad_max"], r


@pytest.mark.parametrize("setup,expected", [("fsdp2", None), ("fsdp1", "FSDP1"), ("zero3", "ZeRO-3"),
                                            ("zero2", None)])
def test_only_fsdp1_and_zero3_take_the_logits_path(tiny, monkeypatch, setup, expected):
    """accelerate's FSDP2 keeps the hidden-state path (the DTensor weight is gathered, previous test), and so does
    ZeRO-2 (the weight is whole in the forward); FSDP1 and ZeRO-3 do not. The accelerator's state is set by hand:
    on the CPU accelerate runs MULTI_CPU whatever its FSDP or DeepSpeed plugin says."""
    path, tokenizer = tiny
    args = GRPOConfig(output_dir=OUTPUT_DIR, use_cpu=True, report_to="none", num_generations=4,
                      per_device_train_batch_size=4, bf16=False)
    trainer = GRPOTrainer(model=path, reward_funcs=length_reward, args=args, train_dataset=dataset(),
                          processing_class=tokenizer)
    if setup.startswith("fsdp"):
        trainer.is_fsdp_enabled = True
        monkeypatch.setattr(type(trainer.accelerator), "is_fsdp2", property(lambda self: setup == "fsdp2"))
    else:
        plugin = types.SimpleNamespace(zero_stage=int(setup[-1]))
        monkeypatch.setattr(type(trainer.accelerator.state), "deepspeed_plugin", property(lambda self: plugin))
    reason = gf_trl._static_logits_reason(trainer)
    assert reason is None if expected is None else expected in reason


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gspo_token_equals_trl_sequence_level(tiny, loss_type):
    """With one advantage per sequence GSPO-token has GSPO's loss and gradient. TRL 1.16 has no GSPO-token trainer
    (TRL <= 1.13's ``trl.experimental.gspo_token``); its loss values are pinned in tests/spec_fixtures.py
    (``gspo_token-*``, computed by that trainer) and checked in test_policy_loss.py."""
    reference = train(tiny, GRPOTrainer, loss_type=loss_type, importance_sampling_level="sequence", epsilon=0.02)
    fast = train(tiny, FastGRPOTrainer, loss_type=loss_type, importance_sampling_level="sequence_token", epsilon=0.02)
    # clip_ratio/* are token-weighted for GSPO-token (its ratio is (B, T)) and row-weighted for GSPO
    assert_same_training(reference, fast, compare_metrics=False)


# ----------------------------------------------------------------------------- refusals and versions
@pytest.mark.parametrize("cls,config_cls,field,value", [
    (FastGRPOTrainer, GRPOConfig, "top_entropy_quantile", 0.5),
    (FastGRPOTrainer, GRPOConfig, "off_policy_mask_threshold", 0.1),
    (FastGRPOTrainer, GRPOConfig, "entropy_coef", 0.01),
    (FastGRPOTrainer, GRPOConfig, "loss_type", "ppo"),
    (FastGMPOTrainer, GMPOConfig, "delta", 1.5),
    (FastGMPOTrainer, GMPOConfig, "importance_sampling_level", "sequence"),
])
def test_unsupported_fields_are_refused_at_construction(cls, config_cls, field, value):
    args = config_cls(output_dir=OUTPUT_DIR, use_cpu=True, report_to="none", num_generations=4,
                      per_device_train_batch_size=4, **{field: value})
    with pytest.raises(ValueError, match=field):
        cls("never-loaded", length_reward, args=args)


def test_gmpo_refuses_the_bias_corrected_kl_trl_gmpo_ignores():
    args = GMPOConfig(output_dir=OUTPUT_DIR, use_cpu=True, report_to="none", num_generations=4,
                      per_device_train_batch_size=4, beta=0.04, use_bias_correction_kl=True)
    with pytest.raises(ValueError, match="use_bias_correction_kl"):
        FastGMPOTrainer("never-loaded", length_reward, args=args)


def test_gspo_token_refuses_loss_types_trl_did_not_support():
    args = GRPOConfig(output_dir=OUTPUT_DIR, use_cpu=True, report_to="none", num_generations=4,
                      per_device_train_batch_size=4, importance_sampling_level="sequence_token", loss_type="cispo")
    with pytest.raises(ValueError, match="sequence_token"):
        FastGRPOTrainer("never-loaded", length_reward, args=args)


def test_loss_hyperparameters_come_from_grpo_config():
    """The registry's hyperparameters of TRL's loss types (sapo_*, vespo_*) are GRPOConfig fields with the same
    defaults, and a changed value reaches the loss keywords."""
    from gfpo_fast.policy_loss import LOSS_PARAMS

    base = dict(output_dir=OUTPUT_DIR, use_cpu=True, report_to="none", num_generations=4, per_device_train_batch_size=4)
    trl_params = [p for p in LOSS_PARAMS if p.name.startswith(("sapo_", "vespo_"))]
    assert trl_params
    for p in trl_params:
        assert getattr(GRPOConfig(**base), p.name) == p.default, p.name
    changed = {p.name: p.default + 0.5 for p in trl_params}
    kwargs = gf_trl._loss_kwargs(GRPOConfig(**base, **changed), "grpo")
    assert {name: kwargs[name] for name in changed} == changed


def test_patch_refuses_a_trainer_with_its_own_loss(tiny):
    class Custom(GRPOTrainer):
        def _compute_loss(self, model, inputs):
            return super()._compute_loss(model, inputs)

    path, tokenizer = tiny
    args = GRPOConfig(output_dir=OUTPUT_DIR, use_cpu=True, report_to="none", num_generations=4,
                      per_device_train_batch_size=4, bf16=False)
    trainer = Custom(model=path, reward_funcs=length_reward, args=args, train_dataset=dataset(),
                     processing_class=tokenizer)
    with pytest.raises(ValueError, match="overrides _compute_loss"):
        patch(trainer)
    with pytest.raises(TypeError, match="GRPOTrainer"):
        patch(object())


def test_unsupported_trl_version_names_the_range(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.9.0")
    monkeypatch.delitem(sys.modules, "gfpo_fast.integrations.trl")
    with pytest.raises(ImportError, match=re.escape(f"trl{SUPPORTED_TRL}, found trl 1.9.0")):
        importlib.import_module("gfpo_fast.integrations.trl")


# ----------------------------------------------------------------------------- GFPO
class RecordingGFPOTrainer(GFPOTrainer):
    """Keeps every filtered generation batch the trainer trains on."""

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        self.batches.append(batch)
        return batch


def test_gfpo_filters_the_right_groups_and_trains(tiny):
    seen = {"reward": [], "filter": []}

    def reward(completions, completion_ids, **kwargs):
        seen["reward"].append((list(completions), [list(ids) for ids in completion_ids]))
        return [float(ids.count(2)) + 0.5 * (len(ids) % 2) for ids in completion_ids]  # 'a' count, length parity

    def shortest(group_completions, group_rewards, group_completion_ids):
        seen["filter"].append((group_completions, group_rewards, group_completion_ids))
        return [[-len(ids) for ids in group] for group in group_completion_ids]

    path, tokenizer = tiny
    args = GFPOConfig(output_dir=OUTPUT_DIR, use_cpu=True, report_to="none", max_steps=2,
                      per_device_train_batch_size=8, num_generations=4, num_remains_in_group=2,
                      max_completion_length=8, learning_rate=1e-2, logging_steps=1, save_strategy="no", bf16=False,
                      seed=0, disable_dropout=True)
    trainer = RecordingGFPOTrainer(model=path, reward_funcs=reward, args=args, train_dataset=dataset(),
                                   processing_class=tokenizer, group_filter_func=shortest)
    trainer.batches = []
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    assert len(seen["filter"]) == len(trainer.batches) == 2
    for (completions, ids), (group_completions, group_rewards, group_ids), batch in zip(
            seen["reward"], seen["filter"], trainer.batches):
        rewards = torch.tensor([float(r.count(2)) + 0.5 * (len(r) % 2) for r in ids])
        assert group_completions == [completions[0:4], completions[4:8]]  # group g is rows [4g, 4g + 4)
        assert group_ids == [ids[0:4], ids[4:8]]
        assert group_rewards == rewards.view(2, 4).tolist()
        scores = torch.tensor([-float(len(r)) for r in ids])
        advantages, keep = gf.gfpo_filter(rewards, scores, 4, 2)
        kept_rows = keep.nonzero().flatten().tolist()
        assert len(kept_rows) == 4 and batch["completion_ids"].shape[0] == 4
        got = [row[m.bool()].tolist() for row, m in zip(batch["completion_ids"], batch["completion_mask"])]
        assert got == [ids[i] for i in kept_rows]  # the right rows, in their original order
        torch.testing.assert_close(batch["advantages"], advantages[keep])
        assert int(batch["num_items_in_batch"]) == sum(len(ids[i]) for i in kept_rows)
        for g in range(2):  # the kept rows of a group are its two shortest
            lengths = sorted(len(r) for r in ids[4 * g:4 * g + 4])
            assert sorted(len(ids[i]) for i in kept_rows if i // 4 == g) == lengths[:2]

    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_gfpo_on_the_fast_loss_matches_trl_loss(tiny, loss_paths):
    def shortest(group_completions, group_rewards):  # v1.7.1's two-argument contract
        return [[-len(c) for c in group] for group in group_completions]

    common = dict(num_remains_in_group=2, per_device_train_batch_size=8, trainer_kwargs={"group_filter_func": shortest})
    reference = train(tiny, GFPOTrainer, GFPOConfig, **common)
    fast = train(tiny, GFPOTrainer, GFPOConfig, after_init=lambda t: loss_paths.watch(patch(t)), **common)
    assert_same_training(reference, fast)
    loss_paths.assert_hidden_path(micro_batches=2)


@pytest.mark.parametrize("k", [1, 4, 0])
def test_gfpo_config_enforces_k_range(k):
    with pytest.raises(ValueError, match="2 <= k < num_generations=4"):
        GFPOConfig(output_dir=OUTPUT_DIR, use_cpu=True, report_to="none", num_generations=4,
                   per_device_train_batch_size=4, num_remains_in_group=k)


def test_gfpo_trainer_refuses_bad_setups():
    def args(k=2, **kw):
        return GFPOConfig(output_dir=OUTPUT_DIR, use_cpu=True, report_to="none", num_generations=4,
                          num_remains_in_group=k, **kw)

    with pytest.raises(ValueError, match="needs a group_filter_func"):
        GFPOTrainer("never-loaded", length_reward, args=args(per_device_train_batch_size=4))
    with pytest.raises(ValueError, match="must be an integer"):  # 2 * 3 / 4 kept rows per micro-batch
        GFPOTrainer("never-loaded", length_reward, args=args(3, per_device_train_batch_size=2,
                                                              gradient_accumulation_steps=2),
                    group_filter_func=lambda **kw: None)
    with pytest.raises(ValueError, match="sum_then_normalize"):
        GFPOTrainer("never-loaded", length_reward, args=args(per_device_train_batch_size=4,
                                                              multi_objective_aggregation="normalize_then_sum"),
                    group_filter_func=lambda **kw: None)
