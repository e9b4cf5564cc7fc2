"""The Python SDK's gRPC clients: `TrainingClient`, `SamplingClient`, `TraceClient`,
`ModelClient`, and their blocking twins.

Every client talks to the gateway (`HEADWAY_URL`, default 127.0.0.1:50051) with the API
key in `HEADWAY_API_KEY` (none in local mode), over grpc.aio. What they add to the bare
stubs:

* **Retries without double application.** Each logical training call gets one request id
  (uuid4), reused by every retry of it; a call that fails with UNAVAILABLE is retried with
  exponential backoff for up to `retry_timeout` seconds (a trainer restarting after a
  crash is waited for), and the trainer returns the first reply for a request id it has
  seen, so a retry after a lost reply never applies a batch or a step twice.
* **Errors as exceptions.** A failed call raises the `headway.errors.HeadwayError`
  subclass of its status (`NotFound`, `InvalidArgument`, ...) with the server's message.
* **Batches of runs.** A batch is a list of `Run`s (sent inline as trajectories) and trace
  ids (resolved by the gateway), mixed; GRPO grouping and advantages are the server's
  (`group_size`, `normalize_std`), the SDK checks the batch shape before sending anything.

The package, one job per module:

    settings.py    ClientSettings: address, key, retries, deadline, interceptors
    connection.py  the grpc.aio channel, retries, status -> HeadwayError
    rpcs.py        one request builder per RPC
    batches.py     batch checks, substeps, merged metrics
    base.py        what the async clients share
    training.py    TrainingClient    sampling.py  SamplingClient    traces.py  TraceClient
    models.py      ModelClient (the catalogue, checkpoint trees, heads)
    blocking.py    the blocking twins, generated from the async clients

Layering: the contract (`headway.v1`), `headway.tensors`, `headway.types`,
`headway.errors` and `headway.channels`; never torch (only `forward_backward_custom`
imports it, through `headway.train`) and never service code. The names below load on
first use (PEP 562), so that `headway.agents` can import `headway.client.settings`
without grpc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headway.client.batches import BatchItem, merge_metrics, split_substeps, training_items
    from headway.client.connection import error_from_rpc
    from headway.client.models import ModelClient, SyncModelClient
    from headway.client.sampling import SamplingClient, SyncSamplingClient
    from headway.client.settings import (
        DEFAULT_RETRY_TIMEOUT,
        DEFAULT_URL,
        MAX_RETRY_DELAY,
        ClientSettings,
    )
    from headway.client.traces import SyncTraceClient, TraceClient
    from headway.client.training import SyncTrainingClient, TrainingClient
    from headway.errors import (
        Aborted,
        Cancelled,
        DeadlineExceeded,
        Internal,
        PermissionDenied,
        Unavailable,
        Unimplemented,
    )

__all__ = [
    "DEFAULT_RETRY_TIMEOUT",
    "DEFAULT_URL",
    "MAX_RETRY_DELAY",
    "Aborted",
    "BatchItem",
    "Cancelled",
    "ClientSettings",
    "DeadlineExceeded",
    "Internal",
    "ModelClient",
    "PermissionDenied",
    "SamplingClient",
    "SyncModelClient",
    "SyncSamplingClient",
    "SyncTraceClient",
    "SyncTrainingClient",
    "TraceClient",
    "TrainingClient",
    "Unavailable",
    "Unimplemented",
    "error_from_rpc",
    "merge_metrics",
    "split_substeps",
    "training_items",
]

# Where each name lives: `__all__`, and the errors and types `headway.client` offered
# before it was a package (its signatures use them).
_EXPORTS = {
    "headway.client.settings": "ClientSettings DEFAULT_URL DEFAULT_RETRY_TIMEOUT MAX_RETRY_DELAY",
    "headway.client.connection": "error_from_rpc",
    "headway.client.batches": "BatchItem training_items split_substeps merge_metrics",
    "headway.client.training": "TrainingClient SyncTrainingClient",
    "headway.client.sampling": "SamplingClient SyncSamplingClient",
    "headway.client.traces": "TraceClient SyncTraceClient",
    "headway.client.models": "ModelClient SyncModelClient",
    "headway.errors": (
        "Aborted Cancelled DeadlineExceeded HeadwayError Internal InvalidArgument "
        "PermissionDenied Unavailable Unimplemented"
    ),
    "headway.types": (
        "Checkpoint CustomResult ForwardBackwardResult LossInfo OptimStepResult Run "
        "SampleResult StepResult Turn"
    ),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names.split()}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'headway.client' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
