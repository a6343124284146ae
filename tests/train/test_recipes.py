"""The recipe knobs of the trainer on the tiny model: off-policy mini-batches (steps_per_generation), dynamic
sampling, reward models, the prompt / answer columns, max_prompt_length and the sampler's extra knobs."""
from __future__ import annotations

import json
import types

import pytest
import torch
from tiny import CHAT_TEMPLATE, make_tokenizer

import gfpo_fast as gf
from gfpo_fast.train import train
from gfpo_fast.train.data import load_split, screen_prompts
from gfpo_fast.train.dynamic_sampling import pick_groups
from gfpo_fast.train.generation import generate_transformers
from gfpo_fast.train.rewards import RewardModel, build_reward_funcs

from trainer_runs import read_jsonl, train_rows


def make_reward_model(path, seed: int = 1):
    """A 1-layer LlamaForSequenceClassification (one label) with the tiny tokenizer, saved to ``path``."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- steps_per_generation
def test_a_generation_batch_is_split_into_off_policy_mini_batches(make_config, monkeypatch):
    """steps_per_generation=2: one generate call of 2 x 8 rows, old log-probs once, then two optimizer steps; the
    second step's importance ratio has moved away from 1 and its clipping engages."""
    import gfpo_fast.train.loop as loop

    generated, calls = [], []
    original_generate, original_loss = loop.generate, gf.fused_linear_policy_loss

    def spy_generate(model, tokenizer, vllm, prompts, *args, **kwargs):
        generated.append(len(prompts))
        return original_generate(model, tokenizer, vllm, prompts, *args, **kwargs)

    def spy_loss(hidden, **kwargs):
        loss, metrics = original_loss(hidden, **kwargs)
        head = {k: kwargs[k] for k in ("weight", "bias", "scale", "softcap") if k in kwargs}
        logp = gf.fused_linear_logprobs(hidden.detach(), token_ids=kwargs["token_ids"],
                                        temperature=kwargs["temperature"], **head)
        mask = kwargs["mask"].bool()
        ratio = torch.exp(logp - kwargs["old_logp"])[mask]
        calls.append({"ratio_dev": float((ratio - 1).abs().max().detach()), "rows": hidden.shape[0],
                      "clipped": float(metrics["clip_ratio/region_mean"])})
        return loss, metrics

    monkeypatch.setattr(loop, "generate", spy_generate)
    monkeypatch.setattr(gf, "fused_linear_policy_loss", spy_loss)
    summary = train(make_config(steps_per_generation=2, max_steps=2, learning_rate=1e-2, epsilon=0.05,
                                algorithm="grpo", loss_type="dapo"))
    assert generated == [16] and [c["rows"] for c in calls] == [8, 8]
    first, second = calls
    assert first["ratio_dev"] < 1e-4 and first["clipped"] == 0.0  # old log-probs are the policy's before step 1
    assert second["ratio_dev"] > 0.05 and second["clipped"] > 0.0
    assert [r["step"] for r in train_rows(read_jsonl(summary["metrics"]))] == [2]


def test_generation_batch_size_and_its_checks(make_config):
    cfg = make_config(generation_batch_size=24)
    assert cfg.steps_per_generation_for(1) == 3
    with pytest.raises(ValueError, match="generation_batch_size=24 must be a multiple of .* = 16"):
        cfg.steps_per_generation_for(2)
    with pytest.raises(ValueError, match="steps_per_generation=3 must be a multiple of gradient_accumulation_steps=2"):
        make_config(steps_per_generation=3, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match="give one"):
        make_config(steps_per_generation=2, generation_batch_size=16)


# ----------------------------------------------------------------------------- dynamic sampling
def test_pick_groups_prefers_varied_groups_and_fills_only_when_short():
    # 2 rounds of 2 processes x 2 groups, process-major: rank 0 varies in (0, 0) and (1, 1), rank 1 in (1, 0) only
    rounds = [torch.tensor([True, False, False, False]), torch.tensor([False, True, True, False])]
    picks, dropped, filled = pick_groups(rounds, 2, 2)
    assert picks == [[(0, 0), (1, 1)], [(1, 0), (0, 0)]]  # rank 1 is short: its first flat group fills
    assert (dropped, filled) == (4, 1)


