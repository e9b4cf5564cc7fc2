"""Service flags come from the config dataclasses: one default, one parser, env twins."""

from __future__ import annotations

import argparse
import dataclasses
import os

import pytest

from gateway.__main__ import FLAGS as GATEWAY_FLAGS
from gateway.config import MIB, GatewayConfig
from headway.cli import build_parser
from headway.cli.serve_config import ServeConfig, serve_config
from headway.server.flags import add_common_flags, add_config_flags, build_config
from sampler_svc.__main__ import FLAGS as SAMPLER_FLAGS
from sampler_svc.config import SamplerConfig
from trainer_svc.__main__ import FLAGS as TRAINER_FLAGS
from trainer_svc.config import TrainerConfig

SERVICES = [
    (TrainerConfig, TRAINER_FLAGS),
    (SamplerConfig, SAMPLER_FLAGS),
    (GatewayConfig, GATEWAY_FLAGS),
]


def parse(config: type, flags: tuple, argv: list[str], **extra: object) -> object:
    parser = argparse.ArgumentParser()
    add_common_flags(parser, config)
    add_config_flags(parser, config, flags)
    return build_config(config, parser.parse_args(argv), flags, **extra)


def defaults(config: object) -> dict[str, object]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


@pytest.mark.parametrize(("config", "flags"), SERVICES, ids=lambda x: getattr(x, "__name__", ""))
def test_without_flags_a_service_config_has_its_dataclass_defaults(config, flags, monkeypatch):
    for var in [v for v in os.environ if v.startswith("HEADWAY_")]:
        monkeypatch.delenv(var)
    built = parse(config, flags, [])
    expected = config(store=built.store)
    if config is GatewayConfig:  # a gateway process serves HTTP; the dataclass does not
        expected.http_listen = built.http_listen
    assert defaults(built) == defaults(expected)


def test_an_environment_twin_replaces_the_default_and_is_parsed_like_the_flag(monkeypatch):
    monkeypatch.setenv("HEADWAY_MAX_BATCH", "7")
    monkeypatch.setenv("HEADWAY_SAMPLER_BASES", "a, b")
    monkeypatch.setenv("HEADWAY_TORCH_THREADS", "3")
    config = parse(SamplerConfig, SAMPLER_FLAGS, ["--max-seq-len", "99"])
    assert (config.max_batch, config.bases, config.threads) == (7, ["a", "b"], 3)
    assert config.max_seq_len == 99


def test_unit_flags_scale_into_their_fields(monkeypatch):
    monkeypatch.setenv("HEADWAY_AUTH", "on")
    config = parse(
        GatewayConfig,
        GATEWAY_FLAGS,
        ["--max-turn-mb", "2.5", "--trace-retention-hours", "2"],
        insecure=False,
    )
    assert config.max_turn_bytes == int(2.5 * MIB)
    assert config.trace_retention_seconds == 7200.0
    assert config.auth is True


def test_a_bad_environment_value_is_a_usage_error_naming_the_flag(monkeypatch, capsys):
    monkeypatch.setenv("HEADWAY_AUTH", "true")
    with pytest.raises(SystemExit) as exit_:
        parse(GatewayConfig, GATEWAY_FLAGS, [], insecure=False)
    assert exit_.value.code == 2
    assert "--auth" in capsys.readouterr().err


def test_headway_serve_flags_default_to_serve_config(monkeypatch):
    for var in ("HEADWAY_STORE", "HEADWAY_REDIS_URL", "HEADWAY_REDIS_PREFIX"):
        monkeypatch.delenv(var, raising=False)
    config = serve_config(build_parser().parse_args(["serve"]))
    assert defaults(config) == defaults(ServeConfig(store=config.store))
    config = serve_config(build_parser().parse_args(["serve", "--auth", "on", "--samplers", "2"]))
    assert (config.auth, config.samplers) == (True, 2)
