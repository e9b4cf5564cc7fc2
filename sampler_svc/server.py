"""Assembling a sampler replica: engines, gRPC server, Redis watcher and heartbeat."""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

import grpc
import redis.asyncio as aioredis

from headway.grpc_util import SERVER_OPTIONS, add_health_and_reflection, bind, until_signalled
from headway.internal_auth import check_listen, interceptors
from headway.replicas import ReplicaInfo
from headway.v1 import sampling_pb2, sampling_pb2_grpc
from sampler_svc.config import SamplerConfig
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

    async def close(self, grace: float = 1.0) -> None:
        await self.watcher.stop()
        await self.server.stop(grace)
        self.sampler.stop()
        await self.redis.aclose()


async def create_replica(
    config: SamplerConfig, address: str = "127.0.0.1:0"
) -> tuple[grpc.aio.Server, int, Replica]:
    """A bound (not started) server with its engine thread and Redis tasks running.

    UnsafeConfig, before anything starts, for a non-loopback address without an internal
    token; with one, every call but health and reflection must carry it.
    """
    check_listen(address, config.internal_token, "sampler")
    sampler = Sampler(config)
    server = grpc.aio.server(
        options=SERVER_OPTIONS, interceptors=interceptors(config.internal_token)
    )
    sampling_pb2_grpc.add_SamplingServiceServicer_to_server(SamplingServicer(sampler), server)
    await add_health_and_reflection(server, (SERVICE,))
    port = bind(server, address, "sampler")
    host = address.rsplit(":", 1)[0]
    info = ReplicaInfo(
        id=config.replica_id or f"sampler-{secrets.token_hex(4)}",
        address=config.advertise or f"{host}:{port}",
        bases=list(config.bases),
    )
    redis = aioredis.from_url(config.redis_url)
    watcher = Watcher(sampler, redis, config, info)
    sampler.start()
    try:
        # Registered before this returns (the caller starts the server next): a gateway
        # that looks right after finds the replica, instead of a heartbeat later.
        await asyncio.wait_for(watcher.announce(), 2.0)
    except Exception as e:  # Redis down: the heartbeat keeps trying
        log.warning("first registry announce failed: %s", e)
    watcher.start()
    return server, port, Replica(server, port, sampler, watcher, redis)


async def serve(config: SamplerConfig, address: str) -> None:
    """Run a replica until SIGINT/SIGTERM, then stop gracefully."""
    server, port, replica = await create_replica(config, address)
    await server.start()
    log.info(
        "sampler %s serving on port %d (store %s)", replica.watcher.info.id, port, config.store
    )
    await until_signalled()
    await replica.close(grace=5)
