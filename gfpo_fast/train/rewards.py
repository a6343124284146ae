"""Reward functions: built-ins and user functions, called with TRL's convention.

Every function is called with keyword arguments only (TRL ``GRPOTrainer._calculate_rewards``):
``prompts`` (one per row, each prompt repeated ``G`` times), ``completions`` (strings, or for
conversational prompts ``[{"role": "assistant", "content": text}]``), ``completion_ids`` (unpadded
id lists, EOS included when generated), every other dataset column as a list aligned with the rows,
``trainer_state`` (a ``transformers.TrainerState`` with ``global_step`` and ``max_steps``) and
``log_metric(name, value)`` (adds a scalar to this step's metrics). It returns one float (or ``None``,
meaning "no reward", NaN) per row.

Built-ins, by name:

* ``accuracy``: 1.0 if the final answer equals the ``answer`` column, else 0.0. The final answer is the
  content of the last ``\\boxed{...}`` if there is one, else the last number in the text (thousands
  commas dropped; ``12.0`` equals ``12``). A GSM8K-style ``answer`` (worked solution, then ``#### 42``)
  counts by what follows its last ``####``. Numbers only, no dependency.
* ``math_accuracy``: the same question asked of `math-verify <https://github.com/huggingface/Math-Verify>`_
  (``pip install math-verify``): the reference (``answer``, or TRL's ``solution`` column; after ``####`` if
  it has one) and the completion are parsed as LaTeX or expressions and compared symbolically, so
  ``\\boxed{\\frac{1}{2}}`` matches ``0.5``. ``None`` (no reward) for a row whose reference does not parse.
* ``format``: 1.0 if the completion ends with its answer: a number or ``\\boxed{...}`` on the last line,
  followed by nothing but punctuation.
* ``length``: ``-len(completion_ids) / max_completion_length`` (in ``[-1, 0]``; shorter is better).

User functions: ``package.module:function`` (importable) or ``path/to/file.py:function``.

Reward models: a local directory (or a Hub id, when it is a model there) holding a sequence-classification model
(``AutoModelForSequenceClassification``, one label) scores each prompt and completion as TRL does: a conversation
through the reward tokenizer's chat template, plain text as prompt + completion, one right-padded batch per call,
the first logit as the reward. The tokenizer is the model's own unless ``reward_processing_classes`` names another.

``REWARD_KINDS`` is the registry of these three kinds: each ``reward_funcs`` entry is built by the first kind
that claims it.
"""
from __future__ import annotations

import inspect
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..user_functions import load_function
from .data import is_conversational

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
ENDS_WITH_ANSWER = re.compile(r"(?:-?\d[\d,]*(?:\.\d+)?|\\boxed\{[^{}]*\})[\s.!)*]*$")


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something other than one number (or None) per completion."""


def completion_text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def as_completions(texts: list[str], rows: list[dict]) -> list:
    """Decoded texts in TRL's shape: a one-message assistant turn for conversational prompts."""
    return [[{"role": "assistant", "content": t}] if is_conversational(r["prompt"]) else t for t, r in zip(texts, rows)]


def parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def final_answer(text: str) -> float | None:
    """The answer a completion gives: the last ``\\boxed{}`` if any, else its last number, else ``None``."""
    boxed = BOXED.findall(text)
    if boxed:
        numbers = NUMBER.findall(boxed[-1])
        return parse_number(numbers[-1]) if numbers else None
    numbers = NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def reference_text(answer) -> str:
    """The reference answer of a row: the text after the last ``####`` of a GSM8K-style answer, else all of it."""
    text = str(answer)
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


def accuracy_reward(completions, answer, **kwargs) -> list[float]:
    out = []
    for completion, truth in zip(completions, answer):
        got, want = final_answer(completion_text(completion)), parse_number(reference_text(truth))
        out.append(float(got is not None and want is not None and math.isclose(got, want, abs_tol=1e-6)))
    return out


MATH_VERIFY_MISSING = ("reward_funcs: 'math_accuracy' needs the math-verify package, which is not installed: "
                       "`pip install math-verify`; or use 'accuracy' (numbers only, no dependency)")


def import_math_verify():
    """``(parse, verify)`` of math-verify, or a ValueError saying how to install it."""
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise ValueError(MATH_VERIFY_MISSING) from err
    return parse, verify


