"""Page-cache pages allocated ahead of a write, and the holes that sizing a file first can
leave (torch-free: the gateway opens the store too).

Writing a new file allocates its page-cache pages on the way, which on some machines is
most of the write: 162 MB by `write()` in 50–440 ms on an AMD EPYC Zen 4 KVM guest (Linux
6.18; the more so the longer the memory lay free, as the host reclaims free guest memory),
against 42–65 ms over a file whose pages were allocated ahead (a full fork's OptimStep
checkpoint write, `bench/bench_trainer.py`). A writer that knows its next file's size has
the allocation done ahead on another thread (`make_spare`) and only the copy left on its
critical path.

A file sized before it is written no longer proves by its size that its data was written:
a power loss can leave it full-sized with holes where the data never reached the disk.
`has_hole` finds those (the store's recovery treats such a file as torn).
"""

from __future__ import annotations

import math
import os
import statistics
from collections import deque
from pathlib import Path

_READ_CHUNK = 4 << 20  # bytes read per call: cache-sized, the zeros read are thrown away


def make_spare(path: Path, size: int) -> Path:
    """Create file `path` of `size` bytes (a hole: no disk blocks) with its page-cache pages
    allocated, for a later `write_plan(..., spare=path)` of a file about that size: the
    allocation, the slow part of writing a new file, done ahead on another thread. The
    pages are clean zeros: nothing is written back unless the file is written."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        os.ftruncate(fd, size)
        populate_pages(fd, size)
    finally:
        os.close(fd)
    return path


def populate_pages(fd: int, size: int) -> None:
    """Allocate the page-cache pages of the first `size` bytes of file `fd` (open for
    reading), reading zeros where the file has holes; pages already cached are kept.

    By reading them (`preadv` into one small buffer, again and again): unlike faulting
    them in through a map (`MADV_POPULATE_READ`), a read lets go of the GIL, and the
    allocation can take as long as the write it spares (0.1–0.4 s for 162 MB), during
    which the process's other threads (the reply to the OptimStep) must run."""
    buffer = bytearray(min(size, _READ_CHUNK))
    offset = 0
    while offset < size:
        n = os.preadv(fd, [memoryview(buffer)[: size - offset]], offset)
        if n <= 0:
            raise OSError(f"file ended at byte {offset} of {size}")
        offset += n


def has_hole(path: Path) -> bool:
    """Whether file `path` has a hole (a range with no data on disk or in the page cache)
    before its end: a file sized before its data was written whose data a power loss
    lost. False where the filesystem cannot tell (no SEEK_HOLE: all of it is data)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # unreadable here: not this check's to judge
        return False
    try:
        size = os.fstat(fd).st_size
        return size > 0 and os.lseek(fd, 0, os.SEEK_HOLE) < size
    except OSError:
        return False
    finally:
        os.close(fd)


class SpareChoice:
    """Whether one writer's files are written faster over a spare or as new files, on this
    machine: decided by timing the writer's own writes, not by a constant. Both ways are
    tried in turn until each has `samples` times; then the faster median wins, and every
    `recheck`-th write tries the other way again (the machine's memory may change).

    Measured on an AMD EPYC Zen 4 KVM guest: a full fork's 162 MB weights file 117 vs
    387 ms over a spare; a 10 MB LoRA adapter 29 vs 20 ms as a new file."""

    def __init__(self, samples: int = 3, recheck: int = 32) -> None:
        self.times: dict[bool, deque[float]] = {
            True: deque(maxlen=samples),
            False: deque(maxlen=samples),
        }
        self.recheck = recheck
        self.writes = 0

    @property
    def decided(self) -> bool:
        """Whether both ways have been timed enough to choose."""
        return all(len(t) == t.maxlen for t in self.times.values())

    def use_spare(self) -> bool:
        """Whether the next write should go over a spare (so: have one made for it)."""
        if not self.decided:  # still trying: the way with fewer times
            return len(self.times[True]) <= len(self.times[False])
        faster = self.faster()
        return faster if (self.writes + 1) % self.recheck else not faster

    def median(self, spare: bool) -> float:
        """Median of the last times of writes over a spare (or not); inf if none."""
        return statistics.median(self.times[spare]) if self.times[spare] else math.inf

    def faster(self) -> bool:
        """Whether writes over a spare have been the faster (medians of the last times)."""
        return self.median(True) < self.median(False)

    def record(self, spare: bool, seconds: float) -> None:
        """A write took `seconds`, over a spare or not."""
        self.times[spare].append(seconds)
        self.writes += 1
