"""Prometheus metrics of a service process, served on its `--metrics` address.

Each service process builds one `ServiceMetrics` (trainer, sampler, gateway). It holds its
own registry, not prometheus_client's global one, so services started in one process (as
the tests start them) never share or clash; `start` serves it at `http://<address>/metrics`
from a daemon thread (prometheus_client's own server, off the event loop).

What every service exports:
- `headway_grpc_requests_total{service, method, code}`: calls answered, by full method name
  and status code (`OK`, `INVALID_ARGUMENT`, ...; `CANCELLED` for a caller that went away),
  counted by `interceptor`, the outermost of the server's interceptors, so calls refused by
  authentication or parsing count too;
- `headway_grpc_request_duration_seconds{service, method}`: their latency (a histogram,
  from the handler's start to its status: a stream's until its last message; what grpc
  refuses before any handler runs, an oversized message say, is counted by neither);
- the process: `process_resident_memory_bytes`, `process_cpu_seconds_total`, open fds.
The services add their own (`gauge`, `counter`, `histogram`, `read_counter`): see each
`metrics.py` and the README's metrics section. Names follow Prometheus' conventions: a
`headway_` prefix, base units (seconds, bytes), `_total` on counters.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import start_http_server

from headway.server import logs
from headway.server.grpc import streamed

# Latency buckets (seconds) from a health check (~1 ms) to a full fork's OptimStep or a
# long generation (minutes).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)  # fmt: skip


class ServiceMetrics:
    """The metrics registry of one service process, and the HTTP server that exposes it."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "headway_grpc_requests",
            "gRPC calls answered, by method and status code",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "headway_grpc_request_duration_seconds",
            "gRPC call latency, handler start to status",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        self._server: Any = None

    # ---------------------------------------------------------------- the service's own
    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge whose value `read()` gives at each scrape (queue depth, rows, models)."""
        Gauge(name, doc, registry=self.registry).set_function(read)

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """A counter the service increments (`name` without `_total`)."""
        return Counter(name, doc, list(labels), registry=self.registry)

    def histogram(self, name: str, doc: str, labels: Sequence[str] = ()) -> Histogram:
        """A histogram of durations in seconds the service observes into (LATENCY_BUCKETS)."""
        return Histogram(name, doc, list(labels), buckets=LATENCY_BUCKETS, registry=self.registry)

    def read_counter(
        self,
        name: str,
        doc: str,
        read: Callable[[], float] | Callable[[], Mapping[str, float]],
        label: str = "",
    ) -> None:
        """A counter whose running total another object keeps, read at each scrape: the
        engine counts its tokens and steps as plain integers on its own thread and never
        imports prometheus_client. With `label`, `read()` gives a total per label value."""
        self.registry.register(_ReadCounter(name, doc, read, label))

    # -------------------------------------------------------------------- exposition
    def start(self, address: str) -> int:
        """Serve `/metrics` on `address` (host:port; port 0 = any free one); the bound port."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--metrics {address!r}: give host:port, for example 127.0.0.1:9400")
        server, _thread = start_http_server(int(port), host.strip("[]"), registry=self.registry)
        self._server = server
        return int(server.server_port)

    def stop(self) -> None:
        """Stop serving `/metrics` (if started)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---------------------------------------------------------------------- gRPC
    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """The server interceptor that counts and times every call (put it first)."""
        return _Observed(self)

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Record one answered call."""
        self.requests.labels(self.service, method, code).inc()
        self.latency.labels(self.service, method).observe(seconds)


class _ReadCounter:
    """A collector of one counter (per label value, with a label) read at each scrape."""

    def __init__(self, name: str, doc: str, read: Callable[[], Any], label: str) -> None:
        self.name, self.doc, self.read, self.label = name, doc, read, label

    def collect(self) -> Iterable[CounterMetricFamily]:
        if not self.label:
            yield CounterMetricFamily(self.name, self.doc, value=float(self.read()))
            return
        family = CounterMetricFamily(self.name, self.doc, labels=[self.label])
        for value, total in sorted(dict(self.read()).items()):
            family.add_metric([value], float(total))
        yield family

    def describe(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.doc, labels=[self.label] if self.label else None)


class _Observed(grpc.aio.ServerInterceptor):
    """Wraps each call's handler to record its status code and latency."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        # Wrapped per call, not cached per method: an inner interceptor may answer one call
        # with a handler of its own (authentication refused).
        handler = await continuation(details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        return _wrap(handler, details.method, self.metrics)


def _bind_call(context: grpc.aio.ServicerContext, method: str) -> None:
    """Name the call in its log lines (headway.server.logs): its request id and method."""
    logs.begin(logs.request_id_of(context.invocation_metadata()), method)


def _code(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return default.name


def _wrap(handler: grpc.RpcMethodHandler, method: str, metrics: ServiceMetrics) -> Any:
    """`handler` with each of its behaviours timed (sync behaviours are left as they are)."""
    for kind in ("unary_unary", "stream_unary"):
        inner = getattr(handler, kind)
        if inner is not None and inspect.iscoroutinefunction(inner):
            return handler._replace(**{kind: _timed_unary(inner, method, metrics)})
    for kind in ("unary_stream", "stream_stream"):
        inner = getattr(handler, kind)
        if inner is not None and (
            inspect.isasyncgenfunction(inner) or inspect.iscoroutinefunction(inner)
        ):
            return handler._replace(**{kind: _timed_stream(inner, method, metrics)})
    return handler


@contextmanager
def _observing(context: grpc.aio.ServicerContext, method: str, metrics: ServiceMetrics) -> Any:
    """Around one call's handler: name the call in its log lines, then record its status
    code (CANCELLED for a caller that went away, UNKNOWN for an unmapped error, else what
    the handler set) and its latency."""
    start, code = time.perf_counter(), None
    _bind_call(context, method)
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        code = grpc.StatusCode.CANCELLED.name
        raise
    except BaseException:
        code = _code(context, grpc.StatusCode.UNKNOWN)
        raise
    finally:
        metrics.observe(method, code or _code(context, grpc.StatusCode.OK),
                        time.perf_counter() - start)  # fmt: skip


def _timed_unary(inner: Callable[..., Awaitable[Any]], method: str, metrics: ServiceMetrics) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with _observing(context, method, metrics):
            return await inner(request, context)

    return call


def _timed_stream(inner: Callable[..., Any], method: str, metrics: ServiceMetrics) -> Any:
    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        with _observing(context, method, metrics):
            async for item in streamed(inner(request, context)):
                yield item

    return stream
