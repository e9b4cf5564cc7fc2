"""`LoadedStates`: the training states in memory, bounded so no team can pin them all.

A state is loaded from its model's head on first use and kept, least recently used
first, up to `max_loaded` states. An idle state is evicted freely (its head restores it
exactly). A state is *pinned* while it holds work that exists nowhere else: a gradient
accumulated since the last OptimStep, or custom-loss forwards awaiting their backward.
Evicting it would silently lose that work, so it is never evicted. Instead:

- A team may pin at most `max_pinned_per_team` models at once: a call that would start
  accumulating on one more (ForwardBackward, ForwardCustom, Step on a model holding no
  work yet) is RESOURCE_EXHAUSTED, telling the team to optim_step (or set_head) one of
  its pinned models first. So one team never holds every slot.
- Loading a state when all `max_loaded` slots are pinned or in use is RESOURCE_EXHAUSTED
  with a retry pushback (`Overloaded`): memory never grows past the bound, and the SDK
  retries once a slot frees up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import torch

from headway.errors import Overloaded, ResourceExhausted
from headway.store import CheckpointStore, ModelRecord
from trainer_svc.pool import FrozenPool
from trainer_svc.reference import release_reference
from trainer_svc.state import ModelState, load_state


class LoadedStates:
    """Training states by slug, loaded on demand, evicted LRU when idle."""

    def __init__(
        self,
        store: CheckpointStore,
        pool: FrozenPool,
        dtype: torch.dtype,
        max_loaded: int,
        max_pinned_per_team: int,
        in_use: Callable[[str], bool],
        run: Callable[..., Awaitable[Any]] = asyncio.to_thread,
    ) -> None:
        """`in_use(slug)` tells whether a call holds the model (its lock): not evictable.
        `run(fn, *args)` runs a load off the event loop (the trainer's torch thread)."""
        self.store, self.pool, self.dtype = store, pool, dtype
        self.max_loaded = max_loaded
        self.max_pinned_per_team = max_pinned_per_team or max(1, max_loaded // 2)
        self.in_use, self._run = in_use, run
        self._states: OrderedDict[str, ModelState] = OrderedDict()
        self._loading: set[str] = set()
        self._pinning: dict[str, str] = {}  # slug → team, calls that may pin it right now

    # ------------------------------------------------------------------ reads
    def __getitem__(self, slug: str) -> ModelState:
        return self._states[slug]

    def __contains__(self, slug: object) -> bool:
        return slug in self._states

    def get(self, slug: str) -> ModelState | None:
        """The state of `slug` if loaded (no load, no LRU update)."""
        return self._states.get(slug)

    def values(self) -> list[ModelState]:
        return list(self._states.values())

    @property
    def loaded(self) -> list[str]:
        """Slugs whose training state is in memory, least recently used first."""
        return list(self._states)

    def pinned_by(self, team: str) -> list[str]:
        """The models of `team` holding un-applied work, and those a call may pin now."""
        held = {s for s, state in self._states.items() if state.busy and state.record.team == team}
        return sorted(held | {s for s, t in self._pinning.items() if t == team})

    # ---------------------------------------------------------------- pinning
    @contextlib.contextmanager
    def pinning(self, record: ModelRecord) -> Iterator[None]:
        """Around a call that accumulates work on `record`'s model: refused when its team
        already pins its limit of other models."""
        slug, team = record.slug, record.team
        others = [s for s in self.pinned_by(team) if s != slug]
        if len(others) >= self.max_pinned_per_team:
            raise ResourceExhausted(
                f"your team holds un-applied gradients or pending custom-loss forwards on "
                f"{len(others)} models ({', '.join(others)}), the trainer's limit per team: "
                "run optim_step (or set_head) on one of them before training another"
            )
        self._pinning[slug] = team
        try:
            yield
        finally:
            self._pinning.pop(slug, None)

    # ------------------------------------------------------------ load, evict
    async def load(self, slug: str) -> ModelState:
        """The model's state, loaded from its head if not in memory.

        Overloaded when every slot holds a pinned or in-use state: nothing can make room.
        """
        state = self._states.get(slug)
        if state is not None:
            self._states.move_to_end(slug)
            return state
        if len(self._states) + len(self._loading) >= self.max_loaded and not self._evictable():
            raise Overloaded(
                f"all {self.max_loaded} training slots of the trainer hold models with "
                "un-applied work or calls in progress; retry shortly"
            )
        self._loading.add(slug)
        try:
            state = await self._run(load_state, self.store, self.pool, slug, self.dtype)
        finally:
            self._loading.discard(slug)
        self._states[slug] = state
        self._evict()
        return state

    def _evictable(self) -> list[str]:
        return [s for s, state in self._states.items() if not state.busy and not self.in_use(s)]

    def _evict(self) -> None:
        """Drop least recently used idle states beyond capacity (restored from heads later)."""
        excess = len(self._states) + len(self._loading) - self.max_loaded
        for slug in self._evictable()[: max(excess, 0)]:
            self.drop(slug)

    def drop(self, slug: str) -> None:
        """Forget the state of `slug` (its gradient and pending forwards with it)."""
        state = self._states.pop(slug, None)
        if state is not None:
            release_reference(self.pool, state)
        if state is not None and state.frozen_ref is not None:
            self.pool.release(state.frozen_ref)
