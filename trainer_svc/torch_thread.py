"""`TorchThread`: the one thread that runs a trainer process's torch work.

Why one: torch's parallel CPU ops run on OpenMP (libgomp), which gives every thread that
starts a parallel region a team of workers of its own, kept for as long as that thread
lives. Once a process holds more OpenMP threads than there are cores, libgomp stops
spinning at its barriers and puts the workers to sleep at every parallel region, and a
training step is thousands of regions. `asyncio.to_thread` hands each call to whichever
thread of its pool is free, so training, AdamW and model loads ran on several threads
and soon left the process with several teams. Measured (AMD EPYC Zen 3, 2 cores, a
58M-parameter Qwen3 forward+backward of 8×128 tokens, medians): 2.09 s on one thread,
2.22 s on it once a second thread had run one parallel op, 2.33 s on that second thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class TorchThread:
    """Runs functions on one dedicated thread, in call order, awaited like
    `asyncio.to_thread` (the caller's context variables go with the call)."""

    def __init__(self, name: str = "trainer-torch") -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """`fn(*args)` on the torch thread, after the calls queued before it."""
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def call(self, fn: Callable[..., T], /, *args: Any) -> T:
        """`fn(*args)` on the torch thread, waited for here (outside the event loop: a
        trainer's construction)."""
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        """Let the thread end once the calls queued are done (no new call is taken)."""
        self._pool.shutdown(wait=False)
