"""Rollouts with the SDK against the real stack: agents, traces, jobs and tasksets, and
training on what they record (inline runs and trace ids, mixed)."""

from __future__ import annotations

import asyncio

import pytest

from headway import InvalidArgument, Run, TraceClient, TrainingClient
from headway.agents import create_agent
from headway.eval import Job, Task, Taskset
from tests.helpers_sdk import fork, url


def test_trace_ids_mix_with_inline_runs(gateway_stack):
    stack = gateway_stack
    fork(stack, "m")

    async def main() -> None:
        agent = create_agent(
            "m",
            completion_kwargs={"max_tokens": 6, "extra_body": {"return_token_ids": True}},
            base_url=stack.gateway.http_url,
        )
        runs = await asyncio.gather(*(agent.run("what is 3 plus 4?") for _ in range(4)))
        traces = TraceClient(url=url(stack))
        for run, reward in zip(runs, [1.0, 0.0, 0.0, 1.0], strict=True):
            run.reward = reward
            await traces.set_reward(run.trace_id, reward)
            stored = await traces.get_trace(run.trace_id)
            assert stored.reward == reward and stored.turns == run.turns
        trainer = TrainingClient("m", url=url(stack))
        inline = await trainer.forward_backward(runs, group_size=4)
        mixed_batch = [runs[0].trace_id, runs[1], runs[2].trace_id, runs[3]]
        mixed = await trainer.forward_backward(mixed_batch, group_size=4)
        assert mixed.num_datums == inline.num_datums == 4
        assert mixed.num_tokens == inline.num_tokens
        for key in ("loss:sum", "reward/mean", "ratio/mean"):
            assert mixed.metrics[key] == pytest.approx(inline.metrics[key], abs=1e-6), key
        # A trace's reward lives on the server: the client cannot scale it.
        with pytest.raises(InvalidArgument, match="cannot be scaled"):
            await trainer.forward_backward(mixed_batch, group_size=4, reward_scale=2.0)
        await agent.close()

    asyncio.run(main())


@pytest.mark.slow
def test_the_seed_training_loop(gateway_stack):
    stack = gateway_stack
    fork(stack, "arith-rl")

    def reward(run: Run) -> float:
        # Anything with spread: the parity of the completion's token ids.
        return float(sum(run.turns[-1].completion_tokens) % 2)

    async def main() -> None:
        agent = create_agent(
            "arith-rl",
            completion_kwargs={"max_tokens": 6, "extra_body": {"return_token_ids": True}},
            base_url=stack.gateway.http_url,
        )
        trainer = TrainingClient("arith-rl", url=url(stack))
        tasks = [Task("what is 3 plus 4?", reward), Task("what is 10 plus 2?", reward)]
        taskset, runtime = Taskset(tasks), None
        session = await Job.start("arith-rl", group=4, url=url(stack))
        traces = TraceClient(url=url(stack))
        served = [(await trainer.head()).id]
        for _step in range(2):
            start = len(session.runs)
            await taskset.run(agent, runtime=runtime, job=session)
            batch = session.runs[start:]
            assert len(batch) == 8
            assert [r.task for r in batch] == [tasks[0]] * 4 + [tasks[1]] * 4
            assert {t.checkpoint for r in batch for t in r.turns} == {served[-1]}
            for run in batch:
                assert run.reward == reward(run)
                assert (await traces.get_trace(run.trace_id)).reward == run.reward
            result = await trainer.step(batch, learning_rate=1e-4, group_size=4)
            print(f"optim {result.step} → {result.sampler_path}")
            assert result.step == _step + 1
            served.append(result.checkpoint)
        assert [c.id for c in await trainer.checkpoints()] == served
        await agent.close()

    asyncio.run(main())


