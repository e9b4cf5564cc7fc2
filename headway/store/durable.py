"""`Syncer`: what a store in asynchronous mode does after the fact, in order.

A file written and renamed is already safe from a process crash (SIGKILL): its bytes are
in the kernel's page cache and outlive the process. Only a power loss (or a kernel crash)
loses what was not fsynced. So the store writes and renames on the caller's path, and
hands the fsyncs of what it wrote to one background thread, which runs them in the order
they were written (a checkpoint's files, its directory, the directory that names it, then
the HEAD that points at it). What a power loss may still tear — a checkpoint whose rename
reached the disk before its data — the store finds on opening and removes (see
`CheckpointStore.check_checkpoints`).

A checkpoint's deferred file (the optimizer state of a large checkpoint, written into its
already published directory after the OptimStep has replied) is written by a thread of its
own, not in this queue — so one model's write never waits behind another's fsyncs — and the
checkpoint's fsync job waits for it (`submit(..., after=)`): the order a crash relies on
stays (deferred file written, then fsynced with the rest, before its HEAD's fsync).

Backpressure: at most `max_pending` jobs wait; a writer that would exceed that waits for
the disk, so a disk slower than the training loop slows the loop instead of piling up
dirty memory. An fsync that fails (EIO, disk full) is raised to the next writer: the
store then refuses to pretend it is durable.

Priority: both background threads (the fsyncs and a deferred write) run at a lower CPU
priority (`background_priority`). They run just after a head is published, exactly when
the samplers on the same machine copy the new weights in: at equal priority, on 2 cores,
the optimizer-state write of a full fork took the CPU and memory from that copy
(publish → servable p50 36–39 ms, niced 29–33 ms, copy floor 17–19 ms; AMD EPYC Zen 3 VM,
`python -m bench.sampler_reload`). The cost: on a machine kept busy by serving, a deferred
write finishes later, and the model's next OptimStep (whose AdamW waits for it) with it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from headway.store import atomic

log = logging.getLogger(__name__)
_IDLE_SECONDS = 5.0
BACKGROUND_NICE = 10  # nice of the store's background threads: ~1/10 of a contended CPU


def background_priority() -> None:
    """Lower the calling thread's CPU priority to `BACKGROUND_NICE` (Linux, where nice is
    per thread; elsewhere nothing: there a thread id may name another process)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except OSError as e:  # a sandbox that forbids it: the thread runs at normal priority
        log.debug("background priority not set: %s", e)


class Syncer:
    """A FIFO of fsync jobs run by one daemon thread."""

    def __init__(self, max_pending: int = 2) -> None:
        self.max_pending = max(1, max_pending)
        self._jobs: deque[tuple[str, Callable[[], None]]] = deque()
        self._running: str | None = None
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(
        self,
        key: str,
        paths: list[Path],
        after: Future[None] | None = None,
        release: list[Path] | None = None,
        then: Callable[[], object] | None = None,
    ) -> None:
        """fsync `paths` (files and directories, in this order) after the jobs before it
        and, if given, after `after` (a write running elsewhere) has finished; its failure
        fails the job. Then drop the page cache of the files in `release` (on disk by
        then: `atomic.drop_cached`), and call `then`. Waits while `max_pending` jobs are
        queued; raises a previous job's failure."""

        def job() -> None:
            if after is not None:
                after.result()
            _fsync_all(paths)
            for path in release or ():
                atomic.drop_cached(path)
            if then is not None:
                then()

        with self._cond:
            self.raise_error()
            self._cond.wait_for(lambda: len(self._jobs) < self.max_pending)
            self.raise_error()
            self._jobs.append((key, job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="store-fsync", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self, key: str) -> bool:
        """Whether a job named `key` is queued or running."""
        with self._cond:
            return self._running == key or any(k == key for k, _ in self._jobs)

    def wait(self, key: str | None = None) -> None:
        """Block until the job named `key` (every job, for None) is done; raises a failure."""
        with self._cond:
            if key is None:
                self._cond.wait_for(lambda: not self._jobs and self._running is None)
            else:
                self._cond.wait_for(
                    lambda: self._running != key and all(k != key for k, _ in self._jobs)
                )
            self.raise_error()

    def raise_error(self) -> None:
        """Raise the failure of an earlier fsync, if one failed."""
        if self._error is not None:
            raise OSError(
                f"a background write or fsync of the checkpoint store failed: {self._error}"
            )

    def _run(self) -> None:
        background_priority()
        while True:
            with self._cond:
                # Idle for a while: the thread ends (the next submit starts another).
                if not self._cond.wait_for(lambda: bool(self._jobs), _IDLE_SECONDS):
                    self._thread = None
                    return
                key, job = self._jobs.popleft()
                self._running = key
            try:
                job()
            except Exception as e:
                log.error("background job %s failed: %s", key, e)
                with self._cond:
                    self._error = e
            with self._cond:
                self._running = None
                self._cond.notify_all()


def _fsync_all(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            atomic.fsync_dir(path)
        elif path.exists():  # a HEAD replaced since is fsynced by its own job
            atomic.fsync_file(path)
