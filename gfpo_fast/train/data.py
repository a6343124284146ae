"""Prompts: the embedded arithmetic word problems, datasets as people have them, and the group-aware sampler.

A dataset is a list of dict rows with a ``prompt`` (a string, or a conversation: a list of
``{"role", "content"}`` messages; ``dataset_prompt_column`` names another column to copy it from, and
``dataset_answer_column`` the column copied to ``answer``); every other column is handed to the reward functions,
as TRL does.

``dataset_name="arithmetic"`` generates seeded one-step word problems ("Maya has 7 apples. She buys 5
more. How many apples does Maya have now?") with an ``answer`` column. The stream is seeded by a
constant (runs with different ``--seed`` share it); its first ``num_eval`` problems are the eval split
(``TrainConfig.eval_split``: 128 unless ``eval_num_prompts`` says otherwise), and no train problem
repeats their text.

Any other ``dataset_name`` (``load_split``), with ``dataset_config``, ``dataset_train_split`` and
``dataset_test_split`` as in TRL's ``ScriptArguments``:

* a local file, ``.jsonl``, ``.json`` (a list of rows, or ``{"data": [...]}``), ``.csv`` or ``.parquet``
  (needs pyarrow): read here, without ``datasets``, so that a file may mix text and conversational
  prompts (Arrow would refuse); a single file is one split, named ``train`` as ``datasets`` names it;
* a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``datasets.load_from_disk``);
* any other directory (data files such as ``train.jsonl`` and ``test.jsonl``) or a Hugging Face Hub dataset
  name: ``datasets.load_dataset(name, dataset_config, split=...)``. With ``HF_HUB_OFFLINE=1`` a Hub dataset
  comes from the local cache only.

The held-out eval rows are the first ones of ``dataset_test_split`` (of ``eval_dataset_name`` when given,
else of ``dataset_name``). ``system_prompt`` is prepended to every prompt (``with_system_prompt``) and
``chat_template_kwargs`` go to the tokenizer's chat template (``prompt_token_ids``).
"""
from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import torch

from .models import hub_offline

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


def _read_rows(path: Path, what: str = "dataset_name") -> list[dict]:
    """Rows of one local file, read without ``datasets`` (see the module docstring)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open() as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{number}: not a JSON object ({err.msg} at column {err.colno})") \
                            from err
        return rows
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
    raise ValueError(f"{what}: {path} has an unsupported format {suffix!r}; use .jsonl, .json, .csv, .parquet, a "
                     "save_to_disk directory or a folder of data files")


def check_prompts(rows: list[dict], source: str, prompt_column: str = "prompt",
                  answer_column: str = "answer") -> list[dict]:
    """The rows with ``prompt_column`` copied to ``prompt`` and ``answer_column`` (where a row has it) to ``answer``,
    the names the trainer and the built-in rewards read (a column already called so is replaced); checks that
    every row has a usable prompt (string or list of role/content messages)."""
    if not rows:
        raise ValueError(f"dataset {source} has no rows")
    renames = {c: n for c, n in ((prompt_column, "prompt"), (answer_column, "answer")) if c != n}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or prompt_column not in row:
            cols = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"dataset {source}: row {i} has no {prompt_column!r} column (columns: {cols}); name the "
                             "column holding the prompts with --dataset_prompt_column")
        if renames:
            row = rows[i] = {**{k: v for k, v in row.items() if k not in renames.values()},
                             **{renames.get(k, k): v for k, v in row.items() if k in renames}}
        p = row["prompt"]
        ok = isinstance(p, str) or (isinstance(p, list) and p and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in p))
        if not ok:
            raise ValueError(f"dataset {source}: row {i} 'prompt' must be a string or a list of "
                             f"{{'role', 'content'}} messages, got {p!r:.80}")
    return rows


FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def _looks_like_path(name: str) -> bool:
    """A name that can only mean a local path (a Hub name is ``name`` or ``owner/name``)."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or Path(name).suffix.lower() in FILE_FORMATS)


def _import_datasets(what: str, name: str):
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"{what}={name!r} is read with the `datasets` package, which is not installed: "
                         "`pip install datasets` (local .jsonl/.json/.csv/.parquet files need no datasets)") from err
    return datasets


def _pick_split(splits: dict, name: str, split: str | None, what: str, split_arg: str):
    """``splits[split]``, or the only split when ``split`` is None; errors list the splits there are."""
    if split is None:
        if len(splits) == 1:
            return next(iter(splits.values()))
        raise ValueError(f"{what}={name!r} has the splits {list(splits)}; name the one to use with --{split_arg}")
    if split not in splits:
        raise ValueError(f"{split_arg}={split!r}: {what}={name!r} has no such split; it has {list(splits)}")
    return splits[split]


