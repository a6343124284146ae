"""The README's LoRA example (own data, TensorBoard) runs as written, on a tiny model and for fewer steps."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from gfpo_fast.train.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def readme_command() -> list[str]:
    """The flags of the README's ``python -m gfpo_fast.train`` command in its LoRA example block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"\*\*A LoRA run on your own data.*?```bash\n(.*?)```", text, re.S).group(1)
    command = block.split("\ntensorboard")[0].replace("\\\n", " ")
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "gfpo_fast.train"]
    return words[3:]


def test_the_readme_lora_example_runs(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    pytest.importorskip("tensorboard")
    monkeypatch.chdir(ROOT)  # the example's dataset path is relative to the checkout
    flags = readme_command()
    out = tmp_path / "run"
    # the tiny model, 2 steps with an eval at step 1, small batches: everything else as the README says
    overrides = ["--model_name_or_path", str(tiny_model), "--output_dir", str(out), "--max_steps", "2",
                 "--eval_steps", "1", "--eval_num_prompts", "4", "--num_generations", "4",
                 "--per_device_train_batch_size", "8", "--max_completion_length", "6"]
    assert main(flags + overrides) == 0
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert (out / "completions.jsonl").read_text().strip()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "checkpoints").rglob("*")}
    evals = json.loads((out / "eval.json").read_text())
    assert {"before", "step_1", "after"} <= set(evals)
