"""OpenAI-compatible HTTP API of the gateway: `/v1/chat/completions`, `/v1/completions`,
`/v1/models`, for agents driven through the `openai` client.

`model` is the slug. Extra body fields follow vLLM and HUD: `return_token_ids` returns
`prompt_token_ids`, `token_ids` and per-token logprobs on each choice and records the turn
in a trace (its `trace_id` comes back on the choice, and at the top for n = 1);
`checkpoint` pins a checkpoint; `prompt_token_ids` replaces the rendered prompt (a
continued multi-turn trajectory, token-exact); `trace_id` appends the turn to an existing
trace. A request that records a trace and carries an `Idempotency-Key` header is answered
once: a retry gets the stored reply (see `gateway.replies`). Errors use OpenAI's JSON
shape. Chat templates are rendered here, from the base's tokenizer files (no torch in the
gateway).
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
from fastapi.responses import JSONResponse, StreamingResponse

from gateway import replies
from gateway.core import Gateway
from headway.errors import (
    HeadwayError,
    InvalidArgument,
    Overloaded,
    from_http,
    from_status,
    pushback_ms,
)
from headway.tensors import to_tensor
from headway.tokenizer import Tokenizer
from headway.v1 import common_pb2, sampling_pb2

log = logging.getLogger(__name__)

_TYPES = {
    401: "authentication_error",
    429: "rate_limit_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_error",
    504: "server_error",
}
FINISH = {sampling_pb2.STOP_REASON_STOP: "stop", sampling_pb2.STOP_REASON_LENGTH: "length"}
DEFAULT_MAX_TOKENS = 1024


class HTTPError(Exception):
    """An error with an HTTP status and an OpenAI error code."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    grpc_status: str | None = None,
) -> JSONResponse:
    """An error in OpenAI's JSON shape, plus `status`: the gRPC status name of the same
    error, so a client (our agents) maps HTTP and gRPC failures to the same exception."""
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
            "status": grpc_status or from_http(status, message).code,
        }
    }
    return JSONResponse(body, status_code=status)


