"""Checkpoint lifecycle (issue 17 §4): deleting one checkpoint, pruning by a retention
policy (now, or after every step), and the store's bytes per model and team. The head,
the root, tagged checkpoints and checkpoints other models are built on always stay, and a
delete that would remove one is refused with the reason, changing nothing."""

from __future__ import annotations

import grpc
import pytest

from headway.cli import main
from headway.errors import InvalidArgument
from headway.store.records import CheckpointRecord
from headway.store.retention import Retention, kept
from headway.v1 import common_pb2, model_pb2, training_pb2
from tests.helpers_training import adam, batch, train_steps
from tests.stack import team_md


def _record(step: int, parent: str, step_no: int | None = None) -> CheckpointRecord:
    return CheckpointRecord(
        id=f"c{step}",
        model="m",
        kind="lora",
        step=step if step_no is None else step_no,
        created=float(step),
        parent_id=parent,
    )


def test_the_policy_keeps_what_each_rule_names():
    records = [_record(0, "")] + [_record(s, f"c{s - 1}") for s in range(1, 10)]
    head = "c6"  # rolled back: c7..c9 are a branch no longer on the head's lineage
    protected = {"c2": "tagged 'best'"}
    assert set(kept(records, Retention(), head, protected)) == {r.id for r in records}
    got = kept(records, Retention(keep_last=2), head, protected)
    assert got == {"c6": "head", "c5": "the previous head", "c2": "tagged 'best'", "c0": "root",
                   "c9": "one of the last 2", "c8": "one of the last 2"}  # fmt: skip
    every = kept(records, Retention(keep_every=4), head, {})
    assert set(every) == {"c6", "c5", "c0", "c4", "c8"}
    assert set(kept(records, Retention(keep_lineage=3), head, {})) == {"c6", "c0", "c5", "c4", "c3"}
    # After a rollback to c3 and two steps from there (c10, c11), the newest are those.
    branch = [*records, _record(10, "c3", step_no=4), _record(11, "c10", step_no=5)]
    assert set(kept(branch, Retention(keep_last=2), "c11", {})) == {"c11", "c10", "c0"}
    with pytest.raises(InvalidArgument, match="keep_last must be >= 0"):
        Retention(keep_last=-1)


def _ids(stack, model: str) -> list[str]:
    listed = stack.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model=model))
    return [c.id for c in listed.checkpoints]


def _refused(call, code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert words in err.value.details(), err.value.details()


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_delete_one_checkpoint_and_what_is_refused(trainer_stack, full):
    stack = trainer_stack
    stack.fork("m", full=full)
    stack.fork("theirs", team="other")
    root = stack.trainer.store.root_checkpoint("m").id
    c1, c2, c3, c4 = train_steps(stack, "m", 4)
    stack.models.TagCheckpoint(model_pb2.TagCheckpointRequest(model="m", checkpoint=c2, tag="best"))
    fork = model_pb2.ForkModelRequest(source="m", name="f", checkpoint=c3)
    if full:
        fork.full = True
    stack.models.ForkModel(fork)  # f's root references c3's files

    def delete(ckpt: str, model: str = "m", team: str = ""):
        request = model_pb2.DeleteCheckpointRequest(model=model, checkpoint=ckpt)
        return lambda: stack.models.DeleteCheckpoint(request, metadata=team_md(team))

    before = _ids(stack, "m")
    failed = grpc.StatusCode.FAILED_PRECONDITION
    _refused(delete(c4), failed, "the model's head")
    _refused(delete(root), failed, "the model's root")
    _refused(delete("best"), failed, "tagged 'best'")
    _refused(delete(c3), failed, "models f are built on it")
    _refused(delete("s000009-00000000"), grpc.StatusCode.NOT_FOUND, "not found")
    _refused(delete(""), grpc.StatusCode.INVALID_ARGUMENT, "checkpoint is empty")
    _refused(delete(c1, team="other"), grpc.StatusCode.NOT_FOUND, "")
    theirs = stack.trainer.store.head("theirs")
    _refused(delete(theirs, model="theirs"), grpc.StatusCode.NOT_FOUND, "")
    assert _ids(stack, "m") == before
    freed = delete(c1)().freed_bytes
    assert freed > 0 and _ids(stack, "m") == [i for i in before if i != c1]
    # Its child keeps it as parent; the model trains on, and every kept node restores.
    listed = stack.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model="m"))
    assert next(c for c in listed.checkpoints if c.id == c2).parent_id == c1
    stack.models.SetHead(model_pb2.SetHeadRequest(model="m", checkpoint=c2))
    assert train_steps(stack, "m", 1)


