"""Supervising the children of `headway serve`: spawning, crash history, backoff, give-up.

The rules are systemd's and supervisord's. A child that exits unexpectedly is started
again, with the same arguments on the same addresses, after a backoff that doubles with
each crash still on its record (`backoff`, 2x, 4x, ... capped at `backoff_max`). A crash
stays on the record for `window` seconds; a child that has served that long without
crashing starts over from `backoff`. Crashes in a row without reaching SERVING in between
(a child that cannot start any more: a broken store, a port taken) all count, however
slowly it fails. At `max_crashes` crashes on the record the supervisor gives up.

Children are spawned through a tiny exec wrapper that sets PR_SET_PDEATHSIG (Linux), so
they do not outlive `headway serve` if it is SIGKILLed; a wrapper rather than a
`preexec_fn`, which is unsafe in a process that has threads (gRPC's, by the time anything
is restarted).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LOG_TAIL_LINES = 20

# Runs in the child before the service: ask Linux to SIGTERM it when its parent dies
# (prctl 1 = PR_SET_PDEATHSIG), then become the service. argv: parent pid, service argv.
_WITH_PARENT = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def with_parent_death(argv: list[str]) -> list[str]:
    """`argv` run so that the process gets SIGTERM when this process (more exactly, the
    thread that spawns it) dies; unchanged off Linux.

    Children run in their own session (so a terminal's Ctrl-C reaches only `headway
    serve`, which stops them in order); this keeps them from outliving it if it is killed.
    """
    if not sys.platform.startswith("linux"):
        return argv
    # -I -S: no site, no environment: the wrapper starts in milliseconds.
    return [sys.executable, "-I", "-S", "-c", _WITH_PARENT, str(os.getpid()), *argv]


def exit_status(code: int) -> str:
    """How a process ended, from its return code: 'exit code 1', 'killed by signal 9'."""
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, start: int = 0) -> str:
    """The last lines of a log file after byte `start` (indented), or a note it is empty."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(start, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"    (cannot read {path}: {e.strerror})"
    tail = text.rstrip().splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in tail) if tail else "    (the log is empty)"


def append_log_line(path: Path, line: str) -> None:
    """Append one stamped `headway serve` line to a child's log."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(path, "ab") as log:
        log.write(f"==== {stamp} headway serve: {line}\n".encode())


def spawn(
    argv: list[str], log: Path, env: dict[str, str], header: str
) -> tuple[subprocess.Popen[bytes], int]:
    """Start `argv` with its output appended to `log` after a `header` line; returns the
    process and the offset in the log where its own output begins."""
    append_log_line(log, header)
    with open(log, "ab") as out:
        start = out.tell()
        proc = subprocess.Popen(
            with_parent_death(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return proc, start


@dataclass
class RestartPolicy:
    """When a crashed child is restarted, and when the supervisor gives up on it."""

    backoff: float = 0.5  # seconds before restarting after a first crash
    backoff_max: float = 10.0  # the doubling stops here
    max_crashes: int = 5  # this many crashes on a child's record: give up
    window: float = 60.0  # seconds a crash stays on the record


@dataclass
class CrashHistory:
    """The crashes of one child that count against the give-up rule."""

    policy: RestartPolicy
    times: list[float] = field(default_factory=list)  # time.monotonic() of each crash
    served: bool = True  # reached SERVING since its last crash (a first start did)
    total: int = 0  # every crash, for the record

    def record(self, now: float) -> None:
        """Count a crash detected at `now`."""
        if self.served:  # it was serving: only the crashes of the last window count
            self.times = [t for t in self.times if now - t < self.policy.window]
        self.times.append(now)
        self.total += 1
        self.served = False

    @property
    def exhausted(self) -> bool:
        """True when the child crashed too often: do not restart it again."""
        return len(self.times) >= self.policy.max_crashes

    def backoff(self) -> float:
        """Seconds to wait before the next restart: doubling with each counted crash."""
        doublings = max(0, len(self.times) - 1)
        return min(self.policy.backoff * 2**doublings, self.policy.backoff_max)

    def describe(self) -> str:
        """Where the child stands against the give-up rule, for messages."""
        p = self.policy
        return f"crash {len(self.times)} on record; {p.max_crashes} within {p.window:g} s give up"
