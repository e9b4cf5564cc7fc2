"""The Python SDK against the real stack: trainer, sampler and gateway (gRPC + HTTP), Redis.

Clients point at the gateway's gRPC address (`stack.gateway.server.address`), agents at
its OpenAI-compatible URL (`stack.gateway.http_url`). Models are forked with the raw stubs:
the SDK has no fork call of its own (that is the model CLI's job).
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys

import grpc
import pytest
import torch

from headway import (
    FailedPrecondition,
    HeadwayError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Run,
    SamplingClient,
    SyncTrainingClient,
    TraceClient,
    TrainingClient,
    Turn,
    Unavailable,
)
from headway.agents import create_agent
from headway.client import merge_metrics, split_substeps, training_items
from headway.eval import Job, Task, Taskset
from headway.train import DatumTensors
from headway.v1 import common_pb2, model_pb2
from tests.helpers_training import checkpoint_tensors
from tests.stack import free_port
from trainer_svc.datums import group_advantages

PROMPT = [5, 17, 33, 8, 41, 12]
# AdamW's first step moves each weight by about lr * sign(gradient) with the default eps,
# which would hide a gradient of the wrong size; an eps well above the gradients makes the
# update lr * g / (|g| + eps), proportional to the gradient, so weights compare gradients.
ADAM = {"learning_rate": 0.1, "eps": 1.0}


# ----------------------------------------------------------------------------- helpers


def fork(stack, name: str, source: str = "tiny") -> None:
    """Fork through the gateway. From "tiny": a fresh rank-4 adapter; from a LoRA model:
    that model's adapter at its head (same weights, fresh optimizer state)."""
    request = model_pb2.ForkModelRequest(source=source, name=name)
    if source == "tiny":
        request.lora.CopyFrom(common_pb2.LoraConfig(rank=4, alpha=8))
    stack.gateway.models.ForkModel(request)


def url(stack) -> str:
    return stack.gateway.server.address


async def sampled_runs(stack, model: str, rewards: list[float], seed: int = 0) -> list[Run]:
    """One group of runs of PROMPT sampled from `model`, scored with `rewards`."""
    sampler = SamplingClient(model, url=url(stack))
    result = await sampler.sample(
        PROMPT, n=len(rewards), max_tokens=8, seed=seed, stop_token_ids=[], ignore_eos=True
    )
    await sampler.close()
    return [
        Run(
            turns=[Turn(result.prompt_tokens, s.tokens, s.logprobs, result.checkpoint)],
            reward=r,
        )
        for s, r in zip(result.sequences, rewards, strict=True)
    ]


def weights_of(stack, sampler_path: str) -> dict[str, torch.Tensor]:
    return checkpoint_tensors(stack.trainer.store.root, sampler_path)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b) and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


class Recorder(grpc.aio.UnaryUnaryClientInterceptor):
    """Records the request id of every attempt of `method`; optionally loses the first
    reply after the server applied the call (as a dropped connection would)."""

    def __init__(self, method: str, lose_first_reply: bool = False) -> None:
        self.method, self.lose_first_reply = method, lose_first_reply
        self.request_ids: list[str] = []
        self.calls = 0

    async def intercept_unary_unary(self, continuation, details, request):
        self.calls += 1
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        call = await continuation(details, request)
        if not method.endswith("/" + self.method):
            return call
        self.request_ids.append(request.request_id)
        reply = await call
        if self.lose_first_reply and len(self.request_ids) == 1:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="reply lost (injected)",
            )
        return reply


# ------------------------------------------------------------------ without a server


def test_the_sdk_imports_no_torch_and_no_service_code():
    code = (
        "import sys, headway, headway.client, headway.agents, headway.eval, headway.train\n"
        "from headway import TrainingClient, SamplingClient, Run, DatumTensors\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.split('.')[0] in "
        "('trainer_svc', 'sampler_svc', 'gateway', 'openai')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_group_advantages_by_hand():
    # Group 1: mean 0.5 → ±0.5. Group 2: all equal → no signal, zeros.
    adv, no_signal = group_advantages([1, 0, 0, 1, 2, 2, 2, 2], 4, normalize_std=False)
    assert adv == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0] and no_signal == 1
    # mean 1.5, population std sqrt(1.25): (r - 1.5) / (1.1180... + 1e-6)
    adv, no_signal = group_advantages([0, 1, 2, 3], 4, normalize_std=True)
    std = math.sqrt(1.25) + 1e-6
    assert adv == pytest.approx([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std], abs=1e-12)
    assert no_signal == 0
    # No grouping: the advantage is the reward itself.
    assert group_advantages([3.0, -1.0], 0, normalize_std=True) == ([3.0, -1.0], 0)


