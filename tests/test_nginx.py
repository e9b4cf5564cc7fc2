"""Two gateways behind a real nginx (Debian's package), configured by the file the README's
cluster section shows (`deploy/nginx-headway.conf`): gRPC through `grpc_pass` over HTTP/2,
the OpenAI HTTP API through `proxy_pass`, SSE streaming included. The SDK, the CLI and the
`openai` client work through it; one gateway killed under 32 concurrent clients fails no
request that was not in flight on it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from headway.channels import CHANNEL_OPTIONS
from headway.client import SyncSamplingClient
from headway.tensors import to_tensor
from headway.testing import ServiceProcess, free_port, wait_until
from headway.v1 import common_pb2, model_pb2, model_pb2_grpc, sampling_pb2, sampling_pb2_grpc
from tests.helpers_metrics import scrape, value
from tests.stack import HANG_SECONDS

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / "deploy" / "nginx-headway.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/nginx/sbin/nginx") if Path(p).exists()), None
)
needs_nginx = pytest.mark.skipif(
    NGINX is None,
    reason="nginx is not installed (Debian: apt-get install nginx-light; .ci/run installs it "
    "where apt-get can)",
)
SAMPLE = "/headway.v1.SamplingService/Sample"
CLIENTS = 32


class Nginx:
    """nginx in the foreground with the README's site config, its addresses substituted."""

    def __init__(self, tmp: Path, grpc_gateways: list[str], http_gateways: list[str]) -> None:
        tmp.mkdir()
        self.grpc_port, self.http_port = free_port(), free_port()
        site = SITE.read_text()
        for i, (g, h) in enumerate(zip(grpc_gateways, http_gateways, strict=True), 1):
            site = site.replace(f"gateway-{i}:50051", g).replace(f"gateway-{i}:8000", h)
        site = site.replace("listen 50050 ", f"listen 127.0.0.1:{self.grpc_port} ")
        site = site.replace("listen 8080;", f"listen 127.0.0.1:{self.http_port};")
        (tmp / "headway.conf").write_text(site)
        temp = " ".join(
            f"{kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                           "uwsgi", "scgi")
        )  # fmt: skip
        # As root, nginx's workers would switch to `nobody`, who cannot enter the test's dir.
        user = "user root root;" if os.geteuid() == 0 else ""
        (tmp / "nginx.conf").write_text(
            f"daemon off; worker_processes 1; {user}\n"
            f"error_log {tmp / 'error.log'} warn; pid {tmp / 'nginx.pid'};\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log {tmp / 'access.log'}; {temp}\n"
            f"       include {tmp / 'headway.conf'}; }}\n"
        )
        self.log = tmp / "error.log"
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(self.log)],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "stderr.log", "wb"),  # noqa: SIM115 (closed with the process)
        )
        self.tmp = tmp
        for port in (self.grpc_port, self.http_port):
            wait_until(lambda p=port: self._listening(p), timeout=HANG_SECONDS,
                       what=f"nginx listening on {port}")  # fmt: skip

    def _listening(self, port: int) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"nginx exited {self.proc.returncode}: {(self.tmp / 'stderr.log').read_text()}"
                f"{self.log.read_text() if self.log.exists() else ''}"
            )
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Gateway(ServiceProcess):
    """`python -m gateway` as a deployment runs it: gRPC, HTTP and /metrics ports."""

    def __init__(self, name: str, store: Path, trainer: str, prefix: str) -> None:
        self.http, self.metrics = free_port(), free_port()
        args = ["--store", str(store), "--trainer", trainer, "--auth", "off",
                "--http", f"127.0.0.1:{self.http}",
                "--metrics", f"127.0.0.1:{self.metrics}"]  # fmt: skip
        super().__init__(name, "gateway", args, store.with_name(f"{name}.log"), prefix)

    def samples_ok(self) -> float:
        return value(scrape(self.metrics), "headway_grpc_requests_total", service="gateway",
                     method=SAMPLE, code="OK")  # fmt: skip


@pytest.fixture
def balanced(sampling_stack, tmp_path: Path) -> Iterator[tuple[object, list[Gateway], Nginx]]:
    """Trainer and one sampler (this process), two gateway processes, nginx in front."""
    stack = sampling_stack
    gateways: list[Gateway] = []
    proxy = None
    try:
        for i in (1, 2):
            gateways.append(Gateway(f"gateway-{i}", stack.config.store, stack.server.address,
                                    stack.prefix))  # fmt: skip
        for g in gateways:
            g.wait_ready(time.monotonic() + HANG_SECONDS)
        proxy = Nginx(tmp_path / "nginx", [g.address for g in gateways],
                      [f"127.0.0.1:{g.http}" for g in gateways])  # fmt: skip
        yield stack, gateways, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        for g in gateways:
            g.stop()


