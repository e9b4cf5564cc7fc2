"""Calls in flight per team on one gateway, capped, so one team cannot take every slot.

Each gRPC call (`gateway.grpc_limits`) and each HTTP request (`TeamSlotsMiddleware`) holds
a slot of its team while it runs, streams included, until the last byte. A team at its
limit gets its next call refused at once with `Overloaded` (RESOURCE_EXHAUSTED with a retry
pushback; HTTP 429 with retry-after), while other teams' calls go on. In local mode every
caller is the team "".

The counters live on the gateway's one event loop (gRPC and HTTP share it), so they need
no lock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from headway.errors import HeadwayError, Overloaded

RETRY_AFTER_MS = 250  # a call of the team will usually have finished by then


class TeamSlots:
    """In-flight calls per team, at most `limit` each (0 = no limit)."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"max_calls_per_team is {limit}: use 0 (no limit) or more")
        self.limit = limit
        self._in_flight: Counter[str] = Counter()

    def in_flight(self, team: str) -> int:
        """Calls of `team` running now."""
        return self._in_flight[team]

    def acquire(self, team: str) -> None:
        """Take a slot of `team`; Overloaded if it has none free. Pair with `release`."""
        if self.limit and self._in_flight[team] >= self.limit:
            who = f"team '{team}'" if team else "the local team"
            raise Overloaded(
                f"{who} has {self.limit} calls in flight on this gateway, its limit "
                "(max_calls_per_team): retry after some of them finish",
                retry_after_ms=RETRY_AFTER_MS,
            )
        self._in_flight[team] += 1

    def release(self, team: str) -> None:
        """Give back a slot taken by `acquire`."""
        self._in_flight[team] -= 1
        if not self._in_flight[team]:
            del self._in_flight[team]

    @contextmanager
    def hold(self, team: str) -> Iterator[None]:
        """A slot of `team` for the duration of the block; Overloaded if none is free."""
        self.acquire(team)
        try:
            yield
        finally:
            self.release(team)


class TeamSlotsMiddleware:
    """ASGI middleware: every HTTP request holds a slot of its caller's team until its
    response (a stream included) is sent. A request whose key does not authenticate
    passes through without a slot: the app answers it 401 at once.

    `team_of(headers)` names the caller's team from the request headers (raising a
    HeadwayError when it cannot); `reject(error)` is the ASGI response for a refused one.
    """

    def __init__(self, app: Any, slots: TeamSlots, team_of: Any, reject: Any) -> None:
        self.app, self.slots, self.team_of, self.reject = app, slots, team_of, reject

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            team = self.team_of(headers)
        except HeadwayError:
            return await self.app(scope, receive, send)
        try:
            self.slots.acquire(team)
        except Overloaded as e:
            return await self.reject(e)(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release(team)
