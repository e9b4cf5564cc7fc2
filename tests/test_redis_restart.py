"""Redis restarted in the middle of training and sampling: nothing is lost, everything resumes.

A trainer, a sampler replica and a gateway (in-process servers, real gRPC and HTTP) share a
store and a redis-server this test owns (its own port, RDB persistence in tmp_path). The
loop trains a LoRA fork on traces recorded through the OpenAI-compatible HTTP API; then
Redis shuts down (saving its data) while training and sampling go on, and starts again on
the same port from its RDB file.

Redis only makes changes travel fast; the store is the truth. So while Redis is down an
OptimStep still moves the head (its publish fails and is logged), samples are pinned to
the store's head and routed by the gateway's last registry listing; only what lives in
Redis (recording a trace) is refused, with a retryable status. When Redis is back, each
service must find its way without help: the sampler reconciles the heads on reconnect,
from the store, even for a head whose event was never published; the replica announces
itself again and the gateway routes; traces recorded before the restart are still there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
import redis

from headway import SamplingClient, TraceClient, TrainingClient
from headway.server.heads import mirror_key
from headway.server.replicas import ReplicaInfo, replica_key
from headway.v1 import common_pb2, model_pb2
from tests.helpers_training import scored_group
from tests.stack import (
    GatewayNode,
    PrivateRedis,
    SamplerReplica,
    TrainerStack,
    free_port,
    make_tiny_base,
    redis_prefix,
    wait_until,
)

pytestmark = pytest.mark.slow

MODEL = "redis-restart"
GROUP = 4
PROMPT = "what is 2 plus 3?"
RETRY = dict(retry_timeout=120.0, retry_backoff=0.05)  # the SDK outlasts the trainer's restart


def mirrored_head(r: redis.Redis, prefix: str) -> str:
    """The checkpoint the head mirror key names ("" if there is none)."""
    raw = r.get(mirror_key(MODEL, prefix))
    return json.loads(raw)["checkpoint"] if raw else ""


def record_turn(http: openai.OpenAI) -> str:
    """Sample a completion through the HTTP API, recording it in a trace; the trace id."""
    reply = http.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"return_token_ids": True}
    )
    return reply.model_extra["trace_id"]  # type: ignore[index]


def test_redis_restart_loses_nothing_and_samplers_reconcile_the_head_on_reconnect(
    tmp_path: Path,
) -> None:
    """Invariant: Redis restarting (SHUTDOWN SAVE, then the same port from its RDB file)
    loses no step and no trace, and needs no publish to bring a sampler up to date: the
    head that moved while Redis was down is loaded by the sampler's own reconciliation
    on reconnect, from the store, even with the trainer down (nothing could publish it).
    The gateway samples and trains throughout, except what needs Redis (recording a
    trace: 503, retryable), and routes through the re-announced replica afterwards."""
    base = make_tiny_base(tmp_path / "tiny-base")
    store, prefix, redis_dir = tmp_path / "store", redis_prefix(), tmp_path / "redis"
    server = PrivateRedis(free_port(), redis_dir)
    url = server.url
    trainer: TrainerStack | None = TrainerStack(store, prefix=prefix, redis_url=url)
    trainer_address = trainer.server.address
    sampler = SamplerReplica(store, prefix, redis_url=url)
    gateway = GatewayNode(store, prefix, trainer_address, redis_url=url)
    http = openai.OpenAI(base_url=gateway.http_url, api_key="local", max_retries=0)
    address = gateway.server.address
    training = TrainingClient(MODEL, url=address, **RETRY).sync()
    sampling = SamplingClient(MODEL, url=address, **RETRY).sync()
    traces = TraceClient(url=address, **RETRY).sync()
    watcher = sampler.replica.watcher
    try:
        trainer.add_base(base, "tiny")
        trainer.models.ForkModel(
            model_pb2.ForkModelRequest(
                source="tiny", name=MODEL, lora=common_pb2.LoraConfig(rank=4, alpha=8)
            )
        )
        heads = [training.head().id]

        # Two steps on traces recorded through the HTTP API, rewarded through TraceService.
        recorded: dict[str, float] = {}
        for step in range(2):
            ids = []
            for i in range(GROUP):
                ids.append(record_turn(http))
                traces.set_reward(ids[-1], float((i + step) % 2))
                recorded[ids[-1]] = float((i + step) % 2)
            heads.append(training.step(ids, learning_rate=1e-3, group_size=GROUP).checkpoint)
        published = heads[-1]
        wait_until(lambda: mirrored_head(server.client, prefix) == published, "mirror")

        # ---------------------------------------------------------- Redis goes down
        server.stop(save=True)
        # The store is the truth: a step moves the head (its publish fails), and a sample
        # is pinned to it and routed by the registry the gateway last listed.
        sample = sampling.sample(PROMPT, n=GROUP, max_tokens=6)
        assert sample.checkpoint == heads[-1]
        heads.append(training.step(scored_group(sample, 2), 1e-3, group_size=GROUP).checkpoint)
        sample = sampling.sample(PROMPT, n=GROUP, max_tokens=6)
        assert sample.checkpoint == heads[-1], "a sample after a step is served by its head"
        # What lives in Redis is refused, retryably: recording a trace is a 503.
        with pytest.raises(openai.APIStatusError, match="Redis") as refused:
            record_turn(http)
        assert refused.value.status_code == 503
        # One more step, never sampled: no event, no sample will bring it to the sampler.
        heads.append(training.step(scored_group(sample, 3), 1e-3, group_size=GROUP).checkpoint)
        assert f"{MODEL}/{heads[-1]}" not in sampler.sampler.loaded_checkpoints()
        # (Meanwhile the gateway's health follows Redis: reported, not asserted.)
        health = gateway.process.health
        assert health is not None
        outage_health = dict(health.statuses)
        # The trainer goes down too: nothing can publish that head when Redis is back.
        stopping, trainer = trainer, None
        stopping.channel.close()
        stopping.server.run(stopping.trainer.close())
        stopping.server.stop()

        # ------------------------------------------------- Redis back, same port and data
        reconciled = watcher.reconciles
        server = PrivateRedis(server.port, redis_dir)
        back, back_wall = time.monotonic(), time.time()
        assert mirrored_head(server.client, prefix) == published, "the RDB file kept the mirror"
        wait_until(
            lambda: watcher.reconciles > reconciled, "the sampler reconnects", interval=0.002
        )
        reconnected = time.monotonic() - back
        sampler.sampler.call(lambda: None)  # the preloads its reconciliation queued have run
        loaded = time.monotonic() - back
        assert f"{MODEL}/{heads[-1]}" in sampler.sampler.loaded_checkpoints(), (
            "the sampler reconnected to Redis but did not reconcile the head that moved "
            f"while Redis was down ({heads[-1]}); the mirror still names {published}"
        )
        # It came from the store: nothing has published it (the mirror is still stale).
        assert mirrored_head(server.client, prefix) == published

        # The replica announces itself again, the gateway reports sampling SERVING and
        # routes a sample to it.
        key = replica_key(watcher.info.id, prefix)
        wait_until(
            lambda: (
                (raw := server.client.get(key)) is not None
                and ReplicaInfo.from_json(raw).updated >= back_wall
            ),
            "the replica announces itself to the restarted Redis",
        )
        wait_until(
            lambda: health.statuses.get("headway.v1.SamplingService") is True,
            "the gateway reports sampling SERVING again",
        )
        assert sampling.sample(PROMPT, n=1, max_tokens=4).checkpoint == heads[-1]

        # The trainer back on its address: it mirrors the head, and training goes on with
        # events flowing again.
        trainer = TrainerStack(store, address=trainer_address, prefix=prefix, redis_url=url)
        wait_until(lambda: mirrored_head(server.client, prefix) == heads[-1], "re-mirrored")
        sample = sampling.sample(PROMPT, n=GROUP, max_tokens=6)
        heads.append(training.step(scored_group(sample, 4), 1e-3, group_size=GROUP).checkpoint)
        wait_until(
            lambda: f"{MODEL}/{heads[-1]}" in sampler.sampler.loaded_checkpoints(),
            "the sampler loads the next head from its event",
        )

        # Nothing lost: the traces recorded before the restart, one chain of every step.
        for trace_id, reward in recorded.items():
            run = traces.get_trace(trace_id)
            assert run.reward == reward and run.turns, trace_id
        tree = training.checkpoints()
        assert [c.id for c in tree] == heads and [c.step for c in tree] == list(range(6))
        assert tree[-1].is_head
        print(
            f"\nRedis restarted: the sampler reconnected {1000 * reconnected:.0f} ms after "
            f"Redis answered again and had the new head loaded {1000 * loaded:.0f} ms after; "
            f"the gateway's health during the outage (samples and steps served): {outage_health}"
        )
    finally:
        for client in (training, sampling, traces):
            client.close()
        http.close()
        gateway.stop()
        sampler.stop()
        if trainer is not None:
            trainer.stop()
        server.stop()
