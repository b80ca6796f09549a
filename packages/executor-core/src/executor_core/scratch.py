"""The executor's scratch root: one directory per executor under the temp dir, holding
each worker's fresh working directory; roots left by a dead process are swept."""

from __future__ import annotations

import os
import shutil
import tempfile

SCRATCH_PREFIX = "picloud-exec-"
OWNER_FILE = "owner.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_scratch_roots(parent: str | None = None) -> int:
    """Remove scratch roots left by executors whose process died without cleaning up
    (SIGKILL, power loss). A root without a readable owner pid is left alone."""
    base = parent or tempfile.gettempdir()
    removed = 0
    for entry in os.scandir(base):
        if not (entry.name.startswith(SCRATCH_PREFIX) and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            with open(os.path.join(entry.path, OWNER_FILE)) as owner:
                pid = int(owner.read().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


def make_scratch_root(parent: str | None = None) -> str:
    """Sweep stale roots, then make this executor's own, owned by this process."""
    sweep_stale_scratch_roots(parent)
    root = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent)
    os.chmod(root, 0o711)  # slot uids traverse into their own 0700 dirs
    with open(os.path.join(root, OWNER_FILE), "w") as owner:
        owner.write(str(os.getpid()))
    return root
