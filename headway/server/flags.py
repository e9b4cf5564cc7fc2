"""The services' command-line flags, built from their config dataclasses, and the process
setup they imply.

A flag sets one field of a config dataclass (`TrainerConfig`, `SamplerConfig`,
`GatewayConfig`, `ServeConfig`) and takes its default from that field, so a default is
written once, where the field is declared and documented; what no config holds (listen
addresses, the store) defaults to `headway.server.defaults`. Every flag of a service has a
`HEADWAY_*` environment twin whose value, when set, replaces the default and is parsed
like the flag's. `python -m trainer_svc|sampler_svc|gateway` share the store, Redis, token
and log flags (`add_common_flags`), so a flag means the same everywhere and `headway serve`
passes the same arguments to each.

Nothing here touches torch: the torch services apply their own `--threads`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from headway.server import logs
from headway.server.auth import TOKEN_ENV, TOKEN_FILE_ENV, load_token
from headway.server.defaults import STORE

C = TypeVar("C")


def on_off(value: str) -> bool:
    """An on/off setting (a flag's value or its environment twin): exactly "on" or "off".

    Nothing else is guessed at: a security switch that read "true" as off would turn
    protection off with a typo.
    """
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(
            f"must be 'on' or 'off' (as a flag or in its HEADWAY_* variable), not {value!r}"
        )
    return value == "on"


def log_format(value: str) -> str:
    """A --log-format value (a flag's or its environment twin's): text or json."""
    if value not in logs.FORMATS:
        raise argparse.ArgumentTypeError(f"must be {' or '.join(logs.FORMATS)}, not {value!r}")
    return value


def comma_list(value: str) -> list[str]:
    """A comma-separated list ("a,b"), blanks dropped: "" is the empty list."""
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one field of a config dataclass.

    Its value is parsed by the field's type: int, float, str, bool (on|off), list[str]
    (comma-separated); a flag with a `unit` is a float, and the field holds value × unit
    (MiB for a byte count, hours for seconds).
    """

    field: str  # the config field it sets
    help: str
    name: str = ""  # the flag; "" = --<field>, dashes for underscores
    env: str | None = ""  # its environment twin; "" = HEADWAY_<NAME>; None = none
    unit: float = 1
    default: Any = None  # only where the flag's default is not the field's (None: the field's)

    @property
    def flag(self) -> str:
        return self.name or "--" + self.field.replace("_", "-")

    @property
    def env_name(self) -> str | None:
        if self.env == "":
            return "HEADWAY_" + self.flag.removeprefix("--").replace("-", "_").upper()
        return self.env

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


# The flags every service (and `headway serve`) shares whose field its config declares.
COMMON_FLAGS = (
    Flag("redis_url", "Redis URL", name="--redis", env="HEADWAY_REDIS_URL"),
    Flag("redis_prefix", "prefix of every Redis key"),
    Flag(
        "threads",
        "torch CPU threads (0 = torch's default, one per core): give each process of a "
        "machine its share of the cores",
        env="HEADWAY_TORCH_THREADS",
    ),
    Flag("metrics", "host:port to serve Prometheus metrics on, GET /metrics ('' = none)"),
)


def field_defaults(config: type) -> dict[str, Any]:
    """Each field's default (a default_factory called); fields without one are left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def add_env_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str | None,
    default: Any,
    parse: Callable[[str], Any] = str,
    help: str = "",
    metavar: str | None = None,
) -> None:
    """`flag`, defaulting to $`env` when set (parsed like the flag, by argparse) else to
    `default`; the help names both."""
    raw = os.environ.get(env) if env else None
    shown = _shown(default)
    where = f"{env}; default {shown}" if env else f"default {shown}"
    parser.add_argument(
        flag,
        type=parse,
        default=default if raw is None else raw,
        metavar=metavar,
        help=f"{help} ({where})" if help else f"({where})",
    )


def add_config_flags(parser: argparse.ArgumentParser, config: type, flags: Iterable[Flag]) -> None:
    """One flag per `Flag`, parsed by and defaulting to its field of `config`."""
    defaults = field_defaults(config)
    for f in flags:
        default = defaults[f.field] if f.default is None else f.default
        parse: Callable[[str], Any] = type(default)
        metavar = None
        if f.unit != 1:
            parse, default = float, default / f.unit
        elif isinstance(default, bool):
            parse, metavar = on_off, "on|off"
        elif isinstance(default, list):
            parse = comma_list
        add_env_flag(parser, f.flag, f.env_name, default, parse, f.help, metavar)


def config_values(args: argparse.Namespace, config: type, flags: Iterable[Flag]) -> dict[str, Any]:
    """The fields `flags` set, from parsed `args` (units applied), for `config(**...)`."""
    defaults = field_defaults(config)
    out = {}
    for f in flags:
        value = getattr(args, f.dest)
        if f.unit != 1:
            value = type(defaults[f.field])(value * f.unit)
        out[f.field] = value
    return out


def _common(config: type) -> list[Flag]:
    names = {f.name for f in dataclasses.fields(config)}
    return [f for f in COMMON_FLAGS if f.field in names]


def add_common_flags(parser: argparse.ArgumentParser, config: type) -> None:
    """--store, --internal-token-file, --log-level, and those of --redis, --redis-prefix,
    --threads, --metrics whose field `config` declares."""
    add_env_flag(parser, "--store", "HEADWAY_STORE", STORE, help="checkpoint store directory")
    add_config_flags(parser, config, _common(config))
    parser.add_argument(
        "--internal-token-file",
        default=os.environ.get(TOKEN_FILE_ENV, ""),
        help=f"file holding the secret gateways send backends, which trust team metadata only "
        f"with it ({TOKEN_FILE_ENV}; else the token itself in ${TOKEN_ENV}; none: backends "
        "listen on loopback only and trust every local caller)",
    )
    add_env_flag(parser, "--log-level", "HEADWAY_LOG_LEVEL", "INFO")
    add_env_flag(
        parser,
        "--log-format",
        "HEADWAY_LOG_FORMAT",
        "text",
        log_format,
        help="text, or json: one object per line with the call's request_id, method, team "
        "and model",
    )


def build_config(
    config: Callable[..., C], args: argparse.Namespace, flags: Iterable[Flag], **extra: Any
) -> C:
    """`config` from the common flags, `flags` and `extra` fields (UnsafeConfig for a bad
    internal token file)."""
    cls: type = config  # type: ignore[assignment]
    return config(
        store=Path(args.store),
        internal_token=load_token(args.internal_token_file),
        **config_values(args, cls, [*_common(cls), *flags]),
        **extra,
    )


def setup_logging(args: argparse.Namespace, service: str) -> None:
    """Configure logging from --log-level and --log-format (`service` names the process in
    JSON lines)."""
    logs.setup(args.log_level, args.log_format, service)


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return ",".join(default) or "none"
    if isinstance(default, float):
        return f"{default:g}"
    if default == "":
        return "''"
    return str(default)
