"""Assembling a sampler replica: engines, gRPC server, Redis watcher and heartbeat.

A replica whose engine thread dies stops advertising itself: its health turns NOT_SERVING
and it leaves the registry (requests already failed with UNAVAILABLE, see `sampler`), and
`serve` returns 1 so that whatever supervises the process restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis.asyncio as aioredis
import torch
from grpc_health.v1 import health_pb2

from headway.errors import Unavailable
from headway.server.auth import check_listen, interceptors
from headway.server.grpc import (
    SERVER_OPTIONS,
    ParsedRequests,
    add_health_and_reflection,
    bind,
    until_signalled,
)
from headway.server.metrics import ServiceMetrics
from headway.server.replicas import ReplicaInfo
from headway.v1 import sampling_pb2, sampling_pb2_grpc
from sampler_svc.config import SamplerConfig
from sampler_svc.metrics import add_replica_metrics
from sampler_svc.sampler import Sampler
from sampler_svc.servicer import SamplingServicer
from sampler_svc.watch import Watcher

log = logging.getLogger(__name__)
SERVICE = sampling_pb2.DESCRIPTOR.services_by_name["SamplingService"].full_name


@dataclass
class Replica:
    """A running replica's parts (what tests and `serve` hold on to)."""

    server: grpc.aio.Server
    port: int
    sampler: Sampler
    watcher: Watcher
    redis: aioredis.Redis
    health: Any  # the standard health servicer (grpc_health's aio HealthServicer)
    metrics: ServiceMetrics
    metrics_port: int = 0  # where /metrics is served (0: not served)
    failed: asyncio.Event = field(default_factory=asyncio.Event)  # the engine thread died
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def engine_failed(self, error: Unavailable) -> None:
        """On the event loop, once the engine thread died: stop advertising this replica."""
        self.failed.set()
        task = asyncio.get_running_loop().create_task(self._withdraw())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _withdraw(self) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.watcher.stop()  # no more heartbeats, and the registry key deleted
        log.error("sampler %s is out of the registry and NOT_SERVING", self.watcher.info.id)

    async def close(self, grace: float = 1.0) -> None:
        await self.watcher.stop()
        await self.server.stop(grace)
        self.sampler.stop()
        await self.redis.aclose()
        self.metrics.stop()


async def create_replica(
    config: SamplerConfig, address: str = "127.0.0.1:0"
) -> tuple[grpc.aio.Server, int, Replica]:
    """A bound (not started) server with its engine thread and Redis tasks running.

    UnsafeConfig, before anything starts, for a non-loopback address without an internal
    token; with one, every call but health and reflection must carry it.
    """
    check_listen(address, config.internal_token, "sampler")
    sampler = Sampler(config)
    metrics = ServiceMetrics("sampler")
    server = grpc.aio.server(
        options=SERVER_OPTIONS,
        # The metrics interceptor first: calls refused by the token check count too.
        interceptors=[
            metrics.interceptor(),
            *interceptors(config.internal_token),
            ParsedRequests(),
        ],
    )
    sampling_pb2_grpc.add_SamplingServiceServicer_to_server(SamplingServicer(sampler), server)
    health = await add_health_and_reflection(server, (SERVICE,))
    port = bind(server, address, "sampler")
    host = address.rsplit(":", 1)[0]
    info = ReplicaInfo(
        id=config.replica_id or f"sampler-{secrets.token_hex(4)}",
        address=config.advertise or f"{host}:{port}",
        bases=list(config.bases),
    )
    redis = aioredis.from_url(config.redis_url)
    watcher = Watcher(sampler, redis, config, info)
    add_replica_metrics(metrics, sampler, watcher)
    sampler.start()
    try:
        # Registered before this returns (the caller starts the server next): a gateway
        # that looks right after finds the replica, instead of a heartbeat later.
        await asyncio.wait_for(watcher.announce(), 2.0)
    except Exception as e:  # Redis down: the heartbeat keeps trying
        log.warning("first registry announce failed: %s", e)
    watcher.start()
    metrics_port = metrics.start(config.metrics) if config.metrics else 0  # last: see gateway
    replica = Replica(server, port, sampler, watcher, redis, health, metrics, metrics_port)
    loop = asyncio.get_running_loop()
    sampler.on_failure(lambda error: loop.call_soon_threadsafe(replica.engine_failed, error))
    return server, port, replica


async def serve(config: SamplerConfig, address: str) -> int:
    """Run a replica until SIGINT/SIGTERM (then 0) or until its engine fails (then 1), and
    stop gracefully."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    server, port, replica = await create_replica(config, address)
    await server.start()
    log.info(
        "sampler %s serving on port %d (store %s)", replica.watcher.info.id, port, config.store
    )
    waits = {asyncio.create_task(until_signalled()), asyncio.create_task(replica.failed.wait())}
    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await replica.close(grace=5)
    if replica.failed.is_set():
        log.error("exiting: the engine failed (a supervisor restarts the replica)")
        return 1
    return 0
