"""A team's bytes in Redis, counted by the scripts that write them, until they expire.

Traces (`gateway.traces`) and stored HTTP replies (`gateway.replies`) expire by themselves
in Redis (no sweeper), so a plain counter could count up but never down. Bytes are counted
instead in buckets by *when they expire*:

    <prefix>teambytes:<sha256(team)[:32]>:<width ms>:<b>   str  bytes written whose keys
                                                                expire in [b·width, (b+1)·width)

Each bucket key expires at the end of its window, so it outlives every key it counts by
less than one width, and a team's bytes in Redis are the sum of its live buckets: at most
`BUCKETS + 1` keys from now on (the width is the longest retention ÷ BUCKETS). The count is
never below the truth, and above it by at most the bytes that expired in the last width
(1/64 of the retention: under 3 h for the default 7 days).

Every write checks and adds inside the same Lua script as the write itself (`LUA` is
prepended to those scripts), so concurrent writes of one team, through any gateway, can
never pass the cap together. The scripts compute the bucket keys from Redis' clock, which
is also the clock that expires the keys; they are not declared in KEYS (a single Redis, not
a cluster, is what Headway runs on).

What counts: the stored bytes of each turn or reply plus `OVERHEAD` for Redis' own
bookkeeping of the item (keys, hash fields, list entry), so a flood of tiny turns counts too.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

BUCKETS = 64
OVERHEAD = 200  # bytes per stored item, roughly what Redis spends on its key and fields

# Functions for the writing scripts. `q` = {base, width, buckets, cap} (see `TeamQuota.lua_args`).
LUA = """
local function quota_of(args, i)
  return {base = args[i], width = tonumber(args[i + 1]), buckets = tonumber(args[i + 2]),
          cap = tonumber(args[i + 3])}
end
local function quota_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function quota_used(q, now)
  local first = math.floor(now / q.width)
  local keys = {}
  for b = first, first + q.buckets do keys[#keys + 1] = q.base .. string.format('%d', b) end
  local used = 0
  for _, v in ipairs(redis.call('MGET', unpack(keys))) do
    if v then used = used + tonumber(v) end
  end
  return used
end
-- true if `size` more bytes keep the team within its cap (always, with no cap)
local function quota_fits(q, now, size)
  return q.cap <= 0 or quota_used(q, now) + size <= q.cap
end
local function quota_add(q, deadline, size)
  local b = math.floor(tonumber(deadline) / q.width)
  local key = q.base .. string.format('%d', b)
  redis.call('INCRBY', key, size)
  redis.call('PEXPIREAT', key, string.format('%.0f', (b + 1) * q.width))
end
"""

_USED = (
    LUA
    + """
local q = quota_of(ARGV, 1)
return string.format('%.0f', quota_used(q, quota_now()))
"""
)


@dataclass(frozen=True)
class TeamQuota:
    """Where a deployment counts each team's bytes, and the cap (0 = count, no cap).

    Every gateway of a deployment must use the same settings: the width is part of the key,
    and a gateway sums only as far ahead as its own longest retention.
    """

    prefix: str
    cap: int
    width_ms: int
    horizon_ms: int  # the longest lifetime of an item it counts (BUCKETS widths at most)

    @classmethod
    def for_retention(cls, prefix: str, cap: int, *ttl_seconds: float) -> TeamQuota:
        """The quota for items that live at most max(`ttl_seconds`)."""
        if cap < 0:
            raise ValueError(f"max_team_redis_bytes is {cap}: use 0 (no limit) or more")
        longest_ms = math.ceil(max(ttl * 1000 for ttl in ttl_seconds))
        return cls(prefix, cap, max(1000, math.ceil(longest_ms / BUCKETS)), longest_ms)

    def check_covers(self, ttl_seconds: float, what: str) -> None:
        """ValueError unless items living `ttl_seconds` are within the quota's horizon (a
        longer-lived item would be counted in a bucket the sum never reaches)."""
        if ttl_seconds * 1000 > self.horizon_ms:
            raise ValueError(
                f"the team quota counts items living at most {self.horizon_ms} ms, but {what} "
                f"live {ttl_seconds} s: build it with TeamQuota.for_retention(..., every ttl)"
            )

    def base(self, team: str) -> str:
        """The bucket keys' common prefix for `team` (hashed: any team name is safe)."""
        digest = hashlib.sha256(team.encode()).hexdigest()[:32]
        return f"{self.prefix}teambytes:{digest}:{self.width_ms}:"

    def lua_args(self, team: str) -> list[Any]:
        """The four ARGV a script reads with `quota_of(ARGV, i)`."""
        return [self.base(team), self.width_ms, BUCKETS, self.cap]

    async def used(self, redis: Any, team: str) -> int:
        """Bytes `team` holds in Redis now, as the caps count them."""
        return int(await redis.eval(_USED, 0, *self.lua_args(team)))

    def exceeded(self, used: int, size: int, what: str) -> str:
        """The message for a write of `size` bytes refused at `used`."""
        return (
            f"{what} of {size} bytes would take the team's data in Redis to {used + size} "
            f"bytes, over the limit of {self.cap} (max_team_redis_bytes): traces and stored "
            "replies count until they expire; wait for old ones to expire or ask the "
            "operator to raise the limit"
        )
