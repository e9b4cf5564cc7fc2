"""Traces: trajectories the platform holds in Redis, so training can refer to them by id.

A trace is a `Trajectory` stored server-side: the turns of one episode (prompt token ids,
completion token ids, completion logprobs, checkpoint), recorded as they are sampled, plus a
reward attached later. It belongs to the team that started it and lives for a fixed
retention counted from its creation; after that it is NOT_FOUND, exactly like an unknown id
or another team's trace.

Storage layout (every key under the deployment's prefix, e.g. "headway:"):

    <prefix>trace:<id>           hash  model, team, created, expires (ms since the epoch,
                                       Redis' clock), reward (repr of a float), has_reward
                                       ("0" / "1")
    <prefix>trace:<id>:turns     list  one serialized `Turn` (protobuf bytes) per turn, in
                                       order; a turn's index is its position in the list
    <prefix>tracereq:<digest>    str   "<trace id> <turn index>": the reply of a RecordTurn
                                       that carried a request_id (digest = sha256 of team,
                                       trace id and request id)

Why this shape:

* Turns are appended, never rewritten, so a list makes RecordTurn an O(1) RPUSH whose
  return value is the turn's index. The serialized protobuf keeps the client's tensors
  bytes-exact (dtype, shape and data untouched) and compact, with no decoding on the way in.
* The metadata is a small hash so SetReward updates two fields without touching the turns.
* Every key of a trace (and its idempotency keys) carries the same absolute deadline,
  `created + retention`, set with PEXPIREAT / PXAT on every write. Redis drops expired
  traces by itself (no sweeper), and the keys can never outlive each other.
* Each write is one Lua script, atomic in Redis: the ownership check, the append and the
  expiry happen together, so a trace that expires between a check and a write cannot be
  half re-created (a turns list without its hash, or a hash without a deadline). Reads take
  the hash and the list in one read-only script, so a reply never mixes two states (and,
  unlike MULTI/EXEC, reads still work when Redis is full under `noeviction`).
* `created` comes from Redis' TIME, the clock that enforces the expiry, so `expires` in a
  reply is exactly when the trace disappears, whichever gateway replica wrote it.

Caps, so that one team cannot fill Redis (each RESOURCE_EXHAUSTED, changing nothing): a
turn's serialized size (`max_turn_bytes`, checked before Redis), the turns of one trace
(`max_turns`) and the team's bytes across its live traces and stored replies (a
`gateway.quota.TeamQuota`, counted and checked in the same script as the append).

Gateway code: imports no torch (numpy through `headway.tensors` only).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from gateway.config import GatewayConfig
from gateway.quota import LUA, OVERHEAD, TeamQuota
from headway.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from headway.server.heads import DEFAULT_PREFIX
from headway.server.turns import turn_arrays
from headway.v1 import common_pb2, trace_pb2

# `tr-` + 96 random bits in hex. Ids that do not have this shape are NOT_FOUND without a
# Redis round trip, which also keeps client input from forming other keys ("x:turns").
_TRACE_ID = re.compile(r"tr-[0-9a-f]{24}")
_NEW_ID_ATTEMPTS = 5

# KEYS: trace hash, turns list, [request key]
# ARGV: mode ("new" | "append"), team, model ("" = the trace's, when appending), turn bytes,
#       retention in ms, trace id, max turns per trace, bytes the turn counts for the team,
#       then the team quota's four arguments (gateway.quota)
# Returns {"ok", "<id> <index>"}, {"dup", "<id> <index>"} (the stored reply of the same
# request_id), {"missing"} (unknown, expired or another team's), {"model", <trace's model>},
# {"taken"} (a new id that already exists: pick another), {"full", <turns>} (the trace has
# max turns) or {"quota", <team's bytes>} (the turn would pass the team's cap). Every
# check comes before the first write: a refused turn changes nothing.
_RECORD_TURN = (
    LUA
    + """
local req = KEYS[3]
if req then
  local prev = redis.call('GET', req)
  if prev then return {'dup', prev} end
