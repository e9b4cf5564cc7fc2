"""What the store keeps about models and checkpoints, as JSON-backed dataclasses.

`model.json` holds a `ModelRecord`; each checkpoint's `meta.json` a `CheckpointRecord`.
A checkpoint either holds its own files or references another checkpoint's (`ref`):
that is how a fork starts from its source's head without copying anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Kind = Literal["base", "lora", "full"]


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint of some model: where weights are found."""

    model: str
    checkpoint: str


@dataclass
class ModelRecord:
    """A base (public, read-only, referencing a Hugging Face directory) or a team's fork."""

    slug: str
    team: str  # owning team; "" for public bases
    is_base: bool
    base: str  # slug of the base this model ultimately derives from (itself for a base)
    created: float  # unix seconds
    source: str = ""  # model it was forked from; "" for a base
    path: str = ""  # bases: absolute path of the Hugging Face directory (referenced, not copied)
    lora: dict[str, Any] | None = None  # {"rank", "alpha", "target_modules"} for LoRA models
    # LoRA models: the full weights the adapter sits on (a base's checkpoint, or a source
    # checkpoint merged); None for bases and full models.
    frozen: CheckpointRef | None = None
    # Architecture summary for clients: model_type, vocab_size, max_context, eos_token_ids.
    arch: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> Kind:
        return "base" if self.is_base else ("lora" if self.lora else "full")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelRecord:
        frozen = raw.get("frozen")
        return cls(**{**raw, "frozen": CheckpointRef(**frozen) if frozen else None})


@dataclass
class CheckpointRecord:
    """One node of a model's checkpoint tree."""

    id: str
    model: str
    kind: Kind
    step: int
    created: float  # unix seconds, when it was published (renamed into place)
    parent_id: str = ""  # "" for a base's root
    parent_model: str = ""  # set when the parent belongs to another model (a fork's root)
    ref: CheckpointRef | None = None  # the files are those of another checkpoint
    has_optimizer: bool = False  # optimizer.safetensors present (roots have none)
    stats: dict[str, Any] | None = None  # CheckpointStats of the step that made it
    request_id: str = ""  # idempotency key of the OptimStep that made it
    # Size in bytes of each file of the checkpoint (meta.json aside), as written: what
    # tells a checkpoint a power loss tore from a complete one (CheckpointStore).
    files: dict[str, int] | None = None
    # Files sized before their data was written (over a spare: headway.store.pages) in an
    # asynchronous store: until the checkpoint is marked durable, recovery also checks
    # them for holes, since their size no longer proves their data reached the disk.
    sized_first: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CheckpointRecord:
        ref = raw.get("ref")
        return cls(**{**raw, "ref": CheckpointRef(**ref) if ref else None})
