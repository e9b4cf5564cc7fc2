"""Redis failing is the gateway's dependency failing, not a bug: UNAVAILABLE / HTTP 503.

Traces, idempotent replies and the replica registry live in Redis. When Redis is down,
times out, or refuses a write (an `OOM` reply once it reaches `maxmemory` under the
`noeviction` policy), every call that needs it fails with `Unavailable` ("Redis
unavailable: ...; retry"), which callers retry, instead of UNKNOWN / 500, which they do not.
The gRPC interceptor (`gateway.grpc_limits`) and the HTTP app (`gateway.http`) both convert
with `unavailable`: the one home of this rule.
"""

from __future__ import annotations

from collections import Counter

from redis.exceptions import RedisError

from headway.errors import Unavailable

# What a Redis client raises: connection refused or lost, timeouts, error replies (OOM).
REDIS_ERRORS = (RedisError,)


def unavailable(error: BaseException) -> Unavailable:
    """The error a caller gets for a Redis failure: retryable, saying what failed."""
    detail = str(error) or type(error).__name__
    return Unavailable(f"Redis unavailable: {detail}; retry")


class RedisFailures:
    """The gateway's failed Redis operations, by where (its metrics' count): `call` (a
    call answered UNAVAILABLE / 503) or `registry` (a refresh of the replica registry;
    routing goes on with the last listing). redis-py reconnects on the next operation, so
    these are the outages as the gateway lived them."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def unavailable(self, error: BaseException) -> Unavailable:
        """`unavailable(error)`, counted as a call's failure."""
        self.counts["call"] += 1
        return unavailable(error)
