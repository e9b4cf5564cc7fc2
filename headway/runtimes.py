"""Where a taskset's episodes run: `LocalRuntime`, `ProcessRuntime`, `RayRuntime`.

`Taskset.run(agent, runtime=...)` hands each episode (the agent's turns, the task's tool
after each reply, the reward function at the end) to its runtime, which returns the
finished run and its reward; the taskset does the rest (order, retries, error budget,
rewards onto traces).

- `LocalRuntime` (the default): everything in the caller's event loop. Cheap, but a
  CPU-heavy reward function or a tool that blocks stalls every other episode, and one
  that crashes the process ends the run.
- `ProcessRuntime(workers=N)`: the sampling calls stay in the caller's loop (they wait on
  the network), tools and reward functions run in N worker processes. A worker that
  crashes fails only the call it was running (its episode becomes an errored run) and is
  replaced; a call cut by `rollout_timeout` has its worker killed and replaced, so a tool
  that never returns cannot hold a worker. Tools and reward functions must be picklable
  (module-level functions of a module the workers can import: a script needs its
  `if __name__ == "__main__":` guard), as must what they return; a tool is sent with each
  call, so state it keeps between turns stays in the worker, not with the episode. They
  may run programs (`subprocess`), not start multiprocessing children of their own
  (workers are daemon processes, which die with the caller).
- `RayRuntime(address=None)`: whole episodes (tools, rewards and their sampling calls to
  the gateway) run as Ray tasks on a Ray cluster, so rollouts scale past one machine; each
  task builds its own agent from the caller's (model, completion kwargs, gateway URL, key),
  which must reach the gateway from the cluster's machines (a subclass of `Agent` is
  rebuilt as a plain one). `rollout_timeout` counts from the episode's submission, its
  wait for a free Ray CPU included. `ray` is the `[ray]` extra.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import multiprocessing
import pickle
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from headway.errors import InvalidArgument

if TYPE_CHECKING:
    from headway.agents import Agent
    from headway.eval import Task
    from headway.types import Run

__all__ = ["LocalRuntime", "ProcessRuntime", "RayRuntime", "Runtime", "WorkerCrashed"]


class WorkerCrashed(RuntimeError):
    """The worker process running a tool or reward function died."""


async def score(task: Task, run: Run) -> float:
    """`task.reward_fn(run)`, awaited when it is a coroutine."""
    reward = task.reward_fn(run)
    if inspect.isawaitable(reward):
        reward = await reward
    return reward  # type: ignore[return-value]


class Runtime:
    """Plays one episode of a task: (the run, its reward)."""

    async def play(self, agent: Agent, task: Task) -> tuple[Run, Any]:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the runtime holds (worker processes)."""


class LocalRuntime(Runtime):
    """Episodes, tools and reward functions in the caller's event loop."""

    async def play(self, agent: Agent, task: Task) -> tuple[Run, Any]:
        run = await agent.run(task.prompt, max_turns=task.max_turns, tool=task.tool)
        run.task = task
        return run, await score(task, run)


# ------------------------------------------------------------------- process runtime


def _serve(conn: Any) -> None:
    """A worker process: run each (function, args) received, send back (ok, value)."""
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            fn, args = pickle.loads(payload)  # a function this process cannot import: an error
            value = fn(*args)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
            conn.send_bytes(pickle.dumps((True, value)))
        except BaseException as e:  # sent back: the caller's episode fails, not this worker
            conn.send_bytes(pickle.dumps((False, _portable(e))))


def _portable(error: BaseException) -> Exception:
    """An error the caller can raise in its episode: an Exception that survives pickling
    (SystemExit, a cancellation or an exception that does not round-trip become text)."""
    if isinstance(error, Exception):
        with contextlib.suppress(Exception):
            pickle.loads(pickle.dumps(error))
            return error
    return RuntimeError(f"{type(error).__name__}: {error}")


async def _awaited(value: Any) -> Any:
    return await value


class _Worker:
    """One worker process and the pipe to it."""

    def __init__(self, context: Any) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def roundtrip(self, fn: Callable[..., Any], args: tuple) -> tuple[bool, Any]:
        """Send a call and wait for its answer (a thread of the caller's waits here)."""
        try:
            payload = pickle.dumps((fn, args))
        except Exception as e:
            raise InvalidArgument(
                f"ProcessRuntime runs {getattr(fn, '__qualname__', fn)!r} in another process, "
                f"but it (or its arguments) cannot be pickled ({e}): define it at module level"
            ) from None
        try:
            self.conn.send_bytes(payload)
            answer = self.conn.recv_bytes()
        except (EOFError, OSError):
            self.process.join(timeout=5)
            raise WorkerCrashed(
                f"the worker process running {getattr(fn, '__qualname__', fn)!r} died "
                f"(exit code {self.process.exitcode})"
            ) from None
        try:
            return pickle.loads(answer)
        except Exception as e:  # a result or error this process cannot rebuild
            return False, RuntimeError(
                f"the result of {getattr(fn, '__qualname__', fn)!r} could not be read back: {e}"
            )

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
            self.process.join(timeout=5)
        with contextlib.suppress(Exception):
            self.conn.close()


