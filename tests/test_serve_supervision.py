"""`headway serve` supervises its children: a crash costs a restart, not the stack.

The restart rules are checked on `CrashHistory` alone; the rest runs a real `LocalStack`
(embedded Redis, a temp store, the three services as processes on free ports), supervised
by this test's main thread exactly as `headway serve` does, while the test's body runs in
a second thread: services are SIGKILLed between training steps, and nothing waits on a
clock, only on conditions (with timeouts that only catch hangs).
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from headway import SamplingClient, StepResult, TrainingClient, Unavailable
from headway.agents import create_agent
from headway.channels import CHANNEL_OPTIONS
from headway.cli.serve import LocalStack
from headway.cli.supervision import CrashHistory, RestartPolicy
from headway.eval import Job, Task, Taskset
from headway.types import Run
from headway.v1 import common_pb2, model_pb2, model_pb2_grpc
from tests.helpers_serve import HANG_SECONDS, stack_config, supervised
from tests.stack import make_tiny_base, wait_until

STEPS = 6


# ---------------------------------------------------------------- the restart rules


def test_the_restart_backoff_doubles_with_each_crash_on_record_up_to_its_cap() -> None:
    crashes = CrashHistory(RestartPolicy(backoff=0.5, backoff_max=3.0, max_crashes=9))
    delays = []
    for t in range(5):
        crashes.record(float(t))
        delays.append(crashes.backoff())
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_crashes_older_than_the_window_are_forgotten_once_the_child_served() -> None:
    crashes = CrashHistory(RestartPolicy(backoff=0.5, max_crashes=3, window=60.0))
    for t in (0.0, 10.0):
        crashes.record(t)
        crashes.served = True  # it came back and served
    crashes.record(65.0)  # the crash at 0 s has left the window
    assert len(crashes.times) == 2 and not crashes.exhausted
    assert crashes.backoff() == 1.0  # and the backoff came down with it
    crashes.served = True
    crashes.record(66.0)
    assert crashes.exhausted  # three within 60 s
    assert crashes.total == 4


def test_crashes_in_a_row_before_serving_again_all_count_however_slow() -> None:
    crashes = CrashHistory(RestartPolicy(max_crashes=3, window=60.0))
    crashes.record(0.0)
    crashes.record(1000.0)  # it never served in between (say, it cannot start any more)
    assert not crashes.exhausted
    crashes.record(5000.0)
    assert crashes.exhausted


# ------------------------------------------------------------------- a live stack


def add_tiny_fork(stack: LocalStack, base: Path) -> str:
    """Register the tiny base and fork it (LoRA) through the gateway; the fork's head."""
    with grpc.insecure_channel(stack.config.listen, options=CHANNEL_OPTIONS) as channel:
        models = model_pb2_grpc.ModelServiceStub(channel)
        models.AddBase(model_pb2.AddBaseRequest(path=str(base), name="tiny"), timeout=120)
        fork = models.ForkModel(
            model_pb2.ForkModelRequest(
                source="tiny", name="fork", lora=common_pb2.LoraConfig(rank=4, alpha=8)
            ),
            timeout=120,
        )
    return fork.head_checkpoint


def gateway_health(stack: LocalStack, service: str) -> int:
    with grpc.insecure_channel(stack.config.listen) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return reply.status


@pytest.mark.slow
def test_sampling_goes_on_while_the_trainer_is_down(tmp_path: Path) -> None:
    """The trainer crashed and waits out its backoff (made long here, so that the outage
    lasts as long as the test needs): the gateway says the trainer's services are
    NOT_SERVING, and samples the fork as before."""
    base = make_tiny_base(tmp_path / "tiny-base")
    config = stack_config(tmp_path, restart_backoff=3600, restart_backoff_max=3600)
    stack = LocalStack(config, out=io.StringIO())
    try:
        stack.start()
        head = add_tiny_fork(stack, base)
        trainer = stack.service("trainer")

        def body() -> None:
            assert trainer.pid is not None
            os.kill(trainer.pid, signal.SIGKILL)
            wait_until(lambda: trainer.restart_at is not None, what="the stack saw the crash")
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            for service in ("headway.v1.ModelService", "headway.v1.TrainingService"):
                wait_until(
                    lambda s=service: gateway_health(stack, s) == not_serving,
                    what=f"the gateway reports {service} NOT_SERVING",
                )
            # Sampling is still served: waited for, not read once, since on a loaded machine
            # a health check slower than its timeout (or a replica's late heartbeat) reads
            # as NOT_SERVING until the next check (a CI run failed on such a moment).
            serving = health_pb2.HealthCheckResponse.SERVING
            wait_until(
                lambda: gateway_health(stack, "headway.v1.SamplingService") == serving,
                what="the gateway reports SamplingService SERVING with the trainer down",
            )

            async def sample_and_train() -> None:
                sampler = SamplingClient("fork", url=stack.config.listen)
                result = await sampler.sample("what is 1 plus 2?", n=2, max_tokens=4)
                assert result.checkpoint == head and len(result.sequences) == 2
                await sampler.close()
                down = TrainingClient("fork", url=stack.config.listen, retry_timeout=0)
                try:
                    await down.head()
                except Unavailable:
                    pass
                else:
                    raise AssertionError("the trainer answered while it was down")
                await down.close()

            asyncio.run(sample_and_train())

        supervised(stack, body)
        assert trainer.restarts == 0 and trainer.last_exit == "killed by signal 9"
    finally:
        stack.stop()


