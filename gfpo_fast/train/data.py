"""Prompts: the embedded arithmetic word problems, local datasets, and the group-aware prompt sampler.

A dataset is a list of dict rows with a ``prompt`` (a string, or a conversation: a list of
``{"role", "content"}`` messages); every other column is handed to the reward functions, as TRL does.

``dataset_name="arithmetic"`` generates seeded one-step word problems ("Maya has 7 apples. She buys 5
more. How many apples does Maya have now?") with an ``answer`` column. The stream is seeded by a
constant (runs with different ``--seed`` share it); its first ``num_eval`` problems are the eval split
(``TrainConfig.eval_split``: 128 unless ``eval_num_prompts`` says otherwise), and no train problem
repeats their text.
Local files: ``.jsonl``, ``.json`` (a list of rows, or ``{"data": [...]}``), ``.csv``, ``.parquet``
(needs pyarrow), or a directory written by ``datasets.Dataset.save_to_disk`` (needs datasets).
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

NAMES = ("Maya", "Liam", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Tom", "Mia", "Ben")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "cards", "shells", "balloons")
ADD = ("{n} has {a} {x}. {p} gets {b} more {x}. How many {x} does {n} have now?",
       "{n} had {a} {x} and found {b} more. How many {x} does {n} have in total?",
       "There are {a} {x} in a box. {n} puts {b} more {x} in the box. How many {x} are in the box now?")
SUB = ("{n} has {a} {x}. {p} gives {b} {x} to a friend. How many {x} does {n} have left?",
       "{n} had {a} {x} and lost {b} of them. How many {x} does {n} have now?",
       "There are {a} {x} in a box. {n} takes {b} {x} out. How many {x} are left in the box?")
PRONOUN = {n: ("She" if n in ("Maya", "Ava", "Zoe", "Lena", "Sara", "Mia") else "He") for n in NAMES}
INSTRUCTION = "Give the final answer as a number at the end."
ARITHMETIC_SEED = 1234  # fixed, so that runs with different --seed share the eval set


def arithmetic_problem(rng: random.Random, max_operand: int, ops: str) -> dict:
    """One problem row: ``prompt`` (a one-message conversation), ``answer`` (int as str) and ``question``."""
    op = rng.choice(ops)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if op == "+":
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        text, answer = rng.choice(ADD), a + b
    else:
        a = rng.randint(2, max_operand)
        b = rng.randint(1, a - 1)
        text, answer = rng.choice(SUB), a - b
    question = text.format(n=name, p=PRONOUN[name], a=a, b=b, x=item)
    return {"prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}], "answer": str(answer),
            "question": question}


def arithmetic_dataset(num_train: int, num_eval: int, seed: int = ARITHMETIC_SEED, max_operand: int = 9,
                       ops: str = "+-"):
    """Returns ``(train_rows, eval_rows)`` with distinct question texts; the eval rows never appear in train."""
    if max_operand < 2:
        raise ValueError(f"arithmetic_max_operand must be >= 2, got {max_operand}")
    if not ops or set(ops) - {"+", "-"}:
        raise ValueError(f"arithmetic_ops must be a non-empty string of '+' and '-', got {ops!r}")
    rng = random.Random(seed)
    rows, seen = [], set()
    budget = 50 * (num_train + num_eval)
    while len(rows) < num_train + num_eval and budget > 0:
        budget -= 1
        row = arithmetic_problem(rng, max_operand, ops)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    if len(rows) < num_train + num_eval:
        raise ValueError(f"only {len(rows)} distinct arithmetic problems exist for max_operand={max_operand}, "
                         f"ops={ops!r}; lower arithmetic_num_train / eval_num_prompts or raise max_operand")
    return rows[num_eval:], rows[:num_eval]


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if path.is_dir():
        try:
            import datasets
        except ImportError as err:
            raise ValueError(f"{path} is a directory: reading a saved `datasets` dataset needs "
                             "`pip install datasets`") from err
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{path} holds splits {list(ds)}; save the one to train on, or name it 'train'")
            ds = ds["train"]
        return [dict(r) for r in ds]
    if suffix == ".jsonl":
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json dataset must be a list of rows or {{'data': [rows]}}")
        return data
    if suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ValueError(f"reading {path} needs pyarrow: `pip install pyarrow`") from err
        return pq.read_table(path).to_pylist()
    raise ValueError(f"dataset {path}: unsupported format {suffix!r}; use .jsonl, .json, .csv, .parquet "
                     "or a datasets.save_to_disk directory")


def check_prompts(rows: list[dict], source: str) -> list[dict]:
    """Checks that every row has a usable ``prompt`` (string or list of role/content messages)."""
    if not rows:
        raise ValueError(f"dataset {source} has no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row:
            cols = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"dataset {source}: row {i} has no 'prompt' column (columns: {cols}); "
                             "rename the column holding the prompt to 'prompt'")
        p = row["prompt"]
        ok = isinstance(p, str) or (isinstance(p, list) and p and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in p))
        if not ok:
            raise ValueError(f"dataset {source}: row {i} 'prompt' must be a string or a list of "
                             f"{{'role', 'content'}} messages, got {p!r:.80}")
    return rows


def load_local_dataset(path: str) -> list[dict]:
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"dataset_name: {p} does not exist (use 'arithmetic' for the embedded task or a local file)")
    return check_prompts(_read_rows(p), str(p))


def is_conversational(prompt) -> bool:
    return isinstance(prompt, list)


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """Token ids of one prompt: the chat template with the generation prompt, or the plain text."""
    if is_conversational(prompt):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


class PromptSampler:
    """Seeded, resumable stream of prompt indices: a fresh permutation per epoch, identical on every rank.

    ``next(n)`` returns the next ``n`` indices of the global order; each rank then takes its own slice,
    so every group of ``G`` completions lives on one rank. ``state_dict`` is the position in the stream.
    """

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def next(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(n - len(out), self.num_rows - self.position)
            out += self._order[self.position:self.position + take]
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows:
            raise ValueError(f"the checkpoint was written for a dataset of {state['num_rows']} rows, this one has "
                             f"{self.num_rows}; resume with the same dataset")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation()


def load_rows(cfg) -> tuple[list[dict], list[dict]]:
    """``(train_rows, eval_rows)`` of the embedded arithmetic task or of local files (sizes: ``cfg.eval_split()``)."""
    held_out, num_eval = cfg.eval_split()
    if cfg.dataset_name == "arithmetic":
        train_rows, eval_rows = arithmetic_dataset(cfg.arithmetic_num_train, held_out,
                                                   max_operand=cfg.arithmetic_max_operand, ops=cfg.arithmetic_ops)
    else:
        train_rows = load_local_dataset(cfg.dataset_name)
        eval_rows = load_local_dataset(cfg.eval_dataset_name) if cfg.eval_dataset_name else []
    return train_rows, eval_rows[:num_eval]
