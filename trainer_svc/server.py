"""Assembling the trainer's gRPC server: `create_server` for tests and `serve` for processes."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from headway.grpc_util import SERVER_OPTIONS
from headway.v1 import model_pb2, model_pb2_grpc, training_pb2, training_pb2_grpc
from trainer_svc.config import TrainerConfig
from trainer_svc.servicer import ModelServicer, TrainingServicer
from trainer_svc.trainer import Trainer

log = logging.getLogger(__name__)
SERVICES = (
    model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name,
)


async def create_server(
    config: TrainerConfig, address: str = "127.0.0.1:0"
) -> tuple[grpc.aio.Server, int, Trainer]:
    """A started-ready (not started) server bound to `address`; (server, port, trainer)."""
    redis = aioredis.from_url(config.redis_url) if config.redis_url else None
    trainer = Trainer(config, redis)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    model_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(trainer), server)
    training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(trainer), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the trainer to {address}")
    if redis is not None:
        await trainer.mirror_heads()
        trainer.publisher = asyncio.create_task(trainer.retry_publishes())
    return server, port, trainer


async def serve(config: TrainerConfig, address: str) -> None:
    """Run the trainer until SIGINT/SIGTERM, then stop gracefully."""
    server, port, trainer = await create_server(config, address)
    await server.start()
    log.info(
        "trainer serving on port %d (store %s, redis %s)", port, config.store, config.redis_url
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=5)
    await trainer.close()
