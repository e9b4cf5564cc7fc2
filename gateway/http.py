"""OpenAI-compatible HTTP API of the gateway: `/v1/chat/completions`, `/v1/completions`,
`/v1/models`, for agents driven through the `openai` client.

`model` is the slug. Extra body fields follow vLLM and HUD: `return_token_ids` returns
`prompt_token_ids`, `token_ids` and per-token logprobs on each choice and records the turn
in a trace (its `trace_id` comes back on the choice, and at the top for n = 1);
`checkpoint` pins a checkpoint; `prompt_token_ids` replaces the rendered prompt (a
continued multi-turn trajectory, token-exact); `trace_id` appends the turn to an existing
trace. A request that records a trace and carries an `Idempotency-Key` header is answered
once: a retry gets the stored reply (see `gateway.replies`). Errors use OpenAI's JSON
shape (`gateway.http_errors`). Chat templates are rendered here, from the base's tokenizer
files (no torch in the gateway).

Each request holds a slot of its team until its response ends (`gateway.team_slots`); its
body is size-limited before it is read (`BodyLimit`). Parsing, parameter checks, chat
rendering, tokenizing and reply encoding (`gateway.http_params`) run on the worker threads
(`gateway.workers`), never on the event loop that also serves gRPC.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import grpc
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as RoutingError

from gateway import replies, tinker_api
from gateway.core import Gateway
from gateway.http_errors import HTTPError, domain_error_response, error_response
from gateway.http_params import (
    Completion,
    completion_requests,
    parse_body,
    render_json,
    required_str,
)
from gateway.openai_logprobs import (
    LegacyLogprobs,
    Pieces,
    chat_logprobs,
    legacy_logprobs,
    tops_of,
)
from gateway.redis_errors import REDIS_ERRORS
from gateway.team_slots import TeamSlotsMiddleware
from gateway.tool_calls import CallStream
from headway.errors import HeadwayError, from_rpc_error
from headway.modeling.tokenizer import Tokenizer
from headway.server import logs
from headway.tensors import to_tensor
from headway.tensors import tokens as token_ids
from headway.v1 import common_pb2, sampling_pb2

__all__ = ["HTTPError", "create_app", "domain_error_response", "error_response"]

log = logging.getLogger(__name__)

FINISH = {sampling_pb2.STOP_REASON_STOP: "stop", sampling_pb2.STOP_REASON_LENGTH: "length"}
ROUTES = (
    "POST /v1/chat/completions, POST /v1/completions, GET /v1/models and the Tinker API "
    "under /api/v1/"
)


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes before anything parses them."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = error_response(
            413, f"request body over the limit of {self.limit} bytes", "request_too_large"
        )
        if length is not None and int(length) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPError(
                    413, f"request body over the limit of {self.limit} bytes", "request_too_large"
                )
            return message

        await self.app(scope, counted, send)


class CallFields:
    """ASGI middleware naming each HTTP call in its log lines (headway.server.logs): its
    X-Request-Id (else a new id, passed on to the backends) and "METHOD /path"."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":  # ASGI headers: lower-cased names, latin-1 bytes
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            logs.begin(logs.request_id_of(headers), f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


def create_app(gateway: Gateway) -> Any:
    """The FastAPI app (wrapped in the team slots and the body limit) for one gateway."""
    app = FastAPI(title="Headway gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(CallFields)
    tokenizers: dict[str, Tokenizer] = {}

    async def tokenizer_for(model: str, team: str) -> Tokenizer:
        base = gateway.store.get_model(model).base
        if base not in tokenizers:
            path = gateway.store.get_model(base).path
            tokenizers[base] = await gateway.workers.run(team, Tokenizer.from_dir, path)
        return tokenizers[base]

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        return error_response(e.status, e.message, e.code, e.param)

    @app.exception_handler(RoutingError)
    async def _routing_error(request: Request, e: RoutingError) -> JSONResponse:
        """An unknown route or method, in OpenAI's error shape, saying what is served (the
        gRPC analogue is an unknown method: UNIMPLEMENTED)."""
        method, path = request.method, request.url.path
        if e.status_code == 404:
            message = f"no route {method} {path}: this API serves {ROUTES}"
        elif e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "")
            message = f"{method} is not allowed on {path}: use {allowed}"
        else:
            return error_response(e.status_code, str(e.detail))
        return error_response(e.status_code, message, grpc_status="UNIMPLEMENTED")

    @app.exception_handler(HeadwayError)
    async def _domain_error(request: Request, e: HeadwayError) -> JSONResponse:
        return domain_error_response(e)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def _upstream_error(request: Request, e: grpc.aio.AioRpcError) -> JSONResponse:
        return domain_error_response(from_rpc_error(e))

    @app.exception_handler(RedisError)
    async def _redis_error(request: Request, e: RedisError) -> JSONResponse:
        return domain_error_response(gateway.redis_failures.unavailable(e))

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, e: ValueError) -> JSONResponse:
        return error_response(400, str(e))

    def team_of(headers: Any) -> str:
        # `Authorization: Bearer <key>`, or the Tinker SDK's `X-API-Key: tml-<key>`.
        return gateway.team([("authorization", tinker_api.bearer(headers))])

    app.include_router(tinker_api.create_router(gateway, team_of))

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        team = team_of(request.headers)
        return {
            "object": "list",
            "data": [
                {
                    "id": m.slug,
                    "object": "model",
                    "created": int(m.created),
                    "owned_by": m.team or "headway",
                    "root": m.base,
                    "parent": m.source or None,
                }
                for m in gateway.visible_models(team)
            ],
        }

    async def complete(request: Request, *, chat: bool) -> Response:
        team = team_of(request.headers)
        # Parsing, rendering and tokenizing run on worker threads, off the loop.
        body = await gateway.workers.run(team, parse_body, await request.body())
        model = required_str(body, "model")
        arch = gateway.model(model, team).arch
        context, vocab = int(arch["max_context"]), int(arch["vocab_size"])
        tok = await tokenizer_for(model, team)
        so_far = await _trajectory_so_far(gateway, body, model, team) if chat else None
        prepare = partial(completion_requests, chat=chat, vocab=vocab, so_far=so_far)
        reqs = await gateway.workers.run(team, prepare, tok, body, model, context)

        async def run() -> Any:
            if len(reqs) == 1:
                return await _complete(gateway, tok, reqs[0], team, chat=chat)
            # Several prompts (a text completion's batch, all checked already): one after
            # another, as the one request they are (one team slot), their choices numbered
            # prompt by prompt, as OpenAI and vLLM number them.
            return _merged([await _complete(gateway, tok, req, team, chat=chat) for req in reqs])

        return await _once(gateway, request, team, body, reqs[0], run)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    limited = BodyLimit(app, gateway.config.max_body_bytes)
    return TeamSlotsMiddleware(limited, gateway.slots, team_of, domain_error_response)


