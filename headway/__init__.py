"""Headway: train language models with rewards.

The SDK's public names are importable from here (`from headway import TrainingClient`);
rollouts live in `headway.agents` (`create_agent`) and `headway.eval` (`Job`, `Taskset`,
`Task`), custom-loss tensors in `headway.train` (`DatumTensors`).

The names are loaded on first use (PEP 562), so that the services, which import
`headway.tensors` and friends, do not pay for the SDK's client code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headway.client import (
        Aborted,
        Cancelled,
        DeadlineExceeded,
        Internal,
        ModelClient,
        PermissionDenied,
        SamplingClient,
        SyncModelClient,
        SyncSamplingClient,
        SyncTraceClient,
        SyncTrainingClient,
        TraceClient,
        TrainingClient,
        Unavailable,
        Unimplemented,
    )
    from headway.errors import (
        AlreadyExists,
        FailedPrecondition,
        HeadwayError,
        InvalidArgument,
        NotFound,
        Overloaded,
        ResourceExhausted,
        Unauthenticated,
    )
    from headway.train import DatumTensors
    from headway.types import (
        Checkpoint,
        CheckpointStats,
        CustomResult,
        ForwardBackwardResult,
        LogprobsResult,
        LossInfo,
        ModelInfo,
        OptimStepResult,
        Run,
        SampledSequence,
        SampleResult,
        StepResult,
        Turn,
    )

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "Checkpoint",
    "CheckpointStats",
    "CustomResult",
    "DatumTensors",
    "DeadlineExceeded",
    "FailedPrecondition",
    "ForwardBackwardResult",
    "HeadwayError",
    "Internal",
    "InvalidArgument",
    "LogprobsResult",
    "LossInfo",
    "ModelClient",
    "ModelInfo",
    "NotFound",
    "OptimStepResult",
    "Overloaded",
    "PermissionDenied",
    "ResourceExhausted",
    "Run",
    "SampleResult",
    "SampledSequence",
    "SamplingClient",
    "StepResult",
    "SyncModelClient",
    "SyncSamplingClient",
    "SyncTraceClient",
    "SyncTrainingClient",
    "TraceClient",
    "TrainingClient",
    "Turn",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]

# Where the names above live, searched in this order.
_MODULES = ("headway.errors", "headway.types", "headway.client", "headway.train")


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module in _MODULES:
            value = getattr(importlib.import_module(module), name, None)
            if value is not None:
                globals()[name] = value  # later lookups skip this function
                return value
    raise AttributeError(f"module 'headway' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
