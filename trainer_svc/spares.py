"""`SpareWriter`: one model's checkpoint files written over spare files made ahead, where
its own writes measured that faster (`headway.store.pages`).

A full fork writes its weights (162 MB for a 40M model) on the OptimStep's path and its
optimizer state (twice that) just after; allocating the page-cache pages of a new file was
most of either write on an AMD EPYC Zen 4 guest, and the allocation of the deferred one,
right after the head is published, slowed the samplers' reload copies beside it. So each
file may go over a spare whose pages were allocated while the model trained, made once
the step's last write is done (away from the reloads), and each file keeps the way its own
writes measured faster (`SpareChoice`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from headway.store import CheckpointStore
from headway.store.pages import SpareChoice
from headway.store.tensorfile import TensorFilePlan, write_plan

log = logging.getLogger(__name__)


class SpareWriter:
    """Writes the files of one checkpoint of model `slug` (`write`), then has the spares
    of its next checkpoint made (`prepare_next`). `choices` (file name → SpareChoice)
    outlive it: the model's state keeps them.

    The spares are taken when it is made, before the checkpoint's meta.json is written
    (the optimizer state's write comes after it): `sized_first` names the files that will
    be written over one, which the checkpoint records for recovery's hole check."""

    def __init__(
        self,
        store: CheckpointStore,
        slug: str,
        choices: dict[str, SpareChoice],
        min_bytes: int,
        names: list[str],
    ) -> None:
        self.store, self.slug, self.choices, self.min_bytes = store, slug, choices, min_bytes
        self.sizes: dict[str, int] = {}
        taken = {name: store.take_spare(slug, name) for name in names}
        self.spares = {name: path for name, path in taken.items() if path is not None}

    @property
    def sized_first(self) -> list[str]:
        """The files this checkpoint writes over a spare (sized before their data)."""
        return sorted(self.spares)

    def write(self, name: str, path: Path, plan: TensorFilePlan) -> int:
        """Write `plan` as file `path` (named `name` in the checkpoint), over a spare if
        one was made for it; time it for the choice."""
        spare = self.spares.pop(name, None)
        if spare is None and plan.size < self.min_bytes:
            return write_plan(path, plan)
        start = time.perf_counter()
        write_plan(path, plan, spare)
        choice = self.choices.setdefault(name, SpareChoice())
        decided = choice.decided
        choice.record(spare is not None, time.perf_counter() - start)
        if choice.decided and not decided:
            fast = choice.faster()
            log.info(
                "%s: %s written faster %s (%.1f vs %.1f ms, medians)",
                self.slug,
                name,
                "over a spare" if fast else "as a new file",
                1e3 * choice.median(fast),
                1e3 * choice.median(not fast),
            )
        self.sizes[name] = plan.size
        return plan.size

    def discard(self, name: str) -> None:
        """Remove the spare taken for `name`, if any: the file was written another way."""
        spare = self.spares.pop(name, None)
        if spare is not None:
            spare.unlink(missing_ok=True)

    def prepare_next(self) -> None:
        """Have the next checkpoint's spares made (same layout: same sizes), for the files
        whose writes go over one next."""
        for name, size in self.sizes.items():
            if self.choices[name].use_spare():
                try:  # a spare is an optimisation: never a failed write
                    self.store.prepare_spare(self.slug, name, size)
                except Exception as e:
                    log.warning("%s: no spare for %s: %s", self.slug, name, e)