def load_split(name: str, config: str | None = None, split: str | None = "train", *, what: str = "dataset_name",
               split_arg: str = "dataset_train_split", prompt_column: str = "prompt",
               answer_column: str = "answer") -> list[dict]:
    """Rows (dicts) of one split of a local file, a local directory or a Hugging Face Hub dataset, with
    ``prompt_column`` as ``prompt`` and ``answer_column`` as ``answer`` (``check_prompts``).

    ``split`` None means the dataset's only split (an error names the splits when there are several).
    ``what`` and ``split_arg`` are the options the name and the split came from, for the error messages.
    See the module docstring for what each kind of name is read with.
    """
    path = Path(name).expanduser()
    source = f"{what}={name!r}" + (f" (dataset_config={config!r})" if config else "")
    if path.is_file() or (path.is_dir() and _is_saved(path)):
        if config is not None:
            raise ValueError(f"dataset_config={config!r} names a configuration of a Hub dataset or data folder; "
                             f"{what}={name!r} is a single file or a saved dataset, which has none: leave it unset")
        if path.is_file():
            if split not in (None, "train"):
                raise ValueError(f"{split_arg}={split!r}: {what}={name!r} is a single file, whose only split is "
                                 "'train'; put the held-out rows in a file of their own and pass it as "
                                 "eval_dataset_name")
            return check_prompts(_read_rows(path, what), str(path), prompt_column, answer_column)
        datasets = _import_datasets(what, name)
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = _pick_split(ds, name, split, what, split_arg)
        elif split not in (None, "train"):
            raise ValueError(f"{split_arg}={split!r}: {what}={name!r} is a saved single Dataset (one split, used "
                             "as 'train'); save a DatasetDict with that split, or pass the held-out rows as "
                             "eval_dataset_name")
        return check_prompts(ds.to_list(), str(path), prompt_column, answer_column)
    if not path.exists() and _looks_like_path(name):
        raise ValueError(f"{what}: {path} does not exist (expected 'arithmetic', a local .jsonl/.json/.csv/.parquet "
                         "file or folder, or a Hugging Face Hub dataset name such as openai/gsm8k)")
    datasets = _import_datasets(what, name)
    try:
        loaded = datasets.load_dataset(str(path) if path.is_dir() else name, config, split=split)
    except ValueError as err:
        if "split" in str(err).lower() and split is not None:
            raise ValueError(f"{split_arg}={split!r}: {source} has no such split ({err})") from err
        raise ValueError(f"{source}: could not load it: {err}") from err
    except Exception as err:  # network, missing repository, unreadable files: say which option and how to fix it
        if path.is_dir():
            hint = "expected a folder of data files (e.g. train.jsonl, test.jsonl) or a save_to_disk directory"
        elif hub_offline():
            hint = ("offline mode (HF_HUB_OFFLINE=1) reads the local cache only, and it is not there: load it once "
                    "online, or unset HF_HUB_OFFLINE, or pass a local file or folder")
        else:
            hint = ("expected 'arithmetic', a local .jsonl/.json/.csv/.parquet file or folder, or a Hugging Face Hub "
                    "dataset name (owner/name) reachable from here; without a network set HF_HUB_OFFLINE=1 to use "
                    "the local cache")
        raise ValueError(f"{source}: could not load it ({type(err).__name__}: {err}); {hint}") from err
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, name, None, what, split_arg)
    return check_prompts(loaded.to_list(), source, prompt_column, answer_column)


def _is_saved(path: Path) -> bool:
    """Whether ``path`` was written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def with_system_prompt(rows: list[dict], system_prompt: str) -> list[dict]:
    """The rows with ``system_prompt`` in front of every prompt (new row dicts; the input is left as it is).

    A conversation gets it as a first ``{"role": "system"}`` message; a conversation that already starts
    with a system message is an error (two would be ambiguous, and many chat templates refuse them). A
    plain-text prompt gets it as text: ``system_prompt``, a blank line, then the prompt, since a plain
    prompt goes to the model without a chat template.
    """
    out = []
    for i, row in enumerate(rows):
        prompt = row["prompt"]
        if is_conversational(prompt):
            if prompt[0]["role"] == "system":
                raise ValueError(f"system_prompt: row {i}'s prompt already starts with a system message "
                                 f"({prompt[0]['content']!r:.60}); leave system_prompt unset, or drop the "
                                 "dataset's system messages")
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        else:
            prompt = f"{system_prompt}\n\n{prompt}"
        out.append({**row, "prompt": prompt})
    return out


def is_conversational(prompt) -> bool:
    return isinstance(prompt, list)


def prompt_token_ids(tokenizer, prompt, chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of one prompt: a conversation through the tokenizer's chat template with the generation
    prompt (``chat_template_kwargs``, e.g. ``{"enable_thinking": False}``, reach the template), plain text
    tokenized as it is (no template, so ``chat_template_kwargs`` do not apply)."""
    if is_conversational(prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the dataset's prompts are conversations (lists of messages), but the tokenizer of "
                             "model_name_or_path has no chat template; use a model with one (an instruct model), "
                             "or plain-text prompts")
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, **(chat_template_kwargs or {}))["input_ids"])
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


