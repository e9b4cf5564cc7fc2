"""gRPC `TraceService` of the gateway, thin over `TraceStore`.

The servicer authenticates the caller (`team_of`), checks the request's required fields and
that a named model exists for the caller's team (`model_visible`), then lets the store do
the rest. Errors are `HeadwayError`s turned into statuses by `maps_errors`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from gateway.traces import TraceStore
from headway.errors import InvalidArgument
from headway.server.grpc import maps_errors
from headway.v1 import trace_pb2, trace_pb2_grpc

Ctx = grpc.aio.ServicerContext

# Authenticates the caller and returns its team; may raise a HeadwayError (Unauthenticated).
TeamOf = Callable[[Ctx], Awaitable[str]]
# model_visible(model, team) returns when the model exists for the team, else raises NotFound.
ModelVisible = Callable[[str, str], Awaitable[None]]


def _trace_id(value: str) -> str:
    if not value:
        raise InvalidArgument("trace_id is empty: give the id RecordTurn returned")
    return value


class TraceServicer(trace_pb2_grpc.TraceServiceServicer):
    """RecordTurn, SetReward and GetTrace over a `TraceStore`."""

    def __init__(self, store: TraceStore, team_of: TeamOf, model_visible: ModelVisible) -> None:
        self.store = store
        self.team_of = team_of
        self.model_visible = model_visible

    @maps_errors
    async def RecordTurn(
        self, request: trace_pb2.RecordTurnRequest, context: Ctx
    ) -> trace_pb2.RecordTurnResponse:
        team = await self.team_of(context)
        if not request.trace_id and not request.model:
            raise InvalidArgument(
                "model is empty: name the model that sampled the turn when starting a trace"
            )
        if not request.HasField("turn"):
            raise InvalidArgument(
                "turn is required: prompt_tokens, completion_tokens and completion_logprobs "
                "of the sampled turn"
            )
        if request.model:
            await self.model_visible(request.model, team)
        trace_id, index = await self.store.record_turn(
            request.trace_id, request.model, team, request.turn, request.request_id
        )
        return trace_pb2.RecordTurnResponse(trace_id=trace_id, turn_index=index)

    @maps_errors
    async def SetReward(self, request: trace_pb2.SetRewardRequest, context: Ctx) -> trace_pb2.Trace:
        team = await self.team_of(context)
        return await self.store.set_reward(_trace_id(request.trace_id), team, request.reward)

    @maps_errors
    async def GetTrace(self, request: trace_pb2.GetTraceRequest, context: Ctx) -> trace_pb2.Trace:
        team = await self.team_of(context)
        return await self.store.get(_trace_id(request.trace_id), team)