def test_dynamic_sampling_trains_only_groups_with_variance_at_full_size(make_config, monkeypatch):
    import gfpo_fast.train.loop as loop

    batches, original = [], loop.make_batch

    def spy(ro, scores, *args, **kwargs):
        batches.append((ro.completion_ids.shape[0], scores.rewards[:, 0].view(-1, 4)))
        return original(ro, scores, *args, **kwargs)

    monkeypatch.setattr(loop, "make_batch", spy)
    summary = train(make_config(max_steps=3, dynamic_sampling=True, dynamic_sampling_max_draws=8,
                                reward_funcs=["reward_fns:varies_on_even_answers"]))
    rows = train_rows(read_jsonl(summary["metrics"]))
    assert len(batches) == 3
    for size, groups in batches:
        assert size == 8 and groups.shape == (2, 4)  # the full batch: 2 groups of 4
        assert (groups.max(1).values > groups.min(1).values).all()  # every trained group varies
    assert all(r["frac_reward_zero_std"] == 0.0 and r["dynamic_sampling/filled_groups"] == 0 for r in rows)
    assert sum(r["dynamic_sampling/dropped_groups"] for r in rows) > 0  # the flat half was drawn and left out
    assert all(r["dynamic_sampling/draws"] >= 1 for r in rows)


# ----------------------------------------------------------------------------- reward models
def test_a_reward_model_scores_as_trl_does(tmp_path):
    path = make_reward_model(tmp_path / "rm")
    names, funcs = build_reward_funcs(["accuracy", str(path)], 8)
    rm = funcs[1]
    assert names == ["accuracy", "rm"] and isinstance(rm, RewardModel)
    prompts = [[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "What is 10 - 3?"}]]
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "it is 7, I think"}]]
    texts = rm.texts(prompts, completions)
    assert texts[0] == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"  # chat template
    batched = rm(prompts=prompts, completions=completions)  # one right-padded batch
    alone = [rm(prompts=[p], completions=[c])[0] for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(alone, abs=1e-5) and batched[0] != batched[1]
    assert rm(prompts=["2+2="], completions=[" 4"]) == pytest.approx(
        [rm.model(**rm.tokenizer(["2+2= 4"], return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()])

    other = tmp_path / "other-tokenizer"  # reward_processing_classes: another template reaches the model
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace("<|im_start|>", "<|im_start|>#")
    tok.save_pretrained(other)
    _, (_, rm2) = build_reward_funcs(["format", str(path)], 8, ["none", str(other)])
    assert rm2.texts(prompts, completions)[0].startswith("<|im_start|>#user")
    assert rm2(prompts=prompts, completions=completions) != pytest.approx(batched)
    with pytest.raises(ValueError, match="reward_processing_classes: .* a built-in, which takes no tokenizer"):
        build_reward_funcs(["format"], 8, [str(other)])


def test_the_trainer_trains_on_a_reward_model(make_config, tmp_path):
    path = make_reward_model(tmp_path / "rm")
    summary = train(make_config(reward_funcs=[str(path)], max_steps=1))
    row = train_rows(read_jsonl(summary["metrics"]))[0]
    assert row["rewards/rm/std"] > 0


# ----------------------------------------------------------------------------- data and generation knobs
def test_prompt_and_answer_columns_and_max_prompt_length(tmp_path, tiny_model):
    data = tmp_path / "gsm.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "solution": a, "answer": "junk"}) for q, a in
                              [("Tom has 3 apples and buys 4 more. How many?", "3 + 4 = 7\n#### 7"),
                               ("x" * 40, "#### 1"), ("Two plus two?", "#### 4")]))
    rows = load_split(str(data), prompt_column="question", answer_column="solution")
    assert rows[0]["prompt"].startswith("Tom has") and rows[0]["answer"] == "3 + 4 = 7\n#### 7"
    with pytest.raises(ValueError, match="no 'query' column .*--dataset_prompt_column"):
        load_split(str(data), prompt_column="query")
    tok, model_config = make_tokenizer(), types.SimpleNamespace(max_position_embeddings=512)
    cfg = types.SimpleNamespace(chat_template_kwargs=None, max_completion_length=6, max_prompt_length=30,
                                invalid_prompts="error")
    with pytest.raises(ValueError, match="2 longer than 30 tokens, max_prompt_length"):
        screen_prompts(rows, tok, model_config, cfg, "train")
    cfg.invalid_prompts = "truncate"
    kept, ids, notes = screen_prompts(rows, tok, model_config, cfg, "train")
    assert [len(i) for i in ids] == [30, 30, 13] and "truncated the long ones" in notes[0]
    cfg.invalid_prompts = "drop"
    kept, ids, notes = screen_prompts(rows, tok, model_config, cfg, "train")
    assert [r["prompt"] for r in kept] == ["Two plus two?"] and "(1 of 3 kept)" in notes[0]


def test_min_p_repetition_penalty_and_generation_kwargs(tiny_model):
    from transformers import AutoModelForCausalLM

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model), make_tokenizer()
    prompts = [tok("abc")["input_ids"], tok("hello")["input_ids"]]
    common = dict(max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, eos_ids=[tok.eos_token_id])
    greedy = generate_transformers(model, tok, prompts, do_sample=False, **common).completion_ids
    torch.manual_seed(0)  # min_p=1 keeps only the most likely token: sampling is greedy
    assert torch.equal(generate_transformers(model, tok, prompts, do_sample=True, min_p=1.0, **common).completion_ids,
                       greedy)
    penalised = generate_transformers(model, tok, prompts, do_sample=True, repetition_penalty=50.0,
                                      generation_kwargs={"do_sample": False}, **common).completion_ids
    assert not torch.equal(penalised, greedy)  # generation_kwargs made it greedy; the penalty changed the tokens
    for row in penalised.tolist():
        assert len(set(row)) == len(row)  # no token twice


