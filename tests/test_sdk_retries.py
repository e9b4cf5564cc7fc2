"""The SDK waits out a service that is down for a while, as when `headway serve` restarts it.

Retries are bounded by time, not by a small count: a trainer (or a sampler) that takes
longer to come back than a handful of quick retries must not break a training loop. The
tests make the outage last "more attempts than the old count allowed" by counting the
client's attempts (an interceptor, a log handler) and only then starting the service, so
they depend on no timing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import grpc
import pytest

from headway import TraceClient, TrainingClient, Unavailable
from headway.agents import create_agent
from tests.stack import GatewayNode, SamplerReplica, TrainerStack, free_port, wait_until

HANG_SECONDS = 300  # only catches hangs: every wait below ends on a condition
OLD_ATTEMPTS = 6  # what the SDK used to make: one call and 5 retries (the openai client: 3)


class Attempts(grpc.aio.UnaryUnaryClientInterceptor):
    """Counts the client's attempts; sets `reached` once there have been `n` of them."""

    def __init__(self, n: int) -> None:
        self.n, self.count, self.reached = n, 0, threading.Event()

    async def intercept_unary_unary(self, continuation, details, request):
        self.count += 1
        if self.count >= self.n:
            self.reached.set()
        return await continuation(details, request)


@pytest.mark.slow
def test_a_training_call_waits_for_a_trainer_that_is_down(tmp_path: Path, tiny_base: Path):
    """The trainer is down for more attempts than the old retry count allowed, then comes
    back on the same address: the call succeeds, retried until then."""
    address = f"127.0.0.1:{free_port()}"
    first = TrainerStack(tmp_path / "store", address=address)
    first.add_base(tiny_base, "tiny")
    first.stop()  # down: nothing listens on `address` any more

    attempts = Attempts(OLD_ATTEMPTS + 2)
    restarted: list[TrainerStack] = []

    def restart_when_enough_attempts_failed() -> None:
        if attempts.reached.wait(HANG_SECONDS):
            restarted.append(TrainerStack(tmp_path / "store", address=address))

    helper = threading.Thread(target=restart_when_enough_attempts_failed, daemon=True)
    helper.start()
    client = TrainingClient(
        "tiny", url=address, retry_backoff=0.01, retry_timeout=HANG_SECONDS,
        interceptors=[attempts],
    )  # fmt: skip
    try:
        head = asyncio.run(client.head())
        assert head.step == 0 and head.is_head
        assert attempts.count > OLD_ATTEMPTS
    finally:
        attempts.reached.set()  # the helper ends whatever happened
        helper.join(HANG_SECONDS)
        for stack in restarted:
            stack.stop()


def test_a_retry_budget_of_zero_seconds_makes_one_attempt() -> None:
    attempts = Attempts(1)
    client = TraceClient(url=f"127.0.0.1:{free_port()}", retry_timeout=0, interceptors=[attempts])
    with pytest.raises(Unavailable):
        asyncio.run(client.get_trace("t"))
    assert attempts.count == 1


class RetryLog(logging.Handler):
    """Counts the agent's "retrying" log records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.retries += 1


def test_an_agent_waits_for_a_sampler_to_come_back(tmp_path: Path, tiny_base: Path) -> None:
    """No sampler replica is up (one is restarting): the gateway answers 503, and the
    agent retries the turn until a replica serves it, recording it once."""
    trainer = TrainerStack(tmp_path / "store")
    trainer.add_base(tiny_base, "tiny")
    node = GatewayNode(trainer.config.store, trainer.prefix, trainer.server.address)
    replicas: list[SamplerReplica] = []
    logger = logging.getLogger("headway.agents")
    retry_log, level = RetryLog(), logger.level
    logger.addHandler(retry_log)
    logger.setLevel(logging.INFO)
    agent = create_agent(
        "tiny",
        completion_kwargs={"max_tokens": 4, "extra_body": {"return_token_ids": True}},
        base_url=node.http_url,
        max_retries=0,  # the openai client's own retries off: each attempt is one request
        retry_timeout=HANG_SECONDS,
        retry_backoff=0.01,  # many attempts soon: the test counts them
    )

    async def main() -> None:
        episode = asyncio.ensure_future(agent.run("what is 1 plus 1?"))
        # Waited in a thread: the episode keeps running on this loop meanwhile.
        await asyncio.to_thread(
            wait_until,
            lambda: retry_log.retries >= OLD_ATTEMPTS or episode.done(),
            what="the agent to retry or fail",
            timeout=HANG_SECONDS,
        )
        assert not episode.done(), f"the agent gave up: {episode.exception()!r}"
        replicas.append(
            await asyncio.to_thread(
                SamplerReplica, trainer.config.store, trainer.prefix, max_seq_len=256
            )
        )
        run = await asyncio.wait_for(episode, HANG_SECONDS)
        assert run.turns and run.turns[0].completion_tokens
        # The 503s recorded nothing: the trace holds the one turn that was served.
        traces = TraceClient(url=node.server.address)
        assert len((await traces.get_trace(run.trace_id)).turns) == 1
        await traces.close()
        await agent.close()

    try:
        asyncio.run(main())
    finally:
        logger.removeHandler(retry_log)
        logger.setLevel(level)
        node.stop()
        for replica in replicas:
            replica.stop()
        trainer.stop()
