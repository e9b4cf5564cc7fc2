"""`ReplyCache`: the replies of applied training calls, by (model, request_id), in bytes bounds.

The rule (training.proto's idempotency, as this trainer keeps it):

- A training call with a request_id stores its reply once it has applied. A retry with
  the same id (for the same model) gets that reply and applies nothing; the same id used
  by another kind of call is INVALID_ARGUMENT.
- What is stored is what a retry needs and nothing more. ForwardBackward / Step: the
  reply (metrics, per-datum logprobs). BackwardCustom / OptimStep: the small reply.
  ForwardCustom: only its forward_id and metrics, never the datums: a retry rebuilds
  the reply from the pending forward, which holds them until its BackwardCustom (its
  memory is bounded by the pending-forward limits); once that forward is consumed or
  discarded, a retry is FAILED_PRECONDITION.
- The cache is bounded per model (entries and bytes) and in total (bytes), least
  recently used first. A reply over the per-model budget is kept as a marker without
  its payload: a retry learns it was applied (FAILED_PRECONDITION) instead of applying
  it twice.
- An evicted id is forgotten, as training.proto's "server-configured window" allows: a
  retry after that runs as a new call. OptimStep and Step ids are also written in their
  checkpoint's meta.json, so their retries are recognised from disk after eviction or a
  restart.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from headway.errors import FailedPrecondition, InvalidArgument

# Bookkeeping of an entry beyond its payload (keys, dataclass, dict slots): a fair bound,
# so that millions of tiny replies are bounded by bytes too.
ENTRY_OVERHEAD = 256


@dataclass
class Reply:
    """A stored reply: `value` is None when it was applied but too large to keep."""

    kind: str
    value: Any
    size: int

    def value_for(self, kind: str, request_id: str) -> Any:
        """The stored value a retry of a `kind` call gets back, or the error saying why
        it cannot."""
        if self.kind != kind:
            raise InvalidArgument(
                f"request_id {request_id!r} was already used by a {self.kind} call; "
                "use a fresh id for each call"
            )
        if self.value is None:
            raise FailedPrecondition(
                f"request_id {request_id!r}: this {kind} was applied once already; its reply "
                "was too large to keep, so it cannot be sent again (nothing was applied twice)"
            )
        return self.value


class ReplyCache:
    """Replies by model and request id, LRU within (entries, bytes) per model and bytes in
    total."""

    def __init__(self, model_entries: int, model_bytes: int, total_bytes: int) -> None:
        self.model_entries = model_entries
        self.model_bytes = model_bytes
        self.total_bytes = total_bytes
        # Models least recently written first; each model's replies oldest first.
        self._models: OrderedDict[str, OrderedDict[str, Reply]] = OrderedDict()
        self._bytes: dict[str, int] = {}
        self.nbytes = 0

    def get(self, slug: str, request_id: str) -> Reply | None:
        """The reply stored for `request_id` on `slug` (now most recently used), or None."""
        replies = self._models.get(slug)
        reply = replies.get(request_id) if replies is not None else None
        if reply is not None:
            replies.move_to_end(request_id)  # type: ignore[union-attr]
            self._models.move_to_end(slug)
        return reply

    def put(self, slug: str, request_id: str, kind: str, value: Any, size: int) -> None:
        """Store a reply of `size` payload bytes (a marker without it, when over budget)."""
        size += ENTRY_OVERHEAD + len(slug) + len(request_id)
        if size > self.model_bytes:
            value, size = None, ENTRY_OVERHEAD + len(slug) + len(request_id)
        replies = self._models.setdefault(slug, OrderedDict())
        self._models.move_to_end(slug)
        old = replies.pop(request_id, None)
        if old is not None:
            self._account(slug, -old.size)
        replies[request_id] = Reply(kind, value, size)
        self._account(slug, size)
        while len(replies) > self.model_entries or self._bytes[slug] > self.model_bytes:
            self._pop_oldest(slug)
        while self.nbytes > self.total_bytes and self._models:
            self._pop_oldest(next(iter(self._models)))

    def forget(self, slug: str) -> None:
        """Drop every reply of `slug` (deleted)."""
        self._models.pop(slug, None)
        self.nbytes -= self._bytes.pop(slug, 0)

    def __len__(self) -> int:
        return sum(len(r) for r in self._models.values())

    def _pop_oldest(self, slug: str) -> None:
        replies = self._models[slug]
        _, reply = replies.popitem(last=False)
        self._account(slug, -reply.size)
        if not replies:
            self.forget(slug)

    def _account(self, slug: str, delta: int) -> None:
        self._bytes[slug] = self._bytes.get(slug, 0) + delta
        self.nbytes += delta
