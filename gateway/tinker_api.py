"""Tinker-compatible HTTP API of the gateway (`/api/v1/...`), for the official `tinker` SDK.

The mapping onto Headway:
- A Tinker session is a random id the gateway hands out (`create_session`); it names its
  training runs and sampling sessions, and belongs to the caller's team.
- A training run `<session>:train:<n>` (the SDK computes this id itself in one flow, so the
  form is fixed) is the Headway fork `tk-<session>-<n>` of the base it names: LoRA of the
  asked rank. Team isolation is the store's: another team's fork is NOT_FOUND.
- forward_backward is Headway's ForwardBackward on that fork, with Tinker's Datum mapped
  field for field (model_input's tokens → input_tokens; loss_fn_inputs target_tokens,
  weights, logprobs → sampling_logprobs, advantages). Both define the built-in losses as
  sums over tokens, so the gradients are the same.
- optim_step is Headway's OptimStep: every step is a checkpoint of the fork's tree and its
  new head (visible in `headway models checkpoints`); save_weights_for_sampler names the
  head (Tinker's sampler weights are a checkpoint that already exists here) and a sampling
  session samples that checkpoint through the gateway's replicas, like a pinned Sample.
- Calls that Tinker answers with a future run as tasks of the gateway that took them, one
  run's operations in the order they were submitted, their results in Redis
  (`gateway.tinker_state`, with sessions and names): any gateway answers a retrieve.

Requests are checked against the SDK's wire types: JSON bodies by field, the
forward_backward body as the protobuf of `headway/v1/tinker.proto`. No torch here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from google.protobuf.message import DecodeError

from gateway.core import Gateway
from gateway.http_params import MAX_TOP_LOGPROBS, parse_body
from gateway.tinker_state import NAME_SECONDS, Result, SamplingSession, TinkerState
from headway.errors import (
    FailedPrecondition,
    HeadwayError,
    InvalidArgument,
    NotFound,
    Overloaded,
    Unavailable,
    from_rpc_error,
)
from headway.server.auth import Caller
from headway.server.heads import run_key
from headway.store import ADAPTER_FILE, check_slug
from headway.tensors import from_tensor, to_tensor
from headway.v1 import (
    common_pb2,
    model_pb2,
    model_pb2_grpc,
    sampling_pb2,
    tinker_pb2,
    training_pb2,
    training_pb2_grpc,
)

log = logging.getLogger(__name__)

PROTO = "application/x-protobuf"
MAX_SAMPLES = 1024  # num_samples of one asample (the replicas' own limit is lower)
RETRY_SECONDS = 300.0  # how long an op retries an overloaded or unreachable backend (the SDK's own)
LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")
# The kinds of a tinker:// path and the SDK's CheckpointType of each.
KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
# A PEFT adapter's files, what an external weights checkpoint of a LoRA run holds.
PEFT_FILES = ("adapter_config.json", ADAPTER_FILE)
# An export's lifetime (s): the SDK's least; at most the life of a run's names (30 days
# since the run last named a checkpoint), not the SDK's 10 years.
EXPORT_TTL = (3600, NAME_SECONDS)
URL_SECONDS = 3600  # a signed download URL's life
KEY_PREFIX = "tml-"  # the SDK refuses keys without it: a Headway key is sent as tml-<key>
# The reductions a metric name may end in ("loss:sum"); the SDK drops or fails others.
REDUCTIONS = ("mean", "sum", "min", "max")
SUMMED = ("num_tokens", "num_datums")  # Headway metrics that add up over chunks
RUN_SLUG = re.compile(r"tk-([0-9a-f]+)-(\d+)")  # a fork made for a Tinker training run
DTYPES = {
    tinker_pb2.TINKER_DTYPE_FLOAT32: np.float32,
    tinker_pb2.TINKER_DTYPE_INT64: np.int64,
    tinker_pb2.TINKER_DTYPE_INT32: np.int32,
}


def bearer(headers: Any) -> str:
    """The `authorization` value for a request: its own, else the SDK's `X-API-Key` with
    the `tml-` prefix taken off (the Headway key it carries)."""
    value = headers.get("authorization", "")
    key = headers.get("x-api-key", "")
    if not value and key:
        value = "Bearer " + key.removeprefix(KEY_PREFIX)
    return value


def run_slug(model_id: str) -> str:
    """The Headway fork of a training run: `<session>:train:<n>` is `tk-<session>-<n>`;
    any other id is a fork's slug (a Headway fork trained through this API)."""
    parts = model_id.split(":")
    if len(parts) == 3 and parts[1] == "train" and parts[0] and parts[2].isdigit():
        return f"tk-{parts[0]}-{parts[2]}"
    if ":" in model_id:
        raise InvalidArgument(f"model_id {model_id!r}: expected <session_id>:train:<n>")
    return check_slug(model_id)


def run_id(slug: str) -> str:
    """The training run id of a fork (`run_slug`'s inverse)."""
    made = RUN_SLUG.fullmatch(slug)
    return f"{made[1]}:train:{made[2]}" if made else slug


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def parse_path(path: Any) -> tuple[str, str, str]:
    """(model_id, kind, name) of `tinker://<model_id>/<kind>/<name>`."""
    ok = isinstance(path, str) and path.startswith("tinker://")
    parts = path.removeprefix("tinker://").split("/") if ok else []
    if len(parts) != 3 or parts[1] not in KINDS or not parts[2]:
        raise InvalidArgument(
            f"path {path!r}: expected tinker://<model_id>/{'|'.join(KINDS)}/<name>"
        )
    return parts[0], parts[1], parts[2]


