"""The services' log lines: text or JSON, each naming the call it belongs to.

`--log-format json` (`HEADWAY_LOG_FORMAT`) writes one JSON object per line: `time` (UTC,
ISO 8601), `level`, `logger`, `message`, `service`, and the fields of the call being
served: `request_id`, `method`, `team`, `model` (absent outside a call: start-up, the
engine thread's own lines; `exception` with a traceback when there is one).

The call's fields live in a context variable (`bind`), set by the outermost server
interceptor (`headway.server.metrics`: request id and method), by whoever learns the team
(a backend from the gateway's metadata, the gateway from the API key) and by the request
parsers (the request's `model`). asyncio runs each call in a task of its own, and
`asyncio.to_thread` copies the context, so every line a call's code logs carries them;
background work a call starts clears them (`clear`).

The request id is the caller's `x-request-id` (gRPC metadata, or the HTTP header of the
OpenAI API) or a new one; the gateway passes it to the trainer and samplers, so one call's
lines share it across services.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
_NAMING = ("AddBaseRequest", "ForkModelRequest")  # requests whose `name` is a model's
FORMATS = ("text", "json")
# The current call's fields; replaced (never changed in place) by `bind`, so a task or thread
# that copied the context keeps the fields it had.
_CALL: ContextVar[Mapping[str, str]] = ContextVar("headway_call", default=MappingProxyType({}))


def begin(request_id: str, method: str) -> None:
    """Start a call's log fields afresh (nothing of an earlier call on the same task or
    connection stays): its request id and method."""
    _CALL.set(MappingProxyType({"request_id": request_id, "method": method}))


def clear() -> None:
    """No call's fields (for background work a call happened to start)."""
    _CALL.set(MappingProxyType({}))


def bind(**fields: str) -> None:
    """Add `fields` (request_id, method, team, model) to the current call's log fields."""
    _CALL.set(MappingProxyType({**_CALL.get(), **{k: v for k, v in fields.items() if v}}))


def call_fields() -> Mapping[str, str]:
    """The current call's log fields (empty outside a call)."""
    return _CALL.get()


def request_id_of(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The caller's x-request-id (at most 128 characters of it), else a new id."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and value:
            return value[:128]
    return secrets.token_hex(8)


def model_of(message: Any) -> str:
    """The model a request message names: its `model` field, or the `name` of the model
    AddBase / ForkModel create; "" for one that names none."""
    value = getattr(message, "model", "")
    if not value and type(message).__name__ in _NAMING:
        value = getattr(message, "name", "")
    return value if isinstance(value, str) else ""


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the service and the current call's fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service,
        }
        out.update(getattr(record, "call", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _CallFields(logging.Filter):
    """Copies the call's fields onto each record when it is made (in the call's context:
    a handler may format it later, elsewhere)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.call = dict(_CALL.get())
        return True


def setup(level: str, fmt: str, service: str) -> None:
    """Configure the root logger: `fmt` "text" (the default) or "json"."""
    if fmt not in FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "text":
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(service))
    handler.addFilter(_CallFields())
    logging.basicConfig(level=level, handlers=[handler])