async def _trajectory_so_far(
    gateway: Gateway, body: dict[str, Any], model: str, team: str
) -> tuple[list[int], list[int], str] | None:
    """The recorded trajectory a chat turn continues (its trace's last turn: prompt and
    completion tokens, the prompt's digest), when it records into an existing trace from
    `messages`; else None. NotFound for a trace the team does not have, InvalidArgument
    for another model's (before anything is sampled)."""
    trace_id = body.get("trace_id")
    if not (isinstance(trace_id, str) and trace_id and body.get("return_token_ids") is True):
        return None
    if body.get("prompt_token_ids") is not None:
        return None  # the client gives the exact tokens itself
    traced, last = await gateway.traces.last_turn(trace_id, team)
    if traced != model:
        raise HTTPError(
            400, f"trace '{trace_id}' is a trajectory of {traced!r}, not of {model!r}",
            param="trace_id",
        )  # fmt: skip
    if last is None:
        return None
    prompt = token_ids(last.prompt_tokens, "the trace's prompt_tokens").tolist()
    sampled = token_ids(last.completion_tokens, "the trace's completion_tokens").tolist()
    return prompt, sampled, last.prompt_digest


async def _json(gateway: Gateway, team: str, out: Any) -> Response:
    """The response for what a completion returned: a stream as it is, a reply's JSON
    encoded on a worker thread."""
    if isinstance(out, Response):
        return out
    data = await gateway.workers.run(team, render_json, out)
    return Response(data, media_type="application/json")


