"""The gateway's health, per service, as its dependencies allow: what a load balancer reads.

A gateway process that runs is not yet a gateway that serves: sampling needs a sampler
replica in the Redis registry, training and model calls need the trainer, traces and
routing need Redis. The standard health service reports each of the contract's services
from what the gateway can reach now, checked every `interval` seconds in the background:

- `headway.v1.TraceService`: SERVING while Redis answers;
- `headway.v1.ModelService`, `headway.v1.TrainingService`: SERVING while the trainer
  answers its own health check;
- `headway.v1.SamplingService`: SERVING while at least one sampler replica is registered,
  or, while Redis is down, while the gateway still knows replicas from its last reading of
  the registry (it routes on that list meanwhile);
- `""` (the whole server): SERVING while any of them is. A Redis outage hits every gateway
  alike, so it must not take them all out of a load balancer while sampling and training
  still work through them; the per-service statuses say what does not.

A check that fails or takes longer than `timeout` seconds (3: generous, so that a loaded
machine's slow answer is not taken for a dead dependency) counts as NOT_SERVING until the
next one succeeds. Statuses are set only when they change (watchers see each change once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc

from headway.server.replicas import list_replicas

log = logging.getLogger(__name__)

MODEL, SAMPLING = "headway.v1.ModelService", "headway.v1.SamplingService"
TRAINING, TRACE = "headway.v1.TrainingService", "headway.v1.TraceService"


class HealthMonitor:
    """Keeps a health servicer's statuses in step with the gateway's dependencies."""

    def __init__(
        self,
        servicer: Any,
        redis: Any,
        prefix: str,
        trainer: grpc.aio.Channel,
        interval: float,
        timeout: float = 3.0,
        known_replicas: Callable[[], int] = lambda: 0,
    ) -> None:
        self.servicer, self.redis, self.prefix, self.trainer = servicer, redis, prefix, trainer
        self.known_replicas = known_replicas  # replicas in the router's last registry reading
        self.interval, self.timeout = interval, timeout
        self.statuses: dict[str, bool] = {}
        self._task: asyncio.Task[None] | None = None

    async def _redis_ok(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), self.timeout))
        except Exception:  # any failure to answer is "down"
            return False

    async def _trainer_ok(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = await health_pb2_grpc.HealthStub(self.trainer).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def _replicas_ok(self) -> bool:
        try:
            replicas = await asyncio.wait_for(list_replicas(self.redis, self.prefix), self.timeout)
        except Exception:
            return False
        return bool(replicas)

    async def check(self) -> dict[str, bool]:
        """Check every dependency now and update the servicer; {service: serving}."""
        from grpc_health.v1 import health_pb2

        redis_ok, trainer_ok, replicas_ok = await asyncio.gather(
            self._redis_ok(), self._trainer_ok(), self._replicas_ok()
        )
        sampling_ok = replicas_ok or (not redis_ok and self.known_replicas() > 0)
        now = {
            TRACE: redis_ok,
            MODEL: trainer_ok,
            TRAINING: trainer_ok,
            SAMPLING: sampling_ok,
        }
        now[""] = any(now.values())
        for service, serving in now.items():
            if self.statuses.get(service) != serving:
                status = health_pb2.HealthCheckResponse
                await self.servicer.set(service, status.SERVING if serving else status.NOT_SERVING)
                if service in self.statuses:  # a change, not the first reading
                    log.warning(
                        "health: %s is now %s",
                        service or "gateway",
                        "SERVING" if serving else "NOT_SERVING",
                    )
        self.statuses = now
        return now

    def start(self) -> None:
        """Check every `interval` seconds until `stop()`."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    await self.check()
                except Exception:  # never let the monitor die: the next round retries
                    log.exception("health check failed")

        self._task = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