def is_empty(prompt) -> bool:
    """A prompt with no text: an empty (or blank) string, or messages whose contents are all blank."""
    if is_conversational(prompt):
        return all(not str(m["content"]).strip() for m in prompt)
    return not prompt.strip()


def screen_prompts(rows: list[dict], tokenizer, model_config, cfg, split: str) -> tuple[list[dict], list[list[int]],
                                                                                        list[str]]:
    """Tokenizes the prompts of ``rows`` (``prompt_token_ids``) and applies ``cfg.invalid_prompts`` to the empty ones
    and to those longer than the model's context (``max_position_embeddings``) less ``max_completion_length``, or
    than ``max_prompt_length`` when that is smaller:
    'error' raises a ``ValueError`` with their count and first row, 'drop' leaves them out, 'truncate' keeps the last
    tokens of a long prompt (drops the empty ones). Returns ``(rows, token ids, notes)``, a note per change; done
    before step 1, so that no prompt fails mid-run. ``split``: 'train' or 'eval', for the messages."""
    ids = [prompt_token_ids(tokenizer, r["prompt"], cfg.chat_template_kwargs) for r in rows]
    context = getattr(model_config, "max_position_embeddings", None)
    room = None if context is None else context - cfg.max_completion_length
    if room is not None and room < 1:
        raise ValueError(f"max_completion_length={cfg.max_completion_length} leaves no room for a prompt in the "
                         f"model's context of {context} tokens; lower it")
    limit = f"the model's context of {context} less max_completion_length={cfg.max_completion_length}"
    if cfg.max_prompt_length is not None and (room is None or cfg.max_prompt_length < room):
        room, limit = cfg.max_prompt_length, "max_prompt_length"
    blank = [not p or is_empty(r["prompt"]) for r, p in zip(rows, ids)]
    empty = [i for i, b in enumerate(blank) if b]
    long = [i for i, p in enumerate(ids) if room is not None and len(p) > room and not blank[i]]
    if not empty and not long:
        return rows, ids, []
    found = []
    if empty:
        found.append(f"{len(empty)} empty (first: row {empty[0]})")
    if long:
        found.append(f"{len(long)} longer than {room} tokens, {limit} (first: row {long[0]}, {len(ids[long[0]])} "
                     "tokens)")
    what = f"{split} prompts: {' and '.join(found)}"
    if cfg.invalid_prompts == "error":
        raise ValueError(f"{what}; fix the data, or pass --invalid_prompts drop (leave them out) or truncate (keep "
                         "the end of a long prompt)")
    if cfg.invalid_prompts == "truncate":
        ids = [p[-room:] if len(p) > room else p for p in ids]
        drop = set(empty)
    else:
        drop = set(empty) | set(long)
    kept = [i for i in range(len(rows)) if i not in drop]
    if split == "train" and not kept:
        raise ValueError(f"{what}: invalid_prompts={cfg.invalid_prompts!r} leaves no train prompt")
    action = "truncated the long ones, dropped the empty ones" if cfg.invalid_prompts == "truncate" else "dropped them"
    return [rows[i] for i in kept], [ids[i] for i in kept], [f"{what}: {action} ({len(kept)} of {len(rows)} kept)"]


def load_rows(cfg) -> tuple[list[dict], list[dict]]:
    """``(train_rows, eval_rows)`` as configured (sizes: ``cfg.eval_split()``), ``cfg.system_prompt`` applied.

    The embedded arithmetic task holds out its own problems. Another dataset trains on
    ``dataset_train_split``; its eval rows are the first ones of ``dataset_test_split``, of
    ``eval_dataset_name`` when given (its only split when ``dataset_test_split`` is None), else of
    ``dataset_name``; with neither there are no eval rows.
    """
    held_out, num_eval = cfg.eval_split()
    columns = dict(prompt_column=cfg.dataset_prompt_column, answer_column=cfg.dataset_answer_column)
    if cfg.dataset_name == "arithmetic":
        train_rows, eval_rows = arithmetic_dataset(cfg.arithmetic_num_train, held_out,
                                                   max_operand=cfg.arithmetic_max_operand, ops=cfg.arithmetic_ops)
    else:
        train_rows = load_split(cfg.dataset_name, cfg.dataset_config, cfg.dataset_train_split, **columns)
        if cfg.eval_dataset_name:
            eval_rows = load_split(cfg.eval_dataset_name, None, cfg.dataset_test_split, what="eval_dataset_name",
                                   split_arg="dataset_test_split", **columns)
        elif cfg.dataset_test_split:
            eval_rows = load_split(cfg.dataset_name, cfg.dataset_config, cfg.dataset_test_split,
                                   split_arg="dataset_test_split", **columns)
        else:
            eval_rows = []
    eval_rows = eval_rows[:num_eval]
    if cfg.system_prompt is not None:
        train_rows, eval_rows = with_system_prompt(train_rows, cfg.system_prompt), \
            with_system_prompt(eval_rows, cfg.system_prompt)
    return train_rows, eval_rows
