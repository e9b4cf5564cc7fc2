"""Keeping a replica current: head events, reconciliation, and the registry heartbeat.

Head events make reloads early; they are not needed for correctness (requests are pinned
to a checkpoint, loaded on demand). On start and after every reconnect the watcher reads
the head mirror keys, so an event missed while disconnected costs only time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from headway.heads import HeadEvent, channel, read_heads
from headway.replicas import ReplicaInfo, announce, withdraw
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
        self.reconciles = 0  # how many times the mirror was read (start + reconnects)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._events()), asyncio.create_task(self._heartbeat())]

    async def stop(self) -> None:
        self._stopping = True  # redis-py's reads can swallow a cancel: the loops check this
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=2.0)
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

    async def _events(self) -> None:
        backoff = 0.05
        while not self._stopping:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(channel(self.config.redis_prefix))
                # Subscribed first, then read the mirror: nothing can fall in between.
                for event in (await read_heads(self.redis, self.config.redis_prefix)).values():
                    self._apply(event)
                self.reconciles += 1
                backoff = 0.05
                while not self._stopping:
                    # get_message with a timeout, not listen(): redis-py can swallow a
                    # cancel inside a blocking read, so the loop polls the stop flag.
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                    if message is not None and message.get("type") == "message":
                        self._apply(HeadEvent.from_json(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # connection lost: reconnect, then reconcile
                log.warning("head events: %s; reconnecting in %.2fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
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
            await asyncio.sleep(self.config.heartbeat_seconds)
