"""Evaluations on checkpoints (issue 17 §3): `headway.eval.evaluate` plays a taskset on a
pinned checkpoint and records mean reward and pass@k on it (RecordEval), listed with the
checkpoint and shown by the CLI; `headway models eval` does it from a module:function."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from headway.cli import main
from headway.eval import _eval_metrics, evaluate, pass_at_k
from headway.types import Run
from headway.v1 import model_pb2, training_pb2
from tests.helpers_evals import parity, tasks
from tests.helpers_sdk import fork, url
from tests.helpers_training import adam, batch
from tests.stack import team_md


def test_pass_at_k_is_the_unbiased_estimate():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    runs = [Run(task=None, model="m", reward=r) for r in (1.0, 0.0, 0.0, 0.0, 1.0, 1.0)]
    runs.append(Run(task=None, model="m", error="timed out"))  # task 2's third run
    runs.append(Run(task=None, model="m", reward=0.0))
    got = _eval_metrics(runs, tasks=2, group=4, name="x", success=1.0)
    # Task 1: 1 of 4 passed; task 2: 2 of its 3 runs that finished.
    assert got["x/runs"] == 7 and got["x/errored"] == 1
    assert got["x/reward_mean"] == pytest.approx(3 / 7)
    assert got["x/pass@1"] == pytest.approx((0.25 + 2 / 3) / 2)
    assert got["x/pass@4"] == pytest.approx(1.0)  # only task 1 has 4 finished runs


def test_evaluate_records_on_the_pinned_checkpoint(gateway_stack, monkeypatch, capsys):
    stack = gateway_stack
    monkeypatch.setenv("HEADWAY_URL", url(stack))
    monkeypatch.setenv("HEADWAY_HTTP_URL", stack.gateway.http_url)
    fork(stack, "m")
    root = stack.trainer.store.root_checkpoint("m").id
    stack.gateway.train.Step(
        training_pb2.StepRequest(
            model="m", data=batch(seed=2), loss_fn="cross_entropy", adam=adam()
        )
    )
    result = asyncio.run(evaluate("m", tasks(), checkpoint=root, group=3, name="arith"))
    assert result.checkpoint == root and len(result.runs) == 6
    assert all(r.reward == parity(r) for r in result.runs)
    assert result.metrics["arith/reward_mean"] == pytest.approx(
        sum(r.reward for r in result.runs) / 6
    )
    assert {"arith/pass@1", "arith/pass@3", "arith/runs", "arith/errored"} <= set(result.metrics)
    listed = stack.gateway.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model="m"))
    evals = {c.id: dict(c.evals) for c in listed.checkpoints}
    assert evals[root] == pytest.approx(result.metrics)
    assert all(not e for ckpt, e in evals.items() if ckpt != root)  # the head: not evaluated
    # The CLI: from a module:function, on the head; shown by `checkpoints` and `head`.
    assert (
        main(["models", "eval", "m", "--taskset", "tests.helpers_evals:tasks", "--group", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert "evaluated m@" in out and "eval/pass@2" in out
    assert main(["models", "head", "m"]) == 0
    assert "eval eval/reward_mean" in capsys.readouterr().out
    assert main(["models", "checkpoints", "m"]) == 0
    assert "arith/reward_mean" in capsys.readouterr().out
    assert main(["models", "eval", "m", "--taskset", "tests.helpers_evals:nope"]) != 0
    assert "has no attribute 'nope'" in capsys.readouterr().err


def test_bad_eval_records_are_refused(trainer_stack):
    stack = trainer_stack
    stack.fork("m")
    stack.fork("theirs", team="other")
    root = stack.trainer.store.root_checkpoint("m").id

    def record(metrics, model="m", checkpoint=root, team=""):
        request = model_pb2.RecordEvalRequest(model=model, checkpoint=checkpoint, metrics=metrics)
        return stack.models.RecordEval(request, metadata=team_md(team))

    cases = [
        (lambda: record({"x/r": float("nan")}), grpc.StatusCode.INVALID_ARGUMENT, "not finite"),
        (lambda: record({}), grpc.StatusCode.INVALID_ARGUMENT, "metrics is empty"),
        (lambda: record({f"k{i}": 1.0 for i in range(65)}), grpc.StatusCode.INVALID_ARGUMENT,
         "limit"),
        (lambda: record({"x": 1.0}, checkpoint="nosuch"), grpc.StatusCode.NOT_FOUND, "not found"),
        (lambda: record({"x": 1.0}, model="theirs", checkpoint=stack.trainer.store.head("theirs")),
         grpc.StatusCode.NOT_FOUND, "not found"),
        (lambda: record({"x": 1.0}, model="tiny", checkpoint="base"),
         grpc.StatusCode.FAILED_PRECONDITION, "base"),
    ]  # fmt: skip
    for call, code, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code and words in err.value.details(), err.value.details()
    assert stack.trainer.store.evals("m", root) == {}
    assert dict(record({"x": 1.0}).evals) == {"x": 1.0}
    assert dict(record({"y": 2.0, "x": 3.0}).evals) == {"x": 3.0, "y": 2.0}  # replaced, added
