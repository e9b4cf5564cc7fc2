"""`ModelClient`: the model catalogue and checkpoint trees from Python, what the CLI's
`headway models ...` does: list (with store sizes), get, fork, add a base (admin keys),
delete, a model's checkpoints, its head and moving it (rollback / branch point), tags,
deleting a checkpoint, pruning and retention."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from headway.client import rpcs
from headway.client.base import GatewayClient
from headway.client.blocking import SyncClient, blocking_twin
from headway.client.connection import error_from_rpc
from headway.errors import InvalidArgument, Unavailable
from headway.types import Checkpoint, ModelInfo
from headway.v1 import model_pb2, model_pb2_grpc


class ModelClient(GatewayClient):
    """The models the caller's key can see, and their checkpoint trees. Settings as
    `TrainingClient` (gateway address `HEADWAY_URL`, key `HEADWAY_API_KEY`)."""

    def sync(self) -> SyncModelClient:
        """A blocking client with the same settings."""
        return SyncModelClient(**self.settings.options())

    async def list_models(self, with_size: bool = False) -> list[ModelInfo]:
        """Every model the caller can see: the bases and the team's forks (`with_size`:
        with each one's bytes in the store, `ModelInfo.store_bytes`)."""
        reply = await self._call(rpcs.list_models(with_size))
        return [ModelInfo.from_proto(m) for m in reply.models]

    async def get(self, model: str) -> ModelInfo:
        """One model (NotFound for one the caller cannot see)."""
        return ModelInfo.from_proto(await self._call(rpcs.get_model(model)))

    async def fork(
        self,
        source: str,
        name: str,
        *,
        lora_rank: int = 0,
        full: bool = False,
        checkpoint: str = "",
        with_optimizer: bool = False,
    ) -> ModelInfo:
        """Fork a trainable model `name` from a base or one of the team's models: LoRA of
        `lora_rank` (0: the source's, or the service's default over a base) or `full`;
        from `checkpoint` of the source (default: its head), `with_optimizer` state too."""
        if full and lora_rank:
            raise InvalidArgument("give lora_rank or full, not both: a fork is one kind")
        call = rpcs.fork_model(source, name, lora_rank, full, checkpoint, with_optimizer)
        return ModelInfo.from_proto(await self._call(call))

    async def add_base(self, path: str, name: str = "") -> ModelInfo:
        """Register a Hugging Face directory of the servers as a base (admin keys; under
        the trainer's --base-root, any directory in local mode)."""
        return ModelInfo.from_proto(await self._call(rpcs.add_base(path, name)))

    async def delete(self, model: str) -> None:
        """Delete one of the team's models and its checkpoints."""
        await self._call(rpcs.delete_model(model))

    async def checkpoints(self, model: str) -> list[Checkpoint]:
        """A model's checkpoint tree, oldest first (`is_head` marks the head)."""
        reply = await self._call(rpcs.list_checkpoints(model))
        return [Checkpoint.from_proto(c) for c in reply.checkpoints]

    async def head(self, model: str) -> Checkpoint:
        """A model's head checkpoint (what the gateway serves), with its stats."""
        return Checkpoint.from_proto(await self._call(rpcs.get_head(model)))

    async def set_head(self, model: str, checkpoint: str | Checkpoint) -> Checkpoint:
        """Move a model's head to one of its checkpoints (rollback, or a branch point for
        the next optim step); returns the new head."""
        ckpt = checkpoint.id if isinstance(checkpoint, Checkpoint) else checkpoint
        return Checkpoint.from_proto(await self._call(rpcs.set_head(model, ckpt)))

    async def tag(self, model: str, checkpoint: str | Checkpoint, name: str) -> Checkpoint:
        """Name a checkpoint of `model` (id, tag or `Checkpoint`) `name`: the tag is
        accepted wherever a checkpoint id is. AlreadyExists for a tag the model has."""
        ckpt = checkpoint.id if isinstance(checkpoint, Checkpoint) else checkpoint
        return Checkpoint.from_proto(await self._call(rpcs.tag(model, ckpt, name)))

    async def untag(self, model: str, name: str) -> Checkpoint:
        """Remove the tag `name` of `model`; the checkpoint it named."""
        return Checkpoint.from_proto(await self._call(rpcs.tag(model, "", name, remove=True)))

    async def record_eval(
        self, model: str, checkpoint: str | Checkpoint, metrics: Mapping[str, float]
    ) -> Checkpoint:
        """Record evaluation results on a checkpoint (listed as `Checkpoint.evals`); see
        `headway.eval.evaluate`, which runs a taskset and records its results."""
        ckpt = checkpoint.id if isinstance(checkpoint, Checkpoint) else checkpoint
        return Checkpoint.from_proto(await self._call(rpcs.record_eval(model, ckpt, metrics)))

    async def delete_checkpoint(self, model: str, checkpoint: str | Checkpoint) -> int:
        """Delete one checkpoint (id, tag or `Checkpoint`) of `model`; the bytes freed.
        FailedPrecondition, saying why, for the head, the root, a tagged checkpoint and
        one another model is built on."""
        ckpt = checkpoint.id if isinstance(checkpoint, Checkpoint) else checkpoint
        return (await self._call(rpcs.delete_checkpoint(model, ckpt))).freed_bytes

    async def prune(
        self,
        model: str,
        *,
        keep_last: int = 0,
        keep_every: int = 0,
        keep_lineage: int = 0,
        dry_run: bool = False,
    ) -> Pruned:
        """Delete the checkpoints of `model` these rules do not keep (none given: the
        model's own policy); `dry_run` only reports. The head, the root, tagged
        checkpoints and those other models are built on always stay."""
        rules = (keep_last, keep_every, keep_lineage)
        policy = rpcs.retention_policy(*rules) if any(rules) else None
        reply = await self._call(rpcs.prune(model, policy, dry_run))
        return Pruned(list(reply.deleted), dict(reply.kept), reply.freed_bytes)

    async def set_retention(
        self, model: str, *, keep_last: int = 0, keep_every: int = 0, keep_lineage: int = 0
    ) -> ModelInfo:
        """The model's retention policy, applied now and after each optim step (all 0:
        keep everything)."""
        policy = rpcs.retention_policy(keep_last, keep_every, keep_lineage)
        return ModelInfo.from_proto(await self._call(rpcs.set_retention(model, policy)))

    async def export(
        self, model: str, directory: str | Path, format: str = "peft", checkpoint: str = ""
    ) -> str:
        """Write a checkpoint of `model` (id or tag; default its head) into `directory`
        (new or empty), streamed from the server: `format` "peft" (a LoRA checkpoint's
        adapter, for peft and vLLM) or "hf" (the merged model with the base's config and
        tokenizer). Returns the checkpoint's id. Needs no access to the store, nor torch.
        Files are written under temporary names and renamed once complete."""
        out = Path(directory)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise InvalidArgument(f"{out} exists and is not an empty directory; choose another")
        request = model_pb2.ExportCheckpointRequest(
            model=model, checkpoint=checkpoint, format=format
        )
        stub = self._conn.stub(model_pb2_grpc.ModelServiceStub)
        s = self.settings
        ckpt, sizes = "", {}
        # Written beside `out` and renamed to it whole: a failed export leaves nothing.
        out.parent.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(prefix=f".{out.name}.part-", dir=out.parent))
        try:
            stream = stub.ExportCheckpoint(request, metadata=s.metadata, timeout=s.timeout)
            async for chunk in stream:
                ckpt = chunk.checkpoint
                path = _inside(part, chunk.file)
                if chunk.offset == 0:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"")
                    sizes[path] = chunk.size
                with path.open("r+b") as f:
                    f.seek(chunk.offset)
                    f.write(chunk.data)
            for path, size in sizes.items():
                if path.stat().st_size != size:
                    raise Unavailable(f"the export of {model} ended early at {path.name}; retry")
            if out.exists():
                out.rmdir()  # empty (checked above)
            part.rename(out)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from e
        finally:
            shutil.rmtree(part, ignore_errors=True)
        return ckpt


def _inside(out: Path, name: str) -> Path:
    """`out / name`, refusing a name that would leave `out` or name it (a server is not
    trusted with the client's filesystem)."""
    parts = Path(name).parts
    path = (out / name).resolve()
    if not parts or any(p in (".", "..") for p in parts) or not path.is_relative_to(out.resolve()):
        raise InvalidArgument(f"the server sent a file name outside the export: {name!r}")
    return path


@dataclass
class Pruned:
    """What a prune deleted (or would, dry run), why each other checkpoint stayed, and
    the bytes freed."""

    deleted: list[str]
    kept: dict[str, str]
    freed_bytes: int


@blocking_twin(ModelClient)
class SyncModelClient(SyncClient):
    """The blocking twin of `ModelClient`: same constructor, same methods, no await."""