def test_prune_now_and_after_every_step(trainer_stack):
    stack = trainer_stack
    stack.fork("m", full=True)
    root = stack.trainer.store.root_checkpoint("m").id
    ids = train_steps(stack, "m", 5)
    stack.models.TagCheckpoint(
        model_pb2.TagCheckpointRequest(model="m", checkpoint=ids[0], tag="first")
    )
    sizes = stack.models.ListModels(model_pb2.ListModelsRequest(with_size=True))
    size = {m.slug: m.store_bytes for m in sizes.models}
    assert size["m"] > 0 and size["tiny"] == 0
    policy = common_pb2.RetentionPolicy(keep_last=2)
    dry = stack.models.PruneCheckpoints(
        model_pb2.PruneCheckpointsRequest(model="m", policy=policy, dry_run=True)
    )
    assert list(dry.deleted) == ids[1:3] and dry.freed_bytes > 0
    assert dict(dry.kept) == {
        root: "root",
        ids[0]: "tagged 'first'",
        ids[3]: "the previous head",
        ids[4]: "head",
    }
    assert _ids(stack, "m") == [root, *ids]  # a dry run deletes nothing
    done = stack.models.PruneCheckpoints(
        model_pb2.PruneCheckpointsRequest(model="m", policy=policy)
    )
    assert list(done.deleted) == ids[1:3] and done.freed_bytes == dry.freed_bytes
    assert _ids(stack, "m") == [root, ids[0], ids[3], ids[4]]
    after = stack.models.ListModels(model_pb2.ListModelsRequest(with_size=True))
    assert {m.slug: m.store_bytes for m in after.models}["m"] == size["m"] - done.freed_bytes
    # The model's own policy: applied now and after every step.
    model = stack.models.SetRetention(
        model_pb2.SetRetentionRequest(model="m", policy=common_pb2.RetentionPolicy(keep_last=1))
    )
    assert model.retention.keep_last == 1
    more = train_steps(stack, "m", 3)
    # Each step prunes what is fully written; the last step's parent may still be in its
    # background fsync, so it goes at the next prune.
    stack.trainer.store.syncer.wait()
    stack.models.PruneCheckpoints(model_pb2.PruneCheckpointsRequest(model="m"))
    assert _ids(stack, "m") == [root, ids[0], more[-2], more[-1]]  # the previous head stays
    stack.models.SetHead(model_pb2.SetHeadRequest(model="m", checkpoint="first"))
    assert train_steps(stack, "m", 1)