def test_batch_validation_and_substeps_without_a_server():
    run = Run(turns=[Turn([1, 2], [3], [-0.5])], reward=1.0)
    with pytest.raises(InvalidArgument, match="multiple of group_size"):
        training_items([run] * 3, group_size=2)
    with pytest.raises(InvalidArgument, match="empty"):
        training_items([], group_size=0)
    with pytest.raises(InvalidArgument, match="not a single item"):
        training_items("tr-abc", group_size=0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"batch\[1\].*no reward"):
        training_items([run, Run(turns=run.turns)], group_size=0)
    with pytest.raises(InvalidArgument, match=r"batch\[0\].*return_token_ids"):
        training_items([Run(reward=1.0)], group_size=0)
    with pytest.raises(InvalidArgument, match="cannot be scaled"):
        training_items([run, "tr-abc"], group_size=0, reward_scale=2.0)
    items = training_items([run, "tr-abc"], group_size=2, reward_scale=1.0)
    assert items[0].trajectory.reward == 1.0 and items[1].trace_id == "tr-abc"
    assert training_items([run], group_size=0, reward_scale=0.5)[0].trajectory.reward == 0.5

    # Substeps split at group boundaries, sizes within one group of each other.
    six = list(range(12))
    assert [len(p) for p in split_substeps(six, 4, 2)] == [8, 4]  # type: ignore[arg-type]
    assert [len(p) for p in split_substeps(six, 2, 4)] == [4, 4, 2, 2]  # type: ignore[arg-type]
    assert [len(p) for p in split_substeps(six, 0, 5)] == [3, 3, 2, 2, 2]  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="only 3 groups"):
        split_substeps(six, 4, 4)  # type: ignore[arg-type]

    merged = merge_metrics(
        [
            (
                {"loss:sum": 1.0, "groups/no_signal": 1, "ratio/mean": 1.0, "reward/mean": 0.0},
                10,
                4,
            ),
            (
                {"loss:sum": 2.0, "groups/no_signal": 0, "ratio/mean": 2.0, "reward/mean": 1.0},
                30,
                4,
            ),
        ]
    )
    assert merged == {
        "loss:sum": 3.0,
        "groups/no_signal": 1,
        "ratio/mean": pytest.approx(1.75),  # token-weighted
        "reward/mean": pytest.approx(0.5),  # run-weighted
    }


# ------------------------------------------------------------------------ the stack


def test_forward_backward_optim_step_step_and_the_tree(gateway_stack):
    stack = gateway_stack
    fork(stack, "m")

    async def main() -> None:
        trainer = TrainingClient("m", url=url(stack))
        losses = await trainer.available_losses()
        assert {x.name for x in losses} == {
            "cross_entropy",
            "importance_sampling",
            "ppo",
            "cispo",
            "dro",
        }
        assert {k.name for k in next(x for x in losses if x.name == "ppo").config} >= {
            "clip_low_threshold",
            "clip_high_threshold",
        }
        root = await trainer.head()
        assert root.step == 0 and root.is_head

        runs = await sampled_runs(stack, "m", [1.0, 0.0, 0.0, 1.0])
        fb = await trainer.forward_backward(runs, loss_fn="ppo", group_size=4)
        assert fb.num_datums == 4 and fb.num_tokens == 4 * 8
        assert fb.metrics["reward/mean"] == pytest.approx(0.5)
        assert fb.metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-3)  # sampled by m itself
        assert len(fb.logprobs) == 4
        opt = await trainer.optim_step(learning_rate=1e-3)
        assert opt.step == 1 and opt.sampler_path and opt.checkpoint_info.stats.loss_fn == "ppo"

        runs = await sampled_runs(stack, "m", [0.0, 1.0, 1.0, 0.5], seed=1)
        assert runs[0].turns[0].checkpoint == opt.checkpoint  # the new head serves
        result = await trainer.step(runs, learning_rate=1e-3, group_size=2, normalize_std=True)
        assert result.step == 2 and result.num_datums == 4 and "loss:sum" in result.metrics
        tree = await trainer.checkpoints()
        assert [c.step for c in tree] == [0, 1, 2] and tree[-1].is_head
        assert tree[-1].id == result.checkpoint and tree[-1].parent_id == opt.checkpoint

        back = await trainer.set_head(opt.checkpoint)
        assert back.id == opt.checkpoint and (await trainer.head()).id == opt.checkpoint
        sampler = SamplingClient("m", url=url(stack))
        pinned = await sampler.sample("what is 1 plus", max_tokens=3, checkpoint=result.checkpoint)
        assert pinned.checkpoint == result.checkpoint
        seq = pinned.sequences[0]
        assert len(seq.tokens) == len(seq.logprobs) >= 1 and seq.stop_reason in ("stop", "length")
        with pytest.raises(FailedPrecondition, match="no gradient"):
            await trainer.optim_step(learning_rate=1e-3)
        await trainer.close()

    asyncio.run(main())

    # The blocking twin: same methods, no event loop of the caller's.
    sync = TrainingClient("m", url=url(stack)).sync()
    assert isinstance(sync, SyncTrainingClient)
    assert [c.step for c in sync.checkpoints()] == [0, 1, 2] and sync.head().step == 1
    reply = SamplingClient("m", url=url(stack)).sync().sample(PROMPT, n=2, max_tokens=2, seed=3)
    assert len(reply.sequences) == 2


