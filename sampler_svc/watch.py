"""Keeping a replica current: head events, reconciliation, and the registry heartbeat.

Head events make reloads early; they are not needed for correctness (requests are pinned
to a checkpoint, loaded on demand). On start and after every reconnect the watcher
reconciles: it preloads the store's head of every model the head mirror names or this
replica serves, so an event missed while disconnected costs only time. The heads come from
the store, the truth, not from the mirror: a head that moved while Redis was unreachable
was never published, and until the trainer's retry lands the mirror names the one before
(a Redis restarted without its data has no mirror at all). Reconnection is retried within
`redis_retry_max_seconds`, so a replica is current again that long after Redis returns,
whoever publishes what.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from headway.errors import NotFound
from headway.server.heads import HeadEvent, channel, read_heads
from headway.server.replicas import ReplicaInfo, announce, withdraw
from sampler_svc.config import SamplerConfig
from sampler_svc.sampler import Sampler

log = logging.getLogger(__name__)


class Watcher:
    """Background tasks of a replica that talk to Redis."""

    def __init__(
        self, sampler: Sampler, redis: Any, config: SamplerConfig, info: ReplicaInfo
    ) -> None:
        self.sampler, self.redis, self.config, self.info = sampler, redis, config, info
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._stopped = asyncio.Event()  # wakes the heartbeat's wait at once
        self.reconciles = 0  # how many times the mirror was read (start + reconnects)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._events()), asyncio.create_task(self._heartbeat())]

    async def stop(self) -> None:
        # Not cancelled but told: redis-py can swallow a cancel inside a command (the loop
        # then waits out a whole beat), and a pubsub cancelled mid-read waits on its
        # connection to close. Told, both end within one 0.05 s read.
        self._stopping = True
        self._stopped.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
            for task in self._tasks:
                task.cancel()
        with contextlib.suppress(Exception):  # Redis gone: the TTL removes us anyway
            await withdraw(self.redis, self.info.id, self.config.redis_prefix)

    def _relevant(self, model: str) -> bool:
        if not self.config.bases:
            return True
        try:
            return self.sampler.store.get_model(model).base in self.config.bases
        except Exception:
            return False

    def _apply(self, event: HeadEvent) -> None:
        if self._relevant(event.model):
            self.sampler.preload(event.model, event.checkpoint)

    async def _reconcile(self) -> None:
        """Preload the store's head of every model the mirror names or this replica serves."""
        mirrored = await read_heads(self.redis, self.config.redis_prefix)
        served = {key.split("/", 1)[0] for key in self.sampler.loaded_checkpoints()}
        heads = await asyncio.to_thread(self._store_heads, mirrored, set(mirrored) | served)
        for model, checkpoint in heads.items():
            self.sampler.preload(model, checkpoint)

    def _store_heads(self, mirrored: dict[str, HeadEvent], models: set[str]) -> dict[str, str]:
        """model → its head in the store, for the relevant ones of `models` (a model the
        store no longer has is skipped; one it cannot read now keeps the mirror's head)."""
        heads = {}
        for model in sorted(models):
            if not self._relevant(model):
                continue
            try:
                heads[model] = self.sampler.store.head(model)
            except NotFound:  # deleted since: nothing to serve
                pass
            except Exception as e:
                log.warning("reconcile: cannot read the head of %s from the store: %s", model, e)
                if model in mirrored:
                    heads[model] = mirrored[model].checkpoint
        return heads

    async def _events(self) -> None:
        first, longest = 0.05, self.config.redis_retry_max_seconds
        backoff = first
        lost: float | None = None  # time.monotonic() when Redis became unreachable
        while not self._stopping:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(channel(self.config.redis_prefix))
                # Subscribed first, then reconcile: nothing can fall in between.
                await self._reconcile()
                if lost is not None:
                    # The registry entry may have expired, or Redis lost it: back in it
                    # now, not at the next heartbeat.
                    await self.announce()
                    log.warning(
                        "head events: Redis is back after %.1fs; heads reconciled from the store",
                        time.monotonic() - lost,
                    )
                self.reconciles += 1
                lost, backoff = None, first
                while not self._stopping:
                    # get_message with a timeout, not listen(): redis-py can swallow a
                    # cancel inside a blocking read, so the loop polls the stop flag.
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
                    if message is not None and message.get("type") == "message":
                        self._apply(HeadEvent.from_json(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # connection lost: reconnect, then reconcile
                if lost is None:
                    lost = time.monotonic()
                    log.warning("head events: %s; reconnecting (every %gs at most)", e, longest)
                else:  # one line per outage, not per attempt
                    log.debug("head events: %s; reconnecting in %.2fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, longest)
            finally:
                # Bounded: a cancelled listen may still hold the connection.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(pubsub.aclose(), 1.0)

    async def announce(self) -> None:
        """Write this replica's registry entry now (its load and what it has loaded)."""
        self.info.loaded = self.sampler.loaded_checkpoints()
        self.info.queue_depth = self.sampler.queue_depth
        self.info.live_rows = self.sampler.live_rows
        self.info.queued_rows = self.sampler.queued_rows
        self.info.updated = time.time()
        await announce(self.redis, self.info, self.config.heartbeat_ttl, self.config.redis_prefix)

    async def _heartbeat(self) -> None:
        while not self._stopping:
            try:
                await self.announce()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("registry heartbeat failed: %s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.config.heartbeat_seconds)