def test_a_multi_turn_run_is_one_trace(gateway_stack):
    stack = gateway_stack
    fork(stack, "m")

    async def main() -> None:
        agent = create_agent(
            "m",
            completion_kwargs={"max_tokens": 4, "extra_body": {"return_token_ids": True}},
            base_url=stack.gateway.http_url,
            system_prompt="you add numbers",
        )

        async def tool(reply: str) -> str:
            return "and 2 plus 2?"

        run = await agent.run("what is 1 plus 2?", max_turns=2, tool=tool)
        assert [m["role"] for m in run.messages] == [
            "system",
            "user",
            "assistant",
            "user",
            "assistant",
        ]
        assert len(run.turns) == 2 and run.text == run.messages[-1]["content"]
        first, second = run.turns
        assert len(second.prompt_tokens) > len(first.prompt_tokens) + len(first.completion_tokens)
        # Token-exact: the second prompt extends the first turn's tokens as sampled.
        so_far = first.prompt_tokens + first.completion_tokens
        if "rerendered_turns" not in run.info:
            assert second.prompt_tokens[: len(so_far)] == so_far
        stored = await TraceClient(url=url(stack)).get_trace(run.trace_id)
        assert stored.turns == run.turns
        run.reward = 1.0
        await TraceClient(url=url(stack)).set_reward(run.trace_id, 1.0)
        trainer = TrainingClient("m", url=url(stack))
        by_id = await trainer.forward_backward([run.trace_id])
        inline = await trainer.forward_backward([run])
        expected = len(first.completion_tokens) + len(second.completion_tokens)
        assert by_id.num_tokens == inline.num_tokens == expected
        await agent.close()

    asyncio.run(main())


@pytest.mark.slow
def test_a_taskset_bigger_than_the_samplers_queue_runs_within_its_concurrency(tmp_path, tiny_base):
    """A sampler queues a bounded number of requests and refuses the rest; Taskset.run
    keeps at most max_concurrency episodes in flight, so a big taskset still completes."""
    from headway.errors import Overloaded
    from tests.stack import GatewayNode, SamplerReplica, TrainerStack

    trainer = TrainerStack(tmp_path / "store")
    trainer.add_base(tiny_base, "tiny")
    store, prefix = trainer.config.store, trainer.prefix
    # One row; two may wait (a request arriving just as another finishes can find the
    # finished one's successor not yet moved into the row).
    replica = SamplerReplica(store, prefix, max_seq_len=256, max_batch=1, max_queue=2)
    node = GatewayNode(store, prefix, trainer.server.address)
    try:

        async def play(concurrency: int) -> list[Run]:
            agent = create_agent(
                "tiny",
                completion_kwargs={"max_tokens": 8, "extra_body": {"ignore_eos": True}},
                base_url=node.http_url,
                max_retries=0,  # a refusal shows, instead of being retried after a pause
            )
            tasks = Taskset(Task(f"what is {i} plus 1?", lambda run: 1.0) for i in range(6))
            try:
                return await tasks.run(agent, group=4, max_concurrency=concurrency)
            finally:
                await agent.close()

        runs = asyncio.run(play(2))  # at most two in flight: never refused
        assert len(runs) == 24 and all(run.text for run in runs)
        with pytest.raises(Overloaded, match="requests waiting"):
            asyncio.run(play(24))  # all at once: the queue overflows (HTTP 429, no retries)
    finally:
        node.stop()
        replica.stop()
        trainer.stop()


