"""Assembling a gateway: gRPC (all four services, health, reflection) and HTTP on one loop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
import redis.asyncio as aioredis

from gateway.config import GatewayConfig
from gateway.core import Gateway
from gateway.grpc_limits import CallLimits, SizeLimit
from gateway.grpc_services import GatewaySampling, relay_handlers
from gateway.health import HealthMonitor
from gateway.metrics import add_gateway_metrics
from gateway.trace_service import TraceServicer
from headway.server.auth import UnsafeConfig, is_loopback
from headway.server.grpc import SERVER_OPTIONS, add_health_and_reflection, bind, until_signalled
from headway.server.metrics import ServiceMetrics
from headway.v1 import (
    model_pb2,
    sampling_pb2,
    sampling_pb2_grpc,
    trace_pb2,
    trace_pb2_grpc,
    training_pb2,
)

log = logging.getLogger(__name__)
SERVICES = tuple(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (model_pb2, "ModelService"),
        (sampling_pb2, "SamplingService"),
        (training_pb2, "TrainingService"),
        (trace_pb2, "TraceService"),
    )
)


@dataclass
class GatewayProcess:
    """A running gateway's parts."""

    server: grpc.aio.Server
    port: int
    gateway: Gateway
    http_port: int = 0
    health: HealthMonitor | None = None
    metrics: ServiceMetrics | None = None
    metrics_port: int = 0  # where /metrics is served (0: not served)
    _http: object | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self, grace: float = 1.0) -> None:
        if self.health is not None:
            await self.health.stop()
        if self._http is not None:
            self._http.should_exit = True  # type: ignore[attr-defined]
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.stop(grace)
        await self.gateway.close()
        await self.gateway.redis.aclose()
        if self.metrics is not None:
            self.metrics.stop()


async def create_gateway(
    config: GatewayConfig, address: str = "127.0.0.1:0"
) -> tuple[grpc.aio.Server, int, GatewayProcess]:
    """A bound gRPC server (not started) and, if configured, the HTTP API (started).

    UnsafeConfig, before anything starts, for auth off on a non-loopback address without
    `config.insecure`.
    """
    check_exposure(config, address)
    # A blocking pool: a burst of requests (every recorded turn, idempotency key and trace
    # read takes a connection) waits for a free connection instead of failing at redis-py's
    # default limit of 100 with "Too many connections".
    pool = aioredis.BlockingConnectionPool.from_url(
        config.redis_url,
        max_connections=config.redis_max_connections,
        timeout=config.redis_pool_timeout,
    )
    redis = aioredis.Redis.from_pool(pool)  # closing the client closes the pool
    gateway = Gateway(config, redis)
    metrics = ServiceMetrics("gateway")
    add_gateway_metrics(metrics, gateway)
    server = grpc.aio.server(
        options=_server_options(config),
        # The metrics interceptor first: calls refused for size or slots count too.
        interceptors=[metrics.interceptor(), call_limits(config, gateway)],
    )
    server.add_generic_rpc_handlers(relay_handlers(gateway))
    sampling_pb2_grpc.add_SamplingServiceServicer_to_server(GatewaySampling(gateway), server)

    async def team_of(context: grpc.aio.ServicerContext) -> str:
        return gateway.team(context.invocation_metadata())

    trace_pb2_grpc.add_TraceServiceServicer_to_server(
        TraceServicer(gateway.traces, team_of, gateway.model_visible), server
    )
    servicer = await add_health_and_reflection(server, SERVICES)
    port = bind(server, address, "gateway")
    health = HealthMonitor(
        servicer,
        redis,
        config.redis_prefix,
        gateway.trainer,
        config.health_interval_seconds,
        known_replicas=gateway.router.known,
    )
    await health.check()  # true from the first answer on, not optimistic
    health.start()
    process = GatewayProcess(server, port, gateway, health=health, metrics=metrics)
    if config.http_listen:
        await _start_http(process, config.http_listen)
    if config.metrics:  # last: a failed start leaves no metrics server behind
        process.metrics_port = metrics.start(config.metrics)
    if config.auth:
        log.info("gateway: auth ON (API keys required)")
    else:
        log.warning(
            "gateway: auth OFF (local mode): every caller is the local team and an admin, "
            "no key needed"
        )
        if gateway.keys.has_keys():
            log.warning(
                "gateway: %s holds API keys but auth is OFF: they are ignored and every caller "
                "is trusted; start with --auth on to require them",
                gateway.keys.path,
            )
    return server, port, process


