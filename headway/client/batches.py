"""Training batches on the client side: checked, turned into `TrainingItem`s, split into
substeps at group boundaries, and the substeps' replies merged back into one result.

A batch is a list of `Run`s (sent inline as trajectories), trace ids (resolved by the
gateway) and ready `Trajectory` messages, mixed. GRPO grouping and advantages are the
server's (`group_size`, `normalize_std`); this module checks the batch's shape before
anything is sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from headway.errors import InvalidArgument
from headway.tensors import floats
from headway.types import ForwardBackwardResult, Run
from headway.v1 import common_pb2, training_pb2

__all__ = [
    "BatchItem",
    "PARTIAL_GROUPS",
    "batch_calls",
    "forward_backward_result",
    "merge_metrics",
    "split_substeps",
    "training_items",
]

# A batch element: a Run (inline), a trace id, or a ready Trajectory message.
BatchItem = Run | str | common_pb2.Trajectory


def check_batch(batch: Sequence[BatchItem]) -> list[BatchItem]:
    """The batch as a non-empty list; InvalidArgument for an empty batch or a lone item."""
    # A lone run or id would otherwise be iterated (a string char by char): refuse it.
    if isinstance(batch, Run | str | common_pb2.Trajectory):
        raise InvalidArgument("batch must be a list of runs and trace ids, not a single item")
    items = list(batch)
    if not items:
        raise InvalidArgument("batch is empty: pass at least one run or trace id")
    return items


def training_items(
    batch: Sequence[BatchItem], *, group_size: int, reward_scale: float = 1.0
) -> list[common_pb2.TrainingItem]:
    """Validate a batch and turn it into `TrainingItem`s, before anything is sent.

    Runs become inline trajectories (their reward times `reward_scale`), strings are
    trace ids. Raises `InvalidArgument` for an empty batch, a length that is not a
    multiple of `group_size`, an unscored or unrecorded run, or a `reward_scale` other
    than 1 with trace ids (their rewards live on the server and cannot be scaled here:
    scale them when you call `TraceClient.set_reward`, or send the runs inline).
    """
    items = check_batch(batch)
    _check_shape(items, group_size)
    if not math.isfinite(reward_scale):
        raise InvalidArgument(f"reward_scale is {reward_scale}: it must be finite")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(_training_item(item, reward_scale))
        except InvalidArgument as e:
            raise InvalidArgument(f"batch[{i}]: {e.message}") from None
    return out


def _check_shape(items: list[BatchItem], group_size: int) -> None:
    """InvalidArgument unless `items` is a whole number of groups of `group_size`."""
    if group_size < 0:
        raise InvalidArgument(
            f"group_size is {group_size}: it must be >= 0 (None or 0 = no grouping)"
        )
    if group_size and len(items) % group_size:
        raise InvalidArgument(
            f"batch has {len(items)} runs and trace ids but group_size is {group_size}: "
            f"its length must be a multiple of group_size (each group is {group_size} "
            "consecutive rollouts of one task)"
        )


def _training_item(item: BatchItem, reward_scale: float) -> common_pb2.TrainingItem:
    if isinstance(item, str):
        if not item:
            raise InvalidArgument("empty trace id")
        if reward_scale != 1.0:
            raise InvalidArgument(
                f"reward_scale is {reward_scale} but this item is trace id {item!r}, "
                "whose reward is stored on the server and cannot be scaled by the "
                "client: send the Run itself, or set the scaled reward on the trace"
            )
        return common_pb2.TrainingItem(trace_id=item)
    if isinstance(item, Run):
        return common_pb2.TrainingItem(trajectory=item.to_trajectory(reward_scale))
    if isinstance(item, common_pb2.Trajectory):
        trajectory = common_pb2.Trajectory()
        trajectory.CopyFrom(item)
        trajectory.reward = item.reward * reward_scale
        return common_pb2.TrainingItem(trajectory=trajectory)
    raise InvalidArgument(
        f"got a {type(item).__name__}: batch items are Runs, trace id strings or "
        "Trajectory messages"
    )


# What becomes of a group that lost runs to errors: dropped whole, or kept (its survivors
# form a smaller group, their advantages against their own mean).
PARTIAL_GROUPS = ("drop", "keep")

Call = tuple[list[common_pb2.TrainingItem], int]  # a call's items and its group size


def batch_calls(
    batch: Sequence[BatchItem],
    *,
    group_size: int,
    reward_scale: float = 1.0,
    num_substeps: int = 1,
    partial_groups: str = "drop",
) -> tuple[list[Call], dict[str, float]]:
    """The training calls of a batch, (items, group size) each, and what was dropped.

    Errored runs (`Run.error`: rollouts that failed, see `Taskset.run`) are never sent.
    Without grouping they are simply left out. With `group_size` g, a group that lost
    runs is dropped whole (`partial_groups="drop"`: its baseline would come from fewer
    rollouts than the others') or kept (`"keep"`: its survivors are a smaller group, sent
    in a call of that group size, after the whole groups; a lone survivor, whose advantage
    would be 0, is dropped; gradients add up across calls). The metrics count them:
    `runs/errored`, `groups/dropped` and `groups/partial`. InvalidArgument when nothing
    is left to train on, or as `training_items` and `split_substeps`.
    """
    items = check_batch(batch)
    if partial_groups not in PARTIAL_GROUPS:
        raise InvalidArgument(
            f"partial_groups is {partial_groups!r}: one of {', '.join(PARTIAL_GROUPS)}"
        )
    if num_substeps < 1:
        raise InvalidArgument(f"num_substeps is {num_substeps}: it must be >= 1")
    errored = sum(isinstance(x, Run) and x.errored for x in items)
    if not errored:
        kept = training_items(items, group_size=group_size, reward_scale=reward_scale)
        return [(p, group_size) for p in split_substeps(kept, group_size, num_substeps)], {}
    _check_shape(items, group_size)
    unit = group_size or 1
    whole: list[BatchItem] = []
    partial: dict[int, list[BatchItem]] = {}
    dropped = partials = 0
    for start in range(0, len(items), unit):
        members = items[start : start + unit]
        alive = [x for x in members if not (isinstance(x, Run) and x.errored)]
        if len(alive) == len(members):
            whole.extend(members)
        elif group_size and len(alive) > 1 and partial_groups == "keep":
            partial.setdefault(len(alive), []).extend(alive)
            partials += 1
        elif group_size:
            dropped += 1
    stats = {"runs/errored": float(errored)}
    if group_size:
        stats.update({"groups/dropped": float(dropped), "groups/partial": float(partials)})
    if not whole and not partial:
        raise InvalidArgument(
            f"nothing to train on: {errored} of the batch's {len(items)} runs errored"
            + (
                f" and their groups were dropped ({dropped} of {len(items) // unit})"
                if group_size
                else ""
            )  # fmt: skip
        )
    calls: list[Call] = []
    if whole:
        kept = training_items(whole, group_size=group_size, reward_scale=reward_scale)
        # Fewer groups than asked substeps once some were dropped: one group per substep.
        substeps = min(num_substeps, len(whole) // unit)
        calls += [(p, group_size) for p in split_substeps(kept, group_size, substeps)]
    # Partial groups, one call per size, each call no larger than a substep of the batch.
    most = -(-len(items) // num_substeps)
    for size, alive in partial.items():
        step = max(size, most // size * size)
        for start in range(0, len(alive), step):
            part = alive[start : start + step]
            calls.append((training_items(part, group_size=size, reward_scale=reward_scale), size))
    return calls, stats


def split_substeps(
    items: list[common_pb2.TrainingItem], group_size: int, num_substeps: int
) -> list[list[common_pb2.TrainingItem]]:
    """Split a batch into `num_substeps` consecutive parts, each a whole number of groups.

    GRPO advantages are computed per group, so a split at group boundaries gives every run
    the advantage it has in the whole batch and the summed gradient of the parts equals
    the batch's. Parts differ by at most one group. Raises `InvalidArgument` when there
    are fewer groups than substeps.
    """
    if num_substeps < 1:
        raise InvalidArgument(f"num_substeps is {num_substeps}: it must be >= 1")
    unit = group_size or 1
    groups = len(items) // unit
    if num_substeps > groups:
        raise InvalidArgument(
            f"num_substeps is {num_substeps} but the batch has only {groups} "
            f"{'groups' if group_size else 'items'}: each substep needs at least one whole "
            f"{'group of ' + str(group_size) if group_size else 'item'}"
        )
    base, extra = divmod(groups, num_substeps)
    parts, start = [], 0
    for k in range(num_substeps):
        size = (base + (k < extra)) * unit
        parts.append(items[start : start + size])
        start += size
    return parts


def merge_metrics(parts: Sequence[tuple[Mapping[str, float], int, int]]) -> dict[str, float]:
    """Merge the metrics of several calls: (metrics, trained tokens, items) per call.

    As the trainer merges them into a checkpoint's stats: ":sum" and "groups/" keys (and
    "num_tokens") add up, "reward/mean" is weighted by items, the rest by trained tokens.
    """
    if len(parts) == 1:
        return dict(parts[0][0])
    sums: dict[str, float] = {}
    weighted: dict[str, tuple[float, float]] = {}
    for metrics, tokens, count in parts:
        for key, value in metrics.items():
            if key == "num_tokens" or key.endswith(":sum") or key.startswith("groups/"):
                sums[key] = sums.get(key, 0.0) + value
            else:
                weight = float(count if key == "reward/mean" else max(tokens, 1))
                total, norm = weighted.get(key, (0.0, 0.0))
                weighted[key] = (total + value * weight, norm + weight)
    sums.update({k: total / norm for k, (total, norm) in weighted.items() if norm})
    return sums


def forward_backward_result(
    replies: Sequence[training_pb2.ForwardBackwardResponse], parts: Sequence[Sequence[object]]
) -> ForwardBackwardResult:
    """One result from the ForwardBackward replies of a batch's substeps (`parts`)."""
    return ForwardBackwardResult(
        metrics=merge_metrics(
            [(r.metrics, r.num_tokens, len(p)) for r, p in zip(replies, parts, strict=True)]
        ),
        num_datums=sum(r.num_datums for r in replies),
        num_tokens=sum(r.num_tokens for r in replies),
        logprobs=[floats(t, "logprobs").tolist() for r in replies for t in r.logprobs],
    )
