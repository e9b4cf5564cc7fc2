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

Rollouts fail alone when asked to (`max_errors`): one that raises or outlasts
`rollout_timeout` (after `retries` fresh attempts) stays in its place as an errored `Run`
(`run.error`, no reward) and the others go on; the training calls drop errored runs,
group by group. Past `max_errors`, the rest are cancelled and `RolloutsFailed` is raised.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from headway.agents import Agent, Tool
from headway.client import TraceClient
from headway.errors import InvalidArgument
from headway.runtimes import LocalRuntime, Runtime
from headway.types import Run

__all__ = ["Evaluation", "Job", "RewardFn", "RolloutsFailed", "Task", "Taskset", "evaluate"]

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


class RolloutsFailed(Exception):
    """More rollouts of a `Taskset.run` failed than its `max_errors` allows. `runs`: the
    errored runs (each with its `error`); the first failure is the `__cause__`."""

    def __init__(self, message: str, runs: list[Run]) -> None:
        super().__init__(message)
        self.runs = runs


def error_budget(max_errors: int | float, rollouts: int) -> int:
    """How many of `rollouts` may fail: `max_errors` as a count (an int) or a fraction of
    them (a float in [0, 1]); InvalidArgument otherwise."""
    if isinstance(max_errors, bool) or not isinstance(max_errors, int | float):
        raise InvalidArgument(f"max_errors is {max_errors!r}: a count (int) or a fraction (float)")
    if isinstance(max_errors, float):
        if not 0.0 <= max_errors <= 1.0:
            raise InvalidArgument(
                f"max_errors is {max_errors}: a fraction lies in [0, 1] (a count is an int)"
            )
        return math.floor(max_errors * rollouts + 1e-9)  # 0.29 * 100 is 28.99...
    if max_errors < 0:
        raise InvalidArgument(f"max_errors is {max_errors}: a count is >= 0")
    return max_errors


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
        runtime: Runtime | None = None,
        job: Job | None = None,
        *,
        group: int | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        rollout_timeout: float | None = None,
        max_errors: int | float = 0,
        retries: int = 0,
    ) -> list[Run]:
        """Play each task `group` times concurrently, score the runs, and return them.

        `group` defaults to the job's (1 without a job). At most `max_concurrency` episodes
        are in flight at once (a sampler queues a bounded number of requests and refuses
        the rest; 64 keeps a replica's decode batch full). The runs come back (and are
        appended to `job.runs`) task by task, each task's `group` runs consecutive. Each
        run's reward is set, and attached to its trace when it has one.

        A rollout (episode and reward function) that raises, or runs longer than
        `rollout_timeout` seconds, is played again up to `retries` times; if it still
        fails it becomes an errored `Run` in its place (`run.error`, no reward), and the
        others go on, as long as the failures stay within `max_errors`: a count (int) or a
        fraction of all rollouts (float). With the default 0 the first failure cancels the
        others and propagates as it was raised; past a larger `max_errors`, the others
        are cancelled and `RolloutsFailed` is raised. Either way nothing is appended to
        the job. `runtime` is where episodes run (`headway.runtimes`: `LocalRuntime`, the
        default, `ProcessRuntime`, `RayRuntime`).
        """
        runtime = runtime if runtime is not None else LocalRuntime()
        if not isinstance(runtime, Runtime):
            raise InvalidArgument(
                f"runtime is {type(runtime).__name__}: a headway.runtimes Runtime "
                "(LocalRuntime, ProcessRuntime, RayRuntime)"
            )
        size = group or (job.group if job is not None else 1)
        if size < 1:
            raise InvalidArgument(f"group is {size}: each task runs at least once")
        if max_concurrency < 1:
            raise InvalidArgument(f"max_concurrency is {max_concurrency}: it must be >= 1")
        if rollout_timeout is not None and not (
            math.isfinite(rollout_timeout) and rollout_timeout > 0
        ):
            raise InvalidArgument(f"rollout_timeout is {rollout_timeout}: seconds, > 0")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgument(f"retries is {retries!r}: a count, >= 0")
        rollouts = len(self.tasks) * size
        budget = error_budget(max_errors, rollouts)
        gate = asyncio.Semaphore(max_concurrency)
        traces = job.traces if job is not None and job.traces is not None else None
        own = traces is None
        if traces is None:  # no job: rewards still go onto the traces, through the default URL
            traces = TraceClient()
        failures: list[tuple[Run, BaseException]] = []
        too_many = asyncio.Event()

        async def attempt(task: Task) -> Run:
            """One rollout, retried, and kept as an errored run if the budget allows."""
            for tries in range(retries + 1):
                try:
                    play = _play(agent, task, traces, gate, rollout_timeout, runtime)
                    run = await play
                    if tries:
                        run.info["attempts"] = tries + 1
                    return run
                except Exception as e:  # cancellation is not a failure of the rollout
                    task_now = asyncio.current_task()
                    if task_now is not None and task_now.cancelling():
                        raise  # cancelled (over the budget) while failing: not retried
                    error = e
            failed = Run(task=task, model=agent.model, error=_describe(error, rollout_timeout))
            failed.info["attempts"] = retries + 1
            failures.append((failed, error))
            # Not kept in this frame (the error's traceback holds it): fewer cycles for the
            # collector to find later (under CPython 3.11.7, finalizers run by a collection
            # in the middle of an ast.parse fail it).
            del error
            if len(failures) > budget:
                too_many.set()
            return failed

        jobs = [asyncio.ensure_future(attempt(task)) for task in self.tasks for _ in range(size)]
        watcher = asyncio.ensure_future(too_many.wait())
        every = asyncio.gather(*jobs)
        # Its exception (the cancellation, when stopped early) is read when it ends.
        every.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            # Done when every rollout is, or at the first failure over the budget.
            await asyncio.wait([every, watcher], return_when=asyncio.FIRST_COMPLETED)
            if too_many.is_set():
                raise _over_budget(failures, rollouts, max_errors)
            # gather keeps the input order, so runs come back grouped by task.
            runs = every.result()
        except BaseException:
            for pending in jobs:
                pending.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            raise
        finally:
            watcher.cancel()
            every.cancel()
            if own:
                await traces.close()
        if job is not None:
            job.runs.extend(runs)
        return runs


