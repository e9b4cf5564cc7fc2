"""The sampler bench's decode workload: a replica in this process, requests, and timings.

One sampler replica's grpc.aio server runs on a private event loop in a daemon thread, as
in production; `stream` times a SampleStream's decode phase, `concurrent` the wall time of
single-sequence Sample calls sent at once, and `engine_decode` the same engine driven on
its own thread without RPC. See `bench_sampler.py` for what is measured and why.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import numpy as np

from bench.common import run_at_once
from headway.channels import CHANNEL_OPTIONS
from headway.tensors import to_tensor
from headway.v1 import common_pb2, sampling_pb2, sampling_pb2_grpc

PROMPT, NEW, BATCH = 32, 64, 8
DECODED = NEW - 1  # tokens per row made by decode steps (the first comes from the prefill)
BASE = "base40m"
QWEN35, BASE35 = "qwen3_5-40m", "base-qwen35"  # the Qwen3.5-shaped config and its base
I32 = common_pb2.DTYPE_INT32
now = time.perf_counter


class SamplerThread:
    """A sampler replica's grpc.aio server on a private event loop in a daemon thread."""

    def __init__(self, config: Any) -> None:
        from sampler_svc.server import create_replica

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def boot() -> tuple[Any, int, Any]:
            server, port, replica = await create_replica(config)
            await server.start()
            return server, port, replica

        _, port, self.replica = self.run(boot())
        self.sampler = self.replica.sampler
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        self.stub = sampling_pb2_grpc.SamplingServiceStub(self.channel)

    def run(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.channel.close()
        self.run(self.replica.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def request(
    model: str, prompt: list[int], n: int, temperature: float, seed: int, max_tokens: int = NEW
) -> sampling_pb2.SampleRequest:
    params = common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=True, n=n
    )
    return sampling_pb2.SampleRequest(
        model=model, prompt_tokens=to_tensor(prompt, I32), params=params
    )


def stream(stub: Any, req: sampling_pb2.SampleRequest) -> dict[str, Any]:
    """Run a SampleStream: decode-phase time, end-to-end time and the tokens of each row."""
    n = req.params.n or 1
    rows: list[list[int]] = [[] for _ in range(n)]
    start = now()
    decode_start = last = 0.0
    firsts = 0
    for chunk in stub.SampleStream(req):
        if not chunk.tokens.data:
            continue
        t = now()
        tokens = np.frombuffer(chunk.tokens.data, np.int32).tolist()
        if not rows[chunk.index]:
            firsts += 1
            if firsts == n:  # every row has its prefill token: decoding starts
                decode_start = t
        rows[chunk.index].extend(tokens)
        last = t
    assert all(len(r) == NEW for r in rows), [len(r) for r in rows]
    return {"decode": last - decode_start, "e2e": now() - start, "rows": rows}


def concurrent(stub: Any, prompts: list[list[int]], seed: int) -> float:
    """Wall time of len(prompts) single-sequence Sample calls sent at once from threads."""

    def call(req: sampling_pb2.SampleRequest) -> None:
        reply = stub.Sample(req)
        assert len(reply.sequences[0].tokens.data) == 4 * NEW

    requests = [request(BASE, p, 1, 1.0, seed + i) for i, p in enumerate(prompts)]
    return run_at_once([lambda r=r: call(r) for r in requests])


def drive(sampler: Any, prompt: list[int], n: int, temperature: float, seed: int) -> float:
    """On the engine thread: admit one job on the base's engine and step it to the end;
    the decode phase's time (after the prefill)."""
    from sampler_svc.engine import GenerationJob
    from sampler_svc.requests import row_generator
    from sampler_svc.sampling import DrawParams

    located = sampler.ensure(BASE, sampler.store.head(BASE))
    assert located is not None
    entry, slot = located
    draws = [DrawParams(temperature, 1.0, 0, row_generator(seed, i)) for i in range(n)]
    job = GenerationJob(prompt, n, NEW, frozenset(), draws, slot=slot)
    entry.engine.admit(job)
    start = now()
    while job.live_rows:
        entry.engine.step()
    return now() - start


def engine_decode(sampler: Any, prompt: list[int], n: int, temperature: float, seed: int) -> float:
    """Decode-phase time of the replica's engine driven directly on its thread (no RPC)."""
    return sampler.call(lambda: drive(sampler, prompt, n, temperature, seed))


def profile_engine(sampler: Any, prompt: list[int], n: int, temperature: float) -> None:
    """torch.profiler over one request's decode steps on the engine thread."""
    from torch.profiler import ProfilerActivity, profile

    def run() -> str:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            drive(sampler, prompt, n, temperature, 0)
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)

    print(f"\ntorch.profiler: engine decode, batch {n}, prefill + {DECODED} steps (self CPU)")
    print(sampler.call(run))


