"""The Tinker API's state in Redis: sessions, sampling sessions, checkpoint names, futures.

A deployment runs several gateways behind a load balancer, and the SDK's calls of one
session may reach any of them; so whatever a later call needs is in Redis, not in the
process that took the first call:

    <prefix>tinker:session:<sid>             str   team; expires SESSION_SECONDS after the
                                                   session's last call or heartbeat
    <prefix>tinker:sampler:<team>:<sid>      str   JSON SamplingSession; SESSION_SECONDS
                                                   (<team>: a digest of the team's name)
    <prefix>tinker:names:<run>               hash  "<kind>/<name>" → {"checkpoint", "time",
                                                   "expires" if it has a TTL}: what the
                                                   tinker:// paths of a run name; NAME_SECONDS
                                                   after the run last named one
    <prefix>tinker:op:<rid>                  str   team of a submitted future; KEEP_SECONDS
    <prefix>tinker:result:<rid>              str   its result: b"J" + JSON or b"P" + the
                                                   SDK's protobuf; KEEP_SECONDS, then
                                                   RETRIEVED_SECONDS once read
    <prefix>tinker:seq:<run>:<seq>           str   rid of a run's operation seq_id (a
                                                   retried submission gets the same future)
    <prefix>tinker:tail:<run>                str   rid of the run's last operation
    <prefix>tinker:lease:<rid>               str   held (renewed) by the gateway running
                                                   the future; LEASE_SECONDS
    <prefix>tinker:download-grant:<digest>   str   the token of a download grant (one per
                                                   export and team); the URLs' life
    <prefix>tinker:download:<token>          str   JSON grant a signed URL reads: team, fork,
                                                   checkpoint, run and name (re-checked)

Results count in the team's Redis bytes (`gateway.quota`, the cap of traces and replies).

<run> is a fork's slug and creation time (a slug deleted and taken again is a new run).

A future runs as a task of the gateway that took its submission, after the run's previous
operation has finished wherever it ran (its result in Redis): a run's operations apply in
the order the SDK submitted them. A retrieve long-polls: the local task when it is here,
else the result key. Failures are results too (the SDK's error body). Gateway code: no
torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from gateway.quota import LUA, OVERHEAD, TeamQuota
from headway.errors import InvalidArgument, NotFound, Overloaded, ResourceExhausted
from headway.server.heads import live_name, names_key

log = logging.getLogger(__name__)

SESSION_SECONDS = 24 * 3600  # a session (and its sampling sessions) lives this long idle
RESULT_SECONDS = KEEP_SECONDS = 3600  # an operation's result waits this long for its retrieve
RETRIEVED_SECONDS = 60  # and this long after a retrieve (for a retry of a lost reply)
NAME_SECONDS = 30 * 24 * 3600  # a named checkpoint path resolves this long
POLL_SECONDS = 20.0  # a retrieve_future holds this long (the SDK gives up at 45 s)
REMOTE_POLL_SECONDS = 0.05  # how often a result computed elsewhere is looked for
LEASE_SECONDS = 30  # a future whose gateway stopped renewing this long is given up
MAX_RESULT_BYTES = 64 * 1024 * 1024  # a bigger result is an error (fewer datums per call)


class ResultTooLarge(InvalidArgument):
    """A future's result over MAX_RESULT_BYTES (the caller sends smaller calls)."""


@dataclass
class SamplingSession:
    """What a sampling session samples: a model's checkpoint ("" = its head at each
    sample), the base it derives from, the tinker:// path it was made from if any."""

    team: str
    slug: str
    checkpoint: str
    base: str
    path: str = ""


@dataclass
class Result:
    """A finished future: a JSON object, or protobuf bytes (the SDK's wire)."""

    json: dict[str, Any] | None = None
    proto: bytes | None = None

    def encode(self) -> bytes:
        if self.proto is not None:
            return b"P" + self.proto
        return b"J" + json.dumps(self.json).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Result:
        if raw[:1] == b"P":
            return cls(proto=raw[1:])
        return cls(json=json.loads(raw[1:]))