def _describe(error: BaseException, timeout: float | None) -> str:
    """An errored run's `error`: the exception's type and message."""
    cut = isinstance(error.__cause__, asyncio.CancelledError)  # by asyncio.timeout
    if isinstance(error, TimeoutError) and timeout is not None and cut:
        return f"TimeoutError: the rollout ran over rollout_timeout={timeout} s"
    return f"{type(error).__name__}: {error}"


def _over_budget(
    failures: list[tuple[Run, BaseException]], rollouts: int, max_errors: int | float
) -> BaseException:
    """What Taskset.run raises once more rollouts failed than `max_errors` allows."""
    first_run, first = failures[0]
    if not isinstance(max_errors, float) and max_errors == 0:
        return first
    error = RolloutsFailed(
        f"{len(failures)} of {rollouts} rollouts failed, over max_errors={max_errors}; "
        f"the first: {first_run.error}",
        [run for run, _ in failures],
    )
    error.__cause__ = first
    return error


async def _play(
    agent: Agent,
    task: Task,
    traces: TraceClient,
    gate: asyncio.Semaphore,
    timeout: float | None,
    runtime: Runtime,
) -> Run:
    async with gate:  # the timeout counts from the start of the episode, not of the wait
        async with asyncio.timeout(timeout):
            return await _episode(agent, task, traces, runtime)


async def _episode(agent: Agent, task: Task, traces: TraceClient, runtime: Runtime) -> Run:
    """Play `task` once on `runtime` and score it (its reward attached to its trace)."""
    run, reward = await runtime.play(agent, task)
    reward = float(reward)
    if not math.isfinite(reward):
        raise InvalidArgument(f"task {task.name or task.prompt!r}: reward {reward} is not finite")
    run.reward = reward
    if run.trace_id:
        # The trace gets the reward too, so `trainer.step([run.trace_id, ...])` works.
        await traces.set_reward(run.trace_id, reward)
    return run


