"""The blocking twins cannot drift from the async clients: every public coroutine method
has a blocking twin with the same signature (and the constructors match), and the twins
run the async code on the SDK's own loop thread. No server needed."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from headway import (
    InvalidArgument,
    SamplingClient,
    SyncSamplingClient,
    SyncTraceClient,
    SyncTrainingClient,
    TraceClient,
    TrainingClient,
)
from headway.client.blocking import LoopThread, SyncBoundClient, public_coroutines

TWINS = [
    (TrainingClient, SyncTrainingClient),
    (SamplingClient, SyncSamplingClient),
    (TraceClient, SyncTraceClient),
]


def twin_mismatches(async_cls: type, sync_cls: type) -> list[str]:
    """How `sync_cls` differs from a blocking twin of `async_cls` (empty: it is one)."""
    problems = []
    if inspect.signature(sync_cls) != inspect.signature(async_cls):
        problems.append("constructor signature differs")
    for name, coroutine in public_coroutines(async_cls).items():
        twin = getattr(sync_cls, name, None)
        if twin is None:
            problems.append(f"{name}: no blocking twin")
        elif inspect.iscoroutinefunction(twin):
            problems.append(f"{name}: the twin is a coroutine")
        elif inspect.signature(twin) != inspect.signature(coroutine):
            problems.append(f"{name}: signature differs")
    return problems


@pytest.mark.parametrize("async_cls, sync_cls", TWINS, ids=lambda c: c.__name__)
def test_every_async_method_has_a_blocking_twin_with_its_signature(async_cls, sync_cls):
    assert public_coroutines(async_cls)  # the check below is not vacuous
    assert twin_mismatches(async_cls, sync_cls) == []
    for name, coroutine in public_coroutines(async_cls).items():
        assert getattr(sync_cls, name).__doc__ == coroutine.__doc__, name
    client = async_cls() if async_cls is TraceClient else async_cls("m")
    assert type(client.sync()) is sync_cls


def test_the_parity_check_catches_a_missing_or_a_drifted_twin():
    class Bare(SyncBoundClient):  # hand-written, without @blocking_twin
        def __init__(self, model: str) -> None: ...

    assert "forward_backward: no blocking twin" in twin_mismatches(TrainingClient, Bare)
    assert "constructor signature differs" in twin_mismatches(TrainingClient, Bare)

    class Drifted(SyncTrainingClient):
        def step(self, batch, learning_rate, **kwargs):  # the old hand-written shape
            return super().step(batch, learning_rate, **kwargs)

    assert twin_mismatches(TrainingClient, Drifted) == ["step: signature differs"]


def test_a_twin_raises_what_the_async_method_raises():
    client = SyncTrainingClient("m", url="127.0.0.1:1", max_retries=0)
    with pytest.raises(InvalidArgument, match="batch is empty"):
        client.forward_backward([])  # refused before any call, on the loop thread
    with pytest.raises(InvalidArgument, match="model is empty"):
        SyncTrainingClient("")
    client.close()


def test_a_twin_called_from_its_own_loop_says_to_use_the_async_client():
    client = SyncTraceClient(url="127.0.0.1:1")

    async def inside() -> None:
        client.get_trace("tr-x")

    future = asyncio.run_coroutine_threadsafe(inside(), LoopThread.shared().loop)
    with pytest.raises(RuntimeError, match="use the async client"):
        future.result()
