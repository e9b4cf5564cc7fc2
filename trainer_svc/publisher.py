"""`HeadPublisher`: tells Redis where each model's head is, and retries what Redis missed.

Every head move is published (`{model, checkpoint, step}` on the heads channel) and
mirrored in a key. The store is the truth: a publish that fails (Redis down) is logged and
retried in the background until it lands or the head moves on; samplers reconcile from the
store and the mirror on reconnect, and the gateway pins requests to the store's head.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from headway.errors import NotFound
from headway.server.heads import HeadEvent, mirror_key, publish_head
from headway.store import CheckpointRecord, CheckpointStore

log = logging.getLogger(__name__)


class HeadPublisher:
    """Publishes head moves of `store`'s models to Redis (a no-op without Redis)."""

    def __init__(self, redis: Any | None, prefix: str, store: CheckpointStore) -> None:
        self.redis, self.prefix, self.store = redis, prefix, store
        self._unpublished: dict[str, CheckpointRecord] = {}  # heads Redis has not heard of
        self.failures = 0  # Redis operations that failed (each retried or moot), for metrics
        self._retrying: asyncio.Task[None] | None = None

    async def publish(self, slug: str, record: CheckpointRecord) -> None:
        """Publish and mirror `record` as the head of `slug` (retried later on failure)."""
        if self.redis is None:
            return
        event = HeadEvent(model=slug, checkpoint=record.id, step=record.step)
        try:
            await publish_head(self.redis, event, self.prefix)
            self._unpublished.pop(slug, None)
        except Exception as e:
            self.failures += 1
            self._unpublished[slug] = record  # retried by the background task
            log.warning("head of %s moved to %s but Redis publish failed: %s", slug, record.id, e)

    async def forget(self, slug: str) -> None:
        """Remove the mirror of a deleted model (a stale one is harmless: best effort)."""
        if self.redis is None:
            return
        try:
            await self.redis.delete(mirror_key(slug, self.prefix))
        except Exception as e:
            self.failures += 1
            log.warning("could not remove head mirror of %s: %s", slug, e)

    async def start(self, interval: float = 1.0) -> None:
        """Mirror every model's head (a crash may have left it stale), then retry failed
        publishes every `interval` seconds in the background."""
        if self.redis is None:
            return
        for model in self.store.list_models():
            await self.publish(model.slug, self.store.head_checkpoint(model.slug))
        self._retrying = asyncio.create_task(self._retry_forever(interval))

    async def _retry_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for slug in list(self._unpublished):
                record = self._unpublished.pop(slug)
                try:
                    if self.store.head(slug) == record.id:
                        await self.publish(slug, record)
                except NotFound:  # deleted meanwhile
                    pass

    async def close(self) -> None:
        """Stop retrying and close the Redis client."""
        if self._retrying is not None:
            self._retrying.cancel()
            await asyncio.gather(self._retrying, return_exceptions=True)
        if self.redis is not None:
            await self.redis.aclose()