class ProcessRuntime(Runtime):
    """Tools and reward functions in `workers` worker processes (see the module doc)."""

    def __init__(self, workers: int = 2) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InvalidArgument(f"workers is {workers!r}: a count, >= 1")
        self.workers = workers
        # spawn: a fork of a process with gRPC's and torch's threads is not safe.
        self._context = multiprocessing.get_context("spawn")
        # Idle workers, as a queue of the event loop using the runtime (rebuilt for another
        # loop: each asyncio.run of a taskset has its own).
        self._idle: asyncio.Queue[_Worker] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._closed = False
        self._threads = concurrent.futures.ThreadPoolExecutor(workers, "headway-runtime")
        self._lock = threading.Lock()
        self.replaced = 0  # workers replaced after a crash or a cut call

    def _start(self) -> asyncio.Queue[_Worker]:
        if self._closed:
            raise InvalidArgument("this ProcessRuntime is closed: make a new one")
        loop = asyncio.get_running_loop()
        if self._idle is None or self._loop is not loop:
            self._idle, self._loop = asyncio.Queue(), loop
            with self._lock:
                if not self._all:
                    self._all = [_Worker(self._context) for _ in range(self.workers)]
                idle = [w for w in self._all if w not in self._busy]
            for worker in idle:
                self._idle.put_nowait(worker)
        return self._idle

    def _spawn(self) -> _Worker:
        worker = _Worker(self._context)
        with self._lock:
            self._all.append(worker)
        return worker

    def _replace(self, worker: _Worker) -> _Worker | None:
        worker.kill()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
        self.replaced += 1
        return None if self._closed else self._spawn()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` (awaited if it is a coroutine) in a worker process."""
        idle = self._start()
        worker: _Worker | None = await idle.get()
        self._busy.add(worker)
        loop = asyncio.get_running_loop()
        try:
            ok, value = await loop.run_in_executor(self._threads, worker.roundtrip, fn, args)
        except WorkerCrashed:
            self._busy.discard(worker)
            worker = self._replace(worker)
            raise
        except asyncio.CancelledError:  # cut (a timeout): the call may never end
            self._busy.discard(worker)
            worker = self._replace(worker)
            raise
        finally:
            self._busy.discard(worker)
            if worker is not None and self._idle is idle:
                idle.put_nowait(worker)
        if not ok:
            raise value
        return value

    async def play(self, agent: Agent, task: Task) -> tuple[Run, Any]:
        tool = None
        if task.tool is not None:
            step = task.tool

            async def tool(reply: str) -> Any:
                return await self.call(step, reply)

        run = await agent.run(task.prompt, max_turns=task.max_turns, tool=tool)
        # The run crosses without its task's functions (they travel as the call itself).
        run.task = dataclasses.replace(task, tool=None)
        reward, info = await self.call(_reward_in_worker, task.reward_fn, run)
        run.task = task
        run.info.update(info)
        return run, reward

    async def close(self) -> None:
        self._closed = True
        with self._lock:
            workers, self._all = list(self._all), []
        for worker in workers:  # a call still running ends with WorkerCrashed
            worker.kill()
        self._threads.shutdown(wait=False)
        self._idle = None


def _reward_in_worker(reward_fn: Callable[[Run], Any], run: Run) -> tuple[Any, dict]:
    """In a worker: the reward, and the run's `info` as the reward function left it."""
    reward = reward_fn(run)
    if inspect.isawaitable(reward):
        reward = asyncio.run(_awaited(reward))
    return reward, run.info


# ----------------------------------------------------------------------- ray runtime


class RayRuntime(Runtime):
    """Whole episodes as Ray tasks (see the module doc). `address`: the cluster to join
    when Ray is not initialized in this process yet ("auto", "ray://host:10001", ...;
    None starts a local one, as `ray.init()` does)."""

    def __init__(self, address: str | None = None, **remote_options: Any) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise InvalidArgument("RayRuntime needs ray: pip install 'headway[ray]'") from None
        self.address = address
        self.options = {"num_cpus": 1, **remote_options}
        self._remote: Any = None

    async def _episode(self) -> Any:
        import ray

        if not ray.is_initialized():  # seconds: off the event loop
            await asyncio.to_thread(ray.init, address=self.address)
        if self._remote is None:
            self._remote = ray.remote(**self.options)(_ray_episode)
        return self._remote

    async def play(self, agent: Agent, task: Task) -> tuple[Run, Any]:
        import ray

        spec = {
            "model": agent.model,
            "completion_kwargs": agent.completion_kwargs,
            "base_url": agent.base_url,
            "api_key": agent.api_key,
            "system_prompt": agent.system_prompt,
            "max_retries": agent.max_retries,
            "retry_timeout": agent.retry_timeout,
            "retry_backoff": agent.retry_backoff,
        }
        ref = (await self._episode()).remote(spec, task)
        try:
            run, reward = await ref
        except asyncio.CancelledError:  # cut: the task stops too
            ray.cancel(ref, force=True)
            raise
        except ray.exceptions.RayTaskError as e:  # the episode's own error, as raised there
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        run.task = task
        return run, reward


def _ray_episode(spec: dict[str, Any], task: Task) -> tuple[Run, Any]:
    """In a Ray worker: one episode with an agent of its own, and its reward."""
    from headway.agents import create_agent

    async def episode() -> tuple[Run, Any]:
        agent = create_agent(**spec)
        try:
            return await LocalRuntime().play(agent, task)
        finally:
            await agent.close()

    run, reward = asyncio.run(episode())
    run.task = None  # the caller has it
    return run, reward
