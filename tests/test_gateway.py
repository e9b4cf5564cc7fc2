"""The gateway over real gRPC, with a real trainer, samplers and Redis: read-your-writes,
health and reflection, pinned checkpoints, training on trace ids, keys and teams, deadlines.

Routing and failover are in test_gateway_routing.py, the OpenAI-compatible HTTP API in
test_gateway_openai.py.
"""

from __future__ import annotations

import threading

import numpy as np
import openai
import pytest

from headway.server.keys import create_key
from headway.tensors import to_tensor
from headway.v1 import common_pb2, model_pb2, trace_pb2, training_pb2
from tests.helpers_gateway import I32, code_of, sample_req
from tests.helpers_training import adam, batch
from tests.stack import (
    EngineGate,
    GatewayNode,
    SamplerReplica,
    TrainerStack,
    redis_prefix,
    wait_until,
)


@pytest.mark.slow
def test_read_your_writes_without_head_events(tmp_path, tiny_base):
    # The trainer publishes under another prefix: no head event ever reaches the replica.
    trainer = TrainerStack(tmp_path / "store")
    prefix = redis_prefix()
    replica = SamplerReplica(tmp_path / "store", prefix, max_seq_len=256)
    gateway = GatewayNode(tmp_path / "store", prefix, trainer.server.address, http=False)
    try:
        trainer.add_base(tiny_base, "tiny")
        gateway.models.ForkModel(model_pb2.ForkModelRequest(source="tiny", name="m"))
        for round_ in range(50):
            step = gateway.train.Step(training_pb2.StepRequest(
                model="m", data=batch(seed=round_), loss_fn="importance_sampling",
                adam=adam(1e-3))).optim_step  # fmt: skip
            reply = gateway.sampling.Sample(sample_req("m", max_tokens=2))
            assert reply.checkpoint == step.checkpoint, f"round {round_} served a stale head"
        assert replica.replica.watcher.reconciles == 1  # connected, yet never told
    finally:
        gateway.stop()
        replica.stop()
        trainer.stop()


def test_every_service_health_and_reflection_on_one_port(gateway_stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = gateway_stack.gateway.channel
    health = health_pb2_grpc.HealthStub(channel)
    for service in (
        "",
        "headway.v1.ModelService",
        "headway.v1.SamplingService",
        "headway.v1.TrainingService",
        "headway.v1.TraceService",
    ):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in reply.list_services_response.service}
    assert {
        "headway.v1.ModelService",
        "headway.v1.SamplingService",
        "headway.v1.TrainingService",
        "headway.v1.TraceService",
        "grpc.health.v1.Health",
    } <= names


def test_pinned_checkpoint_through_the_gateway(gateway_stack):
    g = gateway_stack.gateway
    g.models.ForkModel(model_pb2.ForkModelRequest(source="tiny", name="m"))
    first = g.models.GetHead(model_pb2.GetHeadRequest(model="m")).id
    g.train.Step(training_pb2.StepRequest(model="m", data=batch(), loss_fn="ppo", adam=adam()))
    assert g.sampling.Sample(sample_req("m", first, max_tokens=2)).checkpoint == first
    assert (
        code_of(lambda: g.sampling.Sample(sample_req("m", "nope", max_tokens=2)))[0] == "NOT_FOUND"
    )


def test_training_takes_trace_ids_mixed_with_inline_trajectories(gateway_stack):
    g = gateway_stack.gateway
    g.models.ForkModel(model_pb2.ForkModelRequest(source="tiny", name="m"))
    client = openai.OpenAI(base_url=g.http_url, api_key="local")
    traces = []
    for seed in range(2):
        c = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "what is 3 plus 4?"}],
            max_tokens=6,
            seed=seed,
            extra_body={"return_token_ids": True},
        )
        traces.append(c.trace_id)
        g.traces.SetReward(trace_pb2.SetRewardRequest(trace_id=c.trace_id, reward=float(seed)))
    trace = g.traces.GetTrace(trace_pb2.GetTraceRequest(trace_id=traces[0]))
    inline = common_pb2.Trajectory(turns=list(trace.turns), reward=0.5)
    data = [
        common_pb2.TrainingItem(trace_id=traces[0]),
        common_pb2.TrainingItem(trajectory=inline),
        common_pb2.TrainingItem(trace_id=traces[1]),
    ]
    reply = g.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(
            model="m", data=data, loss_fn="importance_sampling", group_size=3
        )
    )
    assert reply.num_datums == 3 and reply.metrics["reward/mean"] == pytest.approx(0.5)
    # The trainer's logprobs of a traced turn are the sampler's (same checkpoint).
    turn = trace.turns[0]
    sampled = np.frombuffer(turn.completion_logprobs.data, np.float32)
    got = np.frombuffer(reply.logprobs[0].data, np.float32)[-len(sampled) :]
    assert np.abs(got - sampled).max() <= 1e-4
    no_reward = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        extra_body={"return_token_ids": True},
    ).trace_id
    for trace_id, code in ((no_reward, "FAILED_PRECONDITION"), ("tr-" + "0" * 24, "NOT_FOUND")):
        assert (
            code_of(
                lambda t=trace_id: g.train.ForwardBackward(
                    training_pb2.ForwardBackwardRequest(
                        model="m", data=[common_pb2.TrainingItem(trace_id=t)], loss_fn="ppo"
                    )
                )
            )[0]
            == code
        )


