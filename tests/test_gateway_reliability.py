"""Gateway failover end to end: two gateways, two samplers, one sampler SIGKILLed under load.

Every service is a real process (`python -m trainer_svc`, `python -m sampler_svc`,
`python -m gateway`) on loopback ports, sharing a store in tmp_path and a Redis prefix of
the test's own. 32 clients (16 through each gateway) send Sample requests (n=16 × 200
tokens each) back to back, so the replicas hold work for as long as the load runs, however
fast the machine; replica s1 is SIGKILLed right after a heartbeat of s1 that shows the
requests it holds, and the clients stop sending then. 8 more requests are sent right after
the kill, and 8 more once the gateways stop passing over s1 (it is still registered then,
so those may try it first and must be retried on s2).

The client cannot see which replica served a request, so the test checks what it can
observe: a request may fail only because it was in flight at the kill (so only with
UNAVAILABLE), every request sent after the kill succeeds, every reply is complete, and the
registry drops s1 within its TTL.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import redis.asyncio as aioredis

from gateway.routing import SUSPECT_SECONDS
from headway.server.replicas import ReplicaInfo, list_replicas, replica_key
from headway.tensors import to_tensor
from headway.v1 import common_pb2, model_pb2, model_pb2_grpc, sampling_pb2, sampling_pb2_grpc
from tests.stack import (
    HANG_SECONDS,
    REDIS_URL,
    ServiceProcess,
    make_tiny_base,
    redis_prefix,
    wait_until,
)

pytestmark = pytest.mark.slow  # five service processes, then a load, ~40 s

READY_TIMEOUT = HANG_SECONDS  # processes importing torch on a busy 2-core machine
CALL_TIMEOUT = HANG_SECONDS  # catches a hang: a Sample may wait behind the whole load
TTL = 5.0  # SamplerConfig.heartbeat_ttl: a replica missing this long drops out
PROMPT = [5, 17, 33, 8, 41, 12]
CLIENTS = 32  # clients sending back to back until s1 dies, half through each gateway
AFTER_KILL = 8  # Samples sent right after the kill, half through each gateway
N, MAX_TOKENS = 16, 200  # per request: 2 decode together per replica


@dataclass
class Outcome:
    """One Sample request as the client saw it."""

    gateway: str
    started: float  # monotonic
    ended: float = 0.0
    reply: sampling_pb2.SampleResponse | None = None
    code: grpc.StatusCode | None = None
    details: str = ""


def sample_request(
    seed: int, max_tokens: int = MAX_TOKENS, n: int = N
) -> sampling_pb2.SampleRequest:
    params = common_pb2.SamplingParams(
        max_tokens=max_tokens, n=n, temperature=1.0, seed=seed, ignore_eos=True
    )
    return sampling_pb2.SampleRequest(
        model="tiny", prompt_tokens=to_tensor(PROMPT, common_pb2.DTYPE_INT32), params=params
    )


def run_sample(stub: sampling_pb2_grpc.SamplingServiceStub, seed: int, out: Outcome) -> None:
    try:
        out.reply = stub.Sample(sample_request(seed), timeout=CALL_TIMEOUT)
    except grpc.RpcError as e:
        out.code, out.details = e.code(), e.details()
    finally:
        out.ended = time.monotonic()


def registry_entry(client: redis.Redis, replica_id: str, prefix: str) -> ReplicaInfo | None:
    raw = client.get(replica_key(replica_id, prefix))
    return ReplicaInfo.from_json(raw) if raw is not None else None


def registered_ids(prefix: str) -> set[str]:
    async def ids() -> set[str]:
        client = aioredis.from_url(REDIS_URL)
        try:
            return {r.id for r in await list_replicas(client, prefix)}
        finally:
            await client.aclose()

    return asyncio.run(ids())


def test_sigkilled_sampler_fails_only_its_in_flight_requests(tmp_path: Path) -> None:
    """Invariant: with 2 gateways and 2 samplers, SIGKILL of one sampler under the load of
    32 clients fails no request that was not in flight at the kill (only UNAVAILABLE), the
    rest and every later request complete on the other replica, and the registry drops the
    dead replica within its TTL."""
    base = make_tiny_base(tmp_path / "base")
    store, prefix = tmp_path / "store", redis_prefix()
    common = ["--store", str(store), "--log-level", "INFO"]
    services: list[ServiceProcess] = []
    client_redis = redis.Redis.from_url(REDIS_URL)
    started = time.monotonic()

    def start(name: str, module: str, args: list[str]) -> ServiceProcess:
        log = tmp_path / f"{name}.log"
        services.append(ServiceProcess(name, module, args, log, prefix))  # closed in `finally`
        return services[-1]

    try:
        trainer = start("trainer", "trainer_svc", common)
        sampler_args = [*common, "--max-seq-len", "256", "--replica-id"]
        s1, s2 = (start(rid, "sampler_svc", [*sampler_args, rid]) for rid in ("s1", "s2"))
        gateway_args = [*common, "--trainer", trainer.address, "--http", ""]
        gateways = [start(name, "gateway", gateway_args) for name in ("g1", "g2")]
        deadline = time.monotonic() + READY_TIMEOUT
        for service in services:
            service.wait_ready(deadline)

        model_pb2_grpc.ModelServiceStub(gateways[0].channel).AddBase(
            model_pb2.AddBaseRequest(path=str(base), name="tiny"), timeout=CALL_TIMEOUT
        )
        wait_until(
            lambda: registered_ids(prefix) == {"s1", "s2"},
            what="both replicas registered",
            interval=0.05,
        )
        # Warm both replicas directly: each has the base loaded before the load arrives.
        for replica in (s1, s2):
            warm = sampling_pb2_grpc.SamplingServiceStub(replica.channel).Sample(
                sample_request(0, max_tokens=4), timeout=CALL_TIMEOUT
            )
            assert warm.checkpoint == "base", replica.tail()

        def both_loaded() -> bool:
            entries = [registry_entry(client_redis, rid, prefix) for rid in ("s1", "s2")]
            return all(e is not None and "tiny/base" in e.loaded for e in entries)

        # The gateways route by what the registry says is loaded: wait until it says so.
        wait_until(both_loaded, what="both replicas reporting tiny/base loaded", interval=0.05)
        ready = time.monotonic() - started

        stubs = {g.name: sampling_pb2_grpc.SamplingServiceStub(g.channel) for g in gateways}
        names = [g.name for g in gateways]

        def launch(count: int, seed0: int) -> tuple[list[Outcome], list[threading.Thread]]:
            outcomes, threads = [], []
            for i in range(count):
                name = names[i % 2]
                out = Outcome(name, time.monotonic())
                t = threading.Thread(
                    target=run_sample, args=(stubs[name], seed0 + i, out), daemon=True
                )
                t.start()
                outcomes.append(out)
                threads.append(t)
            return outcomes, threads

        # The load: clients send back to back until s1 is killed, so both replicas hold
        # requests whenever s1 dies, however fast they decode.
        before: list[Outcome] = []
        killing = threading.Event()

        def client(i: int) -> None:
            name, seed = names[i % 2], 1 + i * 10_000
            while not killing.is_set():
                out = Outcome(name, time.monotonic())
                before.append(out)
                run_sample(stubs[name], seed, out)
                seed += 1

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        launched_at, launched = time.time(), time.monotonic()
        for t in threads:
            t.start()

        # Kill s1 right after its first heartbeat that shows the requests it holds
        # (heartbeats are 1 s apart): that entry is what s1 held shortly before it died.
        def s1_busy() -> ReplicaInfo | None:
            entry = registry_entry(client_redis, "s1", prefix)
            if entry is None or entry.updated < launched_at or not entry.load:
                return None
            return entry

        s1_entry = wait_until(s1_busy, what="a heartbeat of s1 showing requests", interval=0.02)
        killing.set()
        s1.kill()
        killed = time.monotonic()
        s1_rows = s1_entry.live_rows + s1_entry.queue_depth
        after, more = launch(AFTER_KILL, 1000)
        threads += more

        # The registry drops s1 within its TTL (its last heartbeat is at most the kill).
        # Meanwhile, once the gateways stop passing over s1 (SUSPECT_SECONDS after they saw
        # it fail) but still find it registered, send more: these try the dead s1 first when
        # it ranks first, and must be retried on s2.
        # (Redis expires the entry by its TTL, so the bound holds on any machine.)
        late: list[Outcome] = []

        def s1_dropped() -> bool:
            listed = registered_ids(prefix)
            since = time.monotonic() - killed
            if listed == {"s2"}:
                return True
            assert since <= TTL + 1, f"registry still lists {listed} {since:.1f} s after the kill"
            if not late and since >= SUSPECT_SECONDS + 0.3:
                wave, more = launch(AFTER_KILL, 2000)
                late.extend(wave)
                threads.extend(more)
            return False

        wait_until(s1_dropped, what="the registry to drop s1", interval=0.05)
        dropped = time.monotonic() - killed
        after += late

        for t in threads:
            t.join(timeout=CALL_TIMEOUT + 10)
        assert not any(t.is_alive() for t in threads), "a Sample never returned"

        logs = "\n".join(f"--- {s.name}\n{s.tail()}" for s in services)
        in_flight = [o for o in before if o.ended > killed]
        failed = [o for o in before if o.reply is None]
        failovers = sum(
            g.log.read_text(errors="replace").count(f"sampler {s1.address} unavailable")
            for g in gateways
        )
        summary = (
            f"s1 held {s1_rows} rows ({s1_entry.live_rows} live, {s1_entry.queue_depth} "
            f"queued) at its last heartbeat, killed {killed - launched:.2f} s after the load "
            f"started; {len(before)} requests sent before the kill, {len(in_flight)} "
            f"unfinished then; {len(failed)} failed; {failovers} attempts on s1 failed over "
            f"to s2 in the gateways; {len(after)} sent after the kill; registry dropped s1 "
            f"{dropped:.2f} s after the kill; last reply "
            f"{max(o.ended for o in before + after) - launched:.2f} s after the launch; "
            f"setup {ready:.1f} s"
        )
        print(summary)

        # The kill hit work in flight on s1 (else the test proves nothing).
        assert s1_rows > 0, f"s1 held nothing at the kill: {summary}"
        assert in_flight, f"every request had finished before the kill: {summary}"
        assert failed or failovers, f"nothing was in flight on s1: {summary}\n{logs}"
        # Only requests in flight at the kill may fail, and only with UNAVAILABLE.
        codes = {(o.code, o.details) for o in failed}
        assert all(o.code == grpc.StatusCode.UNAVAILABLE for o in failed), (
            f"requests failed with other codes than UNAVAILABLE: {codes}\n{logs}"
        )
        assert all(o.ended > killed for o in failed), f"a request failed before the kill: {codes}"
        # Every request sent after the kill succeeds (on s2): the waves, and any request a
        # client sent as the kill happened.
        sent_after = after + [o for o in before if o.started > killed]
        late = [(o.gateway, o.code, o.details) for o in sent_after if o.reply is None]
        assert not late, f"requests sent after the kill failed: {late}\n{logs}"
        # Every reply is complete: n sequences of max_tokens tokens and logprobs each.
        for o in before + after:
            if o.reply is None:
                continue
            assert o.reply.checkpoint == "base" and len(o.reply.sequences) == N
            for seq in o.reply.sequences:
                assert seq.tokens.shape == [MAX_TOKENS] and seq.logprobs.shape == [MAX_TOKENS]
                assert len(seq.tokens.data) == 4 * MAX_TOKENS  # INT32
                assert seq.stop_reason == sampling_pb2.STOP_REASON_LENGTH
        assert s2.proc.poll() is None and all(g.proc.poll() is None for g in gateways), logs
    finally:
        for service in services:
            service.close()
        keys = list(client_redis.scan_iter(match=f"{prefix}*"))
        if keys:
            client_redis.delete(*keys)
        client_redis.close()