class SamplerProcess:
    """A replica as `python -m sampler_svc` (e.g. `--dtype bf16`), a child process of its
    own: its start-up is timed from the spawn to its first Sample answered (the base
    loaded, the kernel layouts measured into an empty cache: a first start on a machine)."""

    def __init__(self, store: Any, prefix: str, log: Any, args: list[str]) -> None:
        import os
        import tempfile
        from pathlib import Path

        from headway.testing import ServiceProcess

        self.cache = Path(tempfile.mkdtemp(prefix="headway-bench-kernels-")) / "kernels.json"
        before = os.environ.get("HEADWAY_KERNEL_CACHE")
        inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["HEADWAY_KERNEL_CACHE"] = str(self.cache)
        # No compiled code either (this process's compiles set the variable to its cache).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache.parent / "inductor")
        start = now()
        try:
            self.service = ServiceProcess(
                "sampler", "sampler_svc", ["--store", str(store), *args], log, prefix,
                threads=str(os.cpu_count() or 1),
            )  # fmt: skip
        finally:
            for name, value in (
                ("HEADWAY_KERNEL_CACHE", before),
                ("TORCHINDUCTOR_CACHE_DIR", inductor),
            ):
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self.stub = sampling_pb2_grpc.SamplingServiceStub(self.service.channel)
        deadline = start + 180
        while True:
            try:
                self.stub.Sample(request(BASE, [1, 2, 3], 1, 0.0, 0, max_tokens=2), timeout=5)
                break
            except grpc.RpcError:
                if now() > deadline or self.service.proc.poll() is not None:
                    tail = self.service.tail()
                    raise AssertionError(f"sampler never served:\n{tail}") from None
                time.sleep(0.05)
        self.startup_s = now() - start

    def logged(self, *needles: str) -> list[str]:
        """The lines of the replica's log holding any of `needles` (its kernel choices)."""
        text = self.service.log.read_text(errors="replace") if self.service.log.exists() else ""
        return [line for line in text.splitlines() if any(n in line for n in needles)]

    def stop(self) -> None:
        import shutil

        self.service.stop()
        shutil.rmtree(self.cache.parent, ignore_errors=True)


def sampled_logprobs(stub: Any, req: sampling_pb2.SampleRequest) -> list[tuple[list[int], Any]]:
    """A Sample's (tokens, logprobs) per sequence."""
    reply = stub.Sample(req)
    return [(np.frombuffer(s.tokens.data, np.int32).tolist(),
             np.frombuffer(s.logprobs.data, np.float32)) for s in reply.sequences]  # fmt: skip


def scored_logprobs(stub: Any, model: str, sequences: list[list[int]]) -> list[Any]:
    """ComputeLogprobs of whole sequences (prompt + completion)."""
    req = sampling_pb2.ComputeLogprobsRequest(
        model=model, sequences=[to_tensor(s, I32) for s in sequences]
    )
    return [np.frombuffer(t.data, np.float32) for t in stub.ComputeLogprobs(req).logprobs]
