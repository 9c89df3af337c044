"""Exclusive, non-blocking file locks: one daemon per state file and per embedded store,
one writer per output file. The kernel drops a lock when its holder dies."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO


def try_lock(path: Path) -> IO[bytes] | None:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) until the returned file
    is closed; None when another process holds it."""
    lock = path.open("ab")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock
