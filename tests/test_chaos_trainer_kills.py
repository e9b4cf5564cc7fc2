"""Chaos: the trainer is SIGKILLed at random instants while the SDK trains through the gateway.

A real supervised stack (`LocalStack`: an embedded Redis, the trainer, one sampler and the
gateway as processes, exactly what `headway serve` runs) trains a LoRA fork for 100 steps
and a full fork for 20, interleaved, the way the seed's loop does: sample through the
gateway, score, `TrainingClient.step` (one Step call with a request id, retried on
UNAVAILABLE under the same id). A killer thread SIGKILLs the trainer process at random
instants drawn from a seeded RNG; the stack restarts it on the same address, the SDK's
retry reaches the new process, and the loop goes on. Where each kill lands (a sample, the
step's forward or optimizer update, its checkpoint write, between its HEAD move and the
reply, the restarted trainer's first moments) is left to chance and only reported: the
checks hold wherever it lands.

`tests/test_trainer_crash.py` aims kills at the sub-millisecond windows of the checkpoint
write (raw gRPC, no sampler); this test covers the whole path a user's loop takes.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from safetensors.torch import load_file

from headway import SamplingClient, StepResult, TrainingClient
from headway.cli.serve import LocalStack
from headway.server.replicas import ReplicaInfo, replica_key
from headway.store.atomic import TMP_PREFIX
from headway.v1 import common_pb2, model_pb2, model_pb2_grpc
from tests.helpers_serve import HANG_SECONDS, stack_config, supervised
from tests.helpers_training import scored_group
from tests.stack import make_tiny_base, wait_until

pytestmark = pytest.mark.slow

SEED = 20250611
LORA, FULL = "chaos-lora", "chaos-full"
# Every sixth step trains the full fork: 100 LoRA steps and 20 full ones, interleaved.
SCHEDULE = [FULL if i % 6 == 5 else LORA for i in range(120)]
KILLS = 6  # each costs a trainer restart (~4 s here): the suite stays under 10 min
# Two kinds of instants. "step": once the loop has acknowledged a step count drawn at
# random, wait a random 0-250 ms (a step through the gateway takes tens of ms, a sample
# a few: this lands anywhere in the next calls). "restart": once the trainer killed just
# before is SERVING again, wait a random 0-150 ms: lands in the restarted process's
# first call (the SDK's retry, the restore of the model's head) or just before it.
EVERY_NTH_AFTER_RESTART = 3  # kills 3 and 6 are "restart" kills
STEP_DELAY = (0.0, 0.25)
RESTART_DELAY = (0.0, 0.15)
GROUP = 4
PROMPT = "what is 2 plus 3?"
# LocalStack's restart policy (0.5 s doubling, 5 crashes within a minute stop the stack)
# is for real crashes; these on purpose need a short backoff and a crash budget above them.
RESTARTS: dict[str, Any] = dict(restart_backoff=0.05, restart_backoff_max=0.2, max_crashes=100)
LEFTOVER_PREFIXES = (TMP_PREFIX, ".deleted-")


@dataclass
class Progress:
    """What the loop is doing, shared with the killer thread."""

    acked: int = 0  # steps acknowledged so far
    doing: str = "starting"  # "sample", "step" or "between calls"
    request_id: str = ""  # of the Step call in flight (set by the interceptor)
    finished: bool = False
    attempts: Counter[str] = field(default_factory=Counter)  # Step attempts by request id
    request_ids: dict[str, list[str]] = field(default_factory=dict)  # by model, in order
    changed: threading.Condition = field(default_factory=threading.Condition)

    def update(self, **fields: Any) -> None:
        with self.changed:
            for name, value in fields.items():
                setattr(self, name, value)
            self.changed.notify_all()

    def wait_for_step(self, count: int) -> None:
        """Block until `count` steps are acknowledged or the loop ended."""
        with self.changed:
            self.changed.wait_for(lambda: self.acked >= count or self.finished, HANG_SECONDS)


class StepLog(grpc.aio.UnaryUnaryClientInterceptor):
    """Records every attempt of a Step call: its request id (the same on every retry)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.endswith("/Step"):
            p = self.progress
            with p.changed:
                p.attempts[request.request_id] += 1
                ids = p.request_ids.setdefault(request.model, [])
                if request.request_id not in ids:
                    ids.append(request.request_id)
                p.request_id = request.request_id
        return await continuation(details, request)


@dataclass
class Kill:
    at: float  # time.time() of the SIGKILL
    kind: str  # "step" or "restart"
    acked: int
    doing: str
    request_id: str


