"""The state directory: where each group's continuity state survives a process or pod restart.

One small JSON file per presentation and group, ``<dir>/<presentation>.<group>.json`` (its
content: :mod:`orchestrator.encode.continuity`), and beside it a lock file,
``<dir>/<presentation>.<group>.lock``: one running instance per group and state directory
(:func:`hold_group_lock`). Two instances of one group would write the same state file and push
as the same group; the second one is refused before it goes live, with the holder's PID and host
(written in the lock file) in the message. The lock is ``flock``: released by the kernel when
the holder exits, however it exits (a stale lock file is harmless), and on a shared NFS volume
Linux maps it to a POSIX lock the server arbitrates, so it also works across hosts.

The state file is written atomically: a temporary file in the same directory, flushed to disk,
renamed over the old one, and the directory flushed, so a crash at any instant leaves either the
old state or the new one, never half of one. These functions block; callers run them in a
worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from orchestrator.errors import InstanceLocked

log = logging.getLogger(__name__)


def state_path(directory: Path, name: str) -> Path:
    """``name`` is ``<presentation>.<group>``: both are safe file-name parts (profile NAME_PATTERN)."""
    return directory / f"{name}.json"


def write_state(directory: Path, name: str, data: bytes) -> None:
    """Replace ``<directory>/<name>.json`` with ``data``, atomically. Raises OSError."""
    directory.mkdir(parents=True, exist_ok=True)
    target = state_path(directory, name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_state(directory: Path, name: str) -> bytes | None:
    """The state file's bytes, or None if there is none yet. Raises OSError if unreadable."""
    try:
        return state_path(directory, name).read_bytes()
    except FileNotFoundError:
        return None


def lock_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.lock"


@contextlib.contextmanager
def hold_group_lock(directory: Path, name: str, group: str) -> Iterator[Path]:
    """Hold ``<directory>/<name>.lock`` exclusively while the block runs.

    Raises :class:`InstanceLocked` naming the group, the holder's PID and host and the directory
    if another process holds it, OSError if the directory or file cannot be used."""
    directory.mkdir(parents=True, exist_ok=True)
    path = lock_path(directory, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown (nothing written yet)"
            raise InstanceLocked(
                f"group {group!r} is already running with state directory {directory}: {path} is held by "
                f"{holder}; stop that instance first (or give this one another [state] dir)") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        log.info("supervisor.lock.held group=%s file=%s pid=%d", group, path, os.getpid())
        yield path
    finally:
        os.close(fd)  # releases the lock