async def _once(
    gateway: Gateway,
    request: Request,
    team: str,
    body: dict[str, Any],
    req: Completion,
    run: Callable[[], Awaitable[Any]],
) -> Response:
    """The reply of `run()`, run at most once per Idempotency-Key when the request records
    a trace.

    Without a key, or without `return_token_ids` (a plain sample changes nothing, so a
    repeat is harmless), the request just runs.
    """
    key = request.headers.get(replies.HEADER)
    if key is None or not req.return_token_ids:
        return await _json(gateway, team, await run())
    if req.stream:
        raise HTTPError(
            400,
            "Idempotency-Key is supported on non-streaming requests: drop stream, or the key",
            param="stream",
        )
    key = replies.check_key(key)
    digest = await gateway.workers.run(team, replies.body_digest, body)
    stored = await gateway.replies.claim(team, key, digest)
    if stored is not None:
        return Response(stored, media_type="application/json")
    try:
        out = await run()
        data = await gateway.workers.run(team, render_json, out)
    except BaseException:
        await gateway.replies.release(team, key)
        raise
    try:
        traces = [c["trace_id"] for c in out["choices"]]
        await gateway.replies.store(team, key, digest, data, traces)
    except Exception:
        # The turn is recorded: answer it anyway (a retry would find the key still
        # claimed, 409, rather than record the turn twice).
        log.exception("could not store the reply of an Idempotency-Key request")
    return Response(data, media_type="application/json")


def _merged(outs: list[dict[str, Any]]) -> dict[str, Any]:
    """One reply of the replies to each prompt of a batch: their choices in prompt order,
    numbered on (prompt i's choice j is i * n + j), usage summed."""
    merged = {**outs[0], "choices": [], "usage": dict.fromkeys(outs[0]["usage"], 0)}
    merged.pop("trace_id", None)
    merged.pop("prompt_token_ids", None)
    for out in outs:
        for choice in out["choices"]:
            merged["choices"].append({**choice, "index": len(merged["choices"])})
        for key, value in out["usage"].items():
            merged["usage"][key] += value
    return merged


def _choices(
    tok: Tokenizer, reply: sampling_pb2.SampleResponse, req: Completion, chat: bool
) -> list[tuple[dict[str, Any], list[int], list[float], int]]:
    """Each sequence's choice (without its trace), token ids, logprobs and the tool calls
    that did not parse (worker thread: every token is decoded for the logprobs)."""
    out = []
    pieces = Pieces(tok)
    echoed = None
    if req.echo:  # the prompt as the client wrote it, then its scores when asked
        prompt_text = req.prompt_text
        if prompt_text is None:
            prompt_text = tok.decode(req.prompt)
        if req.logprobs:
            p_lps = np.frombuffer(reply.prompt_logprobs.data, np.float32).tolist()
            p_tops = tops_of(reply.prompt_top_token_ids, reply.prompt_top_logprobs)
            echoed = (req.prompt, p_lps, p_tops)
    for i, seq in enumerate(reply.sequences):
        ids = np.frombuffer(seq.tokens.data, np.int32).tolist()
        lps = np.frombuffer(seq.logprobs.data, np.float32).tolist()
        tops = tops_of(seq.top_token_ids, seq.top_logprobs)
        finish = FINISH.get(seq.stop_reason, "stop")
        text = seq.text
        if req.drop_last:  # max_tokens 0: the token drawn to read the prompt's scores
            ids, lps, text, finish = [], [], "", "length"
            tops = [] if tops is not None else None
        choice: dict[str, Any] = {"index": i, "finish_reason": finish}
        malformed = 0
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            calling = req.tools is not None and req.tools.spec.choice != "none"
            if calling:  # the calls parsed out of the reply (its tokens stay as sampled)
                parsed = req.tools.format.parse(req.tools.opening + text, req.tools.spec.names)
                choice["message"]["content"] = parsed.content
                malformed = parsed.malformed
                if parsed.calls:
                    choice["message"]["tool_calls"] = parsed.calls
                    choice["finish_reason"] = "tool_calls"
        else:
            choice["text"] = prompt_text + text if req.echo else text
        if not req.logprobs:
            choice["logprobs"] = None
        elif chat:
            choice["logprobs"] = chat_logprobs(pieces, ids, lps, tops)
        else:
            choice["logprobs"] = legacy_logprobs(pieces, req.top_logprobs, ids, lps, tops, echoed)
        if req.return_token_ids:
            choice["token_ids"] = ids
            choice["prompt_token_ids"] = req.prompt
        out.append((choice, ids, lps, malformed))
    return out


