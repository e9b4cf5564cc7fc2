"""Deferred checkpoint files (`DeferredFile`): an asynchronous store publishes a checkpoint
before its optimizer state is written, and a SIGKILL during that write leaves only
complete checkpoints once the store is reopened."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from headway.store import CheckpointRecord, CheckpointStore, DeferredFile, ModelRecord, atomic
from tests.helpers_pages import cached_pages
from tests.stack import HANG_SECONDS

STATE = b"s" * 4096


def _model(store: CheckpointStore) -> None:
    record = ModelRecord(slug="m", team="t", is_base=False, base="b", created=time.time())
    root = CheckpointRecord(id="root", model="m", kind="full", step=0, created=time.time())
    store.create_model(record, root, lambda d: (d / "weights.safetensors").write_bytes(b"w"))


def _record(ckpt: str, parent: str, step: int) -> CheckpointRecord:
    return CheckpointRecord(
        id=ckpt, model="m", kind="full", step=step, created=0, parent_id=parent, has_optimizer=True
    )


def _weights(d: Path) -> None:
    (d / "weights.safetensors").write_bytes(b"x" * 100)


def _gated_state(gate: threading.Event, started: threading.Event) -> DeferredFile:
    def write(path: Path) -> None:
        started.set()
        assert gate.wait(HANG_SECONDS)
        path.write_bytes(STATE)

    return DeferredFile("optimizer.safetensors", len(STATE), write)


def test_an_async_store_publishes_before_the_deferred_file_and_waits_for_it(tmp_path):
    store = CheckpointStore(tmp_path, sync=False)
    _model(store)
    gate, started = threading.Event(), threading.Event()
    store.write_checkpoint(_record("c1", "root", 1), _weights, _gated_state(gate, started))
    store.set_head("m", "c1", wait=False)
    assert started.wait(HANG_SECONDS)
    # Published: servable weights, HEAD moved, meta.json records the file still to come.
    ckpt = tmp_path / "models/m/checkpoints/c1"
    assert store.head("m") == "c1"
    assert store.get_checkpoint("m", "c1").files == {
        "optimizer.safetensors": len(STATE),
        "weights.safetensors": 100,
    }
    assert not (ckpt / "optimizer.safetensors").exists()
    # Readers of the state and moves of HEAD onto the checkpoint wait for the write.
    waited, moved = threading.Event(), threading.Event()
    threading.Thread(target=lambda: (store.wait_deferred("m", "c1"), waited.set())).start()
    store.set_head("m", "root")
    threading.Thread(target=lambda: (store.set_head("m", "c1"), moved.set())).start()
    assert not waited.wait(0.3) and not moved.is_set()
    assert store.head("m") == "root"
    gate.set()
    assert waited.wait(HANG_SECONDS) and moved.wait(HANG_SECONDS)
    assert (ckpt / "optimizer.safetensors").read_bytes() == STATE
    assert store.head("m") == "c1"
    store.flush()
    assert CheckpointStore(tmp_path).check_checkpoints() == []


def test_a_sync_store_writes_the_deferred_file_before_publishing(tmp_path):
    store = CheckpointStore(tmp_path, sync=True)
    _model(store)
    state = DeferredFile("optimizer.safetensors", len(STATE), lambda p: p.write_bytes(STATE))
    store.write_checkpoint(_record("c1", "root", 1), _weights, state)
    assert (tmp_path / "models/m/checkpoints/c1/optimizer.safetensors").read_bytes() == STATE


def test_a_deferred_file_of_the_wrong_size_fails_the_next_write(tmp_path):
    store = CheckpointStore(tmp_path, sync=False)
    _model(store)
    short = DeferredFile("optimizer.safetensors", len(STATE), lambda p: p.write_bytes(b"s"))
    # The failure reaches the next call into the queue: this write's own fsync submission
    # if the background write already failed, else the flush.
    with pytest.raises(OSError, match="optimizer.safetensors: wrote 1 bytes"):
        store.write_checkpoint(_record("c1", "root", 1), _weights, short)
        store.flush()
    assert not (tmp_path / "models/m/checkpoints/c1/optimizer.safetensors").exists()
    with pytest.raises(OSError, match="background write or fsync"):  # and refuses more
        store.write_checkpoint(_record("c2", "root", 1), _weights)


# A writer process: c1 complete, then c2 published with its deferred state half written
# when the test SIGKILLs it.
WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from tests.test_store_deferred import STATE, _model, _record, _weights
    from headway.store import CheckpointStore, DeferredFile

    store = CheckpointStore(sys.argv[1], sync=False)
    _model(store)
    whole = DeferredFile("optimizer.safetensors", len(STATE), lambda p: p.write_bytes(STATE))
    store.write_checkpoint(_record("c1", "root", 1), _weights, whole)
    store.set_head("m", "c1", wait=False)
    store.flush()

    def half_then_hang(path: Path) -> None:
        with open(path, "wb") as f:
            f.write(STATE[: len(STATE) // 2])
            f.flush()
            os.write(1, b"writing\\n")  # one write: the main thread prints too
            time.sleep(3600)

    hang = DeferredFile("optimizer.safetensors", len(STATE), half_then_hang)
    store.write_checkpoint(_record("c2", "c1", 2), _weights, hang)
    store.set_head("m", "c2", wait=False)
    os.write(1, b"published\\n")
    time.sleep(3600)
    """
)


