"""API keys: created once, stored hashed in the store, mapped to a team and a role.

`<store>/keys.json` (mode 0600) holds SHA-256 digests of keys, each with its team and
whether it is an admin key (registering bases), never a key itself: a key is printed once
when created and cannot be recovered. A key is named by its id, the first characters of
its digest (`headway keys list`, `headway keys revoke <id>`). Gateways stat the file on
every authentication and reload it when its (inode, mtime_ns, size) changed, so a key
created or revoked on any machine sharing the store takes effect everywhere at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headway.errors import InvalidArgument, NotFound, Unauthenticated
from headway.server.auth import Caller
from headway.store.atomic import write_json

KEYS_FILE = "keys.json"
KEY_PREFIX = "hw_"
ID_CHARS = 12  # digest characters of a key id: unique in practice, short to type
MIN_ID_CHARS = 6  # a shorter prefix is refused by `revoke` (too easy to hit another key)
FILE_MODE = 0o600  # the digests are not secrets, but nobody else needs to read them


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    """One key as the store knows it (never the key itself)."""

    sha256: str
    team: str
    admin: bool
    created: float

    @property
    def id(self) -> str:
        return self.sha256[:ID_CHARS]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> KeyEntry:
        # Entries written before roles existed have no "admin": they are team keys.
        return cls(raw["sha256"], raw["team"], bool(raw.get("admin", False)), raw["created"])


def _path(store: str | Path) -> Path:
    return Path(store) / KEYS_FILE


@contextmanager
def _locked(store: str | Path) -> Iterator[dict[str, Any]]:
    """The keys file's content, to modify in place and write back (0600) on exit, under
    an exclusive lock file: two commands at once lose nothing."""
    import fcntl

    path = _path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
    with os.fdopen(fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {"keys": []}
        yield data
        # A new file each time (written beside, renamed over): an existing file with
        # looser permissions is replaced by a private one.
        write_json(path, data, mode=FILE_MODE)


def create_key(store: str | Path, team: str, admin: bool = False) -> str:
    """A new key for `team` (an admin key if `admin`), recorded hashed; returned once."""
    if not team or not team.replace("-", "").replace("_", "").isalnum():
        raise InvalidArgument(f"team {team!r} is not valid: use letters, digits, '-' and '_'")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = {"sha256": digest(key), "team": team, "admin": admin, "created": time.time()}
    with _locked(store) as data:
        data["keys"].append(entry)
    return key


def list_keys(store: str | Path) -> list[KeyEntry]:
    """Every key of the store, oldest first."""
    path = _path(store)
    if not path.is_file():
        return []
    return [KeyEntry.from_json(k) for k in json.loads(path.read_text()).get("keys", [])]


def revoke_key(store: str | Path, key_id: str) -> KeyEntry:
    """Remove the one key whose id starts with `key_id`; its entry. InvalidArgument for
    a prefix too short or matching several keys, NotFound when none matches."""
    key_id = key_id.strip().lower()
    if len(key_id) < MIN_ID_CHARS:
        raise InvalidArgument(
            f"key id {key_id!r} is too short: give at least {MIN_ID_CHARS} characters of the "
            "ID column of `headway keys list`"
        )
    with _locked(store) as data:
        matches = [k for k in data["keys"] if k["sha256"].startswith(key_id)]
        if not matches:
            raise NotFound(f"no key with id {key_id!r}: see `headway keys list`")
        if len(matches) > 1:
            raise InvalidArgument(f"key id {key_id!r} matches {len(matches)} keys: give more of it")
        data["keys"].remove(matches[0])
    return KeyEntry.from_json(matches[0])


class KeyRing:
    """Key → caller (team, admin) lookups for a gateway, reloading the keys file when it
    changes (checked on every lookup: one stat)."""

    def __init__(self, store: str | Path) -> None:
        self.path = _path(store)
        self._callers: dict[str, Caller] = {}
        # (st_ino, st_mtime_ns, st_size) of the file loaded: a rename over it changes the
        # inode even within one mtime tick, and an in-place rewrite its mtime or size.
        self._signature: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def _reload(self) -> None:
        with self._lock, contextlib.ExitStack() as stack:
            try:
                f = stack.enter_context(open(self.path, "rb"))
            except FileNotFoundError:
                self._callers, self._signature = {}, None
                return
            st = os.fstat(f.fileno())  # the file read, not whatever the name holds now
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
            if signature == self._signature:
                return
            entries = [KeyEntry.from_json(k) for k in json.loads(f.read()).get("keys", [])]
            self._callers = {e.sha256: Caller(e.team, e.admin) for e in entries}
            self._signature = signature

    def has_keys(self) -> bool:
        """Whether the keys file holds any key."""
        self._reload()
        return bool(self._callers)

    def caller(self, authorization: str | None) -> Caller:
        """The caller of an `Authorization: Bearer <key>` value; Unauthenticated otherwise."""
        if not authorization:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed authorization: use 'Bearer <key>'")
        self._reload()
        caller = self._callers.get(digest(key.strip()))
        if caller is None:
            raise Unauthenticated(
                "unknown API key: it may have been revoked or mistyped; use a key this "
                "deployment issued (an operator creates one with `headway keys create --team T`)"
            )
        return caller

    def team(self, authorization: str | None) -> str:
        """The team of an `Authorization: Bearer <key>` value; Unauthenticated otherwise."""
        return self.caller(authorization).team