def test_keys_and_teams(gateway_stack):
    stack = gateway_stack
    red, blue = create_key(stack.config.store, "red"), create_key(stack.config.store, "blue")
    node = GatewayNode(stack.config.store, stack.prefix, stack.server.address, auth=True)
    try:
        md = lambda key: [("authorization", f"Bearer {key}")]  # noqa: E731
        for bad in ([], [("authorization", "Basic abc")], md("hw_unknown")):
            code, _ = code_of(
                lambda b=bad: node.models.ListModels(model_pb2.ListModelsRequest(), metadata=b)
            )
            assert code == "UNAUTHENTICATED"
        node.models.ForkModel(
            model_pb2.ForkModelRequest(source="tiny", name="secret"), metadata=md(red)
        )
        calls = [
            lambda: node.models.GetModel(
                model_pb2.GetModelRequest(model="secret"), metadata=md(blue)
            ),
            lambda: node.sampling.Sample(sample_req("secret", max_tokens=2), metadata=md(blue)),
            lambda: node.train.ForwardBackward(
                training_pb2.ForwardBackwardRequest(model="secret", data=batch(), loss_fn="ppo"),
                metadata=md(blue),
            ),
            lambda: node.traces.RecordTurn(
                trace_pb2.RecordTurnRequest(
                    model="secret", turn=common_pb2.Turn(prompt_tokens=to_tensor([1], I32))
                ),
                metadata=md(blue),
            ),
        ]
        for call in calls:
            code, details = code_of(call)
            assert code == "NOT_FOUND" and "secret" in details
        assert node.sampling.Sample(sample_req("secret", max_tokens=2), metadata=md(red)).checkpoint
        listed = [
            m.slug
            for m in node.models.ListModels(model_pb2.ListModelsRequest(), metadata=md(blue)).models
        ]
        assert listed == ["tiny"]
        http = openai.OpenAI(base_url=node.http_url, api_key="hw_wrong")
        with pytest.raises(openai.AuthenticationError) as err:
            http.models.list()
        assert err.value.status_code == 401
        assert [
            m.id for m in openai.OpenAI(base_url=node.http_url, api_key=red).models.list().data
        ] == ["tiny", "secret"]
    finally:
        node.stop()


@pytest.mark.slow
def test_deadline_propagates_and_frees_the_rows(gateway_stack):
    """A Sample whose deadline passes while its rows decode ends DEADLINE_EXCEEDED, the
    deadline reaches the sampler (its job is cancelled) and the rows leave the engine. The
    engine is held at its first decode step (EngineGate, a stall injected into the real
    sampler) so the request cannot finish before its deadline however fast the machine;
    the deadline only has to outlast the request's way to the engine (~20 ms here)."""
    stack = gateway_stack
    request = sample_req("tiny", max_tokens=240, n=4, ignore_eos=True)
    outcome: list[tuple[str, str]] = []
    with EngineGate() as gate:
        call = threading.Thread(
            target=lambda: outcome.append(
                code_of(lambda: stack.gateway.sampling.Sample(request, timeout=3))
            )
        )
        call.start()
        engine = gate.wait_held()
        assert stack.sampler.sampler.live_rows == 4
        call.join(timeout=120)
        assert [code for code, _ in outcome] == ["DEADLINE_EXCEEDED"]
        wait_until(
            lambda: all(row.job.cancelled for row in engine.rows),
            what="the deadline to cancel the job on the sampler",
        )
        gate.release()
        wait_until(lambda: stack.sampler.sampler.live_rows == 0, what="the rows to leave")