def math_accuracy_reward(completions, answer=None, solution=None, **kwargs) -> list[float | None]:
    """1.0 if math-verify finds the completion's answer equal to the reference, 0.0 if not, None if the
    reference does not parse (see the module docstring). Timeouts (math-verify's, by SIGALRM) only in
    the main thread, where signals work."""
    parse, verify = import_math_verify()
    references = answer if answer is not None else solution
    if references is None:
        raise ValueError("math_accuracy needs an 'answer' column (or TRL's 'solution') with the reference answers")
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    parsed = {}  # the G completions of a prompt share its reference: parse it once
    out = []
    for completion, ref in zip(completions, references):
        text = reference_text(ref)
        if text not in parsed:
            parsed[text] = parse(text, parsing_timeout=timeout)
        gold = parsed[text]
        if not gold:
            out.append(None)
            continue
        got = parse(completion_text(completion), parsing_timeout=timeout)
        out.append(float(bool(got) and verify(gold, got, timeout_seconds=timeout)))
    return out


math_accuracy_reward.columns_one_of = ("answer", "solution")  # read by check_columns

ACCURACY_REWARDS = ("accuracy", "math_accuracy")  # built-ins that measure correctness (the evals report them)


def accuracy_name(reward_names: list[str]) -> str | None:
    """The first correctness reward among ``reward_names`` (``ACCURACY_REWARDS``), or None: what an eval
    reports as accuracy."""
    return next((n for n in reward_names if n in ACCURACY_REWARDS), None)


def format_reward(completions, **kwargs) -> list[float]:
    return [float(bool(ENDS_WITH_ANSWER.search(completion_text(c).strip()))) for c in completions]


def make_length_reward(max_completion_length: int):
    def length_reward(completion_ids, **kwargs) -> list[float]:
        return [-len(ids) / max_completion_length for ids in completion_ids]

    return length_reward


class RewardModel:
    """A sequence-classification model as a reward function (TRL's convention; see the module docstring).

    ``model_path``: a transformers directory or Hub id; ``tokenizer_path``: the reward tokenizer (None: the model's
    own); ``chat_template_kwargs``: the trainer's, for conversational prompts; ``device``: where it scores.
    Loaded in float32, in eval mode, without gradients; a tokenizer without a pad token pads with its EOS.
    """

    def __init__(self, model_path: str, tokenizer_path: str | None = None, *, chat_template_kwargs: dict | None = None,
                 device="cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
        self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.chat_template_kwargs, self.device = chat_template_kwargs or {}, device

    def texts(self, prompts: list, completions: list) -> list[str]:
        """What the model reads: ``prompt + completion`` messages through the chat template, or the two texts."""
        if is_conversational(prompts[0]):
            return [self.tokenizer.apply_chat_template(p + c, tokenize=False, **self.chat_template_kwargs)
                    for p, c in zip(prompts, completions)]
        return [p + c for p, c in zip(prompts, completions)]

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        inputs = self.tokenizer(text=self.texts(prompts, completions), return_tensors="pt", padding=True,
                                padding_side="right", add_special_tokens=False).to(self.device)
        return self.model(**inputs).logits[:, 0].float().tolist()


def is_reward_model(spec: str) -> bool:
    """Whether ``spec`` is a local directory with a sequence-classification model's config (a Hub id: when
    ``spec`` has no ``:`` and is not a local path, the Hub is asked, or its local cache under HF_HUB_OFFLINE)."""
    if ":" in spec:
        return False
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or ())


@dataclass(frozen=True)
class RewardKind:
    """One kind of ``reward_funcs`` entry: ``claims(spec)`` says whether it is one, ``build(spec, context)``
    returns ``(name, function)``; ``context`` holds ``max_completion_length``, ``tokenizer`` (the entry's
    ``reward_processing_classes`` item or None), ``chat_template_kwargs`` and ``device``."""

    name: str
    claims: Callable[[str], bool]
    build: Callable[[str, dict], tuple[str, Callable]]


BUILTINS = {"accuracy": lambda ctx: accuracy_reward, "math_accuracy": lambda ctx: math_accuracy_reward,
            "format": lambda ctx: format_reward, "length": lambda ctx: make_length_reward(ctx["max_completion_length"])}


def _build_builtin(spec: str, ctx: dict):
    if spec == "math_accuracy":
        import_math_verify()  # now, not after the model has loaded
    return spec, BUILTINS[spec](ctx)


