"""Training-batch assembly: from `TrainingItem`s to validated per-datum numpy arrays.

This module owns the conversion documented on `Trajectory` in
protos/headway/v1/common.proto (sequences, alignment, mask, sampling logprobs, GRPO
advantages, reward and group index) and the validation of inline `Datum`s, so the trainer
and any client that builds Datums itself get exactly the same arrays. Errors are
`InvalidArgument` whose message starts with the offending field's path in the request,
e.g. "data[4].trajectory.turns[1].completion_logprobs: ...".

numpy only: no torch, no grpc, so the SDK and the gateway can import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from headway.errors import InvalidArgument
from headway.server.turns import turn_arrays
from headway.tensors import declared_size, floats, is_set, require_finite, to_tensor, tokens
from headway.v1 import common_pb2

_INT32_MAX = np.iinfo(np.int32).max


@dataclass
class DatumArrays:
    """One training sequence as numpy arrays, all per-position arrays of length N >= 1.

    `advantage` is the trajectory's scalar advantage (0 for an inline Datum, which has
    per-position advantages only); `source` is the request path the datum came from
    ("data[3].trajectory"), for error messages.
    """

    input_tokens: np.ndarray  # int64[N]
    target_tokens: np.ndarray  # int64[N]
    weights: np.ndarray  # float32[N]
    sampling_logprobs: np.ndarray | None  # float32[N]
    advantages: np.ndarray | None  # float32[N]
    reward: float
    advantage: float
    group_index: int
    source: str = ""
    # A trajectory's datum (its GRPO group is `group_index`); False for an inline Datum,
    # whose group_index is only the client's label.
    from_trajectory: bool = False

    @property
    def num_tokens(self) -> int:
        """Number of trained positions: those whose weight is non-zero."""
        return int(np.count_nonzero(self.weights))

    def to_proto(self) -> common_pb2.Datum:
        """This datum as a `Datum` message (the scalar `advantage` has no field there)."""
        d = common_pb2.Datum(
            input_tokens=_token_tensor(self.input_tokens),
            target_tokens=_token_tensor(self.target_tokens),
            weights=to_tensor(self.weights, common_pb2.DTYPE_FLOAT32),
            reward=self.reward,
            group_index=self.group_index,
        )
        if self.sampling_logprobs is not None:
            d.sampling_logprobs.CopyFrom(
                to_tensor(self.sampling_logprobs, common_pb2.DTYPE_FLOAT32)
            )
        if self.advantages is not None:
            d.advantages.CopyFrom(to_tensor(self.advantages, common_pb2.DTYPE_FLOAT32))
        return d


def _token_tensor(ids: np.ndarray) -> common_pb2.Tensor:
    # INT32 halves the bytes on the wire and holds every real vocabulary.
    fits = ids.size == 0 or int(ids.max()) <= _INT32_MAX
    return to_tensor(ids, common_pb2.DTYPE_INT32 if fits else common_pb2.DTYPE_INT64)


def _check_length(values: np.ndarray, n: int, what: str, name: str) -> None:
    if len(values) != n:
        raise InvalidArgument(
            f"{what}.{name} has {len(values)} values but input_tokens has {n}: every "
            "per-position tensor of a datum has input_tokens' length"
        )


def _loss_input(
    d: common_pb2.Datum, name: str, n: int, trained: np.ndarray, what: str
) -> np.ndarray | None:
    """An optional per-position float input (sampling_logprobs, advantages), or None."""
    if not is_set(d, name):
        return None
    path = f"{what}.{name}"
    values = floats(getattr(d, name), path, finite=False)
    _check_length(values, n, what, name)
    # common.proto allows any value at weight-0 positions; they must still not reach the
    # loss, where 0 * NaN is NaN, so they are replaced with 0.
    require_finite(values, path, where=trained)
    values[~np.isfinite(values)] = 0.0
    return values


def datum_from_proto(d: common_pb2.Datum, what: str) -> DatumArrays:
    """Validate an inline `Datum` and decode it; `what` is its path, e.g. "data[3].datum".

    input_tokens and target_tokens are required, N >= 1, every present per-position tensor
    has length N, absent weights mean all ones, weights are finite and >= 0, and
    sampling_logprobs / advantages are finite wherever the weight is non-zero.
    """
    for name in ("input_tokens", "target_tokens"):
        if not is_set(d, name):
            raise InvalidArgument(
                f"{what}.{name} is required: a 1-D INT32 or INT64 tensor of token ids"
            )
    input_tokens = tokens(d.input_tokens, f"{what}.input_tokens")
    n = len(input_tokens)
    if n == 0:
        raise InvalidArgument(
            f"{what}.input_tokens is empty: a datum needs at least one position (N >= 1)"
        )
    target_tokens = tokens(d.target_tokens, f"{what}.target_tokens")
    _check_length(target_tokens, n, what, "target_tokens")

    if is_set(d, "weights"):
        weights = floats(d.weights, f"{what}.weights", finite=False)
        _check_length(weights, n, what, "weights")
        require_finite(weights, f"{what}.weights")
        negative = np.flatnonzero(weights < 0)
        if negative.size:
            pos = int(negative[0])
            raise InvalidArgument(
                f"{what}.weights: negative weight {float(weights[pos])!r} at position {pos}: "
                "weights must be >= 0 (0 = the position is not trained on)"
            )
    else:
        weights = np.ones(n, dtype=np.float32)
    trained = weights != 0

    sampling_logprobs = _loss_input(d, "sampling_logprobs", n, trained, what)
    advantages = _loss_input(d, "advantages", n, trained, what)
    if not math.isfinite(d.reward):
        raise InvalidArgument(f"{what}.reward is {d.reward}: it must be finite (0 = unknown)")
    if d.group_index < 0:
        raise InvalidArgument(f"{what}.group_index is {d.group_index}: it is 0-based, >= 0")
    return DatumArrays(
        input_tokens=input_tokens,
        target_tokens=target_tokens,
        weights=weights,
        sampling_logprobs=sampling_logprobs,
        advantages=advantages,
        reward=float(d.reward),
        advantage=0.0,
        group_index=int(d.group_index),
        source=what,
    )


class _Sequence:
    """A token sequence under construction: tokens, completion flags, sampling logprobs."""

    def __init__(self, start_turn: int) -> None:
        self.start_turn = start_turn
        self.tokens = np.zeros(0, dtype=np.int64)
        self.completion = np.zeros(0, dtype=bool)
        self.logprobs = np.zeros(0, dtype=np.float32)

    def extends(self, prompt: np.ndarray) -> bool:
        """True when `prompt` starts with the whole sequence so far."""
        n = len(self.tokens)
        return len(prompt) >= n and np.array_equal(prompt[:n], self.tokens)

    def append(self, ids: np.ndarray, logprobs: np.ndarray | None) -> None:
        """Append prompt tokens (`logprobs` None) or completion tokens with their logprobs."""
        self.tokens = np.concatenate([self.tokens, ids])
        is_completion = logprobs is not None
        self.completion = np.concatenate([self.completion, np.full(len(ids), is_completion)])
        lp = logprobs if is_completion else np.zeros(len(ids), dtype=np.float32)
        self.logprobs = np.concatenate([self.logprobs, lp])


def trajectory_to_datums(
    traj: common_pb2.Trajectory, *, advantage: float, group_index: int, what: str
) -> list[DatumArrays]:
    """Convert a trajectory into Datums (in turn order) as documented on `Trajectory`.

    `advantage` is the trajectory's scalar advantage (see `group_advantages`); `what` is
    its path, e.g. "data[4].trajectory". Raises `InvalidArgument` for no turns, an empty
    prompt, logprobs that do not match the completion, non-finite logprobs or reward, or a
    sequence shorter than 2 tokens.
    """
    if not traj.turns:
        raise InvalidArgument(f"{what}.turns is empty: a trajectory needs at least one turn")
    if not math.isfinite(traj.reward):
        raise InvalidArgument(
            f"{what}.reward is {traj.reward}: a trajectory's reward must be finite"
        )

    sequences: list[_Sequence] = []
    for k, turn in enumerate(traj.turns):
        prompt, completion, logprobs = turn_arrays(turn, f"{what}.turns[{k}]")
        if sequences and sequences[-1].extends(prompt):
            # Only the new part of the prompt (tool output, next user message) is appended.
            current = sequences[-1]
            current.append(prompt[len(current.tokens) :], None)
        else:
            current = _Sequence(start_turn=k)
            sequences.append(current)
            current.append(prompt, None)
        current.append(completion, logprobs)

    datums = []
    for seq in sequences:
        length = len(seq.tokens)
        if length < 2:
            raise InvalidArgument(
                f"{what}.turns[{seq.start_turn}]: the sequence that starts at this turn has "
                f"{length} token; a datum needs at least 2 (add completion tokens)"
            )
        # Position i predicts S[i + 1], so every per-position array is indexed by targets.
        is_target_completion = seq.completion[1:]
        datums.append(
            DatumArrays(
                input_tokens=seq.tokens[:-1].copy(),
                target_tokens=seq.tokens[1:].copy(),
                weights=is_target_completion.astype(np.float32),
                sampling_logprobs=seq.logprobs[1:].copy(),
                advantages=np.where(is_target_completion, np.float32(advantage), np.float32(0)),
                reward=float(traj.reward),
                advantage=float(advantage),
                group_index=group_index,
                source=what,
                from_trajectory=True,
            )
        )
    return datums


def group_advantages(
    rewards: Sequence[float], group_size: int, normalize_std: bool, eps: float = 1e-6
) -> tuple[list[float], int]:
    """GRPO advantages of consecutive groups of `group_size` rewards, and the no-signal count.

    group_size 0: advantage = reward (no baseline), no-signal count 0. Otherwise each
    group's advantage is reward - mean(group), divided by (population std + eps) when
    `normalize_std`; a group whose rewards are all equal gets 0 everywhere and is counted
    in the returned number of no-signal groups.
    """
    if group_size < 0:
        raise InvalidArgument(
            f"group_size is {group_size}: it must be >= 0 (0 = no grouping, advantage = reward)"
        )
    for i, r in enumerate(rewards):
        if not math.isfinite(r):
            raise InvalidArgument(f"reward {r} of trajectory {i} is not finite")
    if group_size == 0:
        return [float(r) for r in rewards], 0
    if len(rewards) % group_size:
        raise InvalidArgument(
            f"group_size is {group_size} but the request has {len(rewards)} trajectories and "
            "trace ids (inline datums are not counted): their number must be a multiple of "
            "group_size"
        )
    advantages: list[float] = []
    no_signal = 0
    for start in range(0, len(rewards), group_size):
        group = np.asarray(rewards[start : start + group_size], dtype=np.float64)
        # Exact equality, as documented: such a group has no baseline-relative signal. The
        # explicit zeros also avoid dividing 0 by eps in the normalised case.
        if np.all(group == group[0]):
            no_signal += 1
            advantages.extend([0.0] * group_size)
            continue
        centered = group - group.mean()
        if normalize_std:
            centered = centered / (group.std() + eps)
        advantages.extend(float(a) for a in centered)
    return advantages, no_signal


@dataclass
class Batch:
    """An assembled training batch, datums in request order."""

    datums: list[DatumArrays]
    no_signal_groups: int
    # Mean reward over the request's items (trajectories, traces and inline datums), each
    # item counted once however many datums it produced.
    reward_mean: float
    # The items' rewards, in request order (one per item, as reward_mean counts them).
    rewards: list[float] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Number of trained positions over all datums."""
        return sum(d.num_tokens for d in self.datums)


