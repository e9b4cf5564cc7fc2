"""`TraceClient`: the traces the gateway holds (attach rewards, read them back); and its
blocking twin `SyncTraceClient`."""

from __future__ import annotations

from headway.client import rpcs
from headway.client.base import GatewayClient
from headway.client.blocking import SyncClient, blocking_twin
from headway.types import Run, Turn

__all__ = ["SyncTraceClient", "TraceClient"]


class TraceClient(GatewayClient):
    """The traces the gateway holds: attach rewards, read them back.

    The OpenAI-compatible endpoint records a trace per completion requested with
    `return_token_ids`; a trace with a reward can be trained on by its id. Settings as
    `TrainingClient`.
    """

    def sync(self) -> SyncTraceClient:
        """A blocking client with the same settings."""
        return SyncTraceClient(**self.settings.options())

    async def set_reward(self, trace_id: str, reward: float) -> None:
        """Attach `reward` to a trace (replacing any previous one)."""
        await self._call(rpcs.set_reward(trace_id, reward))

    async def get_trace(self, trace_id: str) -> Run:
        """A trace as a `Run` (turns, trace id, model; reward None when it has none)."""
        trace = await self._call(rpcs.get_trace(trace_id))
        return Run(
            turns=[Turn.from_proto(t) for t in trace.turns],
            reward=trace.reward if trace.has_reward else None,
            trace_id=trace.trace_id,
            model=trace.model,
        )


@blocking_twin(TraceClient)
class SyncTraceClient(SyncClient):
    """The blocking twin of `TraceClient`: same constructor, same methods, no await."""