async def patiently(call: Callable[[], Awaitable[Any]]) -> Any:
    """`await call()`, again while the backend is at capacity (after its pushback) or out
    of reach, for up to RETRY_SECONDS: a future stays pending ("try_again") where the SDK
    would have retried a call of its own, and the trainer's request ids (a run's seq_id)
    make a repeated training call count once."""
    deadline, delay = time.monotonic() + RETRY_SECONDS, 0.1
    while True:
        try:
            return await call()
        except (grpc.aio.AioRpcError, HeadwayError) as e:
            if isinstance(e, grpc.aio.AioRpcError):
                e = from_rpc_error(e)
            if not isinstance(e, Overloaded | Unavailable) or time.monotonic() > deadline:
                raise
            wait = e.retry_after_ms / 1000 if getattr(e, "retry_after_ms", None) else delay
            log.info("tinker op waits %.2f s: %s", wait, e.message)
            await asyncio.sleep(wait)
            delay = min(2 * delay, 5.0)


def failure(error: BaseException) -> Result:
    """A failed future's body: the SDK raises it as RequestFailedError of this category
    ("user": change the request; "server": not the caller's doing)."""
    if isinstance(error, grpc.aio.AioRpcError):  # a backend's answer
        error = from_rpc_error(error)
    if isinstance(error, HeadwayError):
        category = "user" if error.user_error else "server"
        return Result({"error": error.message, "category": category})
    log.error("tinker op failed", exc_info=error)
    return Result({"error": f"internal error: {type(error).__name__}", "category": "server"})