def domain_error_response(e: HeadwayError) -> JSONResponse:
    """The HTTP answer for a domain or upstream error, at the status its class names."""
    code = "model_not_found" if e.http_status == 404 else None
    if isinstance(e, Overloaded):
        code = "overloaded"
    response = error_response(e.http_status, e.message, code, grpc_status=e.code)
    if isinstance(e, Overloaded):
        # At capacity right now: 429 with when to retry, which the openai client (and
        # most HTTP clients) honour with a backoff.
        ms = e.retry_after_ms
        response.headers["retry-after-ms"] = str(ms)
        response.headers["retry-after"] = str(max(1, -(-ms // 1000)))
    return response


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


def create_app(gateway: Gateway) -> Any:
    """The FastAPI app (wrapped in the body limit) for one gateway."""
    app = FastAPI(title="Headway gateway", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizers: dict[str, Tokenizer] = {}

    def tokenizer_for(model: str) -> Tokenizer:
        base = gateway.store.get_model(model).base
        if base not in tokenizers:
            tokenizers[base] = Tokenizer.from_dir(gateway.store.get_model(base).path)
        return tokenizers[base]

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        return error_response(e.status, e.message, e.code, e.param)

    @app.exception_handler(HeadwayError)
    async def _domain_error(request: Request, e: HeadwayError) -> JSONResponse:
        return domain_error_response(e)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def _upstream_error(request: Request, e: grpc.aio.AioRpcError) -> JSONResponse:
        name = e.code().name
        return domain_error_response(from_status(name, e.details() or name, pushback_ms(e)))

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, e: ValueError) -> JSONResponse:
        return error_response(400, str(e))

    def team_of(request: Request) -> str:
        return gateway.team([("authorization", request.headers.get("authorization", ""))])

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError as e:
            raise HTTPError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "request body must be a JSON object")
        return body

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        team = team_of(request)
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

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        team = team_of(request)
        body = await body_of(request)
        model = _required_str(body, "model")
        gateway.model(model, team)
        tok = tokenizer_for(model)
        if body.get("prompt_token_ids") is not None:
            prompt = _token_list(body["prompt_token_ids"], "prompt_token_ids")
        else:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise HTTPError(400, "messages must be a non-empty list", param="messages")
            prompt = tok.apply_chat_template(
                [_message(m, i) for i, m in enumerate(messages)], add_generation_prompt=True
            )
        run = partial(_complete, gateway, tok, body, model, team, prompt, chat=True)
        return await _once(gateway, request, team, body, run)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        team = team_of(request)
        body = await body_of(request)
        model = _required_str(body, "model")
        gateway.model(model, team)
        tok = tokenizer_for(model)
        raw = body.get("prompt_token_ids", body.get("prompt"))
        if isinstance(raw, str):
            prompt = tok.encode(raw)
        elif isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw):
            prompt = _token_list(raw, "prompt")
        else:
            raise HTTPError(400, "prompt must be a string or a list of token ids", param="prompt")
        body.setdefault("max_tokens", 16)  # OpenAI's default for completions
        run = partial(_complete, gateway, tok, body, model, team, prompt, chat=False)
        return await _once(gateway, request, team, body, run)

    return BodyLimit(app, gateway.config.max_body_bytes)


async def _once(
    gateway: Gateway,
    request: Request,
    team: str,
    body: dict[str, Any],
    run: Callable[[], Awaitable[Any]],
) -> Any:
    """The reply of `run()`, run at most once per Idempotency-Key when the request records
    a trace.

    Without a key, or without `return_token_ids` (a plain sample changes nothing, so a
    repeat is harmless), the request just runs.
    """
    key = request.headers.get(replies.HEADER)
    if key is None or not body.get("return_token_ids"):
        return await run()
    if body.get("stream"):
        raise HTTPError(
            400,
            "Idempotency-Key is supported on non-streaming requests: drop stream, or the key",
            param="stream",
        )
    key, digest = replies.check_key(key), replies.body_digest(body)
    stored = await gateway.replies.claim(team, key, digest)
    if stored is not None:
        return stored
    try:
        out = await run()
    except BaseException:
        await gateway.replies.release(team, key)
        raise
    try:
        await gateway.replies.store(team, key, digest, out)
    except Exception:
        # The turn is recorded: answer it anyway (a retry would find the key still
        # claimed, 409, rather than record the turn twice).
        log.exception("could not store the reply of an Idempotency-Key request")
    return out


def _required_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise HTTPError(400, f"{name} is required (a string)", param=name)
    return value


def _token_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(t, int) for t in value):
        raise HTTPError(400, f"{name} must be a non-empty list of token ids", param=name)
    return value


def _message(m: Any, i: int) -> dict[str, Any]:
    if not isinstance(m, dict) or "role" not in m:
        raise HTTPError(400, f"messages[{i}] must be an object with a role", param="messages")
    content = m.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return {**m, "content": content if content is not None else ""}


def _params(body: dict[str, Any], prompt_len: int, context: int) -> common_pb2.SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, context - prompt_len))
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    params = common_pb2.SamplingParams(
        max_tokens=int(max_tokens), n=int(body.get("n") or 1), stop=stops
    )
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            setattr(params, name, float(body[name]))
    if body.get("top_k") is not None:
        params.top_k = int(body["top_k"])
    if body.get("seed") is not None:
        params.seed = int(body["seed"])
    if body.get("ignore_eos"):
        params.ignore_eos = True
    return params


def _token_logprobs(tok: Tokenizer, ids: list[int], lps: list[float]) -> dict[str, Any]:
    content = []
    for t, lp in zip(ids, lps, strict=True):
        piece = tok.decode([t])
        content.append(
            {"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": []}
        )
    return {"content": content}


async def _record(
    gateway: Gateway,
    body: dict[str, Any],
    model: str,
    team: str,
    prompt: list[int],
    ids: list[int],
    lps: list[float],
    checkpoint: str,
    n: int,
) -> str:
    turn = common_pb2.Turn(
        prompt_tokens=to_tensor(prompt, common_pb2.DTYPE_INT32),
        completion_tokens=to_tensor(ids, common_pb2.DTYPE_INT32),
        completion_logprobs=to_tensor(lps, common_pb2.DTYPE_FLOAT32),
        checkpoint=checkpoint,
    )
    continued = body.get("trace_id") or ""
    if continued and n != 1:
        raise InvalidArgument("trace_id continues one trajectory: use it with n = 1")
    trace_id, _ = await gateway.traces.record_turn(continued, model, team, turn)
    return trace_id