def check_exposure(config: GatewayConfig, address: str) -> None:
    """UnsafeConfig if auth is off and the gRPC or HTTP address is reachable from other
    machines, unless `config.insecure` says the network is trusted: in local mode every
    caller acts as the local admin."""
    if config.auth or config.insecure:
        return
    # The HTTP API binds 127.0.0.1 when its address has no host (see _start_http).
    http_host = config.http_listen.rpartition(":")[0] or "127.0.0.1"
    for what, listen, host in (
        ("gRPC", address, address.rpartition(":")[0]),
        ("HTTP", config.http_listen, http_host),
    ):
        if listen and not is_loopback(host):
            raise UnsafeConfig(
                f"auth is off and the gateway's {what} address {listen} is not a loopback "
                "address: anyone who reaches it would act as the local admin. Turn auth on "
                "(--auth on, keys from `headway keys create`), listen on 127.0.0.1, or pass "
                "--insecure if every machine that can reach it is trusted"
            )


# The config field that limits the requests of each service of the contract.
REQUEST_LIMITS = {
    "headway.v1.ModelService": "max_model_request_bytes",
    "headway.v1.SamplingService": "max_sampling_request_bytes",
    "headway.v1.TrainingService": "max_training_request_bytes",
    "headway.v1.TraceService": "max_trace_request_bytes",
}


def call_limits(config: GatewayConfig, gateway: Gateway) -> CallLimits:
    """The interceptor that checks each call's size and its team's slots, and maps Redis
    errors; health and reflection are held to the ModelService limit."""
    assert set(REQUEST_LIMITS) == set(SERVICES)
    limits = {name: SizeLimit(getattr(config, f), f) for name, f in REQUEST_LIMITS.items()}
    other = limits["headway.v1.ModelService"]
    return CallLimits(limits, other, gateway.team, gateway.slots, gateway.redis_failures)


def _server_options(config: GatewayConfig) -> list[tuple[str, int]]:
    """The shared server options, receiving up to the largest per-service limit (each call
    is then checked against its own by `call_limits`)."""
    largest = max(getattr(config, field) for field in REQUEST_LIMITS.values())
    options = [o for o in SERVER_OPTIONS if o[0] != "grpc.max_receive_message_length"]
    return [*options, ("grpc.max_receive_message_length", largest)]


async def _start_http(process: GatewayProcess, listen: str) -> None:
    import uvicorn

    from gateway.http import create_app
    from gateway.http_guard import HttpGuard

    host, _, port = listen.rpartition(":")
    gateway_config = process.gateway.config
    app = HttpGuard(
        create_app(process.gateway),
        check_host=not gateway_config.auth,
        listen_host=host,
        allowed_hosts=gateway_config.allowed_hosts,
    )
    config = uvicorn.Config(
        app,
        host=host or "127.0.0.1",
        port=int(port),
        log_level="warning",
        lifespan="off",
        log_config=None,  # its loggers through ours (text or --log-format json)
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):  # wait until it listens (and learn the port when 0 was asked)
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    process._http, process._tasks = server, [task]
    process.http_port = server.servers[0].sockets[0].getsockname()[1]


async def serve(config: GatewayConfig, address: str) -> None:
    """Run a gateway until SIGINT/SIGTERM, then stop gracefully."""
    server, port, process = await create_gateway(config, address)
    await server.start()
    log.info(
        "gateway serving gRPC on port %d%s",
        port,
        f", HTTP on port {process.http_port}" if process.http_port else "",
    )
    await until_signalled()
    await process.close(grace=5)