def test_custom_losses_match_the_builtin_and_the_seed_example_runs(gateway_stack):
    stack = gateway_stack
    fork(stack, "a0")

    def is_loss(data: list[DatumTensors], logprobs: list[torch.Tensor]):
        """importance_sampling written by hand: -sum(ratio * A * mask)."""
        loss = logprobs[0].new_zeros(())
        for d, lp in zip(data, logprobs, strict=True):
            ratio = torch.exp(lp - torch.tensor(d.sampling_logprobs))
            loss = loss - (ratio * torch.tensor(d.advantages) * torch.tensor(d.mask)).sum()
        return loss, {"custom/datums": len(data)}

    # The product page's example, unchanged.
    def my_loss(data: list[DatumTensors], logprobs: list[torch.Tensor]):
        loss = logprobs[0].new_zeros(())
        for datum, policy_lp in zip(data, logprobs):  # noqa: B905
            ratio = torch.exp(policy_lp - torch.tensor(datum.sampling_logprobs))
            mask = torch.tensor(datum.mask)
            loss = loss - (ratio * datum.reward * mask).sum()
        return loss, {}

    async def main() -> None:
        # One step first, so the adapter's B is non-zero and every LoRA weight trains.
        warm = await sampled_runs(stack, "a0", [1.0, 0.0, 0.5, 0.0])
        await TrainingClient("a0", url=url(stack)).step(warm, 1e-2, group_size=4)
        for name in ("builtin", "custom", "seed-builtin", "seed-custom"):
            fork(stack, name, source="a0")  # all four start from a0's weights
        batch = await sampled_runs(stack, "a0", [1, 0, 0, 1, 0.5, 1, 0, 0], seed=7)
        clients = {n: TrainingClient(n, url=url(stack)) for n in ("builtin", "custom")}

        builtin = await clients["builtin"].forward_backward(
            batch, "importance_sampling", group_size=4
        )
        custom = await clients["custom"].forward_backward_custom(batch, is_loss, group_size=4)
        assert custom.num_datums == 8 and custom.metrics["custom/datums"] == 8
        assert custom.metrics["loss:sum"] == pytest.approx(custom.loss)
        # GRPO advantages sum to zero per group and the ratio is ~1, so the loss is a near-total
        # cancellation of ~100 O(1) fp32 terms: its rounding is ~1e-6 to 1e-5 in absolute
        # terms (1e-6 failed once in CI). The gradient check below is the exact one.
        assert custom.loss == pytest.approx(builtin.metrics["loss:sum"], rel=1e-5, abs=2e-5)
        new = {n: await c.optim_step(**ADAM) for n, c in clients.items()}
        assert new["custom"].checkpoint_info.stats.loss_fn == "custom"
        builtin_w = weights_of(stack, new["builtin"].sampler_path)
        custom_w = weights_of(stack, new["custom"].sampler_path)
        start = weights_of(stack, (await TrainingClient("a0", url=url(stack)).head()).sampler_path)
        assert max_diff(builtin_w, custom_w) <= 1e-5
        assert max_diff(builtin_w, start) > 1e-3  # the step did move the weights

        # my_loss weights by the raw reward: the built-in loss without a baseline (group 0).
        seed_builtin = TrainingClient("seed-builtin", url=url(stack))
        reference = await seed_builtin.forward_backward(batch, "importance_sampling")
        trainer = TrainingClient("seed-custom", url=url(stack))
        seed = await trainer.forward_backward_custom(batch, my_loss, group_size=8)
        assert seed.loss == pytest.approx(reference.metrics["loss:sum"], rel=1e-5)
        a = await seed_builtin.optim_step(**ADAM)
        b = await trainer.optim_step(**ADAM)
        wa, wb = weights_of(stack, a.sampler_path), weights_of(stack, b.sampler_path)
        assert max_diff(wa, wb) <= 1e-5 and max_diff(wa, start) > 1e-3

    asyncio.run(main())


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


