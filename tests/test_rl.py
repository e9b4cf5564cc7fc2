"""`headway.rl.rl_loop` (issue 17 §2): synchronous and asynchronous (the next step's
rollouts overlapping this one's training) GRPO steps, staleness per run from the
checkpoints its turns name, stale groups dropped or down-weighted, evals every N steps."""

from __future__ import annotations

import asyncio

import pytest

from headway import InvalidArgument, ModelClient
from headway.agents import create_agent
from headway.rl import plan, rl_loop
from headway.types import Run, Turn
from tests.helpers_evals import parity, tasks
from tests.helpers_sdk import fork, url


def _run(*checkpoints: str, reward: float = 1.0) -> Run:
    return Run(turns=[Turn([1], [2], [-0.5], checkpoint=c) for c in checkpoints], reward=reward)


def test_stale_groups_are_dropped_or_scaled():
    steps_of = {"a": 0, "b": 1, "c": 2}
    fresh, mixed, old = [_run("c"), _run("c")], [_run("b"), _run("c", "c")], [_run("a"), _run("b")]
    unknown = [_run("z"), _run("c")]  # a checkpoint the loop never saw: the oldest
    batch = fresh + mixed + old + unknown
    scaled, report = plan(batch, 2, steps_of, 2, bound=1, off_policy="drop", decay=0.5)
    assert scaled == {1.0: fresh + mixed} and report.dropped == 4
    assert report.staleness == {0: 4, 1: 2, 2: 1, 3: 1}
    scaled, report = plan(batch, 2, steps_of, 2, bound=1, off_policy="downweight", decay=0.5)
    assert scaled == {1.0: fresh + mixed, 0.5: old, 0.25: unknown} and report.dropped == 0
    scaled, _ = plan(batch, 2, steps_of, 2, bound=0, off_policy="drop", decay=0.5)
    assert scaled == {1.0: fresh}


@pytest.mark.parametrize("bound", [0, 1, 2], ids=["sync", "async1", "async2"])
def test_the_loop_trains_and_evaluates(gateway_stack, monkeypatch, bound):
    stack = gateway_stack
    monkeypatch.setenv("HEADWAY_URL", url(stack))
    monkeypatch.setenv("HEADWAY_HTTP_URL", stack.gateway.http_url)
    fork(stack, "m")

    async def main() -> None:
        agent = create_agent(
            "m",
            completion_kwargs={"max_tokens": 4, "extra_body": {"return_token_ids": True}},
            base_url=stack.gateway.http_url,
        )
        seen = []
        reports = await rl_loop(
            "m", tasks(), agent, steps=3, group=2, learning_rate=1e-3,
            max_steps_off_policy=bound, eval_every=2, eval_taskset=tasks(), eval_group=2,
            on_step=seen.append,
        )  # fmt: skip
        await agent.close()
        assert seen == reports and [r.result.step for r in reports] == [1, 2, 3]
        for report in reports:
            assert len(report.runs) == 4 and report.dropped == 0
            assert all(r.reward == parity(r) for r in report.runs)
            # Within the bound: a synchronous step trains on its own head's runs only.
            assert set(report.staleness) <= set(range(bound + 1))
            assert sum(report.staleness.values()) == 4
        assert [r.evaluation is not None for r in reports] == [False, True, False]
        async with ModelClient(url=url(stack)) as models:
            tree = {c.id: c for c in await models.checkpoints("m")}
        second = reports[1].result.checkpoint
        assert tree[second].evals == pytest.approx(reports[1].evaluation.metrics)

    asyncio.run(main())


def test_bad_loop_settings_are_refused():
    async def main() -> None:
        agent = create_agent("m")
        for kw, words in [
            ({"max_steps_off_policy": -1}, "max_steps_off_policy is -1"),
            ({"off_policy": "ignore"}, "off_policy 'ignore'"),
            ({"decay": 0.0}, "decay is 0.0"),
            ({"eval_every": 2}, "eval_every needs an eval_taskset"),
            ({"steps": 0}, "steps and group must be >= 1"),
        ]:
            args = {"steps": 1, "group": 2, "learning_rate": 1e-3, **kw}
            with pytest.raises(InvalidArgument, match=words):
                await rl_loop("m", tasks(), agent, **args)

    asyncio.run(main())
