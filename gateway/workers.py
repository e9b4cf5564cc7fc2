"""A small pool of threads for the HTTP API's CPU work, off the event loop that serves gRPC.

Parsing a request body, rendering a chat template, tokenizing and encoding a reply take
time proportional to the request; on the event loop they would stall every gRPC call of
the gateway meanwhile. They run here instead, on `threads` threads (bounded: a burst queues
rather than spawning threads), and each team runs at most half of them at once, so one
team's large requests cannot occupy the pool while another team's wait behind them.

Threads help only while the work lets go of the GIL: the callers make sure it does
(tokenizers' batch encode releases it; large bodies parse with json's pure-Python scanner,
which yields it between values; see `gateway.http_params`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")


class Workers:
    """Runs functions on a bounded thread pool, at most `per_team` at a time per team."""

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"http_worker_threads is {threads}: it must be >= 1")
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="gateway-worker")
        self.per_team = max(1, threads // 2)
        self._turns: dict[str, asyncio.Semaphore] = {}
        self._users: Counter[str] = Counter()

    async def run(self, team: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a worker thread, once `team` has a free share of the pool."""
        loop = asyncio.get_running_loop()
        turn = self._turns.setdefault(team, asyncio.Semaphore(self.per_team))
        self._users[team] += 1
        try:
            await turn.acquire()
        except BaseException:
            self._leave(team)
            raise

        def done(_: object) -> None:
            # Given back when the thread is done, not when the caller stops waiting (a
            # client that hangs up does not stop a parse that has started).
            with contextlib.suppress(RuntimeError):  # the loop closed first: nothing to free
                loop.call_soon_threadsafe(self._finish, team, turn)

        try:
            future = self._pool.submit(partial(fn, *args))
        except BaseException:  # the pool is shut down
            self._finish(team, turn)
            raise
        future.add_done_callback(done)
        return await asyncio.wrap_future(future)

    def _finish(self, team: str, turn: asyncio.Semaphore) -> None:
        turn.release()
        self._leave(team)

    def _leave(self, team: str) -> None:
        self._users[team] -= 1
        if not self._users[team]:
            del self._users[team]
            del self._turns[team]

    def close(self) -> None:
        """Stop the threads once their current work is done; queued work is dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)
