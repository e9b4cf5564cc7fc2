"""The trainer on torch.distributed: `torchrun --nproc-per-node 2 -m trainer_svc` (gloo, CPU).

The same three steps run on one trainer process and on a two-rank group started from a
copy of the same store: a GRPO step with importance_sampling (its batch split across the
ranks at group boundaries), a custom-loss step (ForwardCustom / BackwardCustom, each rank
keeping its share of the forward, and the reference logprobs of the fork's root), then a
`set_head` back to the first step and a Step with cross_entropy and a KL penalty to the
second step's checkpoint from there (the branch). Every checkpoint the group writes holds the
weights the one process wrote, to fp32 tolerance, for a LoRA fork and a full fork, and
the logprobs each call returns agree. Then a rank is SIGKILLed while a Step is in flight:
torchrun restarts the group from the store and the SDK's retry of the same request
completes it exactly once.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from headway.tensors import from_tensor, to_tensor
from headway.v1 import common_pb2, model_pb2, model_pb2_grpc, training_pb2, training_pb2_grpc
from tests.conftest import VOCAB
from tests.helpers_training import adam, checkpoint_tensors, items, rl_datum
from tests.stack import HANG_SECONDS, ServiceProcess, TrainerStack, redis_prefix, wait_until

pytestmark = pytest.mark.slow  # a two-rank group of trainer processes, and its restart

GROUP = 2  # trajectories per GRPO group
# Adam's update g/(√v + ε) amplifies a gradient's rounding by lr/ε where |g| ≲ ε. One
# process and two ranks sum the gradient in different orders, so an element whose
# gradient nearly cancels (a fresh LoRA A, whose B has moved one step) lands apart by
# rounding × lr/ε: CI runs failed on one such element with ε = 1e-8 (1e-4 apart) and again
# with ε = 1e-6 (on a Xeon, once in a full suite). ε = 1e-3 bounds the amplification to
# 10×, far under the comparison's tolerance, while a missing or doubled share (a
# gradient off by its own size) still moves every element with |g| ≫ ε by ~lr, far past it.
LR, EPS = 1e-2, 1e-3


def torchrun_trainer(store: Path, log: Path, prefix: str, restarts: int = 0) -> ServiceProcess:
    """`python -m trainer_svc` as two ranks under torchrun, SERVING on rank 0."""
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", str(restarts))  # fmt: skip
    args = ["--store", str(store), "--device", "cpu", "--log-level", "DEBUG"]
    proc = ServiceProcess("trainer", "trainer_svc", args, log, prefix, launcher=launcher)
    try:
        proc.wait_ready(time.monotonic() + HANG_SECONDS)
    except BaseException:
        proc.close()
        raise
    return proc


def trajectories(seed: int, groups: int = 3) -> list[common_pb2.TrainingItem]:
    """`groups` GRPO groups of random trajectories of different lengths, rewards that differ
    within each group (so every group has a signal)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(groups * GROUP):
        prompt, completion = rng.integers(0, VOCAB, 3 + i % 4), rng.integers(0, VOCAB, 5 + i)
        turn = common_pb2.Turn(
            prompt_tokens=to_tensor(prompt.astype(np.int32)),
            completion_tokens=to_tensor(completion.astype(np.int32)),
            completion_logprobs=to_tensor(-rng.uniform(1, 5, len(completion)).astype(np.float32)),
        )
        traj = common_pb2.Trajectory(turns=[turn], reward=float(rng.uniform() + i % GROUP))
        out.append(common_pb2.TrainingItem(trajectory=traj))
    return out


def runs(seed: int, groups: int = 3) -> list[common_pb2.Trajectory]:
    """`trajectories` as the SDK takes them."""
    return [item.trajectory for item in trajectories(seed, groups)]


def custom_weights(fwd: training_pb2.ForwardCustomResponse) -> list[common_pb2.Tensor]:
    """A client's custom loss, −Σ mask·A·exp(lp − q)·lp-ish: any function of the logprobs
    will do; the weights it sends back are −dloss/dlogp per token."""
    weights = []
    for d in fwd.data:
        lp = torch.tensor(from_tensor(d.logprobs, "logprobs"), requires_grad=True)
        a = torch.tensor(from_tensor(d.advantages, "advantages"))
        mask = torch.tensor(from_tensor(d.mask, "mask"))
        (grad,) = torch.autograd.grad(-(torch.exp(lp) * a * mask).sum() + 0.1 * (lp**2).sum(), lp)
        weights.append(to_tensor(-grad.numpy()))
    return weights


