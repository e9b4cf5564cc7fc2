"""`ModelClient`: the model catalogue and checkpoint trees from Python, what the CLI's
`headway models ...` does: list, get, fork, add a base (admin keys), delete, a model's
checkpoints, its head and moving it (rollback / branch point)."""

from __future__ import annotations

from headway.client import rpcs
from headway.client.base import GatewayClient
from headway.client.blocking import SyncClient, blocking_twin
from headway.errors import InvalidArgument
from headway.types import Checkpoint, ModelInfo


class ModelClient(GatewayClient):
    """The models the caller's key can see, and their checkpoint trees. Settings as
    `TrainingClient` (gateway address `HEADWAY_URL`, key `HEADWAY_API_KEY`)."""

    def sync(self) -> SyncModelClient:
        """A blocking client with the same settings."""
        return SyncModelClient(**self.settings.options())

    async def list_models(self) -> list[ModelInfo]:
        """Every model the caller can see: the bases and the team's forks."""
        reply = await self._call(rpcs.list_models())
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


@blocking_twin(ModelClient)
class SyncModelClient(SyncClient):
    """The blocking twin of `ModelClient`: same constructor, same methods, no await."""
