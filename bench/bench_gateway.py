"""`make bench-gateway`: what the gateway costs a Sample, against the sampler called directly.

Same run, same replica, same request: the ~40M Qwen3-shaped model of `configs/qwen3-40m.json`
(fp32, seeded random weights, registered as a base), a 16-token prompt, 16 new tokens,
greedy, end of sequence ignored. The trainer, one sampler replica and one gateway (HTTP
off) run as real processes (`python -m trainer_svc|sampler_svc|gateway`, one torch thread
each) on loopback ports, with a temp store and a Redis key prefix of their own, as in
production; this process is only the client. Each call is a unary `Sample`, either to the
replica's address (direct) or to the gateway's, which resolves the caller's team, pins the
store's head, picks the replica from the Redis registry and forwards.

- Latency: ≥200 sequential calls each way after a warmup, interleaved in blocks (direct,
  gateway, direct, ...) so that drift on the shared machine hits both alike; p50, p90 and
  mean, and the CPU time the sampler and gateway processes spend per call (from /proc).
  Every gateway reply must carry the same tokens as the direct one.
- Throughput: 32 client threads each making a fixed number of calls, all at once, direct
  and through the gateway in turn (rounds interleaved): calls/s over the wall time.

gateway_overhead = p50(gateway) / p50(direct) − 1 (goal ≤ 0.10). `--profile` also runs a
gateway in this process and times its steps per call (pin, replica choice, the whole
Sample), then the same with the replica listing refreshed in the background instead of on
the request path (a what-if, patched in this process only). Last line:
`gateway_overhead=<r>`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_tokenizer,
    build_bench_model,
    clean_redis,
    print_table,
    run_at_once,
)
from headway.channels import CHANNEL_OPTIONS  # noqa: E402
from headway.tensors import to_tensor  # noqa: E402
from headway.testing import ServiceProcess, redis_prefix, shared_redis_url  # noqa: E402
from headway.v1 import (  # noqa: E402
    common_pb2,
    model_pb2,
    model_pb2_grpc,
    sampling_pb2,
    sampling_pb2_grpc,
)

BASE = "base40m"
PROMPT, NEW = 16, 16
CLIENTS = 32
READY_TIMEOUT = 120.0
# Torch threads per service. The machine is small and shared: spinning OpenMP threads of a
# multi-threaded sampler stall for whole time slices whenever the other processes (gateway,
# client, other jobs) hold the cores, which turns a 16-token call into seconds.
THREADS = os.environ.get("OMP_NUM_THREADS", "1")
now = time.perf_counter


# ------------------------------------------------------------------------------ measuring
def sample_request() -> sampling_pb2.SampleRequest:
    prompt = [(7 * i + 3) % 250 + 3 for i in range(PROMPT)]  # ids the tokenizer knows
    params = common_pb2.SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    return sampling_pb2.SampleRequest(
        model=BASE, prompt_tokens=to_tensor(prompt, common_pb2.DTYPE_INT32), params=params
    )


def check(reply: sampling_pb2.SampleResponse) -> bytes:
    """The reply's tokens, after checking it is complete."""
    (seq,) = reply.sequences
    assert list(seq.tokens.shape) == [NEW], f"{list(seq.tokens.shape)} tokens, not {NEW}"
    assert reply.checkpoint == "base", reply.checkpoint
    return seq.tokens.data


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds that processes spend while each way runs (summed over its blocks)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.used: dict[tuple[str, str], float] = {}  # (way, process) → seconds

    def run(self, way: str, fn: Callable[[], None]) -> None:
        before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        fn()
        for name, pid in self.pids.items():
            key = (way, name)
            self.used[key] = self.used.get(key, 0.0) + cpu_seconds(pid) - before[name]


def sequential(
    ways: dict[str, Callable[[], Any]], calls: int, block: int, meter: CpuMeter | None = None
) -> dict[str, list[float]]:
    """Latency of each way, `calls` sequential calls each, alternating in blocks."""
    times: dict[str, list[float]] = {k: [] for k in ways}

    def run_block(key: str) -> None:
        for _ in range(block):
            start = now()
            ways[key]()
            times[key].append(now() - start)

    while min(len(t) for t in times.values()) < calls:
        for key in ways:
            if meter is None:
                run_block(key)
            else:
                meter.run(key, lambda k=key: run_block(k))
    return times


def concurrent(fn: Callable[[], Any], clients: int, per_client: int) -> float:
    """Calls per second of `clients` threads making `per_client` calls each, all at once."""

    def client() -> None:
        for _ in range(per_client):
            fn()

    return clients * per_client / run_at_once([client] * clients)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


