"""A sampler replica's Prometheus metrics (served on `--metrics`; see headway.server.metrics).

Read at each scrape from the replica's own counters (the engine thread keeps plain integers;
it touches prometheus_client only to record a load, a few per reload):
- `headway_sampler_queue_depth`: requests waiting to start or to finish scoring;
- `headway_sampler_queued_rows`, `headway_sampler_live_rows`: sequences waiting, decoding;
- `headway_sampler_engines`: weight sets resident;
- `headway_sampler_tokens_total`, `headway_sampler_steps_total`: tokens decoded and decode
  steps run (tokens/s is `rate(headway_sampler_tokens_total[1m])`);
- `headway_sampler_load_duration_seconds{kind}`: loads of weights, `lora` (an adapter into a
  slot: a LoRA head's reload), `full` (full weights into an idle engine: a full fork's
  reload) or `engine` (a new engine);
- `headway_sampler_redis_reconnects_total`: head-event subscriptions re-established.
"""

from __future__ import annotations

from headway.server.metrics import ServiceMetrics
from sampler_svc.sampler import Sampler
from sampler_svc.watch import Watcher


def add_replica_metrics(m: ServiceMetrics, sampler: Sampler, watcher: Watcher) -> None:
    """Add a replica's own metrics to its registry `m`; sets `sampler.on_load` to time its
    loads."""
    m.gauge("headway_sampler_queue_depth", "requests waiting to start or to finish scoring",
            lambda: sampler.queue_depth)  # fmt: skip
    m.gauge("headway_sampler_queued_rows", "sequences of requests waiting to start",
            lambda: sampler.queued_rows)  # fmt: skip
    m.gauge("headway_sampler_live_rows", "sequences decoding", lambda: sampler.live_rows)
    m.gauge("headway_sampler_engines", "weight sets resident", lambda: len(sampler.engines))
    m.read_counter("headway_sampler_tokens", "tokens decoded", lambda: sampler.tokens)
    m.read_counter("headway_sampler_steps", "decode steps run", lambda: sampler.steps)
    m.read_counter(
        "headway_sampler_redis_reconnects",
        "head-event subscriptions re-established after losing Redis",
        lambda: max(0, watcher.reconciles - 1),
    )
    loads = m.histogram(
        "headway_sampler_load_duration_seconds",
        "weight loads: lora (adapter into a slot), full (into an idle engine), engine (new)",
        ["kind"],
    )
    sampler.on_load = lambda kind, seconds: loads.labels(kind).observe(seconds)
