"""Reward and filter functions the tests load by ``module:function`` (this directory is on sys.path)."""
import os
import signal


def id_parity(completion_ids, **kwargs):
    """Varies within every group of a random model: a stand-in for a learnable reward."""
    return [float(sum(ids) % 5) for ids in completion_ids]


def raises(completions, **kwargs):
    raise KeyError("boom")


def wrong_count(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def raise_at_step_2(completion_ids, trainer_state, **kwargs):
    if trainer_state.global_step == 2:
        raise RuntimeError("reward server down")
    return id_parity(completion_ids)


def sigterm_at_step_1(completion_ids, trainer_state, **kwargs):
    if trainer_state.global_step == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return id_parity(completion_ids)


def shortest_text(group_completions, group_rewards):
    return [[-len(str(c)) for c in group] for group in group_completions]


def count_a(completions, **kwargs):
    """Fraction of 'a' characters: a reward a random char-level model can learn in a few steps."""
    return [c[-1]["content"].count("a") / 8 for c in completions]


def sigint_at_step_1(completion_ids, trainer_state, **kwargs):
    if trainer_state.global_step == 1:
        os.kill(os.getpid(), signal.SIGINT)
    return id_parity(completion_ids)


def all_none(completions, **kwargs):
    """No reward for any completion (a reward server that answers nothing)."""
    return [None] * len(completions)


def needs_difficulty(completions, difficulty, **kwargs):
    """Reads a dataset column the tests leave out."""
    return [0.0] * len(completions)


def varies_on_even_answers(completion_ids, answer, **kwargs):
    """id_parity for the prompts whose answer is even, 1.0 for every completion of the others: about half the
    groups have no reward variance."""
    return [float(sum(ids) % 5) if int(a) % 2 == 0 else 1.0 for ids, a in zip(completion_ids, answer)]
