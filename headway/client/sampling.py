"""`SamplingClient`: samples one model through the gateway, with token ids and per-token
logprobs; and its blocking twin `SyncSamplingClient`."""

from __future__ import annotations

from collections.abc import Sequence

from headway.client import rpcs
from headway.client.base import BoundClient
from headway.client.blocking import SyncBoundClient, blocking_twin
from headway.types import LogprobsResult, SampleResult

__all__ = ["SamplingClient", "SyncSamplingClient"]


class SamplingClient(BoundClient):
    """Samples one model through the gateway, with token ids and per-token logprobs.

    Settings as `TrainingClient`. Without `checkpoint`, a sample is served by the model's
    head as of the call (never an older one).
    """

    _purpose = "sample"

    def sync(self) -> SyncSamplingClient:
        """A blocking client for the same model and settings."""
        return SyncSamplingClient(self.model, **self.settings.options())

    async def sample(
        self,
        prompt: str | Sequence[int],
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        checkpoint: str | None = None,
        *,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        top_logprobs: int = 0,
        prompt_logprobs: bool = False,
    ) -> SampleResult:
        """Sample `n` completions of `prompt` (text as is, or token ids).

        Text is tokenized by the model's tokenizer without a chat template. Each sequence
        has its tokens, their logprobs under the policy at temperature 1 (whatever the
        temperature of the draw), its text and stop reason ("stop" or "length"). The same
        `seed` and request give the same tokens. `top_logprobs` = k (≤ 20): each position's
        k most likely tokens with their logprobs (`SampledSequence.top_logprobs`, and the
        prompt's with `prompt_logprobs`, which also returns the prompt tokens' logprobs).
        """
        call = rpcs.sample(
            self.model,
            prompt,
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stop,
            seed=seed,
            checkpoint=checkpoint,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        # Sampling changes nothing on the server: always safe to retry.
        return SampleResult.from_proto(await self._call(call))

    async def compute_logprobs(
        self, sequences: Sequence[Sequence[int]], checkpoint: str | None = None
    ) -> LogprobsResult:
        """Score token sequences: for each, log p(seq[i+1] | seq[..i]) at temperature 1,
        from the model's head (or `checkpoint`), as a Sample reports the tokens it draws
        (an evaluation, or a KL to a reference). Each sequence needs at least one token."""
        call = rpcs.compute_logprobs(self.model, sequences, checkpoint)
        return LogprobsResult.from_proto(await self._call(call))  # read-only: retried safely


@blocking_twin(SamplingClient)
class SyncSamplingClient(SyncBoundClient):
    """The blocking twin of `SamplingClient`: same constructor, same methods, no await."""
