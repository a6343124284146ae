"""A training step builds no ``[B, T, V]`` logits: every vocab-sized tensor of the policy, old and reference passes
(forward and backward) holds one ``lm_head_chunk_size`` chunk of tokens, or the model's one kept position per row."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gfpo_fast.train.loop as loop
from gfpo_fast.train import train

CHUNK = 5  # tokens per lm_head chunk: well under the B * T = 8 * 6 tokens of a step


class VocabTensors(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns whose last dimension is the vocabulary size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.shapes = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # (expanded views, with a zero stride, allocate nothing: the ops' input checks make one)
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab and 0 not in t.stride():
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("overrides", [
    dict(algorithm="gfpo"),  # on-policy, prompts shared, dropped rows compacted
    dict(algorithm="grpo", beta=0.04, num_iterations=2, gradient_accumulation_steps=2, per_device_train_batch_size=4),
    dict(algorithm="gspo", gradient_checkpointing=True),
], ids=["gfpo", "grpo-ref-old-ga", "gspo-checkpointing"])
def test_a_training_step_builds_no_full_logits(make_config, monkeypatch, overrides):
    check_no_full_logits(make_config(max_steps=2, lm_head_chunk_size=CHUNK, **overrides), monkeypatch)


def test_a_qwen_vocabulary_step_builds_no_full_logits(make_config, monkeypatch, tmp_path):
    """The same at Qwen's real vocabulary, 151,936 (a 1-layer Qwen2 with the tiny tokenizer; the rewards see ids)."""
    from tiny import make_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = make_tokenizer()
    config = Qwen2Config(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    cfg = make_config(model_name_or_path=str(tmp_path / "qwen"), max_steps=1, lm_head_chunk_size=CHUNK,
                      algorithm="gfpo")
    check_no_full_logits(cfg, monkeypatch)


def check_no_full_logits(cfg, monkeypatch) -> None:
    """Trains ``cfg`` with the step's model passes watched and checks every vocab-sized tensor they make; with a
    reference model (beta != 0) or old log-probs (num_iterations > 1), every no-grad pass was watched too."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(cfg.model_name_or_path)
    vocab, hidden = model_config.vocab_size, model_config.hidden_size
    modes = []

    def watched(name, phase):
        def run(*args, **kwargs):
            mode = VocabTensors(vocab)
            modes.append((name, mode))
            with mode:
                return phase(*args, **kwargs)
        return run

    for name in ("old_and_ref_logprobs", "accumulate_gradients"):  # the step's model passes, forward and backward
        monkeypatch.setattr(loop, name, watched(name, getattr(loop, name)))
    summary = train(cfg)
    assert summary["step"] == cfg.max_steps
    shapes = [s for _, m in modes for s in m.shapes]
    assert shapes, "no vocab-sized tensor seen: the watch is not on the passes"
    # every vocab-sized tensor holds at most a chunk of tokens, or the one kept position of each row of a
    # micro-batch; the full logits of even one micro-batch would hold rows * T of them
    rows = cfg.per_device_train_batch_size
    bound = max(CHUNK, rows)
    assert rows * cfg.max_completion_length > bound
    for shape in shapes:
        if shape[-2:] == (hidden, vocab):  # the lm_head weight transposed (a GEMM operand), not activations
            continue
        assert math.prod(shape[:-1]) <= bound, shape
    if cfg.beta != 0 or cfg.num_iterations > 1:  # the reference and old passes were watched too
        no_grad_passes = [m for name, m in modes if name == "old_and_ref_logprobs"]
        assert no_grad_passes and all(m.shapes for m in no_grad_passes)