def run_steps(models, train, slug: str) -> tuple[list[str], list[np.ndarray]]:
    """The three steps (see the module docstring); (sampler paths, every returned logprob)."""
    lps: list[np.ndarray] = []
    request = training_pb2.ForwardBackwardRequest(
        model=slug, data=trajectories(1), loss_fn="importance_sampling", group_size=GROUP
    )
    fb = train.ForwardBackward(request)
    lps += [from_tensor(t, "logprobs") for t in fb.logprobs]
    first = train.OptimStep(training_pb2.OptimStepRequest(model=slug, adam=adam(LR, eps=EPS)))

    fwd = train.ForwardCustom(
        training_pb2.ForwardCustomRequest(
            model=slug, data=trajectories(2), group_size=GROUP, reference=""
        )
    )
    lps += [from_tensor(d.logprobs, "logprobs") for d in fwd.data]
    lps += [from_tensor(d.reference_logprobs, "reference_logprobs") for d in fwd.data]
    train.BackwardCustom(training_pb2.BackwardCustomRequest(
        model=slug, forward_id=fwd.forward_id, weights=custom_weights(fwd)))  # fmt: skip
    second = train.OptimStep(training_pb2.OptimStepRequest(model=slug, adam=adam(LR, eps=EPS)))

    models.SetHead(model_pb2.SetHeadRequest(model=slug, checkpoint=first.checkpoint))
    data = items(*(rl_datum(30 + i, n=6 + 4 * i) for i in range(3)))
    kl = training_pb2.KlPenalty(coef=0.5, reference=second.checkpoint)  # off this branch
    third = train.Step(training_pb2.StepRequest(
        model=slug, data=data, loss_fn="cross_entropy", adam=adam(LR, eps=EPS),
        kl_penalty=kl))  # fmt: skip
    lps += [from_tensor(t, "logprobs") for t in third.forward_backward.logprobs]
    assert third.forward_backward.metrics["kl/reference"] > 0
    lps.append(np.float32([third.forward_backward.metrics["kl/reference"]]))
    assert third.optim_step.step == 2  # branched from the first step
    paths = [first.sampler_path, second.sampler_path, third.optim_step.sampler_path]
    return paths, lps


@pytest.fixture()
def two_stores(tmp_path: Path, tiny_base: Path) -> tuple[Path, Path]:
    """A store with a LoRA fork and a full fork of the tiny base, and a copy of it."""
    one = TrainerStack(tmp_path / "one")
    try:
        one.add_base(tiny_base, "tiny")
        one.fork("lora", rank=4)
        one.fork("full", full=True)
    finally:
        one.stop()
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    return tmp_path / "one", tmp_path / "two"


def test_two_ranks_train_as_one_process(tmp_path: Path, two_stores: tuple[Path, Path]) -> None:
    one_store, two_store = two_stores
    one = TrainerStack(one_store)
    try:
        expected = {slug: run_steps(one.models, one.train, slug) for slug in ("lora", "full")}
    finally:
        one.stop()
    group = torchrun_trainer(two_store, tmp_path / "ranks.log", redis_prefix("ranks"))
    try:
        models = model_pb2_grpc.ModelServiceStub(group.channel)
        train = training_pb2_grpc.TrainingServiceStub(group.channel)
        got = {slug: run_steps(models, train, slug) for slug in ("lora", "full")}
    finally:
        group.stop()
    log = (tmp_path / "ranks.log").read_text(errors="replace")
    assert "rank 1 of 2 (gloo, cpu)" in log, log[-3000:]
    # Rank 1 computed a share of every kind of call, of both forks.
    for slug in ("lora", "full"):
        for op in ("forward_backward", "forward_custom", "backward_custom", "optim_step"):
            assert f"rank 1: {op} {slug}" in log, (op, slug)
        shares = re.findall(rf"rank 1: forward_\w+ {slug} (\d+) datums", log)
        assert len(shares) == 3 and all(int(n) > 0 for n in shares), shares
    for slug in ("lora", "full"):
        (paths, lps), (want_paths, want_lps) = got[slug], expected[slug]
        assert len(lps) == len(want_lps)
        for a, b in zip(lps, want_lps, strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5, err_msg=slug)
        for path, want in zip(paths, want_paths, strict=True):
            weights = checkpoint_tensors(two_store, path)
            reference = checkpoint_tensors(one_store, want)
            assert set(weights) == set(reference)
            for name, t in reference.items():
                torch.testing.assert_close(weights[name], t, atol=2e-5, rtol=1e-4, msg=name)
        # Training moved the weights: the comparison is not of untouched tensors.
        first, second = (checkpoint_tensors(two_store, p) for p in paths[:2])
        assert any(not torch.equal(first[k], second[k]) for k in first)


