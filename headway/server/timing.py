"""Timing candidate kernels on a machine other processes share.

`fastest` times callables interleaved and keeps each one's fastest undisturbed round. The
services choose kernels by timing them (`sampler_svc/kernels.py`,
`sampler_svc/compiled.py`, `trainer_svc/kernels.py`) and keep the choice on disk. A timing
taken while another process held the cores — a replica starting beside this one, a
trainer's background save, a compile — measures the neighbour, not the kernel, and a
choice made from it would be kept for good: on a 2-core EPYC a bf16 engine that measured
its layouts while a benchmark ran beside it decoded 8 rows in 14.5 ms a step, against 9.4
ms with the layouts a quiet measurement chose. Linux counts, for every thread, the time it
spent runnable but waiting for a CPU (the second field of /proc/<pid>/task/<tid>/schedstat,
in ns); a timing during which that grew by more than a few percent of its wall time was
disturbed, and is taken again. On a system without these counters the timings are taken
as they come.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# A timing is disturbed when the threads that took part in it (runnable, on a CPU or
# waiting for one, for at least WORKING of its wall time: the caller and torch's workers,
# not a thread that woke briefly) waited for a CPU for more than DISTURBED of its wall
# time between them. Quiet timings here: under 2 %; beside two busy processes on 2 cores:
# ~55 %. (Runnable, not on a CPU: a worker starved by a neighbour counts.)
DISTURBED = 0.05
WORKING = 0.5

_TASKS = "/proc/self/task"

Readings = dict[str, tuple[int, int]]  # thread id → (ns on a CPU, ns waiting for one)


def thread_times() -> Readings | None:
    """Each live thread's time on a CPU and time runnable but waiting for one (ns); None
    where the kernel does not report them."""
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return None
    out: Readings = {}
    for tid in tids:
        try:
            with open(f"{_TASKS}/{tid}/schedstat", "rb") as f:
                ran, waited = f.read().split()[:2]
            out[tid] = (int(ran), int(waited))
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue
    return out or None


def disturbed(before: Readings | None, after: Readings | None, seconds: float) -> bool:
    """Whether a timing of `seconds` between two `thread_times` readings was disturbed:
    its working threads waited for a CPU (False where there are no readings)."""
    if before is None or after is None:
        return False
    wall, waited = seconds * 1e9, 0
    for tid, (ran, wait) in after.items():
        ran0, wait0 = before.get(tid, (0, 0))
        if (ran - ran0) + (wait - wait0) >= WORKING * wall:
            waited += wait - wait0
    return waited > DISTURBED * wall


class Timings(dict[str, float]):
    """Seconds per candidate (`fastest`); `disturbed`: some candidate had no timed round
    free of other processes (`disturbed`), so the times may measure them."""

    disturbed: bool = False


def fastest(
    fns: dict[str, Callable[[], object]],
    rounds: int = 5,
    inner: int = 3,
    reset: Callable[[], object] | None = None,
) -> Timings:
    """Seconds of one call of each of `fns`, timed interleaved (A, B, A, B, ...) so that
    load from other processes hits them alike, after a warmup round, keeping each one's
    fastest round of `inner` calls: on a shared machine the slow rounds measure the
    neighbours, the fastest one the code. A round during which this process's threads
    waited for a CPU (another process held the cores) does not count: rounds go on, up to
    4x as many, until each candidate has `rounds` undisturbed ones. `reset`, if given,
    runs untimed before every round (e.g. to leave the caches as the real work finds
    them: `sampler_svc.kernels.Evictor`)."""
    clean: dict[str, list[float]] = {name: [] for name in fns}
    every: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(4 * rounds + 1):
        for name, fn in fns.items():
            if reset is not None:
                reset()
            before = thread_times()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            took = time.perf_counter() - start
            if r:
                every[name].append(took / inner)
                if not disturbed(before, thread_times(), took):
                    clean[name].append(took / inner)
        if r >= rounds and all(len(ts) >= rounds for ts in clean.values()):
            break
    out = Timings({name: min(clean[name] or every[name]) for name in fns})
    out.disturbed = not all(clean.values())
    dropped = sum(map(len, every.values())) - sum(map(len, clean.values()))
    if dropped:
        log.info(
            "timing %s: %d round(s) dropped, their threads waited for a CPU%s",
            "/".join(fns),
            dropped,
            " (every round of some: kept as measured, re-measured at the next start)"
            if out.disturbed
            else "",
        )
    return out