async def _record(
    gateway: Gateway,
    req: Completion,
    team: str,
    ids: list[int],
    lps: list[float],
    checkpoint: str,
    malformed: int = 0,
) -> str:
    """Record a sampled turn in the request's trace (a new one unless it names one)."""
    turn = common_pb2.Turn(
        prompt_tokens=req.prompt_tokens,
        completion_tokens=to_tensor(ids, common_pb2.DTYPE_INT32),
        completion_logprobs=to_tensor(lps, common_pb2.DTYPE_FLOAT32),
        checkpoint=checkpoint,
        malformed_tool_calls=malformed,
        prompt_digest=req.prompt_digest,
    )
    trace_id, _ = await gateway.traces.record_turn(req.trace_id, req.model, team, turn)
    return trace_id


async def _complete(
    gateway: Gateway, tok: Tokenizer, req: Completion, team: str, *, chat: bool
) -> Any:
    """Sample a checked completion request; its reply (a dict) or a streaming response."""
    request = sampling_pb2.SampleRequest(
        model=req.model,
        prompt_tokens=req.prompt_tokens,
        params=req.params,
        checkpoint=req.checkpoint,
        include_prompt_logprobs=req.echo and req.logprobs,
    )
    created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    if req.stream:
        chunks = await _started(gateway.sample_stream(request, team, timeout=None))
        return StreamingResponse(
            _stream(gateway, tok, req, request, team, chat, created, rid, chunks),
            media_type="text/event-stream",
        )
    reply = await gateway.sample(request, team, timeout=None)
    choices, completion_tokens, traces = [], 0, []
    made = await gateway.workers.run(team, _choices, tok, reply, req, chat)
    for choice, ids, lps, malformed in made:
        completion_tokens += len(ids)
        if req.return_token_ids:
            choice["trace_id"] = await _record(
                gateway, req, team, ids, lps, reply.checkpoint, malformed
            )
            traces.append(choice["trace_id"])
        choices.append(choice)
    prompt_len = len(req.prompt)
    out: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": req.model,
        "choices": choices,
        "checkpoint": reply.checkpoint,
        "usage": {
            "prompt_tokens": prompt_len,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_len + completion_tokens,
        },
    }
    if req.return_token_ids:
        out["prompt_token_ids"] = req.prompt
        if len(traces) == 1:
            out["trace_id"] = traces[0]
    if req.continued is not None:  # a turn of a recorded trajectory: token-exact or not
        out["prompt_continued"] = req.continued
        if not req.continued:
            out["prompt_rerendered_because"] = req.rerendered_because
    return out


