"""Running a real `LocalStack` (what `headway serve` runs) inside a test.

The stack's children are spawned by, and supervised from, the test's main thread (they are
told to exit when the thread that spawned them does); the test's body runs in a second
thread. Nothing here waits on a clock: only on conditions, with timeouts that catch hangs.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from headway.cli.serve import LocalStack, ServeConfig
from tests.stack import free_port

T = TypeVar("T")
HANG_SECONDS = 600  # only catches hangs: three torch processes start on 2 shared cores


SAMPLER_PORTS = 4  # samplers a test stack may run: ports base .. base + 3 are checked free


def free_run(count: int) -> int:
    """The first of `count` consecutive ports nothing listens on now (samplers listen on
    sampler_port_base + i: a free base alone left sampler-1 on a port in use)."""
    while True:
        base = free_port()
        if base + count <= 65536 and all(_bindable(base + i) for i in range(1, count)):
            return base


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stack_config(tmp_path: Path, **overrides: object) -> ServeConfig:
    """A stack on free ports, an embedded Redis, a fresh store, one torch thread each."""
    sampler_port = free_run(SAMPLER_PORTS)
    ports: set[int] = set()
    while len(ports) < 3:
        port = free_port()
        if not sampler_port <= port < sampler_port + SAMPLER_PORTS:
            ports.add(port)
    grpc_port, http_port, trainer_port = sorted(ports)
    fields: dict = dict(
        store=tmp_path / "store",
        listen=f"127.0.0.1:{grpc_port}",
        http=f"127.0.0.1:{http_port}",
        trainer_listen=f"127.0.0.1:{trainer_port}",
        sampler_port_base=sampler_port,
        threads=1,
        start_timeout=HANG_SECONDS,
    )
    fields.update(overrides)
    return ServeConfig(**fields)  # type: ignore[arg-type]


def supervised(stack: LocalStack, body: Callable[[], T]) -> T:
    """Run `body` in a thread while this thread supervises the stack (as `headway serve`
    does: children die with the thread that spawned them); stop when `body` is done."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(("ok", body()))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            outcome.append(("error", e))
        finally:
            stack.request_stop()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    stack.watch()  # a ServeError here (the stack gave up) fails the test
    thread.join(HANG_SECONDS)
    assert outcome, "the test body did not finish"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value
