"""Prometheus metrics: each service's `/metrics`, scraped over HTTP as Prometheus does,
counts what the test did to it (calls by method and status, tokens, loads, steps,
routing) and no more."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from headway.server.metrics import ServiceMetrics
from headway.tensors import from_tensor, to_tensor
from headway.v1 import common_pb2, model_pb2, sampling_pb2, training_pb2
from tests.helpers_metrics import scrape, value
from tests.stack import (
    HANG_SECONDS,
    GatewayNode,
    PrivateRedis,
    SamplerReplica,
    TrainerStack,
    free_port,
    wait_until,
)

ANY_PORT = "127.0.0.1:0"
SAMPLE = "/headway.v1.SamplingService/Sample"
OPTIM = "/headway.v1.TrainingService/OptimStep"


def sample_request(model: str, n: int, max_tokens: int, **params) -> sampling_pb2.SampleRequest:
    return sampling_pb2.SampleRequest(
        model=model,
        prompt_tokens=to_tensor([5, 17, 33, 8], common_pb2.DTYPE_INT32),
        params=common_pb2.SamplingParams(n=n, max_tokens=max_tokens, **params),
    )


@pytest.fixture
def metered(tmp_path: Path, tiny_base: Path):
    """Trainer, one sampler and a gateway, each serving /metrics on a port of its own."""
    trainer = TrainerStack(tmp_path / "store", metrics=ANY_PORT)
    replica = gateway = None
    try:
        trainer.add_base(tiny_base, "tiny")
        replica = SamplerReplica(trainer.config.store, trainer.prefix, max_seq_len=128,
                                 metrics=ANY_PORT)  # fmt: skip
        gateway = GatewayNode(trainer.config.store, trainer.prefix, trainer.server.address,
                              http=False, metrics=ANY_PORT)  # fmt: skip
        # The replica preloads the base's head (the registry's heads, at start): settled
        # before the test counts anything.
        head = f"tiny/{trainer.trainer.store.head('tiny')}"
        wait_until(lambda: head in replica.sampler.loaded_checkpoints(),
                   what="the replica to preload the base")  # fmt: skip
        yield trainer, replica, gateway
    finally:
        for part in (gateway, replica):
            if part is not None:
                part.stop()
        trainer.stop()  # its metrics server too


def test_each_service_counts_what_it_served(metered):
    trainer, replica, gateway = metered
    ports = {
        "trainer": trainer.trainer.metrics_port,
        "sampler": replica.replica.metrics_port,
        "gateway": gateway.process.metrics_port,
    }
    assert all(ports.values()) and len(set(ports.values())) == 3
    before = {name: scrape(port) for name, port in ports.items()}
    lora = common_pb2.LoraConfig(rank=4, alpha=8)
    gateway.models.ForkModel(model_pb2.ForkModelRequest(source="tiny", name="m", lora=lora))

    # Two good Samples (3 + 2 rows) and one refused for its input, through the gateway.
    replies = [
        gateway.sampling.Sample(sample_request("m", 3, 4, temperature=1.0, seed=1)),
        gateway.sampling.Sample(sample_request("m", 2, 5, temperature=1.0, seed=2)),
    ]
    tokens = sum(len(from_tensor(s.tokens, "tokens")) for r in replies for s in r.sequences)
    with pytest.raises(grpc.RpcError) as bad:
        gateway.sampling.Sample(sample_request("m", 1, 4, temperature=-1.0))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # One training step through the gateway: its parts are timed by the trainer.
    ids = np.arange(3, 12)
    datum = common_pb2.Datum(
        input_tokens=to_tensor(ids[:-1]),
        target_tokens=to_tensor(ids[1:]),
        weights=to_tensor(np.ones(8, np.float32)),
    )
    item = common_pb2.TrainingItem(datum=datum)
    gateway.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(model="m", data=[item], loss_fn="cross_entropy")
    )
    step = gateway.train.OptimStep(
        training_pb2.OptimStepRequest(model="m", adam=common_pb2.AdamParams(learning_rate=1e-3))
    )
    # The new head reaches the sampler as an event; wait until it has loaded it.
    deadline = time.monotonic() + HANG_SECONDS
    while f"m/{step.checkpoint}" not in replica.sampler.loaded_checkpoints():
        assert time.monotonic() < deadline, "the sampler never loaded the new head"
        time.sleep(0.01)
    after = {name: scrape(port) for name, port in ports.items()}

    def grew(where: str, name: str, **labels: str) -> float:
        return value(after[where], name, **labels) - value(before[where], name, **labels)

    calls = "headway_grpc_requests_total"
    # The gateway answered 2 Samples OK and 1 INVALID_ARGUMENT, and timed each.
    assert grew("gateway", calls, service="gateway", method=SAMPLE, code="OK") == 2
    assert grew("gateway", calls, service="gateway", method=SAMPLE, code="INVALID_ARGUMENT") == 1
    latency = "headway_grpc_request_duration_seconds_count"
    assert grew("gateway", latency, service="gateway", method=SAMPLE) == 3
    assert grew("gateway", calls, service="gateway", method=OPTIM, code="OK") == 1
    routed = sum(grew("gateway", "headway_gateway_routed_total", replica=k)
                 for k in ("loaded", "cold"))  # fmt: skip
    assert routed == 3  # the bad one too: the sampler checks sampling params
    assert value(after["gateway"], "headway_gateway_known_replicas") == 1
    assert grew("gateway", "headway_gateway_failovers_total", reason="unavailable") == 0

    # The sampler decoded exactly the tokens returned; it loaded the fork's first adapter
    # and the new head's (the OptimStep's head event), on the one engine of the base.
    assert grew("sampler", calls, service="sampler", method=SAMPLE, code="OK") == 2
    assert grew("sampler", calls, service="sampler", method=SAMPLE, code="INVALID_ARGUMENT") == 1
    assert grew("sampler", "headway_sampler_tokens_total") == tokens > 0
    assert grew("sampler", "headway_sampler_steps_total") >= 4
    assert value(after["sampler"], "headway_sampler_live_rows") == 0
    assert value(after["sampler"], "headway_sampler_queue_depth") == 0
    loads = "headway_sampler_load_duration_seconds_count"
    assert value(after["sampler"], loads, kind="engine") == 1
    assert grew("sampler", loads, kind="lora") == 2

    # The trainer wrote one checkpoint, each phase timed once.
    assert grew("trainer", calls, service="trainer", method=OPTIM, code="OK") == 1
    assert grew("trainer", "headway_trainer_optim_steps_total") == 1
    for phase in ("state_wait", "adamw", "checkpoint_write", "head"):
        count = "headway_trainer_optim_phase_duration_seconds_count"
        assert grew("trainer", count, phase=phase) == 1
    assert value(after["trainer"], "headway_trainer_models_loaded") == 1
    for service in ports:
        assert value(after[service], "process_resident_memory_bytes") > 0


def test_a_bad_metrics_address_names_the_form(tmp_path: Path):
    metrics = ServiceMetrics("sampler")
    for bad in ("9400", "localhost", "127.0.0.1:port"):
        with pytest.raises(ValueError, match="give host:port"):
            metrics.start(bad)


def test_calls_refused_by_the_token_check_count_too(tmp_path: Path):
    """A backend's metrics interceptor runs before its internal-token check: a call without
    the token is counted as UNAUTHENTICATED, then one with it as OK."""
    token = "t" * 43
    trainer = TrainerStack(tmp_path / "store", internal_token=token, metrics=ANY_PORT)
    try:
        method = "/headway.v1.ModelService/ListModels"
        with pytest.raises(grpc.RpcError) as refused:
            trainer.models.ListModels(model_pb2.ListModelsRequest())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        trainer.models.ListModels(
            model_pb2.ListModelsRequest(), metadata=[("x-headway-internal-token", token)]
        )
        samples = scrape(trainer.trainer.metrics_port)
        calls = "headway_grpc_requests_total"
        for code in ("UNAUTHENTICATED", "OK"):
            assert value(samples, calls, service="trainer", method=method, code=code) == 1
    finally:
        trainer.stop()


def test_the_trainer_counts_the_head_publishes_redis_missed(tmp_path: Path, tiny_base: Path):
    """With its Redis down, a fork's head publish fails: counted, and published once Redis
    is back (the mirror key then names the head)."""
    port = free_port()
    redis = PrivateRedis(port, tmp_path / "redis")
    trainer = TrainerStack(tmp_path / "store", redis_url=redis.url)
    try:
        trainer.add_base(tiny_base, "tiny")
        registry = trainer.trainer.metrics.registry
        assert registry.get_sample_value("headway_trainer_redis_errors_total") == 0
        redis.stop()
        head = trainer.fork("m").head_checkpoint
        assert registry.get_sample_value("headway_trainer_redis_errors_total") >= 1
        redis = PrivateRedis(port, tmp_path / "redis")
        wait_until(
            lambda: (
                (raw := redis.client.get(f"{trainer.prefix}head:m")) is not None
                and json.loads(raw)["checkpoint"] == head
            ),
            what="the missed head to be published once Redis is back",
        )
    finally:
        trainer.stop()
        redis.stop()