def create_router(gateway: Gateway, team_of: Callable[[Any], str]) -> APIRouter:
    """The `/api/v1` routes, on `gateway`; `team_of(headers)` authenticates a request."""
    state = TinkerState(
        gateway.redis,
        gateway.config.redis_prefix,
        gateway.config.max_calls_per_team,
        gateway.quota,
    )
    api = APIRouter(prefix="/api/v1")
    models = model_pb2_grpc.ModelServiceStub(gateway.trainer)
    training = training_pb2_grpc.TrainingServiceStub(gateway.trainer)

    def md(team: str) -> list[tuple[str, str]]:
        return gateway.backend_md(Caller(team))

    async def body(request: Request, team: str) -> dict[str, Any]:
        """The JSON object of a request of `team` (authenticated by the caller; 400 for
        anything else, NaN and deep nesting included), parsed on a worker thread of the
        team's share as the OpenAI API's are."""
        return await gateway.workers.run(team, parse_body, (await request.body()) or b"{}")

    def run_of(team: str, model_id: Any) -> str:
        """The team's fork a training run id names; NotFound for another team's, and a
        base is no run (every team sees it, none trains it)."""
        if not isinstance(model_id, str):
            raise InvalidArgument("model_id: a string is required")
        slug = run_slug(model_id)
        if gateway.model(slug, team).is_base:
            raise InvalidArgument(
                f"{model_id!r} is a base, not a training run: create_lora_training_client"
            )
        return slug

    def rk(slug: str) -> str:
        """A fork's key in the API's Redis state (`run_key`)."""
        return run_key(slug, gateway.store.get_model(slug).created)

    @api.post("/client/config")
    async def client_config(request: Request) -> dict[str, Any]:
        team_of(request.headers)
        # Keep the SDK on plain httpx and its chunks in order (no reorder buffer here).
        return {"pjwt_auth_enabled": False, "use_pyqwest_transport": False,
                "parallel_fwdbwd_chunks": False}  # fmt: skip

    @api.post("/client/dynamic_config")
    async def dynamic_config(request: Request) -> dict[str, Any]:
        team_of(request.headers)
        return {}

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/telemetry")
    async def telemetry(request: Request) -> dict[str, str]:
        team_of(request.headers)
        return {"status": "accepted"}  # the SDK's own telemetry: accepted, not kept

    @api.post("/create_session")
    async def create_session(request: Request) -> dict[str, str]:
        team = team_of(request.headers)
        session = await state.create_session(team)
        return {"session_id": session, "type": "create_session"}

    @api.post("/session_heartbeat")
    async def heartbeat(request: Request) -> dict[str, str]:
        team = team_of(request.headers)
        await session_of(team, await body(request, team))
        return {"type": "session_heartbeat"}

    @api.post("/sessions/{session}/finish")
    async def finish(session: str, request: Request) -> dict[str, str]:
        team_of(request.headers)
        return {}

    @api.get("/get_server_capabilities")
    async def capabilities(request: Request) -> dict[str, Any]:
        team = team_of(request.headers)
        bases = [m for m in gateway.visible_models(team) if m.is_base]
        return {"supported_models": [
            {"model_name": m.slug, "max_context_length": m.arch.get("max_context"),
             "trainable": True, "sampleable": True} for m in bases]}  # fmt: skip

    async def session_of(team: str, raw: dict[str, Any]) -> str:
        """The request's session (its idle time restarts); NotFound if not the team's."""
        session = raw.get("session_id")
        if not isinstance(session, str) or await state.session_team(session) != team:
            raise NotFound(f"no session {session!r}: call create_session first")
        return session

    @api.post("/create_model")
    async def create_model(request: Request) -> dict[str, str]:
        team = team_of(request.headers)
        raw = await body(request, team)
        session = await session_of(team, raw)
        n = counter(raw, "model_seq_id")
        base = raw.get("base_model")
        lora, optimizer = mapping(raw, "lora_config"), mapping(raw, "optimizer_config")
        if not isinstance(base, str) or not base:
            raise InvalidArgument("base_model: the name of a base is required")
        rank = lora.get("rank", 32)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise InvalidArgument(f"lora_config.rank: a positive integer, not {rank!r}")
        for part in ("train_mlp", "train_attn", "train_unembed"):
            if lora.get(part, True) is not True:
                raise InvalidArgument(
                    f"lora_config.{part}: Headway's adapters train every projection; leave it true"
                )
        if optimizer.get("type", "adamw") != "adamw":
            raise InvalidArgument("optimizer_config.type: Headway trains with adamw only")
        model_id = f"{session}:train:{n}"
        fork = model_pb2.ForkModelRequest(
            source=base, name=run_slug(model_id), lora=common_pb2.LoraConfig(rank=rank)
        )

        async def work() -> Result:
            await forked(fork, team)
            return Result({"model_id": model_id, "type": "create_model"})

        return {"request_id": await state.submit(team, work, failure)}

    async def forked(fork: model_pb2.ForkModelRequest, team: str) -> None:
        """ForkModel; a retry of one that was made (its reply lost) finds the fork there,
        the team's, from the same source: that is its answer, not ALREADY_EXISTS."""
        try:
            await patiently(lambda: models.ForkModel(fork, metadata=md(team)))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            made = gateway.store.get_model(fork.name)
            full = fork.WhichOneof("mode") == "full" and fork.full
            rank = fork.lora.rank if fork.WhichOneof("mode") == "lora" else None
            if (made.team != team or made.source != fork.source or bool(made.lora) == full
                    or (rank is not None and (made.lora or {}).get("rank") != rank)):  # fmt: skip
                raise

    @api.post("/get_info")
    async def get_info(request: Request) -> dict[str, Any]:
        team = team_of(request.headers)
        raw = await body(request, team)
        slug = run_of(team, raw.get("model_id"))
        record = gateway.model(slug, team)
        base = gateway.store.get_model(record.base)
        lora = record.lora or {}
        return {
            "model_id": raw["model_id"],
            # tokenizer_id: the base's own directory, so get_tokenizer() works offline.
            "model_data": {
                "arch": record.arch.get("model_type"),
                "model_name": base.slug,
                "tokenizer_id": base.path,
            },  # fmt: skip
            "is_lora": bool(record.lora),
            "lora_rank": lora.get("rank"),
            "model_name": base.slug,
            "type": "get_info",
        }

    @api.post("/forward_backward")
    async def forward_backward(request: Request) -> dict[str, str]:
        team = team_of(request.headers)
        if PROTO not in request.headers.get("content-type", ""):
            raise InvalidArgument(f"forward_backward takes a {PROTO} body (the SDK's wire)")
        if request.headers.get("content-encoding"):
            raise InvalidArgument("compressed forward_backward bodies are not accepted")
        try:
            wire = tinker_pb2.TinkerForwardBackwardRequest.FromString(await request.body())
        except DecodeError as e:
            raise InvalidArgument(f"the body is not a ForwardBackwardRequest: {e}") from None
        slug = run_of(team, wire.model_id)
        fb = training_pb2.ForwardBackwardRequest(
            model=slug, loss_fn=loss_name(wire.loss_fn), data=datums(wire.data),
            request_id=secrets.token_hex(12),  # a retry of the call (`patiently`) counts once
        )  # fmt: skip
        for key, value in loss_config(wire).items():
            fb.loss_fn_config[key] = value
        weights = [_weights(item.datum) for item in fb.data]
        if wire.forward_only:
            work = forward(fb, weights, team)
            return {"request_id": await state.submit(team, work, failure, rk(slug), wire.seq_id)}

        async def work() -> Result:
            reply = await patiently(lambda: training.ForwardBackward(fb, metadata=md(team)))
            lps = [from_tensor(t, "logprobs").astype(np.float32) for t in reply.logprobs]
            return Result(proto=fb_output(lps, weights, dict(reply.metrics)).SerializeToString())

        return {"request_id": await state.submit(team, work, failure, rk(slug), wire.seq_id)}

    def forward(
        fb: training_pb2.ForwardBackwardRequest, weights: list[np.ndarray | None], team: str
    ) -> Callable[[], Awaitable[Result]]:
        """Tinker's forward (no gradient): the run's current weights are its head (only
        optim_step changes them, and it runs before this in the run's order), so the
        replicas' ComputeLogprobs of each datum's tokens gives its logprobs (the sampler's
        fp32 forward: the trainer's to 1e-4), and cross_entropy its loss."""
        if fb.loss_fn != "cross_entropy":
            raise InvalidArgument(f"forward computes cross_entropy only, not {fb.loss_fn!r}")
        sequences = [shifted(item.datum, i) for i, item in enumerate(fb.data)]
        req = sampling_pb2.ComputeLogprobsRequest(model=fb.model, sequences=sequences)

        async def work() -> Result:
            reply = await patiently(lambda: gateway.compute_logprobs(req, team, None))
            lps = [from_tensor(t, "logprobs").astype(np.float32) for t in reply.logprobs]
            loss = sum(float(-(lp * (w if w is not None else 1.0)).sum())
                       for lp, w in zip(lps, weights, strict=True))  # fmt: skip
            return Result(proto=fb_output(lps, weights, {"loss:sum": loss}).SerializeToString())

        return work

    @api.post("/optim_step")
    async def optim_step(request: Request) -> dict[str, str]:
        team = team_of(request.headers)
        raw = await body(request, team)
        slug = run_of(team, raw.get("model_id"))
        if raw.get("optimizer_params") is not None:
            raise InvalidArgument("optimizer_params: Headway trains with adam_params only")
        adam = adam_params(raw.get("adam_params"))
        step = training_pb2.OptimStepRequest(
            model=slug, adam=adam, request_id=secrets.token_hex(12)
        )  # a retry of the call (`patiently`) counts once

        async def work() -> Result:
            reply = await patiently(lambda: training.OptimStep(step, metadata=md(team)))
            return Result({"metrics": {"step:max": float(reply.step)}, "type": "optim_step"})

        return {"request_id": await state.submit(team, work, failure, rk(slug), _seq(raw))}

    @api.post("/save_weights_for_sampler")
    async def save_for_sampler(request: Request) -> dict[str, str]:
        team = team_of(request.headers)
        raw = await body(request, team)
        model_id = raw.get("model_id")
        slug = run_of(team, model_id)
        name = raw.get("path")
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise InvalidArgument(f"path {name!r}: a name without '/'")
        sampling_n = counter(raw, "sampling_session_seq_id") if name is None else 0

        run = rk(slug)

        async def work() -> Result:
            head = gateway.store.head(slug)  # the weights the run's last optim_step made
            if name is not None:
                await state.name(run, f"sampler_weights/{name}", head)
                return Result({"path": f"tinker://{model_id}/sampler_weights/{name}"})
            session = str(model_id).split(":")[0]
            sid = f"{session}:sample:{sampling_n}"
            base = gateway.model(slug, team).base
            await state.put_sampler(sid, SamplingSession(team, slug, head, base))
            return Result({"sampling_session_id": sid})

        return {"request_id": await state.submit(team, work, failure, run, _seq(raw))}

    async def checkpoint_of(team: str, path: Any) -> tuple[str, str]:
        """(fork, checkpoint) a tinker:// path names; NotFound if not the team's."""
        model_id, kind, name = parse_path(path)
        slug = run_of(team, model_id)
        checkpoint = await state.named(rk(slug), f"{kind}/{name}")
        if checkpoint is None:
            raise NotFound(f"no checkpoint {path!r}: save_state or save_weights_for_sampler")
        return slug, checkpoint

    async def naming(request: Request) -> tuple[str, dict[str, Any], str, str, str]:
        """(team, body, run id, fork, name) of a call that names the run's head."""
        team = team_of(request.headers)
        raw = await body(request, team)
        model_id = raw.get("model_id")
        slug = run_of(team, model_id)
        name = raw.get("path")
        if not isinstance(name, str) or not name or "/" in name:
            raise InvalidArgument(f"path {name!r}: a name without '/'")
        return team, raw, model_id, slug, name

    @api.post("/save_weights")
    async def save_weights(request: Request) -> dict[str, str]:
        """save_state: names the run's head, whose files hold its weights and optimizer
        state (every optim_step made one)."""
        team, raw, model_id, slug, name = await naming(request)

        run = rk(slug)

        async def work() -> Result:
            await state.name(run, f"weights/{name}", gateway.store.head(slug))
            return Result({"path": f"tinker://{model_id}/weights/{name}", "type": "save_weights"})

        return {"request_id": await state.submit(team, work, failure, run, _seq(raw))}

    @api.post("/save_weights_external")
    async def save_weights_external(request: Request) -> dict[str, str]:
        """save_weights_external: names the run's head as external weights, which download
        (`external_weights_urls`) as the PEFT adapter of that checkpoint, read from the
        store when a URL is fetched: nothing is copied. Encrypted exports are not offered."""
        team, raw, model_id, slug, name = await naming(request)
        if raw.get("age_encryption_recipients"):
            raise InvalidArgument(
                "age_encryption_recipients: Headway does not encrypt exports; the files stay "
                "on your own store (leave it unset)"
            )
        ttl = raw.get("ttl_seconds")
        if ttl is not None:
            ttl = number(raw, "ttl_seconds", int, *EXPORT_TTL)
        record = gateway.model(slug, team)
        if not record.lora:
            raise FailedPrecondition(
                f"training run {model_id!r} is a full fork: its external weights are not "
                "exported over the API yet (`headway models export --format hf` on the "
                "store's machine)"
            )
        if record.frozen and not gateway.store.get_model(record.frozen.model).is_base:
            raise FailedPrecondition(
                f"training run {model_id!r} adapts the trained weights of "
                f"{record.frozen.model!r}, not a base: its adapter alone does not reproduce "
                "it; export the merged model (`headway models export --format hf`)"
            )
        run = rk(slug)

        async def work() -> Result:
            head = gateway.store.head(slug)
            await state.name(run, f"external_weights/{name}", head, ttl)
            return Result({"path": f"tinker://{model_id}/external_weights/{name}",
                           "type": "save_weights_external"})  # fmt: skip

        return {"request_id": await state.submit(team, work, failure, run, _seq(raw))}

    def peft_files(slug: str, checkpoint: str) -> dict[str, Path]:
        """The PEFT adapter files of a LoRA checkpoint in the store."""
        target = gateway.store.resolve(slug, checkpoint)
        if target.kind != "lora":
            raise FailedPrecondition(f"checkpoint {checkpoint} of {slug} holds no LoRA adapter")
        folder = gateway.store.files_dir(target)
        return {name: folder / name for name in PEFT_FILES}

    @api.get("/training_runs/{rid}/checkpoints/{kind}/{name}/external_weights_urls")
    async def external_weights_urls(
        rid: str, kind: str, name: str, request: Request
    ) -> dict[str, Any]:
        """Signed URLs (a random token each, kept in Redis for URL_SECONDS: any gateway
        serves it, no key needed) to the files of an external weights checkpoint."""
        team = team_of(request.headers)
        if kind != "external_weights":
            raise InvalidArgument(
                f"{kind}/{name}: only external weights download "
                "(save_weights_external, tinker://<run>/external_weights/<name>)"
            )
        slug, checkpoint = await checkpoint_of(team, f"tinker://{rid}/{kind}/{name}")
        files = peft_files(slug, checkpoint)
        grant = {"team": team, "model": slug, "checkpoint": checkpoint, "run": rk(slug),
                 "path": f"{kind}/{name}"}  # fmt: skip
        token, left = await state.grant_download(grant, URL_SECONDS)
        root = str(request.base_url).rstrip("/")
        expires = datetime.now(UTC).timestamp() + left
        return {"urls": {f: f"{root}/api/v1/downloads/{token}/{f}" for f in files},
                "expires": iso(expires)}  # fmt: skip

    @api.get("/downloads/{token}/{file}")
    async def download(token: str, file: str) -> Response:
        """One file of a signed URL: the token is the credential."""
        grant = await state.download(token)
        if grant is None:
            raise NotFound("this download URL is unknown or expired: ask for new URLs")
        gateway.model(grant["model"], grant["team"])  # the run may have been deleted since
        if await state.named(grant["run"], grant["path"]) != grant["checkpoint"]:
            raise NotFound(f"{grant['path']} was deleted or expired: its URLs with it")
        path = peft_files(grant["model"], grant["checkpoint"]).get(file)
        if path is None:
            raise NotFound(f"{file!r} is not a file of this export")
        return FileResponse(path, media_type="application/octet-stream", filename=file)

    @api.put("/training_runs/{rid}/checkpoints/{kind}/{name}/ttl")
    async def checkpoint_ttl(rid: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        """A checkpoint name's lifetime from now (ttl_seconds; null: none of its own)."""
        team = team_of(request.headers)
        raw = await body(request, team)
        ttl = raw.get("ttl_seconds")
        if ttl is not None:
            ttl = number(raw, "ttl_seconds", int, *EXPORT_TTL)
        if kind not in KINDS or not await state.set_ttl(
            rk(run_of(team, rid)), f"{kind}/{name}", ttl
        ):
            raise NotFound(f"no checkpoint {kind}/{name!r} in training run {rid!r}")
        return {}

    @api.post("/load_weights")
    async def load_weights(request: Request) -> dict[str, str]:
        """create_training_client_from_state(_with_optimizer): a new run, the fork of the
        path's run from that checkpoint (its adapter or weights continued, and its optimizer
        state if asked). load_state(_with_optimizer) into a run: that run's head moved back
        to one of its own checkpoints (weights and optimizer state, Headway's SetHead)."""
        team = team_of(request.headers)
        raw = await body(request, team)
        optimizer = bool(raw.get("optimizer"))
        source, checkpoint = await checkpoint_of(team, raw.get("path"))
        if raw.get("model_id") is not None:  # load into an existing run
            slug = run_of(team, raw["model_id"])
            if source != slug or not optimizer:
                raise InvalidArgument(
                    "load_state into a run restores one of its own checkpoints with its "
                    "optimizer state (load_state_with_optimizer); for another run's "
                    "checkpoint or weights alone, use create_training_client_from_state"
                )
            head = model_pb2.SetHeadRequest(model=slug, checkpoint=checkpoint)

            async def move() -> Result:
                await patiently(lambda: models.SetHead(head, metadata=md(team)))
                return Result({"path": raw["path"], "type": "load_weights"})

            return {"request_id": await state.submit(team, move, failure, rk(slug), _seq(raw))}
        session = await session_of(team, raw)
        n = counter(raw, "model_seq_id")
        full = not gateway.model(source, team).lora
        fork = model_pb2.ForkModelRequest(
            source=source, name=run_slug(f"{session}:train:{n}"), checkpoint=checkpoint,
            with_optimizer=optimizer, full=full,
        )  # fmt: skip

        async def work() -> Result:
            await forked(fork, team)
            return Result({"path": raw["path"], "type": "load_weights"})

        return {"request_id": await state.submit(team, work, failure)}

    @api.post("/create_sampling_session")
    async def create_sampling_session(request: Request) -> dict[str, str]:
        team = team_of(request.headers)
        raw = await body(request, team)
        session = await session_of(team, raw)
        sid = f"{session}:sample:{counter(raw, 'sampling_session_seq_id')}"
        path, base = raw.get("model_path"), raw.get("base_model")
        if path:
            slug, checkpoint = await checkpoint_of(team, path)
            base_of = gateway.model(slug, team).base
            target = SamplingSession(team, slug, checkpoint, base_of, path)
        elif isinstance(base, str) and base:
            record = gateway.model(base, team)
            # "": the model's head when each sample starts
            target = SamplingSession(team, base, "", record.base)
        else:
            raise InvalidArgument("give model_path (tinker://...) or base_model")
        await state.put_sampler(sid, target)
        return {"sampling_session_id": sid, "type": "create_sampling_session"}

    @api.get("/samplers/{sid}")
    async def sampler(sid: str, request: Request) -> dict[str, Any]:
        team = team_of(request.headers)
        target = await state.sampler(sid, team)
        return {"sampler_id": sid, "base_model": target.base, "model_path": target.path or None}

    @api.post("/asample")
    async def asample(request: Request) -> dict[str, Any]:
        team = team_of(request.headers)
        raw = await body(request, team)
        sid = raw.get("sampling_session_id")
        if not isinstance(sid, str):
            raise InvalidArgument("sampling_session_id: a string is required")
        target = await state.sampler(sid, team)
        req, n, asked = sample_request(raw, target)

        async def work() -> Result:
            reply = await patiently(lambda: gateway.sample(req, team, None))
            return Result(proto=sample_output(reply, asked).SerializeToString())

        request_id = await state.submit(team, work, failure)
        return {"request_id": request_id, "sample_sequence_ids": [
            f"{request_id}-{i}" for i in range(n)]}  # fmt: skip

    # ------------------------------------------------------------ RestClient
    async def run_json(record: Any) -> dict[str, Any]:
        """A fork as Tinker's TrainingRun, its latest named checkpoints with it."""
        rid = run_id(record.slug)
        named = await checkpoints_json(record.slug)
        latest = {kind: max((c for c in named if c["checkpoint_type"] == kind),
                            key=lambda c: c["time"], default=None)
                  for kind in ("training", "sampler")}  # fmt: skip
        head = gateway.store.head_checkpoint(record.slug)
        return {
            "training_run_id": rid, "base_model": record.base,
            "model_owner": record.team or "local", "is_lora": bool(record.lora),
            "lora_rank": (record.lora or {}).get("rank"), "corrupted": False,
            "last_request_time": iso(head.created), "last_checkpoint": latest["training"],
            "last_sampler_checkpoint": latest["sampler"],
        }  # fmt: skip

    async def checkpoints_json(slug: str) -> list[dict[str, Any]]:
        """A fork's named checkpoints as Tinker's Checkpoints, oldest first."""
        rid = run_id(slug)
        out = [
            {"checkpoint_id": path,
             "checkpoint_type": KINDS[path.split("/")[0]],
             "time": iso(v["time"]), "tinker_path": f"tinker://{rid}/{path}", "public": False}
            for path, v in (await state.names(rk(slug))).items()
        ]  # fmt: skip
        return sorted(out, key=lambda c: c["time"])

    def forks(team: str) -> list[Any]:
        models = [m for m in gateway.visible_models(team) if not m.is_base]
        return sorted(models, key=lambda m: m.created, reverse=True)

    def page(request: Request, default: int) -> tuple[int, int]:
        try:
            limit = int(request.query_params.get("limit", default))
            offset = int(request.query_params.get("offset", 0))
        except ValueError:
            raise InvalidArgument("limit and offset: integers") from None
        if limit < 1 or offset < 0:
            raise InvalidArgument("limit >= 1 and offset >= 0")
        return limit, offset

    @api.get("/training_runs")
    async def training_runs(request: Request) -> dict[str, Any]:
        team = team_of(request.headers)
        limit, offset = page(request, 20)
        runs = forks(team)
        chosen = runs[offset : offset + limit]
        cursor = {"offset": offset, "limit": limit, "total_count": len(runs)}
        return {"training_runs": [await run_json(m) for m in chosen], "cursor": cursor}

    @api.get("/training_runs/{rid}")
    async def training_run(rid: str, request: Request) -> dict[str, Any]:
        team = team_of(request.headers)
        return await run_json(gateway.model(run_of(team, rid), team))

    @api.get("/training_runs/{rid}/checkpoints")
    async def run_checkpoints(rid: str, request: Request) -> dict[str, Any]:
        team = team_of(request.headers)
        return {"checkpoints": await checkpoints_json(run_of(team, rid))}

    @api.delete("/training_runs/{rid}/checkpoints/{path:path}")
    async def delete_checkpoint(rid: str, path: str, request: Request) -> dict[str, Any]:
        """Forgets the name; the step's checkpoint stays in the fork's tree."""
        team = team_of(request.headers)
        if not await state.forget(rk(run_of(team, rid)), path):
            raise NotFound(f"no checkpoint {path!r} in training run {rid!r}")
        return {}

    @api.get("/checkpoints")
    async def user_checkpoints(request: Request) -> dict[str, Any]:
        team = team_of(request.headers)
        limit, offset = page(request, 100)
        named = [c for m in forks(team) for c in await checkpoints_json(m.slug)]
        cursor = {"offset": offset, "limit": limit, "total_count": len(named)}
        return {"checkpoints": named[offset : offset + limit], "cursor": cursor}

    @api.post("/weights_info")
    async def weights_info(request: Request) -> dict[str, Any]:
        team = team_of(request.headers)
        slug, _ = await checkpoint_of(team, (await body(request, team)).get("tinker_path"))
        record = gateway.model(slug, team)
        return {"base_model": record.base, "is_lora": bool(record.lora),
                "lora_rank": (record.lora or {}).get("rank")}  # fmt: skip

    @api.post("/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        team = team_of(request.headers)
        request_id = (await body(request, team)).get("request_id")
        if not isinstance(request_id, str):
            raise InvalidArgument("request_id: a string is required")
        result = await state.retrieve(request_id, team)
        if result is None:  # still running: the SDK polls again at once
            return JSONResponse({"type": "try_again", "queue_state": "active"})
        if result.proto is not None:
            return Response(result.proto, media_type=PROTO)
        return JSONResponse(result.json)

    return api


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(raw: dict[str, Any], key: str, kind: type, low: float, high: float) -> Any:
    """raw[key] as a finite int or float in [low, high]; InvalidArgument naming it
    otherwise (bools, strings, huge integers and NaN included)."""
    value = raw[key]
    ok = is_int(value) if kind is int else is_int(value) or isinstance(value, float)
    try:
        ok = ok and math.isfinite(float(value)) and low <= value <= high
    except OverflowError:
        ok = False
    if not ok:
        raise InvalidArgument(f"{key}: a number in [{low}, {high}], not {str(value)[:40]}")
    return kind(value)


def mapping(raw: dict[str, Any], key: str) -> dict[str, Any]:
    """An object field (absent or null: empty)."""
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{key}: an object is required, not {value!r}")
    return value


def counter(raw: dict[str, Any], key: str) -> int:
    """A non-negative integer field the SDK counts with (model_seq_id, ...)."""
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"{key}: a non-negative integer is required, not {value!r}")
    return value


def _seq(raw: dict[str, Any]) -> int:
    """The operation's seq_id in the run (0: none)."""
    seq = raw.get("seq_id")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else 0


def loss_name(name: str) -> str:
    if name not in LOSSES:
        raise InvalidArgument(f"loss_fn {name!r}: Headway has {', '.join(LOSSES)}")
    return name


def loss_config(wire: tinker_pb2.TinkerForwardBackwardRequest) -> dict[str, float]:
    out = dict(wire.loss_fn_config)
    for key, value in wire.loss_fn_config_v2.items():
        if value.WhichOneof("value") == "text":
            raise InvalidArgument(f"loss_fn_config[{key!r}]: text settings are not accepted")
        out[key] = value.number
    return out


def tensor(t: tinker_pb2.TinkerTensor, where: str, length: int) -> np.ndarray:
    """A TensorData's values (dense or CSR) as a numpy array of its shape, which must hold
    `length` elements (the datum's tokens: a sparse shape is never trusted further)."""
    dtype = DTYPES.get(t.dtype)
    if dtype is None:
        raise InvalidArgument(f"{where}: dtype {t.dtype} is not float32, int64 or int32")
    if t.WhichOneof("encoding") == "sparse_csr":
        csr, shape = t.sparse_csr, tuple(t.shape)
        if len(shape) != 2 or min(shape) < 0 or math.prod(shape) != length:
            raise InvalidArgument(
                f"{where}: a sparse tensor needs a 2-D shape of {length} elements, the "
                f"datum's tokens, not {list(shape)}"
            )
        try:
            values = np.frombuffer(csr.values, dtype)
            crow = np.frombuffer(csr.crow_indices, np.int64)
            col = np.frombuffer(csr.col_indices, np.int64)
        except ValueError as e:
            raise InvalidArgument(f"{where}: {e}") from None
        sizes = np.diff(crow)
        bad_rows = len(crow) != shape[0] + 1 or crow[0] != 0 or (sizes < 0).any()
        bad_cols = len(col) != len(values) or ((col < 0) | (col >= shape[1])).any()
        if bad_rows or bad_cols or crow[-1] != len(values):
            raise InvalidArgument(f"{where}: inconsistent sparse indices")
        out = np.zeros(shape, dtype)
        out[np.repeat(np.arange(shape[0]), sizes), col] = values
        return out
    raw = t.dense
    if len(raw) % np.dtype(dtype).itemsize:
        raise InvalidArgument(f"{where}: {len(raw)} bytes is not a whole number of elements")
    values = np.frombuffer(raw, dtype)
    shape = tuple(t.shape) or (len(values),)
    if min(shape, default=0) < 0 or math.prod(shape) != len(values):
        raise InvalidArgument(f"{where}: shape {list(shape)} does not hold {len(values)} values")
    if len(values) != length:
        raise InvalidArgument(
            f"{where}: {len(values)} values for {length} input tokens: give one per token"
        )
    return values.reshape(shape)


def datums(data: Any) -> list[common_pb2.TrainingItem]:
    """Tinker Datums as Headway training items (one 1-D sequence each)."""
    items = []
    for i, d in enumerate(data):
        tokens = []
        for chunk in d.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise InvalidArgument(
                    f"data[{i}].model_input: only encoded text chunks are accepted (Headway's "
                    "bases read text)"
                )
            tokens.append(np.frombuffer(chunk.encoded_text.tokens, np.int32))
        inputs = d.loss_fn_inputs
        if "target_tokens" not in inputs:
            raise InvalidArgument(f"data[{i}].loss_fn_inputs.target_tokens is required")
        ids = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
        datum = common_pb2.Datum(input_tokens=to_tensor(ids.astype(np.int32)))
        names = {"target_tokens": "target_tokens", "weights": "weights",
                 "logprobs": "sampling_logprobs", "advantages": "advantages"}  # fmt: skip
        for key, value in inputs.items():
            if key not in names:
                raise InvalidArgument(f"data[{i}].loss_fn_inputs[{key!r}] is not accepted")
            where = f"data[{i}].loss_fn_inputs[{key!r}]"
            array = tensor(value, where, len(ids)).reshape(-1)
            kind = np.int64 if key == "target_tokens" else np.float32
            getattr(datum, names[key]).CopyFrom(to_tensor(array.astype(kind)))
        items.append(common_pb2.TrainingItem(datum=datum))
    return items


def shifted(d: common_pb2.Datum, i: int) -> common_pb2.Tensor:
    """The one sequence whose next-token logprobs are a datum's: its input tokens and the
    last target, when every other target is the next input token (as a forward of a
    language model reads them; other targets cannot be scored this way)."""
    inputs = from_tensor(d.input_tokens, "input_tokens").astype(np.int64)
    targets = from_tensor(d.target_tokens, "target_tokens").astype(np.int64)
    if len(targets) != len(inputs) or not np.array_equal(targets[:-1], inputs[1:]):
        raise InvalidArgument(
            f"data[{i}]: forward scores target_tokens that are the input shifted by one "
            "(target_tokens[i] = input[i + 1]), with one target per input token"
        )
    return to_tensor(np.concatenate([inputs, targets[-1:]]).astype(np.int32))


def _weights(d: common_pb2.Datum) -> np.ndarray | None:
    return from_tensor(d.weights, "weights") if d.HasField("weights") else None


def batched(arrays: list[np.ndarray]) -> tinker_pb2.TinkerBatchedTensor:
    """float32 arrays of each datum as one BatchedTensor (byte offsets)."""
    sizes = [a.astype(np.float32).nbytes for a in arrays]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    data = b"".join(a.astype(np.float32).tobytes() for a in arrays)
    return tinker_pb2.TinkerBatchedTensor(
        data=data, offsets=offsets.tobytes(), dtype=tinker_pb2.TINKER_DTYPE_FLOAT32
    )


def fb_output(
    lps: list[np.ndarray], weights: list[np.ndarray | None], metrics: dict[str, float]
) -> tinker_pb2.TinkerForwardBackwardOutput:
    """Headway's per-datum logprobs and metrics as Tinker's output: logprobs and the
    cross-entropy elementwise loss per datum, metrics named "name:reduction"."""
    losses = [-lp * (w if w is not None else 1.0) for lp, w in zip(lps, weights, strict=True)]
    record = tinker_pb2.TinkerArrayRecord(type_tag="ArrayRecord", num_datums=len(lps))
    record.fields["logprobs"].CopyFrom(batched(lps))
    record.fields["elementwise_loss"].CopyFrom(batched(losses))
    out = tinker_pb2.TinkerForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    out.loss_fn_outputs.append(record)
    for key, value in metrics.items():  # Headway's names, with the reduction the SDK needs
        name, _, reduction = key.partition(":")
        if reduction not in REDUCTIONS:
            name, reduction = key.replace(":", "_"), "sum" if key in SUMMED else "mean"
        out.metrics[f"{name}:{reduction}"] = value
    return out


def adam_params(raw: Any) -> common_pb2.AdamParams:
    if not isinstance(raw, dict):
        raise InvalidArgument("adam_params: an object with learning_rate is required")
    out = common_pb2.AdamParams()
    for key in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
        if raw.get(key) is not None:  # the trainer checks each one's range
            setattr(out, key, number(raw, key, float, -1e30, 1e30))
    return out


def sample_request(
    raw: dict[str, Any], target: SamplingSession
) -> tuple[sampling_pb2.SampleRequest, int, Asked]:
    """Headway's SampleRequest for an asample body; (request, samples, what else it asks)."""
    n = raw.get("num_samples", 1)
    if not is_int(n) or not 1 <= n <= MAX_SAMPLES:
        raise InvalidArgument(f"num_samples: an integer in [1, {MAX_SAMPLES}], not {n!r}")
    if raw.get("prompt_alt_tokens_k"):
        raise InvalidArgument("prompt_alt_tokens_k: not served by Headway yet; leave it 0")
    # One count of most likely tokens serves both (each reply keeps its own k of them).
    topk = {key: number(raw, key, int, 0, MAX_TOP_LOGPROBS) if raw.get(key) is not None else 0
            for key in ("topk_prompt_logprobs", "topk_sample_logprobs")}  # fmt: skip
    for unserved in ("target_prompt_logprobs", "prompt_logprobs_last_n"):
        if raw.get(unserved) is not None:
            raise InvalidArgument(f"{unserved}: not served by Headway yet; leave it unset")
    chunks = mapping(raw, "prompt").get("chunks") or []
    if not isinstance(chunks, list) or not all(isinstance(c, dict) for c in chunks):
        raise InvalidArgument("prompt.chunks: a list of chunk objects is required")
    tokens: list[int] = []
    for i, chunk in enumerate(chunks):
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise InvalidArgument(f"prompt.chunks[{i}]: only encoded text chunks are accepted")
        ids = chunk.get("tokens") or []
        if not isinstance(ids, list) or not all(is_int(t) and 0 <= t < 2**31 for t in ids):
            raise InvalidArgument(f"prompt.chunks[{i}].tokens: a list of token ids")
        tokens += ids
    p = mapping(raw, "sampling_params")
    params = common_pb2.SamplingParams(n=n, top_logprobs=max(topk.values()))
    if p.get("max_tokens") is not None:
        params.max_tokens = number(p, "max_tokens", int, 0, 2**31 - 1)
    if p.get("temperature") is not None:
        params.temperature = number(p, "temperature", float, 0.0, 1e6)
    if p.get("top_p") is not None:
        params.top_p = number(p, "top_p", float, 0.0, 1.0)
    if p.get("top_k") not in (None, -1):  # -1: no limit, Headway's 0
        params.top_k = number(p, "top_k", int, 0, 2**31 - 1)
    if p.get("seed") is not None:
        params.seed = number(p, "seed", int, -(2**63), 2**63 - 1)
    stop = p.get("stop")
    if stop == []:  # the SDK's "stop on nothing", not even the end-of-sequence token
        params.ignore_eos = True
    elif isinstance(stop, str):
        params.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        params.stop.extend(stop)
    elif isinstance(stop, list) and all(is_int(s) and 0 <= s < 2**31 for s in stop):
        params.stop_token_ids.extend(stop)
    elif stop is not None:
        raise InvalidArgument("sampling_params.stop: a string, strings, or token ids")
    req = sampling_pb2.SampleRequest(
        model=target.slug, checkpoint=target.checkpoint, params=params,
        prompt_tokens=to_tensor(np.asarray(tokens, np.int32)),
        include_prompt_logprobs=bool(raw.get("prompt_logprobs") or topk["topk_prompt_logprobs"]),
    )  # fmt: skip
    return req, n, Asked(bool(raw.get("prompt_logprobs")), **topk)


@dataclass
class Asked:
    """The logprobs an asample asked for beside the sampled ones."""

    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0


MASK_LOGPROB = -99999.0  # Tinker's empty top-k slot (with token 0)


def topk_message(
    ids: common_pb2.Tensor, lps: common_pb2.Tensor, k: int, first_masked: bool = False
) -> Any:
    """Tinker's TopkLogprobs of Headway's [T, K] tensors, the first k columns (`first_masked`:
    a first row of sentinels for the prompt's first position)."""
    top_ids = from_tensor(ids, "top_token_ids").astype(np.int32)[:, :k]
    top_lps = from_tensor(lps, "top_logprobs").astype(np.float32)[:, :k]
    if first_masked:
        top_ids = np.concatenate([np.zeros((1, top_ids.shape[1]), np.int32), top_ids])
        top_lps = np.concatenate(
            [np.full((1, top_lps.shape[1]), MASK_LOGPROB, np.float32), top_lps]
        )
    return tinker_pb2.TinkerTopkLogprobs(
        token_ids=np.ascontiguousarray(top_ids).tobytes(),
        logprobs=np.ascontiguousarray(top_lps).tobytes(),
        k=top_ids.shape[1], length=top_ids.shape[0],
    )  # fmt: skip


def sample_output(reply: sampling_pb2.SampleResponse, asked: Asked) -> Any:
    """Headway's SampleResponse as Tinker's (int32 tokens, float32 logprobs)."""
    out = tinker_pb2.TinkerSampleResponse()
    for seq in reply.sequences:
        out.sequences.append(tinker_pb2.TinkerSampledSequence(
            stop_reason=(tinker_pb2.TINKER_STOP_REASON_LENGTH
                         if seq.stop_reason == sampling_pb2.STOP_REASON_LENGTH
                         else tinker_pb2.TINKER_STOP_REASON_STOP),
            tokens=from_tensor(seq.tokens, "tokens").astype(np.int32).tobytes(),
            logprobs=from_tensor(seq.logprobs, "logprobs").astype(np.float32).tobytes(),
        ))  # fmt: skip
        if asked.topk_sample_logprobs and seq.HasField("top_token_ids"):
            out.sequences[-1].topk_sampled_logprobs.CopyFrom(
                topk_message(seq.top_token_ids, seq.top_logprobs, asked.topk_sample_logprobs)
            )
    if asked.prompt_logprobs and reply.HasField("prompt_logprobs"):
        lps = from_tensor(reply.prompt_logprobs, "prompt_logprobs").astype(np.float32)
        out.prompt_logprobs = np.concatenate([[np.nan], lps]).astype(np.float32).tobytes()
    if asked.topk_prompt_logprobs and reply.HasField("prompt_top_token_ids"):
        out.topk_prompt_logprobs.CopyFrom(topk_message(
            reply.prompt_top_token_ids, reply.prompt_top_logprobs, asked.topk_prompt_logprobs,
            first_masked=True,
        ))  # fmt: skip
    return out


__all__ = ["bearer", "create_router"]
