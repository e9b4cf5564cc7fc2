"""The SDK's errors against the real stack: a failed call raises the HeadwayError of its
status with the server's message, over gRPC and over HTTP alike; a bad batch is refused
before any call is made."""

from __future__ import annotations

import asyncio

import pytest

from headway import (
    HeadwayError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SamplingClient,
    TraceClient,
    TrainingClient,
)
from headway.agents import create_agent
from headway.eval import Job
from tests.helpers_sdk import PROMPT, Recorder, fork, sampled_runs, url


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
