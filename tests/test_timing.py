"""Kernel timings on a shared machine (`headway.server.timing`): a timing another process
disturbed is recognised, not kept as the kernel's, and never cached as a settled choice."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from headway.server import kernel_cache
from headway.server.timing import disturbed, fastest, thread_times
from sampler_svc.kernels import KernelChoice, layout_key, layout_names

pytestmark = pytest.mark.skipif(
    thread_times() is None, reason="this kernel reports no per-thread run-queue wait"
)


def _own_cpu_seconds() -> float:
    """This thread's time on a CPU (schedstat's first field)."""
    with open(f"/proc/self/task/{os.getpid()}/schedstat") as f:  # the main thread
        return int(f.read().split()[0]) / 1e9


def _spin(cpu_seconds: float = 0.03) -> None:
    """Compute until this thread has run `cpu_seconds` on a CPU: the same work on any
    machine however fast, and however long the wall clock it takes."""
    end = _own_cpu_seconds() + cpu_seconds
    while _own_cpu_seconds() < end:
        sum(range(1000))


@pytest.fixture
def neighbours():
    """Two busy processes on the one CPU this test's thread is pinned to (whatever the
    machine's size): the thread waits for that CPU about 2/3 of the time."""
    mask = os.sched_getaffinity(0)
    cpu = min(mask)
    os.sched_setaffinity(0, {cpu})  # this thread (the main one)
    procs = [
        subprocess.Popen(
            ["sh", "-c", "while :; do :; done"],
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        )
        for _ in range(2)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()
        os.sched_setaffinity(0, mask)


def test_waiting_for_a_cpu_beside_busy_processes_is_seen(neighbours):
    before, start = thread_times(), time.perf_counter()
    _spin()
    wall = time.perf_counter() - start
    after = thread_times()
    me = str(os.getpid())  # the main thread: it did the work, and waited
    assert after[me][1] > before[me][1]
    assert disturbed(before, after, wall)
    # A thread runnable for under half the time (one that woke briefly) does not count,
    # though it waited; one runnable throughout does, starved or not.
    ns = wall * 1e9
    assert not disturbed({}, {"0": (int(0.1 * ns), int(0.3 * ns))}, wall)
    assert disturbed({}, {"0": (int(0.05 * ns), int(0.9 * ns))}, wall)


def test_fastest_drops_disturbed_rounds_and_says_when_none_was_clean(neighbours):
    calls = []

    def work() -> None:
        calls.append(1)
        _spin()

    rounds = 2
    times = fastest({"spin": work}, rounds=rounds, inner=1)
    # Every round disturbed: it went on to 4x the rounds looking for a clean one, then
    # kept what it measured, flagged.
    assert times.disturbed
    assert len(calls) == 4 * rounds + 1
    assert set(times) == {"spin"} and times["spin"] > 0


def test_a_disturbed_cached_choice_is_measured_again(tmp_path, monkeypatch):
    """A cached timing marked disturbed is taken again at the next start; an undisturbed
    one is used as it is."""
    cache = tmp_path / "kernels.json"
    monkeypatch.setenv("HEADWAY_KERNEL_CACHE", str(cache))
    monkeypatch.delenv("HEADWAY_KERNELS", raising=False)
    weights = {(64, 32): [torch.randn(64, 32)]}
    names = [n for n in layout_names("cpu", torch.float32) if n != "packed"]
    # Made-up times no measurement gives: "rows" wins by far.
    bogus = {n: (1e-9 if n == "rows" else 1.0) for n in names}
    key1, key2 = (layout_key(torch.float32, (64, 32), 1, b) for b in (1, 2))
    kernel_cache.write_cache({key1: {"times": bogus}, key2: {"times": bogus, "disturbed": True}})
    choice = KernelChoice(weights, max_rows=2)
    assert choice.buckets == [1, 2]
    assert choice.times[(64, 32), 1] == bogus and choice.choice[(64, 32), 1] == "rows"
    assert choice.times[(64, 32), 2] != bogus  # measured again
    assert choice.cached == 1
    stored = json.loads(cache.read_text())[key2]
    assert stored["times"] == choice.times[(64, 32), 2]


def test_fastest_resets_before_every_timed_round():
    """`reset` (e.g. evicting the caches) runs before each round of each candidate, the
    warmup included, so no candidate is timed on what the one before it left behind."""
    events: list[str] = []
    fastest(
        {"a": lambda: events.append("a"), "b": lambda: events.append("b")},
        rounds=2,
        inner=1,
        reset=lambda: events.append("reset"),
    )
    calls = [e for e in events if e != "reset"]
    assert len(calls) >= 2 * 3  # a warmup round and two timed ones, each candidate
    assert events == [x for call in calls for x in ("reset", call)]


def test_layouts_are_timed_with_the_other_shapes_weights_read_in_between(monkeypatch):
    """Each shape's layouts are timed after reading the model's other weights (up to the
    last-level cache's size), as a decode step reads them between two passes over it."""
    from sampler_svc import kernels

    monkeypatch.setenv("HEADWAY_KERNEL_CACHE", "/dev/null/none")  # nothing cached, nothing kept
    monkeypatch.delenv("HEADWAY_KERNELS", raising=False)  # measured, not forced
    monkeypatch.setattr(kernels.kernel_cache, "write_cache", lambda entries: None)
    monkeypatch.setattr(kernels.kernel_cache, "read_cache", lambda: {})
    seen: dict[tuple[int, int], list[int]] = {}
    real = kernels.time_layouts

    def spy(ws, rows, **kw):
        seen[tuple(ws[0].shape)] = [id(t) for t in kw["evict"].tensors]
        return real(ws, rows, **kw)

    monkeypatch.setattr(kernels, "time_layouts", spy)
    weights = {(64, 32): [torch.randn(64, 32)], (32, 64): [torch.randn(32, 64)] * 2}
    KernelChoice(weights, max_rows=1)
    assert seen == {
        (64, 32): [id(w) for w in weights[32, 64]],
        (32, 64): [id(w) for w in weights[64, 32]],
    }
    # The sweep stops once it has read a cache's worth.
    small = [torch.zeros(256) for _ in range(4)]  # 1 KB each
    assert len(kernels.Evictor(small, limit=1536).tensors) == 2
    assert kernels.last_level_cache() > 0
