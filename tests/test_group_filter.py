"""gfpo_fast.group_filter: the group-filter call that the trainer and the TRL integration share."""
import math

import pytest
import torch

from gfpo_fast.group_filter import score_groups, takes_completion_ids


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
