"""The gateway's gRPC face: every service of the contract on one port.

ModelService and TrainingService calls are relayed to the trainer as raw bytes (nothing is
decoded and re-encoded), with the caller's team and role and the internal token attached;
training requests that name traces are the exception: their trace ids are resolved into
trajectories here first.
SamplingService calls are pinned, routed to a sampler replica and failed over.
TraceService is served here, from Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from gateway.core import Gateway
from headway.server.grpc import MAPPED_ERRORS, abort_for, maps_errors, parse_request
from headway.v1 import model_pb2, sampling_pb2, sampling_pb2_grpc, training_pb2

Ctx = grpc.aio.ServicerContext

# Training requests whose `data` may name traces, by method.
_WITH_DATA = {
    "ForwardBackward": training_pb2.ForwardBackwardRequest,
    "ForwardCustom": training_pb2.ForwardCustomRequest,
    "Step": training_pb2.StepRequest,
}


def _relay(gateway: Gateway, service: str, method: str) -> grpc.RpcMethodHandler:
    path = f"/headway.v1.{service}/{method}"
    parse = _WITH_DATA.get(method) if service == "TrainingService" else None

    async def handler(request: bytes, context: Ctx) -> bytes:
        try:
            caller = gateway.caller(context.invocation_metadata())
            if parse is not None:
                message = parse_request(parse.FromString, request, path)
                if await gateway.resolve_traces(message.data, caller.team):
                    request = message.SerializeToString()
            await gateway.trainer_ready(context.time_remaining())
            return await gateway.raw(path)(
                request, metadata=gateway.backend_md(caller), timeout=context.time_remaining()
            )
        except MAPPED_ERRORS as e:
            await abort_for(context, e)
            raise  # unreachable: abort raises

    # No (de)serializers: the request and the reply stay bytes end to end.
    return grpc.unary_unary_rpc_method_handler(handler)


def _relay_stream(gateway: Gateway, service: str, method: str) -> grpc.RpcMethodHandler:
    """A server-streaming method relayed as bytes, each message as the trainer sends it."""
    path = f"/headway.v1.{service}/{method}"

    async def handler(request: bytes, context: Ctx) -> AsyncIterator[bytes]:
        try:
            caller = gateway.caller(context.invocation_metadata())
            await gateway.trainer_ready(context.time_remaining())
            call = gateway.raw_stream(path)(
                request, metadata=gateway.backend_md(caller), timeout=context.time_remaining()
            )
            async for message in call:
                yield message
        except MAPPED_ERRORS as e:
            await abort_for(context, e)

    return grpc.unary_stream_rpc_method_handler(handler)


def relay_handlers(gateway: Gateway) -> list[grpc.GenericRpcHandler]:
    """Generic handlers relaying ModelService and TrainingService to the trainer."""
    out = []
    for module, service in ((model_pb2, "ModelService"), (training_pb2, "TrainingService")):
        methods = module.DESCRIPTOR.services_by_name[service].methods_by_name
        out.append(
            grpc.method_handlers_generic_handler(
                f"headway.v1.{service}",
                {
                    name: (_relay_stream if m.server_streaming else _relay)(gateway, service, name)
                    for name, m in methods.items()
                },
            )
        )
    return out


class GatewaySampling(sampling_pb2_grpc.SamplingServiceServicer):
    """Sampling through the gateway: pinned to the head, routed, failed over."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @maps_errors
    async def Sample(
        self, request: sampling_pb2.SampleRequest, context: Ctx
    ) -> sampling_pb2.SampleResponse:
        team = self.gateway.team(context.invocation_metadata())
        return await self.gateway.sample(request, team, context.time_remaining())

    async def SampleStream(
        self, request: sampling_pb2.SampleRequest, context: Ctx
    ) -> AsyncIterator[sampling_pb2.SampleChunk]:
        try:
            team = self.gateway.team(context.invocation_metadata())
            async for chunk in self.gateway.sample_stream(request, team, context.time_remaining()):
                yield chunk
        except MAPPED_ERRORS as e:
            await abort_for(context, e)

    @maps_errors
    async def ComputeLogprobs(
        self, request: sampling_pb2.ComputeLogprobsRequest, context: Ctx
    ) -> sampling_pb2.ComputeLogprobsResponse:
        team = self.gateway.team(context.invocation_metadata())
        return await self.gateway.compute_logprobs(request, team, context.time_remaining())
