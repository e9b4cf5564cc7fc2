"""`CheckpointStore`: the directory tree that is the truth about models and checkpoints.

    <root>/models/<slug>/model.json                     ModelRecord
    <root>/models/<slug>/HEAD                           id of the head checkpoint
    <root>/models/<slug>/checkpoints/<id>/meta.json     CheckpointRecord (written last)
    <root>/models/<slug>/checkpoints/<id>/adapter_model.safetensors + adapter_config.json
                                                        a LoRA checkpoint (a PEFT adapter dir)
    <root>/models/<slug>/checkpoints/<id>/weights.safetensors      a full checkpoint (HF names)
    <root>/models/<slug>/checkpoints/<id>/optimizer.safetensors    AdamW state

Invariants: a checkpoint directory appears only complete (built under a temp name, then
renamed; meta.json, written last, records the size of every file), but for a deferred
optimizer state that follows in the background (see Durability); HEAD names only a
complete checkpoint and moves atomically; a model directory appears only with its
model.json, root checkpoint and HEAD. Leftovers of interrupted writes carry the temp prefix
and are removed when a store opens. Many processes may read; one trainer writes a given
model.

Durability (`sync`): a synchronous store fsyncs every file and directory before a write
returns, so what it wrote survives a power loss. An asynchronous one (`sync=False`)
returns once the files are written and renamed — that already survives a crash of the
process, whose writes are in the kernel's page cache — and fsyncs them in the background
in write order (`durable.Syncer`). It may also publish a checkpoint before its large
optimizer state is written (`DeferredFile`): the weights are complete and servable, the
state follows on a thread of its own, and the checkpoint's fsyncs after it. A process
crash may then lose the last checkpoints whose deferred file was not yet written, and a
power loss those not yet fsynced, with their head moves; opening the store for writing
(`recover`) removes a checkpoint whose files are not those meta.json records (missing or
torn) and moves a HEAD that named it back to its nearest complete ancestor.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from headway.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from headway.store import atomic
from headway.store.durable import Syncer, background_priority
from headway.store.pages import has_hole, make_spare
from headway.store.records import CheckpointRecord, CheckpointRef, ModelRecord
from headway.store.retention import Retention, kept

# Matched whole (`fullmatch`): `$` would also accept a trailing newline ("tiny\n").
SLUG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# What a checkpoint id the store made can look like ("base", "s000012-1a2b3c4d"): anything
# else is NotFound before the filesystem is asked (a client's id may be megabytes long,
# hold "/", ".." or NUL, which the filesystem answers with errors, not "not found").
CHECKPOINT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A tag: a name that can never be a checkpoint id (`new_checkpoint_id`'s "s000123-...").
TAG_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
_ID_LIKE = re.compile(r"s\d{6,}-.*")
TAGS_FILE = "tags.json"
RETENTION_FILE = "retention.json"
EVALS_FILE = "evals.json"  # in a checkpoint's directory, beside its meta.json
# OptimStep request ids whose checkpoints a delete removed: id → that checkpoint's id.
PRUNED_FILE = "pruned-requests.json"
PRUNED_KEPT = 4096  # ids remembered there, newest
# Longest a deferred write waits for the samplers' reload (`_start_deferred`): the pause
# also holds the store's fsync queue (a checkpoint's fsync follows its deferred write), and
# lengthens the window in which a kill -9 takes back the last acknowledged step.
MAX_DEFER_PAUSE = 0.25
ADAPTER_FILE = "adapter_model.safetensors"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"
# Made in a checkpoint directory once its fsyncs are done, if it has `sized_first` files:
# from then on recovery need not look for holes in them (a lost mark only costs a check).
DURABLE_MARK = ".durable"
_DELETED_PREFIX = ".deleted-"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeferredFile:
    """A checkpoint file an asynchronous store writes after publishing the directory.

    Its size is known before it is written (`headway.store.tensorfile.safetensors_header`),
    so meta.json records it from the start: a crash that interrupts the write leaves a
    checkpoint whose file is missing, which `check_checkpoints` removes (moving a HEAD that
    named it back to the parent). `write(path)` writes the file at `path` and must read
    what it writes before anything changes it (the caller waits: `wait_deferred`).
    """

    name: str
    size: int
    write: Callable[[Path], object]


def check_slug(name: str) -> str:
    """`name` if it is a valid model slug, else InvalidArgument saying the rule."""
    if not SLUG_RE.fullmatch(name or ""):
        raise InvalidArgument(
            f"model name {name!r} is not valid: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return name


class CheckpointStore:
    """Models, their checkpoint trees and heads, on disk under `root`."""

    def __init__(
        self, root: str | Path, recover: bool = True, sync: bool = True, max_pending: int = 2
    ) -> None:
        """Open (creating) the store at `root`.

        `recover` removes leftovers of interrupted writes and checkpoints a power loss tore:
        only the writer (the trainer) may, since a reader cannot tell a leftover from a
        write in progress. `sync=False` moves the fsyncs of checkpoints and heads to a
        background thread (at most `max_pending` writes ahead of the disk; see the module
        docstring).
        """
        self.root = Path(root).resolve()
        self.models_dir = self.root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.sync = sync
        # A checkpoint's jobs: its fsyncs, then its HEAD's.
        self.syncer = Syncer(2 * max_pending)
        # Deferred writes in flight, by checkpoint (see `_start_deferred`).
        self._deferred: dict[str, Future[None]] = {}
        self._deferred_lock = threading.Lock()
        # Spare files made ahead of a model's next write, by (model, file name).
        self._spares: dict[tuple[str, str], Future[Path]] = {}
        if recover:
            self.remove_leftovers()
            self.check_checkpoints()

    def flush(self) -> None:
        """Block until everything written so far is fsynced (a no-op for a sync store)."""
        self.syncer.wait()

    # ----------------------------------------------------------------- recovery
    def remove_leftovers(self) -> list[Path]:
        """Delete what interrupted writes left behind; returns the removed paths."""
        removed = []
        candidates = list(self.models_dir.iterdir())
        for model_dir in self.models_dir.iterdir():
            if model_dir.is_dir() and not model_dir.name.startswith("."):
                candidates += list(model_dir.iterdir())
                ckpts = model_dir / "checkpoints"
                if ckpts.is_dir():
                    candidates += list(ckpts.iterdir())
        for path in candidates:
            if path.name.startswith((atomic.TMP_PREFIX, _DELETED_PREFIX)):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path)
        return removed

    def check_checkpoints(self) -> list[Path]:
        """Remove checkpoints whose files are not those their meta.json records (what a
        power loss can leave of a checkpoint written without fsync), then point a HEAD
        naming a missing checkpoint at its nearest complete ancestor. Returns the removed
        directories."""
        removed = []
        for model_dir in self.models_dir.iterdir():
            ckpts = model_dir / "checkpoints"
            if model_dir.name.startswith(".") or not ckpts.is_dir():
                continue
            parents: dict[str, str] = {}
            for d in ckpts.iterdir():
                if d.name.startswith("."):
                    continue
                problem, parent = _torn(d)
                if problem:
                    log.warning("removing torn checkpoint %s: %s", d, problem)
                    parents[d.name] = parent
                    doomed = ckpts / f"{_DELETED_PREFIX}{d.name}-{secrets.token_hex(4)}"
                    os.rename(d, doomed)
                    shutil.rmtree(doomed, ignore_errors=True)
                    removed.append(d)
            if removed:
                atomic.fsync_dir(ckpts)
            self._repair_head(model_dir, parents)
        return removed

    def _repair_head(self, model_dir: Path, parents: dict[str, str]) -> None:
        head_file = model_dir / "HEAD"
        try:
            head = head_file.read_text().strip()
        except OSError:
            head = ""
        ckpts = model_dir / "checkpoints"
        if head and (ckpts / head / META_FILE).is_file():
            return
        # Walk up what is known of the lost head's lineage, else take the latest checkpoint.
        cur = parents.get(head, "")
        while cur and not (ckpts / cur / META_FILE).is_file():
            cur = parents.get(cur, "")
        if not cur:
            metas = [
                json.loads((d / META_FILE).read_text())
                for d in ckpts.iterdir()
                if not d.name.startswith(".") and (d / META_FILE).is_file()
            ]
            if not metas:
                return
            cur = max(metas, key=lambda m: (m["step"], m["created"]))["id"]
        log.warning("HEAD of %s named a lost checkpoint %r: moved to %s", model_dir.name, head, cur)
        atomic.write_bytes(head_file, (cur + "\n").encode())

    # ------------------------------------------------------------------- models
    def model_dir(self, slug: str) -> Path:
        return self.models_dir / slug

    def has_model(self, slug: str) -> bool:
        return (
            bool(SLUG_RE.fullmatch(slug or "")) and (self.model_dir(slug) / "model.json").is_file()
        )

    def get_model(self, slug: str) -> ModelRecord:
        """The record of `slug`, or NotFound."""
        if not self.has_model(slug):
            raise NotFound(f"model {slug!r} not found")
        return ModelRecord.from_json(json.loads((self.model_dir(slug) / "model.json").read_text()))

    def visible_model(self, slug: str, team: str) -> ModelRecord:
        """The record of `slug` if `team` may see it: a public base, or a model of `team`.

        The one home of the visibility rule. Another team's model is NotFound with the
        same message as a model that does not exist: its existence never leaks.
        """
        if not slug:
            raise InvalidArgument("model is empty: give the model's slug")
        record = self.get_model(slug)
        if not record.is_base and record.team != team:
            raise NotFound(f"model {slug!r} not found")
        return record

    def visible_models(self, team: str) -> list[ModelRecord]:
        """Every model `team` may see (see `visible_model`), in `list_models` order."""
        return [m for m in self.list_models() if m.is_base or m.team == team]

    def list_models(self) -> list[ModelRecord]:
        """Every model: bases first, then forks, each sorted by slug."""
        records = [
            self.get_model(d.name)
            for d in self.models_dir.iterdir()
            if not d.name.startswith(".") and (d / "model.json").is_file()
        ]
        return sorted(records, key=lambda r: (not r.is_base, r.slug))

    def create_model(
        self,
        record: ModelRecord,
        root: CheckpointRecord,
        write_root_files: Callable[[Path], None] | None = None,
    ) -> ModelRecord:
        """Create a model with its root checkpoint as head, all in one atomic rename."""
        check_slug(record.slug)
        final = self.model_dir(record.slug)
        if final.exists():
            raise AlreadyExists(f"model name {record.slug!r} is taken; choose another name")
        tmp = self.models_dir / f"{atomic.TMP_PREFIX}{record.slug}-{secrets.token_hex(4)}"
        ckpt_dir = tmp / "checkpoints" / root.id
        ckpt_dir.mkdir(parents=True)
        try:
            if write_root_files is not None:
                write_root_files(ckpt_dir)
            (ckpt_dir / META_FILE).write_text(json.dumps(root.to_json(), indent=2))
            (tmp / "model.json").write_text(json.dumps(record.to_json(), indent=2))
            (tmp / "HEAD").write_text(root.id + "\n")
            atomic.publish_dir(tmp, final)
        except FileExistsError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise AlreadyExists(
                f"model name {record.slug!r} is taken; choose another name"
            ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return record

    def dependents(self, slug: str) -> list[str]:
        """Models whose files or lineage reference `slug` (their source, frozen weights)."""
        out = []
        for rec in self.list_models():
            if rec.slug == slug:
                continue
            refs = {rec.source, rec.frozen.model if rec.frozen else ""}
            if slug in refs:
                out.append(rec.slug)
        return out

    def delete_model(self, slug: str) -> None:
        """Remove a fork. Refused for bases and for models other models fork from.

        Forks reference their source's files (copy-on-write), so deleting a source would
        break them: the caller must delete the dependents first.
        """
        record = self.get_model(slug)
        if record.is_base:
            raise FailedPrecondition(f"model {slug!r} is a base: bases are read-only")
        self.syncer.wait()  # no background write into what is about to go
        deps = self.dependents(slug)
        if deps:
            raise FailedPrecondition(
                f"model {slug!r} is the source of {', '.join(sorted(deps))}, which reference "
                "its checkpoints; delete those first"
            )
        # Rename first (atomic), then remove: a crash mid-delete leaves a leftover, not a
        # half-deleted model.
        doomed = self.models_dir / f"{_DELETED_PREFIX}{slug}-{secrets.token_hex(4)}"
        with self._deferred_lock:  # its spares go with its directory
            for key in [k for k in self._spares if k[0] == slug]:
                del self._spares[key]
        os.rename(self.model_dir(slug), doomed)
        atomic.fsync_dir(self.models_dir)
        shutil.rmtree(doomed, ignore_errors=True)

    # -------------------------------------------------------------- checkpoints
    def checkpoint_dir(self, slug: str, ckpt_id: str) -> Path:
        return self.model_dir(slug) / "checkpoints" / ckpt_id

    @staticmethod
    def new_checkpoint_id(step: int) -> str:
        """A fresh, opaque, unique id (step and a random suffix, for people reading dirs)."""
        return f"s{step:06d}-{secrets.token_hex(4)}"

    def get_checkpoint(self, slug: str, ckpt_id: str) -> CheckpointRecord:
        """A complete checkpoint of `slug` by id or tag (`tag`), or NotFound."""
        self.get_model(slug)
        meta = self.checkpoint_dir(slug, ckpt_id) / META_FILE
        if not CHECKPOINT_ID_RE.fullmatch(ckpt_id) or not meta.is_file():
            tagged = self.tags(slug).get(ckpt_id) if TAG_RE.fullmatch(ckpt_id) else None
            if tagged is None:
                raise NotFound(f"checkpoint {ckpt_id!r} of model {slug!r} not found")
            meta = self.checkpoint_dir(slug, tagged) / META_FILE
            if not meta.is_file():  # the tagged checkpoint was deleted under it
                raise NotFound(f"tag {ckpt_id!r} of model {slug!r} names no checkpoint now")
        return CheckpointRecord.from_json(json.loads(meta.read_text()))

    # ------------------------------------------------------ deletes and pruning
    def built_on(self, slug: str) -> dict[str, str]:
        """Checkpoints of `slug` other models are built on, id → which models: a fork
        whose root references its files, a LoRA fork over its weights as frozen ones."""
        out: dict[str, list[str]] = {}
        for rec in self.list_models():
            if rec.slug == slug:
                continue
            if rec.frozen is not None and rec.frozen.model == slug:
                out.setdefault(rec.frozen.checkpoint, []).append(rec.slug)
            if rec.source == slug:
                root = self.root_checkpoint(rec.slug)
                if root.ref is not None and root.ref.model == slug:
                    out.setdefault(root.ref.checkpoint, []).append(rec.slug)
        return {ckpt: ", ".join(sorted(set(models))) for ckpt, models in out.items()}

    def protected(self, slug: str, pinned: dict[str, str] | None = None) -> dict[str, str]:
        """Checkpoints of `slug` that no retention policy removes, id → why: those tagged,
        those other models are built on, those `pinned` names (the Tinker API's names),
        and, for every checkpoint whose background write or fsync is not done, the last
        one before it that is: a crash before it reaches the disk falls back there (see
        `retention.kept`)."""
        out = {
            ckpt: f"models {models} are built on it" for ckpt, models in self.built_on(slug).items()
        }
        for name, ckpt in sorted(self.tags(slug).items()):
            out.setdefault(ckpt, f"tagged {name!r}")
        for ckpt, why in (pinned or {}).items():
            out.setdefault(ckpt, why)
        records = {r.id: r for r in self.list_checkpoints(slug)}
        for r in records.values():
            if not self._pending(r):
                continue
            node = records.get(r.parent_id)
            while node is not None and self._pending(node):
                node = records.get(node.parent_id)
            if node is not None:
                out.setdefault(
                    node.id, f"the last checkpoint on disk before {r.id}, still being written"
                )
        return out

    def delete_checkpoint(
        self, slug: str, ckpt_id: str, pinned: dict[str, str] | None = None
    ) -> int:
        """Delete checkpoint `ckpt_id` (an id or a tag) of `slug`: the bytes its files held.
        FailedPrecondition for the head, the root, a tagged checkpoint, one other models
        are built on and one `pinned`, saying why. Its children keep it as their
        `parent_id` (the tree lists them from there). Waits for the model's background
        writes first: a crash then never needs what it removes."""
        record = self.get_checkpoint(slug, ckpt_id)
        self._settle(slug)
        why = self._kept_whatever(slug, record, pinned)
        if why:
            raise FailedPrecondition(
                f"checkpoint {record.id} of model {slug!r} cannot be deleted: it is {why}"
            )
        self._note_pruned(slug, [record])
        return self._remove_checkpoint(record)

    def prune(
        self,
        slug: str,
        policy: Retention,
        dry_run: bool = False,
        skip_pending: bool = False,
        pinned: dict[str, str] | None = None,
    ) -> tuple[list[CheckpointRecord], dict[str, str], int]:
        """Apply `policy` to `slug`: (the checkpoints deleted, or that would be with
        `dry_run`, oldest first; id → why each other one is kept; bytes freed). With
        `skip_pending`, a checkpoint whose background write or fsync is not done stays
        (for the next prune), and so does the last one on disk before it: nothing waits.
        Without, the model's background writes are waited for first."""
        if not skip_pending and not dry_run:
            self._settle(slug)
        records = self.list_checkpoints(slug)
        reasons = kept(records, policy, self.head(slug), self.protected(slug, pinned))
        if skip_pending:
            for r in records:
                if r.id not in reasons and self._pending(r):
                    reasons[r.id] = "still being written"
        doomed = [r for r in records if r.id not in reasons]
        freed = sum(self._owned_bytes(r) for r in doomed)
        if not dry_run and doomed:
            self._note_pruned(slug, doomed)
            for r in doomed:
                self._remove_checkpoint(r)
        return doomed, reasons, freed

    def retention(self, slug: str) -> Retention:
        """The model's retention policy (applied after each optim step); inactive if none."""
        try:
            raw = json.loads((self.model_dir(slug) / RETENTION_FILE).read_text())
        except FileNotFoundError:
            return Retention()
        return Retention(**raw)

    def set_retention(self, slug: str, policy: Retention) -> None:
        """Keep `policy` as the model's retention policy (an inactive one: none)."""
        self._replace(self.model_dir(slug) / RETENTION_FILE, json.dumps(policy.to_json()))

    def model_bytes(self, slug: str) -> int:
        """Bytes the model's own files take in the store (referenced files not counted;
        nor leftovers and spares, which a write is about to rename or remove)."""
        return _tree_bytes(self.model_dir(slug))

    def _settle(self, slug: str) -> None:
        """Wait for the model's background writes and fsyncs (before a delete)."""
        for r in self.list_checkpoints(slug):
            self.wait_deferred(slug, r.id)
            if not self.sync:
                self.syncer.wait(str(self.checkpoint_dir(slug, r.id)))

    def _kept_whatever(
        self, slug: str, record: CheckpointRecord, pinned: dict[str, str] | None = None
    ) -> str:
        """Why no delete may remove `record` ("" if one may)."""
        if record.id == self.head(slug):
            return "the model's head (move the head first: set_head)"
        if record.step == 0:
            return "the model's root, the weights it was forked from (delete the model instead)"
        return self.protected(slug, pinned).get(record.id, "")

    def _pending(self, record: CheckpointRecord) -> bool:
        """Whether a background write or fsync of `record`'s files is not done."""
        directory = str(self.checkpoint_dir(record.model, record.id))
        with self._deferred_lock:
            deferred = directory in self._deferred
        return deferred or (not self.sync and self.syncer.pending(directory))

    def _owned_bytes(self, record: CheckpointRecord) -> int:
        return _tree_bytes(self.checkpoint_dir(record.model, record.id))

    def _note_pruned(self, slug: str, doomed: list[CheckpointRecord]) -> None:
        """Remember the OptimStep request ids of checkpoints about to go, so a late retry
        of one is refused rather than applied a second time (see `find_request`)."""
        noted = {r.request_id: r.id for r in doomed if r.request_id}
        if not noted:
            return
        path = self.model_dir(slug) / PRUNED_FILE
        try:
            known = json.loads(path.read_text())
        except FileNotFoundError:
            known = {}
        # The most recent ids only: a retry comes within minutes, not thousands of steps.
        kept_ids = list({**known, **noted}.items())[-PRUNED_KEPT:]
        atomic.write_bytes(path, json.dumps(dict(kept_ids)).encode(), sync=True)

    def _remove_checkpoint(self, record: CheckpointRecord) -> int:
        """Remove a checkpoint's directory once its background writes are done: renamed
        away first (atomic: a crash leaves a leftover, never half a checkpoint)."""
        directory = self.checkpoint_dir(record.model, record.id)
        self.wait_deferred(record.model, record.id)
        if not self.sync:
            self.syncer.wait(str(directory))
        size = self._owned_bytes(record)
        doomed = directory.with_name(f"{atomic.TMP_PREFIX}deleted-{record.id}")
        os.rename(directory, doomed)
        if self.sync:
            atomic.fsync_dir(directory.parent)
        else:
            self.syncer.submit(f"{record.model}/deleted/{record.id}", [directory.parent])
        shutil.rmtree(doomed, ignore_errors=True)
        return size

    # ------------------------------------------------------------------- evals
    def evals(self, slug: str, ckpt_id: str) -> dict[str, float]:
        """Evaluation results recorded on a checkpoint (`record_eval`), by metric name."""
        try:
            path = self.checkpoint_dir(slug, ckpt_id) / EVALS_FILE
            return dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return {}

    def record_eval(self, slug: str, ckpt_id: str, metrics: dict[str, float]) -> CheckpointRecord:
        """Add `metrics` to the evaluation results of checkpoint `ckpt_id` (id or tag) of
        `slug` (a name recorded again is replaced); the caller serialises writes."""
        record = self.get_checkpoint(slug, ckpt_id)
        merged = {**self.evals(slug, record.id), **metrics}
        self._replace(
            self.checkpoint_dir(slug, record.id) / EVALS_FILE, json.dumps(merged, sort_keys=True)
        )
        return record

    # -------------------------------------------------------------------- tags
    def tags(self, slug: str) -> dict[str, str]:
        """The model's tags: name → checkpoint id."""
        try:
            return dict(json.loads((self.model_dir(slug) / TAGS_FILE).read_text()))
        except FileNotFoundError:
            return {}

    def tag(self, slug: str, ckpt_id: str, name: str) -> CheckpointRecord:
        """Name checkpoint `ckpt_id` (an id or a tag) of `slug` `name`, usable wherever a
        checkpoint id is. InvalidArgument for a name that is not a tag name, AlreadyExists
        for one the model uses; the caller serialises writes to the model."""
        check_tag(name)
        record = self.get_checkpoint(slug, ckpt_id)
        tags = self.tags(slug)
        if name in tags:
            raise AlreadyExists(
                f"tag {name!r} of model {slug!r} already names checkpoint {tags[name]!r}; "
                "remove it first (headway models tag --delete) or choose another name"
            )
        tags[name] = record.id
        self._write_tags(slug, tags)
        return record

    def untag(self, slug: str, name: str) -> CheckpointRecord | None:
        """Remove tag `name` of `slug`; the checkpoint it named (None if that was deleted
        since). NotFound if it has no such tag."""
        tags = self.tags(slug)
        if name not in tags:
            raise NotFound(f"model {slug!r} has no tag {name!r}")
        ckpt_id = tags.pop(name)
        try:
            record: CheckpointRecord | None = self.get_checkpoint(slug, ckpt_id)
        except NotFound:
            record = None
        self._write_tags(slug, tags)
        return record

    def _write_tags(self, slug: str, tags: dict[str, str]) -> None:
        self._replace(self.model_dir(slug) / TAGS_FILE, json.dumps(tags, sort_keys=True))

    def root_checkpoint(self, slug: str) -> CheckpointRecord:
        """The model's step-0 checkpoint: the weights it was created (forked) with."""
        self.get_model(slug)
        # Ids start with their step (`new_checkpoint_id`): the root is found without
        # reading every checkpoint's record.
        for meta in sorted((self.model_dir(slug) / "checkpoints").glob(f"s{0:06d}-*/{META_FILE}")):
            record = CheckpointRecord.from_json(json.loads(meta.read_text()))
            if record.step == 0:
                return record
        roots = [r for r in self.list_checkpoints(slug) if r.step == 0]
        if not roots:
            raise NotFound(f"model {slug!r} has no step-0 checkpoint")
        return roots[0]

    def list_checkpoints(self, slug: str) -> list[CheckpointRecord]:
        """The model's complete checkpoints, oldest first."""
        self.get_model(slug)
        ckpts = self.model_dir(slug) / "checkpoints"
        records = [
            CheckpointRecord.from_json(json.loads((d / META_FILE).read_text()))
            for d in ckpts.iterdir()
            if not d.name.startswith(".") and (d / META_FILE).is_file()
        ]
        return sorted(records, key=lambda r: (r.created, r.step, r.id))

    def write_checkpoint(
        self,
        record: CheckpointRecord,
        write_files: Callable[[Path], None] | None = None,
        deferred: DeferredFile | None = None,
    ) -> CheckpointRecord:
        """Publish a checkpoint: files, then meta.json, fsynced, renamed into place.

        `deferred` (a large file only the trainer reads back: the optimizer state) is part
        of the directory before the rename in a synchronous store; an asynchronous one
        publishes the directory without it and writes it in the background, then fsyncs
        the checkpoint (see `DeferredFile`, `wait_deferred`). Does not move HEAD (see
        `set_head`).
        """
        self.get_model(record.model)
        self.syncer.raise_error()  # a disk that failed an fsync takes no more checkpoints
        final = self.checkpoint_dir(record.model, record.id)
        tmp = final.with_name(f"{atomic.TMP_PREFIX}{record.id}-{secrets.token_hex(4)}")
        tmp.mkdir(parents=True)
        later = deferred if deferred is not None and not self.sync else None
        if self.sync:  # every file fsynced before the rename: nothing to check later
            record.sized_first = []
        try:
            started = time.perf_counter()
            if write_files is not None:
                write_files(tmp)
            spent = time.perf_counter() - started
            if deferred is not None and later is None:
                deferred.write(tmp / deferred.name)
            files = {f.name: f.stat().st_size for f in tmp.iterdir()}
            if later is not None:
                files[later.name] = later.size
            record.files = dict(sorted(files.items()))
            record.created = time.time()
            (tmp / META_FILE).write_text(json.dumps(record.to_json(), indent=2))
            atomic.publish_dir(tmp, final, sync=self.sync)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            release = self._unread_after(record)
        except Exception as e:  # a hint to the kernel only: never fail a published checkpoint
            log.warning("page-cache release after %s/%s skipped: %s", record.model, record.id, e)
            release = []
        if self.sync:
            for path in release:
                atomic.drop_cached(path)
        else:
            written = self._start_deferred(final, later, spent) if later is not None else None
            files = [final / name for name in (*record.files, META_FILE)]
            mark = (final / DURABLE_MARK) if record.sized_first else None
            self.syncer.submit(
                str(final),
                [*files, final, final.parent],
                after=written,
                release=release,
                then=(lambda: _mark_durable(mark)) if mark is not None else None,
            )
        return record

    def _unread_after(self, record: CheckpointRecord) -> list[Path]:
        """Files nobody is expected to read soon once `record` is on disk, whose page cache
        the store drops then: its optimizer state (read back only by a restore) and the
        files of its parent in the same model (superseded by it; a sampler pinned to the
        parent reads them from disk). A full fork writes weights and twice their size in
        optimizer state at every step: kept cached, they would push out what samplers and
        the system read, and the next step's write would need fresh memory for all of it
        (in a VM that hands freed memory back to its host, a new page-cache page costs
        ~10x a reused one: 0.44 vs 0.04 s for 160 MB, AMD EPYC Zen 4 guest). Dropped,
        their pages are free for the next step's files."""
        out = [self.checkpoint_dir(record.model, record.id) / OPTIMIZER_FILE]
        if record.parent_id and not record.parent_model:
            try:
                parent = self.get_checkpoint(record.model, record.parent_id)
            except NotFound:
                return out
            if parent.ref is None and parent.files:
                out += [self.checkpoint_dir(parent.model, parent.id) / n for n in parent.files]
        return out

    def _start_deferred(self, final: Path, deferred: DeferredFile, pause: float) -> Future[None]:
        """Write `deferred` into `final` on a thread of its own (one per checkpoint; a model
        has at most one pending, since its next AdamW waits for it): a model's write waits
        behind no other model's write or fsync.

        It starts `pause` seconds late (capped at `MAX_DEFER_PAUSE`): the time the
        checkpoint's other files took to write. The samplers on this machine copy the new
        weights in just after they are published, in about that time (the same bytes,
        memory to memory); the optimizer state's write, twice as many bytes, would take half
        of the memory bus and a CPU from that copy. Measured, full fork of the 40M bench
        model, AMD EPYC 2 cores (`python -m bench.sampler_reload`): the copy 11.1-12.3 ms
        written at once, 9.3 ms (the copy floor: 8.3-8.5) after the pause. What it costs:
        the file is on disk that much later (so are the fsyncs queued behind it, and a
        kill -9 in the meantime takes back this step: `check_checkpoints`), and an AdamW
        of the model's next step that comes sooner waits for it."""
        future: Future[None] = Future()
        key = str(final)
        pause = min(pause, MAX_DEFER_PAUSE)

        def run() -> None:
            background_priority()  # behind serving: see headway.store.durable
            time.sleep(pause)
            try:
                _write_deferred(final, deferred)
            except BaseException as e:
                future.set_exception(e)  # kept: waiters and the fsync job raise it
                return
            future.set_result(None)
            with self._deferred_lock:
                self._deferred.pop(key, None)

        with self._deferred_lock:
            self._deferred[key] = future
        threading.Thread(target=run, name=f"deferred-{final.name}", daemon=True).start()
        return future

    def wait_deferred(self, slug: str, ckpt_id: str) -> None:
        """Block until the deferred file of (slug, ckpt_id), if any, is written (not yet
        fsynced): before reading it, or changing the tensors it is written from. Raises
        its failure."""
        with self._deferred_lock:
            future = self._deferred.get(str(self.checkpoint_dir(slug, ckpt_id)))
        if future is not None:
            future.result()

    # ------------------------------------------------------------------- spares
    def prepare_spare(self, slug: str, name: str, size: int) -> None:
        """Start making, on a background thread, a spare file for model `slug`'s next file
        `name` of about `size` bytes: its page-cache pages allocated ahead of the write
        that `take_spare` hands it to (`pages.make_spare`). A full fork's weights
        file at every OptimStep: allocating its pages is most of writing it. Does nothing
        if one is already made or being made."""
        key = (slug, name)
        ckpts = self.model_dir(slug) / "checkpoints"
        # A name of its own: another write may hold (and be renaming) an earlier spare.
        path = ckpts / f"{atomic.TMP_PREFIX}spare-{name}-{secrets.token_hex(4)}"
        with self._deferred_lock:
            if key in self._spares:
                return
            future: Future[Path] = Future()
            self._spares[key] = future

        def run() -> None:
            background_priority()  # behind serving, as the deferred writes
            try:
                future.set_result(make_spare(path, size))
            except BaseException as e:  # the model deleted meanwhile, a full disk
                future.set_exception(e)

        threading.Thread(target=run, name=f"spare-{slug}", daemon=True).start()

    def take_spare(self, slug: str, name: str, wait: bool = False) -> Path | None:
        """The spare `prepare_spare` made for `slug`'s `name`, now the caller's to write
        over or remove; None if there is none, or if it is still being made and not
        `wait` (a write does not wait: without it, it costs at most what the spare would
        have saved, and the spare stays for the next write)."""
        with self._deferred_lock:
            future = self._spares.get((slug, name))
            if future is None or not (wait or future.done()):
                return None
            del self._spares[(slug, name)]
        try:
            path = future.result()
        except Exception as e:
            log.debug("no spare %s for %s: %s", name, slug, e)
            return None
        return path if path.exists() else None

    # --------------------------------------------------------------------- head
    def head(self, slug: str) -> str:
        """Id of the model's head checkpoint."""
        self.get_model(slug)
        return (self.model_dir(slug) / "HEAD").read_text().strip()

    def head_checkpoint(self, slug: str) -> CheckpointRecord:
        """The model's head checkpoint record."""
        return self.get_checkpoint(slug, self.head(slug))

    def set_head(self, slug: str, ckpt_id: str, wait: bool = True) -> CheckpointRecord:
        """Atomically point HEAD at a complete checkpoint of the model.

        Synchronous store: durable on return. Asynchronous: safe from a process crash on
        return, fsynced in the background after the checkpoint; with `wait` (a rollback
        or branch point, not an OptimStep's own promotion), the checkpoint's background
        fsync is waited for first.
        """
        record = self.get_checkpoint(slug, ckpt_id)  # by id or tag
        if wait and not self.sync:
            self.syncer.wait(str(self.checkpoint_dir(slug, record.id)))
        self._write_head(slug, record.id)
        return record

    def promote(self, record: CheckpointRecord) -> None:
        """Point HEAD at `record`, a checkpoint this process has just written with
        `write_checkpoint`: `set_head` without reading it back, fsynced after it (as
        `set_head(..., wait=False)`)."""
        self._write_head(record.model, record.id)

    def _write_head(self, slug: str, ckpt_id: str) -> None:
        self._replace(self.model_dir(slug) / "HEAD", ckpt_id + "\n")

    def _replace(self, path: Path, text: str) -> None:
        """Atomically replace a small file of the store (HEAD, tags, retention, evals):
        durable on return in a synchronous store, else fsynced in the background (safe
        from a process crash at once)."""
        atomic.write_bytes(path, text.encode(), sync=self.sync)
        if not self.sync:
            self.syncer.submit(str(path.relative_to(self.models_dir)), [path, path.parent])

    # -------------------------------------------------------------------- files
    def resolve(self, slug: str, ckpt_id: str) -> CheckpointRecord:
        """The checkpoint whose files hold the content of (slug, ckpt_id), following refs."""
        record = self.get_checkpoint(slug, ckpt_id)
        seen = set()
        while record.ref is not None:
            if (record.model, record.id) in seen:
                raise FailedPrecondition(f"reference cycle at {record.model}/{record.id}")
            seen.add((record.model, record.id))
            record = self.get_checkpoint(record.ref.model, record.ref.checkpoint)
        return record

    def files_dir(self, record: CheckpointRecord) -> Path:
        """Directory holding the files of `record` (which must not be a reference)."""
        return self.checkpoint_dir(record.model, record.id)

    def sampler_path(self, slug: str, ckpt_id: str) -> str:
        """Store-relative path a sampler loads: adapter dir (LoRA), weights file (full),
        "" for a base checkpoint (its weights are the base's Hugging Face directory)."""
        return self.sampler_path_of(self.get_checkpoint(slug, ckpt_id))

    def sampler_path_of(self, record: CheckpointRecord) -> str:
        """`sampler_path` of a record in hand (read again only to follow a reference)."""
        target = record if record.ref is None else self.resolve(record.model, record.id)
        if target.kind == "base":
            return ""
        rel = self.files_dir(target).relative_to(self.root)
        return str(rel if target.kind == "lora" else rel / WEIGHTS_FILE)

    def state_path(self, slug: str, ckpt_id: str) -> str:
        """Store-relative path of the optimizer state, "" when the checkpoint has none."""
        return self.state_path_of(self.get_checkpoint(slug, ckpt_id))

    def state_path_of(self, record: CheckpointRecord) -> str:
        """`state_path` of a record in hand."""
        if not record.has_optimizer:
            return ""
        owner = record if record.ref is None else self.resolve(record.model, record.id)
        path = self.files_dir(owner) / OPTIMIZER_FILE
        return str(path.relative_to(self.root))

    def find_request(self, slug: str, request_id: str) -> CheckpointRecord | None:
        """The checkpoint an OptimStep with this idempotency key produced, if any;
        FailedPrecondition if a delete removed it since (its step was applied: a retry
        must not apply it again)."""
        if not request_id:
            return None
        for record in self.list_checkpoints(slug):
            if record.request_id == request_id:
                return record
        try:
            pruned = json.loads((self.model_dir(slug) / PRUNED_FILE).read_text())
        except FileNotFoundError:
            return None
        if request_id in pruned:
            raise FailedPrecondition(
                f"request_id {request_id!r} made checkpoint {pruned[request_id]} of model "
                f"{slug!r}, deleted since: its step was applied once and is not applied "
                "again; send a new request_id to train another step"
            )
        return None


def _write_deferred(ckpt_dir: Path, deferred: DeferredFile) -> None:
    """Write `deferred` into the published `ckpt_dir`: under a temp name, then renamed,
    so no reader meets a partial file under its real name."""
    tmp = atomic.temp_sibling(ckpt_dir / deferred.name)
    try:
        deferred.write(tmp)
        size = tmp.stat().st_size
        if size != deferred.size:
            raise OSError(f"{deferred.name}: wrote {size} bytes, meta.json records {deferred.size}")
        os.rename(tmp, ckpt_dir / deferred.name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mark_durable(mark: Path) -> None:
    """Make `mark` (best effort: without it recovery only checks more)."""
    try:
        mark.touch()
    except OSError as e:
        log.debug("durable mark %s not made: %s", mark, e)


def _torn(ckpt_dir: Path) -> tuple[str, str]:
    """(what is wrong with the checkpoint directory, "" if complete; its parent id)."""
    try:
        meta = json.loads((ckpt_dir / META_FILE).read_text())
    except (FileNotFoundError, ValueError) as e:  # not a permission problem: never torn
        return f"meta.json missing or not JSON ({e})", ""
    parent = str(meta.get("parent_id", ""))
    for name, size in (meta.get("files") or {}).items():
        try:
            actual = (ckpt_dir / name).stat().st_size
        except FileNotFoundError:
            return f"{name} missing", parent
        if actual != size:
            return f"{name} has {actual} bytes, meta.json records {size}", parent
    # Files sized before they were written (over a spare) prove nothing by their size until
    # the checkpoint's fsyncs are done; only those are checked (a filesystem may keep runs
    # of zeros of a complete file as holes: ZFS with compression, a sparse copy).
    if not (ckpt_dir / DURABLE_MARK).exists():
        for name in meta.get("sized_first") or []:
            if has_hole(ckpt_dir / name):
                return f"{name} has a hole: its data did not all reach the disk", parent
    return "", parent


__all__ = ["CheckpointRef", "CheckpointStore", "DeferredFile", "check_slug"]


def check_tag(name: str) -> None:
    """InvalidArgument for a name that cannot be a tag."""
    if not TAG_RE.fullmatch(name) or _ID_LIKE.fullmatch(name):
        raise InvalidArgument(
            f"tag {name!r} is not a tag name: 1-64 letters, digits, '.', '_' or '-', starting "
            "with a letter, and not shaped like a checkpoint id (s000123-...)"
        )


def _tree_bytes(root: Path) -> int:
    """Bytes of the files under `root`, skipping leftovers and spares (named with the
    temp prefix) and whatever vanishes during the walk (a write renaming its temp)."""
    total = 0
    for directory, dirs, files in os.walk(root, onerror=lambda e: None):
        dirs[:] = [d for d in dirs if not d.startswith(atomic.TMP_PREFIX)]
        for name in files:
            if name.startswith(atomic.TMP_PREFIX):
                continue
            try:
                total += os.stat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                continue
    return total