def test_a_gsm8k_style_dataset_trains_with_the_recipe_knobs(tiny_model, tmp_path):
    """The command of a DAPO-style recipe on a local GSM8K-like file: the prompt in a 'question' column, four
    optimizer steps per generation batch, dynamic sampling, the accuracy reward and a reward model."""
    from gfpo_fast.train.__main__ import main

    data = tmp_path / "gsm8k.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"Sam has {a} pens and gets {b} more. How many pens now?",
                                          "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
                              for a in range(1, 5) for b in range(1, 5)))
    rm = make_reward_model(tmp_path / "rm")
    run = tmp_path / "run"
    code = main(["--model_name_or_path", str(tiny_model), "--output_dir", str(run), "--dataset_name", str(data),
                 "--dataset_prompt_column", "question", "--steps_per_generation", "4", "--dynamic_sampling", "true",
                 "--reward_funcs", "accuracy", str(rm), "--reward_weights", "1.0", "1.0", "--num_generations", "4",
                 "--per_device_train_batch_size", "4", "--max_completion_length", "6", "--temperature", "1.0",
                 "--max_steps", "8", "--do_eval", "false", "--learning_rate", "1e-3"])
    assert code == 0
    rows = train_rows(read_jsonl(run / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [4, 8]  # two generation batches of four optimizer steps
    assert all(r["dynamic_sampling/draws"] >= 1 and r["frac_reward_zero_std"] == 0.0 for r in rows)
    assert all("rewards/accuracy/mean" in r and r["rewards/rm/std"] > 0 for r in rows)


def test_bad_recipe_values_are_refused_before_anything_loads(make_config):
    with pytest.raises(ValueError, match="'acuracy' is neither a built-in .* a reward model"):
        build_reward_funcs(["acuracy"], 8)
    with pytest.raises(ValueError, match="dataset_prompt_column='question': dataset_name='arithmetic'"):
        make_config(dataset_prompt_column="question")
    with pytest.raises(ValueError, match="reward_processing_classes has 1 entries for 2"):
        make_config(reward_processing_classes=["none"], reward_funcs=["accuracy", "format"])
    with pytest.raises(ValueError, match="generation_kwargs must be a JSON object"):
        make_config(generation_kwargs="{bad")


def test_checkpoints_fall_after_the_generation_batch_that_reaches_save_steps(make_config, tmp_path):
    train(make_config(steps_per_generation=2, max_steps=6, save_steps=3, save_total_limit=5))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_use_bias_correction_kl_reaches_the_loss(make_config, monkeypatch):
    seen, original = [], gf.fused_linear_policy_loss

    def spy(hidden, **kwargs):
        seen.append(kwargs["use_bias_correction_kl"])
        return original(hidden, **kwargs)

    monkeypatch.setattr(gf, "fused_linear_policy_loss", spy)
    train(make_config(beta=0.1, use_bias_correction_kl=True, steps_per_generation=2, max_steps=2))
    assert seen == [True, True]
    with pytest.raises(ValueError, match="use_bias_correction_kl"):
        make_config(algorithm="gmpo", use_bias_correction_kl=True)


@pytest.mark.slow
def test_dynamic_sampling_and_mini_batches_keep_two_processes_in_sync(tiny_model, tmp_path):
    """Under DDP (2 CPU processes) every rank takes the same number of draws and optimizer steps (the choice is
    made from the gathered rewards) and the parameters stay equal."""
    import subprocess
    import sys

    from gfpo_fast.train.generation import _free_port

    from trainer_runs import HERE, launch_env

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port("127.0.0.1")), str(HERE / "dist_run.py"),
           "--model_name_or_path", str(tiny_model), "--output_dir", str(out), "--max_steps", "4", "--do_eval", "false",
           "--num_generations", "4", "--per_device_train_batch_size", "4", "--max_completion_length", "6",
           "--temperature", "1.0", "--arithmetic_num_train", "40", "--reward_funcs",
           "reward_fns:varies_on_even_answers", "--reward_weights", "1.0", "--learning_rate", "1e-3",
           "--steps_per_generation", "2", "--dynamic_sampling", "true"]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert torch.equal(torch.load(out / "params_rank0.pt"), torch.load(out / "params_rank1.pt"))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4]
    assert sum(r["dynamic_sampling/dropped_groups"] for r in rows) > 0
