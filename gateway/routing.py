"""Choosing a sampler replica for a pinned request, and failing over.

Replicas come from the Redis registry (refreshed every few hundred ms). A request pinned
to a checkpoint goes to the least-loaded live replica that already holds it, else to the
least-loaded live replica (which loads it on demand). Load is counted in sequences (rows):
what the replica last reported (decoding and waiting) plus the rows of the requests this
gateway has in flight on it, so a burst spreads before the next heartbeat. A replica that
answers UNAVAILABLE is skipped for a few seconds and the request goes to the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from typing import Any

import grpc

from gateway.redis_errors import REDIS_ERRORS, RedisFailures
from headway.channels import CHANNEL_OPTIONS
from headway.server import logs
from headway.server.replicas import ReplicaInfo, list_replicas
from headway.v1 import sampling_pb2_grpc

log = logging.getLogger(__name__)
SUSPECT_SECONDS = 3.0  # how long a replica that failed is passed over


class NoReplica(Exception):
    """No live sampler replica is registered."""


class Router:
    """Replica choice and per-address channels for one gateway."""

    def __init__(
        self, redis: Any, prefix: str, cache_seconds: float, failures: RedisFailures | None = None
    ) -> None:
        self.redis, self.prefix, self.cache_seconds = redis, prefix, cache_seconds
        self.failures = failures or RedisFailures()
        self._replicas: list[ReplicaInfo] = []
        self._fetched = 0.0
        self._stubs: dict[str, sampling_pb2_grpc.SamplingServiceStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._inflight: dict[str, int] = defaultdict(int)
        self._suspect: dict[str, float] = {}
        self._refreshing: asyncio.Future[None] | None = None
        # Routing decisions, for the metrics: the replica chosen first had the checkpoint
        # loaded or not; replicas that could not take a call, by why (Gateway._try_next).
        self.routed: Counter[str] = Counter()  # "loaded" | "cold"
        self.failovers: Counter[str] = Counter()  # "unavailable" | "full"

    async def replicas(self) -> list[ReplicaInfo]:
        """The registry as last read; refreshed in the background, off the request path
        (only a gateway that has never read it, or was told a replica failed, waits)."""
        now = time.monotonic()
        if not self._fetched or not self._replicas:
            await self._refresh()
        elif self._fetched < 0 and self._refreshing is None:
            # Told a replica failed: re-read now, but if Redis is down, route on what the
            # last reading listed (the failed replica is passed over as suspect).
            try:
                await self._refresh()
            except REDIS_ERRORS as e:
                self._fetched = now
                self._unreadable(e)
        elif now - self._fetched > self.cache_seconds and self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh_in_background())
        return self._replicas

    async def _refresh_in_background(self) -> None:
        logs.clear()  # not the log fields of the call that happened to start it
        try:
            await self._refresh()
        except REDIS_ERRORS as e:  # keep routing on the last listing; callers are not waiting
            self._unreadable(e)

    def _unreadable(self, error: BaseException) -> None:
        """A refresh of the registry failed: counted and logged; routing goes on with the
        last listing."""
        self.failures.counts["registry"] += 1
        log.warning("could not refresh the replica registry: %s", error)

    async def _refresh(self) -> None:
        try:
            self._replicas = await list_replicas(self.redis, self.prefix)
            self._fetched = time.monotonic()
        finally:
            self._refreshing = None

    def known(self) -> int:
        """How many replicas the last reading of the registry listed."""
        return len(self._replicas)

    def stub(self, address: str) -> sampling_pb2_grpc.SamplingServiceStub:
        if address not in self._stubs:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
            self._stubs[address] = sampling_pb2_grpc.SamplingServiceStub(channel)
        return self._stubs[address]

    async def candidates(self, model: str, checkpoint: str) -> list[str]:
        """Replica addresses in the order to try them for (model, checkpoint)."""
        now = time.monotonic()
        live = [r for r in await self.replicas() if self._suspect.get(r.address, 0) < now]
        if not live:  # every replica suspect: try them anyway rather than fail
            live = list(await self.replicas())
        if not live:
            raise NoReplica("no sampler replica is running: start one (python -m sampler_svc)")
        wanted = f"{model}/{checkpoint}"

        def key(r: ReplicaInfo) -> tuple[int, int, str]:
            return (wanted not in r.loaded, r.load + self._inflight[r.address], r.id)

        ordered = sorted(live, key=key)
        self.routed["loaded" if wanted in ordered[0].loaded else "cold"] += 1
        return [r.address for r in ordered]

    def begin(self, address: str, rows: int = 1) -> None:
        """Count `rows` sequences this gateway has sent to `address` and not seen finish."""
        self._inflight[address] += rows

    def end(self, address: str, rows: int = 1) -> None:
        self._inflight[address] -= rows

    def mark_failed(self, address: str) -> None:
        self._suspect[address] = time.monotonic() + SUSPECT_SECONDS
        self._fetched = -1.0  # re-read the registry now: it may have dropped the replica

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