def test_shares_cut_between_groups_and_balance_tokens() -> None:
    from trainer_svc.datums import DatumArrays
    from trainer_svc.ranks import shares

    def datum(n: int, group: int, traj: bool) -> DatumArrays:
        z = np.zeros(n, np.float32)
        return DatumArrays(np.zeros(n, np.int64), np.zeros(n, np.int64), z, None, None,
                           0.0, 0.0, group, from_trajectory=traj)  # fmt: skip

    # Three GRPO groups of two trajectories (lengths 10, 10 | 20, 20 | 30, 30): half the
    # 120 tokens is after the second group; a third each is as near after the first.
    lengths = ((0, 10), (0, 10), (1, 20), (1, 20), (2, 30), (2, 30))
    grouped = [datum(n, g, True) for g, n in lengths]
    assert shares(grouped, 2) == [range(0, 4), range(4, 6)]
    assert shares(grouped, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    # Inline datums (group_index is the client's label) are cut anywhere.
    inline = [datum(10, 0, False) for _ in range(4)]
    assert shares(inline, 2) == [range(0, 2), range(2, 4)]
    # One group, two ranks: rank 1 gets nothing (and still joins the all-reduce).
    assert shares(grouped[:2], 2) == [range(0, 2), range(2, 2)]


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun worker `rank` under agent `parent` (by its RANK variable)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _cpu_ticks(pid: int) -> int:
    """User + system CPU time of `pid` so far, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _step_killing(client, victim: int, seed: int, groups: int) -> tuple[bool, object]:
    """A Step of `groups` groups, rank `victim` SIGKILLed once it is seen computing while
    the Step is in flight; (whether it was killed, the Step's result after the SDK's
    retries)."""
    result: dict[str, object] = {}

    def step() -> None:
        try:
            result["value"] = client.step(runs(seed, groups=groups), 1e-2, group_size=GROUP)
        except Exception as e:  # reported below
            result["error"] = e

    before = _cpu_ticks(victim)
    caller = threading.Thread(target=step)
    caller.start()
    wait_until(lambda: _cpu_ticks(victim) > before or not caller.is_alive(), interval=0,
               what="rank 1 to compute")  # fmt: skip
    killed = caller.is_alive()
    if killed:
        os.kill(victim, signal.SIGKILL)
    caller.join(timeout=2 * HANG_SECONDS)
    assert "error" not in result, result.get("error")
    return killed, result["value"]


def test_killed_rank_restarts_and_the_sdk_retry_completes_the_step(
    tmp_path: Path, two_stores: tuple[Path, Path]
) -> None:
    from headway import TrainingClient

    _, store = two_stores
    group = torchrun_trainer(store, tmp_path / "ranks.log", redis_prefix("ranks"), restarts=2)
    try:
        client = TrainingClient("lora", url=group.address, retry_timeout=HANG_SECONDS,
                                retry_backoff=0.05).sync()  # fmt: skip
        steps = client.step(runs(5), 1e-2, group_size=GROUP).step
        assert steps == 1
        victim = _rank_pid(group.proc.pid, 1)
        assert victim is not None, "no rank 1 under torchrun"
        # Kill rank 1 once it is seen computing its share of a Step (its CPU time grows
        # while the call is in flight). A Step that finishes before that is seen counts,
        # and the next one, twice as large, is aimed at (a faster machine needs more work
        # for a clock tick of it to show).
        for attempt in range(6):
            killed, result = _step_killing(client, victim, 10 + attempt, groups=16 << attempt)
            steps += 1
            assert result.step == steps, result  # not lost, not doubled
            if killed:
                break
        assert killed, "rank 1 was never seen computing while a Step was in flight"
        # The retry was answered by a restarted group (a new rank 1), exactly once.
        assert _rank_pid(group.proc.pid, 1) not in (None, victim)
        assert sorted(c.step for c in client.checkpoints()) == list(range(steps + 1))
        assert client.head().id == result.checkpoint
        assert client.step(runs(7), 1e-2, group_size=GROUP).step == steps + 1
    finally:
        group.stop()
