"""The trainer's Prometheus metrics (served on `--metrics`; see headway.server.metrics).

Besides every call's count and latency (ForwardBackward, OptimStep, ... by status):
- `headway_trainer_models_loaded`: models whose training state is in memory;
- `headway_trainer_optim_steps_total`: checkpoints written by OptimStep;
- `headway_trainer_optim_phase_duration_seconds{phase}`: an OptimStep's parts:
  `state_wait` (for the previous step's optimizer state to finish writing, in the
  background at a lower priority), `adamw`, `checkpoint_write` (the files the head needs,
  to the page cache: durability follows in the background), `head` (promoting it);
- `headway_trainer_redis_errors_total`: head publishes (or mirror removals) Redis failed;
  each is retried in the background until it lands or the head moves on;
- `process_resident_memory_bytes`: the weights, optimizer state and activations resident.
"""

from __future__ import annotations

from headway.server.metrics import ServiceMetrics
from trainer_svc.trainer import Trainer


def add_trainer_metrics(m: ServiceMetrics, trainer: Trainer) -> None:
    """Add the trainer's own metrics to its registry `m`; sets `trainer.on_phase`."""
    m.gauge("headway_trainer_models_loaded", "models whose training state is in memory",
            lambda: len(trainer.loaded))  # fmt: skip
    steps = m.counter("headway_trainer_optim_steps", "checkpoints written by OptimStep")
    m.read_counter(
        "headway_trainer_redis_errors",
        "head publishes Redis failed (retried until they land or the head moves on)",
        lambda: trainer.heads.failures,
    )
    phases = m.histogram(
        "headway_trainer_optim_phase_duration_seconds",
        "an OptimStep's parts: state_wait, adamw, checkpoint_write, head",
        ["phase"],
    )

    def on_phase(phase: str, seconds: float) -> None:
        phases.labels(phase).observe(seconds)
        if phase == "head":
            steps.inc()

    trainer.on_phase = on_phase