# Store a result (ARGV[1]; its error ARGV[2] instead when it is larger than SMALL_RESULT
# and over the team's cap) and count its bytes in the team's bucket of its expiry.
SMALL_RESULT = 64 * 1024
_KEEP = (
    LUA
    + f"""
local q = quota_of(ARGV, 4)
local ttl = tonumber(ARGV[3])
local now = quota_now()
local value = ARGV[1]
local size = string.len(value) + {OVERHEAD}
if string.len(value) > {SMALL_RESULT} and not quota_fits(q, now, size) then
  value = ARGV[2]
end
redis.call('SET', KEYS[1], value, 'EX', ttl)
quota_add(q, now + ttl * 1000, string.len(value) + {OVERHEAD})
return 1
"""
)


class TinkerState:
    """Sessions, sampling sessions, names and futures of the Tinker API (see the module)."""

    def __init__(
        self, redis: Any, prefix: str, max_pending: int, quota: TeamQuota | None = None
    ) -> None:
        self.redis, self.prefix, self.base_prefix = redis, f"{prefix}tinker:", prefix
        self.max_pending = max_pending  # per team, on this gateway
        # The team's bytes in Redis (traces, replies, results): a result counts until it
        # expires, and a team over its cap starts no operation until some expire.
        self.quota = quota or TeamQuota.for_retention(prefix, 0, KEEP_SECONDS)
        self.quota.check_covers(KEEP_SECONDS, "Tinker results")
        self.local: dict[str, asyncio.Task] = {}  # futures running in this process
        self.local_teams: dict[str, str] = {}  # their teams

    # ---------------------------------------------------------------- sessions
    async def create_session(self, team: str) -> str:
        session = secrets.token_hex(6)
        await self.redis.set(f"{self.prefix}session:{session}", team, ex=SESSION_SECONDS)
        return session

    async def session_team(self, session: str) -> str | None:
        """The session's team (its idle time restarts), or None if it is unknown."""
        key = f"{self.prefix}session:{session}"
        team = await self.redis.get(key)
        if team is not None:
            await self.redis.expire(key, SESSION_SECONDS)
        return team.decode() if team is not None else None

    def _sampler_key(self, sid: str, team: str) -> str:
        # The team in the key: no other team's call can reach (or overwrite) the session.
        return f"{self.prefix}sampler:{hashlib.sha256(team.encode()).hexdigest()[:32]}:{sid}"

    async def put_sampler(self, sid: str, target: SamplingSession) -> None:
        key = self._sampler_key(sid, target.team)
        await self.redis.set(key, json.dumps(asdict(target)), ex=SESSION_SECONDS)

    async def sampler(self, sid: str, team: str) -> SamplingSession:
        """The team's sampling session `sid`; NotFound for an unknown or another team's."""
        raw = await self.redis.get(self._sampler_key(sid, team))
        target = SamplingSession(**json.loads(raw)) if raw is not None else None
        if target is None or target.team != team:
            raise NotFound(f"no sampling session {sid!r}")
        return target

    async def name(self, slug: str, path: str, checkpoint: str, ttl: float | None = None) -> None:
        """Name `checkpoint` of `slug` "<kind>/<name>" (weights/..., sampler_weights/...,
        external_weights/...); with `ttl`, the name lapses after that many seconds."""
        key = names_key(slug, self.base_prefix)
        now = time.time()
        entry = {"checkpoint": checkpoint, "time": now}
        if ttl is not None:
            entry["expires"] = now + ttl
        await self.redis.hset(key, path, json.dumps(entry))
        await self.redis.expire(key, NAME_SECONDS)

    async def named(self, slug: str, path: str) -> str | None:
        raw = await self.redis.hget(names_key(slug, self.base_prefix), path)
        entry = json.loads(raw) if raw is not None else None
        return entry["checkpoint"] if entry is not None and live_name(entry) else None

    async def names(self, slug: str) -> dict[str, dict[str, Any]]:
        """Every live name of `slug`'s checkpoints: path → {"checkpoint", "time"}."""
        raw = await self.redis.hgetall(names_key(slug, self.base_prefix))
        entries = {k.decode(): json.loads(v) for k, v in raw.items()}
        return {k: v for k, v in entries.items() if live_name(v)}

    async def set_ttl(self, slug: str, path: str, ttl: float | None) -> bool:
        """Give a live name a new lifetime (None: no end of its own); whether it exists."""
        key = names_key(slug, self.base_prefix)
        raw = await self.redis.hget(key, path)
        entry = json.loads(raw) if raw is not None else None
        if entry is None or not live_name(entry):
            return False
        entry.pop("expires", None)
        if ttl is not None:
            entry["expires"] = time.time() + ttl
        await self.redis.hset(key, path, json.dumps(entry))
        return True

    # --------------------------------------------------------------- downloads
    async def grant_download(self, grant: dict[str, str], seconds: int) -> tuple[str, float]:
        """A random token that stands for `grant` (what a signed URL may read) and the
        seconds it has left, kept in Redis: any gateway behind the balancer serves the URL.
        The same grant gets the same token while it lives, so asking again stores nothing
        more (one key per export, however often a team asks)."""
        digest = hashlib.sha256(json.dumps(grant, sort_keys=True).encode()).hexdigest()[:32]
        held = f"{self.prefix}download-grant:{digest}"
        token = secrets.token_urlsafe(32)
        if await self.redis.set(held, token, nx=True, ex=seconds):
            await self.redis.set(f"{self.prefix}download:{token}", json.dumps(grant), ex=seconds)
            return token, float(seconds)
        existing, left = await self.redis.get(held), await self.redis.pttl(held)
        if existing is None or left <= 0:  # expired between the two calls: a new one
            return await self.grant_download(grant, seconds)
        return existing.decode(), left / 1000

    async def download(self, token: str) -> dict[str, str] | None:
        """The grant of a live download token."""
        raw = await self.redis.get(f"{self.prefix}download:{token}")
        return json.loads(raw) if raw is not None else None

    async def forget(self, slug: str, path: str) -> bool:
        """Drop a name; whether it existed."""
        return bool(await self.redis.hdel(names_key(slug, self.base_prefix), path))

    # ----------------------------------------------------------------- futures
    def pending(self, team: str) -> int:
        """The team's futures this gateway is running or queueing."""
        return sum(1 for t in self.local_teams.values() if t == team)

    async def submit(
        self,
        team: str,
        work: Callable[[], Awaitable[Result]],
        failure: Callable[[BaseException], Result],
        run: str = "",
        seq: int = 0,
    ) -> str:
        """Start `work` as a future, after the run's previous operation; its request id. A
        resubmission of a run's seq_id (> 0: the SDK counts from 1, and 0 is an unset
        field) gets the first one's id and runs nothing. Overloaded (429, which the SDK
        retries) while the team has `max_pending` futures here: one team's queue cannot
        hold the gateway's memory for everyone."""
        if self.max_pending and self.pending(team) >= self.max_pending:  # 0: no limit
            raise Overloaded(
                f"{self.max_pending} operations of this team are pending on this gateway; "
                "wait for their results", retry_after_ms=1000
            )  # fmt: skip
        if self.quota.cap:
            retried = None
            if run and seq > 0:  # a retry of a submitted operation gets its id, cap or not
                retried = await self.redis.get(f"{self.prefix}seq:{run}:{seq}")
            if retried is not None:
                return retried.decode()
            used = await self.quota.used(self.redis, team)
            if used >= self.quota.cap:
                raise ResourceExhausted(
                    f"the team's data in Redis is {used} bytes, at its limit of "
                    f"{self.quota.cap} (max_team_redis_bytes): traces, stored replies and "
                    "Tinker results count until they expire; retrieve pending results, wait "
                    "for old ones to expire, or ask the operator to raise the limit"
                )
        rid = secrets.token_hex(12)
        self.local_teams[rid] = team  # counted from now: concurrent submits see it
        keys = [f"{self.prefix}lease:{rid}", f"{self.prefix}op:{rid}"]
        try:
            await self.redis.set(keys[0], "1", ex=LEASE_SECONDS)
            await self.redis.set(keys[1], team, ex=KEEP_SECONDS)
            if run and seq > 0:
                key = f"{self.prefix}seq:{run}:{seq}"  # SET NX, then GET: 6.2 has no NX GET
                if not await self.redis.set(key, rid, nx=True, ex=KEEP_SECONDS):
                    first = await self.redis.get(key)
                    if first is not None:
                        await self.redis.delete(*keys)
                        self.local_teams.pop(rid, None)
                        return first.decode()
                keys.append(key)
            before = None
            if run:
                tail = f"{self.prefix}tail:{run}"
                before = await self.redis.set(tail, rid, get=True, ex=KEEP_SECONDS)
        except BaseException:
            self.local_teams.pop(rid, None)
            with contextlib.suppress(Exception):  # a retry must not find a future that is not
                await self.redis.delete(*keys)
            raise

        async def ordered() -> None:
            lease = asyncio.get_running_loop().create_task(self._hold(rid))
            try:
                try:
                    if before is not None:
                        await self._finished(before.decode())
                    result = await work()
                except Exception as e:  # the future's answer, not the gateway's crash
                    result = failure(e)
                encoded = result.encode()
                if len(encoded) > MAX_RESULT_BYTES:
                    encoded = failure(ResultTooLarge(
                        f"the result is {len(encoded)} bytes, over the limit of "
                        f"{MAX_RESULT_BYTES}: send fewer datums per call")).encode()  # fmt: skip
                over = failure(ResourceExhausted(
                    f"the operation ran, but its result ({len(encoded)} bytes) would take the "
                    "team's data in Redis over its limit (max_team_redis_bytes), so it was "
                    "not kept: send fewer datums per call, or wait for older results to "
                    "expire")).encode()  # fmt: skip
                await self._keep(rid, encoded, over, team)
            finally:
                lease.cancel()
                await asyncio.gather(lease, return_exceptions=True)

        task = asyncio.get_running_loop().create_task(ordered())
        self.local[rid] = task
        task.add_done_callback(lambda _: self._forget_local(rid))
        return rid

    async def _keep(self, rid: str, encoded: bytes, over: bytes, team: str) -> None:
        """Store a result, counted in the team's bytes until it expires; one over the
        team's cap is stored as `over` (its error) unless small (an optim_step's answer is
        kept whatever the cap: the work is done), retrying Redis a few times."""
        for attempt in range(5):
            try:
                await self.redis.eval(
                    _KEEP, 1, f"{self.prefix}result:{rid}", encoded, over, KEEP_SECONDS,
                    *self.quota.lua_args(team),
                )  # fmt: skip
                return
            except Exception:
                log.warning("tinker future %s: storing its result failed", rid, exc_info=True)
                await asyncio.sleep(0.2 * 2**attempt)

    def _forget_local(self, rid: str) -> None:
        self.local.pop(rid, None)
        self.local_teams.pop(rid, None)

    async def _hold(self, rid: str) -> None:
        """While this gateway has the future (queued or running): renew its lease (when
        the gateway dies, the lease lapses and whoever waits on the future gives it up,
        `_finished`) and its op key (a long queue must not expire it)."""
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            try:
                await self.redis.set(f"{self.prefix}lease:{rid}", "1", ex=LEASE_SECONDS)
                await self.redis.expire(f"{self.prefix}op:{rid}", KEEP_SECONDS)
            except Exception:  # Redis away for a moment: the next tick tries again
                log.warning("tinker future %s: renewing its lease failed", rid, exc_info=True)

    async def _finished(self, rid: str) -> None:
        """Wait until future `rid` has its result, no longer exists, or lost the gateway
        that ran it (its lease lapsed: the result says so, for every poller)."""
        task = self.local.get(rid)
        if task is not None:
            await asyncio.wait([task])
            return
        op, result = f"{self.prefix}op:{rid}", f"{self.prefix}result:{rid}"
        while await self.redis.exists(op) and not await self.redis.exists(result):
            if not await self.redis.exists(f"{self.prefix}lease:{rid}"):
                lost = Result({"error": "the gateway running this operation stopped before "
                               "it finished; submit it again", "category": "server"})  # fmt: skip
                await self.redis.set(result, lost.encode(), nx=True, ex=KEEP_SECONDS)
                return
            await asyncio.sleep(REMOTE_POLL_SECONDS)

    async def retrieve(self, rid: str, team: str) -> Result | None:
        """The future's result, or None if it has none after POLL_SECONDS. NotFound for an
        unknown, expired or another team's future."""
        owner = await self.redis.get(f"{self.prefix}op:{rid}")
        if owner is None or owner.decode() != team:
            raise NotFound(f"no future {rid!r}: unknown, expired, or another team's")
        try:
            await asyncio.wait_for(self._finished(rid), POLL_SECONDS)
        except TimeoutError:
            return None
        key = f"{self.prefix}result:{rid}"
        raw = await self.redis.get(key)
        if raw is None:
            if rid in self.local_teams or await self.redis.exists(f"{self.prefix}op:{rid}"):
                return Result({"error": "the operation's result could not be stored (Redis "
                               "failed); check the run's state", "category": "server"})  # fmt: skip
            raise NotFound(f"future {rid!r} expired")
        await self.redis.expire(key, RETRIEVED_SECONDS)
        await self.redis.expire(f"{self.prefix}op:{rid}", RETRIEVED_SECONDS)
        return Result.decode(raw)
