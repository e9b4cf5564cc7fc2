"""Blocking twins of the async clients, generated from them so that they cannot drift.

`@blocking_twin(TrainingClient)` on a `SyncClient` subclass gives it the async class's
constructor and one plain method per public coroutine method, each with the coroutine's
signature and docstring, running the coroutine on one private event loop in a daemon
thread (`LoopThread`). `tests/test_sdk_sync.py` checks the parity.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
S = TypeVar("S", bound="SyncClient")


class LoopThread:
    """One event loop in a daemon thread that runs the blocking clients' coroutines.

    A private loop (rather than `asyncio.run` per call) keeps the grpc.aio channel alive
    between calls and works even when the caller is itself inside a running loop.
    """

    _lock = threading.Lock()
    _shared: LoopThread | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="headway-sdk", daemon=True
        )
        self.thread.start()

    @classmethod
    def shared(cls) -> LoopThread:
        """The process's one loop thread (started on first use)."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for its result (or exception)."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(
                "a blocking Headway client was called from inside its own event loop; use "
                "the async client there"
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


class SyncClient:
    """The base of the blocking twins: holds the async client and the loop thread."""

    _client: Any
    _runner: LoopThread

    def _attach(self, client: Any) -> None:
        self._client = client
        self._runner = LoopThread.shared()

    @property
    def aio(self) -> Any:
        """The async client underneath (bound to the blocking client's private loop)."""
        return self._client

    @property
    def url(self) -> str:
        """The gateway address the client talks to."""
        return self._client.url

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]  # the twin of the async close()


class SyncBoundClient(SyncClient):
    """The base of the blocking twins of model-bound clients."""

    @property
    def model(self) -> str:
        """The slug of the model the client is bound to."""
        return self._client.model


def public_coroutines(cls: type) -> dict[str, Callable[..., Any]]:
    """The public coroutine methods of `cls` (inherited ones included), by name."""
    return {
        name: fn
        for name in dir(cls)
        if not name.startswith("_")
        and inspect.iscoroutinefunction(fn := inspect.getattr_static(cls, name))
    }


def blocking_twin(async_cls: type) -> Callable[[type[S]], type[S]]:
    """Class decorator: give a `SyncClient` subclass `async_cls`'s constructor and a
    blocking method for each of its public coroutine methods (same signature, same
    docstring)."""

    def decorate(sync_cls: type[S]) -> type[S]:
        @functools.wraps(async_cls.__init__)
        def __init__(self: SyncClient, *args: Any, **kwargs: Any) -> None:
            self._attach(async_cls(*args, **kwargs))

        _rename(__init__, sync_cls, "__init__")
        sync_cls.__init__ = __init__  # type: ignore[misc]
        for name, coroutine in public_coroutines(async_cls).items():
            setattr(sync_cls, name, _rename(_blocking(name, coroutine), sync_cls, name))
        return sync_cls

    return decorate


def _blocking(name: str, coroutine: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(coroutine)  # the signature and docstring, through __wrapped__
    def method(self: SyncClient, *args: Any, **kwargs: Any) -> Any:
        return self._runner.run(getattr(self._client, name)(*args, **kwargs))

    return method


def _rename(fn: Callable[..., Any], owner: type, name: str) -> Callable[..., Any]:
    # functools.wraps copied the async method's qualified name; tracebacks and help()
    # should name the blocking class.
    fn.__qualname__ = f"{owner.__qualname__}.{name}"
    return fn
