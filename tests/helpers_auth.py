"""A deployment as an operator secures it: auth on, API keys with roles, a trainer and a
sampler that trust only the gateway's internal token, base roots. Real servers on
loopback (tests/stack.py), real Redis, real files.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import grpc
import pytest

from headway.server.keys import create_key
from headway.v1 import model_pb2
from tests.stack import GatewayNode, SamplerReplica, TrainerStack, make_tiny_base


def bearer(key: str) -> list[tuple[str, str]]:
    """The metadata a client sends with an API key."""
    return [("authorization", f"Bearer {key}")]


def code_of(call) -> tuple[str, str]:
    """(status name, details) of a gRPC call that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code().name, err.value.details() or ""


class SecuredStack:
    """Trainer + one sampler + a gateway (auth on), sharing a random internal token.

    Keys: `admin` (team ops, an admin key), `red` and `blue` (team keys). The base "tiny"
    lives under the base root `roots` and is registered through the gateway by the admin.
    """

    def __init__(self, tmp: Path) -> None:
        self.store = tmp / "store"
        self.roots = tmp / "roots"
        self.base = make_tiny_base(self.roots / "tiny-base")
        self.token = secrets.token_urlsafe(32)
        self.trainer = TrainerStack(self.store, internal_token=self.token, base_roots=[self.roots])
        self.sampler: SamplerReplica | None = None
        self.gateway: GatewayNode | None = None
        try:
            self.sampler = SamplerReplica(
                self.store, self.trainer.prefix, internal_token=self.token, max_seq_len=256
            )
            self.gateway = GatewayNode(
                self.store,
                self.trainer.prefix,
                self.trainer.server.address,
                auth=True,
                internal_token=self.token,
            )
            self.keys = {
                "admin": create_key(self.store, "ops", admin=True),
                "red": create_key(self.store, "red"),
                "blue": create_key(self.store, "blue"),
            }
            self.add_base(self.base, "tiny", "admin")
        except BaseException:
            self.stop()
            raise

    def md(self, who: str) -> list[tuple[str, str]]:
        return bearer(self.keys[who])

    def add_base(self, path: Path | str, name: str, who: str) -> object:
        """AddBase through the gateway with the key of `who`."""
        request = model_pb2.AddBaseRequest(path=str(path), name=name)
        return self.gateway.models.AddBase(request, metadata=self.md(who), timeout=120)

    def slugs(self) -> list[str]:
        """Every model the store holds, of every team."""
        return sorted(m.slug for m in self.trainer.trainer.store.list_models())

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        if self.sampler is not None:
            self.sampler.stop()
        self.trainer.stop()
