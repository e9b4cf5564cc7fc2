"""The gateway's Prometheus metrics (served on `--metrics`; see headway.server.metrics).

Besides every gRPC call's count and latency by method and status (Sample, the relayed
training calls, ... as the gateway answered them):
- `headway_gateway_routed_total{replica}`: sampling calls routed, by whether the replica
  chosen first had the checkpoint loaded (`loaded`) or must load it (`cold`);
- `headway_gateway_failovers_total{reason}`: replicas that could not take a call, which
  then went to the next replica if one remained: the replica failed before answering
  (`unavailable`) or was full (`full`, a retry pushback);
- `headway_gateway_known_replicas`: sampler replicas in the registry as last read;
- `headway_gateway_redis_errors_total{where}`: Redis operations that failed: in a `call`
  (answered UNAVAILABLE / 503) or a `registry` refresh (routing goes on with the last
  listing); redis-py reconnects on the next operation.
"""

from __future__ import annotations

from gateway.core import Gateway
from headway.server.metrics import ServiceMetrics


def add_gateway_metrics(m: ServiceMetrics, gateway: Gateway) -> None:
    """Add the gateway's own metrics to its registry `m`, read from `gateway` at each
    scrape."""
    router = gateway.router
    m.gauge("headway_gateway_known_replicas", "sampler replicas in the registry as last read",
            router.known)  # fmt: skip
    m.read_counter(
        "headway_gateway_routed",
        "sampling calls routed, by whether the first replica had the checkpoint loaded",
        lambda: router.routed,
        label="replica",
    )
    m.read_counter(
        "headway_gateway_failovers",
        "replicas that could not take a call (unavailable, full); the next one was tried",
        lambda: router.failovers,
        label="reason",
    )
    m.read_counter(
        "headway_gateway_redis_errors",
        "Redis operations that failed, in a call (answered UNAVAILABLE) or a registry refresh",
        lambda: gateway.redis_failures.counts,
        label="where",
    )
