"""The checkpoint store: models, checkpoint trees and heads as a directory of safetensors.

- `atomic.py`  crash-safe file and directory writes
- `records.py` `ModelRecord` / `CheckpointRecord` (model.json, meta.json)
- `store.py`   `CheckpointStore`: create, fork, write checkpoints, move heads, resolve files
"""

from headway.store.records import CheckpointRecord, CheckpointRef, ModelRecord
from headway.store.store import (
    ADAPTER_FILE,
    META_FILE,
    OPTIMIZER_FILE,
    WEIGHTS_FILE,
    CheckpointStore,
    DeferredFile,
    check_slug,
)

__all__ = [
    "ADAPTER_FILE",
    "META_FILE",
    "OPTIMIZER_FILE",
    "WEIGHTS_FILE",
    "CheckpointRecord",
    "CheckpointRef",
    "CheckpointStore",
    "DeferredFile",
    "ModelRecord",
    "check_slug",
]