def assemble_batch(
    items: Sequence[common_pb2.TrainingItem],
    *,
    group_size: int,
    normalize_std: bool,
    resolve_trace: Callable[[str], common_pb2.Trajectory] | None = None,
) -> Batch:
    """Validate a request's `data` and turn it into a `Batch`.

    Inline Datums are used as is; trajectories and trace ids (resolved with
    `resolve_trace`, whose NotFound / FailedPrecondition propagate) form GRPO groups in
    request order and are converted as documented on `Trajectory`. The datums come out in
    request order, each trajectory's in turn order.
    """
    if not items:
        raise InvalidArgument("data is empty: send at least one datum, trajectory or trace id")
    if group_size < 0:
        # Checked before any trace is resolved, so a bad request costs no lookups.
        group_advantages([], group_size, normalize_std)

    # Pass 1: resolve every item to a Datum or a Trajectory, so the groups (which need
    # every trajectory's reward) are known before any trajectory is converted.
    resolved: list[tuple[str, common_pb2.Datum | common_pb2.Trajectory, str]] = []
    rewards: list[float] = []
    for i, item in enumerate(items):
        kind = item.WhichOneof("item")
        if kind is None:
            raise InvalidArgument(
                f"data[{i}] is empty: set exactly one of datum, trajectory or trace_id"
            )
        if kind == "datum":
            resolved.append(("datum", item.datum, f"data[{i}].datum"))
            continue
        if kind == "trajectory":
            traj, what = item.trajectory, f"data[{i}].trajectory"
        else:
            if not item.trace_id:
                raise InvalidArgument(f"data[{i}].trace_id is empty: give the trace's id")
            if resolve_trace is None:
                raise InvalidArgument(
                    f"data[{i}]: trace ids are resolved by the gateway; send this request "
                    "through the gateway or inline the trajectory"
                )
            traj, what = resolve_trace(item.trace_id), f"data[{i}] (trace {item.trace_id})"
        if not math.isfinite(traj.reward):
            raise InvalidArgument(
                f"{what}.reward is {traj.reward}: a trajectory's reward must be finite"
            )
        resolved.append(("trajectory", traj, what))
        rewards.append(traj.reward)

    advantages, no_signal = group_advantages(rewards, group_size, normalize_std)

    # Pass 2: convert, in request order.
    datums: list[DatumArrays] = []
    item_rewards: list[float] = []
    traj_index = 0
    for kind, msg, what in resolved:
        if kind == "datum":
            datum = datum_from_proto(msg, what)
            datums.append(datum)
            item_rewards.append(datum.reward)
            continue
        group_index = traj_index // group_size if group_size else traj_index
        datums.extend(
            trajectory_to_datums(
                msg, advantage=advantages[traj_index], group_index=group_index, what=what
            )
        )
        item_rewards.append(float(msg.reward))
        traj_index += 1
    return Batch(
        datums=datums,
        no_signal_groups=no_signal,
        reward_mean=float(np.mean(item_rewards)),
        rewards=item_rewards,
    )


