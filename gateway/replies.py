"""Idempotent HTTP completions: a retried request that records a trace is answered once.

A chat or text completion with `return_token_ids` has a side effect: it appends a turn to
a trace, and the trace is training data. HTTP clients retry on timeouts and 5xx (the
`openai` client does, twice by default), so without a key a retry would sample again and
record a second turn the client never saw. With an `Idempotency-Key` header (the
convention of Stripe and the IETF draft; our agents send one per turn), the first request
claims the key, and once it succeeds its whole reply is stored: a repeat with the same
key and body gets that reply back, byte for byte the same tokens and trace id, and
nothing is sampled or recorded again.

    <prefix>httpreq:<sha256(team, key)>  str  while the first request runs: {"body": sha256
                                               of the request body} (JSON); once answered:
                                               that line, a newline, then the reply's JSON
                                               bytes exactly as they were sent

- A repeat while the first request is still running is ABORTED (HTTP 409, which the
  `openai` client itself retries after a backoff); the claim lapses after
  `pending_seconds` if the gateway that held it died, so a key is never stuck.
- The same key with another body is INVALID_ARGUMENT: a key names one request.
- A request that fails releases its claim, so its retry runs afresh (nothing was recorded).
- Stored replies expire after `ttl_seconds` (a day by default), like Stripe's keys.
- A reply over `max_reply_bytes`, or one that would take the team past its Redis quota
  (`gateway.quota`), is answered but not kept: the key then holds a small note instead,
  {"body": ..., "dropped": why, "trace_ids": [...]}, and a repeat is FAILED_PRECONDITION
  naming the traces its turns went to. It is never run twice: its turns were recorded.

Gateway code: no torch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from gateway.config import GatewayConfig
from gateway.quota import LUA, OVERHEAD, TeamQuota
from headway.errors import Aborted, FailedPrecondition, InvalidArgument

HEADER = "idempotency-key"
MAX_KEY_LENGTH = 255
DEFAULT_TTL_SECONDS = 24 * 3600
DEFAULT_PENDING_SECONDS = 300

# KEYS: the reply key. ARGV: the value to keep ("" = too large: keep the note), the note,
# ttl in ms, per-item overhead, then the team quota's four arguments (gateway.quota).
# Keeps the value if the team's quota has room for it, else the note (small, kept and
# counted regardless, so a repeat is told what happened); returns "reply" or "note".
_STORE = (
    LUA
    + """
local q = quota_of(ARGV, 5)
local now = quota_now()
local deadline = now + tonumber(ARGV[3])
local kept, value = 'note', ARGV[2]
if ARGV[1] ~= '' and quota_fits(q, now, #ARGV[1] + tonumber(ARGV[4])) then
  kept, value = 'reply', ARGV[1]
end
redis.call('SET', KEYS[1], value, 'PXAT', string.format('%.0f', deadline))
quota_add(q, deadline, #value + tonumber(ARGV[4]))
return kept
"""
)


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
        *,
        max_reply_bytes: int = GatewayConfig.max_stored_reply_bytes,
        quota: TeamQuota | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.pending_seconds = pending_seconds
        self.max_reply_bytes = max_reply_bytes
        self.quota = quota or TeamQuota.for_retention(prefix, 0, ttl_seconds)
        self.quota.check_covers(ttl_seconds, "stored replies")
        self._store = redis.register_script(_STORE)

    def _key(self, team: str, key: str) -> str:
        # Hashed: the client's key never forms Redis key syntax, and teams never collide.
        digest = hashlib.sha256(f"{team}\0{key}".encode()).hexdigest()
        return f"{self.prefix}httpreq:{digest}"

    async def claim(self, team: str, key: str, digest: str) -> bytes | None:
        """None if this request now owns `key` (run it, then `store` or `release`); the
        stored reply (its JSON bytes) if the same request was answered before. Raises
        Aborted while the first is in flight, InvalidArgument if the key was used with
        another body, FailedPrecondition if the reply was answered but not kept."""
        name = self._key(team, key)
        pending = json.dumps({"body": digest})
        for _ in range(2):  # a claim that lapses between SET NX and GET: claim again
            if await self.redis.set(name, pending, nx=True, ex=self.pending_seconds):
                return None
            raw = await self.redis.get(name)
            if raw is None:
                continue
            head, newline, reply = raw.partition(b"\n")
            held = json.loads(head)
            if held.get("body") != digest:
                raise InvalidArgument(
                    "this Idempotency-Key was used with a different request body; "
                    "send a new key for a new request"
                )
            if newline:
                return reply
            if "dropped" in held:
                traces = ", ".join(held.get("trace_ids") or []) or "none"
                raise FailedPrecondition(
                    f"the request with this Idempotency-Key was answered, but its reply was "
                    f"not kept ({held['dropped']}), so it cannot be replayed; its turns were "
                    f"recorded in trace(s) {traces}: read them with GetTrace. Send a new key "
                    "for a new request"
                )
            if "reply" in held:  # written by an older gateway: one JSON document
                return json.dumps(held["reply"]).encode()
            raise Aborted(
                "a request with this Idempotency-Key is still in progress; retry once it "
                "has finished to get its reply"
            )
        raise Aborted("this Idempotency-Key is being claimed concurrently; retry")

    async def store(
        self, team: str, key: str, digest: str, reply: bytes, trace_ids: list[str]
    ) -> bool:
        """Keep `reply` (JSON bytes) for `ttl_seconds` as the answer of the request that
        claimed `key`; True if it was kept, False if only the note that it was dropped
        (too large, or the team is at its quota) was."""
        head = json.dumps({"body": digest}).encode()
        value = head + b"\n" + reply
        note: dict[str, Any] = {"body": digest, "trace_ids": trace_ids}
        if len(reply) > self.max_reply_bytes:
            note["dropped"] = (
                f"{len(reply)} bytes, over the limit of {self.max_reply_bytes} "
                "(max_stored_reply_bytes)"
            )
            value = b""
        else:
            note["dropped"] = "the team's data in Redis is at its limit (max_team_redis_bytes)"
        kept = await self._store(
            keys=[self._key(team, key)],
            args=[
                value,
                json.dumps(note).encode(),
                self.ttl_seconds * 1000,
                OVERHEAD,
                *self.quota.lua_args(team),
            ],
        )
        return kept == b"reply"

    async def release(self, team: str, key: str) -> None:
        """Give the claim up (the request failed): a retry runs afresh."""
        await self.redis.delete(self._key(team, key))
