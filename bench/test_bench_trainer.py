"""The trainer benchmark's equal-work replay (generate emits the recorded completions) and TRL's path count."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.utils import GenerationMixin

from bench import bench_trainer


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1,
                         pad_token_id=0, bos_token_id=2)
    return LlamaForCausalLM(config).eval()


def test_forced_generation_emits_the_recorded_completions_and_checks_the_prompts():
    model, original = tiny_model(), GenerationMixin.generate
    prompts = [[5, 6, 7], [8, 9]]  # left-padded below, as both trainers pass them
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    completions = [[10, 11, 1], [12, 13, 14, 15]]  # one ends with EOS (1), one runs to max_new_tokens
    steps = [{"step": 1, "prompt_ids": prompts, "completion_ids": completions}]
    with bench_trainer.forced_generation(steps):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True, temperature=0.7,
                             top_k=0, top_p=1.0, eos_token_id=1, pad_token_id=0)
        with pytest.raises(RuntimeError, match="more generate calls"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert out[:, 3:].tolist() == [[10, 11, 1, 0], [12, 13, 14, 15]]
    wrong = [{"step": 1, "prompt_ids": [[5, 6, 7], [8, 8]], "completion_ids": completions}]
    with bench_trainer.forced_generation(wrong), pytest.raises(RuntimeError, match="prompts are not those"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert GenerationMixin.generate is original  # the patch is gone


def test_counting_fused_lm_head_counts_trl_calls():
    from trl.trainer import utils

    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(32, 8)
    with bench_trainer.counting_fused_lm_head() as counted:
        before = counted.calls
        logp = utils._ChunkedLogProbFunction.apply(hidden, weight, None, torch.tensor([1, 2, 3, 4]), 1.0, 16, None,
                                                   1.0, ("log_probs",))[0]
        logp.sum().backward()
    assert counted.calls == before + 1 and hidden.grad is not None
    assert utils._ChunkedLogProbFunction is not counted  # restored


def test_recorded_generation_replays_through_forced_generation():
    """A sampled run's generate calls, recorded, are emitted again by forced_generation; completions end at their
    first EOS (1), or run to max_new_tokens."""
    model, original = tiny_model(), GenerationMixin.generate
    ids = torch.tensor([[5, 6, 7], [0, 8, 9], [0, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 1, 1]])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0,
                  top_p=1.0, pad_token_id=0)
    with torch.no_grad():
        model.lm_head.weight[1] *= 40  # EOS often, so that some completions end early
    torch.manual_seed(3)
    with bench_trainer.recorded_generation() as steps:
        sampled = [model.generate(**kwargs, eos_token_id=1), model.generate(**kwargs, eos_token_id=[1])]
    assert GenerationMixin.generate is original
    assert [s["step"] for s in steps] == [1, 2] and steps[0]["prompt_ids"] == [[5, 6, 7], [8, 9], [8, 9]]
    completions = [c for s in steps for c in s["completion_ids"]]
    assert any(c[-1] == 1 and len(c) < 8 for c in completions) and any(len(c) == 8 for c in completions)
    assert all(1 not in c[:-1] for c in completions)
    with bench_trainer.forced_generation(steps):
        replayed = [model.generate(**kwargs, eos_token_id=1) for _ in steps]  # another seed: forced, not sampled
    for out, again in zip(sampled, replayed):
        assert torch.equal(out, again)


def test_trl_config_takes_the_split_and_the_level_and_refuses_other_trainers(tmp_path):
    from gfpo_fast.train.config import TrainConfig

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4)
    args = bench_trainer.trl_config(TrainConfig(algorithm="gspo", steps_per_generation=4, **base), on_gpu=False)
    assert (args.steps_per_generation, args.generation_batch_size, args.importance_sampling_level) == (4, 32,
                                                                                                      "sequence")
    args = bench_trainer.trl_config(TrainConfig(generation_batch_size=16, **base), on_gpu=False)
    assert (args.steps_per_generation, args.importance_sampling_level) == (2, "token")
    with pytest.raises(ValueError, match="algorithm='gmpo'"):
        bench_trainer.trl_config(TrainConfig(algorithm="gmpo", **base), on_gpu=False)