def test_rollouts_that_fail_alone_and_the_step_that_drops_their_groups(gateway_stack):
    """A reward function that raises and a tool that raises become errored runs in their
    places (the others are scored), a hanging tool is cut by rollout_timeout, a flaky
    reward is retried; past max_errors the run raises RolloutsFailed and the job is left
    as it was; the default (0) propagates the failure itself. The step drops errored runs
    group by group, or keeps the survivors as a smaller group, and says so in its metrics."""
    from headway.eval import RolloutsFailed

    stack = gateway_stack
    fork(stack, "m")

    async def main() -> None:
        agent = create_agent(
            "m",
            completion_kwargs={"max_tokens": 4, "extra_body": {"return_token_ids": True}},
            base_url=stack.gateway.http_url,
        )
        calls = {"bad": 0, "flaky": 0}

        def bad_reward(run: Run) -> float:  # the 2nd and 4th runs of the task fail
            calls["bad"] += 1
            if calls["bad"] in (2, 4):
                raise ValueError("reward server said no")
            return 1.0

        def flaky_reward(run: Run) -> float:  # fails once, then works: a retry fixes it
            calls["flaky"] += 1
            if calls["flaky"] == 1:
                raise ConnectionError("blip")
            return float(len(run.text) % 2)

        async def broken_tool(reply: str) -> str:
            raise RuntimeError("the sandbox crashed")

        tasks = Taskset(
            [
                Task("what is 1 plus 1?", lambda run: float(len(run.text) % 3), name="ok"),
                Task("what is 2 plus 2?", bad_reward, name="bad"),
                Task("what is 3 plus 3?", flaky_reward, name="flaky"),
            ]
        )
        job = await Job.start("m", group=4, url=url(stack))
        runs = await tasks.run(agent, job=job, max_errors=0.25, retries=0)  # 3 of 12
        assert len(runs) == 12 and job.runs == runs
        assert [r.task.name for r in runs] == ["ok"] * 4 + ["bad"] * 4 + ["flaky"] * 4
        errored = [i for i, r in enumerate(runs) if r.errored]
        assert len(errored) == 3  # two of "bad", the first "flaky" call
        assert sum(r.error == "ValueError: reward server said no" for r in runs) == 2
        assert sum(r.error == "ConnectionError: blip" for r in runs) == 1
        assert all(r.reward is None for r in runs if r.errored)
        assert all(r.reward is not None for r in runs if not r.errored)

        # Retried: the flaky reward's first failure is played again and succeeds.
        calls.update(bad=10, flaky=0)
        side = await Job.start("m", url=url(stack))  # where the other runs' rewards go
        retried = await Taskset([tasks.tasks[2]]).run(agent, job=side, group=2, retries=1)
        assert not any(r.errored for r in retried)
        assert sorted(r.info.get("attempts", 1) for r in retried) == [1, 2]

        # A tool that hangs: cut by the timeout (whatever the machine's speed, it never
        # answers), an errored run; and one that raises.
        never = asyncio.Event()

        async def hanging_tool(reply: str) -> str:
            await never.wait()
            return "unreachable"

        hung = Task("what is 4 plus 4?", lambda run: 1.0, max_turns=2, tool=hanging_tool)
        crashed = Task("what is 5 plus 5?", lambda run: 1.0, max_turns=2, tool=broken_tool)
        out = await Taskset([hung, crashed]).run(
            agent, job=side, rollout_timeout=0.5, max_errors=1.0
        )
        assert out[0].error.startswith("TimeoutError") and "rollout_timeout=0.5" in out[0].error
        assert out[1].error == "RuntimeError: the sandbox crashed"

        # Over the budget: RolloutsFailed naming the count, the job unchanged.
        before = list(job.runs)
        calls.update(bad=0, flaky=10)
        with pytest.raises(RolloutsFailed, match=r"rollouts failed, over max_errors=1") as err:
            await tasks.run(agent, job=job, max_errors=1)
        assert len(err.value.runs) >= 2 and isinstance(err.value.__cause__, ValueError)
        assert job.runs == before
        # The default: the first failure itself.
        calls.update(bad=0)
        with pytest.raises(ValueError, match="reward server said no"):
            await Taskset([tasks.tasks[1]]).run(agent, job=side, group=4)

        # Training: groups that lost runs are dropped whole, or kept smaller.
        trainer = TrainingClient("m", url=url(stack))
        dropped = await trainer.forward_backward(runs, group_size=4)
        assert dropped.num_datums == 4  # only "ok" kept all four
        assert dropped.metrics["runs/errored"] == 3 and dropped.metrics["groups/dropped"] == 2
        kept = await trainer.step(runs, learning_rate=1e-4, group_size=4, partial_groups="keep")
        assert kept.num_datums == 9 and kept.metrics["groups/partial"] == 2
        assert kept.metrics["groups/dropped"] == 0
        with pytest.raises(InvalidArgument, match="partial_groups"):
            await trainer.forward_backward(runs, group_size=4, partial_groups="some")
        with pytest.raises(InvalidArgument, match="nothing to train on"):
            await trainer.forward_backward(runs[4:8], group_size=4)
        with pytest.raises(InvalidArgument, match="max_errors"):
            await tasks.run(agent, job=side, max_errors=-1)
        await agent.close()
        await job.close()
        await side.close()

    asyncio.run(main())


