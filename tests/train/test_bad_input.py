"""Bad input stops with a message naming the problem, and never damages a checkpoint already written."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gfpo_fast.train import TrainConfig, train
from gfpo_fast.train.__main__ import main
from gfpo_fast.train.loop import verify_lm_head
from gfpo_fast.train.rewards import RewardFunctionError


def test_missing_prompt_column(make_config, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": "1"}) + "\n" for i in range(4)))
    with pytest.raises(ValueError, match="no 'prompt' column .*question"):
        train(make_config(dataset_name=str(path)))


@pytest.mark.parametrize("k", [1, 4, 5, None])
def test_num_remains_in_group_outside_range(make_config, k):
    with pytest.raises(ValueError, match="num_remains_in_group must be an integer with 2 <= k < num_generations=4"):
        make_config(algorithm="gfpo", num_remains_in_group=k)


@pytest.mark.parametrize("func, message", [
    ("reward_fns:raises", "reward function 'raises' raised KeyError: 'boom'"),
    ("reward_fns:wrong_count", "reward function 'wrong_count' must return a list of 8 floats .* got 7 values"),
])
def test_reward_function_errors(make_config, func, message):
    with pytest.raises(RewardFunctionError, match=message):
        train(make_config(reward_funcs=[func]))


def test_reward_error_keeps_the_last_checkpoint_intact(make_config, tmp_path):
    with pytest.raises(RewardFunctionError, match="reward server down"):
        train(make_config(max_steps=4, save_steps=1, reward_funcs=["reward_fns:raise_at_step_2"]))
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    AutoModelForCausalLM.from_pretrained(ckpt / "checkpoint-2" / "model")
    assert torch.load(ckpt / "checkpoint-2" / "trainer_state.pt", weights_only=False)["step"] == 2


@pytest.mark.parametrize("name, message", [
    ("/nonexistent/model", "does not exist"),
    ("./missing.gguf", "GGUF file missing.gguf does not exist"),
    ("not-a-cached/model-id", "not a local path and not in the local Hugging Face cache, and offline mode"),
])
def test_unreadable_model_path(make_config, name, message):
    with pytest.raises(ValueError, match=message):
        train(make_config(model_name_or_path=name))


def test_model_dir_without_weights(make_config, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not load"):
        train(make_config(model_name_or_path=str(bad)))


def test_cli_reports_errors_without_a_traceback(capsys, tiny_model):
    assert main(["--model_name_or_path", str(tiny_model), "--algorithm", "gfpo", "--num_generations", "4",
                 "--num_remains_in_group", "4", "--per_device_train_batch_size", "8"]) == 2
    assert "error: num_remains_in_group" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (dict(per_device_train_batch_size=6), "must be a multiple of num_generations = 4"),
    (dict(reward_weights=[1.0, 2.0]), "reward_weights has 2 entries for 1 reward_funcs"),
    (dict(algorithm="gspo", importance_sampling_level="sequence"), "sets importance_sampling_level itself"),
    (dict(algorithm="dpo"), "algorithm must be one of"),
    (dict(num_generations=1), "num_generations must be >= 2"),
])
def test_config_errors_say_what_to_change(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_bf16_on_cpu_is_refused(make_config):
    with pytest.raises(ValueError, match="bf16=True on the CPU"):
        train(make_config(bf16=True))


def test_vllm_without_vllm_is_a_clear_error(make_config):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(ValueError, match="generation_backend='vllm' needs vLLM: `pip install vllm`"):
        train(make_config(generation_backend="vllm"))


def test_resume_from_nothing(make_config):
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train(make_config(resume_from_checkpoint="latest"))
    with pytest.raises(ValueError, match="is not a checkpoint directory"):
        train(make_config(resume_from_checkpoint="/tmp"))


def test_default_config_is_valid():
    cfg = TrainConfig()
    assert cfg.algorithm == "grpo" and 2 <= cfg.num_remains_in_group < cfg.num_generations  # k for --algorithm gfpo


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_liger_kernel_needs_cuda(make_config):
    with pytest.raises(ValueError, match="use_liger_kernel=True needs CUDA"):
        train(make_config(use_liger_kernel=True))


def test_a_model_that_transforms_its_logits_unknown_to_the_head_is_refused(tiny_model):
    """The loss comes from the hidden states: a model whose logits are not its lm_head's (here doubled in its
    forward, with no config field saying so) is refused at setup, never trained on a different objective."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    original = model.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = forward
    with pytest.raises(ValueError, match="the model's logits differ from its lm_head's"):
        verify_lm_head(model, [5, 6, 7])