def declared_lengths(item: common_pb2.TrainingItem) -> list[int]:
    """The lengths of the datums `item` becomes, read from byte counts, nothing decoded.

    For limits checked before any decoding (context, batch tokens), so an oversized
    request costs no work proportional to its size. An inline Datum's length is that of
    its input_tokens; a trajectory's sequences are followed as `trajectory_to_datums`
    follows them, deciding whether a turn's prompt continues the sequence by comparing
    raw bytes (a memcmp, no decoding). When the bytes cannot tell (a turn's tensors have
    another dtype than the previous turn's), the turn is taken to continue the sequence,
    so a length is never over the true one: a bound that refuses only what decoding
    would refuse. A trace id or an empty item has no lengths here.
    """
    kind = item.WhichOneof("item")
    if kind == "datum":
        return [declared_size(item.datum.input_tokens)]
    if kind != "trajectory":
        return []
    lengths: list[int] = []
    sequence = 0  # tokens of the sequence under construction (previous prompt + completion)
    previous: common_pb2.Turn | None = None
    for turn in item.trajectory.turns:
        size = declared_size(turn.prompt_tokens) + declared_size(turn.completion_tokens)
        if previous is not None and not _may_continue(previous, turn.prompt_tokens):
            lengths.append(max(sequence - 1, 0))  # position i predicts token i + 1
        sequence, previous = size, turn
    if previous is not None:
        lengths.append(max(sequence - 1, 0))
    return lengths