def test_a_kill_during_a_deferred_write_leaves_only_complete_checkpoints(tmp_path):
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    watchdog = threading.Timer(HANG_SECONDS, proc.kill)  # a hung writer ends the readline
    watchdog.start()
    try:
        seen = set()
        while seen != {"writing", "published"}:
            line = proc.stdout.readline()
            assert line, "the writer process ended early"
            seen.add(line.strip())
        # Both reached: c2 is HEAD, its optimizer state half written under a temp name.
        ckpts = tmp_path / "models/m/checkpoints"
        assert (tmp_path / "models/m/HEAD").read_text().strip() == "c2"
        assert [p.name for p in (ckpts / "c2").iterdir() if p.name.startswith(".tmp-")]
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    store = CheckpointStore(tmp_path)  # the trainer's restart: recover
    assert [c.id for c in store.list_checkpoints("m")] == ["root", "c1"]
    assert store.head("m") == "c1"
    assert (ckpts / "c1/optimizer.safetensors").read_bytes() == STATE
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]


def test_a_deferred_write_waits_behind_no_other_models_fsync(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, sync=False)
    _model(store)
    other = ModelRecord(slug="n", team="u", is_base=False, base="b", created=time.time())
    root = CheckpointRecord(id="root", model="n", kind="full", step=0, created=time.time())
    store.create_model(other, root, lambda d: (d / "weights.safetensors").write_bytes(b"w"))
    release, real = threading.Event(), atomic.fsync_file

    def slow_disk(path):  # the fsync queue holds m's checkpoint until released
        assert release.wait(HANG_SECONDS)
        real(path)

    monkeypatch.setattr(atomic, "fsync_file", slow_disk)
    try:
        store.write_checkpoint(_record("c1", "root", 1), _weights)
        state = DeferredFile("optimizer.safetensors", len(STATE), lambda p: p.write_bytes(STATE))
        record = CheckpointRecord(
            id="c1", model="n", kind="full", step=1, created=0, parent_id="root",
            has_optimizer=True,
        )  # fmt: skip
        store.write_checkpoint(record, _weights, state)
        store.wait_deferred("n", "c1")  # returns although m's fsync has not run
        assert (tmp_path / "models/n/checkpoints/c1/optimizer.safetensors").read_bytes() == STATE
    finally:
        release.set()
    store.flush()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore/fadvise: Linux")
def test_superseded_files_leave_the_page_cache_once_on_disk(tmp_path):
    """Once a checkpoint is fsynced, the store drops the page cache of its optimizer state
    (read back only by a restore) and of its parent's files, keeping its own weights (what
    samplers read now): a full fork's next step writes into the freed pages."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"p" * (1 << 20))
    atomic.fsync_file(probe)
    atomic.drop_cached(probe)
    if cached_pages(probe):
        pytest.skip(f"this filesystem keeps dropped pages cached ({tmp_path}: tmpfs?)")
    store = CheckpointStore(tmp_path, sync=False)
    _model(store)
    big = b"o" * (1 << 20)

    def state() -> DeferredFile:
        return DeferredFile("optimizer.safetensors", len(big), lambda p: p.write_bytes(big))

    def weights(d: Path) -> None:
        (d / "weights.safetensors").write_bytes(b"w" * (1 << 20))

    store.write_checkpoint(_record("c1", "root", 1), weights, state())
    store.set_head("m", "c1", wait=False)
    store.flush()
    c1 = tmp_path / "models/m/checkpoints/c1"
    assert cached_pages(c1 / "optimizer.safetensors") == 0
    assert cached_pages(c1 / "weights.safetensors") > 0  # the head's: samplers read it
    store.write_checkpoint(_record("c2", "c1", 2), weights, state())
    store.set_head("m", "c2", wait=False)
    store.flush()
    c2 = tmp_path / "models/m/checkpoints/c2"
    assert cached_pages(c1 / "weights.safetensors") == 0  # superseded by c2
    assert cached_pages(c2 / "weights.safetensors") > 0
    assert cached_pages(c2 / "optimizer.safetensors") == 0
    # Dropped from memory, not from disk: a restore reads the same bytes.
    assert (c1 / "optimizer.safetensors").read_bytes() == big


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_background_writes_and_fsyncs_run_behind_serving(tmp_path):
    """The deferred write and the fsync thread run at BACKGROUND_NICE (they overlap the
    samplers' reload of the head just published); the caller's priority is untouched."""
    from concurrent.futures import Future

    from headway.store.durable import BACKGROUND_NICE, Syncer

    def nice(tid: int) -> int:
        return os.getpriority(os.PRIO_PROCESS, tid)

    mine = nice(threading.get_native_id())
    assert mine < BACKGROUND_NICE, "run the suite at a normal priority"
    store = CheckpointStore(tmp_path, sync=False)
    _model(store)
    seen: list[int] = []

    def write(path: Path) -> None:
        seen.append(nice(threading.get_native_id()))
        path.write_bytes(STATE)

    store.write_checkpoint(_record("c1", "root", 1), _weights, DeferredFile(
        "optimizer.safetensors", len(STATE), write))  # fmt: skip
    store.wait_deferred("m", "c1")
    assert seen == [BACKGROUND_NICE]
    syncer, gate = Syncer(), Future()
    syncer.submit("job", [tmp_path], after=gate)  # its thread waits for `gate`
    thread = syncer._thread  # this syncer's own (the store's has the same name)
    assert thread is not None and thread.native_id is not None
    deadline = time.monotonic() + HANG_SECONDS
    while nice(thread.native_id) != BACKGROUND_NICE and time.monotonic() < deadline:
        time.sleep(0.001)  # the thread lowers its priority as it starts
    assert nice(thread.native_id) == BACKGROUND_NICE
    gate.set_result(None)
    syncer.wait()
    store.flush()
    assert nice(threading.get_native_id()) == mine
