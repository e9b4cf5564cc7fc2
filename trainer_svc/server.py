"""Assembling the trainer's gRPC server: `create_server` for tests and `serve` for processes."""

from __future__ import annotations

import logging

import grpc
import redis.asyncio as aioredis
import torch

from headway.server.auth import check_listen, interceptors
from headway.server.grpc import (
    SERVER_OPTIONS,
    ParsedRequests,
    add_health_and_reflection,
    bind,
    until_signalled,
)
from headway.server.metrics import ServiceMetrics
from headway.v1 import model_pb2, model_pb2_grpc, training_pb2, training_pb2_grpc
from trainer_svc.config import TrainerConfig
from trainer_svc.metrics import add_trainer_metrics
from trainer_svc.ranks import RankGroup
from trainer_svc.servicer import ModelServicer, TrainingServicer
from trainer_svc.trainer import Trainer

log = logging.getLogger(__name__)
SERVICES = (
    model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name,
)


async def create_server(
    config: TrainerConfig, address: str = "127.0.0.1:0", group: RankGroup | None = None
) -> tuple[grpc.aio.Server, int, Trainer]:
    """A started-ready (not started) server bound to `address`; (server, port, trainer).
    `group`: this is rank 0 of a torch.distributed trainer.

    UnsafeConfig, before anything starts, for a non-loopback address without an internal
    token; with one, every call but health and reflection must carry it.
    """
    check_listen(address, config.internal_token, "trainer")
    redis = aioredis.from_url(config.redis_url) if config.redis_url else None
    trainer = Trainer(config, redis, group)
    metrics = ServiceMetrics("trainer")
    add_trainer_metrics(metrics, trainer)
    server = grpc.aio.server(
        options=SERVER_OPTIONS,
        # The metrics interceptor first: calls refused by the token check count too.
        interceptors=[
            metrics.interceptor(),
            *interceptors(config.internal_token),
            ParsedRequests(),
        ],
    )
    model_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(trainer), server)
    training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(trainer), server)
    await add_health_and_reflection(server, SERVICES)
    port = bind(server, address, "trainer")
    await trainer.heads.start()
    # Kept by the trainer for whoever holds it (tests, `serve`): started last, so a failed
    # start leaves no HTTP server behind.
    trainer.metrics = metrics
    trainer.metrics_port = metrics.start(config.metrics) if config.metrics else 0
    return server, port, trainer


async def serve(config: TrainerConfig, address: str, group: RankGroup | None = None) -> None:
    """Run the trainer until SIGINT/SIGTERM, then stop gracefully."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    server, port, trainer = await create_server(config, address, group)
    await server.start()
    log.info(
        "trainer serving on port %d (store %s, redis %s)", port, config.store, config.redis_url
    )
    await until_signalled()
    await server.stop(grace=5)
    await trainer.close()