# ------------------------------------------------------------------------------- profile
async def background_listing(router: Any) -> None:
    """What-if: the router's replica listing kept fresh by this task, off the request path."""
    from headway.server.replicas import list_replicas

    async def listing() -> list[Any]:
        return router._replicas

    router.replicas = listing
    while True:
        router._replicas = await list_replicas(router.redis, router.prefix)
        await asyncio.sleep(router.cache_seconds)


def profile_gateway(
    store: Path, trainer: str, prefix: str, direct: Callable[[], Any], calls: int, block: int
) -> list[list[object]]:
    """Where a call spends its time in the gateway, and a what-if without the registry scan.

    A second gateway runs in this process (own event loop, HTTP off) in front of the same
    replica, its steps wrapped with timers; calls to it alternate in blocks with direct ones.
    Then the same again with the replica listing refreshed by a background task every
    `registry_cache_seconds` instead of on the request path (patched here, in this process).
    """
    from gateway.config import GatewayConfig
    from gateway.server import create_gateway
    from headway.server.replicas import list_replicas

    logging.getLogger("gateway").setLevel(logging.ERROR)  # its "auth OFF" notice
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(120)

    async def boot() -> tuple[Any, int, Any]:
        config = GatewayConfig(store=store, trainer=trainer, redis_url=shared_redis_url(),
                               redis_prefix=prefix)  # fmt: skip
        server, port, process = await create_gateway(config)
        await server.start()
        return server, port, process

    _, port, process = run(boot())
    gw = process.gateway
    spans: dict[str, list[float]] = {}

    def timed(owner: Any, attr: str, name: str) -> None:
        fn = getattr(owner, attr)
        if asyncio.iscoroutinefunction(fn):

            async def wrapper(*a: Any, **k: Any) -> Any:
                start = now()
                try:
                    return await fn(*a, **k)
                finally:
                    spans.setdefault(name, []).append(now() - start)
        else:

            def wrapper(*a: Any, **k: Any) -> Any:
                start = now()
                try:
                    return fn(*a, **k)
                finally:
                    spans.setdefault(name, []).append(now() - start)

        setattr(owner, attr, wrapper)
        spans[name] = []

    timed(gw, "sample", "  Gateway.sample: pin + route + forward")
    timed(gw, "pin", "    pin (store reads: model.json, HEAD)")
    timed(gw.router, "candidates", "    route (replica listing, cached 0.25 s)")
    names = list(spans)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    stub = sampling_pb2_grpc.SamplingServiceStub(channel)
    request = sample_request()
    ways = {"direct": direct, "gateway": lambda: stub.Sample(request, timeout=60)}
    rows: list[list[object]] = []
    refresher = None
    try:
        for label in ("as is", "what-if: listing refreshed in the background"):
            if refresher is None and label != "as is":
                refresher = asyncio.run_coroutine_threadsafe(background_listing(gw.router), loop)
            sequential(ways, 5, 5)  # warm up
            spans.update({name: [] for name in names})
            lat = sequential(ways, calls, block)
            d, g = statistics.median(lat["direct"]), statistics.median(lat["gateway"])
            rows.append([f"in-process gateway, {label}", *_stats(lat["gateway"]), g / d - 1])
            rows.append(["  direct, same blocks", *_stats(lat["direct"]), ""])
            rows += [[name, *_stats(v), ""] for name, v in spans.items()]
        scans = []
        for _ in range(20):
            start = now()
            run(list_replicas(gw.redis, prefix))
            scans.append(now() - start)
        keys = run(gw.redis.dbsize())
        rows.append([f"list_replicas alone (SCAN of {keys} Redis keys)", *_stats(scans), ""])
    finally:
        if refresher is not None:
            refresher.cancel()
        channel.close()
        run(process.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
    return rows


def _stats(values: list[float]) -> list[object]:
    ms = [v * 1e3 for v in values]
    return [len(ms), statistics.median(ms), pct(ms, 0.9), max(ms)]


# ---------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200, help="sequential calls each way")
    parser.add_argument("--block", type=int, default=20, help="calls per block, alternating")
    parser.add_argument("--per-client", type=int, default=2, help="calls per client thread")
    parser.add_argument("--rounds", type=int, default=2, help="concurrent rounds each way")
    parser.add_argument("--profile", action="store_true", help="time the gateway's steps")
    args = parser.parse_args()
    started = now()

    path = build_bench_model()
    add_tokenizer(path)
    store = Path(tempfile.mkdtemp(prefix="headway-bench-store-"))
    logs = Path(tempfile.mkdtemp(prefix="headway-bench-logs-"))
    prefix = redis_prefix("bench")
    common = ["--store", str(store)]
    services: list[ServiceProcess] = []

    def start(name: str, module: str, args: list[str]) -> ServiceProcess:
        service = ServiceProcess(name, module, [*args, "--log-level", "WARNING"],
                                 logs / f"{name}.log", prefix, threads=THREADS)  # fmt: skip
        services.append(service)
        return service

    try:
        trainer = start("trainer", "trainer_svc", common)
        replica = start("sampler", "sampler_svc", [*common, "--max-seq-len", "512"])
        gateway = start("gateway", "gateway", [*common, "--trainer", trainer.address, "--http", ""])
        deadline = time.monotonic() + READY_TIMEOUT
        for service in services:
            service.wait_ready(deadline)
        model_pb2_grpc.ModelServiceStub(gateway.channel).AddBase(
            model_pb2.AddBaseRequest(path=str(path), name=BASE)
        )

        request = sample_request()
        direct_stub = sampling_pb2_grpc.SamplingServiceStub(replica.channel)
        gateway_stub = sampling_pb2_grpc.SamplingServiceStub(gateway.channel)
        ways = {
            "direct": lambda: direct_stub.Sample(request, timeout=60),
            "gateway": lambda: gateway_stub.Sample(request, timeout=60),
        }
        # Warm up both paths (weights loaded, channels up, registry cached); same tokens.
        tokens = {key: check(fn()) for key, fn in ways.items()}
        assert tokens["direct"] == tokens["gateway"], "the gateway's reply differs from direct"
        sequential(ways, 20, 10)

        meter = CpuMeter({"sampler": replica.proc.pid, "gateway": gateway.proc.pid})
        lat = sequential(ways, args.calls, args.block, meter)
        for key, fn in ways.items():
            assert check(fn()) == tokens[key]
        tput: dict[str, list[float]] = {k: [] for k in ways}
        concurrent(ways["direct"], CLIENTS, 2)  # warm up the concurrent path
        for _ in range(args.rounds):
            for key, fn in ways.items():
                tput[key].append(concurrent(fn, CLIENTS, args.per_client))
        profile = []
        if args.profile:
            profile = profile_gateway(
                store, trainer.address, prefix, ways["direct"], args.calls // 4, args.block
            )
    except BaseException:
        for service in services:
            print(f"--- {service.name} log:\n{service.tail()}", file=sys.stderr)
        raise
    finally:
        for service in services:
            service.stop()  # SIGTERM: a graceful stop, as a deployment's
        clean_redis(prefix)
        for directory in (store, logs, path):
            shutil.rmtree(directory, ignore_errors=True)

    ms = {k: [v * 1e3 for v in t] for k, t in lat.items()}
    p50 = {k: statistics.median(v) for k, v in ms.items()}
    p90 = {k: pct(v, 0.9) for k, v in ms.items()}
    mean = {k: statistics.fmean(v) for k, v in ms.items()}
    calls_s = {k: statistics.median(v) for k, v in tput.items()}
    overhead = p50["gateway"] / p50["direct"] - 1
    tput_ratio = calls_s["gateway"] / calls_s["direct"]
    n = min(len(v) for v in ms.values())
    cpu = {key: used * 1e3 / len(ms[key[0]]) for key, used in meter.used.items()}
    rows = [
        [f"p50 latency ms ({n} sequential calls)", p50["direct"], p50["gateway"],
         p50["gateway"] / p50["direct"]],
        ["p90 latency ms", p90["direct"], p90["gateway"], p90["gateway"] / p90["direct"]],
        ["mean latency ms", mean["direct"], mean["gateway"], mean["gateway"] / mean["direct"]],
        [f"throughput calls/s ({CLIENTS} clients × {args.per_client}, median of "
         f"{args.rounds})", calls_s["direct"], calls_s["gateway"], tput_ratio],
        ["  gateway − direct p50 ms", p50["gateway"] - p50["direct"], "", ""],
        ["sampler process CPU ms per call", cpu["direct", "sampler"], cpu["gateway", "sampler"],
         cpu["gateway", "sampler"] / cpu["direct", "sampler"]],
        ["gateway process CPU ms per call", cpu["direct", "gateway"], cpu["gateway", "gateway"],
         ""],
    ]  # fmt: skip
    print(
        f"\nmodel: qwen3-40m (fp32), Sample: prompt {PROMPT}, {NEW} new tokens, greedy, n=1; "
        f"{os.cpu_count()} CPUs shared by client, trainer, sampler and gateway processes"
    )
    print_table(
        "gateway overhead (same run, same replica; ratio = gateway / direct)",
        ["metric", "direct", "gateway", "ratio"],
        rows,
    )
    if profile:
        print_table(
            "gateway steps per call (in-process gateway, --profile)",
            ["step", "calls", "p50 ms", "p90 ms", "max ms", "overhead p50"],
            profile,
        )
    print(
        f"goal: gateway_overhead <= 0.10; throughput ratio {tput_ratio:.3f} "
        f"(gateway / direct); bench took {now() - started:.0f} s"
    )
    print(f"gateway_overhead={overhead:.3f}")


if __name__ == "__main__":
    main()
