"""API keys: created once, stored hashed in the store, mapped to teams.

`<store>/keys.json` holds SHA-256 digests of keys and their teams, never a key itself: a
key is printed once when created and cannot be recovered. Gateways reload the file when
it changes, so a key created on any machine sharing the store works everywhere at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from pathlib import Path

from headway.errors import InvalidArgument, Unauthenticated
from headway.store.atomic import write_json

KEYS_FILE = "keys.json"
KEY_PREFIX = "hw_"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: str | Path, team: str) -> str:
    """A new key for `team`, recorded (hashed) in the store; returned once."""
    if not team or not team.replace("-", "").replace("_", "").isalnum():
        raise InvalidArgument(f"team {team!r} is not valid: use letters, digits, '-' and '_'")
    path = Path(store) / KEYS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    # Read-modify-write under an exclusive lock file: two `keys create` at once lose nothing.
    with open(path.with_suffix(".lock"), "w") as lock:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {"keys": []}
        data["keys"].append({"sha256": digest(key), "team": team, "created": time.time()})
        write_json(path, data)
    return key


class KeyRing:
    """Key → team lookups for a gateway, reloading the keys file when it changes."""

    def __init__(self, store: str | Path) -> None:
        self.path = Path(store) / KEYS_FILE
        self._teams: dict[str, str] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def _reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        with self._lock:
            self._checked = now
            try:
                mtime = os.stat(self.path).st_mtime
            except FileNotFoundError:
                self._teams, self._mtime = {}, None
                return
            if mtime != self._mtime:
                data = json.loads(self.path.read_text())
                self._teams = {k["sha256"]: k["team"] for k in data.get("keys", [])}
                self._mtime = mtime

    def team(self, authorization: str | None) -> str:
        """The team of an `Authorization: Bearer <key>` value; Unauthenticated otherwise."""
        if not authorization:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed authorization: use 'Bearer <key>'")
        self._reload()
        team = self._teams.get(digest(key.strip()))
        if team is None:
            raise Unauthenticated("unknown API key")
        return team
