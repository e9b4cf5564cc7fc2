"""The sampler replica registry in Redis: what each live replica serves and how busy it is.

Each sampler refreshes `<prefix>replica:<id>` (a `ReplicaInfo` as JSON) every second with a
TTL of a few seconds, and adds its id to the set `<prefix>replicas`; a replica that dies
drops out when its key expires (readers prune its id from the set). Listing is two round
trips (SMEMBERS, MGET), never a scan of the keyspace, which also holds every trace. The
gateway lists them to route a pinned request to the least-loaded replica that already
holds the checkpoint, else to any live one (which loads it on demand).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from headway.server.heads import DEFAULT_PREFIX


@dataclass
class ReplicaInfo:
    """One sampler replica as the gateway sees it."""

    id: str
    address: str  # host:port of its SamplingService
    bases: list[str] = field(default_factory=list)  # bases it preloads ([] = all)
    loaded: list[str] = field(default_factory=list)  # "model/checkpoint" servable now
    queue_depth: int = 0  # requests waiting for rows
    live_rows: int = 0  # sequences being decoded
    queued_rows: int = 0  # sequences of the waiting requests
    updated: float = 0.0  # unix seconds of this report

    @property
    def load(self) -> int:
        """Sequences on the replica, decoding or waiting: the unit routing compares."""
        return self.queued_rows + self.live_rows

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> ReplicaInfo:
        return cls(**json.loads(raw))


def replica_key(replica_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}replica:{replica_id}"


def index_key(prefix: str = DEFAULT_PREFIX) -> str:
    """The set of replica ids that may be alive."""
    return f"{prefix}replicas"


async def announce(redis: Any, info: ReplicaInfo, ttl: float, prefix: str = DEFAULT_PREFIX) -> None:
    """Write (refresh) a replica's entry with a TTL, and index its id."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(replica_key(info.id, prefix), info.to_json(), px=int(ttl * 1000))
        pipe.sadd(index_key(prefix), info.id)
        await pipe.execute()


async def withdraw(redis: Any, replica_id: str, prefix: str = DEFAULT_PREFIX) -> None:
    """Remove a replica's entry (clean shutdown)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.delete(replica_key(replica_id, prefix))
        pipe.srem(index_key(prefix), replica_id)
        await pipe.execute()


async def list_replicas(redis: Any, prefix: str = DEFAULT_PREFIX) -> list[ReplicaInfo]:
    """Every live replica (entries whose TTL has not run out); prunes the dead from the index."""
    ids = sorted(
        i.decode() if isinstance(i, bytes) else i for i in await redis.smembers(index_key(prefix))
    )
    if not ids:
        return []
    raws = await redis.mget([replica_key(i, prefix) for i in ids])
    dead = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
    if dead:
        await redis.srem(index_key(prefix), *dead)
    return [ReplicaInfo.from_json(raw) for raw in raws if raw is not None]
