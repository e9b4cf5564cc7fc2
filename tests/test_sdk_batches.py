"""The SDK's batch helpers and GRPO advantages, without a server: batch validation,
substeps split at group boundaries, merged metrics."""

from __future__ import annotations

import math

import pytest

from headway import InvalidArgument, Run, Turn
from headway.client import merge_metrics, split_substeps, training_items
from trainer_svc.datums import group_advantages


def test_group_advantages_by_hand():
    # Group 1: mean 0.5 → ±0.5. Group 2: all equal → no signal, zeros.
    adv, no_signal = group_advantages([1, 0, 0, 1, 2, 2, 2, 2], 4, normalize_std=False)
    assert adv == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0] and no_signal == 1
    # mean 1.5, population std sqrt(1.25): (r - 1.5) / (1.1180... + 1e-6)
    adv, no_signal = group_advantages([0, 1, 2, 3], 4, normalize_std=True)
    std = math.sqrt(1.25) + 1e-6
    assert adv == pytest.approx([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std], abs=1e-12)
    assert no_signal == 0
    # No grouping: the advantage is the reward itself.
    assert group_advantages([3.0, -1.0], 0, normalize_std=True) == ([3.0, -1.0], 0)


def test_batch_validation_and_substeps_without_a_server():
    run = Run(turns=[Turn([1, 2], [3], [-0.5])], reward=1.0)
    with pytest.raises(InvalidArgument, match="multiple of group_size"):
        training_items([run] * 3, group_size=2)
    with pytest.raises(InvalidArgument, match="empty"):
        training_items([], group_size=0)
    with pytest.raises(InvalidArgument, match="not a single item"):
        training_items("tr-abc", group_size=0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"batch\[1\].*no reward"):
        training_items([run, Run(turns=run.turns)], group_size=0)
    with pytest.raises(InvalidArgument, match=r"batch\[0\].*return_token_ids"):
        training_items([Run(reward=1.0)], group_size=0)
    with pytest.raises(InvalidArgument, match="cannot be scaled"):
        training_items([run, "tr-abc"], group_size=0, reward_scale=2.0)
    items = training_items([run, "tr-abc"], group_size=2, reward_scale=1.0)
    assert items[0].trajectory.reward == 1.0 and items[1].trace_id == "tr-abc"
    assert training_items([run], group_size=0, reward_scale=0.5)[0].trajectory.reward == 0.5

    # Substeps split at group boundaries, sizes within one group of each other.
    six = list(range(12))
    assert [len(p) for p in split_substeps(six, 4, 2)] == [8, 4]  # type: ignore[arg-type]
    assert [len(p) for p in split_substeps(six, 2, 4)] == [4, 4, 2, 2]  # type: ignore[arg-type]
    assert [len(p) for p in split_substeps(six, 0, 5)] == [3, 3, 2, 2, 2]  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="only 3 groups"):
        split_substeps(six, 4, 4)  # type: ignore[arg-type]

    merged = merge_metrics(
        [
            (
                {"loss:sum": 1.0, "groups/no_signal": 1, "ratio/mean": 1.0, "reward/mean": 0.0},
                10,
                4,
            ),
            (
                {"loss:sum": 2.0, "groups/no_signal": 0, "ratio/mean": 2.0, "reward/mean": 1.0},
                30,
                4,
            ),
        ]
    )
    assert merged == {
        "loss:sum": 3.0,
        "groups/no_signal": 1,
        "ratio/mean": pytest.approx(1.75),  # token-weighted
        "reward/mean": pytest.approx(0.5),  # run-weighted
    }