def test_later_turns_extend_the_sampled_tokens_where_re_rendering_would_not(gateway_stack):
    """A multi-turn episode's later prompts are the tokens sampled so far plus the rendered
    rest: re-rendering the conversation would re-tokenize the model's replies (a byte-level
    BPE's sampled tokens are often not how it tokenizes their text), and the trainer would
    train on tokens never sampled. A client that edits a reply gets the conversation
    rendered anew, and is told so."""
    import openai

    from headway.modeling.tokenizer import Tokenizer

    stack = gateway_stack
    fork(stack, "m")
    tok = Tokenizer.from_dir(stack.gateway.gateway.store.get_model("tiny").path)

    async def main() -> None:
        agent = create_agent(
            "m",
            completion_kwargs={"max_tokens": 6, "temperature": 1.0,
                               "extra_body": {"return_token_ids": True, "ignore_eos": True}},
            base_url=stack.gateway.http_url,
        )  # fmt: skip

        def tool(reply: str) -> str:
            return "and 2 plus 2?"

        runs = await asyncio.gather(
            *(agent.run("what is 1 plus 2?", max_turns=3, tool=tool) for _ in range(6))
        )
        differs = 0
        for run in runs:
            assert "rerendered_turns" not in run.info and len(run.turns) == 3
            for earlier, later, upto in ((0, 1, 3), (1, 2, 5)):
                a, b = run.turns[earlier], run.turns[later]
                so_far = a.prompt_tokens + a.completion_tokens
                assert b.prompt_tokens[: len(so_far)] == so_far  # exactly as sampled
                rendered = tok.apply_chat_template(run.messages[:upto])  # what re-rendering gives
                differs += rendered[: len(so_far)] != so_far
            stored = await TraceClient(url=url(stack)).get_trace(run.trace_id)
            assert stored.turns == run.turns
        assert differs  # some reply re-tokenizes differently: the case this guards
        await agent.close()

        # An edited reply cannot be continued token for token: rendered anew, and said so.
        client = openai.AsyncOpenAI(base_url=stack.gateway.http_url, api_key="local")
        ask = [{"role": "user", "content": "what is 1 plus 2?"}]
        first = await client.chat.completions.create(
            model="m", messages=ask, max_tokens=4, extra_body={"return_token_ids": True}
        )
        edited = [*ask, {"role": "assistant", "content": "something else entirely"},
                  {"role": "user", "content": "and 2 plus 2?"}]  # fmt: skip
        second = await client.chat.completions.create(
            model="m", messages=edited, max_tokens=4,
            extra_body={"return_token_ids": True, "trace_id": first.trace_id},
        )  # fmt: skip
        assert second.prompt_continued is False and "edited" in second.prompt_rerendered_because
        assert second.prompt_token_ids == tok.apply_chat_template(edited)
        again = await client.chat.completions.create(
            model="m", messages=ask, max_tokens=4, extra_body={"return_token_ids": True}
        )
        kept = [*ask, {"role": "assistant", "content": again.choices[0].message.content},
                {"role": "user", "content": "and 2 plus 2?"}]  # fmt: skip
        third = await client.chat.completions.create(
            model="m", messages=kept, max_tokens=4,
            extra_body={"return_token_ids": True, "trace_id": again.trace_id},
        )  # fmt: skip
        assert third.prompt_continued is True
        await client.close()

    asyncio.run(main())