def test_grpo_groups_advantages_and_no_signal_end_to_end(gateway_stack):
    stack = gateway_stack
    fork(stack, "m")

    async def main() -> None:
        # Group 0 has no spread; group 1 has mean 0.5 (advantages ±0.5, std 0.5).
        runs = await sampled_runs(stack, "m", [1, 1, 1, 1, 0, 1, 0, 1])
        trainer = TrainingClient("m", url=url(stack))
        fb = await trainer.forward_backward(runs, group_size=4)
        assert fb.metrics["groups/no_signal"] == 1 and fb.metrics["reward/mean"] == 0.75

        seen: dict[bool, list[DatumTensors]] = {}
        for normalize in (False, True):

            def capture(data, logprobs, normalize=normalize):
                seen[normalize] = data
                return logprobs[0].new_zeros(()), {}

            await trainer.forward_backward_custom(
                runs, capture, group_size=4, normalize_std=normalize
            )
        plain = [0, 0, 0, 0, -0.5, 0.5, -0.5, 0.5]
        assert [d.advantage for d in seen[False]] == pytest.approx(plain)
        scaled = [a / (0.5 + 1e-6) for a in plain]
        assert [d.advantage for d in seen[True]] == pytest.approx(scaled, rel=1e-6)
        assert [d.group_index for d in seen[False]] == [0, 0, 0, 0, 1, 1, 1, 1]
        for d, a in zip(seen[False], plain, strict=True):
            # Per-token advantages: the run's advantage on completion tokens, 0 on the prompt.
            assert (d.advantages == a * d.mask).all() and d.mask.sum() == 8

    asyncio.run(main())


def test_substeps_give_the_same_update_as_one_call(gateway_stack):
    stack = gateway_stack
    fork(stack, "src")

    async def main() -> None:
        warm = await sampled_runs(stack, "src", [1.0, 0.0, 0.0, 1.0])
        await TrainingClient("src", url=url(stack)).step(warm, 1e-2, group_size=4)
        for name in ("whole", "split", "split-step"):
            fork(stack, name, source="src")
        batch = await sampled_runs(stack, "src", [1, 0, 0.5, 0, 1, 1, 0, 0.25], seed=3)
        whole = TrainingClient("whole", url=url(stack))
        a = await whole.forward_backward(batch, "ppo", group_size=4)
        recorder = Recorder("ForwardBackward")
        split = TrainingClient("split", url=url(stack), interceptors=[recorder])
        b = await split.forward_backward(batch, "ppo", group_size=4, num_substeps=2)
        assert len(recorder.request_ids) == 2 and len(set(recorder.request_ids)) == 2
        assert (b.num_datums, b.num_tokens) == (a.num_datums, a.num_tokens)
        for key in ("loss:sum", "ratio/mean", "reward/mean", "groups/no_signal"):
            assert b.metrics[key] == pytest.approx(a.metrics[key], abs=1e-5), key
        wa = weights_of(stack, (await whole.optim_step(**ADAM)).sampler_path)
        wb = weights_of(stack, (await split.optim_step(**ADAM)).sampler_path)
        assert max_diff(wa, wb) <= 1e-6
        src = weights_of(stack, (await TrainingClient("src", url=url(stack)).head()).sampler_path)
        assert max_diff(wa, src) > 1e-3
        # step() with substeps: ForwardBackward calls, then one Step applying them all.
        c = await TrainingClient("split-step", url=url(stack)).step(
            batch, group_size=4, loss_fn="ppo", num_substeps=2, **ADAM
        )
        assert c.step == 1 and c.num_datums == 8
        assert max_diff(wa, weights_of(stack, c.sampler_path)) <= 1e-6
        with pytest.raises(InvalidArgument, match="num_substeps is 3 but the batch has only 2"):
            await whole.forward_backward(batch, group_size=4, num_substeps=3)

    asyncio.run(main())


