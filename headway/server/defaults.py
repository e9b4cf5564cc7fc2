"""Where a deployment's processes listen and keep their state when nothing else is said.

Each default is written here once: the config dataclasses (`TrainerConfig`, ...), the
services' flags (`headway.server.flags`) and `headway serve` read it from here. The
gateway's own addresses live in `headway.channels`, since clients dial them too. Plain
constants, no imports of consequence: the CLI reads them when it builds its parser.
"""

from __future__ import annotations

from headway.channels import GATEWAY_ADDRESS, GATEWAY_HTTP_ADDRESS

__all__ = [
    "GATEWAY_ADDRESS",
    "GATEWAY_HTTP_ADDRESS",
    "MAX_LORA_RANK",
    "REDIS_URL",
    "SAMPLER_ADDRESS",
    "SAMPLER_PORT",
    "STORE",
    "TRAINER_ADDRESS",
]

STORE = "./headway-store"  # the checkpoint store, relative to the working directory
REDIS_URL = "redis://127.0.0.1:6379/0"
TRAINER_ADDRESS = "127.0.0.1:50052"
# Largest LoRA rank: of a fork (the trainer) and of the adapter slots that serve it (the
# samplers). One value, so that whatever the trainer creates, the samplers can load.
MAX_LORA_RANK = 64

SAMPLER_PORT = 50053  # `headway serve` puts sampler replica i on this port + i
SAMPLER_ADDRESS = f"127.0.0.1:{SAMPLER_PORT}"
