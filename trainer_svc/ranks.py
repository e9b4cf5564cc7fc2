"""The trainer's torch work, in one process (`Compute`) or across torch.distributed ranks.

Under `torchrun --nproc-per-node N` every rank runs `python -m trainer_svc`. Rank 0 is the
trainer people talk to: gRPC, validation, the store, publishing, exactly as one process.
Only its torch work changes, through `RankedCompute`:

- forward_backward and ForwardCustom split the (already validated, already assembled)
  batch into one contiguous share per rank at GRPO-group boundaries, balanced by tokens,
  send every other rank its share in one `scatter_object_list`, run rank 0's share, and
  `gather_object` the others' logprobs and metrics (merged as if one process ran it all);
- BackwardCustom sends each rank the client's weights for its share of the forward;
- OptimStep sums the gradients across ranks (bucketed `all_reduce`, SUM: the losses are
  sums, so the sum of the shares' gradients is the whole batch's) and every rank applies
  the same AdamW to the same numbers, so the replicas stay identical and rank 0 alone
  writes the checkpoint. This is DDP's algorithm, run at the step rather than by DDP's
  backward hooks: a step's gradient accumulates over several RPCs whose shares give the
  ranks different numbers of backward passes, which DDP's per-backward reducer would hang
  on (or all-reduce once per microbatch).

The other ranks run `follow`: a loop that receives work, keeps replicas of the training
states (loaded from the store at the checkpoint rank 0 names, and reloaded whenever rank 0
loaded its state anew: a set_head, an eviction, a failed step), and answers. One sequence
of collectives runs at a time (`RankGroup.lock`), whatever models rank 0 serves
concurrently. A rank that fails leaves the group: rank 0's call fails UNAVAILABLE
(retryable) and torchrun's restart policy restarts every rank from the store.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from headway.errors import Unavailable
from headway.store import CheckpointStore
from trainer_svc import compute, losses
from trainer_svc.calls import AdamArgs
from trainer_svc.compute import ComputeMode, KeptForward, KlTerm
from trainer_svc.datums import DatumArrays
from trainer_svc.losses import Loss
from trainer_svc.pool import FrozenPool
from trainer_svc.reference import KlPenalty, Reference, load_reference, release_reference
from trainer_svc.state import ModelState, load_state, next_load_id

log = logging.getLogger(__name__)

# Gradients are summed in buckets of this many bytes (DDP's default bucket is 25 MB): one
# collective per bucket instead of one per tensor (a LoRA fork has hundreds of small ones).
BUCKET_BYTES = 32 << 20
# An idle group's followers wait in a collective; rank 0 pings them this often so that a
# long idle spell never reaches the group's timeout.
PING_SECONDS = 60.0


class Compute:
    """The trainer's torch work in this process (one rank, or no torch.distributed)."""

    def __init__(
        self, mode: ComputeMode, microbatch_tokens: int, keep_graph_tokens: int,
        references: Callable[[ModelState, str], Reference],
    ) -> None:  # fmt: skip
        """`references(state, checkpoint)`: the reference weights of a KL penalty."""
        self.mode = mode
        self.microbatch_tokens, self.keep_graph_tokens = microbatch_tokens, keep_graph_tokens
        self.references = references

    def forward_backward(
        self, state: ModelState, datums: list[DatumArrays], loss: Loss, cfg: dict[str, float],
        kl: KlPenalty | None = None,
    ) -> tuple[list[np.ndarray], dict[str, float]]:  # fmt: skip
        """Accumulate the gradient of built-in loss `loss` (and `kl`'s penalty) over the
        batch."""
        term = None if kl is None else KlTerm(kl.coef, self.references(state, kl.checkpoint))
        return compute.forward_backward(
            state, datums, loss, cfg, self.microbatch_tokens, self.mode, term
        )

    def forward_custom(
        self, state: ModelState, datums: list[DatumArrays], forward_id: str, reference: str | None
    ) -> KeptForward:
        """The forward half of a custom loss (`forward_id` names it on every rank), with
        the logprobs of the `reference` checkpoint when one is named."""
        ref = None if reference is None else self.references(state, reference)
        return compute.forward_custom(
            state, datums, self.microbatch_tokens, self.keep_graph_tokens, self.mode, ref
        )

    def backward_custom(
        self, state: ModelState, kept: KeptForward, weights: list[np.ndarray], forward_id: str
    ) -> dict[str, float]:
        """The backward half: −Σ w·logprob through the kept forward."""
        return compute.backward_custom(state, kept, weights)

    def discard_forward(self, state: ModelState, forward_id: str) -> None:
        """A forward refused after it ran (ForwardLimits): the other ranks forget theirs."""

    def drop_graphs(self, state: ModelState, forward_id: str) -> None:
        """A forward whose graphs did not fit: the other ranks drop theirs too."""

    def optim_step(self, state: ModelState, adam: AdamArgs) -> float:
        """AdamW over the accumulated gradient; the gradient norm before clipping."""
        return compute.optim_step(state, *_adam(adam))

    def close(self) -> None:
        """Nothing to stop in one process."""


