"""Backends (trainer, samplers) believe team metadata only from a gateway holding the
deployment's internal token; without a token they listen on loopback only.

The exploits: anyone who reaches a backend's port claims another team with
`x-headway-team` and reads, samples or deletes its models; a backend started on 0.0.0.0
without protection. Over real gRPC (tests/helpers_auth.py).
"""

from __future__ import annotations

import asyncio

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from headway.server.auth import TOKEN_HEADER, UnsafeConfig, load_token
from headway.tensors import to_tensor
from headway.v1 import common_pb2, model_pb2, sampling_pb2
from tests.helpers_auth import code_of

VICTIM = [("x-headway-team", "red")]
FORGED = [*VICTIM, (TOKEN_HEADER, "not-the-token-but-long-enough")]


def _fork_secret(stack) -> None:
    request = model_pb2.ForkModelRequest(
        source="tiny", name="secret", lora=common_pb2.LoraConfig(rank=4, alpha=8)
    )
    stack.gateway.models.ForkModel(request, metadata=stack.md("red"), timeout=120)


def test_the_trainer_refuses_a_claimed_team_without_the_internal_token(secured_stack):
    stack = secured_stack
    _fork_secret(stack)
    direct = stack.trainer.models  # a stub on the trainer's own port, no gateway
    for metadata in (VICTIM, FORGED, [*VICTIM, ("x-headway-admin", "1")], []):
        for call in (
            lambda md=metadata: direct.GetModel(
                model_pb2.GetModelRequest(model="secret"), metadata=md
            ),
            lambda md=metadata: direct.DeleteModel(
                model_pb2.DeleteModelRequest(model="secret"), metadata=md
            ),
            lambda md=metadata: direct.AddBase(
                model_pb2.AddBaseRequest(path=str(stack.base), name="mine"), metadata=md
            ),
        ):
            code, details = code_of(call)
            assert code == "UNAUTHENTICATED" and "internal token" in details
    # The victim's model is untouched, and nothing was registered.
    got = stack.gateway.models.GetModel(
        model_pb2.GetModelRequest(model="secret"), metadata=stack.md("red")
    )
    assert got.slug == "secret"
    assert stack.slugs() == ["secret", "tiny"]


def test_a_sampler_refuses_a_claimed_team_without_the_internal_token(secured_stack):
    stack = secured_stack
    _fork_secret(stack)
    request = sampling_pb2.SampleRequest(
        model="secret",
        prompt_tokens=to_tensor([5, 17, 33], common_pb2.DTYPE_INT32),
        params=common_pb2.SamplingParams(max_tokens=2),
    )
    direct = stack.sampler.stub
    steps = stack.sampler.sampler.steps
    for metadata in (VICTIM, FORGED):
        assert code_of(lambda md=metadata: direct.Sample(request, metadata=md))[0] == (
            "UNAUTHENTICATED"
        )
        stream = lambda md=metadata: list(direct.SampleStream(request, metadata=md))  # noqa: E731
        assert code_of(stream)[0] == "UNAUTHENTICATED"
    assert stack.sampler.sampler.steps == steps  # nothing was sampled
    # Through the gateway, the owner samples it.
    reply = stack.gateway.sampling.Sample(request, metadata=stack.md("red"), timeout=120)
    assert reply.model == "secret" and reply.sequences


def test_health_checks_need_no_token(secured_stack):
    """Load balancers and `headway serve` health-check backends without credentials."""
    for channel in (secured_stack.trainer.channel, secured_stack.sampler.channel):
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_backends_without_a_token_refuse_a_non_loopback_address(tmp_path):
    from sampler_svc.config import SamplerConfig
    from sampler_svc.server import create_replica
    from trainer_svc.config import TrainerConfig
    from trainer_svc.server import create_server

    for start in (
        lambda: create_server(TrainerConfig(store=tmp_path / "store"), "0.0.0.0:0"),
        lambda: create_replica(SamplerConfig(store=tmp_path / "store"), "0.0.0.0:0"),
    ):
        with pytest.raises(UnsafeConfig) as err:
            asyncio.run(start())
        assert "--internal-token-file" in str(err.value) and "0.0.0.0:0" in str(err.value)


def test_the_internal_token_comes_from_a_file_and_must_be_long(tmp_path, monkeypatch):
    monkeypatch.delenv("HEADWAY_INTERNAL_TOKEN_FILE", raising=False)
    monkeypatch.delenv("HEADWAY_INTERNAL_TOKEN", raising=False)
    assert load_token() == ""  # none configured: loopback only
    good = tmp_path / "token"
    good.write_text("s3cret-token-of-some-length\n")
    assert load_token(str(good)) == "s3cret-token-of-some-length"
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(UnsafeConfig, match="3 characters"):
        load_token(str(short))
    with pytest.raises(UnsafeConfig, match="cannot read"):
        load_token(str(tmp_path / "missing"))
    monkeypatch.setenv("HEADWAY_INTERNAL_TOKEN", "tiny")
    with pytest.raises(UnsafeConfig, match="HEADWAY_INTERNAL_TOKEN"):
        load_token()