def test_a_retried_call_applies_once(gateway_stack):
    stack = gateway_stack
    fork(stack, "m")

    async def main() -> None:
        runs = await sampled_runs(stack, "m", [1.0, 0.0])
        # The server applies the Step, its reply is lost, the client retries: same id.
        lossy = Recorder("Step", lose_first_reply=True)
        trainer = TrainingClient("m", url=url(stack), interceptors=[lossy], retry_backoff=0.01)
        result = await trainer.step(runs, learning_rate=1e-3, group_size=2)
        assert len(lossy.request_ids) == 2 and lossy.request_ids[0] == lossy.request_ids[1]
        assert result.step == 1  # not 2: the retry was answered, not applied again
        assert [c.step for c in await trainer.checkpoints()] == [0, 1]

        # Same for a lost ForwardBackward reply: the gradient is accumulated once, so the
        # next step's summed loss is that of one batch.
        lossy = Recorder("ForwardBackward", lose_first_reply=True)
        trainer = TrainingClient("m", url=url(stack), interceptors=[lossy], retry_backoff=0.01)
        fb = await trainer.forward_backward(runs, group_size=2)
        assert len(lossy.request_ids) == 2 and lossy.request_ids[0] == lossy.request_ids[1]
        opt = await trainer.optim_step(learning_rate=1e-3)
        assert opt.checkpoint_info.stats.num_datums == 2
        assert opt.checkpoint_info.stats.loss == pytest.approx(fb.metrics["loss:sum"])

        # Nothing listening: UNAVAILABLE is retried (same id), then surfaces as Unavailable.
        recorder = Recorder("OptimStep")
        down = TrainingClient(
            "m",
            url=f"127.0.0.1:{free_port()}",
            max_retries=2,
            retry_backoff=0.01,
            interceptors=[recorder],
        )
        with pytest.raises(Unavailable):
            await down.optim_step(learning_rate=1e-3)
        assert len(recorder.request_ids) == 3 and len(set(recorder.request_ids)) == 1

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


def test_errors(gateway_stack):
    stack = gateway_stack
    fork(stack, "m")

    async def main() -> None:
        runs = await sampled_runs(stack, "m", [1.0, 0.0, 1.0])
        with pytest.raises(NotFound, match="nope") as err:
            await TrainingClient("nope", url=url(stack)).step(runs, learning_rate=1e-4)
        assert isinstance(err.value, HeadwayError) and err.value.code == "NOT_FOUND"
        with pytest.raises(NotFound):
            await SamplingClient("nope", url=url(stack)).sample(PROMPT, max_tokens=2)
        with pytest.raises(NotFound):
            await Job.start("nope", url=url(stack))
        with pytest.raises(NotFound):
            await TraceClient(url=url(stack)).get_trace("tr-" + "0" * 24)

        # A batch that does not fill its groups is refused before any call is made.
        recorder = Recorder("Step")
        trainer = TrainingClient("m", url=url(stack), interceptors=[recorder])
        with pytest.raises(InvalidArgument, match="3 runs and trace ids but group_size is 4"):
            await trainer.step(runs, learning_rate=1e-4, group_size=4)
        with pytest.raises(InvalidArgument, match="multiple of group_size"):
            await trainer.forward_backward_custom(runs, lambda d, lp: (lp[0].sum(), {}), 2)
        assert recorder.calls == 0

        # The server's own refusals keep its status and message.
        with pytest.raises(InvalidArgument, match="unknown_loss|loss"):
            await trainer.forward_backward(runs, loss_fn="unknown_loss")
        with pytest.raises(InvalidArgument, match="temperature"):
            await SamplingClient("m", url=url(stack)).sample(PROMPT, max_tokens=2, temperature=-1)
        agent = create_agent("nope", base_url=stack.gateway.http_url)
        with pytest.raises(NotFound, match="nope"):
            await agent.run("hi")
        await agent.close()

        # Over a limit is the same error over gRPC and over HTTP (HTTP 400 for both
        # ResourceExhausted and InvalidArgument; the error body names the status).
        long_prompt = "what is 1 plus 2? " * 200
        with pytest.raises(ResourceExhausted, match="context"):
            await SamplingClient("m", url=url(stack)).sample(long_prompt, max_tokens=2)
        agent = create_agent("m", base_url=stack.gateway.http_url)
        with pytest.raises(ResourceExhausted, match="context"):
            await agent.run(long_prompt)
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
