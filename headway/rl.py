"""The RL loop: roll out a taskset, train a step, again; optionally with the rollouts of
step k+1 running while step k trains (off-policy by a bounded number of steps).

```python
reports = await rl_loop("arith-rl", taskset, agent, steps=20, group=8, learning_rate=1e-3,
                        max_steps_off_policy=1,              # rollouts overlap training
                        eval_every=5, eval_taskset=held_out)  # evals recorded on checkpoints
```

Synchronous (`max_steps_off_policy=0`): each step trains on runs sampled from the head
it updates. Asynchronous (>= 1): while step k trains, the rollouts of step k+1 already
sample the head of step k-1; a run's staleness is how many steps the head has moved
since the checkpoint that sampled it (each turn names its checkpoint: the oldest counts),
and a GRPO group is as stale as its stalest run. Groups staler than
`max_steps_off_policy` are dropped (`off_policy="drop"`) or trained with their rewards,
and so their advantages and gradient, scaled by `decay` per step over the bound
(`"downweight"`). The built-in losses correct the rest with the ratio to the sampling
logprobs (importance_sampling, ppo, cispo).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from headway.agents import Agent
from headway.client.training import TrainingClient
from headway.errors import InvalidArgument
from headway.eval import Evaluation, Job, Taskset, evaluate
from headway.types import Run, StepResult

OFF_POLICY = ("drop", "downweight")

log = logging.getLogger(__name__)


@dataclass
class StepReport:
    """One step of the loop: its result, the runs it trained on, what staleness did."""

    result: StepResult | None  # None when every group was dropped (nothing to train)
    runs: list[Run]  # the runs trained on (dropped groups left out)
    reward_mean: float  # over the runs rolled out for this step
    seconds: float  # wall time since the previous step ended
    waited: float = 0.0  # of which waiting for this step's rollouts to finish
    trained: float = 0.0  # of which in the training calls
    staleness: dict[int, int] = field(default_factory=dict)  # steps behind → runs
    dropped: int = 0  # runs in groups dropped as too far off policy
    evaluation: Evaluation | None = None


async def rl_loop(
    model: str,
    taskset: Taskset,
    agent: Agent,
    *,
    steps: int,
    group: int,
    learning_rate: float,
    loss_fn: str = "importance_sampling",
    max_steps_off_policy: int = 0,
    off_policy: str = "drop",
    decay: float = 0.5,
    kl_penalty_coef: float = 0.0,
    eval_every: int = 0,
    eval_taskset: Taskset | None = None,
    eval_group: int = 4,
    eval_name: str = "eval",
    url: str | None = None,
    on_step: Callable[[StepReport], Any] | None = None,
) -> list[StepReport]:
    """Train `model` for `steps` GRPO steps of `group` runs per task of `taskset`, played
    by `agent` (which must record token ids: `extra_body={"return_token_ids": True}`).
    See the module docstring for `max_steps_off_policy`, `off_policy` and `decay`. With
    `eval_every` N, `eval_taskset` is evaluated on every Nth step's checkpoint
    (`headway.eval.evaluate`, recorded on it). `on_step(report)` is called (and awaited,
    if it returns an awaitable) after each step."""
    _check(steps, group, max_steps_off_policy, off_policy, decay, eval_every, eval_taskset)
    trainer = TrainingClient(model, url=url)
    session: Job | None = None
    reports: list[StepReport] = []

    # Rollouts of the steps ahead, oldest first: one at a time when synchronous, up to
    # `max_steps_off_policy` beside the step training when not.
    ahead: deque[asyncio.Future[list[Run]]] = deque()
    launched = 0

    def launch() -> None:
        nonlocal launched
        # Its own runs, whatever other batches append to the job meanwhile.
        ahead.append(asyncio.ensure_future(taskset.run(agent, job=session)))
        launched += 1

    try:
        session = await Job.start(model, group=group, url=url)
        head = await trainer.head()
        steps_of = {head.id: head.step}  # checkpoint → its step, as the loop saw them
        last = time.monotonic()
        launch()
        for k in range(steps):
            wait = time.monotonic()
            batch = await ahead.popleft()
            wait = time.monotonic() - wait
            # The next steps' rollouts sample while this one trains (asynchronous), or
            # after it (synchronous: they then sample its checkpoint).
            while len(ahead) < max_steps_off_policy and launched < steps:
                launch()
            training = time.monotonic()
            report = await _train(
                trainer, batch, group, steps_of, head.step, learning_rate, loss_fn,
                max_steps_off_policy, off_policy, decay, kl_penalty_coef,
            )  # fmt: skip
            report.waited, report.trained = wait, time.monotonic() - training
            if report.result is not None:
                head = report.result.checkpoint_info
                steps_of[report.result.checkpoint] = report.result.step
            if eval_every and report.result is not None and (k + 1) % eval_every == 0:
                assert eval_taskset is not None
                try:
                    report.evaluation = await evaluate(
                        model, eval_taskset, checkpoint=report.result.checkpoint,
                        group=eval_group, name=eval_name, url=url, http_url=agent.base_url,
                        api_key=agent.api_key,
                    )  # fmt: skip
                except Exception:  # an evaluation failing does not end the training
                    log.exception("evaluation of %s at step %d failed", model, k + 1)
            now = time.monotonic()
            report.seconds, last = now - last, now
            reports.append(report)
            if on_step is not None and inspect.isawaitable(shown := on_step(report)):
                await shown
            if not max_steps_off_policy and launched < steps:
                launch()
    finally:
        for pending in ahead:
            pending.cancel()
        await asyncio.gather(*ahead, return_exceptions=True)  # their errors read, too
        if session is not None:
            await session.close()
        await trainer.close()
    return reports


def _check(
    steps: int, group: int, bound: int, off_policy: str, decay: float, every: int, evals: Any
) -> None:
    if steps < 1 or group < 1:
        raise InvalidArgument(f"steps and group must be >= 1; got {steps} and {group}")
    if bound < 0:
        raise InvalidArgument(f"max_steps_off_policy is {bound}: >= 0 (0 = synchronous)")
    if off_policy not in OFF_POLICY:
        raise InvalidArgument(f"off_policy {off_policy!r}: choose {' or '.join(OFF_POLICY)}")
    if not 0 < decay <= 1:
        raise InvalidArgument(f"decay is {decay}: a factor in (0, 1]")
    if every < 0 or (every and evals is None):
        raise InvalidArgument("eval_every needs an eval_taskset (and is >= 0)")


def staleness(run: Run, steps_of: dict[str, int], head_step: int) -> int:
    """Steps the head has moved since the oldest checkpoint that sampled `run` (a
    checkpoint the loop never saw counts as older than any it did)."""
    seen = [steps_of.get(t.checkpoint, -1) for t in run.turns if t.checkpoint]
    return head_step - min(seen) if seen else 0


def plan(
    batch: Sequence[Run],
    group: int,
    steps_of: dict[str, int],
    head_step: int,
    bound: int,
    off_policy: str,
    decay: float,
) -> tuple[dict[float, list[Run]], StepReport]:
    """The batch's GRPO groups by the reward scale they train with (1 within the bound;
    `decay` per step over it with "downweight"; left out with "drop"), and the report of
    the step so far (staleness, dropped runs, mean reward)."""
    done = [r for r in batch if r.reward is not None]
    reward_mean = sum(r.reward for r in done) / len(done) if done else 0.0
    report = StepReport(None, [], reward_mean, 0.0)
    scaled: dict[float, list[Run]] = {}
    for g in range(0, len(batch), group):
        runs = list(batch[g : g + group])
        behind = [staleness(r, steps_of, head_step) for r in runs]
        for b in behind:
            report.staleness[b] = report.staleness.get(b, 0) + 1
        stale = max(behind)
        if stale <= bound:
            scaled.setdefault(1.0, []).extend(runs)
        elif off_policy == "drop":
            report.dropped += len(runs)
        else:
            scaled.setdefault(decay ** (stale - bound), []).extend(runs)
    return scaled, report


async def _train(
    trainer: TrainingClient,
    batch: Sequence[Run],
    group: int,
    steps_of: dict[str, int],
    head_step: int,
    learning_rate: float,
    loss_fn: str,
    bound: int,
    off_policy: str,
    decay: float,
    kl_penalty_coef: float,
) -> StepReport:
    """One step on `batch` (see `plan`): scaled groups accumulate first, the step then
    applies everything."""
    scaled, report = plan(batch, group, steps_of, head_step, bound, off_policy, decay)
    if not scaled:
        return report
    last_scale = 1.0 if 1.0 in scaled else min(scaled)
    accumulated = False
    try:
        for scale, runs in scaled.items():
            if scale != last_scale:
                # The whole of a stale group's gradient is scaled: its KL term too.
                await trainer.forward_backward(
                    runs, loss_fn, group_size=group, reward_scale=scale,
                    kl_penalty_coef=kl_penalty_coef * scale,
                )  # fmt: skip
                accumulated = True
                report.runs += runs
        runs = scaled[last_scale]
        report.result = await trainer.step(
            runs, learning_rate, group_size=group, loss_fn=loss_fn, reward_scale=last_scale,
            kl_penalty_coef=kl_penalty_coef * last_scale,
        )  # fmt: skip
    except BaseException:
        if accumulated:  # a gradient half applied: dropped (the head is unchanged)
            await trainer.set_head(await trainer.head())
        raise
    report.runs += runs
    return report
