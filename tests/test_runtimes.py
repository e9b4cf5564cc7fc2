"""Runtimes of a taskset against the live stack: the same seeded (greedy) tasks give the
same rewards in the caller's loop (LocalRuntime), in worker processes (ProcessRuntime)
and as Ray tasks on a local Ray cluster the test starts (RayRuntime); a worker that
crashes or a tool that blocks forever fails only its episode, and the worker is
replaced."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from headway import Run
from headway.agents import create_agent
from headway.eval import Job, Task, Taskset
from headway.runtimes import LocalRuntime, ProcessRuntime, RayRuntime
from tests.helpers_sdk import fork, url

ROOT = Path(__file__).resolve().parent.parent


# Module-level: a ProcessRuntime's workers and Ray's import them by name.
def text_length(run: Run) -> float:
    run.info["scored_in"] = os.getpid()
    return float(len(run.text) % 7)


def follow_up(reply: str) -> str:
    return f"you said {len(reply)} characters; and 2 plus 2?"


def crash(run: Run) -> float:
    os._exit(3)  # the worker process dies mid-call


def blocks_forever(reply: str) -> str:
    Path(os.environ["HEADWAY_TEST_REACHED"]).touch()  # the tool began (the cut came after)
    time.sleep(3600)  # a blocking tool: no coroutine to cancel, only a process to kill
    return "never"


def tasks() -> Taskset:
    return Taskset(
        [Task(f"what is {i} plus 1?", text_length, max_turns=2, tool=follow_up) for i in range(3)]
    )


def agent_for(stack):
    return create_agent(
        "m",
        completion_kwargs={"max_tokens": 5, "temperature": 0.0,
                           "extra_body": {"return_token_ids": True}},
        base_url=stack.gateway.http_url,
    )  # fmt: skip


async def rewards(stack, runtime) -> list[float]:
    agent = agent_for(stack)
    job = await Job.start("m", group=2, url=url(stack))
    try:
        runs = await tasks().run(agent, runtime=runtime, job=job)
    finally:
        await agent.close()
        await job.close()
    assert all(len(r.turns) == 2 and r.trace_id for r in runs)
    return [r.reward for r in runs]


def test_a_process_runtime_scores_as_the_local_one_and_survives_its_workers(
    gateway_stack, tmp_path, monkeypatch
):
    stack = gateway_stack
    fork(stack, "m")
    reached = tmp_path / "reached"
    monkeypatch.setenv("HEADWAY_TEST_REACHED", str(reached))  # the workers inherit it

    async def main() -> None:
        local = await rewards(stack, LocalRuntime())
        runtime = ProcessRuntime(workers=2)
        try:
            assert await rewards(stack, runtime) == local
            agent = agent_for(stack)
            job = await Job.start("m", url=url(stack))
            # A reward function that kills its worker: that episode errs, the other scores.
            mixed = Taskset(
                [Task("what is 1 plus 1?", crash), Task("what is 2 plus 1?", text_length)]
            )
            runs = await mixed.run(agent, runtime=runtime, job=job, max_errors=1)
            assert runs[0].error.startswith("WorkerCrashed: the worker process running")
            assert "exit code 3" in runs[0].error and runs[1].reward is not None
            assert runs[1].info["scored_in"] != os.getpid()  # scored in a worker
            # A tool that never returns: cut by the timeout, its worker killed and replaced
            # (if the cut came before the tool began, on a very slow machine, no worker was
            # held, and none is replaced).
            stuck = Taskset(
                [Task("what is 3 plus 1?", text_length, max_turns=2, tool=blocks_forever)]
            )
            runs = await stuck.run(
                agent, runtime=runtime, job=job, rollout_timeout=2.0, max_errors=1
            )
            assert runs[0].error.startswith("TimeoutError")
            assert runtime.replaced == (2 if reached.exists() else 1)
            # The replaced workers serve the next episodes.
            assert await rewards(stack, runtime) == local
            # A function a worker cannot import: refused with what to do.
            local_fn = Taskset([Task("what is 4 plus 1?", lambda run: 1.0)])
            with pytest.raises(Exception, match="define it at module level"):
                await local_fn.run(agent, runtime=runtime, job=job)
            await agent.close()
            await job.close()
        finally:
            await runtime.close()

    asyncio.run(main())


@pytest.mark.slow
def test_a_ray_runtime_plays_whole_episodes_on_a_local_ray_cluster(gateway_stack):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'headway[ray]')")
    stack = gateway_stack
    fork(stack, "m")
    try:
        ray.init(
            num_cpus=2, include_dashboard=False, log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},  # its workers import tests.*
        )  # fmt: skip
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"a local Ray cluster could not start here: {e}")
    try:

        async def main() -> None:
            local = await rewards(stack, LocalRuntime())
            assert await rewards(stack, RayRuntime()) == local

        asyncio.run(main())
    finally:
        ray.shutdown()