def _snapshot(loaded: Callable[[], list[ModelState]]) -> dict[str, int]:
    """slug → load_id of the states `loaded()` lists (read from a compute thread while the
    event loop may change the list: retried if it changed under the read)."""
    while True:
        try:
            return {s.record.slug: s.load_id for s in loaded()}
        except RuntimeError:  # changed size during iteration
            continue


def _adam(adam: AdamArgs) -> tuple[float, ...]:
    return (adam.learning_rate, adam.beta1, adam.beta2, adam.eps, adam.weight_decay,
            adam.grad_clip_norm)  # fmt: skip


# ------------------------------------------------------------------------- the group
@dataclass
class RankGroup:
    """This process's place in the torch.distributed group."""

    rank: int
    world: int
    device: str
    lock: threading.Lock = field(default_factory=threading.Lock)


def join(device: str) -> RankGroup | None:
    """Join torchrun's group (gloo on CPU, NCCL on GPU) when launched by it; None when not
    (WORLD_SIZE unset or 1). `device` "cuda" becomes this rank's own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    rank = int(os.environ["RANK"])
    # Long enough for any one call's compute imbalance; idle spells are pinged through.
    timeout = datetime.timedelta(minutes=30)
    # The group meets in torchrun's store (its agent hosts it), under a prefix of its own
    # per restart: a restarted group seen to read the previous attempt's addresses there
    # (gloo then connects to ranks that are gone, and the restart fails).
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
        is_master=not agent and rank == 0, timeout=timeout,
    )  # fmt: skip
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"headway-trainer/attempt-{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    group = RankGroup(rank, world, device)
    log.info("rank %d of %d (%s, %s)", group.rank, group.world, backend, device)
    return group


def shares(datums: list[DatumArrays], world: int) -> list[range]:
    """Contiguous ranges of `datums`, one per rank, as near to equal token counts as the
    cuts allow: never inside a GRPO group of trajectories (the datums of one group stay on
    one rank), anywhere between inline datums. A rank gets an empty range when there are
    fewer groups than ranks."""
    n = len(datums)
    cuts = [
        i for i in range(1, n)
        if not (datums[i].from_trajectory and datums[i - 1].from_trajectory
                and datums[i].group_index == datums[i - 1].group_index)
    ]  # fmt: skip
    tokens = np.cumsum([0] + [len(d.input_tokens) for d in datums])
    bounds = [0]
    for r in range(1, world):
        target = tokens[-1] * r / world
        candidates = [c for c in cuts if c >= bounds[-1]] + [n]
        bounds.append(min(candidates, key=lambda c: abs(tokens[c] - target)))
    bounds.append(n)
    return [range(bounds[r], bounds[r + 1]) for r in range(world)]


@dataclass
class Work:
    """One rank's part of one call: `op` on the state of `slug` as rank 0's load
    `load_id` (at checkpoint `at` when a replica must be loaded), with `args`."""

    op: str  # forward_backward, forward_custom, backward_custom, discard_forward,
    # drop_graphs, optim_step, ping, stop
    slug: str = ""
    at: str = ""
    load_id: int = 0
    args: tuple[Any, ...] = ()
    # Every state rank 0 holds, slug → load_id: a follower keeps replicas of exactly these.
    loaded: dict[str, int] = field(default_factory=dict)


class RankedCompute(Compute):
    """Rank 0's `Compute`: every call runs on all ranks (see the module docstring)."""

    def __init__(
        self, group: RankGroup, mode: ComputeMode, micro: int, keep: int,
        references: Callable[[ModelState, str], Reference],
        loaded: Callable[[], list[ModelState]],
    ) -> None:  # fmt: skip
        """`loaded()`: the states rank 0 holds (followers mirror them)."""
        super().__init__(mode, micro, keep, references)
        self.group, self.loaded = group, loaded
        # Every rank computes in rank 0's precision (each measuring its own would let a
        # rank on a busier core choose differently).
        dist.broadcast_object_list([mode.precision], src=0)
        self._stopped = threading.Event()
        self._pinger = threading.Thread(target=self._ping, name="rank-ping", daemon=True)
        self._pinger.start()

    @property
    def mode(self) -> ComputeMode:
        return self._mode

    @mode.setter
    def mode(self, mode: ComputeMode) -> None:
        if getattr(self, "_mode", mode).precision != mode.precision:
            raise RuntimeError("the precision of a distributed trainer is set when it starts")
        self._mode = mode

    def _run(
        self, works: list[Work], local: Any, state: ModelState | None = None
    ) -> tuple[Any, list[Any]]:
        """Send every rank its work, run rank 0's (`local()`), gather the others' replies.

        Rank 0's own error is raised after the gather (the group stays in step), with
        `state` reloaded everywhere: the others did their part, rank 0 did not, so the
        work accumulated since the last OptimStep is dropped on every rank. A collective
        that fails (a rank died) is UNAVAILABLE: retry once torchrun has restarted the
        group.
        """
        with self.group.lock:
            # Read under the lock: calls on other models run between two reads, and a
            # stale map would make the followers drop the replicas those calls made.
            loaded = _snapshot(self.loaded)
            for work in works:
                work.loaded = loaded
            try:
                dist.scatter_object_list([None], works, src=0)
                try:
                    mine, error = local(), None
                except Exception as e:  # raised after the others answer
                    mine, error = None, e
                replies: list[Any] = [None] * self.group.world
                dist.gather_object(None, replies, dst=0)
            except RuntimeError as e:  # gloo/NCCL: a peer closed, timed out
                log.error("a trainer rank failed: %s", e)
                raise Unavailable(
                    "a rank of this distributed trainer failed; it restarts from the "
                    "store: retry the call (with the same request_id)"
                ) from e
        if error is not None:
            if state is not None:
                log.warning(
                    "%s failed on rank 0 after the other ranks ran it (%s): the work "
                    "accumulated on %s since its last optim_step is dropped on every rank",
                    works[0].op, error, state.record.slug,
                )  # fmt: skip
                state.reset_accumulation()
                state.load_id = next_load_id()  # the followers reload it from the store
            raise error
        return mine, replies[1:]

    def _works(self, op: str, state: ModelState, per_rank: list[tuple[Any, ...]]) -> list[Work]:
        return [Work(op, state.record.slug, state.head.id, state.load_id, a) for a in per_rank]

    def forward_backward(
        self, state: ModelState, datums: list[DatumArrays], loss: Loss, cfg: dict[str, float],
        kl: KlPenalty | None = None,
    ) -> tuple[list[np.ndarray], dict[str, float]]:  # fmt: skip
        # The whole batch, before any rank starts on its share (no rank refuses alone),
        # and the reference loaded here first: one that cannot be refuses the call before
        # any rank accumulates anything.
        compute.check_loss_inputs(datums, loss)
        if kl is not None:
            self.references(state, kl.checkpoint)
        parts = shares(datums, self.group.world)
        works = self._works(  # the loss by name: Work crosses as a pickle
            "forward_backward", state,
            [([datums[i] for i in p], loss.name, cfg, kl) for p in parts],
        )  # fmt: skip
        (lps, metrics), others = self._run(
            works, lambda: super(RankedCompute, self).forward_backward(
                state, [datums[i] for i in parts[0]], loss, cfg, kl), state,
        )  # fmt: skip
        for other_lps, _ in others:
            lps = lps + other_lps
        return lps, compute.merge_metrics([metrics, *(m for _, m in others)])

    def forward_custom(
        self, state: ModelState, datums: list[DatumArrays], forward_id: str, reference: str | None
    ) -> KeptForward:
        if reference is not None:  # loaded before any rank runs (see forward_backward)
            self.references(state, reference)
        parts = shares(datums, self.group.world)
        works = self._works(
            "forward_custom", state,
            [([datums[i] for i in p], forward_id, reference) for p in parts],
        )  # fmt: skip
        kept, others = self._run(
            works, lambda: super(RankedCompute, self).forward_custom(
                state, [datums[i] for i in parts[0]], forward_id, reference), state,
        )  # fmt: skip
        # Rank 0 keeps its share's chunks and graphs, and answers (and replays) the whole
        # batch: every datum, every rank's logprobs. The limits on pending forwards count
        # every rank's graphs (each rank holds its own share's).
        kept.shares = [(p.start, p.stop) for p in parts]
        kept.datums = list(datums)
        kept.logprobs = kept.logprobs + [lp for lps, _, _ in others for lp in lps]
        if kept.reference_logprobs is not None:
            kept.reference_logprobs += [lp for _, _, refs in others for lp in refs]
        if kept.graphs is not None:
            kept.graph_bytes += sum(nbytes for _, nbytes, _ in others)
        return kept

    def discard_forward(self, state: ModelState, forward_id: str) -> None:
        works = self._works("discard_forward", state, [(forward_id,)] * self.group.world)
        self._run(works, lambda: None)

    def drop_graphs(self, state: ModelState, forward_id: str) -> None:
        works = self._works("drop_graphs", state, [(forward_id,)] * self.group.world)
        self._run(works, lambda: None)

    def backward_custom(
        self, state: ModelState, kept: KeptForward, weights: list[np.ndarray], forward_id: str
    ) -> dict[str, float]:
        bounds = kept.shares
        works = self._works(
            "backward_custom", state, [(forward_id, weights[a:b]) for a, b in bounds]
        )
        metrics, others = self._run(
            works, lambda: compute.backward_custom(state, kept, weights[: bounds[0][1]]), state
        )
        return compute.merge_metrics([metrics, *others])

    def optim_step(self, state: ModelState, adam: AdamArgs) -> float:
        if not state.acc.has_grad:
            return compute.optim_step(state, *_adam(adam))  # its FailedPrecondition
        works = self._works("optim_step", state, [(adam,)] * self.group.world)
        norm, _ = self._run(works, lambda: _step(state, adam), state)
        return norm

    def _ping(self) -> None:
        while not self._stopped.wait(PING_SECONDS):
            try:
                self._run([Work("ping") for _ in range(self.group.world)], lambda: None)
            except Exception:  # the group is gone; torchrun restarts it
                log.exception("the trainer's ranks stopped answering")
                return

    def close(self) -> None:
        """Tell the other ranks to stop (they exit their loop), then leave the group."""
        self._stopped.set()
        self._pinger.join()  # no ping after the stop
        with contextlib.suppress(Unavailable):  # the group is gone already
            self._run([Work("stop") for _ in range(self.group.world)], lambda: None)
        dist.destroy_process_group()


