"""What only the services share (never imported by the SDK a client installs).

- `defaults.py`  addresses, the store path, the Redis URL: every default written once
- `flags.py`     the command-line flags of every service, built from its config dataclass
- `grpc.py`      server options, the one error → status mapping, request parsing, health
- `auth.py`      who a backend call acts for, and the internal token gateways send
- `keys.py`      API keys: created, listed, revoked, looked up by gateways
- `heads.py`     head events on Redis and the head mirror keys
- `replicas.py`  the sampler registry in Redis
- `turns.py`     the one validator of a recorded turn (gateway traces, trainer datums)
"""
