"""Tasks, tasksets and jobs: run an agent on tasks, score the runs, collect them in order.

```python
session = await Job.start("arith-rl", group=8)     # 8 rollouts per task (a GRPO group)
start = len(session.runs)
await taskset.run(agent, job=session)
batch = session.runs[start:]                        # task by task, 8 runs each
await trainer.step(batch, learning_rate=1e-5, group_size=8)
```

`Taskset.run` plays every task `group` times concurrently, scores each run with its task's
reward function, attaches the reward to the run's trace on the gateway (so the trace id
is trainable too), and appends the runs to the job grouped by task, in task order, each
task's runs consecutive, whatever order they finished in: `group_size=group` lines up.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from headway.agents import Agent, Tool
from headway.client import TraceClient
from headway.errors import InvalidArgument
from headway.types import Run

__all__ = ["Job", "RewardFn", "Task", "Taskset"]

# Episodes of one Taskset.run in flight at once, by default.
DEFAULT_MAX_CONCURRENCY = 64

# Scores a finished run (its text is `run.text`); may be async.
RewardFn = Callable[[Run], "float | Awaitable[float]"]


@dataclass
class Task:
    """One task: a prompt (text or chat messages) and the function that scores a run.

    `reward_fn(run)` gets the finished `Run` (the reply is `run.text`, the conversation
    `run.messages`) and returns a float; it may be async. `tool` and `max_turns` make it
    multi-turn (see `Agent.run`).
    """

    prompt: str | Sequence[Mapping[str, Any]]
    reward_fn: RewardFn
    max_turns: int = 1
    tool: Tool | None = None
    name: str = ""


@dataclass
class Job:
    """A session of rollouts of one model: `runs` collects every scored run, in order.

    Create it with `await Job.start(model, group=8)`; `group` is how many times
    `Taskset.run` plays each task (the GRPO group size to train with).
    """

    model: str
    group: int = 1
    id: str = field(default_factory=lambda: f"job-{uuid.uuid4().hex[:12]}")
    runs: list[Run] = field(default_factory=list)
    traces: TraceClient | None = field(default=None, repr=False)

    @classmethod
    async def start(
        cls,
        model: str,
        group: int = 1,
        *,
        url: str | None = None,
        api_key: str | None = None,
    ) -> Job:
        """Start a job for `model` (checked to exist: NotFound otherwise).

        `url` / `api_key` reach the gateway's gRPC port (default `HEADWAY_URL` /
        `HEADWAY_API_KEY`), where rewards are attached to traces.
        """
        if group < 1:
            raise InvalidArgument(f"group is {group}: each task runs at least once")
        from headway.client import TrainingClient

        # Fail at the start, not after a taskset's worth of rollouts, for a wrong slug.
        async with TrainingClient(model, url=url, api_key=api_key) as client:
            await client.head()
        return cls(model=model, group=group, traces=TraceClient(url=url, api_key=api_key))

    async def close(self) -> None:
        """Close the job's connection to the gateway (runs stay available)."""
        if self.traces is not None:
            await self.traces.close()


class Taskset:
    """An ordered collection of tasks."""

    def __init__(self, tasks: Iterable[Task]) -> None:
        self.tasks = list(tasks)
        if not self.tasks:
            raise InvalidArgument("a taskset needs at least one task")

    def __len__(self) -> int:
        return len(self.tasks)

    async def run(
        self,
        agent: Agent,
        runtime: Any = None,
        job: Job | None = None,
        *,
        group: int | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> list[Run]:
        """Play each task `group` times concurrently, score the runs, and return them.

        `group` defaults to the job's (1 without a job). At most `max_concurrency` episodes
        are in flight at once (a sampler queues a bounded number of requests and refuses
        the rest; 64 keeps a replica's decode batch full). The runs come back (and are
        appended to `job.runs`) task by task, each task's `group` runs consecutive. Each
        run's reward is set, and attached to its trace when it has one. If any rollout or
        reward function fails, the others are cancelled and the error propagates; nothing
        is appended to the job. `runtime` is accepted for compatibility with hosted
        runtimes: tasks here run in-process, so it is not used.
        """
        del runtime  # tasks run in this process; kept for the seed's call shape
        size = group or (job.group if job is not None else 1)
        if size < 1:
            raise InvalidArgument(f"group is {size}: each task runs at least once")
        if max_concurrency < 1:
            raise InvalidArgument(f"max_concurrency is {max_concurrency}: it must be >= 1")
        gate = asyncio.Semaphore(max_concurrency)
        traces = job.traces if job is not None and job.traces is not None else None
        own = traces is None
        if traces is None:  # no job: rewards still go onto the traces, through the default URL
            traces = TraceClient()
        jobs = [
            asyncio.ensure_future(_play(agent, task, traces, gate))
            for task in self.tasks
            for _ in range(size)
        ]
        try:
            # gather keeps the input order, so runs come back grouped by task.
            runs = list(await asyncio.gather(*jobs))
        except BaseException:
            for pending in jobs:
                pending.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            raise
        finally:
            if own:
                await traces.close()
        if job is not None:
            job.runs.extend(runs)
        return runs


async def _play(agent: Agent, task: Task, traces: TraceClient, gate: asyncio.Semaphore) -> Run:
    async with gate:
        run = await agent.run(task.prompt, max_turns=task.max_turns, tool=task.tool)
    run.task = task
    reward = task.reward_fn(run)
    if inspect.isawaitable(reward):
        reward = await reward
    reward = float(reward)
    if not math.isfinite(reward):
        raise InvalidArgument(f"task {task.name or task.prompt!r}: reward {reward} is not finite")
    run.reward = reward
    if run.trace_id:
        # The trace gets the reward too, so `trainer.step([run.trace_id, ...])` works.
        await traces.set_reward(run.trace_id, reward)
    return run