def test_bad_prunes_are_refused(trainer_stack):
    stack = trainer_stack
    stack.fork("m")
    train_steps(stack, "m", 2)
    before = _ids(stack, "m")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    _refused(
        lambda: stack.models.PruneCheckpoints(model_pb2.PruneCheckpointsRequest(model="m")),
        invalid,
        "no retention rule",
    )
    negative = common_pb2.RetentionPolicy(keep_every=-2)
    _refused(
        lambda: stack.models.PruneCheckpoints(
            model_pb2.PruneCheckpointsRequest(model="m", policy=negative)
        ),
        invalid,
        "keep_every must be >= 0",
    )
    _refused(
        lambda: stack.models.SetRetention(
            model_pb2.SetRetentionRequest(model="m", policy=negative)
        ),
        invalid,
        "keep_every must be >= 0",
    )
    _refused(
        lambda: stack.models.PruneCheckpoints(
            model_pb2.PruneCheckpointsRequest(
                model="tiny", policy=common_pb2.RetentionPolicy(keep_last=1)
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "",
    )
    assert _ids(stack, "m") == before


def test_prune_and_sizes_from_the_cli(gateway_stack, monkeypatch, capsys):
    stack = gateway_stack
    monkeypatch.setenv("HEADWAY_URL", stack.gateway.server.address)
    assert main(["models", "fork", "tiny", "--name", "m", "--lora-rank", "4"]) == 0
    ids = train_steps(stack.gateway, "m", 3)
    capsys.readouterr()
    assert main(["models", "list", "--size"]) == 0
    out = capsys.readouterr().out
    assert "STORE" in out and "team (local):" in out
    assert main(["models", "prune", "m", "--keep-last", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete 1 checkpoint(s)" in out and f"- {ids[0]}" in out
    assert main(["models", "delete-checkpoint", "m", ids[0]]) == 0
    assert "deleted checkpoint" in capsys.readouterr().out
    assert main(["models", "delete-checkpoint", "m", ids[-1]]) != 0
    assert "the model's head" in capsys.readouterr().err
    assert main(["models", "prune", "m", "--keep-last", "1", "--save"]) == 0
    assert "keep last 1" in capsys.readouterr().out
    assert main(["models", "prune", "m", "--keep-every", "-1"]) != 0


def test_checkpoints_the_tinker_api_names_are_kept(trainer_stack):
    """A name the Tinker API gave (save_state, save_weights_for_sampler) keeps its
    checkpoint through prunes and refuses its delete; a lapsed name does not."""
    import asyncio

    import redis.asyncio as aioredis

    from gateway.tinker_state import TinkerState
    from headway.server.heads import run_key

    stack = trainer_stack
    stack.fork("m")
    ids = train_steps(stack, "m", 4)

    # Named as the gateway's Tinker API names them (keyed by the run: slug and creation).
    run = run_key("m", stack.trainer.store.get_model("m").created)

    async def name() -> None:
        client = aioredis.Redis.from_url(stack.config.redis_url)
        state = TinkerState(client, stack.prefix, 8)
        await state.name(run, "weights/keep-me", ids[0])
        await state.name(run, "sampler_weights/lapsed", ids[1], ttl=-1.0)
        await client.aclose()

    asyncio.run(name())
    _refused(
        lambda: stack.models.DeleteCheckpoint(
            model_pb2.DeleteCheckpointRequest(model="m", checkpoint=ids[0])
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "named 'weights/keep-me' by the Tinker API",
    )
    done = stack.models.PruneCheckpoints(
        model_pb2.PruneCheckpointsRequest(model="m", policy=common_pb2.RetentionPolicy(keep_last=1))
    )
    assert list(done.deleted) == [ids[1]]
    assert done.kept[ids[0]] == "named 'weights/keep-me' by the Tinker API"


@pytest.mark.parametrize("how", ["prune", "delete"])
def test_a_retried_step_whose_checkpoint_was_pruned_is_refused(trainer_stack, how):
    """After a restart (the reply cache gone), a retry of a Step whose checkpoint a prune
    removed is FAILED_PRECONDITION: its step was applied once, it is not applied again."""
    from tests.stack import TrainerStack

    stack = trainer_stack
    stack.fork("m")
    step = training_pb2.StepRequest(
        model="m", data=batch(seed=1), loss_fn="cross_entropy", adam=adam(), request_id="once"
    )
    first = stack.train.Step(step).optim_step.checkpoint
    train_steps(stack, "m", 2)
    if how == "prune":
        policy = common_pb2.RetentionPolicy(keep_last=1)
        done = stack.models.PruneCheckpoints(
            model_pb2.PruneCheckpointsRequest(model="m", policy=policy)
        )
        assert list(done.deleted) == [first]
    else:
        stack.models.DeleteCheckpoint(
            model_pb2.DeleteCheckpointRequest(model="m", checkpoint=first)
        )
    # A new trainer process on the same store: no reply cache, only the store.
    again = TrainerStack(stack.config.store)
    try:
        before = _ids(again, "m")
        _refused(
            lambda: again.train.Step(step),
            grpc.StatusCode.FAILED_PRECONDITION,
            f"request_id 'once' made checkpoint {first} of model 'm', deleted since",
        )
        assert _ids(again, "m") == before
    finally:
        again.stop()
