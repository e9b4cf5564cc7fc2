"""Asynchronous durability of the store: writes visible at once, fsyncs in the background,
what a power loss may tear removed on the next open; safetensors written from memory."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from headway.store import CheckpointRecord, CheckpointStore, ModelRecord, atomic, tensorfile
from headway.store.durable import Syncer
from headway.store.pages import SpareChoice, has_hole, make_spare
from headway.store.tensorfile import (
    plan_safetensors,
    read_safetensors,
    safetensors_header,
    write_plan,
    write_plan_direct,
    write_safetensors,
)
from tests.helpers_pages import cached_pages, file_pages


def _model(store: CheckpointStore, slug: str = "m") -> None:
    record = ModelRecord(slug=slug, team="t", is_base=False, base="b", created=time.time())
    root = CheckpointRecord(id="root", model=slug, kind="full", step=0, created=time.time())
    store.create_model(record, root, lambda d: (d / "weights.safetensors").write_bytes(b"w"))


def _step(store: CheckpointStore, ckpt: str, parent: str, step: int, data: bytes = b"x" * 100):
    record = CheckpointRecord(
        id=ckpt, model="m", kind="full", step=step, created=0, parent_id=parent
    )
    store.write_checkpoint(record, lambda d: (d / "weights.safetensors").write_bytes(data))
    store.set_head("m", ckpt, wait=False)


def test_an_async_store_shows_writes_at_once_and_flush_makes_them_durable(tmp_path):
    store = CheckpointStore(tmp_path, sync=False)
    _model(store)
    _step(store, "c1", "root", 1)
    # Visible to another process's reader right away (rename done), HEAD moved.
    reader = CheckpointStore(tmp_path, recover=False)
    assert reader.head("m") == "c1"
    assert reader.get_checkpoint("m", "c1").files == {"weights.safetensors": 100}
    store.flush()
    assert not store.syncer.pending(str(store.checkpoint_dir("m", "c1")))


def test_reopening_removes_a_checkpoint_a_power_loss_tore_and_moves_head_back(tmp_path):
    store = CheckpointStore(tmp_path, sync=False)
    _model(store)
    _step(store, "c1", "root", 1)
    _step(store, "c2", "c1", 2)
    store.flush()
    # What a power loss can leave of a checkpoint renamed before its data reached the disk:
    # the directory and meta.json, the weights file empty.
    (tmp_path / "models/m/checkpoints/c2/weights.safetensors").write_bytes(b"")
    reopened = CheckpointStore(tmp_path)
    assert [c.id for c in reopened.list_checkpoints("m")] == ["root", "c1"]
    assert reopened.head("m") == "c1"
    assert not [p for p in (tmp_path / "models/m/checkpoints").iterdir() if p.name[0] == "."]


def _sparse_files_report_holes(directory) -> bool:
    probe = directory / "probe"
    with probe.open("wb") as f:
        f.truncate(1 << 20)
    fd = os.open(probe, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < (1 << 20)
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def _holed(path) -> None:
    """What a power loss leaves of a file sized before its data was written."""
    size = path.stat().st_size
    path.unlink()
    with path.open("wb") as f:
        f.truncate(size)


def test_reopening_removes_a_checkpoint_whose_sized_first_file_lost_its_data(tmp_path):
    if not _sparse_files_report_holes(tmp_path):
        pytest.skip("this filesystem does not report holes (SEEK_HOLE)")
    store = CheckpointStore(tmp_path, sync=False)
    _model(store)
    _step(store, "c1", "root", 1, data=b"x" * 8192)
    for ckpt, parent, step in (("c2", "c1", 2), ("c3", "c2", 3)):
        record = CheckpointRecord(
            id=ckpt, model="m", kind="full", step=step, created=0, parent_id=parent,
            sized_first=["weights.safetensors"],
        )  # fmt: skip
        store.write_checkpoint(
            record, lambda d: (d / "weights.safetensors").write_bytes(b"y" * 8192)
        )
        store.set_head("m", ckpt, wait=False)
    store.flush()
    ckpts = tmp_path / "models/m/checkpoints"
    assert (ckpts / "c2/.durable").exists() and not (ckpts / "c1/.durable").exists()
    # c1: written as a new file, its size proves its data; a hole (a filesystem keeping
    # zeros sparse) is no sign of loss. c2: fsynced (marked): complete whatever its blocks.
    # c3: its fsync never ran (no mark) and its data is gone: torn.
    _holed(ckpts / "c1/weights.safetensors")
    _holed(ckpts / "c2/weights.safetensors")
    (ckpts / "c3/.durable").unlink()
    _holed(ckpts / "c3/weights.safetensors")
    assert has_hole(ckpts / "c3/weights.safetensors")
    reopened = CheckpointStore(tmp_path)
    assert [c.id for c in reopened.list_checkpoints("m")] == ["root", "c1", "c2"]
    assert reopened.head("m") == "c2"


def test_a_sync_store_records_no_sized_first_files(tmp_path):
    store = CheckpointStore(tmp_path)
    _model(store)
    record = CheckpointRecord(
        id="c1", model="m", kind="full", step=1, created=0, parent_id="root",
        sized_first=["weights.safetensors"],
    )  # fmt: skip
    store.write_checkpoint(record, lambda d: (d / "weights.safetensors").write_bytes(b"x"))
    assert CheckpointStore(tmp_path).get_checkpoint("m", "c1").sized_first == []


def test_a_spare_is_made_ahead_taken_once_and_a_leftover_when_the_store_reopens(tmp_path):
    store = CheckpointStore(tmp_path, sync=False)
    _model(store)
    store.prepare_spare("m", "weights.safetensors", 5000)
    store.prepare_spare("m", "weights.safetensors", 7000)  # one is being made: kept
    spare = store.take_spare("m", "weights.safetensors", wait=True)
    assert spare is not None and spare.stat().st_size == 5000
    assert spare.parent == tmp_path / "models/m/checkpoints" and spare.name[0] == "."
    assert store.take_spare("m", "weights.safetensors") is None  # taken
    assert [c.id for c in store.list_checkpoints("m")] == ["root"]  # not a checkpoint
    store.prepare_spare("m", "weights.safetensors", 5000)
    other = store.take_spare("m", "weights.safetensors", wait=True)  # never written over
    assert other is not None and other != spare  # a name of its own
    CheckpointStore(tmp_path)  # the writer reopens: leftovers go
    assert not spare.exists() and not other.exists()
    store.prepare_spare("gone", "weights.safetensors", 10)  # no such model: no spare
    assert store.take_spare("gone", "weights.safetensors", wait=True) is None


def test_spare_choice_times_both_ways_then_keeps_the_faster_and_rechecks():
    choice = SpareChoice(samples=2, recheck=4)
    ways = []
    for seconds_spare, seconds_new in [(0.1, 0.3)] * 3:
        way = choice.use_spare()
        ways.append(way)
        choice.record(way, seconds_spare if way else seconds_new)
    assert ways == [True, False, True] and not choice.decided
    choice.record(False, 0.3)
    assert choice.decided and choice.faster() and choice.median(False) == 0.3
    ways = []
    for _ in range(8):
        ways.append(choice.use_spare())
        choice.record(ways[-1], 0.1 if ways[-1] else 0.3)
    assert ways == [True, True, True, False] * 2  # every 4th write the other way
    for _ in range(2):  # writes over a spare got slow: the choice turns
        choice.record(True, 0.9)
    assert not choice.faster() and not choice.use_spare()


@pytest.mark.parametrize("spare_size", [0, 100, 4096, 1 << 16])
def test_write_plan_over_a_spare_of_any_size_writes_the_file(tmp_path, spare_size):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(64, 16, generator=gen), "b": torch.randn(3, generator=gen)}
    spare = make_spare(tmp_path / ".tmp-spare", spare_size)
    assert spare.stat().st_size == spare_size
    size = write_plan(tmp_path / "w.safetensors", plan_safetensors(tensors), spare=spare)
    assert not spare.exists()
    assert (tmp_path / "w.safetensors").stat().st_size == size
    assert not has_hole(tmp_path / "w.safetensors")
    back = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("floats", [5, 1024, (8 << 20) // 4 + 1000], ids=["tail", "4k", "8m+"])
def test_a_direct_write_writes_write_plans_bytes_around_the_page_cache(tmp_path, floats):
    gen = torch.Generator().manual_seed(0)
    tensors = {"m": [torch.randn(floats, generator=gen), torch.randn(7, generator=gen)],
               "s": torch.arange(3.0)}  # fmt: skip
    plan = plan_safetensors(tensors, {"k": "v"})
    size = write_plan_direct(tmp_path / "d.safetensors", plan)
    if size is None:
        pytest.skip(f"no direct I/O on the filesystem of {tmp_path}")
    write_plan(tmp_path / "c.safetensors", plan)
    direct, cached = tmp_path / "d.safetensors", tmp_path / "c.safetensors"
    assert size == plan.size == direct.stat().st_size
    # Only the last partial block went through the cache; the page-cache write is all in it.
    assert cached_pages(direct) <= 1, (cached_pages(direct), file_pages(direct))
    assert cached_pages(cached) == file_pages(cached)
    assert direct.read_bytes() == cached.read_bytes()


def test_a_filesystem_refusing_direct_writes_gets_none_nothing_left_and_no_second_ask(
    tmp_path, monkeypatch
):
    """EINVAL when O_DIRECT is asked for (tmpfs before Linux 6.6, ramfs, some FUSE)."""
    real, asked = fcntl.fcntl, []

    def refusing(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            asked.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(tensorfile.fcntl, "fcntl", refusing)
    monkeypatch.setattr(tensorfile, "_DIRECT_REFUSED", set())  # restored after the test
    plan = plan_safetensors({"a": torch.arange(10.0)})
    assert write_plan_direct(tmp_path / "x.safetensors", plan) is None
    assert not (tmp_path / "x.safetensors").exists() and len(asked) == 1
    assert write_plan_direct(tmp_path / "y.safetensors", plan) is None
    assert not (tmp_path / "y.safetensors").exists() and len(asked) == 1  # remembered
    assert write_plan(tmp_path / "x.safetensors", plan) == plan.size  # the caller's way


@pytest.mark.parametrize("floats", [5, (8 << 20) // 4 + 1000], ids=["tail", "8m+"])
def test_a_failed_direct_write_raises_its_error_and_leaves_nothing(tmp_path, monkeypatch, floats):
    real = os.write

    def full_disk(fd: int, data: Any) -> int:
        if len(memoryview(data)) % 4096:  # the last partial block
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(tensorfile.os, "write", full_disk)
    plan = plan_safetensors({"a": torch.randn(floats)})
    with pytest.raises(OSError) as raised:
        write_plan_direct(tmp_path / "x.safetensors", plan)
    assert raised.value.errno == errno.ENOSPC
    assert not (tmp_path / "x.safetensors").exists()


def test_a_short_direct_write_is_finished_through_the_page_cache(tmp_path, monkeypatch):
    real, calls = os.write, []

    def short(fd: int, data: Any) -> int:
        calls.append(len(memoryview(data)))
        return real(fd, memoryview(data)[: 2 * 4096] if len(calls) == 1 else data)

    monkeypatch.setattr(tensorfile.os, "write", short)
    plan = plan_safetensors({"a": torch.randn((8 << 20) // 4 + 1000)})
    size = write_plan_direct(tmp_path / "d.safetensors", plan)
    if size is None:
        pytest.skip(f"no direct I/O on the filesystem of {tmp_path}")
    monkeypatch.undo()
    write_plan(tmp_path / "c.safetensors", plan)
    assert len(calls) > 2  # the rest after the short write, unaligned
    assert (tmp_path / "d.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()


def test_a_head_naming_a_lost_checkpoint_falls_back_to_the_latest_complete_one(tmp_path):
    store = CheckpointStore(tmp_path, sync=False)
    _model(store)
    _step(store, "c1", "root", 1)
    store.flush()
    (tmp_path / "models/m/HEAD").write_text("c7\n")  # its directory never reached the disk
    assert CheckpointStore(tmp_path).head("m") == "c1"


def test_complete_checkpoints_survive_reopening(tmp_path):
    store = CheckpointStore(tmp_path)
    _model(store)
    _step(store, "c1", "root", 1)
    assert CheckpointStore(tmp_path).check_checkpoints() == []
    assert CheckpointStore(tmp_path).head("m") == "c1"


def test_set_head_to_a_checkpoint_waits_for_its_background_fsync(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, sync=False)
    _model(store)
    release = threading.Event()
    real = atomic.fsync_file

    def slow_disk(path):  # the fsync thread holds c1's fsync until released
        release.wait(10)
        real(path)

    monkeypatch.setattr(atomic, "fsync_file", slow_disk)
    _step(store, "c1", "root", 1)
    store.set_head("m", "root")  # nothing pending for root: at once
    moved = threading.Event()
    t = threading.Thread(target=lambda: (store.set_head("m", "c1"), moved.set()))
    t.start()
    assert not moved.wait(0.3), "set_head to c1 returned before c1 was fsynced"
    assert store.head("m") == "root"
    release.set()
    assert moved.wait(10)
    t.join()
    assert store.head("m") == "c1"


def test_syncer_runs_jobs_in_order_and_bounds_the_queue(tmp_path):
    files = []
    for i in range(5):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x")
        files.append(f)
    syncer = Syncer(max_pending=1)
    for i, f in enumerate(files):
        syncer.submit(f"k{i}", [f, tmp_path])
        assert len(syncer._jobs) <= 1  # noqa: SLF001
    syncer.wait()
    assert not any(syncer.pending(f"k{i}") for i in range(5))


def test_a_failed_fsync_is_raised_to_the_next_writer(tmp_path, monkeypatch):
    syncer = Syncer()
    syncer.submit("gone", [tmp_path / "missing" / "f"])  # removed since: nothing to fsync
    syncer.wait()

    def broken_disk(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic, "fsync_file", broken_disk)
    (tmp_path / "f").write_bytes(b"x")
    syncer.submit("f", [tmp_path / "f"])
    with pytest.raises(OSError, match="background write or fsync"):
        syncer.wait()
    with pytest.raises(OSError, match="background write or fsync"):
        syncer.submit("next", [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_write_safetensors_reads_back_as_safetensors_wrote_it(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(3, 5, generator=gen) * 10).to(dtype)
    parts = [(torch.randn(4, generator=gen) * 10).to(dtype), torch.zeros(0, dtype=dtype),
             (torch.randn(2, 3, generator=gen) * 10).to(dtype)]  # fmt: skip
    scalar = torch.tensor(7, dtype=dtype)
    size = write_safetensors(
        tmp_path / "t.safetensors", {"a": a, "moments": parts, "s": scalar}, {"k": "v"}
    )
    assert size == (tmp_path / "t.safetensors").stat().st_size
    back = load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(back["a"], a)
    assert torch.equal(back["moments"], torch.cat([p.reshape(-1) for p in parts]))
    assert torch.equal(back["s"], scalar)
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
    raw = (tmp_path / "t.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["a"]["shape"] == [3, 5]
    # The same file laid out from dtypes and shapes alone (a deferred file's size up front).
    layout = {"a": (dtype, [3, 5]), "moments": (dtype, [10]), "s": (dtype, [])}
    head, planned = safetensors_header(layout, {"k": "v"})
    assert planned == size and raw.startswith(head)


def test_read_safetensors_equals_load_file_whatever_the_alignment(tmp_path):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    tensors = {
        "a_bf16_odd": torch.randn(3, generator=gen).to(torch.bfloat16),  # 6 bytes
        "b_f32": torch.randn(2, 5, generator=gen),  # starts at byte 6 in safetensors' layout
        "c_empty": torch.zeros(0, 4),
        "d_i64": torch.arange(5),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"))
    ours = read_safetensors(tmp_path / "x.safetensors")
    theirs = load_file(str(tmp_path / "x.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
