"""The checkpoint store on real files: atomic publishes, leftovers removed, HEAD integrity."""

from __future__ import annotations

import json
import time

import pytest

from headway.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from headway.store import CheckpointRecord, CheckpointRef, CheckpointStore, ModelRecord


def _model(store: CheckpointStore, slug: str, source: str = "") -> None:
    record = ModelRecord(
        slug=slug, team="t", is_base=False, base="b", created=time.time(), source=source
    )
    root = CheckpointRecord(
        id="root",
        model=slug,
        kind="full",
        step=0,
        created=time.time(),
        ref=CheckpointRef(source, "x") if source else None,
    )
    store.create_model(record, root, lambda d: (d / "weights.safetensors").write_bytes(b"w"))


def test_a_checkpoint_appears_complete_or_not_at_all(tmp_path):
    store = CheckpointStore(tmp_path)
    _model(store, "m")

    def crash_midway(directory):
        (directory / "weights.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    record = CheckpointRecord(id="c1", model="m", kind="full", step=1, created=0, parent_id="root")
    with pytest.raises(RuntimeError):
        store.write_checkpoint(record, crash_midway)
    assert [c.id for c in store.list_checkpoints("m")] == ["root"]
    assert not list((tmp_path / "models/m/checkpoints").glob(".tmp-*"))
    store.write_checkpoint(record, lambda d: (d / "weights.safetensors").write_bytes(b"ok"))
    assert [c.id for c in store.list_checkpoints("m")] == ["root", "c1"]
    assert store.head("m") == "root"  # writing a checkpoint never moves HEAD
    store.set_head("m", "c1")
    assert store.head("m") == "c1"


def test_head_only_names_complete_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path)
    _model(store, "m")
    partial = tmp_path / "models/m/checkpoints/c9"
    partial.mkdir()  # a directory without meta.json is not a checkpoint
    with pytest.raises(NotFound):
        store.set_head("m", "c9")
    with pytest.raises(NotFound):
        store.set_head("m", "../../other")
    assert store.head("m") == "root"


def test_opening_the_store_removes_leftovers_of_interrupted_writes(tmp_path):
    store = CheckpointStore(tmp_path)
    _model(store, "m")
    leftovers = [
        tmp_path / "models/.tmp-newmodel-1234",
        tmp_path / "models/m/checkpoints/.tmp-c2-abcd",
        tmp_path / "models/.deleted-old-99",
    ]
    for path in leftovers:
        path.mkdir(parents=True)
        (path / "meta.json").write_text("{}")
    (tmp_path / "models/m/.tmp-HEAD-ffff").write_text("c2\n")
    removed = CheckpointStore(tmp_path).remove_leftovers() or None
    assert removed is None  # the constructor already removed them
    assert not any(p.exists() for p in leftovers)
    assert not (tmp_path / "models/m/.tmp-HEAD-ffff").exists()
    assert store.head("m") == "root" and [m.slug for m in store.list_models()] == ["m"]


def test_model_creation_is_atomic_and_names_are_unique(tmp_path):
    store = CheckpointStore(tmp_path)
    _model(store, "m")
    with pytest.raises(AlreadyExists):
        _model(store, "m")
    with pytest.raises(InvalidArgument, match="not valid"):
        _model(store, "../evil")

    def crash(directory):
        raise RuntimeError("interrupted")

    record = ModelRecord(slug="n", team="t", is_base=False, base="b", created=0)
    with pytest.raises(RuntimeError):
        store.create_model(
            record, CheckpointRecord(id="r", model="n", kind="full", step=0, created=0), crash
        )
    assert [m.slug for m in store.list_models()] == ["m"]


def test_delete_refuses_sources_and_leaves_no_trace(tmp_path):
    store = CheckpointStore(tmp_path)
    _model(store, "src")
    _model(store, "fork", source="src")
    with pytest.raises(FailedPrecondition, match="fork"):
        store.delete_model("src")
    store.delete_model("fork")
    store.delete_model("src")
    assert store.list_models() == [] and [p.name for p in (tmp_path / "models").iterdir()] == []


def test_records_round_trip_through_json(tmp_path):
    store = CheckpointStore(tmp_path)
    _model(store, "m")
    meta = json.loads((tmp_path / "models/m/checkpoints/root/meta.json").read_text())
    assert meta["id"] == "root" and meta["kind"] == "full" and meta["step"] == 0
    assert store.get_checkpoint("m", "root") == CheckpointRecord.from_json(meta)


def test_visibility_a_team_sees_public_bases_and_its_own_models_only(tmp_path):
    """The one home of the visibility rule (every service asks the store)."""
    store = CheckpointStore(tmp_path)
    base = ModelRecord(slug="b", team="", is_base=True, base="b", created=time.time())
    store.create_model(base, CheckpointRecord(id="base", model="b", kind="base", step=0, created=0))
    _model(store, "mine")  # team "t"
    assert store.visible_model("mine", "t").slug == "mine"
    assert store.visible_model("b", "other").is_base
    with pytest.raises(NotFound) as theirs:
        store.visible_model("mine", "other")
    with pytest.raises(NotFound) as unknown:
        store.visible_model("nothing", "other")
    # Another team's model reads exactly like one that does not exist.
    assert str(theirs.value).replace("mine", "X") == str(unknown.value).replace("nothing", "X")
    with pytest.raises(InvalidArgument, match="model is empty"):
        store.visible_model("", "t")
    assert [m.slug for m in store.visible_models("t")] == ["b", "mine"]
    assert [m.slug for m in store.visible_models("other")] == ["b"]