def _step(state: ModelState, adam: AdamArgs) -> float:
    """Sum the gradients across ranks, then AdamW: the same numbers on every rank."""
    sum_gradients(list(state.params.values()))
    return compute.apply_adamw(state, *_adam(adam))


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its sum over the ranks (all ranks call this
    together). A parameter no rank has a gradient for keeps none (AdamW skips it, as in
    one process); one that only some ranks have is zero on the others."""
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for p, h in zip(params, has.tolist(), strict=True):
        if not h:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if buckets[-1] and size + p.grad.nbytes > BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(p.grad)
        size += p.grad.nbytes
    for grads in filter(None, buckets):
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        summed = torch._utils._unflatten_dense_tensors(flat, grads)
        for g, total in zip(grads, summed, strict=True):
            g.copy_(total)


# ---------------------------------------------------------------------- followers
class Follower:
    """A rank other than 0: replicas of the states rank 0 trains, driven by its work."""

    def __init__(
        self, group: RankGroup, store: CheckpointStore, pool: FrozenPool, dtype: torch.dtype,
        compute_: Compute,
    ) -> None:  # fmt: skip
        self.group, self.store, self.pool, self.dtype = group, store, pool, dtype
        self.compute = compute_
        self.states: dict[str, ModelState] = {}
        self.load_ids: dict[str, int] = {}

    def run(self) -> None:
        """Serve rank 0's work until it says stop. Any error ends the process: the group
        is then out of step, and torchrun restarts it from the store."""
        while True:
            box: list[Any] = [None]
            dist.scatter_object_list(box, None, src=0)
            work: Work = box[0]
            if work.op == "stop":
                dist.gather_object(None, None, dst=0)
                return
            reply = None if work.op == "ping" else self.handle(work)
            dist.gather_object(reply, None, dst=0)

    def mirror(self, loaded: dict[str, int]) -> None:
        """Keep replicas of exactly the states rank 0 holds (as the same loads): what it
        dropped (evicted, set_head, deleted, a failed step) goes here too."""
        for slug in [s for s in self.states if self.load_ids[s] != loaded.get(s)]:
            state = self.states.pop(slug)
            del self.load_ids[slug]
            release_reference(self.pool, state)
            if state.frozen_ref is not None:
                self.pool.release(state.frozen_ref)

    def state(self, work: Work) -> ModelState:
        """The replica of rank 0's state `work` names, loaded when rank 0 loaded anew
        (rank 0's own load waited for the checkpoint's files, so they are complete)."""
        self.mirror(work.loaded)
        state = self.states.get(work.slug)
        if state is None:
            state = load_state(self.store, self.pool, work.slug, self.dtype, at=work.at)
            self.states[work.slug], self.load_ids[work.slug] = state, work.load_id
        return state

    def handle(self, work: Work) -> Any:
        """Run one work item on this rank's replica; its reply for rank 0."""
        state = self.state(work)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rank %d: %s %s %s", self.group.rank, work.op, work.slug, _describe(work))
        if work.op == "forward_backward":
            datums, loss, cfg, kl = work.args
            return self.compute.forward_backward(state, datums, losses.LOSSES[loss], cfg, kl)
        if work.op == "forward_custom":
            datums, forward_id, reference = work.args
            kept = self.compute.forward_custom(state, datums, forward_id, reference)
            state.forwards[forward_id] = kept
            return kept.logprobs, kept.graph_bytes, kept.reference_logprobs or []
        if work.op == "backward_custom":
            forward_id, weights = work.args
            kept = state.forwards.pop(forward_id)
            return self.compute.backward_custom(state, kept, weights, forward_id)
        if work.op == "discard_forward":
            state.forwards.pop(work.args[0], None)
            return None
        if work.op == "drop_graphs":
            state.forwards[work.args[0]].drop_graphs()
            return None
        if work.op == "optim_step":
            (adam,) = work.args
            norm = _step(state, adam)
            state.reset_accumulation()
            return norm
        raise ValueError(f"unknown work {work.op!r}")


def _describe(work: Work) -> str:
    """What a work item carries, for the debug log (datums and tokens of a share)."""
    if work.op in ("forward_backward", "forward_custom"):
        datums = work.args[0]
        return f"{len(datums)} datums, {sum(len(d.input_tokens) for d in datums)} tokens"
    return ""


def follow(group: RankGroup, config: Any) -> None:
    """Run a follower rank of the trainer configured by `config` (a TrainerConfig)."""
    from trainer_svc.kernels import Kernels

    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)  # rank 0's precision (see RankedCompute)
    device = torch.device(group.device)
    mode = ComputeMode(box[0], Kernels() if device.type == "cpu" else None)
    dtype = torch.float32  # master weights and AdamW state, as on rank 0
    store = CheckpointStore(config.store, recover=False)  # rank 0 is the store's one writer
    pool = FrozenPool(store, dtype, device)
    references = functools.partial(load_reference, store, pool)
    compute_ = Compute(mode, config.microbatch_tokens, config.keep_graph_tokens, references)
    Follower(group, store, pool, dtype, compute_).run()
    dist.destroy_process_group()
