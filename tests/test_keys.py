"""API keys: a private keys file, roles, `headway keys list` / `revoke`, and gateways that
reload the file whenever it changes. Real files, real CLI processes, a real gateway."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from headway.errors import InvalidArgument, NotFound, Unauthenticated
from headway.server.auth import Caller
from headway.server.keys import KEYS_FILE, KeyRing, create_key, digest, list_keys, revoke_key
from tests.stack import GatewayNode, free_port, redis_prefix

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "headway.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_keys_file_is_created_private(tmp_path):
    create_key(tmp_path, "red")
    assert _mode(tmp_path / KEYS_FILE) == 0o600


def test_a_readable_keys_file_is_made_private_on_the_next_write(tmp_path):
    create_key(tmp_path, "red")
    os.chmod(tmp_path / KEYS_FILE, 0o644)
    create_key(tmp_path, "blue")
    assert _mode(tmp_path / KEYS_FILE) == 0o600
    assert [e.team for e in list_keys(tmp_path)] == ["red", "blue"]


def test_keys_list_shows_ids_teams_and_roles_never_keys(tmp_path):
    store = str(tmp_path / "store")
    admin = _cli("keys", "create", "--team", "ops", "--admin", "--store", store)
    team = _cli("keys", "create", "--team", "red", "--store", store)
    assert admin.returncode == 0 and team.returncode == 0, admin.stderr + team.stderr
    assert "admin key" in admin.stderr
    listed = _cli("keys", "list", "--store", store)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "TEAM", "ADMIN", "CREATED"]
    rows = [line.split()[:3] for line in lines[1:]]
    keys = [admin.stdout.strip(), team.stdout.strip()]
    assert rows == [[digest(keys[0])[:12], "ops", "yes"], [digest(keys[1])[:12], "red", "no"]]
    for key in keys:  # neither the key nor its whole digest is shown
        assert key not in listed.stdout and digest(key) not in listed.stdout


def test_entries_written_before_roles_are_team_keys(tmp_path):
    key = "hw_an-old-key"
    entry = {"sha256": digest(key), "team": "red", "created": 1.0}
    (tmp_path / KEYS_FILE).write_text(json.dumps({"keys": [entry]}))
    assert KeyRing(tmp_path).caller(f"Bearer {key}") == Caller("red", admin=False)
    assert not list_keys(tmp_path)[0].admin


def test_revoke_needs_one_unambiguous_id(tmp_path):
    key = create_key(tmp_path, "red")
    with pytest.raises(InvalidArgument, match="too short"):
        revoke_key(tmp_path, digest(key)[:3])
    with pytest.raises(NotFound):
        revoke_key(tmp_path, "zzzzzzzz")  # no digest has a z
    result = _cli("keys", "revoke", "zzzzzzzz", "--store", str(tmp_path))
    assert result.returncode == 2 and "no key with id" in result.stderr
    assert [e.team for e in list_keys(tmp_path)] == ["red"]  # nothing changed


def _models(url: str, key: str) -> int:
    request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_revoked_key_is_refused_at_once_by_a_running_gateway(tmp_path):
    store = tmp_path / "store"
    key, other = create_key(store, "red"), create_key(store, "red")
    # /v1/models is answered by the gateway itself (from the store): no trainer needed.
    node = GatewayNode(store, redis_prefix(), f"127.0.0.1:{free_port()}", auth=True)
    try:
        assert _models(node.http_url, key) == 200
        result = _cli("keys", "revoke", digest(key)[:12], "--store", str(store))
        assert result.returncode == 0 and "revoked" in result.stderr, result.stderr
        assert _models(node.http_url, key) == 401  # the very next request
        assert _models(node.http_url, other) == 200
    finally:
        node.stop()


def test_a_keys_file_replaced_within_one_mtime_and_size_is_reloaded(tmp_path):
    """A rename over the file inside one mtime tick (and with the same size) is a change:
    the inode tells it."""
    ring = KeyRing(tmp_path)
    path = tmp_path / KEYS_FILE
    first, second = "hw_" + "a" * 43, "hw_" + "b" * 43
    entry = {"sha256": digest(first), "team": "red", "admin": False, "created": 1.0}
    path.write_text(json.dumps({"keys": [entry]}))
    assert ring.caller(f"Bearer {first}").team == "red"
    before = path.stat()
    replacement = tmp_path / "replacement.json"
    replacement.write_text(json.dumps({"keys": [{**entry, "sha256": digest(second)}]}))
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, path)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert ring.caller(f"Bearer {second}").team == "red"
    with pytest.raises(Unauthenticated):
        ring.caller(f"Bearer {first}")
