"""trainer_svc.datums: inline Datum validation, Trajectory -> Datum conversion, GRPO group
advantages and batch assembly, against hand-worked expected arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from headway.errors import InvalidArgument, NotFound
from headway.tensors import to_tensor
from headway.v1 import common_pb2
from trainer_svc.datums import (
    Batch,
    DatumArrays,
    assemble_batch,
    check_vocab,
    datum_from_proto,
    group_advantages,
    trajectory_to_datums,
)

F32 = common_pb2.DTYPE_FLOAT32
NORM = 0.5 / (0.5 + 1e-6)  # |r - mean| / (population std + eps) for rewards {0, 1}


def ints(values: list[int]) -> common_pb2.Tensor:
    return to_tensor(values, common_pb2.DTYPE_INT32)


def fl(values: list[float]) -> common_pb2.Tensor:
    return to_tensor(values, F32)


def turn(prompt: list[int], completion: list[int], logprobs: list[float]) -> common_pb2.Turn:
    return common_pb2.Turn(
        prompt_tokens=ints(prompt),
        completion_tokens=ints(completion),
        completion_logprobs=fl(logprobs),
    )


def traj(*turns: common_pb2.Turn, reward: float = 1.0) -> common_pb2.Trajectory:
    return common_pb2.Trajectory(turns=list(turns), reward=reward)


def one_turn(reward: float, prompt: list[int] | None = None) -> common_pb2.Trajectory:
    return traj(turn(prompt or [1, 2], [3], [-0.5]), reward=reward)


def datum(n: int = 3, **fields) -> common_pb2.Datum:
    return common_pb2.Datum(
        input_tokens=ints(list(range(n))), target_tokens=ints(list(range(1, n + 1))), **fields
    )


def item(x: common_pb2.Datum | common_pb2.Trajectory | str) -> common_pb2.TrainingItem:
    if isinstance(x, common_pb2.Datum):
        return common_pb2.TrainingItem(datum=x)
    if isinstance(x, common_pb2.Trajectory):
        return common_pb2.TrainingItem(trajectory=x)
    return common_pb2.TrainingItem(trace_id=x)


def message(excinfo: pytest.ExceptionInfo) -> str:
    return excinfo.value.message


# ------------------------------------------------------------------------ inline Datum


def test_datum_without_weights_trains_every_position():
    d = datum_from_proto(datum(3, reward=0.5, group_index=2), "data[0].datum")
    assert d.input_tokens.tolist() == [0, 1, 2]
    assert d.target_tokens.tolist() == [1, 2, 3]
    assert d.weights.dtype == np.float32 and d.weights.tolist() == [1.0, 1.0, 1.0]
    assert d.sampling_logprobs is None and d.advantages is None
    assert (d.reward, d.advantage, d.group_index) == (0.5, 0.0, 2)


def test_datum_keeps_given_loss_inputs():
    d = datum_from_proto(
        datum(2, weights=fl([0, 2]), sampling_logprobs=fl([0, -1]), advantages=fl([0, 3])), "d"
    )
    assert d.weights.tolist() == [0.0, 2.0]
    assert d.sampling_logprobs.tolist() == [0.0, -1.0]
    assert d.advantages.tolist() == [0.0, 3.0]


def test_datum_num_tokens_counts_non_zero_weights():
    assert datum_from_proto(datum(4, weights=fl([0, 1, 0.5, 0])), "d").num_tokens == 2


@pytest.mark.parametrize("missing", ["input_tokens", "target_tokens"])
def test_datum_without_required_tokens_is_invalid(missing):
    d = datum(3)
    d.ClearField(missing)
    with pytest.raises(InvalidArgument) as err:
        datum_from_proto(d, "data[1].datum")
    assert message(err).startswith(f"data[1].datum.{missing} is required")


def test_datum_with_empty_input_is_invalid():
    d = common_pb2.Datum(input_tokens=ints([]), target_tokens=ints([]))
    with pytest.raises(InvalidArgument) as err:
        datum_from_proto(d, "data[0].datum")
    assert message(err).startswith("data[0].datum.input_tokens is empty")
    assert "N >= 1" in message(err)


def test_datum_target_length_must_match_input():
    d = common_pb2.Datum(input_tokens=ints([1, 2, 3]), target_tokens=ints([2, 3]))
    with pytest.raises(InvalidArgument) as err:
        datum_from_proto(d, "data[0].datum")
    assert message(err).startswith(
        "data[0].datum.target_tokens has 2 values but input_tokens has 3"
    )


def test_datum_weights_length_must_match_input():
    with pytest.raises(InvalidArgument) as err:
        datum_from_proto(datum(12, weights=fl([1.0] * 10)), "data[3].datum")
    assert message(err).startswith("data[3].datum.weights has 10 values but input_tokens has 12")


@pytest.mark.parametrize("name", ["sampling_logprobs", "advantages"])
def test_datum_loss_input_length_must_match_input(name):
    with pytest.raises(InvalidArgument) as err:
        datum_from_proto(datum(3, **{name: fl([0.0])}), "data[3].datum")
    assert message(err).startswith(f"data[3].datum.{name} has 1 values but input_tokens has 3")


def test_datum_weights_must_be_finite():
    with pytest.raises(InvalidArgument) as err:
        datum_from_proto(datum(3, weights=fl([1, math.inf, 1])), "data[0].datum")
    assert message(err) == "data[0].datum.weights: inf at position 1: values must be finite"


def test_datum_weights_must_not_be_negative():
    with pytest.raises(InvalidArgument) as err:
        datum_from_proto(datum(3, weights=fl([1, 1, -0.5])), "data[0].datum")
    assert message(err).startswith("data[0].datum.weights: negative weight -0.5 at position 2")


def test_datum_token_ids_must_not_be_negative():
    d = common_pb2.Datum(input_tokens=ints([1, -7]), target_tokens=ints([2, 3]))
    with pytest.raises(InvalidArgument, match=r"data\[0\].datum.input_tokens: token id -7 at"):
        datum_from_proto(d, "data[0].datum")


def test_datum_nan_sampling_logprob_at_trained_position_is_invalid():
    d = datum(3, weights=fl([0, 1, 1]), sampling_logprobs=fl([0, -1, math.nan]))
    with pytest.raises(InvalidArgument) as err:
        datum_from_proto(d, "data[0].datum")
    assert message(err).startswith("data[0].datum.sampling_logprobs: NaN at position 2")


def test_datum_nan_at_untrained_position_is_replaced_by_zero():
    d = datum(3, weights=fl([0, 1, 1]), advantages=fl([math.nan, 1, 2]))
    assert datum_from_proto(d, "d").advantages.tolist() == [0.0, 1.0, 2.0]


def test_datum_reward_must_be_finite():
    with pytest.raises(InvalidArgument, match=r"data\[0\].datum.reward is nan"):
        datum_from_proto(datum(2, reward=math.nan), "data[0].datum")


def test_datum_group_index_must_not_be_negative():
    with pytest.raises(InvalidArgument, match=r"data\[0\].datum.group_index is -1"):
        datum_from_proto(datum(2, group_index=-1), "data[0].datum")


def test_datum_arrays_round_trip_through_proto():
    original = DatumArrays(
        input_tokens=np.array([5, 6, 7], dtype=np.int64),
        target_tokens=np.array([6, 7, 8], dtype=np.int64),
        weights=np.array([0, 1, 1], dtype=np.float32),
        sampling_logprobs=np.array([0, -0.5, -0.25], dtype=np.float32),
        advantages=None,
        reward=2.0,
        advantage=0.0,
        group_index=4,
    )
    proto = original.to_proto()
    assert proto.input_tokens.dtype == common_pb2.DTYPE_INT32
    assert not proto.HasField("advantages")
    back = datum_from_proto(proto, "d")
    for name in ("input_tokens", "target_tokens", "weights", "sampling_logprobs"):
        np.testing.assert_array_equal(getattr(back, name), getattr(original, name))
    assert back.advantages is None
    assert (back.reward, back.group_index) == (2.0, 4)


def test_to_proto_packs_token_ids_beyond_int32_as_int64():
    d = DatumArrays(
        input_tokens=np.array([2**31], dtype=np.int64),
        target_tokens=np.array([1], dtype=np.int64),
        weights=np.ones(1, dtype=np.float32),
        sampling_logprobs=None,
        advantages=None,
        reward=0.0,
        advantage=0.0,
        group_index=0,
    )
    assert d.to_proto().input_tokens.dtype == common_pb2.DTYPE_INT64


# ------------------------------------------------------------------------ Trajectory


def convert(t: common_pb2.Trajectory, advantage: float = 2.0) -> list[DatumArrays]:
    return trajectory_to_datums(t, advantage=advantage, group_index=3, what="data[4].trajectory")


def test_single_turn_masks_prompt_and_trains_completion():
    (d,) = convert(traj(turn([1, 2, 3], [4, 5], [-0.1, -0.2]), reward=0.75))
    # S = [1, 2, 3, 4, 5]
    assert d.input_tokens.tolist() == [1, 2, 3, 4]
    assert d.target_tokens.tolist() == [2, 3, 4, 5]
    assert d.weights.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(
        d.sampling_logprobs, np.array([0, 0, -0.1, -0.2], dtype=np.float32)
    )
    assert d.advantages.tolist() == [0, 0, 2, 2]
    assert (d.reward, d.advantage, d.group_index) == (0.75, 2.0, 3)
    assert d.source == "data[4].trajectory"


def test_second_turn_extending_the_sequence_appends_only_its_new_prompt_suffix():
    t = traj(
        turn([1, 2], [3, 4], [-0.5, -0.25]),
        turn([1, 2, 3, 4, 7, 8], [9], [-1.0]),  # 7, 8: tool output after turn 0
    )
    (d,) = convert(t)
    # S = [1, 2 | 3, 4 | 7, 8 | 9] with completion tokens 3, 4 and 9.
    assert d.input_tokens.tolist() == [1, 2, 3, 4, 7, 8]
    assert d.target_tokens.tolist() == [2, 3, 4, 7, 8, 9]
    assert d.weights.tolist() == [0, 1, 1, 0, 0, 1]
    assert d.sampling_logprobs.tolist() == [0, -0.5, -0.25, 0, 0, -1.0]
    assert d.advantages.tolist() == [0, 2, 2, 0, 0, 2]


def test_second_turn_whose_prompt_is_exactly_the_sequence_so_far_extends_it():
    (d,) = convert(traj(turn([1, 2], [3], [-0.5]), turn([1, 2, 3], [4], [-0.25])))
    assert d.target_tokens.tolist() == [2, 3, 4]
    assert d.weights.tolist() == [0, 1, 1]


def test_second_turn_not_extending_the_sequence_starts_a_new_datum():
    t = traj(turn([1, 2], [3, 4], [-0.5, -0.25]), turn([1, 9, 3], [6], [-1.0]), reward=0.5)
    first, second = convert(t)
    assert first.input_tokens.tolist() == [1, 2, 3]
    assert first.target_tokens.tolist() == [2, 3, 4]
    assert first.weights.tolist() == [0, 1, 1]
    assert first.sampling_logprobs.tolist() == [0, -0.5, -0.25]
    assert second.input_tokens.tolist() == [1, 9, 3]
    assert second.target_tokens.tolist() == [9, 3, 6]
    assert second.weights.tolist() == [0, 0, 1]
    assert second.sampling_logprobs.tolist() == [0, 0, -1.0]
    assert second.advantages.tolist() == [0, 0, 2]
    assert {(d.reward, d.advantage, d.group_index) for d in (first, second)} == {(0.5, 2.0, 3)}


def test_turn_without_completion_adds_only_prompt_positions():
    t = traj(turn([1, 2], [3], [-0.5]), common_pb2.Turn(prompt_tokens=ints([1, 2, 3, 4])))
    (d,) = convert(t)
    assert d.target_tokens.tolist() == [2, 3, 4]
    assert d.weights.tolist() == [0, 1, 0]


def test_trajectory_without_turns_is_invalid():
    with pytest.raises(InvalidArgument) as err:
        convert(common_pb2.Trajectory(reward=1.0))
    assert message(err).startswith("data[4].trajectory.turns is empty")


def test_trajectory_reward_must_be_finite():
    with pytest.raises(InvalidArgument, match=r"data\[4\].trajectory.reward is inf"):
        convert(traj(turn([1], [2], [-0.1]), reward=math.inf))


def test_turn_with_empty_prompt_is_invalid():
    with pytest.raises(InvalidArgument) as err:
        convert(traj(turn([1], [2], [-0.1]), turn([], [2], [-0.1])))
    assert message(err).startswith("data[4].trajectory.turns[1].prompt_tokens is empty")


def test_turn_without_prompt_is_invalid():
    t = traj(common_pb2.Turn(completion_tokens=ints([2]), completion_logprobs=fl([-0.1])))
    with pytest.raises(InvalidArgument, match=r"turns\[0\].prompt_tokens is required"):
        convert(t)


def test_completion_logprobs_length_must_match_completion():
    with pytest.raises(InvalidArgument) as err:
        convert(traj(turn([1], [2], [-0.1]), turn([1, 2], [3, 4, 5], [-0.1, -0.2])))
    assert message(err).startswith(
        "data[4].trajectory.turns[1].completion_logprobs has 2 values but "
        "data[4].trajectory.turns[1].completion_tokens has 3"
    )


def test_completion_logprobs_are_required_with_a_completion():
    t = traj(common_pb2.Turn(prompt_tokens=ints([1]), completion_tokens=ints([2, 3])))
    with pytest.raises(InvalidArgument) as err:
        convert(t)
    assert message(err).startswith("data[4].trajectory.turns[0].completion_logprobs is required")


def test_completion_logprobs_must_be_finite():
    with pytest.raises(InvalidArgument) as err:
        convert(traj(turn([1], [2, 3], [-0.1, math.nan])))
    assert message(err) == (
        "data[4].trajectory.turns[0].completion_logprobs: NaN at position 1: values must be finite"
    )


def test_sequence_of_one_token_is_invalid():
    with pytest.raises(InvalidArgument) as err:
        convert(traj(turn([1, 2], [3], [-0.1]), common_pb2.Turn(prompt_tokens=ints([7]))))
    assert message(err).startswith(
        "data[4].trajectory.turns[1]: the sequence that starts at this turn has 1 token"
    )


# ------------------------------------------------------------------------ group advantages


def test_group_advantages_subtract_the_group_mean():
    assert group_advantages([1, 0, 0, 1], 2, False) == ([0.5, -0.5, -0.5, 0.5], 0)


def test_group_advantages_divide_by_std_plus_eps_when_normalized():
    advantages, no_signal = group_advantages([1, 0, 0, 1], 2, True)
    assert advantages == pytest.approx([NORM, -NORM, -NORM, NORM], rel=1e-12)
    assert no_signal == 0


def test_group_with_equal_rewards_has_no_signal():
    assert group_advantages([1, 1, 0, 1], 2, False) == ([0.0, 0.0, -0.5, 0.5], 1)


def test_group_with_equal_rewards_stays_zero_when_normalized():
    assert group_advantages([3, 3, 3], 3, True) == ([0.0, 0.0, 0.0], 1)


def test_group_advantages_use_population_std():
    # rewards 0, 1, 2: mean 1, population std sqrt(2/3).
    advantages, _ = group_advantages([0, 1, 2], 3, True, eps=0.0)
    assert advantages == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])


def test_group_size_zero_uses_rewards_as_advantages():
    assert group_advantages([1, 1, 0.25], 0, True) == ([1.0, 1.0, 0.25], 0)


def test_negative_group_size_is_invalid():
    with pytest.raises(InvalidArgument, match="group_size is -2: it must be >= 0"):
        group_advantages([1, 0], -2, False)


def test_reward_count_not_multiple_of_group_size_is_invalid():
    with pytest.raises(InvalidArgument) as err:
        group_advantages([1, 0, 1], 2, False)
    assert message(err).startswith("group_size is 2 but the request has 3 trajectories")


# ------------------------------------------------------------------------ assemble_batch


def test_empty_batch_is_invalid():
    with pytest.raises(InvalidArgument) as err:
        assemble_batch([], group_size=0, normalize_std=False)
    assert message(err) == "data is empty: send at least one datum, trajectory or trace id"


def test_item_without_kind_is_invalid_naming_its_index():
    with pytest.raises(InvalidArgument) as err:
        assemble_batch(
            [item(datum()), common_pb2.TrainingItem()], group_size=0, normalize_std=False
        )
    assert message(err).startswith("data[1] is empty: set exactly one of datum, trajectory")


def test_trace_id_without_resolver_is_invalid():
    with pytest.raises(InvalidArgument) as err:
        assemble_batch([item(datum()), item("tr-1")], group_size=0, normalize_std=False)
    assert message(err) == (
        "data[1]: trace ids are resolved by the gateway; send this request through the "
        "gateway or inline the trajectory"
    )


def test_empty_trace_id_is_invalid():
    with pytest.raises(InvalidArgument, match=r"data\[0\].trace_id is empty"):
        assemble_batch([item("")], group_size=0, normalize_std=False, resolve_trace=one_turn)


def test_resolver_errors_propagate():
    def missing(trace_id: str) -> common_pb2.Trajectory:
        raise NotFound(f"trace {trace_id} not found")

    with pytest.raises(NotFound):
        assemble_batch([item("tr-9")], group_size=0, normalize_std=False, resolve_trace=missing)


def test_mixed_items_keep_request_order_and_group_skipping_datums():
    traces = {"tr-a": one_turn(0.0, [7, 8])}
    items = [
        item(one_turn(1.0, [1, 2])),  # trajectory 0, group 0
        item(datum(2, reward=5.0, group_index=9)),
        item("tr-a"),  # trajectory 1, group 0
        item(one_turn(1.0, [3, 4])),  # trajectory 2, group 1
        item(one_turn(1.0, [5, 6])),  # trajectory 3, group 1: all equal
    ]
    batch = assemble_batch(items, group_size=2, normalize_std=False, resolve_trace=traces.get)
    assert [d.source for d in batch.datums] == [
        "data[0].trajectory",
        "data[1].datum",
        "data[2] (trace tr-a)",
        "data[3].trajectory",
        "data[4].trajectory",
    ]
    assert [d.input_tokens[0] for d in batch.datums] == [1, 0, 7, 3, 5]
    assert [d.advantage for d in batch.datums] == [0.5, 0.0, -0.5, 0.0, 0.0]
    assert [d.group_index for d in batch.datums] == [0, 9, 0, 1, 1]
    assert batch.no_signal_groups == 1


def test_group_size_zero_indexes_trajectories_and_uses_raw_reward():
    items = [item(one_turn(0.5)), item(datum()), item(one_turn(2.0))]
    batch = assemble_batch(items, group_size=0, normalize_std=True)
    assert [d.group_index for d in batch.datums] == [0, 0, 1]
    assert [d.advantage for d in batch.datums] == [0.5, 0.0, 2.0]
    assert batch.datums[2].advantages.tolist() == [0.0, 2.0]


def test_normalize_std_scales_trajectory_advantages():
    batch = assemble_batch(
        [item(one_turn(1.0)), item(one_turn(0.0))], group_size=2, normalize_std=True
    )
    assert [d.advantage for d in batch.datums] == pytest.approx([NORM, -NORM], rel=1e-12)
    assert batch.datums[0].advantages[-1] == np.float32(NORM)


def test_trajectory_count_not_multiple_of_group_size_is_invalid():
    with pytest.raises(InvalidArgument, match="group_size is 2 but the request has 3"):
        assemble_batch(
            [item(one_turn(1.0)), item(datum()), item(one_turn(0.0)), item(one_turn(0.0))],
            group_size=2,
            normalize_std=False,
        )


def test_negative_group_size_is_invalid_before_resolving_traces():
    def never(trace_id: str) -> common_pb2.Trajectory:
        raise AssertionError("resolved a trace of an invalid request")

    with pytest.raises(InvalidArgument, match="group_size is -1"):
        assemble_batch([item("tr-1")], group_size=-1, normalize_std=False, resolve_trace=never)


def test_reward_mean_counts_each_item_once():
    two_datums = traj(turn([1, 2], [3], [-0.1]), turn([5, 6], [7], [-0.1]), reward=3.0)
    batch = assemble_batch(
        [item(two_datums), item(datum(reward=0.0))], group_size=0, normalize_std=False
    )
    assert len(batch.datums) == 3
    assert batch.reward_mean == 1.5


def test_batch_num_tokens_sums_trained_positions():
    batch = assemble_batch(
        [item(traj(turn([1, 2], [3, 4], [-0.1, -0.2]))), item(datum(3))],
        group_size=0,
        normalize_std=False,
    )
    assert batch.num_tokens == 2 + 3


def test_invalid_trajectory_error_names_its_item_path():
    bad = traj(turn([1], [2], [-0.1]), turn([1, 2], [3], []))
    with pytest.raises(InvalidArgument) as err:
        assemble_batch([item(datum()), item(bad)], group_size=0, normalize_std=False)
    assert message(err).startswith("data[1].trajectory.turns[1].completion_logprobs has 0 values")


def test_invalid_trace_error_names_its_item_and_trace():
    def resolve(trace_id: str) -> common_pb2.Trajectory:
        return traj(turn([], [2], [-0.1]))

    with pytest.raises(InvalidArgument) as err:
        assemble_batch([item("tr-7")], group_size=0, normalize_std=False, resolve_trace=resolve)
    assert message(err).startswith("data[0] (trace tr-7).turns[0].prompt_tokens is empty")


def test_non_finite_trajectory_reward_is_invalid_naming_its_item():
    with pytest.raises(InvalidArgument, match=r"data\[1\].trajectory.reward is nan"):
        assemble_batch(
            [item(one_turn(0.0)), item(one_turn(math.nan))], group_size=2, normalize_std=False
        )


def test_invalid_inline_datum_error_names_its_item_path():
    with pytest.raises(InvalidArgument, match=r"data\[1\].datum.weights has 1 values"):
        assemble_batch(
            [item(one_turn(1.0)), item(datum(3, weights=fl([1])))],
            group_size=0,
            normalize_std=False,
        )


# ------------------------------------------------------------------------ check_vocab


def test_check_vocab_accepts_ids_below_vocab_size():
    batch = assemble_batch([item(datum(3))], group_size=0, normalize_std=False)
    check_vocab(batch.datums, vocab_size=4)


def test_check_vocab_names_datum_tensor_position_id_and_range():
    batch: Batch = assemble_batch(
        [item(datum(2)), item(traj(turn([1, 2], [3, 40], [-0.1, -0.2])))],
        group_size=0,
        normalize_std=False,
    )
    with pytest.raises(InvalidArgument) as err:
        check_vocab(batch.datums, vocab_size=32)
    assert message(err) == (
        "datum 1 (from data[1].trajectory): target_tokens[2] is token id 40, outside the "
        "vocabulary: valid ids are 0 <= id < 32"
    )