end
local now = quota_now()
local q = quota_of(ARGV, 9)
local deadline
if ARGV[1] == 'new' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return {'taken'} end
  deadline = string.format('%.0f', now + tonumber(ARGV[5]))
else
  local meta = redis.call('HMGET', KEYS[1], 'team', 'model', 'expires')
  if not meta[1] or meta[1] ~= ARGV[2] then return {'missing'} end
  if ARGV[3] ~= '' and ARGV[3] ~= meta[2] then return {'model', meta[2]} end
  local turns = redis.call('LLEN', KEYS[2])
  if turns >= tonumber(ARGV[7]) then return {'full', string.format('%d', turns)} end
  deadline = meta[3]
end
local size = tonumber(ARGV[8])
if not quota_fits(q, now, size) then
  return {'quota', string.format('%.0f', quota_used(q, now))}
end
if ARGV[1] == 'new' then
  redis.call('HSET', KEYS[1], 'model', ARGV[3], 'team', ARGV[2],
             'created', string.format('%.0f', now), 'expires', deadline,
             'reward', '0', 'has_reward', '0')
end
quota_add(q, deadline, size)
local index = redis.call('RPUSH', KEYS[2], ARGV[4]) - 1
redis.call('PEXPIREAT', KEYS[1], deadline)
redis.call('PEXPIREAT', KEYS[2], deadline)
local reply = ARGV[6] .. ' ' .. string.format('%d', index)
if req then redis.call('SET', req, reply, 'NX', 'PXAT', deadline) end
return {'ok', reply}
"""
)

# KEYS: trace hash, turns list. ARGV: team, reward (a finite float's repr).
# Returns {} when the trace is unknown, expired or another team's, else
# {flat HGETALL of the hash, the turns} read after the write.
_SET_REWARD = """
local meta = redis.call('HMGET', KEYS[1], 'team', 'expires')
if not meta[1] or meta[1] ~= ARGV[1] then return {} end
redis.call('HSET', KEYS[1], 'reward', ARGV[2], 'has_reward', '1')
redis.call('PEXPIREAT', KEYS[1], meta[2])
redis.call('PEXPIREAT', KEYS[2], meta[2])
return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
"""

# KEYS: trace hash, turns list. Returns {flat HGETALL of the hash, the turns}: both in one
# atomic step. A script that only reads, rather than MULTI/EXEC, because Redis refuses to
# queue commands in a MULTI once it is at maxmemory: traces stay readable when it is full.
_READ = """
return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
"""
# The metadata and the last turn only (a turn that continues a trajectory needs no more).
_READ_LAST = """
return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], -1, -1)}
"""


def _not_found(trace_id: str) -> NotFound:
    # One message for unknown, expired and another team's trace: existence never leaks.
    return NotFound(
        f"trace '{trace_id}' not found: it does not exist, has expired or belongs to another "
        "team; start a new trace with an empty trace_id"
    )


def validate_turn(turn: common_pb2.Turn, what: str = "turn") -> int:
    """Check a `Turn` with the trainer's own validator (`headway.server.turns`), so a recorded turn
    is one the trainer accepts; return its number of completion tokens."""
    return len(turn_arrays(turn, what)[1])


def _timestamp(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


class TraceStore:
    """Traces in Redis: record turns, attach a reward, read them back (see the module doc).

    `redis` is a `redis.asyncio.Redis` client that returns bytes (decode_responses off:
    turns are binary). `prefix` namespaces every key; `retention_seconds` (> 0) is how long
    a trace lives after its first turn, however often it is written to. Caps: a turn of
    more than `max_turn_bytes` (serialized), a trace of more than `max_turns` turns, and a
    team over its `quota` are RESOURCE_EXHAUSTED; the default quota counts with no cap.
    """

    def __init__(
        self,
        redis: Any,
        prefix: str = DEFAULT_PREFIX,
        retention_seconds: float = GatewayConfig.trace_retention_seconds,
        *,
        max_turn_bytes: int = GatewayConfig.max_turn_bytes,
        max_turns: int = GatewayConfig.max_trace_turns,
        quota: TeamQuota | None = None,
    ) -> None:
        if not math.isfinite(retention_seconds) or retention_seconds <= 0:
            raise ValueError(f"retention_seconds is {retention_seconds}: it must be > 0")
        if max_turn_bytes < 1 or max_turns < 1:
            raise ValueError("max_turn_bytes and max_turns must be >= 1")
        kwargs = getattr(getattr(redis, "connection_pool", None), "connection_kwargs", {})
        if kwargs.get("decode_responses"):
            raise ValueError("TraceStore needs a Redis client with decode_responses=False")
        self.redis = redis
        self.prefix = prefix
        self.retention_seconds = retention_seconds
        self.max_turn_bytes, self.max_turns = max_turn_bytes, max_turns
        self.quota = quota or TeamQuota.for_retention(prefix, 0, retention_seconds)
        self.quota.check_covers(retention_seconds, "traces")
        self._retention_ms = max(1, round(retention_seconds * 1000))
        self._record_turn = redis.register_script(_RECORD_TURN)
        self._set_reward = redis.register_script(_SET_REWARD)
        self._read = redis.register_script(_READ)
        self._read_last = redis.register_script(_READ_LAST)

    # ------------------------------------------------------------------------ keys

    def key(self, trace_id: str) -> str:
        """The hash of a trace's metadata."""
        return f"{self.prefix}trace:{trace_id}"

    def turns_key(self, trace_id: str) -> str:
        """The list of a trace's serialized turns."""
        return f"{self.prefix}trace:{trace_id}:turns"

    def request_key(self, team: str, trace_id: str, request_id: str) -> str:
        """The key remembering the reply of a RecordTurn with a request_id.

        Hashed so that any team, trace id ("" for a new trace) and request id, whatever
        characters they hold, map to one fixed-shape key without ambiguity.
        """
        digest = hashlib.sha256(json.dumps([team, trace_id, request_id]).encode()).hexdigest()
        return f"{self.prefix}tracereq:{digest[:32]}"

    # ---------------------------------------------------------------------- writes

    async def record_turn(
        self,
        trace_id: str,
        model: str,
        team: str,
        turn: common_pb2.Turn,
        request_id: str = "",
    ) -> tuple[str, int]:
        """Append `turn` to a trace of `team`; return (trace_id, 0-based turn index).

        An empty `trace_id` starts a new trace of `model` (required then). Otherwise the
        trace must exist and belong to `team` (else NotFound), and `model`, when given,
        must be the trace's (else InvalidArgument). The turn is validated first
        (`validate_turn`) and stored bytes-exact. With a `request_id`, a retry of the same
        (team, trace_id, request_id) returns the first reply and appends nothing. Over a
        cap (the turn's size, the trace's turns, the team's bytes): ResourceExhausted.
        """
        validate_turn(turn)
        if trace_id:
            if not _TRACE_ID.fullmatch(trace_id):
                raise _not_found(trace_id)
        elif not model:
            raise InvalidArgument("model is empty: name the model that sampled the turn")
        stored = common_pb2.Turn()
        stored.CopyFrom(turn)
        stored.DiscardUnknownFields()
        data = stored.SerializeToString()
        if len(data) > self.max_turn_bytes:
            raise ResourceExhausted(
                f"the turn is {len(data)} bytes serialized, over the limit of "
                f"{self.max_turn_bytes} bytes per recorded turn (max_turn_bytes): record "
                "shorter turns"
            )
        size = len(data) + OVERHEAD
        req = [self.request_key(team, trace_id, request_id)] if request_id else []

        for _ in range(_NEW_ID_ATTEMPTS):
            tid = trace_id or f"tr-{secrets.token_hex(12)}"
            reply = await self._record_turn(
                keys=[self.key(tid), self.turns_key(tid), *req],
                args=[
                    "append" if trace_id else "new",
                    team,
                    model,
                    data,
                    self._retention_ms,
                    tid,
                    self.max_turns,
                    size,
                    *self.quota.lua_args(team),
                ],
            )
            status = reply[0].decode()
            if status in ("ok", "dup"):
                got_id, index = reply[1].decode().split(" ")
                return got_id, int(index)
            if status == "missing":
                raise _not_found(trace_id)
            if status == "model":
                theirs = reply[1].decode()
                raise InvalidArgument(
                    f"model '{model}' is not the model of trace '{trace_id}', which is "
                    f"'{theirs}': a trace holds the turns of one model; leave model empty or "
                    "start a new trace"
                )
            if status == "full":
                raise ResourceExhausted(
                    f"trace '{trace_id}' has {int(reply[1])} turns, the limit per trace "
                    "(max_trace_turns): start a new trace for the rest of the episode"
                )
            if status == "quota":
                raise ResourceExhausted(self.quota.exceeded(int(reply[1]), size, "this turn"))
            # "taken": 96 random bits collided with a live trace; draw again.
        raise RuntimeError("could not draw an unused trace id")

    async def set_reward(self, trace_id: str, team: str, reward: float) -> trace_pb2.Trace:
        """Attach `reward` (finite) to a trace of `team`, replacing any earlier one.

        Returns the trace as stored after the write. InvalidArgument for a non-finite
        reward; NotFound for an unknown, expired or another team's trace.
        """
        reward = float(reward)
        if not math.isfinite(reward):
            raise InvalidArgument(f"reward is {reward}: it must be finite (0 is a valid reward)")
        if not _TRACE_ID.fullmatch(trace_id):
            raise _not_found(trace_id)
        reply = await self._set_reward(
            keys=[self.key(trace_id), self.turns_key(trace_id)], args=[team, repr(reward)]
        )
        if not reply:
            raise _not_found(trace_id)
        flat, turns = reply
        meta = dict(zip(flat[::2], flat[1::2], strict=True))
        return self._trace(trace_id, team, meta, turns)

    # ----------------------------------------------------------------------- reads

    async def get(self, trace_id: str, team: str) -> trace_pb2.Trace:
        """The trace `trace_id` of `team`; NotFound if unknown, expired or another team's."""
        if not _TRACE_ID.fullmatch(trace_id):
            raise _not_found(trace_id)
        meta, turns = await self._read(keys=[self.key(trace_id), self.turns_key(trace_id)])
        return self._trace(trace_id, team, dict(zip(meta[::2], meta[1::2], strict=True)), turns)

    async def last_turn(self, trace_id: str, team: str) -> tuple[str, common_pb2.Turn | None]:
        """(model, last turn or None) of the trace `trace_id` of `team`, reading that turn
        alone; NotFound as `get`."""
        if not _TRACE_ID.fullmatch(trace_id):
            raise _not_found(trace_id)
        meta, turns = await self._read_last(keys=[self.key(trace_id), self.turns_key(trace_id)])
        trace = self._trace(trace_id, team, dict(zip(meta[::2], meta[1::2], strict=True)), turns)
        return trace.model, (trace.turns[-1] if trace.turns else None)

    async def trajectory(self, trace_id: str, team: str) -> common_pb2.Trajectory:
        """The trace as a training `Trajectory` (with trace_id set).

        NotFound if unknown, expired or another team's; FailedPrecondition if no reward
        was attached yet.
        """
        trace = await self.get(trace_id, team)
        if not trace.has_reward:
            raise FailedPrecondition(
                f"trace '{trace_id}' has no reward yet: attach one with SetReward before "
                "training on it"
            )
        return common_pb2.Trajectory(turns=trace.turns, reward=trace.reward, trace_id=trace_id)

    def _trace(
        self, trace_id: str, team: str, meta: dict[bytes, bytes], turns: list[bytes]
    ) -> trace_pb2.Trace:
        """Build a `Trace` from the raw hash and list, checking ownership."""
        if b"team" not in meta or meta[b"team"].decode() != team:
            raise _not_found(trace_id)
        return trace_pb2.Trace(
            trace_id=trace_id,
            model=meta[b"model"].decode(),
            turns=[common_pb2.Turn.FromString(raw) for raw in turns],
            reward=float(meta[b"reward"]),
            has_reward=meta[b"has_reward"] == b"1",
            created=_timestamp(int(meta[b"created"])),
            expires=_timestamp(int(meta[b"expires"])),
        )
