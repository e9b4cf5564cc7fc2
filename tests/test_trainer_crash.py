"""Crash safety of the trainer: SIGKILL aimed at its checkpoint writes, then restart.

The trainer runs as a real process (`python -m trainer_svc`) on a store in tmp_path. A client
thread drives Steps on a LoRA fork and a full fork in turn; the test kills the process at an
instant aimed at a checkpoint write or its rename, restarts it on the same store and checks,
through gRPC and by reading the store's directory, what the design promises ("a crash at any
instant leaves the previous head intact"; an OptimStep "replies only after the head is
durable"). Unaimed kills, at random instants under the SDK's retries through a supervised
stack, are `tests/test_chaos_trainer_kills.py`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from safetensors.torch import load_file

from headway.store.atomic import TMP_PREFIX
from headway.v1 import common_pb2, model_pb2, model_pb2_grpc, training_pb2, training_pb2_grpc
from tests.helpers_training import adam, items, rl_datum
from tests.stack import (
    HANG_SECONDS,
    REDIS_URL,
    ServiceProcess,
    WaitTimeout,
    make_tiny_base,
    redis_prefix,
    wait_until,
)

pytestmark = pytest.mark.slow  # trainer processes started and SIGKILLed, ~1 min

KILLS = 8
SEED = 20240607
# Seconds between the client's start and SIGKILL. The first ~1 s of a round is the restart's
# restore (the first Step loads the head); then a Step takes ~25 ms, a fifth of it writing.
KILL_AFTER = (0.05, 2.0)
# Rounds alternate two ways of aiming the instant (unaimed kills, which land mostly before
# the save, are the chaos test's). "write": after the delay, wait until a checkpoint write
# begins (a temp directory appears), then kill within AIM_WITHIN["write"] s: lands in the
# write, rename, HEAD move or reply.
# "rename": wait until a checkpoint is renamed into place (a new directory appears), then
# kill within AIM_WITHIN["rename"] s: lands in the sub-ms windows right after the rename
# (its directory fsync, the HEAD write). Waiting busy-polls: a 0.2 ms sleep per poll
# already lets most kills miss those windows. Unaimed, they are hit by almost no kill.
MODES = ("write", "rename")
AIM_WITHIN = {"write": 0.008, "rename": 0.0005}
READY_TIMEOUT = HANG_SECONDS  # a process importing torch on a busy 2-core machine
CALL_TIMEOUT = HANG_SECONDS
LEFTOVER_PREFIXES = (TMP_PREFIX, ".deleted-")  # what interrupted writes/deletes leave behind

# Where a kill landed, read from the store before the restart cleans it.
BEFORE_SAVE = "before the save (forward/backward, optimizer update, RPC)"
IN_WRITE = "during the checkpoint write (temp dir present)"
IN_HEAD = "during the HEAD write (temp HEAD present)"
UNPROMOTED = "after the checkpoint rename, before HEAD moved"
UNACKED = "after HEAD moved, before the client got the reply"
PARTIAL = "leaving a partial checkpoint visible (a bug: the checks will fail)"
IDLE = "between requests (nothing in flight)"


@dataclass
class Acked:
    request_id: str  # "" for a fork's root (ForkModel acknowledged it)
    checkpoint: str
    step: int
    seed: int = 0  # data seed of the Step that made it, to resend the same request


@dataclass
class Tracked:
    """What the client knows about one model."""

    slug: str
    full: bool
    acked: list[Acked] = field(default_factory=list)
    verified: set[str] = field(default_factory=set)  # checkpoints whose files loaded

    @property
    def last(self) -> Acked:
        return self.acked[-1]


@dataclass
class InFlight:
    slug: str
    request_id: str
    seed: int


class TrainerProcess(ServiceProcess):
    """`python -m trainer_svc` on a fresh loopback port, with stubs once it is SERVING."""

    def __init__(self, store: Path, prefix: str, log: Path) -> None:
        args = ["--store", str(store), "--log-level", "WARNING"]
        super().__init__("trainer", "trainer_svc", args, log, prefix)
        self.models = model_pb2_grpc.ModelServiceStub(self.channel)
        self.train = training_pb2_grpc.TrainingServiceStub(self.channel)
        try:
            self.wait_ready(time.monotonic() + READY_TIMEOUT)
        except BaseException:
            self.close()
            raise


def _step_request(slug: str, request_id: str, seed: int) -> training_pb2.StepRequest:
    data = items(*(rl_datum(seed * 10 + i, n=24, prompt=6) for i in range(4)))
    return training_pb2.StepRequest(model=slug, data=data, loss_fn="importance_sampling",
                                    adam=adam(1e-3), request_id=request_id)  # fmt: skip


class Client(threading.Thread):
    """Steps the models in turn, one request in flight at a time, until the trainer dies."""

    def __init__(self, trainer: TrainerProcess, models: list[Tracked], round_: int) -> None:
        super().__init__(daemon=True)
        self.trainer, self.models, self.round = trainer, models, round_
        self.in_flight: InFlight | None = None
        self.error: grpc.RpcError | None = None
        self.steps = 0

    def run(self) -> None:
        i = 0
        while True:
            model = self.models[(self.round + i) % len(self.models)]
            seed = self.round * 100_000 + i
            rid = f"{model.slug}-r{self.round}-{i}"
            self.in_flight = InFlight(model.slug, rid, seed)
            try:
                reply = self.trainer.train.Step(_step_request(model.slug, rid, seed),
                                                timeout=CALL_TIMEOUT)  # fmt: skip
            except grpc.RpcError as e:
                self.error = e
                return
            step = reply.optim_step
            model.acked.append(Acked(rid, step.checkpoint, step.step, seed))
            self.in_flight = None
            self.steps += 1
            i += 1


def _aim(event: str, store: Path, models: list[Tracked], timeout: float = 5.0) -> None:
    """Return as soon as a checkpoint of one of `models` starts being written ("write") or
    is renamed into place ("rename"), or after `timeout` s (then the kill is unaimed: the
    round still checks every invariant)."""
    dirs = [store / "models" / m.slug / "checkpoints" for m in models]
    known = {d: set(os.listdir(d)) for d in dirs}

    def seen() -> bool:
        for d in dirs:
            for name in os.listdir(d):
                if event == "write" and name.startswith(TMP_PREFIX):
                    return True
                if event == "rename" and not name.startswith(".") and name not in known[d]:
                    return True
        return False

    with contextlib.suppress(WaitTimeout):  # busy-polls: the windows aimed at are sub-ms
        wait_until(seen, timeout=timeout, interval=0, what=f"a checkpoint {event}")


def _read_meta(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((ckpt_dir / "meta.json").read_text())


def _partial(ckpt_dir: Path) -> str:
    """Why `ckpt_dir` is not a complete checkpoint ("" if it is one)."""
    try:
        _read_meta(ckpt_dir)
    except (OSError, ValueError) as e:
        return f"{ckpt_dir.name} has no readable meta.json ({e}); it holds {os.listdir(ckpt_dir)}"
    return ""


def _where_killed(store: Path, in_flight: InFlight | None) -> str:
    """Classify the instant of the kill from what it left in the store (before any restart)."""
    if in_flight is None:
        return IDLE
    model_dir = store / "models" / in_flight.slug
    ckpts = model_dir / "checkpoints"
    if any(p.name.startswith(TMP_PREFIX) for p in ckpts.iterdir()):
        return IN_WRITE
    if any(p.name.startswith(TMP_PREFIX + "HEAD") for p in model_dir.iterdir()):
        return IN_HEAD
    head = (model_dir / "HEAD").read_text().strip()
    visible = [d for d in ckpts.iterdir() if not d.name.startswith(".")]
    if any(_partial(d) for d in visible):
        return PARTIAL
    for d in visible:
        if _read_meta(d)["request_id"] == in_flight.request_id:
            return UNACKED if d.name == head else UNPROMOTED
    return BEFORE_SAVE


def _leftovers(store: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(store):
        found += [os.path.join(root, n) for n in dirs + files if n.startswith(LEFTOVER_PREFIXES)]
    return found


def _load_checkpoint_files(store: Path, model: Tracked, ckpt: common_pb2.Checkpoint) -> None:
    """The files a sampler and the trainer would load for `ckpt` exist and parse."""
    where = f"{model.slug}/{ckpt.id}"
    if ckpt.sampler_path:
        path = store / ckpt.sampler_path
        if model.full:
            assert path.name == "weights.safetensors", where
            assert load_file(str(path)), f"{where}: empty weights"
        else:
            assert path.is_dir(), f"{where}: LoRA sampler_path {path} is not a directory"
            assert load_file(str(path / "adapter_model.safetensors")), f"{where}: empty adapter"
            config = json.loads((path / "adapter_config.json").read_text())
            assert config.get("r"), f"{where}: adapter_config.json without a rank"
    else:
        assert ckpt.step == 0 and model.full, f"{where}: no sampler_path on a trained checkpoint"
    if ckpt.state_path:
        state = load_file(str(store / ckpt.state_path))
        assert {"step", "exp_avg", "exp_avg_sq"} <= set(state), f"{where}: optimizer state empty"
    else:
        assert ckpt.step == 0, f"{where}: a trained checkpoint without optimizer state"


def _check_model(
    store: Path, trainer: TrainerProcess, model: Tracked, in_flight: InFlight | None
) -> None:
    """Every invariant of one model after a restart."""
    model_dir = store / "models" / model.slug
    # No partial checkpoint is visible: every directory not named as a leftover is complete.
    partial = [p for d in (model_dir / "checkpoints").iterdir() if (p := _partial(d))]
    assert not partial, f"{model.slug}: partial checkpoints visible: {partial}"

    listing = trainer.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model=model.slug))
    head = trainer.models.GetHead(model_pb2.GetHeadRequest(model=model.slug))
    by_id = {c.id: c for c in listing.checkpoints}
    assert len(by_id) == len(listing.checkpoints), f"{model.slug}: duplicate checkpoint ids"
    assert listing.head == head.id and head.is_head, f"{model.slug}: heads disagree"
    assert (model_dir / "HEAD").read_text().strip() == head.id

    # The head is the last acknowledged checkpoint, or the checkpoint of the request in flight
    # when the process died (its child, made by that very request), never anything older.
    last = model.last
    if head.id != last.checkpoint:
        assert in_flight is not None and in_flight.slug == model.slug, (
            f"{model.slug}: head {head.id} (step {head.step}) is neither the last acknowledged "
            f"checkpoint {last.checkpoint} (step {last.step}) nor that of a request in flight"
        )
        meta = _read_meta(model_dir / "checkpoints" / head.id)
        assert meta["request_id"] == in_flight.request_id, f"{model.slug}: head from {meta}"
        assert head.parent_id == last.checkpoint and head.step == last.step + 1, (
            f"{model.slug}: in-flight head {head.id} is not a child of the last acknowledged "
            f"{last.checkpoint} (parent {head.parent_id}, step {head.step} vs {last.step})"
        )
        # It is durable and the head: from now on it counts as acknowledged.
        model.acked.append(Acked(in_flight.request_id, head.id, head.step, in_flight.seed))

    # Tree: one root (from the source model), every other parent listed, steps consecutive.
    roots = [c for c in listing.checkpoints if c.parent_id not in by_id]
    assert [c.id for c in roots] == [model.acked[0].checkpoint], f"{model.slug}: roots {roots}"
    root_meta = _read_meta(model_dir / "checkpoints" / roots[0].id)
    assert root_meta["parent_model"] == "tiny" and roots[0].step == 0, root_meta
    for c in listing.checkpoints:
        if c.parent_id in by_id:
            assert c.step == by_id[c.parent_id].step + 1, f"{model.slug}/{c.id}: step {c.step}"

    # Durability: every acknowledged checkpoint is listed, on the head's lineage.
    lineage, cur = set(), head
    while cur is not None:
        lineage.add(cur.id)
        cur = by_id.get(cur.parent_id)
    lost = [a.checkpoint for a in model.acked if a.checkpoint not in lineage]
    assert not lost, f"{model.slug}: acknowledged checkpoints not behind the head: {lost}"

    # The listing is exactly the checkpoint directories on disk (all complete, see above).
    on_disk = {d.name for d in (model_dir / "checkpoints").iterdir()}
    visible = {n for n in on_disk if not n.startswith(".")}
    assert visible == set(by_id), (
        f"{model.slug}: directories not listed: {sorted(visible - set(by_id))}, "
        f"listed without a directory: {sorted(set(by_id) - visible)}"
    )
    request_ids: Counter[str] = Counter()
    for c in listing.checkpoints:
        meta = _read_meta(model_dir / "checkpoints" / c.id)
        assert (meta["id"], meta["step"], meta["parent_id"]) == (c.id, c.step, c.parent_id)
        if meta["request_id"]:
            request_ids[meta["request_id"]] += 1
        if c.id not in model.verified:
            _load_checkpoint_files(store, model, c)
            model.verified.add(c.id)
    twice = [r for r, n in request_ids.items() if n > 1]
    assert not twice, f"{model.slug}: request ids that made two checkpoints: {twice}"


def _check_idempotent(trainer: TrainerProcess, model: Tracked, rng: random.Random) -> None:
    """Acknowledged requests sent again after the restart return their checkpoint, make none."""
    trained = [a for a in model.acked if a.request_id]
    if not trained:
        return
    before = trainer.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model=model.slug))
    for acked in (trained[-1], rng.choice(trained)):  # the last one, and any earlier one
        reply = trainer.train.Step(_step_request(model.slug, acked.request_id, acked.seed),
                                   timeout=CALL_TIMEOUT)  # fmt: skip
        got = (reply.optim_step.checkpoint, reply.optim_step.step)
        assert got == (acked.checkpoint, acked.step), (
            f"{model.slug}: request {acked.request_id} sent again after a restart returned "
            f"{got}, first acknowledged as {(acked.checkpoint, acked.step)}"
        )
    after = trainer.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model=model.slug))
    assert [c.id for c in after.checkpoints] == [c.id for c in before.checkpoints], model.slug
    assert after.head == before.head, f"{model.slug}: a repeated request moved the head"


def _delete_redis_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def test_sigkill_during_optim_steps_leaves_a_loadable_consistent_head(tmp_path: Path) -> None:
    """Invariant: a trainer killed at any instant (8 SIGKILLs aimed at the checkpoint
    writes and renames of LoRA and full saves) restarts onto a head that loads and is the
    last acknowledged checkpoint or the one in flight; the tree stays consistent, no
    partial or temp checkpoint is visible, every acknowledged checkpoint survives, and
    request ids stay idempotent across restarts."""
    base = make_tiny_base(tmp_path / "base")
    store = tmp_path / "store"
    prefix = redis_prefix()
    log = tmp_path / "trainer.log"
    rng = random.Random(SEED)
    models = [Tracked("crash-lora", full=False), Tracked("crash-full", full=True)]
    where: Counter[tuple[str, str]] = Counter()  # (mode of the round, where the kill landed)
    steps = 0
    trainer = TrainerProcess(store, prefix, log)
    started = time.monotonic()
    try:
        trainer.models.AddBase(model_pb2.AddBaseRequest(path=str(base), name="tiny"))
        for m in models:
            req = model_pb2.ForkModelRequest(source="tiny", name=m.slug)
            if m.full:
                req.full = True
            else:
                req.lora.CopyFrom(common_pb2.LoraConfig(rank=4, alpha=8))
            fork = trainer.models.ForkModel(req)
            m.acked.append(Acked("", fork.head_checkpoint, fork.head_step))

        for round_ in range(KILLS):
            client = Client(trainer, models, round_)
            client.start()
            mode = MODES[round_ % len(MODES)]
            time.sleep(rng.uniform(*KILL_AFTER))
            _aim(mode, store, models)
            time.sleep(rng.uniform(0, AIM_WITHIN[mode]))
            trainer.kill()
            client.join(timeout=CALL_TIMEOUT)
            assert not client.is_alive(), "the client did not notice the trainer died"
            assert client.error is not None
            assert client.error.code() == grpc.StatusCode.UNAVAILABLE, (
                f"round {round_}: Step failed with {client.error.code()}: "
                f"{client.error.details()}\n{trainer.tail()}"
            )
            trainer.close()
            steps += client.steps
            where[mode, _where_killed(store, client.in_flight)] += 1

            trainer = TrainerProcess(store, prefix, log)
            leftovers = _leftovers(store)
            assert not leftovers, f"round {round_}: leftovers after restart: {leftovers}"
            for m in models:
                _check_model(store, trainer, m, client.in_flight)
                _check_idempotent(trainer, m, rng)

        summary = "".join(f"\n  {n:2d} {mode}: {w}" for (mode, w), n in sorted(where.items()))
        print(f"{KILLS} kills over {steps} acknowledged Steps in "
              f"{time.monotonic() - started:.0f} s: {summary}")  # fmt: skip
    finally:
        trainer.close()
        _delete_redis_keys(prefix)
    # The store is large (every full step saves weights and optimizer state); keep it only
    # when the test failed, for inspection.
    shutil.rmtree(store, ignore_errors=True)


def test_retry_after_crash_between_checkpoint_and_head_promotes_it(tmp_path: Path) -> None:
    """Invariant: a Step reply means its checkpoint is the durable head, also when the reply
    comes from the idempotency record after a crash. SIGKILL between the checkpoint's rename
    and the HEAD write (a window the random test above lands in now and then) leaves a
    complete checkpoint that HEAD does not name; the client retries with the same request id
    and must get that checkpoint *as the head*, so that its next Step builds on it."""
    base = make_tiny_base(tmp_path / "base")
    store, prefix, log = tmp_path / "store", redis_prefix(), tmp_path / "trainer.log"
    trainer = TrainerProcess(store, prefix, log)
    try:
        trainer.models.AddBase(model_pb2.AddBaseRequest(path=str(base), name="tiny"))
        fork = trainer.models.ForkModel(
            model_pb2.ForkModelRequest(
                source="tiny", name="retry", lora=common_pb2.LoraConfig(rank=4, alpha=8)
            )
        )
        first = trainer.train.Step(_step_request("retry", "req-1", 1)).optim_step
        trainer.close()
        # Exactly what the kill leaves on disk: the checkpoint complete, HEAD still on its parent.
        (store / "models" / "retry" / "HEAD").write_text(fork.head_checkpoint + "\n")

        trainer = TrainerProcess(store, prefix, log)
        retried = trainer.train.Step(_step_request("retry", "req-1", 1)).optim_step
        assert (retried.checkpoint, retried.step) == (first.checkpoint, first.step)
        head = trainer.models.GetHead(model_pb2.GetHeadRequest(model="retry"))
        assert head.id == retried.checkpoint, (
            f"the retry acknowledged {retried.checkpoint} (step {retried.step}) as the new head, "
            f"but HEAD is {head.id} (step {head.step})"
        )
        after = trainer.train.Step(_step_request("retry", "req-2", 2)).optim_step
        assert after.checkpoint_info.parent_id == first.checkpoint
    finally:
        trainer.close()
        _delete_redis_keys(prefix)