@pytest.mark.slow
def test_a_training_loop_survives_the_trainer_and_a_sampler_being_killed(tmp_path: Path) -> None:
    """The seed's loop (agents over HTTP with token ids, TrainingClient.step) for 6 steps;
    the trainer is SIGKILLed after step 2, the sampler after step 4. The stack restarts
    each, the SDK's retries carry the loop across, and every step is applied exactly
    once: the tree is one chain of steps 1..6, and each step's checkpoint served the
    next step's rollouts."""
    base = make_tiny_base(tmp_path / "tiny-base")
    out = io.StringIO()
    stack = LocalStack(stack_config(tmp_path), out=out)
    killed: dict[str, int] = {}

    def kill(name: str) -> None:
        pid = stack.service(name).pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed[name] = pid

    async def train(initial_head: str) -> tuple[list[StepResult], list[list[Run]], list]:
        agent = create_agent(
            "fork",
            completion_kwargs={
                "max_tokens": 4,
                "temperature": 1.0,
                "extra_body": {"return_token_ids": True},
            },
            base_url=f"http://{stack.config.http}/v1",
            retry_timeout=HANG_SECONDS,
        )
        trainer = TrainingClient("fork", url=stack.config.listen, retry_timeout=HANG_SECONDS)
        assert (await trainer.head()).id == initial_head
        taskset = Taskset(
            Task(f"what is {i} plus {i}?", lambda run: float(len(run.text) % 2)) for i in range(2)
        )
        session = await Job.start("fork", group=4, url=stack.config.listen)
        results, batches = [], []
        for step in range(1, STEPS + 1):
            start = len(session.runs)
            await taskset.run(agent, job=session)
            batch = session.runs[start:]
            results.append(await trainer.step(batch, learning_rate=1e-3, group_size=4))
            batches.append(batch)
            if step == 2:
                kill("trainer")
            elif step == 4:
                kill("sampler-0")
        tree = await trainer.checkpoints()
        await agent.close()
        await session.close()
        await trainer.close()
        return results, batches, tree

    try:
        stack.start()
        initial_head = add_tiny_fork(stack, base)
        results, batches, tree = supervised(stack, lambda: asyncio.run(train(initial_head)))
    finally:
        stack.stop()

    # Every step applied once, in order: one chain 0..6, its head the last step's.
    assert [r.step for r in results] == list(range(1, STEPS + 1))
    assert [c.step for c in tree] == list(range(STEPS + 1))
    assert all(c.parent_id == p.id for p, c in zip(tree, tree[1:], strict=False))
    assert tree[0].id == initial_head and tree[-1].is_head
    assert [c.id for c in tree[1:]] == [r.checkpoint for r in results]
    # Read-your-writes across the restarts: each step's rollouts came from the head the
    # previous step made.
    served_by = [initial_head] + [r.checkpoint for r in results[:-1]]
    for step, (batch, head) in enumerate(zip(batches, served_by, strict=True), start=1):
        assert {run.turns[0].checkpoint for run in batch} == {head}, f"step {step}"
    # Each killed child was restarted once, the gateway never.
    restarts = {s.name: s.restarts for s in stack.services}
    assert restarts == {"trainer": 1, "sampler-0": 1, "gateway": 0}, out.getvalue()
    for name, pid in killed.items():
        assert stack.service(name).proc.pid != pid  # type: ignore[union-attr]
        assert f"{name} exited unexpectedly (killed by signal 9): restarted" in out.getvalue()