# ------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    """An evaluation of one checkpoint on a taskset: its metrics (as recorded on the
    checkpoint: `<name>/reward_mean`, `<name>/pass@1`, `<name>/pass@k`, `<name>/runs`,
    `<name>/errored`) and the runs behind them, task by task."""

    model: str
    checkpoint: str
    metrics: dict[str, float]
    runs: list[Run]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c passed (Chen et al.,
    2021): the chance that at least one of k samples drawn without replacement passes."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise InvalidArgument(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


async def evaluate(
    model: str,
    taskset: Taskset,
    *,
    checkpoint: str = "",
    group: int = 4,
    name: str = "eval",
    success: float = 1.0,
    record: bool = True,
    completion_kwargs: Mapping[str, Any] | None = None,
    max_errors: int | float = 0,
    url: str | None = None,
    http_url: str | None = None,
    api_key: str | None = None,
) -> Evaluation:
    """Play every task of `taskset` `group` times on a checkpoint of `model` (id or tag;
    default the head when the evaluation starts, pinned for all of it), and record the
    results on that checkpoint (`Checkpoint.evals`, shown by `headway models checkpoints`
    and `head`) unless `record` is false: the mean reward, pass@1 and pass@`group` (a run
    passes when its reward is at least `success`), over the runs that did not error.

    `completion_kwargs` go to the agent's chat calls (default: max_tokens 64, temperature
    1); `url` is the gateway's gRPC address (`HEADWAY_URL`), `http_url` its OpenAI
    endpoint (`HEADWAY_HTTP_URL`).
    """
    from headway.agents import create_agent
    from headway.client.models import ModelClient

    if group < 1:
        raise InvalidArgument(f"group is {group}: each task runs at least once")
    async with ModelClient(url, api_key) as models:
        ckpt = (
            await models.head(model)
            if not checkpoint
            else await _checkpoint(models, model, checkpoint)
        ).id
        kwargs = {"max_tokens": 64, "temperature": 1.0, **dict(completion_kwargs or {})}
        extra = {**dict(kwargs.pop("extra_body", None) or {}), "checkpoint": ckpt}
        agent = create_agent(
            model, {**kwargs, "extra_body": extra}, base_url=http_url, api_key=api_key
        )
        # Rewards go onto the traces through this gateway (`url`, `api_key`).
        job = await Job.start(model, group=group, url=url, api_key=api_key)
        try:
            runs = await taskset.run(agent, job=job, max_errors=max_errors)
        finally:
            await job.close()
        metrics = _eval_metrics(runs, len(taskset), group, name, success)
        if record:
            await models.record_eval(model, ckpt, metrics)
    return Evaluation(model, ckpt, metrics, runs)


async def _checkpoint(models: Any, model: str, checkpoint: str) -> Any:
    """The checkpoint `checkpoint` (id or tag) of `model`, from its tree."""
    for c in await models.checkpoints(model):
        if checkpoint == c.id or checkpoint in c.tags:
            return c
    from headway.errors import NotFound

    raise NotFound(f"checkpoint {checkpoint!r} of model {model!r} not found")


def _eval_metrics(
    runs: list[Run], tasks: int, group: int, name: str, success: float
) -> dict[str, float]:
    """Mean reward, pass@1 and pass@group over the tasks' non-errored runs."""
    done = [r for r in runs if not r.errored and r.reward is not None]
    out = {
        f"{name}/runs": float(len(done)),
        f"{name}/errored": float(len(runs) - len(done)),
        f"{name}/reward_mean": sum(r.reward for r in done) / len(done) if done else 0.0,
    }
    ok = {id(r) for r in done}
    for k in sorted({1, group}):
        scores = []
        for t in range(tasks):
            mine = [r for r in runs[t * group : (t + 1) * group] if id(r) in ok]
            if len(mine) >= k:
                passed = sum(r.reward >= success for r in mine)
                scores.append(pass_at_k(len(mine), passed, k))
        if scores:  # no task with k finished runs: no pass@k to report
            out[f"{name}/pass@{k}"] = sum(scores) / len(scores)
    return out