class Killer(threading.Thread):
    """SIGKILLs the stack's trainer KILLS times, at instants drawn from `rng`."""

    def __init__(self, stack: LocalStack, progress: Progress, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.stack, self.progress, self.rng = stack, progress, rng
        self.kills: list[Kill] = []
        self.error: BaseException | None = None
        points = KILLS - KILLS // EVERY_NTH_AFTER_RESTART
        self.points = sorted(rng.sample(range(2, len(SCHEDULE) - 4), points))

    def run(self) -> None:
        try:
            self._kill_all()
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            self.error = e

    def _kill_all(self) -> None:
        points = iter(self.points)
        trainer = self.stack.service("trainer")  # the same Service across restarts
        progress = self.progress
        for n in range(1, KILLS + 1):
            if n % EVERY_NTH_AFTER_RESTART == 0:
                wait_until(
                    lambda: (
                        progress.finished
                        or (trainer.restarts == len(self.kills) and trainer.crashes.served)
                    ),
                    "the killed trainer serves again",
                )
                kind, delay = "restart", self.rng.uniform(*RESTART_DELAY)
            else:
                progress.wait_for_step(next(points))
                kind, delay = "step", self.rng.uniform(*STEP_DELAY)
            # A step acknowledged just as the last kill struck may bring its point before
            # the stack has restarted the trainer: wait for the new process.
            wait_until(
                lambda: (
                    progress.finished
                    or (trainer.restarts == len(self.kills) and trainer.pid is not None)
                ),
                "the stack restarts the trainer",
            )
            if progress.finished:
                return  # the loop ended early (it failed): stop killing
            time.sleep(delay)  # the random instant itself, not a synchronisation
            pid = trainer.pid
            assert pid is not None
            with progress.changed:
                kill = Kill(time.time(), kind, progress.acked, progress.doing, progress.request_id)
            os.kill(pid, signal.SIGKILL)
            self.kills.append(kill)


def fork(stack: LocalStack, base: Path) -> dict[str, str]:
    """Register the base and fork it (LoRA and full) through the gateway; their heads."""
    with grpc.insecure_channel(stack.config.listen) as channel:
        models = model_pb2_grpc.ModelServiceStub(channel)
        models.AddBase(model_pb2.AddBaseRequest(path=str(base), name="tiny"), timeout=120)
        lora = model_pb2.ForkModelRequest(
            source="tiny", name=LORA, lora=common_pb2.LoraConfig(rank=4, alpha=8)
        )
        full = model_pb2.ForkModelRequest(source="tiny", name=FULL, full=True)
        return {
            LORA: models.ForkModel(lora, timeout=120).head_checkpoint,
            FULL: models.ForkModel(full, timeout=120).head_checkpoint,
        }


def registry_lists(stack: LocalStack, loaded: set[str]) -> bool:
    """Whether sampler-0's registry entry lists every "model/checkpoint" of `loaded`."""
    client = redis.Redis.from_url(stack.redis_url)
    try:
        raw = client.get(replica_key("sampler-0", stack.config.redis_prefix))
    finally:
        client.close()
    return raw is not None and loaded <= set(ReplicaInfo.from_json(raw).loaded)


async def train(
    stack: LocalStack, heads: dict[str, str], progress: Progress, killer: Killer
) -> dict[str, list[StepResult]]:
    """The loop: sample the model's head through the gateway, score, step; check that every
    sample came from the head the previous step made (across every restart). Then, once
    the killer is done, the final heads."""
    url = stack.config.listen
    log = StepLog(progress)
    trainers = {
        m: TrainingClient(
            m, url=url, retry_timeout=HANG_SECONDS, retry_backoff=0.05, interceptors=[log]
        )
        for m in (LORA, FULL)
    }
    samplers = {m: SamplingClient(m, url=url, retry_timeout=HANG_SECONDS) for m in (LORA, FULL)}
    results: dict[str, list[StepResult]] = {LORA: [], FULL: []}
    try:
        for i, model in enumerate(SCHEDULE):
            progress.update(doing="sample")
            sample = await samplers[model].sample(PROMPT, n=GROUP, max_tokens=6, seed=i)
            assert sample.checkpoint == heads[model], (
                f"step {i + 1}: {model} sampled from {sample.checkpoint}, not its head "
                f"{heads[model]}"
            )
            progress.update(doing="step")
            result = await trainers[model].step(
                scored_group(sample, i), learning_rate=1e-3, group_size=GROUP
            )
            heads[model] = result.checkpoint
            results[model].append(result)
            progress.update(doing="between calls", request_id="", acked=i + 1)
        # On a fast machine the last kill (just after a restart) may come after the last
        # step: whatever it hits, the calls below outlast it.
        await asyncio.to_thread(killer.join, HANG_SECONDS)
        # The last steps' heads reach the sampler by their head events (no sample asked
        # for them), then a sample of each is served by it.
        loaded = {f"{m}/{c}" for m, c in heads.items()}
        await asyncio.to_thread(
            wait_until, lambda: registry_lists(stack, loaded), "the sampler preloads the heads"
        )
        for model, head in heads.items():
            sample = await samplers[model].sample(PROMPT, n=1, max_tokens=4)
            assert sample.checkpoint == head, f"{model}: final sample from {sample.checkpoint}"
            assert (await trainers[model].head()).id == head
    finally:
        progress.update(finished=True)
        for client in (*trainers.values(), *samplers.values()):
            await client.close()
    return results


def check_store(
    store: Path, model: str, root: str, results: list[StepResult], request_ids: list[str]
) -> dict[str, dict[str, Any]]:
    """One chain root → steps 1..N on disk, each step's request id once, every checkpoint
    complete and loadable, HEAD on step N; returns the metas by checkpoint id."""
    model_dir = store / "models" / model
    metas = {
        d.name: json.loads((d / "meta.json").read_text())
        for d in (model_dir / "checkpoints").iterdir()
    }
    chain = sorted(metas.values(), key=lambda m: m["step"])
    n = len(results)
    assert [m["step"] for m in chain] == list(range(n + 1)), f"{model}: steps {chain}"
    assert chain[0]["id"] == root and chain[0]["parent_model"] == "tiny"
    for parent, child in zip(chain, chain[1:], strict=False):
        assert child["parent_id"] == parent["id"], f"{model}: {child['id']} off the chain"
    # Each acknowledged step made exactly one checkpoint, none was made by anything else.
    assert [m["id"] for m in chain[1:]] == [r.checkpoint for r in results]
    assert [m["request_id"] for m in chain[1:]] == request_ids, f"{model}: request ids"
    assert (model_dir / "HEAD").read_text().strip() == results[-1].checkpoint
    for meta in chain[1:]:
        files = model_dir / "checkpoints" / meta["id"]
        if model == LORA:
            assert load_file(str(files / "adapter_model.safetensors")), meta["id"]
            assert json.loads((files / "adapter_config.json").read_text())["r"] == 4
        else:
            assert load_file(str(files / "weights.safetensors")), meta["id"]
        state = load_file(str(files / "optimizer.safetensors"))
        assert {"step", "exp_avg", "exp_avg_sq"} <= set(state), f"{model}/{meta['id']}"
    return metas


def where(kill: Kill, metas: dict[str, dict[str, Any]]) -> str:
    """Where a kill landed, as far as the client and the store can tell afterwards."""
    if kill.doing != "step":
        return f"during a {kill.doing}" if kill.doing == "sample" else kill.doing
    if not kill.request_id:
        return "during a Step, before it was sent"
    made = next((m for m in metas.values() if m["request_id"] == kill.request_id), None)
    assert made is not None, f"the Step in flight at a kill ({kill.request_id}) made nothing"
    if made["created"] < kill.at:
        return "during a Step, after its checkpoint was written (the retry found it on disk)"
    return "during a Step, before its checkpoint was written (the retry applied it)"


def test_trainer_killed_at_random_instants_loses_and_repeats_no_step(tmp_path: Path) -> None:
    """Invariant: however often the trainer dies under a training loop (6 SIGKILLs at
    random instants over 100 LoRA and 20 full steps), every step the SDK sent is applied
    exactly once: each model's store is one chain of steps 1..N whose request ids are the
    SDK's, in order; every checkpoint is complete and loads; nothing temporary is left;
    HEAD is step N; and every sample, after every restart, came from the head the
    previous step made."""
    started = time.monotonic()
    base = make_tiny_base(tmp_path / "tiny-base")
    stack = LocalStack(stack_config(tmp_path, **RESTARTS), out=io.StringIO())
    progress = Progress()
    killer = Killer(stack, progress, random.Random(SEED))
    try:
        stack.start()
        roots = fork(stack, base)

        def body() -> dict[str, list[StepResult]]:
            killer.start()
            try:
                return asyncio.run(train(stack, dict(roots), progress, killer))
            finally:
                killer.join(HANG_SECONDS)

        results = supervised(stack, body)
        restarts = {s.name: s.restarts for s in stack.services}
    finally:
        stack.stop()
    assert killer.error is None, f"the killer failed: {killer.error!r}"
    assert len(killer.kills) == KILLS
    assert restarts == {"trainer": KILLS, "sampler-0": 0, "gateway": 0}

    store = tmp_path / "store"
    leftovers = [
        os.path.join(root, name)
        for root, dirs, files in os.walk(store / "models")
        for name in dirs + files
        if name.startswith(LEFTOVER_PREFIXES)
    ]
    assert not leftovers, f"left behind: {leftovers}"
    metas: dict[str, dict[str, Any]] = {}
    for model in (LORA, FULL):
        ids = progress.request_ids[model]
        metas |= check_store(store, model, roots[model], results[model], ids)
    assert (len(results[LORA]), len(results[FULL])) == (100, 20)

    landed = Counter(where(kill, metas) for kill in killer.kills)
    retried = sum(1 for n in progress.attempts.values() if n > 1)
    summary = "".join(f"\n  {n:2d} {what}" for what, n in landed.most_common())
    print(
        f"\n{KILLS} trainer SIGKILLs over {len(SCHEDULE)} steps, {restarts['trainer']} "
        f"restarts, {retried} Steps retried, {time.monotonic() - started:.0f} s:{summary}"
    )
