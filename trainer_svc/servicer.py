"""gRPC servicers of the trainer: `ModelService` and `TrainingService`, thin over `Trainer`."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from headway.errors import InvalidArgument, NotFound, Overloaded
from headway.server.grpc import MAPPED_ERRORS, abort_for, caller, maps_errors, team_of
from headway.store.export import check_format, export_checkpoint
from headway.store.retention import Retention
from headway.v1 import common_pb2, model_pb2, model_pb2_grpc, training_pb2, training_pb2_grpc
from trainer_svc import calls, convert, losses
from trainer_svc.adapters import LoraRequest
from trainer_svc.calls import required_model
from trainer_svc.trainer import Trainer, unabandoned

Ctx = grpc.aio.ServicerContext


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    """Models and checkpoint trees, read and written through the trainer."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.store = trainer.store
        # A merged export holds a copy of the model in memory while it streams.
        self.exports = Slots(EXPORT_SLOTS, "exports")

    @maps_errors
    async def ListModels(
        self, request: model_pb2.ListModelsRequest, context: Ctx
    ) -> model_pb2.ListModelsResponse:
        who = caller(context)
        models = self.trainer.list_models(who.team)
        size = request.with_size

        def listed() -> list[common_pb2.Model]:  # sizes walk the files: off the loop
            return [convert.model_pb(self.store, m, who.admin, size) for m in models]

        return model_pb2.ListModelsResponse(
            models=await asyncio.to_thread(listed) if size else listed()
        )

    @maps_errors
    async def GetModel(self, request: model_pb2.GetModelRequest, context: Ctx) -> common_pb2.Model:
        who = caller(context)
        record = self.trainer.model(required_model(request.model, "model"), who.team)
        return convert.model_pb(self.store, record, who.admin)

    @maps_errors
    async def AddBase(self, request: model_pb2.AddBaseRequest, context: Ctx) -> common_pb2.Model:
        record = await self.trainer.add_base(request.path, request.name, caller(context))
        return convert.model_pb(self.store, record, show_path=True)  # only admins get here

    @maps_errors
    async def ForkModel(
        self, request: model_pb2.ForkModelRequest, context: Ctx
    ) -> common_pb2.Model:
        full = request.WhichOneof("mode") == "full" and request.full
        lora = None
        if request.HasField("lora"):
            c = request.lora
            lora = LoraRequest(c.rank, c.alpha, tuple(c.target_modules))
        if not request.name:
            raise InvalidArgument("name is empty: give the new model a name")
        who = caller(context)
        record = await self.trainer.fork(
            required_model(request.source, "source"), request.name, who.team, lora, full,
            checkpoint=request.checkpoint, with_optimizer=request.with_optimizer,
        )  # fmt: skip
        return convert.model_pb(self.store, record, who.admin)

    @maps_errors
    async def ListCheckpoints(
        self, request: model_pb2.ListCheckpointsRequest, context: Ctx
    ) -> model_pb2.ListCheckpointsResponse:
        slug = required_model(request.model, "model")
        self.trainer.model(slug, team_of(context))
        head, tags = self.store.head(slug), self.store.tags(slug)
        records = self.store.list_checkpoints(slug)
        return model_pb2.ListCheckpointsResponse(
            checkpoints=[convert.checkpoint_pb(self.store, r, head, tags) for r in records],
            head=head,
        )

    @maps_errors
    async def GetHead(
        self, request: model_pb2.GetHeadRequest, context: Ctx
    ) -> common_pb2.Checkpoint:
        slug = required_model(request.model, "model")
        self.trainer.model(slug, team_of(context))
        return convert.checkpoint_pb(self.store, self.store.head_checkpoint(slug))

    @maps_errors
    async def SetHead(
        self, request: model_pb2.SetHeadRequest, context: Ctx
    ) -> common_pb2.Checkpoint:
        if not request.checkpoint:
            raise InvalidArgument("checkpoint is empty: give the id of a checkpoint of the model")
        record = await self.trainer.set_head(
            required_model(request.model, "model"), request.checkpoint, team_of(context)
        )
        return convert.checkpoint_pb(self.store, record)

    @maps_errors
    async def TagCheckpoint(
        self, request: model_pb2.TagCheckpointRequest, context: Ctx
    ) -> common_pb2.Checkpoint:
        if not request.tag:
            raise InvalidArgument("tag is empty: give the tag's name")
        if not request.remove and not request.checkpoint:
            raise InvalidArgument("checkpoint is empty: give the id of a checkpoint to tag")
        record = await self.trainer.tag(
            required_model(request.model, "model"),
            request.checkpoint,
            request.tag,
            team_of(context),
            remove=request.remove,
        )
        return convert.checkpoint_pb(self.store, record)

    @maps_errors
    async def DeleteCheckpoint(
        self, request: model_pb2.DeleteCheckpointRequest, context: Ctx
    ) -> model_pb2.DeleteCheckpointResponse:
        if not request.checkpoint:
            raise InvalidArgument("checkpoint is empty: give the id of the checkpoint to delete")
        freed = await self.trainer.delete_checkpoint(
            required_model(request.model, "model"), request.checkpoint, team_of(context)
        )
        return model_pb2.DeleteCheckpointResponse(freed_bytes=freed)

    @maps_errors
    async def PruneCheckpoints(
        self, request: model_pb2.PruneCheckpointsRequest, context: Ctx
    ) -> model_pb2.PruneCheckpointsResponse:
        policy = _retention(request.policy) if request.HasField("policy") else None
        deleted, kept, freed = await self.trainer.prune(
            required_model(request.model, "model"), policy, team_of(context), request.dry_run
        )
        return model_pb2.PruneCheckpointsResponse(
            deleted=[r.id for r in deleted], kept=kept, freed_bytes=freed
        )

    @maps_errors
    async def SetRetention(
        self, request: model_pb2.SetRetentionRequest, context: Ctx
    ) -> common_pb2.Model:
        who = caller(context)
        record = await self.trainer.set_retention(
            required_model(request.model, "model"), _retention(request.policy), who.team
        )
        return convert.model_pb(self.store, record, who.admin)

    async def ExportCheckpoint(
        self, request: model_pb2.ExportCheckpointRequest, context: Ctx
    ) -> AsyncIterator[model_pb2.ExportChunk]:
        try:
            slug = required_model(request.model, "model")
            record = self.trainer.model(slug, team_of(context))
            check_format(slug, bool(record.lora), request.format)
            ckpt = self.store.get_checkpoint(slug, request.checkpoint or self.store.head(slug)).id
            async with self.exports.slot():
                with tempfile.TemporaryDirectory(prefix="headway-export-") as tmp:
                    out = Path(tmp) / "out"
                    # If the client leaves, the export runs on: its slot and directory
                    # stay until it ends (no pile of merges, no leftovers). A merge (hf)
                    # is torch work, on the torch thread (trainer_svc.torch_thread); a
                    # peft export copies files, in a worker thread.
                    run = self.trainer.torch.run if request.format == "hf" else asyncio.to_thread
                    await unabandoned(
                        run(export_checkpoint, self.store, slug, ckpt, request.format, out)
                    )
                    for path in sorted(p for p in out.rglob("*") if p.is_file()):
                        async for chunk in _chunks(path, path.relative_to(out).as_posix(), ckpt):
                            yield chunk
        except FileNotFoundError as e:  # deleted (retention, a delete) while exported
            await abort_for(context, NotFound(f"checkpoint {request.checkpoint!r}: {e}"))
        except MAPPED_ERRORS as e:
            await abort_for(context, e)

    @maps_errors
    async def RecordEval(
        self, request: model_pb2.RecordEvalRequest, context: Ctx
    ) -> common_pb2.Checkpoint:
        if not request.checkpoint:
            raise InvalidArgument("checkpoint is empty: give the id of the evaluated checkpoint")
        if not request.metrics:
            raise InvalidArgument("metrics is empty: give at least one result")
        record = await self.trainer.record_eval(
            required_model(request.model, "model"),
            request.checkpoint,
            dict(request.metrics),
            team_of(context),
        )
        return convert.checkpoint_pb(self.store, record)

    @maps_errors
    async def DeleteModel(
        self, request: model_pb2.DeleteModelRequest, context: Ctx
    ) -> model_pb2.DeleteModelResponse:
        await self.trainer.delete(required_model(request.model, "model"), team_of(context))
        return model_pb2.DeleteModelResponse()


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """forward_backward, custom losses, optim_step, step."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    @maps_errors
    async def ForwardBackward(
        self, request: training_pb2.ForwardBackwardRequest, context: Ctx
    ) -> training_pb2.ForwardBackwardResponse:
        result = await self.trainer.forward_backward(
            calls.forward_backward(request, team_of(context))
        )
        return convert.forward_backward_pb(result)

    @maps_errors
    async def ForwardCustom(
        self, request: training_pb2.ForwardCustomRequest, context: Ctx
    ) -> training_pb2.ForwardCustomResponse:
        result = await self.trainer.forward_custom(calls.forward_custom(request, team_of(context)))
        return training_pb2.ForwardCustomResponse(
            forward_id=result.forward_id, data=convert.datum_tensors_pb(result)
        )

    @maps_errors
    async def BackwardCustom(
        self, request: training_pb2.BackwardCustomRequest, context: Ctx
    ) -> training_pb2.BackwardCustomResponse:
        result = await self.trainer.backward_custom(
            calls.backward_custom(request, team_of(context))
        )
        return training_pb2.BackwardCustomResponse(
            metrics=result.metrics, num_datums=result.num_datums, num_tokens=result.num_tokens
        )

    @maps_errors
    async def OptimStep(
        self, request: training_pb2.OptimStepRequest, context: Ctx
    ) -> training_pb2.OptimStepResponse:
        result = await self.trainer.optim_step(calls.optim_step(request, team_of(context)))
        return convert.optim_step_pb(self.trainer.store, result)

    @maps_errors
    async def Step(
        self, request: training_pb2.StepRequest, context: Ctx
    ) -> training_pb2.StepResponse:
        fb, step = await self.trainer.step(calls.step(request, team_of(context)))
        return training_pb2.StepResponse(
            forward_backward=convert.forward_backward_pb(fb),
            optim_step=convert.optim_step_pb(self.trainer.store, step),
        )

    @maps_errors
    async def AvailableLosses(
        self, request: training_pb2.AvailableLossesRequest, context: Ctx
    ) -> training_pb2.AvailableLossesResponse:
        if request.model:
            self.trainer.model(request.model, team_of(context))
        return training_pb2.AvailableLossesResponse(
            losses=[
                training_pb2.LossInfo(
                    name=loss.name,
                    description=loss.description,
                    config=[
                        training_pb2.LossConfigKey(
                            name=k.name, default_value=k.default, description=k.description
                        )
                        for k in loss.config
                    ],
                )
                for loss in losses.LOSSES.values()
            ]
        )


def _retention(policy: common_pb2.RetentionPolicy) -> Retention:
    """The request's policy (InvalidArgument for a negative rule)."""
    return Retention(policy.keep_last, policy.keep_every, policy.keep_lineage)


EXPORT_SLOTS = 2  # exports at once (each may hold a merged model in memory)
CHUNK_BYTES = 1 << 20  # per ExportChunk: well under gRPC's 4 MB message limit


class Slots:
    """At most `n` of something at once; one more is refused at once (RESOURCE_EXHAUSTED
    with a retry pushback), never queued behind another team's for a slot (an hf export's
    merge then takes its turn on the torch thread, as training calls do)."""

    def __init__(self, n: int, what: str) -> None:
        self.n, self.what, self.used = n, what, 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.used >= self.n:
            raise Overloaded(f"the trainer runs its limit of {self.n} {self.what}; retry shortly")
        self.used += 1
        try:
            yield
        finally:
            self.used -= 1


async def _chunks(path: Path, name: str, ckpt: str) -> AsyncIterator[model_pb2.ExportChunk]:
    """The file at `path` as chunks named `name` (read off the event loop)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        offset = 0
        while True:
            data = await asyncio.to_thread(f.read, CHUNK_BYTES)
            if not data and offset:
                return
            yield model_pb2.ExportChunk(
                file=name, size=size, offset=offset, data=data, checkpoint=ckpt
            )
            offset += len(data)
            if offset >= size:
                return