def _may_continue(previous: common_pb2.Turn, prompt: common_pb2.Tensor) -> bool:
    """Whether `prompt` may start with the previous turn's prompt + completion (the
    sequence so far): False only when the bytes prove it does not."""
    before, completion = previous.prompt_tokens, previous.completion_tokens
    if prompt.dtype != before.dtype or (completion.data and prompt.dtype != completion.dtype):
        return True  # equal ids in other widths: only decoding can tell
    return prompt.data.startswith(before.data) and prompt.data.startswith(
        completion.data, len(before.data)
    )


def check_vocab(datums: Sequence[DatumArrays], vocab_size: int) -> None:
    """Raise `InvalidArgument` for the first token id outside 0 <= id < vocab_size.

    The message names the datum (its index in the batch and the request path it came
    from), the tensor, the position, the id and the valid range.
    """
    for j, datum in enumerate(datums):
        for name in ("input_tokens", "target_tokens"):
            ids = getattr(datum, name)
            bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
            if bad.size:
                pos = int(bad[0])
                origin = f" (from {datum.source})" if datum.source else ""
                raise InvalidArgument(
                    f"datum {j}{origin}: {name}[{pos}] is token id {int(ids[pos])}, outside "
                    f"the vocabulary: valid ids are 0 <= id < {vocab_size}"
                )