def sample_request(seed: int) -> sampling_pb2.SampleRequest:
    return sampling_pb2.SampleRequest(
        model="tiny",
        prompt_tokens=to_tensor([5, 17, 33, 8], common_pb2.DTYPE_INT32),
        params=common_pb2.SamplingParams(max_tokens=2, temperature=1.0, seed=seed),
    )


@pytest.mark.slow
@needs_nginx
def test_the_sdk_the_cli_and_openai_work_through_nginx(balanced):
    stack, gateways, proxy = balanced
    # The SDK over gRPC (HTTP/2 through grpc_pass), spread over both gateways.
    with SyncSamplingClient("tiny", url=proxy.grpc_address) as client:
        for seed in range(8):
            result = client.sample([5, 17, 33, 8], max_tokens=3, seed=seed)
            assert len(result.sequences) == 1 and len(result.sequences[0].tokens) >= 1
    assert all(g.samples_ok() >= 1 for g in gateways), "nginx sent every call to one gateway"
    # The CLI, pointed at nginx.
    cli = subprocess.run(
        [sys.executable, "-m", "headway.cli", "models", "list"],
        env={**os.environ, "HEADWAY_URL": proxy.grpc_address},
        capture_output=True, text=True, timeout=HANG_SECONDS, cwd=REPO,
    )  # fmt: skip
    assert cli.returncode == 0 and "tiny" in cli.stdout, cli.stderr
    # The openai client over HTTP (proxy_pass), streaming (SSE) and not.
    http = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy.http_port}/v1", api_key="local")
    messages = [{"role": "user", "content": "what is 3 plus 4?"}]
    whole = http.chat.completions.create(model="tiny", messages=messages, max_tokens=4, seed=1)
    assert whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(http.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                               seed=1, stream=True))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # As SSE events through nginx, whatever their number: a replica that decodes faster
    # than its stream is read hands over several tokens per chunk (all 4 in one on a CI run).
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


@pytest.mark.slow
@needs_nginx
def test_killing_a_gateway_fails_only_the_calls_in_flight_on_it(balanced):
    """32 clients sample through nginx without pause; gateway-1 is SIGKILLed. A call may
    fail only if it started before the kill (it may have been on gateway-1); every call
    started after it succeeds (nginx passes it to gateway-2, gateway-1 refusing)."""
    stack, gateways, proxy = balanced
    results: list[tuple[float, float, str]] = []  # (start, end, status) per call
    lock, stop = threading.Lock(), threading.Event()

    def client(index: int) -> None:
        channel = grpc.insecure_channel(proxy.grpc_address, options=CHANNEL_OPTIONS)
        stub = sampling_pb2_grpc.SamplingServiceStub(channel)
        seed = 0
        try:
            while not stop.is_set():
                start, status = time.monotonic(), "OK"
                try:
                    stub.Sample(sample_request(index * 10_000 + seed), timeout=HANG_SECONDS)
                except grpc.RpcError as e:
                    status = e.code().name
                with lock:
                    results.append((start, time.monotonic(), status))
                seed += 1
        finally:
            channel.close()

    def calls(after: float = 0.0) -> int:
        with lock:
            return sum(1 for start, _, _ in results if start >= after)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: calls() >= 2 * CLIENTS, timeout=HANG_SECONDS, what="calls under way")
        assert gateways[0].samples_ok() >= 1 and gateways[1].samples_ok() >= 1
        gateways[0].proc.send_signal(signal.SIGKILL)
        gateways[0].proc.wait(HANG_SECONDS)
        killed = time.monotonic()
        wait_until(lambda: calls(after=killed) >= 3 * CLIENTS, timeout=HANG_SECONDS,
                   what="calls after the kill")  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join(HANG_SECONDS)
    after = [status for start, _, status in results if start >= killed]
    failed_after = [s for s in after if s != "OK"]
    assert not failed_after, f"{len(failed_after)} calls started after the kill failed"
    # The kill hit live traffic: calls before it went to both gateways.
    assert len(after) >= 3 * CLIENTS
    models = model_pb2_grpc.ModelServiceStub(grpc.insecure_channel(proxy.grpc_address))
    assert "tiny" in {m.slug for m in models.ListModels(model_pb2.ListModelsRequest()).models}


def test_the_readme_shows_the_nginx_configuration_this_test_runs():
    readme = (REPO / "README.md").read_text()
    assert f"```nginx\n{SITE.read_text()}```" in readme
