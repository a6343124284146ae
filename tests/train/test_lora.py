"""LoRA through peft (gfpo_fast/train/lora.py): only the adapter trains, through the fused-linear loss; checkpoints
hold the adapter and resume exactly; the reference is the base model; vLLM gets merged weights; the merged export
loads without peft."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

import gfpo_fast.train.loop as loop  # noqa: E402
from gfpo_fast.train import TrainConfig, train  # noqa: E402
from gfpo_fast.train.generation import checkpoint_weights  # noqa: E402
from gfpo_fast.train.lora import add_adapter  # noqa: E402

from trainer_runs import read_jsonl  # noqa: E402

LORA = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-2)


def base_weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(path).named_parameters()}


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "lm_head"]], ids=["default-targets", "with-lm_head"])
def test_only_the_adapter_trains(make_config, tiny_model, targets):
    summary = train(make_config(**LORA, lora_target_modules=targets))
    policy = summary["policy"]
    names = dict(checkpoint_weights(policy))  # the base model's names, adapters merged
    original = base_weights(tiny_model)
    assert names.keys() == original.keys()
    base = policy.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue
        torch.testing.assert_close(param, original[name.replace(".base_layer", "")], rtol=0, atol=0, msg=name)
    lora_B = {n: p for n, p in base.named_parameters() if "lora_B" in n}
    assert lora_B and all(p.abs().max() > 0 for p in lora_B.values())  # zero at init: they moved
    if targets:
        assert any("lm_head.lora_B" in n for n in lora_B)  # the loss's gradient reached the head's adapter


def test_checkpoint_holds_the_adapter_and_resumes_exactly(make_config, tmp_path, monkeypatch):
    full = train(make_config(**LORA, max_steps=3, output_dir=str(tmp_path / "full")))
    cfg = make_config(**LORA, max_steps=2, save_steps=2)
    first = train(cfg)
    model_dir = Path(first["checkpoint"]) / "model"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in model_dir.iterdir()}
    start_steps = []
    restore = loop.restore

    def recorded_restore(*args, **kwargs):
        start_steps.append(restore(*args, **kwargs))
        return start_steps[-1]

    monkeypatch.setattr(loop, "restore", recorded_restore)
    resumed = train(TrainConfig(**{**cfg.to_dict(), "max_steps": 3, "resume_from_checkpoint": "latest"}))
    assert start_steps == [2]  # the run resumed at step 2 (the same seed would give the same result from step 0)
    a, b = dict(full["policy"].named_parameters()), dict(resumed["policy"].named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_reference_is_the_base_model(make_config):
    """With beta != 0 the reference is the policy with its adapters off: the KL is 0 at the first step (the adapter
    starts as a no-op) and positive once the adapter moved."""
    summary = train(make_config(**LORA, beta=0.5, max_steps=3))
    kl = [r["kl"] for r in read_jsonl(summary["metrics"])]
    assert kl[0] == pytest.approx(0.0, abs=1e-7) and kl[-1] > 1e-6


def test_vllm_weights_are_the_merged_model(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    weights = dict(checkpoint_weights(model))
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    assert weights.keys() == merged.keys()
    for name, w in weights.items():
        torch.testing.assert_close(w, merged[name].detach(), msg=name)
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"],
                           model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)


def test_merged_export_loads_without_peft(make_config):
    from transformers import AutoModelForCausalLM

    summary = train(make_config(**LORA, save_merged_model=True))
    exported = AutoModelForCausalLM.from_pretrained(summary["merged"])
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(exported(ids).logits, summary["policy"](ids).logits)


def test_add_adapter_resumes_a_saved_adapter_trainable(tiny_model, make_config, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = make_config(**LORA)
    model = add_adapter(AutoModelForCausalLM.from_pretrained(tiny_model), cfg)
    model.save_pretrained(tmp_path / "adapter")
    again = add_adapter(AutoModelForCausalLM.from_pretrained(tiny_model), cfg, tmp_path / "adapter")
    assert any(p.requires_grad for n, p in again.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in again.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("overrides, message", [
    (dict(load_in_4bit=True), "needs use_peft"),
    (dict(use_peft=True, load_in_4bit=True, load_in_8bit=True), "choose one"),
    (dict(use_peft=True, lora_r=0), "lora_r"),
    (dict(use_peft=True, lora_dropout=1.0), "lora_dropout"),
])
def test_bad_lora_config(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_quantized_base_needs_cuda(make_config):
    with pytest.raises(ValueError, match="needs CUDA"):
        train(make_config(use_peft=True, load_in_4bit=True))
