"""`ScoringJob`: a ComputeLogprobs call, run on the engine thread a piece at a time.

The engine thread alternates one decode step of every live row with one piece of the
oldest scoring job, a piece being at most `logprobs_chunk_tokens` tokens of forward work:
whole short sequences, or the next stretch of a long one (its earlier positions kept in a
one-row KV cache of its own, freed when it is done). So however large a call is, a decode
step waits for one piece at most, and a running Sample keeps producing tokens.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from headway.modeling import KVCache
from sampler_svc.engine import Engine


@dataclass
class ScoringJob:
    """Logprobs of `sequences` under (model, checkpoint); the result arrives in `future`."""

    model: str
    checkpoint: str
    sequences: list[list[int]]
    future: Future[list[np.ndarray]] = field(default_factory=Future)
    slot: int | None = None  # adapter slot once placed on an engine
    results: list[np.ndarray] = field(default_factory=list)
    _pos: int = 0  # next position of the sequence in progress (a long one)
    _parts: list[np.ndarray] = field(default_factory=list)  # its pieces so far
    _caches: list[KVCache] | None = None  # its positions before _pos
    pieces: int = 0  # pieces run so far

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.sequences)

    def run_piece(self, engine: Engine, budget: int) -> None:
        """Run at most `budget` tokens of forward work (at least one sequence's piece)."""
        assert self.slot is not None and not self.done
        self.pieces += 1
        ran = 0
        while not self.done:
            ids = self.sequences[len(self.results)]
            if self._pos == 0 and len(ids) <= budget:  # a short sequence: one forward
                if ran and ran + len(ids) > budget:
                    return  # the next piece takes it
                self.results.append(engine.score(ids, 0, len(ids), None, self.slot))
                ran += len(ids)
                continue
            if ran:
                return  # a long sequence starts a piece of its own
            if self._caches is None:
                self._caches = engine.model.new_caches(1, len(ids))
            end = min(len(ids), self._pos + budget)
            self._parts.append(engine.score(ids, self._pos, end, self._caches, self.slot))
            self._pos = end
            if end == len(ids):
                self.results.append(np.concatenate(self._parts))
                self._pos, self._parts, self._caches = 0, [], None
            return

    def finish(self, error: BaseException | None = None) -> None:
        """Deliver the result (or `error`), unless the caller has cancelled."""
        self._caches = None
        if not self.future.set_running_or_notify_cancel():
            return  # cancelled by the caller (it left)
        if error is None:
            self.future.set_result(self.results)
        else:
            self.future.set_exception(error)