async def _started(
    chunks: AsyncIterator[sampling_pb2.SampleChunk],
) -> AsyncIterator[sampling_pb2.SampleChunk]:
    """`chunks` with its first chunk already received. The gateway pins and the replica
    checks the request before the first chunk, so a bad request fails here and answers
    with its own status (400, 404, ...), not inside a stream whose 200 is already sent."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None

    async def resumed() -> AsyncIterator[sampling_pb2.SampleChunk]:
        try:
            if first is not None:
                yield first
                async for chunk in chunks:
                    yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return resumed()


async def _stream(
    gateway: Gateway,
    tok: Tokenizer,
    req: Completion,
    request: sampling_pb2.SampleRequest,
    team: str,
    chat: bool,
    created: int,
    rid: str,
    chunks: AsyncIterator[sampling_pb2.SampleChunk],
) -> AsyncIterator[bytes]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    per: dict[int, tuple[list[int], list[float]]] = {}
    checkpoint = request.checkpoint
    want_ids = req.return_token_ids
    pieces = Pieces(tok)  # each chunk's tokens decoded for its logprobs, when asked
    legacy: dict[int, LegacyLogprobs] = {}  # text offsets run on per choice
    tools = (
        req.tools if chat and req.tools is not None and req.tools.spec.choice != "none" else None
    )
    splits: dict[int, CallStream] = {}  # per choice: its text split into content and calls

    def event(choice: dict[str, Any], **extra: Any) -> bytes:
        data = {
            "id": rid,
            "object": kind,
            "created": created,
            "model": request.model,
            "choices": [choice],
            **extra,
        }
        return f"data: {json.dumps(data)}\n\n".encode()

    try:
        async for chunk in chunks:
            if chunk.checkpoint:
                checkpoint = chunk.checkpoint
            if not chunk.tokens.shape and not chunk.stop_reason:
                continue
            ids = np.frombuffer(chunk.tokens.data, np.int32).tolist()
            lps = np.frombuffer(chunk.logprobs.data, np.float32).tolist()
            first = chunk.index not in per
            seen = per.setdefault(chunk.index, ([], []))
            seen[0].extend(ids)
            seen[1].extend(lps)
            choice: dict[str, Any] = {"index": chunk.index, "finish_reason": None}
            calls: list[dict[str, Any]] = []
            if chat:
                delta: dict[str, Any] = {"content": chunk.text}
                if tools is not None:
                    split = splits.get(chunk.index)
                    if split is None:
                        split = splits[chunk.index] = CallStream(
                            tools.format, tools.spec.names, tools.opening
                        )
                    delta["content"], calls = split.feed(chunk.text)
                    if chunk.stop_reason:
                        delta["content"] += split.finish()
                    if calls:
                        delta["content"] = delta["content"] or None  # as OpenAI sends it
                        start = split.calls - len(calls)
                        delta["tool_calls"] = [
                            {"index": start + k, **call} for k, call in enumerate(calls)
                        ]
                if first:
                    delta["role"] = "assistant"
                choice["delta"] = delta
            else:
                choice["text"] = chunk.text
            if req.logprobs:
                tops = tops_of(chunk.top_token_ids, chunk.top_logprobs)
                if chat:
                    choice["logprobs"] = chat_logprobs(pieces, ids, lps, tops)
                else:
                    built = legacy.setdefault(chunk.index, LegacyLogprobs(pieces, req.top_logprobs))
                    choice["logprobs"] = built.add(ids, lps, tops)
            if want_ids:
                choice["token_ids"] = ids
            if chunk.stop_reason:
                choice["finish_reason"] = FINISH.get(chunk.stop_reason, "stop")
                split = splits.get(chunk.index)
                if split is not None and split.calls:
                    choice["finish_reason"] = "tool_calls"
                if want_ids:
                    choice["trace_id"] = await _record(
                        gateway, req, team, seen[0], seen[1], checkpoint,
                        split.malformed if split is not None else 0,
                    )  # fmt: skip
            extra: dict[str, Any] = {}
            if want_ids and first:
                extra["prompt_token_ids"] = req.prompt
                if req.continued is not None:
                    extra["prompt_continued"] = req.continued
                    if not req.continued:
                        extra["prompt_rerendered_because"] = req.rerendered_because
            yield event(choice, **extra)
    except (HeadwayError, grpc.aio.AioRpcError, *REDIS_ERRORS) as e:
        if isinstance(e, REDIS_ERRORS):
            e = gateway.redis_failures.unavailable(e)
        message = e.message if isinstance(e, HeadwayError) else (e.details() or "")
        error = {"error": {"message": message, "type": "server_error"}}
        yield f"data: {json.dumps(error)}\n\n".encode()
    yield b"data: [DONE]\n\n"
