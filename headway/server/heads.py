"""Head-change events and the head mirror in Redis: the names and payloads all services share.

The trainer, after a head is durable on disk, publishes `{model, checkpoint, step}` on
`<prefix>heads` and mirrors it in the key `<prefix>head:<model>`. Samplers subscribe to the
channel to reload early, and read the mirror keys on (re)connect so a missed event costs
only time. The store stays the truth; Redis only makes changes travel fast.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

DEFAULT_PREFIX = "headway:"


@dataclass(frozen=True)
class HeadEvent:
    """A model's head moved to `checkpoint` (at `step`)."""

    model: str
    checkpoint: str
    step: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> HeadEvent:
        data = json.loads(raw)
        return cls(model=data["model"], checkpoint=data["checkpoint"], step=int(data["step"]))


def channel(prefix: str = DEFAULT_PREFIX) -> str:
    """The pub/sub channel of head events."""
    return f"{prefix}heads"


def mirror_key(model: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The key mirroring a model's current head (a HeadEvent as JSON)."""
    return f"{prefix}head:{model}"


def run_key(slug: str, created: float) -> str:
    """A fork's key in the Tinker API's Redis state: its slug and creation time, so a slug
    freed by DeleteModel and taken again starts with no names, seq ids or queue."""
    return f"{slug}@{created!r}"


def names_key(run: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The hash of the names the Tinker API gave the checkpoints of `run` (`run_key`):
    path → JSON {"checkpoint", "time", "expires"?}. The trainer's retention keeps what
    it names."""
    return f"{prefix}tinker:names:{run}"


def live_name(entry: dict) -> bool:
    """Whether a name's lifetime (if it has one) has not run out."""
    return entry.get("expires") is None or entry["expires"] > time.time()


async def publish_head(redis: object, event: HeadEvent, prefix: str = DEFAULT_PREFIX) -> None:
    """Mirror then publish `event` with a `redis.asyncio.Redis` client.

    The mirror is written first so a subscriber that reconciles right after the message
    finds the same head in the key.
    """
    payload = event.to_json()
    async with redis.pipeline(transaction=True) as pipe:  # type: ignore[attr-defined]
        pipe.set(mirror_key(event.model, prefix), payload)
        pipe.publish(channel(prefix), payload)
        await pipe.execute()


async def read_heads(redis: object, prefix: str = DEFAULT_PREFIX) -> dict[str, HeadEvent]:
    """Every mirrored head, by model (for reconciliation on start and reconnect)."""
    out: dict[str, HeadEvent] = {}
    keys = [k async for k in redis.scan_iter(match=mirror_key("*", prefix))]  # type: ignore[attr-defined]
    if keys:
        for raw in await redis.mget(keys):  # type: ignore[attr-defined]
            if raw is not None:
                event = HeadEvent.from_json(raw)
                out[event.model] = event
    return out
