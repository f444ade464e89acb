"""The state directory: where each group's continuity state survives a process or pod restart.

One small JSON file per presentation and group, ``<dir>/<presentation>.<group>.json`` (its
content: :mod:`orchestrator.encode.continuity`). Written atomically: a temporary file in the same
directory, flushed to disk, renamed over the old one, and the directory flushed, so a crash at
any instant leaves either the old state or the new one, never half of one. These functions
block; callers run them in a worker thread.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

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
