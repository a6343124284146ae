"""gfpo_fast.group_filter: the group-filter call that the trainer and the TRL integration share, and GroupFilter, the
GFPO step of the trainer and the verl integration."""
import math

import pytest
import torch

from gfpo_fast.group_filter import SCORES, GroupFilter, score_groups, takes_completion_ids


def test_groups_rewards_and_ids_reach_the_filter():
    seen = {}

    def shortest(group_completions, group_rewards, group_completion_ids):
        seen.update(completions=group_completions, rewards=group_rewards, ids=group_completion_ids)
        return [[-len(ids) for ids in group] for group in group_completion_ids]

    ids = [[1], [1, 2, 3], [4, 5], [6]]
    rewards = torch.tensor([1.0, math.nan, 0.5, 2.0])  # a missing reward reaches the filter as 0
    scores = score_groups(shortest, ["a", "bcd", "ef", "g"], rewards, 2, completion_ids=ids)
    assert seen == {"completions": [["a", "bcd"], ["ef", "g"]], "rewards": [[1.0, 0.0], [0.5, 2.0]],
                    "ids": [[[1], [1, 2, 3]], [[4, 5], [6]]]}
    assert scores.dtype == torch.float32 and scores.tolist() == [-1.0, -3.0, -2.0, -1.0]


def test_ids_go_only_to_filters_that_take_them():
    def plain(group_completions, group_rewards):
        return [[0.0] * len(g) for g in group_completions]

    def kwargs(group_completions, group_rewards, **more):
        assert "group_completion_ids" in more
        return [[0.0] * len(g) for g in group_completions]

    assert not takes_completion_ids(plain) and takes_completion_ids(kwargs)
    for f in (plain, kwargs):
        assert score_groups(f, ["a", "b"], torch.zeros(2), 2, completion_ids=[[1], [2]]).tolist() == [0.0, 0.0]


def test_wrong_shape_names_the_filter():
    with pytest.raises(ValueError, match=r"my filter must return scores of shape \(2, 2\) .* got shape \(2, 3\)"):
        score_groups(lambda group_completions, group_rewards: [[0, 0, 0]] * 2, list("abcd"), torch.zeros(4), 2,
                     name="my filter")


def test_length_filter_and_adaptive_k():
    G = 8
    f = GroupFilter("length", G, 4, adaptive=False, scale_rewards="group")
    rewards = torch.tensor([1.0, 0, 1, 0, 1, 0, 1, 0] * 2)
    lengths = torch.arange(16, 0, -1)
    adv, keep = f(rewards, lengths, [])
    assert keep.view(2, G).sum(1).tolist() == [4, 4] and keep.view(2, G)[:, 4:].all()  # the 4 shortest
    assert adv[~keep].abs().sum() == 0
    # adaptive difficulty: group means 0, 1/8, 1/2, 7/8 are the four quartiles, hardest first -> k0 + 2 ... k0 - 1
    adaptive = GroupFilter("length", G, 4, adaptive=True, scale_rewards="group")
    rewards = torch.zeros(4, G)
    for g, ones in enumerate((0, 1, 4, 7)):
        rewards[g, :ones] = 1.0
    adv, keep = adaptive(rewards.reshape(-1), torch.arange(4 * G), [])
    assert keep.view(4, G).sum(1).tolist() == [6, 5, 4, 3]
    assert len(adaptive.history) == 4


def test_token_efficiency_keeps_the_most_reward_per_token():
    rewards = torch.tensor([1.0, 1.0, math.nan, 2.0])  # a missing reward scores 0
    lengths = torch.tensor([4, 2, 1, 0])  # a length of 0 counts as 1
    assert SCORES["token_efficiency"](rewards, lengths).tolist() == [0.25, 0.5, 0.0, 2.0]
    _, keep = GroupFilter("token_efficiency", 4, 2, adaptive=False, scale_rewards="group")(rewards, lengths, [])
    assert keep.tolist() == [False, True, False, True]


def test_a_user_filter_is_loaded_from_a_file_and_its_shape_checked(tmp_path):
    (tmp_path / "my_filters.py").write_text("def shortest(group_completions, group_rewards):\n"
                                            "    return [[-len(c) for c in group] for group in group_completions]\n")
    f = GroupFilter(f"{tmp_path / 'my_filters.py'}:shortest", 4, 2, adaptive=False, scale_rewards="group")
    _, keep = f(torch.zeros(4), torch.ones(4), ["aaa", "b", "cc", "d"])
    assert keep.tolist() == [False, True, False, True]
    f.user_func = lambda group_completions, group_rewards: [[1.0, 2.0]]
    with pytest.raises(ValueError, match="group_filter '.*my_filters.py:shortest' must return scores of shape "
                                         "\\(1, 4\\)"):
        f(torch.zeros(4), torch.ones(4), ["a", "b", "c", "d"])


@pytest.mark.parametrize("name, message", [
    ("shortest", "group_filter: 'shortest' is neither a built-in nor 'module:function'"),
    ("no_such_module_xyz:f", "group_filter: cannot import 'no_such_module_xyz'"),
    ("math:no_such_function", "group_filter: 'math' has no function 'no_such_function'"),
])
def test_a_bad_filter_name_is_refused_when_built(name, message):
    with pytest.raises(ValueError, match=message):
        GroupFilter(name, 4, 2, adaptive=False, scale_rewards="group")