REWARD_KINDS = (
    RewardKind("built-in", lambda spec: spec in BUILTINS, _build_builtin),
    RewardKind("reward model", is_reward_model,
               lambda spec, ctx: (Path(spec).name, RewardModel(spec, ctx["tokenizer"], device=ctx["device"],
                                                               chat_template_kwargs=ctx["chat_template_kwargs"]))),
    RewardKind("function", lambda spec: ":" in spec,
               lambda spec, ctx: (spec.rsplit(":", 1)[-1], load_function(spec, "reward_funcs"))),
)


def build_reward_funcs(specs: list[str], max_completion_length: int, processing_classes: list[str] | None = None,
                       chat_template_kwargs: dict | None = None, device="cpu") -> tuple[list[str], list]:
    """``(names, functions)`` for the ``reward_funcs`` option, each entry built by the first of ``REWARD_KINDS``
    that claims it; ``processing_classes``: ``reward_processing_classes``, one per entry ('none': the reward
    model's own tokenizer), for the reward models among them."""
    if not specs:
        raise ValueError("reward_funcs is empty; name at least one (accuracy, math_accuracy, format, length, "
                         "module:function or a reward model's path)")
    tokenizers = [None if t in (None, "none") else t for t in processing_classes or [None] * len(specs)]
    built = []
    for spec, tokenizer in zip(specs, tokenizers):
        kind = next((k for k in REWARD_KINDS if k.claims(spec)), None)
        if kind is None:
            raise ValueError(f"reward_funcs: {spec!r} is neither a built-in ({', '.join(BUILTINS)}), a reward model "
                             "(a directory or Hub id of a sequence-classification model), nor 'module:function' / "
                             "'file.py:function'")
        if tokenizer is not None and kind.name != "reward model":
            raise ValueError(f"reward_processing_classes: {tokenizer!r} is given for reward_funcs entry {spec!r}, "
                             f"a {kind.name}, which takes no tokenizer; give 'none' for it")
        built.append(kind.build(spec, dict(max_completion_length=max_completion_length, tokenizer=tokenizer,
                                           chat_template_kwargs=chat_template_kwargs, device=device)))
    return [n for n, _ in built], [f for _, f in built]


CALL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric")  # not dataset columns


def check_columns(names: list[str], funcs: list, rows: list[dict], source: str) -> None:
    """Every row of ``rows`` has the dataset columns each reward function needs: its keyword parameters without a
    default (other than ``CALL_ARGUMENTS``), and one of ``func.columns_one_of`` when it sets that. A ``ValueError``
    names the function, the column and the columns there are, before any model loads."""
    if not rows:
        return
    columns = set.intersection(*(set(r) for r in rows))
    for name, func in zip(names, funcs):
        try:
            params = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):  # a builtin or C callable: nothing to read
            continue
        needed = [p.name for p in params if p.default is p.empty and p.name not in CALL_ARGUMENTS
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing = [repr(c) for c in needed if c not in columns]
        one_of = getattr(func, "columns_one_of", ())
        if one_of and not columns & set(one_of):
            missing.append(" or ".join(repr(c) for c in one_of))
        if missing:
            raise ValueError(f"reward function {name!r} needs the column {', '.join(missing)} in every row of "
                             f"{source}, which has {sorted(columns)}; add it, or choose other reward_funcs")


def score(funcs, names, rows: list[dict], completions: list, completion_ids: list[list[int]], trainer_state,
          metrics: dict) -> torch.Tensor:
    """Calls every reward function on the local rows; returns ``[N, F]`` float32 (NaN where ``None``)."""
    n = len(completions)
    columns = {k: [row[k] for row in rows] for k in rows[0] if k not in ("prompt", "completion", "completion_ids")}

    def log_metric(name: str, value: float) -> None:
        metrics[name] = float(value)

    out = torch.full((n, len(funcs)), math.nan)  # (N, F)
    for j, (name, func) in enumerate(zip(names, funcs)):
        try:
            values = func(prompts=[row["prompt"] for row in rows], completions=completions,
                          completion_ids=completion_ids, trainer_state=trainer_state, log_metric=log_metric, **columns)
        except Exception as err:
            raise RewardFunctionError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardFunctionError(f"reward function {name!r} must return a list of {n} floats (one per "
                                      f"completion), got {got}")
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RewardFunctionError(f"reward function {name!r} returned {v!r} for completion {i}; "
                                          "return a float or None")
            out[i, j] = float(v)
    return out
