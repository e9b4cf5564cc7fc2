"""Which checkpoints a model keeps: a retention policy and the selection it makes.

A full fork writes weights and twice their size in optimizer state at every step; a store
that keeps them all grows without end. A policy names what to keep, the rest may go:

- `keep_last` K: the K newest checkpoints (by creation: after a rollback, the new
  branch's);
- `keep_every` M: every checkpoint whose step is a multiple of M (milestones);
- `keep_lineage` D: the head and its ancestors up to D steps back (what a rollback needs).

Whatever the policy, a model always keeps its head and the previous head (Samples pinned
to it may still be loading), its root (step 0: where it was forked from, the default KL
reference), every tagged checkpoint, every checkpoint another model is built on (a fork
rooted on it, a LoRA fork over its weights), those the Tinker API names, and the last
checkpoint on disk before one still being written (what a crash falls back to). A policy with no
rule (all zero) keeps everything: pruning needs at least one rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from headway.errors import InvalidArgument
from headway.store.records import CheckpointRecord


@dataclass(frozen=True)
class Retention:
    """A retention policy (0 = that rule keeps nothing of its own)."""

    keep_last: int = 0
    keep_every: int = 0
    keep_lineage: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise InvalidArgument(f"retention {name} must be >= 0 (0 = off); got {value}")

    @property
    def active(self) -> bool:
        """Whether any rule is set (an inactive policy prunes nothing)."""
        return any(asdict(self).values())

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def kept(
    records: Iterable[CheckpointRecord],
    policy: Retention,
    head: str,
    protected: dict[str, str],
) -> dict[str, str]:
    """Checkpoint id → why it is kept, for the model's `records` under `policy`, with
    `head` its head and `protected` the ids kept whatever the policy (tagged, built on),
    with their reasons. Every record not in the result may be deleted."""
    records = list(records)
    reasons: dict[str, str] = {}

    def keep(ckpt: str, why: str) -> None:
        reasons.setdefault(ckpt, why)

    keep(head, "head")
    by_id = {r.id: r for r in records}
    if head in by_id and by_id[head].parent_id in by_id:
        # Samples pinned to it just before the step that replaced it may still be loading.
        keep(by_id[head].parent_id, "the previous head")
    for ckpt, why in protected.items():
        keep(ckpt, why)
    for r in records:
        if r.step == 0:
            keep(r.id, "root")
    # Newest by creation, not by step: after a rollback, the new branch is the newest.
    newest = sorted(records, key=lambda r: (r.created, r.step), reverse=True)
    for r in newest[: policy.keep_last]:
        keep(r.id, f"one of the last {policy.keep_last}")
    if policy.keep_every:
        for r in records:
            if r.step % policy.keep_every == 0:
                keep(r.id, f"step a multiple of {policy.keep_every}")
    if policy.keep_lineage:
        node = by_id.get(head)
        for _ in range(policy.keep_lineage):
            if node is None or node.parent_id not in by_id:
                break
            node = by_id[node.parent_id]
            keep(node.id, f"within {policy.keep_lineage} steps of the head's lineage")
    if not policy.active:  # no rule: everything stays
        for r in records:
            keep(r.id, "no retention rule")
    return reasons
