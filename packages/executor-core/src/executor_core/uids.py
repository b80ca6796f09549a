"""Claiming worker uids machine-wide, so two pools never share one.

Each worker slot runs as its own unprivileged uid. Two executors on one machine
(two ``picloud serve`` processes, parallel test runs) must not hand the same uid
to workers of different apps: same-uid processes share ``RLIMIT_NPROC`` and file
ownership. A uid is claimed by holding an exclusive ``flock`` on
``<lock_dir>/uid-<uid>.lock`` for the executor's lifetime; a crashed holder's
lock vanishes with it.
"""

from __future__ import annotations

import fcntl
import os

DEFAULT_LOCK_DIR = "/run/picloud-executor"
SEARCH_SPAN = 20000


class UidClaim:
    """``count`` uids at or above ``base``, each held by an open locked file."""

    def __init__(self, base: int, count: int, lock_dir: str = DEFAULT_LOCK_DIR) -> None:
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        self.uids: list[int] = []
        self._fds: list[int] = []
        uid = base
        while len(self.uids) < count:
            if uid >= base + SEARCH_SPAN:
                self.release()
                raise RuntimeError(f"no free worker uid in {base}..{base + SEARCH_SPAN}")
            fd = os.open(
                os.path.join(lock_dir, f"uid-{uid}.lock"),
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                0o600,
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
            else:
                self.uids.append(uid)
                self._fds.append(fd)
            uid += 1

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
