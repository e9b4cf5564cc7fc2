"""Idempotent HTTP completions: a retried request that records a trace is answered once.

A chat or text completion with `return_token_ids` has a side effect: it appends a turn to
a trace, and the trace is training data. HTTP clients retry on timeouts and 5xx (the
`openai` client does, twice by default), so without a key a retry would sample again and
record a second turn the client never saw. With an `Idempotency-Key` header (the
convention of Stripe and the IETF draft; our agents send one per turn), the first request
claims the key, and once it succeeds its whole reply is stored: a repeat with the same
key and body gets that reply back, byte for byte the same tokens and trace id, and
nothing is sampled or recorded again.

    <prefix>httpreq:<sha256(team, key)>  str  JSON {"body": sha256 of the request body,
                                               "reply": the stored reply} once answered;
                                               {"body": ...} while the first is in flight

- A repeat while the first request is still running is ABORTED (HTTP 409, which the
  `openai` client itself retries after a backoff); the claim lapses after
  `pending_seconds` if the gateway that held it died, so a key is never stuck.
- The same key with another body is INVALID_ARGUMENT: a key names one request.
- A request that fails releases its claim, so its retry runs afresh (nothing was recorded).
- Stored replies expire after `ttl_seconds` (a day by default), like Stripe's keys.

Gateway code: no torch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from headway.errors import Aborted, InvalidArgument

HEADER = "idempotency-key"
MAX_KEY_LENGTH = 255
DEFAULT_TTL_SECONDS = 24 * 3600
DEFAULT_PENDING_SECONDS = 300


def body_digest(body: dict[str, Any]) -> str:
    """A digest of a JSON body that ignores key order and whitespace."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_key(key: str) -> str:
    """The key if it is 1..255 printable ASCII characters; INVALID_ARGUMENT otherwise."""
    if not 0 < len(key) <= MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in key):
        raise InvalidArgument(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters "
            "(a UUID is a good key)"
        )
    return key


class ReplyCache:
    """Claims, stores and replays replies by (team, Idempotency-Key), in Redis."""

    def __init__(
        self,
        redis: Any,
        prefix: str,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        pending_seconds: int = DEFAULT_PENDING_SECONDS,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.pending_seconds = pending_seconds

    def _key(self, team: str, key: str) -> str:
        # Hashed: the client's key never forms Redis key syntax, and teams never collide.
        digest = hashlib.sha256(f"{team}\0{key}".encode()).hexdigest()
        return f"{self.prefix}httpreq:{digest}"

    async def claim(self, team: str, key: str, digest: str) -> dict[str, Any] | None:
        """None if this request now owns `key` (run it, then `store` or `release`); the
        stored reply if the same request was answered before. Raises Aborted while the
        first is in flight, InvalidArgument if the key was used with another body."""
        name = self._key(team, key)
        pending = json.dumps({"body": digest})
        for _ in range(2):  # a claim that lapses between SET NX and GET: claim again
            if await self.redis.set(name, pending, nx=True, ex=self.pending_seconds):
                return None
            raw = await self.redis.get(name)
            if raw is None:
                continue
            held = json.loads(raw)
            if held.get("body") != digest:
                raise InvalidArgument(
                    "this Idempotency-Key was used with a different request body; "
                    "send a new key for a new request"
                )
            if "reply" not in held:
                raise Aborted(
                    "a request with this Idempotency-Key is still in progress; retry once it "
                    "has finished to get its reply"
                )
            return held["reply"]
        raise Aborted("this Idempotency-Key is being claimed concurrently; retry")

    async def store(self, team: str, key: str, digest: str, reply: dict[str, Any]) -> None:
        """Keep the reply of the request that claimed `key` for `ttl_seconds`."""
        value = json.dumps({"body": digest, "reply": reply})
        await self.redis.set(self._key(team, key), value, ex=self.ttl_seconds)

    async def release(self, team: str, key: str) -> None:
        """Give the claim up (the request failed): a retry runs afresh."""
        await self.redis.delete(self._key(team, key))
