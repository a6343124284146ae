"""Datasets and models the way people have them: local files and folders, saved datasets, splits, chat
templates with a system prompt and template variables, Hub names offline and online, and the GSM8K-style
rewards. No network: Hub calls are either refused by offline mode or replaced by a stand-in."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from gfpo_fast.train import models as models_mod
from gfpo_fast.train import parse_args, train
from gfpo_fast.train.data import load_rows, load_split, prompt_token_ids, with_system_prompt
from gfpo_fast.train.rewards import (
    accuracy_name,
    accuracy_reward,
    build_reward_funcs,
    math_accuracy_reward,
    reference_text,
)

from trainer_runs import read_jsonl

datasets = pytest.importorskip("datasets")


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


ROWS = [{"prompt": chat(f"What is {i} + 1?"), "answer": f"{i} plus 1 is {i + 1}.\n#### {i + 1}"} for i in range(6)]


@pytest.fixture
def saved_dict(tmp_path):
    """A DatasetDict with train and test splits, written by save_to_disk."""
    path = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                          "test": datasets.Dataset.from_list(ROWS[4:])}).save_to_disk(str(path))
    return path


@pytest.fixture
def json_folder(tmp_path):
    """A script-less folder of data files, as a Hub dataset repository holds them (load_dataset(path))."""
    path = tmp_path / "folder"
    path.mkdir()
    for split, rows in (("train", ROWS[:4]), ("test", ROWS[4:])):
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- loading and splits
def test_saved_dataset_dict_and_its_test_split(make_config, saved_dict):
    cfg = make_config(dataset_name=str(saved_dict), dataset_test_split="test", eval_num_prompts=1)
    train_rows, eval_rows = load_rows(cfg)
    assert train_rows == ROWS[:4]
    assert eval_rows == ROWS[4:5]  # the first eval_num_prompts rows of the test split
    assert load_rows(make_config(dataset_name=str(saved_dict)))[1] == []  # no test split named: no evals


def test_saved_single_dataset(tmp_path):
    path = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    assert load_split(str(path)) == ROWS
    with pytest.raises(ValueError, match="dataset_test_split='test': .* is a saved single Dataset"):
        load_split(str(path), split="test", split_arg="dataset_test_split")


def test_folder_of_json_files_through_load_dataset(make_config, json_folder):
    train_rows, eval_rows = load_rows(make_config(dataset_name=str(json_folder), dataset_test_split="test"))
    assert (train_rows, eval_rows) == (ROWS[:4], ROWS[4:])
    with pytest.raises(ValueError, match="dataset_test_split='tset': .* has no such split.*'train', 'test'"):
        load_rows(make_config(dataset_name=str(json_folder), dataset_test_split="tset"))
    with pytest.raises(ValueError, match="dataset_config='main'.*could not load"):
        load_rows(make_config(dataset_name=str(json_folder), dataset_config="main"))


def test_eval_dataset_name_takes_its_only_split(make_config, tmp_path, saved_dict):
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "held_out.json"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    eval_file.write_text(json.dumps(ROWS[4:]))
    assert load_rows(make_config(dataset_name=str(train_file), eval_dataset_name=str(eval_file))) == (ROWS[:4],
                                                                                                       ROWS[4:])
    with pytest.raises(ValueError, match="dataset_test_split='test': .* is a single file, whose only split is 'train'"):
        load_rows(make_config(dataset_name=str(train_file), dataset_test_split="test"))
    with pytest.raises(ValueError, match="eval_dataset_name=.* has the splits \\['train', 'test'\\]; name the one"):
        load_rows(make_config(dataset_name=str(train_file), eval_dataset_name=str(saved_dict)))


def test_file_formats_keep_working(tmp_path):
    rows = [{"prompt": "2+2=", "answer": "4"}, {"prompt": chat("1+1?"), "answer": "2"}]  # mixed: no Arrow here
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list([rows[0]]).to_parquet(str(tmp_path / "d.parquet"))
    assert load_split(str(tmp_path / "d.jsonl")) == rows
    assert load_split(str(tmp_path / "d.parquet")) == [rows[0]]


@pytest.mark.parametrize("name", ["./missing.jsonl", "/no/such/dir", "missing.csv"])
def test_missing_local_dataset(name):
    with pytest.raises(ValueError, match="dataset_name: .* does not exist"):
        load_split(name)


@pytest.mark.parametrize("offline, message", [
    (True, "offline mode \\(HF_HUB_OFFLINE=1\\) reads the local cache only"),
    (False, "a Hugging Face Hub dataset name \\(owner/name\\) reachable from here"),
])
def test_hub_dataset_that_does_not_load(monkeypatch, offline, message):
    """What datasets raises for a Hub name it cannot get, offline or online, becomes an error naming the option."""
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/gsm8k-copy' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setattr("gfpo_fast.train.data.hub_offline", lambda: offline)
    with pytest.raises(ValueError, match=f"dataset_name='someone/gsm8k-copy' \\(dataset_config='main'\\): could not "
                                         f"load it \\(ConnectionError: .*{message}"):
        load_split("someone/gsm8k-copy", "main")


def test_hub_dataset_gets_name_config_and_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ROWS[:2])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_split("openai/gsm8k", "main", "train") == ROWS[:2]
    assert calls == [("openai/gsm8k", "main", "train")]


@pytest.mark.parametrize("overrides", [dict(dataset_test_split="test"), dict(eval_dataset_name="x.jsonl"),
                                       dict(dataset_config="main"), dict(dataset_train_split="validation")])
def test_arithmetic_takes_no_splits(make_config, overrides):
    with pytest.raises(ValueError, match="dataset_name='arithmetic' has no configurations or splits"):
        make_config(**overrides)


# ----------------------------------------------------------------------------- prompts and chat templates
def thinking_tokenizer():
    from tiny import make_tokenizer

    tok = make_tokenizer()
    tok.chat_template = "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}" + \
        tok.chat_template
    return tok


def test_system_prompt_conversational_and_plain():
    rows = [{"prompt": chat("hi"), "answer": "1"}, {"prompt": "2+2=", "answer": "4"}]
    out = with_system_prompt(rows, "Be brief.")
    assert out[0]["prompt"] == [{"role": "system", "content": "Be brief."}, *chat("hi")]
    assert out[1]["prompt"] == "Be brief.\n\n2+2="
    assert rows[0]["prompt"] == chat("hi") and out[0]["answer"] == "1"  # the input rows are left alone
    with pytest.raises(ValueError, match="system_prompt: row 0's prompt already starts with a system message"):
        with_system_prompt(out, "Again.")


def test_chat_template_kwargs_reach_the_template():
    tok = thinking_tokenizer()
    prompt = [{"role": "system", "content": "S"}, *chat("hi")]
    plain = tok.decode(prompt_token_ids(tok, prompt))
    assert plain == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(prompt_token_ids(tok, prompt, {"enable_thinking": False})) == "/no_think" + plain
    assert tok.decode(prompt_token_ids(tok, "2+2=", {"enable_thinking": False})) == "2+2="  # no template: no effect


def test_conversations_need_a_chat_template():
    tok = thinking_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="prompts are conversations .* has no chat template"):
        prompt_token_ids(tok, chat("hi"))


def test_chat_template_kwargs_from_the_command_line_and_yaml(tmp_path):
    assert parse_args(["--chat_template_kwargs", '{"enable_thinking": false}']).chat_template_kwargs == {
        "enable_thinking": False}
    (tmp_path / "run.yaml").write_text("chat_template_kwargs:\n  enable_thinking: true\nsystem_prompt: Be brief.\n")
    cfg = parse_args(["--config", str(tmp_path / "run.yaml")])
    assert (cfg.chat_template_kwargs, cfg.system_prompt) == ({"enable_thinking": True}, "Be brief.")
    assert parse_args([]).chat_template_kwargs is None


@pytest.mark.parametrize("value, message", [
    ("{enable_thinking: false}", "chat_template_kwargs must be a JSON object such as"),
    ("[1, 2]", "chat_template_kwargs must be a mapping of template variables"),
    ('{"tokenize": false}', "chat_template_kwargs: \\['tokenize'\\] are set by the trainer itself"),
])
def test_bad_chat_template_kwargs(value, message):
    with pytest.raises(ValueError, match=message):
        parse_args(["--chat_template_kwargs", value])


def test_train_on_a_saved_chat_dataset_with_system_prompt(make_config, saved_dict):
    """End to end: conversational rows from a saved DatasetDict, a system prompt, template variables, evals on
    the test split, GSM8K-style answers scored by the accuracy reward; the prompts trained on open with the system
    message (completions.jsonl)."""
    cfg = make_config(dataset_name=str(saved_dict), dataset_test_split="test", system_prompt="Answer briefly.",
                      chat_template_kwargs='{"enable_thinking": false}', do_eval=True, eval_num_prompts=2,
                      reward_funcs=["accuracy", "reward_fns:id_parity"], reward_weights=[1.0, 1.0], max_steps=1,
                      log_completions=True)
    summary = train(cfg)
    assert summary["step"] == 1
    assert summary["evals"]["after"]["eval/num_prompts"] == 2
    rows = read_jsonl(Path(summary["metrics"]).with_name("completions.jsonl"))
    assert len(rows) == 8  # 2 prompts x G=4
    assert all(r["prompt"][0] == {"role": "system", "content": "Answer briefly."} for r in rows), rows[0]["prompt"]


# ----------------------------------------------------------------------------- models: Hub ids, offline and online
def test_hub_model_offline_and_not_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="model_name_or_path: 'nobody-here/no-such-model' is not a local path and "
                                         "not in the local Hugging Face cache, and offline mode .*`hf download"):
        models_mod.load_model_and_tokenizer("nobody-here/no-such-model")


def test_hub_model_online_may_download(monkeypatch):
    """Online, from_pretrained is allowed to download (local_files_only False); a failure names the option."""
    import transformers

    seen = []

    def fake_from_pretrained(path, **kwargs):
        seen.append((path, kwargs["local_files_only"]))
        raise OSError("We couldn't connect to the Hub")

    monkeypatch.setattr(models_mod, "hub_offline", lambda: False)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    with pytest.raises(ValueError, match="model_name_or_path: could not load 'someone/some-model' from the Hugging "
                                         "Face Hub.*set HF_HUB_OFFLINE=1.*OSError: We couldn't connect"):
        models_mod.load_model_and_tokenizer("someone/some-model")
    assert seen == [("someone/some-model", False)]


def test_local_model_never_downloads(monkeypatch, tiny_model):
    import transformers

    seen = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(path, **kwargs):
        seen.append(kwargs["local_files_only"])
        return real(path, **kwargs)

    monkeypatch.setattr(models_mod, "hub_offline", lambda: False)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    models_mod.load_model_and_tokenizer(str(tiny_model))
    assert seen == [True]


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("0", None), ("", None)])
def test_hub_offline_reads_the_environment(monkeypatch, value, offline):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert models_mod.hub_offline() is bool(offline)


# ----------------------------------------------------------------------------- GSM8K-style answers and rewards
def test_reference_text_and_accuracy_on_gsm8k_answers():
    assert reference_text("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert reference_text(" 7 ") == "7" and reference_text(7) == "7"
    completions = [[{"role": "assistant", "content": t}] for t in ("48 + 24 = 72 clips", "\\boxed{1,000}", "70")]
    assert accuracy_reward(completions, answer=["... #### 72", "#### 1,000", "#### 72"]) == [1.0, 1.0, 0.0]


def test_math_accuracy_without_math_verify(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify raises ImportError
    with pytest.raises(ValueError, match="'math_accuracy' needs the math-verify package.*`pip install math-verify`"):
        build_reward_funcs(["math_accuracy"], 8)
    with pytest.raises(ValueError, match="pip install math-verify"):
        math_accuracy_reward(["1"], answer=["1"])
    assert build_reward_funcs(["accuracy"], 8)[0] == ["accuracy"]  # the others do not need it


def test_math_accuracy_wiring_with_a_stand_in(monkeypatch):
    """The reward's own logic, with a stand-in math_verify (installed or not): the reference after '####', the
    'solution' column when there is no 'answer', None for a reference that does not parse, one parse per reference."""
    parsed = []

    def parse(text, parsing_timeout=None):
        parsed.append(text)
        return [] if text == "??" else [text.strip(". ")]

    fake = types.SimpleNamespace(parse=parse, verify=lambda gold, got, timeout_seconds=None: gold == got)
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    completions = [[{"role": "assistant", "content": c}] for c in ("12.", "13", "12")]
    assert math_accuracy_reward(completions, answer=["x #### 12"] * 3) == [1.0, 0.0, 1.0]
    assert parsed.count("12") == 2  # the reference once, the completion "12" once
    assert math_accuracy_reward(completions[:2], solution=["13", "??"]) == [0.0, None]
    with pytest.raises(ValueError, match="math_accuracy needs an 'answer' column"):
        math_accuracy_reward(completions, question=["q"] * 3)
    names, _ = build_reward_funcs(["math_accuracy", "format"], 8)
    assert accuracy_name(names) == "math_accuracy" and accuracy_name(["format"]) is None


def test_math_accuracy_with_math_verify():
    pytest.importorskip("math_verify")
    completions = [[{"role": "assistant", "content": c}] for c in (
        "Half of it: \\boxed{\\frac{1}{2}}", "So 0.5 in the end.", "It is 0.25", "The total is 1,000 apples.")]
    assert math_accuracy_reward(completions, answer=["#### 0.5", "\\frac{1}{2}", "0.5", "#### 1000"]) == [
        1.0, 1.0, 0.0, 1.0]
