"""The SDK as a package, without a server: what importing it pulls in, the names it has
always offered, and one `ClientSettings` resolved from the arguments and the environment."""

from __future__ import annotations

import subprocess
import sys

import pytest

import headway
import headway.client
from headway.client import ClientSettings, TraceClient, TrainingClient
from headway.client.settings import DEFAULT_URL

# What `from headway.client import ...` offered when it was one module (its public names
# other than the modules and helpers it imported): all still importable.
LEGACY_NAMES = [
    "Aborted",
    "Cancelled",
    "Checkpoint",
    "CustomResult",
    "DEFAULT_RETRY_TIMEOUT",
    "DEFAULT_URL",
    "DeadlineExceeded",
    "ForwardBackwardResult",
    "HeadwayError",
    "Internal",
    "InvalidArgument",
    "LossInfo",
    "MAX_RETRY_DELAY",
    "OptimStepResult",
    "PermissionDenied",
    "Run",
    "SampleResult",
    "SamplingClient",
    "StepResult",
    "SyncSamplingClient",
    "SyncTraceClient",
    "SyncTrainingClient",
    "TraceClient",
    "TrainingClient",
    "Turn",
    "Unavailable",
    "Unimplemented",
    "BatchItem",
    "error_from_rpc",
    "merge_metrics",
    "split_substeps",
    "training_items",
]


def test_the_sdk_imports_no_torch_and_no_service_code():
    code = (
        "import sys, headway, headway.client, headway.agents, headway.eval, headway.train\n"
        "from headway import TrainingClient, SamplingClient, Run, DatumTensors\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.split('.')[0] in "
        "('trainer_svc', 'sampler_svc', 'gateway', 'openai')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_agents_import_no_grpc():
    # Agents speak HTTP; they share the client settings module, which must stay grpc-free.
    code = "import sys, headway.agents\nassert 'grpc' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_name_headway_client_offered_is_still_there():
    for name in LEGACY_NAMES:
        assert getattr(headway.client, name) is not None, name
    for name in headway.client.__all__:
        assert getattr(headway.client, name) is not None, name
    for name in headway.__all__:
        assert getattr(headway, name) is not None, name
    assert headway.TrainingClient is headway.client.TrainingClient
    with pytest.raises(AttributeError):
        headway.client.NoSuchName  # noqa: B018


def test_settings_come_from_the_arguments_then_the_environment(monkeypatch):
    monkeypatch.delenv("HEADWAY_URL", raising=False)
    monkeypatch.delenv("HEADWAY_API_KEY", raising=False)
    assert ClientSettings.resolve() == ClientSettings(url=DEFAULT_URL, api_key="")
    monkeypatch.setenv("HEADWAY_URL", "gw:7000")
    monkeypatch.setenv("HEADWAY_API_KEY", "k-env")
    assert ClientSettings.resolve().url == "gw:7000"
    assert ClientSettings.resolve().metadata == [("authorization", "Bearer k-env")]
    given = ClientSettings.resolve("other:1", "k-arg", retry_timeout=5.0)
    assert (given.url, given.api_key, given.retry_timeout) == ("other:1", "k-arg", 5.0)
    # An explicit empty key means "send none", whatever the environment says.
    assert ClientSettings.resolve(api_key="").metadata == []


@pytest.mark.parametrize(
    "url, target",
    [
        ("gw:50051", ("gw:50051", False)),
        ("grpc://gw:50051", ("gw:50051", False)),
        ("http://gw:50051/", ("gw:50051", False)),
        ("grpcs://gw:443", ("gw:443", True)),
        ("https://gw:443/", ("gw:443", True)),
    ],
)
def test_a_url_scheme_chooses_tls(url, target):
    assert ClientSettings(url=url).target == target


def test_a_blocking_twin_and_its_client_have_the_same_settings():
    client = TrainingClient("m", url="gw:1", api_key="k", retry_backoff=0.01, max_retries=3)
    assert client.sync().aio.settings == client.settings and client.sync().model == "m"
    traces = TraceClient("gw:2", timeout=4.0, interceptors=[object()])
    assert traces.sync().aio.settings == traces.settings and traces.sync().url == "gw:2"