async def _complete(
    gateway: Gateway,
    tok: Tokenizer,
    body: dict[str, Any],
    model: str,
    team: str,
    prompt: list[int],
    *,
    chat: bool,
) -> Any:
    record = gateway.store.get_model(model)
    params = _params(body, len(prompt), int(record.arch["max_context"]))
    request = sampling_pb2.SampleRequest(
        model=model,
        prompt_tokens=to_tensor(prompt, common_pb2.DTYPE_INT32),
        params=params,
        checkpoint=str(body.get("checkpoint") or ""),
    )
    want_ids = bool(body.get("return_token_ids"))
    want_lps = bool(body.get("logprobs")) or want_ids
    created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    if body.get("stream"):
        return StreamingResponse(
            _stream(gateway, tok, body, request, team, prompt, chat, want_ids, created, rid),
            media_type="text/event-stream",
        )
    reply = await gateway.sample(request, team, timeout=None)
    choices, completion_tokens, traces = [], 0, []
    for i, seq in enumerate(reply.sequences):
        ids = np.frombuffer(seq.tokens.data, np.int32).tolist()
        lps = np.frombuffer(seq.logprobs.data, np.float32).tolist()
        completion_tokens += len(ids)
        choice: dict[str, Any] = {"index": i, "finish_reason": FINISH.get(seq.stop_reason, "stop")}
        if chat:
            choice["message"] = {"role": "assistant", "content": seq.text}
        else:
            choice["text"] = seq.text
        choice["logprobs"] = _token_logprobs(tok, ids, lps) if want_lps else None
        if want_ids:
            choice["token_ids"] = ids
            choice["prompt_token_ids"] = prompt
            choice["trace_id"] = await _record(
                gateway, body, model, team, prompt, ids, lps, reply.checkpoint, len(reply.sequences)
            )
            traces.append(choice["trace_id"])
        choices.append(choice)
    out: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "checkpoint": reply.checkpoint,
        "usage": {
            "prompt_tokens": len(prompt),
            "completion_tokens": completion_tokens,
            "total_tokens": len(prompt) + completion_tokens,
        },
    }
    if want_ids:
        out["prompt_token_ids"] = prompt
        if len(traces) == 1:
            out["trace_id"] = traces[0]
    return out


async def _stream(
    gateway: Gateway,
    tok: Tokenizer,
    body: dict[str, Any],
    request: Any,
    team: str,
    prompt: list[int],
    chat: bool,
    want_ids: bool,
    created: int,
    rid: str,
) -> AsyncIterator[bytes]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    per: dict[int, tuple[list[int], list[float]]] = {}
    checkpoint = request.checkpoint

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
        async for chunk in gateway.sample_stream(request, team, timeout=None):
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
            if chat:
                delta: dict[str, Any] = {"content": chunk.text}
                if first:
                    delta["role"] = "assistant"
                choice["delta"] = delta
            else:
                choice["text"] = chunk.text
            if want_ids:
                choice["token_ids"] = ids
            if chunk.stop_reason:
                choice["finish_reason"] = FINISH.get(chunk.stop_reason, "stop")
                if want_ids:
                    choice["trace_id"] = await _record(
                        gateway,
                        body,
                        request.model,
                        team,
                        prompt,
                        seen[0],
                        seen[1],
                        checkpoint,
                        request.params.n or 1,
                    )
            yield event(choice, **({"prompt_token_ids": prompt} if want_ids and first else {}))
    except (HeadwayError, grpc.aio.AioRpcError) as e:
        message = e.message if isinstance(e, HeadwayError) else (e.details() or "")
        error = {"error": {"message": message, "type": "server_error"}}
        yield f"data: {json.dumps(error)}\n\n".encode()
    yield b"data: [DONE]\n\n"
