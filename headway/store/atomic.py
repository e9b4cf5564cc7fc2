"""Crash-safe writes: temp name → (fsync) → rename → (fsync the directory).

A reader (or a process restarted after SIGKILL) sees either the old content or the new,
never a torn file: that needs only the rename, since a killed process's writes are already
in the kernel's page cache. The fsyncs add survival of a power loss; with `sync=False`
they are left to the caller (the store does them in the background, see `durable.py`).
Directories are published the same way: built under a temp name, then renamed into place
in one step.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"  # anything named so is a leftover of an interrupted write


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make the content of file `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cached(path: Path) -> None:
    """Ask the kernel to drop the clean page-cache pages of file `path` (best effort, where
    POSIX fadvise exists; a missing file is ignored). For a file already on disk that this
    process will not read soon: its memory goes back to the free list, where the next
    write finds it."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_sibling(path: Path) -> Path:
    """A fresh temp name beside `path`, recognisable as a leftover by its prefix."""
    return path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(4)}")


def write_bytes(path: Path, data: bytes, mode: int = 0o666, sync: bool = True) -> None:
    """Atomically replace `path` with `data`; the new file gets `mode` (less the umask),
    from its creation on: a private file is never readable by others, even briefly.
    `sync=False` skips the fsyncs (atomic for readers and process crashes, not power loss)."""
    tmp = temp_sibling(path)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def write_json(path: Path, value: Any, mode: int = 0o666, sync: bool = True) -> None:
    """Atomically replace `path` with `value` as indented JSON (see `write_bytes`)."""
    write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode(), mode, sync)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (before publishing it by rename)."""
    for root, _, files in os.walk(path):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def publish_dir(tmp: Path, final: Path, sync: bool = True) -> None:
    """Rename the fully written directory `tmp` to `final` and (`sync`) make it durable:
    its files before the rename, the rename after.

    Raises FileExistsError if `final` exists (rename over a non-empty directory fails).
    """
    if sync:
        fsync_tree(tmp)
    if final.exists():
        raise FileExistsError(final)
    os.rename(tmp, final)
    if sync:
        fsync_dir(final.parent)
