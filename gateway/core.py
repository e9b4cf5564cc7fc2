"""`Gateway`: what every front door (gRPC, HTTP) of a gateway shares.

Authentication (key → team and role, sent to backends with the internal token), the
read-your-writes pin (a Sample with no checkpoint is pinned to the head the store holds
now: OptimStep replies only once that head is durable, so a Sample that starts after it
can only see it or a newer one), replica routing with failover, trace resolution for
training inputs, and the trainer channel. No torch here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from gateway.config import GatewayConfig
from gateway.quota import TeamQuota
from gateway.redis_errors import RedisFailures
from gateway.replies import DEFAULT_TTL_SECONDS, ReplyCache
from gateway.routing import NoReplica, Router
from gateway.team_slots import TeamSlots
from gateway.tinker_state import RESULT_SECONDS
from gateway.traces import TraceStore
from gateway.workers import Workers
from headway.channels import CHANNEL_OPTIONS
from headway.errors import InvalidArgument, Unavailable, pushback_ms
from headway.server import logs
from headway.server.auth import LOCAL, Caller, backend_metadata
from headway.server.keys import KeyRing
from headway.store import CheckpointStore, ModelRecord
from headway.v1 import common_pb2, sampling_pb2

log = logging.getLogger(__name__)
# How long a trainer call waits for the trainer's channel to (re)connect before trying.
TRAINER_CONNECT_SECONDS = 3.0
Metadata = Sequence[tuple[str, str]]


class Gateway:
    """Shared state and logic of one gateway process."""

    def __init__(self, config: GatewayConfig, redis: Any) -> None:
        self.config = config
        self.redis = redis
        self.store = CheckpointStore(config.store, recover=False)  # the trainer writes
        self.keys = KeyRing(config.store)
        self.redis_failures = RedisFailures()  # what Redis failed to do, for the metrics
        self.router = Router(
            redis, config.redis_prefix, config.registry_cache_seconds, self.redis_failures
        )
        self._limits(config, redis)
        self.trainer = grpc.aio.insecure_channel(config.trainer, options=CHANNEL_OPTIONS)
        self._raw: dict[str, Any] = {}

    def _limits(self, config: GatewayConfig, redis: Any) -> None:
        """Traces, stored replies and Tinker results under their Redis caps (one quota per
        team for all),
        the per-team call slots and the worker threads of the HTTP API."""
        quota = TeamQuota.for_retention(
            config.redis_prefix,
            config.max_team_redis_bytes,
            config.trace_retention_seconds,
            DEFAULT_TTL_SECONDS,
            RESULT_SECONDS,  # the Tinker API's results (gateway.tinker_state)
        )
        self.quota = quota
        self.traces = TraceStore(
            redis,
            config.redis_prefix,
            config.trace_retention_seconds,
            max_turn_bytes=config.max_turn_bytes,
            max_turns=config.max_trace_turns,
            quota=quota,
        )
        self.replies = ReplyCache(
            redis, config.redis_prefix, max_reply_bytes=config.max_stored_reply_bytes, quota=quota
        )
        self.slots = TeamSlots(config.max_calls_per_team)
        self.workers = Workers(config.http_worker_threads)

    async def close(self) -> None:
        await self.router.close()
        await self.trainer.close()
        self.workers.close()

    # ------------------------------------------------------------------ auth
    def caller(self, metadata: Metadata | None) -> Caller:
        """The caller (team, admin) from `authorization: Bearer <key>`; in local mode
        the local team, an admin."""
        if not self.config.auth:
            return LOCAL
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        caller = self.keys.caller(value)
        logs.bind(team=caller.team)  # this call's log lines name it
        return caller

    def team(self, metadata: Metadata | None) -> str:
        """The caller's team from `authorization: Bearer <key>` ("" in local mode)."""
        return self.caller(metadata).team

    def backend_md(self, caller: Caller) -> list[tuple[str, str]]:
        """Metadata for a trainer or sampler call made for `caller` (with the token)."""
        return backend_metadata(caller, self.config.internal_token)

    def model(self, slug: str, team: str) -> ModelRecord:
        """A model the team may see; NotFound otherwise (never "forbidden")."""
        return self.store.visible_model(slug, team)

    async def model_visible(self, slug: str, team: str) -> None:
        self.store.visible_model(slug, team)

    def visible_models(self, team: str) -> list[ModelRecord]:
        return self.store.visible_models(team)

    def pin(self, model: str, checkpoint: str, team: str) -> str:
        """The checkpoint that serves a request: the caller's pin, else the store's head."""
        self.model(model, team)
        if checkpoint:  # by id or tag; NotFound for an unknown pin
            return self.store.get_checkpoint(model, checkpoint).id
        return self.store.head(model)

    # -------------------------------------------------------------- trainer
    async def trainer_ready(self, deadline: float | None) -> None:
        """Wait (at most TRAINER_CONNECT_SECONDS, within the call's deadline) for the trainer
        channel to connect when it is not connected: after a refused connection gRPC waits
        out a backoff before redialling, and a call made meanwhile fails at once although
        the trainer may be up. If it does not connect, the call goes ahead and fails with
        the real error."""
        if self.trainer.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        wait = (
            TRAINER_CONNECT_SECONDS if deadline is None else min(deadline, TRAINER_CONNECT_SECONDS)
        )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.trainer.channel_ready(), wait)

    def raw(self, path: str) -> Any:
        """A bytes-in, bytes-out callable for a trainer method (no re-encoding)."""
        if path not in self._raw:
            self._raw[path] = self.trainer.unary_unary(path)
        return self._raw[path]

    def raw_stream(self, path: str) -> Any:
        """`raw` for a server-streaming trainer method: bytes in, a stream of bytes out."""
        key = f"stream:{path}"
        if key not in self._raw:
            self._raw[key] = self.trainer.unary_stream(path)
        return self._raw[key]

    async def resolve_traces(self, items: Sequence[common_pb2.TrainingItem], team: str) -> bool:
        """Replace trace-id items by their trajectories in place; True if any was."""
        found = False
        for i, item in enumerate(items):
            if item.WhichOneof("item") == "trace_id":
                if not item.trace_id:
                    raise InvalidArgument(f"data[{i}].trace_id is empty: give the trace's id")
                trajectory = await self.traces.trajectory(item.trace_id, team)
                item.trajectory.CopyFrom(trajectory)
                found = True
        return found

    # ------------------------------------------------------------- sampling
    async def _attempts(self, model: str, checkpoint: str) -> list[str]:
        try:
            return await self.router.candidates(model, checkpoint)
        except NoReplica as e:
            raise Unavailable(str(e)) from None

    def _try_next(self, address: str, e: grpc.aio.AioRpcError) -> bool:
        """Whether a replica's error means "try another replica": it failed before
        answering (UNAVAILABLE: marked, passed over for a while) or it is at capacity
        right now (RESOURCE_EXHAUSTED with a retry pushback). Anything else is the
        request's own answer."""
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            log.warning("sampler %s unavailable (%s); trying another", address, e.details())
            self.router.mark_failed(address)
            reason = "unavailable"
        elif e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback_ms(e) is not None:
            reason = "full"
        else:
            return False
        self.router.failovers[reason] += 1
        return True

    async def _failover(self, model: str, checkpoint: str, rows: int, call: Any) -> Any:
        """`await call(stub)` on the best replica; on a replica that failed or is full,
        the next one; the last error if every replica did. `rows`: the sequences the call
        puts on the replica, counted in its load while the call runs."""
        last: grpc.aio.AioRpcError | None = None
        for address in await self._attempts(model, checkpoint):
            self.router.begin(address, rows)
            try:
                return await call(self.router.stub(address))
            except grpc.aio.AioRpcError as e:
                if not self._try_next(address, e):
                    raise
                last = e
            finally:
                self.router.end(address, rows)
        assert last is not None
        raise last

    async def sample(
        self, request: sampling_pb2.SampleRequest, team: str, timeout: float | None
    ) -> sampling_pb2.SampleResponse:
        """Pin, route and send a Sample; a replica failing before answering is replaced."""
        request.checkpoint = self.pin(request.model, request.checkpoint, team)
        md = self.backend_md(Caller(team))  # samplers need only the team
        return await self._failover(
            request.model,
            request.checkpoint,
            max(1, request.params.n),
            lambda stub: stub.Sample(request, metadata=md, timeout=timeout),
        )

    async def sample_stream(
        self, request: sampling_pb2.SampleRequest, team: str, timeout: float | None
    ) -> AsyncIterator[sampling_pb2.SampleChunk]:
        """Streamed Sample; fails over only before the first chunk (tokens are not redone)."""
        request.checkpoint = self.pin(request.model, request.checkpoint, team)
        last: grpc.aio.AioRpcError | None = None
        rows = max(1, request.params.n)
        for address in await self._attempts(request.model, request.checkpoint):
            self.router.begin(address, rows)
            started = False
            try:
                call = self.router.stub(address).SampleStream(
                    request, metadata=self.backend_md(Caller(team)), timeout=timeout
                )
                try:
                    async for chunk in call:
                        started = True
                        yield chunk
                finally:
                    call.cancel()  # a client that left cancels the replica's rows too
                return
            except grpc.aio.AioRpcError as e:
                if started or not self._try_next(address, e):
                    raise
                last = e
            finally:
                self.router.end(address, rows)
        assert last is not None
        raise last

    async def compute_logprobs(
        self, request: sampling_pb2.ComputeLogprobsRequest, team: str, timeout: float | None
    ) -> sampling_pb2.ComputeLogprobsResponse:
        request.checkpoint = self.pin(request.model, request.checkpoint, team)
        md = self.backend_md(Caller(team))
        return await self._failover(
            request.model,
            request.checkpoint,
            max(1, len(request.sequences)),
            lambda stub: stub.ComputeLogprobs(request, metadata=md, timeout=timeout),
        )
