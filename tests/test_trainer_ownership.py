"""A call runs on the model it was sent to, or not at all.

Calls on one model queue on its lock; the model they resolved before queueing may be gone
by the time they run (deleted, its name taken by another team), and a fork references its
source's files while it is being created. These tests hold the trainer's real locks from
the test (standing for a long call) to make those interleavings deterministic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from headway.v1 import model_pb2, training_pb2
from tests.helpers_training import batch
from tests.stack import TrainerStack, team_md, wait_until


class Held:
    """An asyncio lock of the trainer, acquired on the server's loop by the test."""

    def __init__(self, stack: TrainerStack, lock: asyncio.Lock) -> None:
        self.stack, self.lock = stack, lock
        stack.server.run(lock.acquire())
        self.held = True

    def waiting(self) -> int:
        """How many calls queue on the lock (asyncio keeps them in `_waiters`)."""
        return len(self.lock._waiters or ())

    def release(self) -> None:
        if self.held:
            self.held = False
            self.stack.server.loop.call_soon_threadsafe(self.lock.release)


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


CALLS = {
    "ForwardBackward": lambda s, md: s.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(model="m", data=batch(), loss_fn="ppo"), metadata=md
    ),
    "ForwardCustom": lambda s, md: s.train.ForwardCustom(
        training_pb2.ForwardCustomRequest(model="m", data=batch()), metadata=md
    ),
    "DeleteModel": lambda s, md: s.models.DeleteModel(
        model_pb2.DeleteModelRequest(model="m"), metadata=md
    ),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_queued_call_never_runs_on_the_model_that_took_its_name(trainer_stack, call):
    """Red's call waits on m's lock; meanwhile m is deleted and blue forks a new m. Once
    released, red's call finds its model gone (NOT_FOUND, as for any model not red's)
    and blue's m is untouched.

    The delete goes to the store directly: through DeleteModel it would queue behind the
    held lock, and the window the re-check closes would be a few loop turns wide."""
    stack = trainer_stack
    red, blue = team_md("red"), team_md("blue")
    stack.fork("m", team="red")
    held = Held(stack, stack.trainer._lock("m"))
    try:
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(CALLS[call], stack, red)
            wait_until(lambda: held.waiting() == 1, what="red's call to queue on m's lock")
            stack.trainer.store.delete_model("m")
            stack.fork("m", team="blue")
            held.release()
            err = _refused(lambda: queued.result(timeout=120))
    finally:
        held.release()
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.details() == "model 'm' not found"
    model = stack.models.GetModel(model_pb2.GetModelRequest(model="m"), metadata=blue)
    assert model.team == "blue"
    tree = stack.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model="m"), metadata=blue)
    assert len(tree.checkpoints) == 1
    assert "m" not in stack.trainer.loaded, "red's call loaded (and trained) blue's model"


def test_a_fork_holds_its_source_so_a_concurrent_delete_cannot_orphan_it(trainer_stack):
    """Red forks `child` from its model `parent` and deletes `parent` meanwhile. The fork
    is held at its last step (the test holds the trainer's creation lock, which a fork
    takes to publish the new model) while the delete is sent. The delete must wait for the
    fork and then refuse (parent has a dependent), never leave `child` referencing files
    that are gone."""
    stack = trainer_stack
    red = team_md("red")
    stack.fork("parent", team="red")
    held = Held(stack, stack.trainer._create_lock)
    try:
        with ThreadPoolExecutor(2) as pool:
            fork = pool.submit(stack.fork, "child", source="parent", team="red")
            wait_until(lambda: held.waiting() == 1, what="the fork to wait for the creation lock")
            delete = pool.submit(
                stack.models.DeleteModel, model_pb2.DeleteModelRequest(model="parent"), metadata=red
            )
            parent = stack.trainer._lock("parent")
            wait_until(
                lambda: delete.done() or len(parent._waiters or ()) == 1,
                what="the delete to finish or queue on parent's lock",
            )
            held.release()
            fork.result(timeout=120)
            err = _refused(lambda: delete.result(timeout=120))
    finally:
        held.release()
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "child" in err.details()
    store = stack.trainer.store
    assert store.get_model("parent") and store.sampler_path("child", store.head("child"))
